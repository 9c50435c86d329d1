/* mod_msoauth: connects Outlook / Microsoft 365 mailboxes to the web
 * applications behind httpd. This file is the table of contents: the module
 * record, its hooks and the per-process state; configuration lives in
 * mod_msoauth_config.c, the handlers in mod_msoauth_flow.c and
 * mod_msoauth_admin.c, the background job in mod_msoauth_job.c, protocol and
 * storage logic in lib/. */
#include <string.h>
#include <unistd.h>

#include <apr_lib.h>
#include <apr_optional.h>
#include <apr_strings.h>
#include <apr_file_io.h>
#include <apr_dbd.h>

#include <httpd.h>
#include <http_config.h>
#include <http_core.h>
#include <http_log.h>
#include <ap_mpm.h>
#include <mod_dbd.h>
#include <mod_watchdog.h>

#include "mod_msoauth.h"
#include "mod_msoauth_admin.h"
#include "mod_msoauth_attach.h"
#include "mod_msoauth_config.h"
#include "mod_msoauth_flow.h"
#include "mod_msoauth_job.h"
#include "mod_msoauth_metrics.h"
#include "mso_crypto.h"
#include "mso_discovery.h"
#include "mso_http.h"
#include "mso_identity.h"
#include "mso_log.h"
#include "mso_account.h"
#include "mso_db.h"
#include "mso_schema.h"


#define NODE_ID_FILE "msoauth-node-id"

/* Per child process: created in child_init, read by request threads. */
static mso_discovery_cache_t *discovery_cache;
static const char *process_owner;
/* Per httpd: set in post_config (the parent), inherited by the children. */
static const char *node_id;

static APR_OPTIONAL_FN_TYPE(ap_dbd_open) *dbd_open_fn;
static APR_OPTIONAL_FN_TYPE(ap_dbd_close) *dbd_close_fn;
static APR_OPTIONAL_FN_TYPE(ap_dbd_acquire) *dbd_acquire_fn;

int msoauth_have_dbd(void)
{
    return dbd_open_fn && dbd_close_fn && dbd_acquire_fn;
}

ap_dbd_t *msoauth_dbd_open(apr_pool_t *p, server_rec *s)
{
    return dbd_open_fn ? dbd_open_fn(p, s) : NULL;
}

void msoauth_dbd_close(server_rec *s, ap_dbd_t *dbd)
{
    if (dbd_close_fn && dbd) {
        dbd_close_fn(s, dbd);
    }
}

mso_db_t *msoauth_request_db(request_rec *r)
{
    ap_dbd_t *dbd = dbd_acquire_fn ? dbd_acquire_fn(r) : NULL;
    mso_db_t *db = NULL;

    if (!dbd || mso_db_wrap(dbd->pool, dbd->driver, dbd->handle, &db) != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, 0, r, MSOLOGNO(300) "no database connection from "
                      "mod_dbd: check DBDriver/DBDParams and that the database is reachable");
        return NULL;
    }
    return db;
}

/* lib/ logs through here, tagged as ours, against the server it was given. */
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

static void no_dbd(server_rec *s)
{
    ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(020)
                 "mod_msoauth stores tokens through mod_dbd, which is not loaded: add "
                 "'LoadModule dbd_module modules/mod_dbd.so' (Debian: a2enmod dbd) and "
                 "DBDriver/DBDParams");
}

static void no_watchdog(server_rec *s)
{
    ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(026)
                 "mod_msoauth refreshes tokens and syncs mail in a mod_watchdog job, and "
                 "mod_watchdog is not loaded: add 'LoadModule watchdog_module "
                 "modules/mod_watchdog.so' (Debian: a2enmod watchdog)");
}

