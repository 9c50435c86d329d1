/* mod_msoauth: connects Outlook / Microsoft 365 mailboxes to the web
 * applications behind httpd. This file is the table of contents: the module
 * record and its hooks. Configuration lives in mod_msoauth_config.c; protocol
 * and storage logic in lib/. */
#include <string.h>

#include <apr_optional.h>
#include <apr_strings.h>
#include <apr_dbd.h>

#include <httpd.h>
#include <http_config.h>
#include <http_core.h>
#include <http_log.h>
#include <ap_mpm.h>
#include <mod_dbd.h>

#include "mod_msoauth.h"
#include "mso_discovery.h"
#include "mso_http.h"
#include "mso_log.h"
#include "mso_account.h"
#include "mso_db.h"
#include "mso_schema.h"


/* Per child process: created in child_init, read by request threads. */
static mso_discovery_cache_t *discovery_cache;
static const char *process_owner;

static APR_OPTIONAL_FN_TYPE(ap_dbd_open) *dbd_open_fn;
static APR_OPTIONAL_FN_TYPE(ap_dbd_close) *dbd_close_fn;
static APR_OPTIONAL_FN_TYPE(ap_dbd_acquire) *dbd_acquire_fn;

ap_dbd_t *msoauth_dbd_acquire(request_rec *r)
{
    return dbd_acquire_fn ? dbd_acquire_fn(r) : NULL;
}

/* lib/ logs through here, tagged as ours. */
static void log_from_lib(void *baton, const char *file, int line, mso_log_level_e level,
                         apr_status_t rv, const char *msg)
{
    ap_log_error(file, line, APLOG_MODULE_INDEX, (int)level, rv, (server_rec *)baton,
                 "%s", msg);
}

static void retrieve_optional_fns(void)
{
    dbd_open_fn = APR_RETRIEVE_OPTIONAL_FN(ap_dbd_open);
    dbd_close_fn = APR_RETRIEVE_OPTIONAL_FN(ap_dbd_close);
    dbd_acquire_fn = APR_RETRIEVE_OPTIONAL_FN(ap_dbd_acquire);
}


/* True when some server has a company with credentials: then we need mod_dbd. */
static int in_use(server_rec *main_s)
{
    server_rec *s;

    for (s = main_s; s; s = s->next) {
        if (msoauth_server_in_use(s)) {
            return 1;
        }
    }
    return 0;
}

/* Checks that hold across directives, for `apachectl -t` (where post_config does not run). */
static void msoauth_test_config(apr_pool_t *pconf, server_rec *s)
{
    int errors = msoauth_config_finalize(pconf, s, 1, APLOG_WARNING);

    retrieve_optional_fns();
    if (!errors && in_use(s) && !dbd_open_fn) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(020)
                     "mod_msoauth stores tokens through mod_dbd, which is not loaded: add "
                     "'LoadModule dbd_module modules/mod_dbd.so' (Debian: a2enmod dbd) and "
                     "DBDriver/DBDParams");
        errors++;
    }
    if (errors) {
        /* configtest has no return code to give; exiting non-zero is how it fails. */
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(021)
                     "%d configuration error%s in mod_msoauth, see above", errors,
                     errors == 1 ? "" : "s");
        exit(1);
    }
}

static int msoauth_post_config(apr_pool_t *pconf, apr_pool_t *plog, apr_pool_t *ptemp,
                               server_rec *s)
{
    /* httpd reads the configuration twice at start; warn only on the real pass. */
    int preflight = ap_state_query(AP_SQ_MAIN_STATE) == AP_SQ_MS_CREATE_PRE_CONFIG;
    int errors = msoauth_config_finalize(pconf, s, !preflight, APLOG_ERR);
    server_rec *vs;

    mso_log_set(log_from_lib, s, (mso_log_level_e)(s->log.level > APLOG_DEBUG
                                                   ? APLOG_DEBUG : s->log.level));
    retrieve_optional_fns();
    if (errors) {
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    if (!in_use(s)) {
        return OK;
    }
    if (!dbd_open_fn) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(020)
                     "mod_msoauth stores tokens through mod_dbd, which is not loaded: add "
                     "'LoadModule dbd_module modules/mod_dbd.so' (Debian: a2enmod dbd) and "
                     "DBDriver/DBDParams");
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    if (preflight) {
        return OK;
    }
    if (mso_http_global_init() != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(023) "libcurl initialisation failed");
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    if (msoauth_job_register(pconf, s) != APR_SUCCESS) {
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    for (vs = s; vs; vs = vs->next) {
        msoauth_srv_conf_t *sc = msoauth_srv_conf(vs);
        if (msoauth_server_in_use(vs) && sc->keyring) {
            ap_log_error(APLOG_MARK, APLOG_INFO, 0, vs, MSOLOGNO(022)
                         "mod_msoauth: %u compan%s, redirect URI %s, %d token key%s "
                         "(sealing with key id %s)", apr_hash_count(sc->companies),
                         apr_hash_count(sc->companies) == 1 ? "y" : "ies", sc->redirect_uri,
                         mso_keyring_count(sc->keyring),
                         mso_keyring_count(sc->keyring) == 1 ? "" : "s",
                         mso_keyring_kid(sc->keyring, 0));
        }
    }
    return OK;
}

typedef struct {
    server_rec *s, *main_s;
} client_of_t;

/* The client ID company name has now: this server's, else a virtual host's. */
static const char *client_id_of(void *baton, const char *name)
{
    client_of_t *c = baton;
    msoauth_company_t *co = msoauth_company(c->s, name);
    server_rec *o;

    for (o = c->main_s; !co && o; o = o->next) {
        co = msoauth_company(o, name);
    }
    return co ? co->client_id : NULL;
}

/* Tokens stored before schema version 4 are sealed again for their account. */
static void rebind_server(apr_pool_t *p, server_rec *main_s, server_rec *s, mso_db_t *db)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(s);
    client_of_t c;
    mso_rebind_t n;
    const char *err = NULL;
    apr_status_t rv;

    if (!sc->keyring) {
        return;
    }
    c.s = s;
    c.main_s = main_s;
    rv = mso_account_rebind(db, p, sc->keyring, client_id_of, &c, &n, &err);
    if (rv != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_ERR, rv, s, MSOLOGNO(034) "mod_msoauth: binding the "
                     "stored tokens to their accounts failed: %s", err ? err : "unknown error");
        return;
    }
    if (n.accounts || n.tokens) {
        ap_log_error(APLOG_MARK, APLOG_NOTICE, 0, s, MSOLOGNO(035) "mod_msoauth: %d accounts "
                     "got their company's client ID and %d stored tokens were sealed again "
                     "for their account", n.accounts, n.tokens);
    }
    if (n.unopened) {
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(036) "mod_msoauth: %d tokens "
                     "stored before the upgrade do not open with the keys in "
                     "MSOAuthTokenKeyFile and stay as they are: their mailboxes must be "
                     "connected again unless the key that sealed them is added back",
                     n.unopened);
    }
}