/* Checks that hold across directives, for `apachectl -t` (where post_config does not run). */
static void msoauth_test_config(apr_pool_t *pconf, server_rec *s)
{
    int errors = msoauth_config_finalize(pconf, s, 1, APLOG_WARNING);

    retrieve_optional_fns();
    if (!errors && in_use(s) && !msoauth_have_dbd()) {
        no_dbd(s);
        errors++;
    }
    if (!errors && in_use(s) && !APR_RETRIEVE_OPTIONAL_FN(ap_watchdog_get_instance)) {
        no_watchdog(s);
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

/* The node id: read from DefaultRuntimeDir, or made and written there. It
 * tells this httpd's processes apart from another node's (whatever their
 * host names), and outlives graceful and full restarts until the runtime
 * directory is cleared (usually at boot). */
static const char *load_node_id(apr_pool_t *p, server_rec *s)
{
    const char *path = ap_runtime_dir_relative(p, NODE_ID_FILE);
    apr_file_t *f;
    char buf[64];
    apr_size_t n = sizeof(buf) - 1;
    const char *id;

    if (path && apr_file_open(&f, path, APR_FOPEN_READ, 0, p) == APR_SUCCESS) {
        apr_status_t rv = apr_file_read_full(f, buf, n, &n);

        apr_file_close(f);
        if ((rv == APR_SUCCESS || rv == APR_EOF) && n >= 16) {
            apr_size_t i;

            buf[n] = '\0';
            mso_trim(buf);
            for (i = 0; buf[i] && (apr_isalnum(buf[i]) || buf[i] == '-' || buf[i] == '_'); i++) {
            }
            if (!buf[i] && i >= 16) {
                return apr_pstrdup(p, buf);
            }
        }
    }
    id = mso_random_token(p, 12);
    if (!id) {
        return NULL;
    }
    if (path && apr_file_open(&f, path, APR_FOPEN_WRITE | APR_FOPEN_CREATE | APR_FOPEN_TRUNCATE,
                              APR_FPROT_UREAD | APR_FPROT_UWRITE | APR_FPROT_GREAD
                              | APR_FPROT_WREAD, p) == APR_SUCCESS) {
        apr_file_puts(id, f);
        apr_file_close(f);
    }
    else {
        ap_log_error(APLOG_MARK, APLOG_NOTICE, 0, s, MSOLOGNO(024) "mod_msoauth: cannot keep "
                     "the node id in %s; leases of processes that die before a full restart "
                     "are released after they run out", path ? path : NODE_ID_FILE);
    }
    return id;
}

const char *msoauth_node_id(void)
{
    return node_id;
}

const char *msoauth_lease_owner(apr_pool_t *p)
{
    return apr_psprintf(p, "%s:%" APR_PID_T_FMT ":%s", node_id ? node_id : "node", getpid(),
                        mso_random_token(p, 6));
}

static int msoauth_post_config(apr_pool_t *pconf, apr_pool_t *plog, apr_pool_t *ptemp,
                               server_rec *s)
{
    /* httpd reads the configuration twice at start; warn only on the real pass. */
    int preflight = ap_state_query(AP_SQ_MAIN_STATE) == AP_SQ_MS_CREATE_PRE_CONFIG;
    int errors = msoauth_config_finalize(pconf, s, !preflight, APLOG_ERR);
    server_rec *vs;

    /* lib/ drops what no server would log; ap_log_error then applies each
     * server's LogLevel, msoauth:... included. */
    {
        int max = APLOG_ERR;

        for (vs = s; vs; vs = vs->next) {
            int l = ap_get_server_module_loglevel(vs, APLOG_MODULE_INDEX);

            max = l > max ? l : max;
        }
        mso_log_set(log_from_lib, s, (mso_log_level_e)(max > APLOG_DEBUG ? APLOG_DEBUG : max));
    }
    retrieve_optional_fns();
    if (errors) {
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    if (!in_use(s)) {
        return OK;
    }
    if (!msoauth_have_dbd()) {
        no_dbd(s);
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    if (preflight) {
        return OK;
    }
    if (mso_http_global_init() != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(023) "libcurl initialisation failed");
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    node_id = load_node_id(s->process->pool, s);
    if (!node_id) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(025) "no random bytes for the node "
                     "id: OpenSSL's random generator failed");
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    if (msoauth_job_register(pconf, s) != APR_SUCCESS) {
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    for (vs = s; vs; vs = vs->next) {
        msoauth_srv_conf_t *sc = msoauth_srv_conf(vs);

        if (msoauth_server_in_use(vs) && sc->keyring) {
            ap_log_error(APLOG_MARK, APLOG_INFO, 0, vs, MSOLOGNO(022)
                         "mod_msoauth %s: %u compan%s, redirect URI %s, %d token key%s "
                         "(sealing with key id %s), node %s", MSO_VERSION,
                         apr_hash_count(sc->companies),
                         apr_hash_count(sc->companies) == 1 ? "y" : "ies", sc->redirect_uri,
                         mso_keyring_count(sc->keyring),
                         mso_keyring_count(sc->keyring) == 1 ? "" : "s",
                         mso_keyring_kid(sc->keyring, 0), node_id);
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
    return co ? co->set.client_id.value : NULL;
}

/* Tokens stored before schema version 4 are sealed again for their account:
 * at start, and by the job every few minutes (a node of the previous version
 * may still write old ones during a rolling upgrade). */
void msoauth_rebind_tokens(apr_pool_t *p, server_rec *main_s, server_rec *s, mso_db_t *db)
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

/* One app account per MSOAuthMailbox of the server's app-only companies
 * (each child: the ones that exist are left alone). */
static void ensure_app_accounts(apr_pool_t *p, server_rec *s, mso_db_t *db)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(s);
    apr_hash_index_t *hi;

    for (hi = apr_hash_first(p, sc->companies); hi; hi = apr_hash_next(hi)) {
        msoauth_company_t *c = apr_hash_this_val(hi);
        mso_app_account_t in;
        const char *err = NULL;
        int created = 0, conflicts = 0;
        apr_status_t rv;

        if (!c->set.app_only.value || !c->mailboxes || !c->set.client_id.value) {
            continue;
        }
        memset(&in, 0, sizeof(in));
        in.company = c->name;
        in.client_id = c->set.client_id.value;
        in.tenant_id = mso_is_guid(c->set.tenant.value) ? c->set.tenant.value : NULL;
        in.authority = mso_authority(p, c->set.authority_url.value, c->set.tenant.value);
        in.connected_by = "MSOAuthMailbox";
        rv = mso_account_ensure_app(db, p, &in, c->mailboxes, apr_time_sec(apr_time_now()),
                                    &created, &conflicts, &err);
        if (rv != APR_SUCCESS) {
            ap_log_error(APLOG_MARK, APLOG_ERR, rv, s, MSOLOGNO(037) "mod_msoauth: the "
                         "mailboxes of company %s cannot be added: %s", c->name,
                         err ? err : "database error");
            continue;
        }
        if (created) {
            ap_log_error(APLOG_MARK, APLOG_NOTICE, 0, s, MSOLOGNO(038) "mod_msoauth: %d "
                         "mailbox%s of MSOAuthMailbox added to app-only company %s", created,
                         created == 1 ? "" : "es", c->name);
        }
        if (conflicts) {
            ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(039) "mod_msoauth: %d "
                         "mailbox%s of MSOAuthMailbox in company %s %s connected by a "
                         "person's sign-in already and stay%s so: disconnect %s on the admin "
                         "page and reload httpd to work on %s with the app", conflicts,
                         conflicts == 1 ? "" : "es", c->name, conflicts == 1 ? "is" : "are",
                         conflicts == 1 ? "s" : "", conflicts == 1 ? "it" : "them",
                         conflicts == 1 ? "it" : "them");
        }
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

    dbd = msoauth_dbd_open(p, s);
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
        msoauth_rebind_tokens(p, main_s, s, db);
        ensure_app_accounts(p, s, db);
    }
    msoauth_dbd_close(s, dbd);
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

    if (!msoauth_have_dbd() || !in_use(main_s)) {
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

typedef int msoauth_handler_fn(request_rec *r);

static const struct {
    const char *name;
    msoauth_handler_fn *fn;
} handlers[] = {
    {"msoauth-connect", msoauth_connect_handler},
    {"msoauth-confirm", msoauth_confirm_handler},
    {"msoauth-token", msoauth_token_handler},
    {"msoauth-admin", msoauth_admin_handler},
    {"msoauth-attachment", msoauth_attachment_handler},
    {"msoauth-metrics", msoauth_metrics_handler},
    {NULL, NULL}
};

static int msoauth_handler(request_rec *r)
{
    int i, rc;
    void *before;

    if (!r->handler || strncmp(r->handler, "msoauth-", 8)) {
        return DECLINED;
    }
    for (i = 0; handlers[i].name; i++) {
        if (!strcmp(r->handler, handlers[i].name)) {
            before = mso_log_scope(r->server);
            rc = handlers[i].fn(r);
            mso_log_scope(before);
            return rc;
        }
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
    msoauth_create_dir_conf,    /* per directory: MSOAuthTrustProxy */
    msoauth_merge_dir_conf,
    msoauth_create_srv_conf,
    msoauth_merge_srv_conf,
    msoauth_cmds,
    register_hooks,
    AP_MODULE_FLAG_NONE
};