/* Brings the schema up to date. Runs in every child: mso_schema serializes
 * concurrent migrations, and once the schema is current it is one SELECT. */
static void migrate_server(apr_pool_t *p, server_rec *main_s, server_rec *s)
{
    ap_dbd_t *dbd;
    mso_db_t *db;
    const char *err = NULL;
    int from = 0, to = 0;
    apr_status_t rv;

    dbd = dbd_open_fn(p, s);
    if (!dbd) {
        ap_log_error(APLOG_MARK, APLOG_ERR, 0, s, MSOLOGNO(030)
                     "mod_msoauth: cannot open the database through mod_dbd: check DBDriver "
                     "and DBDParams for this server (see mod_dbd's messages above), and that "
                     "the driver package is installed (Debian: libaprutil1-dbd-sqlite3 or "
                     "libaprutil1-dbd-pgsql)");
        return;
    }
    rv = mso_db_wrap(dbd->pool, dbd->driver, dbd->handle, &db);
    if (rv == APR_SUCCESS) {
        rv = mso_schema_migrate(db, p, &from, &to, &err);
    }
    else {
        err = apr_psprintf(p, "the database driver '%s' is not supported: use sqlite3 or pgsql",
                           apr_dbd_name(dbd->driver));
    }
    if (rv != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_ERR, rv, s, MSOLOGNO(031)
                     "mod_msoauth: database schema not ready: %s", err ? err : "unknown error");
    }
    else {
        if (from != to) {
            ap_log_error(APLOG_MARK, APLOG_NOTICE, 0, s, MSOLOGNO(032)
                         "mod_msoauth: database schema migrated from version %d to %d",
                         from, to);
        }
        rebind_server(p, main_s, s, db);
    }
    dbd_close_fn(s, dbd);
}

int msoauth_server_in_use(server_rec *s)
{
    apr_hash_index_t *hi;

    for (hi = apr_hash_first(NULL, msoauth_srv_conf(s)->companies); hi; hi = apr_hash_next(hi)) {
        if (((msoauth_company_t *)apr_hash_this_val(hi))->client_id) {
            return 1;
        }
    }
    return 0;
}

mso_discovery_cache_t *msoauth_discovery_cache(void)
{
    return discovery_cache;
}

const char *msoauth_process_owner(void)
{
    return process_owner;
}

static void msoauth_child_init(apr_pool_t *pchild, server_rec *main_s)
{
    server_rec *s;

    if (!dbd_open_fn || !in_use(main_s)) {
        return;
    }
    process_owner = msoauth_lease_owner(pchild);
    msoauth_job_child_init(pchild);
    if (mso_discovery_cache_create(pchild, &discovery_cache) != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, main_s, MSOLOGNO(033) "cannot create the "
                     "discovery cache");
    }
    for (s = main_s; s; s = s->next) {
        if (msoauth_server_in_use(s)) {
            migrate_server(pchild, main_s, s);
        }
    }
}

static int msoauth_handler(request_rec *r)
{
    if (!r->handler || strncmp(r->handler, "msoauth-", 8)) {
        return DECLINED;
    }
    if (!strcmp(r->handler, "msoauth-connect")) {
        return msoauth_connect_handler(r);
    }
    if (!strcmp(r->handler, "msoauth-confirm")) {
        return msoauth_confirm_handler(r);
    }
    if (!strcmp(r->handler, "msoauth-token")) {
        return msoauth_token_handler(r);
    }
    if (!strcmp(r->handler, "msoauth-admin")) {
        return msoauth_admin_handler(r);
    }
    return DECLINED;
}

static void register_hooks(apr_pool_t *p)
{
    static const char *const after_dbd[] = {"mod_dbd.c", NULL};

    ap_hook_test_config(msoauth_test_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_post_config(msoauth_post_config, NULL, NULL, APR_HOOK_MIDDLE);
    ap_hook_child_init(msoauth_child_init, after_dbd, NULL, APR_HOOK_MIDDLE);
    ap_hook_handler(msoauth_handler, NULL, NULL, APR_HOOK_MIDDLE);
}

AP_DECLARE_MODULE(msoauth) = {
    STANDARD20_MODULE_STUFF,
    NULL,                       /* per-directory config: all settings are per server */
    NULL,
    msoauth_create_srv_conf,
    msoauth_merge_srv_conf,
    msoauth_cmds,
    register_hooks,
    AP_MODULE_FLAG_NONE
};
