/* Directives, per-server and per-company configuration, inheritance, and the
 * start-up checks that need the whole configuration. */
#include <string.h>

#include <apr_strings.h>
#include <apr_hash.h>
#include <apr_file_info.h>
#include <apr_file_io.h>

#include <httpd.h>
#include <http_config.h>
#include <http_log.h>

#include "mod_msoauth.h"

APLOG_USE_MODULE(msoauth);

msoauth_srv_conf_t *msoauth_srv_conf(server_rec *s)
{
    return ap_get_module_config(s->module_config, &msoauth_module);
}

msoauth_company_t *msoauth_company(server_rec *s, const char *name)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(s);
    return sc->companies ? apr_hash_get(sc->companies, name, APR_HASH_KEY_STRING) : NULL;
}

static void settings_init(msoauth_settings_t *st)
{
    memset(st, 0, sizeof(*st));
    st->cloud = -1;
    st->edition = -1;
    st->sync_interval = -1;
}

/* add over base: what add gives wins, the rest comes from base. */
static void settings_merge(msoauth_settings_t *out, const msoauth_settings_t *base,
                           const msoauth_settings_t *add)
{
#define PICK(f) out->f = add->f ? add->f : base->f
#define PICKN(f) out->f = add->f >= 0 ? add->f : base->f
    if (add->client_id) {
        out->client_id = add->client_id;
        out->client_id_at = add->client_id_at;
    }
    else {
        out->client_id = base->client_id;
        out->client_id_at = base->client_id_at;
    }
    if (add->client_secret) {
        out->client_secret = add->client_secret;
        out->client_secret_at = add->client_secret_at;
        out->secret_file = add->secret_file;
    }
    else {
        out->client_secret = base->client_secret;
        out->client_secret_at = base->client_secret_at;
        out->secret_file = base->secret_file;
    }
    if (add->secret_expires) {
        out->secret_expires = add->secret_expires;
        out->secret_expires_at = add->secret_expires_at;
        out->secret_expires_text = add->secret_expires_text;
    }
    else {
        out->secret_expires = base->secret_expires;
        out->secret_expires_at = base->secret_expires_at;
        out->secret_expires_text = base->secret_expires_text;
    }
    PICK(tenant);
    PICKN(cloud);
    PICK(authority_url);
    PICK(graph_url);
    PICKN(edition);
    PICK(scopes);
    PICK(folders);
    PICKN(sync_interval);
#undef PICK
#undef PICKN
}

void *msoauth_create_srv_conf(apr_pool_t *p, server_rec *s)
{
    msoauth_srv_conf_t *sc = apr_pcalloc(p, sizeof(*sc));

    settings_init(&sc->level);
    sc->decls = apr_hash_make(p);
    sc->s = s;
    return sc;
}

void *msoauth_merge_srv_conf(apr_pool_t *p, void *basev, void *addv)
{
    msoauth_srv_conf_t *base = basev, *add = addv;
    msoauth_srv_conf_t *sc = apr_pcalloc(p, sizeof(*sc));

    settings_merge(&sc->level, &base->level, &add->level);
    /* A vhost sees the main server's companies; its own sections of the same
     * name are merged over them in finalize. */
    sc->decls = add->decls;
    sc->base_url = add->base_url;
    sc->base_url_at = add->base_url_at;
    sc->redirect_path = add->redirect_path ? add->redirect_path : base->redirect_path;
    if (add->keyring) {
        sc->keyring = add->keyring;
        sc->keyring_at = add->keyring_at;
        sc->key_files = add->key_files;
    }
    else {
        sc->keyring = base->keyring;
        sc->keyring_at = base->keyring_at;
        sc->key_files = base->key_files;
    }
    sc->s = add->s;
    return sc;
}

/* --- directive callbacks --- */

static const char *where(cmd_parms *cmd)
{
    return apr_psprintf(cmd->pool, "%s:%d", cmd->directive->filename, cmd->directive->line_num);
}

static msoauth_srv_conf_t *conf_of(cmd_parms *cmd)
{
    return msoauth_srv_conf(cmd->server);
}

/* The settings a directive writes to: the open company section, else the level. */
static msoauth_settings_t *target(cmd_parms *cmd)
{
    msoauth_srv_conf_t *sc = conf_of(cmd);
    return sc->current ? &sc->current->set : &sc->level;
}

static const char *fail(cmd_parms *cmd, const char *msg)
{
    return apr_pstrcat(cmd->pool, cmd->cmd->name, ": ", msg, NULL);
}

/* Directives that belong to the server, not to a company. */
static const char *not_in_company(cmd_parms *cmd)
{
    if (conf_of(cmd)->current) {
        return fail(cmd, "is set per server or virtual host, not inside <MSOAuthCompany>: "
                    "move it outside the section");
    }
    return NULL;
}

static const char *set_company(cmd_parms *cmd, void *dummy, const char *arg)
{
    msoauth_srv_conf_t *sc = conf_of(cmd);
    const char *err = ap_check_cmd_context(cmd, NOT_IN_DIR_CONTEXT);
    const char *endp, *name, *msg;
    msoauth_company_decl_t *decl;

    if (err) {
        return err;
    }
    if (sc->current) {
        return "<MSOAuthCompany> sections cannot be nested: close the open one with "
               "</MSOAuthCompany> first";
    }
    endp = ap_strrchr_c(arg, '>');
    if (!endp) {
        return "<MSOAuthCompany> is missing its closing '>'";
    }
    name = apr_pstrndup(cmd->pool, arg, endp - arg);
    name = mso_trim(apr_pstrdup(cmd->pool, name));
    if (strlen(name) > 2 && (name[0] == '"' || name[0] == '\'')
        && name[strlen(name) - 1] == name[0]) {
        name = apr_pstrndup(cmd->pool, name + 1, strlen(name) - 2);
    }
    if ((msg = mso_check_company_name(cmd->pool, name)) != NULL) {
        return apr_pstrcat(cmd->pool, "<MSOAuthCompany>: ", msg, NULL);
    }
    if (apr_hash_get(sc->decls, name, APR_HASH_KEY_STRING)) {
        msoauth_company_decl_t *prev = apr_hash_get(sc->decls, name, APR_HASH_KEY_STRING);
        return apr_psprintf(cmd->pool, "<MSOAuthCompany %s> is already defined at %s: give "
                            "each company one section per virtual host", name,
                            prev->defined_at);
    }
    decl = apr_pcalloc(cmd->pool, sizeof(*decl));
    decl->name = name;
    decl->defined_at = where(cmd);
    settings_init(&decl->set);
    apr_hash_set(sc->decls, name, APR_HASH_KEY_STRING, decl);

    sc->current = decl;
    err = ap_walk_config(cmd->directive->first_child, cmd, cmd->context);
    sc->current = NULL;
    return err;
}

/* One word of a RAW_ARGS line, which may be "" (TAKE1 refuses an empty one). */
static const char *one_word(cmd_parms *cmd, const char *args, const char **word)
{
    *word = ap_getword_conf(cmd->pool, &args);
    while (*args == ' ' || *args == '\t') {
        args++;
    }
    if (*args) {
        return fail(cmd, "takes one value (quote it if it contains spaces)");
    }
    return NULL;
}

static const char *set_client_id(cmd_parms *cmd, void *dummy, const char *args)
{
    msoauth_settings_t *st = target(cmd);
    const char *msg, *arg;

    if ((msg = one_word(cmd, args, &arg)) != NULL) {
        return msg;
    }
    if (!*arg) {
        return NULL;    /* empty: fall back to the main server's credentials */
    }
    if ((msg = mso_check_guid(cmd->pool, arg, "Application (client) ID")) != NULL) {
        return fail(cmd, msg);
    }
    st->client_id = apr_pstrdup(cmd->pool, arg);
    st->client_id_at = where(cmd);
    return NULL;
}

static const char *set_client_secret(cmd_parms *cmd, void *dummy, const char *args)
{
    msoauth_settings_t *st = target(cmd);
    const char *msg, *arg;

    if ((msg = one_word(cmd, args, &arg)) != NULL) {
        return msg;
    }
    if (!*arg) {
        return NULL;
    }
    if (st->secret_file) {
        return fail(cmd, "the secret is already read from MSOAuthClientSecretFile here: "
                    "keep only one of the two");
    }
    st->client_secret = apr_pstrdup(cmd->pool, arg);
    st->client_secret_at = where(cmd);
    return NULL;
}

static const char *set_client_secret_file(cmd_parms *cmd, void *dummy, const char *arg)
{
    msoauth_settings_t *st = target(cmd);
    const char *path = ap_server_root_relative(cmd->pool, arg);
    apr_file_t *f;
    apr_status_t rv;
    char buf[1024];
    apr_size_t n = sizeof(buf) - 1;
    char *secret;

    if (!path) {
        return fail(cmd, apr_psprintf(cmd->pool, "invalid path '%s'", arg));
    }
    if (st->client_secret) {
        return fail(cmd, "a secret is already given with MSOAuthClientSecret here: keep only "
                    "one of the two");
    }
    rv = apr_file_open(&f, path, APR_FOPEN_READ, 0, cmd->temp_pool);
    if (rv != APR_SUCCESS) {
        return fail(cmd, apr_psprintf(cmd->pool, "cannot read %s (%pm): create the file with "
                                      "the client secret Value (not its Secret ID) and make it "
                                      "readable by root only", path, &rv));
    }
    rv = apr_file_read_full(f, buf, n, &n);
    apr_file_close(f);
    if (rv != APR_SUCCESS && rv != APR_EOF) {
        return fail(cmd, apr_psprintf(cmd->pool, "cannot read %s (%pm)", path, &rv));
    }
    if (n >= sizeof(buf) - 1) {
        return fail(cmd, apr_psprintf(cmd->pool, "%s is larger than a client secret can be: "
                                      "put only the secret Value in it", path));
    }
    buf[n] = '\0';
    secret = mso_trim(buf);
    if (!*secret) {
        return fail(cmd, apr_psprintf(cmd->pool, "%s is empty: put the client secret Value "
                                      "in it", path));
    }
    if (strchr(secret, '\n') || strchr(secret, '\r')) {
        return fail(cmd, apr_psprintf(cmd->pool, "%s holds more than one line: put only the "
                                      "client secret Value in it", path));
    }
    st->client_secret = apr_pstrdup(cmd->pool, secret);
    memset(buf, 0, sizeof(buf));
    st->client_secret_at = where(cmd);
    st->secret_file = path;
    return NULL;
}

static const char *set_secret_expires(cmd_parms *cmd, void *dummy, const char *arg)
{
    msoauth_settings_t *st = target(cmd);
    const char *msg = mso_check_date(cmd->pool, arg, &st->secret_expires);

    if (msg) {
        return fail(cmd, msg);
    }
    st->secret_expires_at = where(cmd);
    st->secret_expires_text = apr_pstrdup(cmd->pool, arg);
    return NULL;
}

static const char *set_tenant(cmd_parms *cmd, void *dummy, const char *arg)
{
    const char *msg = mso_check_tenant(cmd->pool, arg);

    if (msg) {
        return fail(cmd, msg);
    }
    target(cmd)->tenant = apr_pstrdup(cmd->pool, arg);
    return NULL;
}

static const char *set_cloud(cmd_parms *cmd, void *dummy, const char *arg)
{
    mso_cloud_e cloud;
    const char *msg = mso_check_cloud(cmd->pool, arg, &cloud);

    if (msg) {
        return fail(cmd, msg);
    }
    target(cmd)->cloud = cloud;
    return NULL;
}

static const char *set_edition(cmd_parms *cmd, void *dummy, const char *arg)
{
    mso_edition_e edition;
    const char *msg = mso_check_edition(cmd->pool, arg, &edition);

    if (msg) {
        return fail(cmd, msg);
    }
    target(cmd)->edition = edition;
    return NULL;
}

static const char *set_service_url(cmd_parms *cmd, void *dummy, const char *arg)
{
    int graph = cmd->info != NULL;
    const char *msg = mso_check_service_url(cmd->pool, arg, graph);

    if (msg) {
        return fail(cmd, msg);
    }
    if (graph) {
        target(cmd)->graph_url = apr_pstrdup(cmd->pool, arg);
    }
    else {
        target(cmd)->authority_url = apr_pstrdup(cmd->pool, arg);
    }
    return NULL;
}

/* Words of a RAW_ARGS line; each directive line replaces the previous one. */
static const char *set_word_list(cmd_parms *cmd, const char *args, apr_array_header_t **list,
                                 const char *(*check)(apr_pool_t *, const char *))
{
    apr_array_header_t *arr = apr_array_make(cmd->pool, 4, sizeof(const char *));
    const char *word, *msg;

    while (*(word = ap_getword_conf(cmd->pool, &args))) {
        if ((msg = check(cmd->pool, word)) != NULL) {
            return fail(cmd, msg);
        }
        APR_ARRAY_PUSH(arr, const char *) = word;
    }
    if (arr->nelts == 0) {
        return fail(cmd, "needs at least one value");
    }
    *list = arr;
    return NULL;
}

static const char *set_scope(cmd_parms *cmd, void *dummy, const char *args)
{
    return set_word_list(cmd, args, &target(cmd)->scopes, mso_check_scope);
}

static const char *set_folders(cmd_parms *cmd, void *dummy, const char *args)
{
    return set_word_list(cmd, args, &target(cmd)->folders, mso_check_folder);
}

static const char *set_interval(cmd_parms *cmd, void *dummy, const char *arg)
{
    const char *msg = mso_check_interval(cmd->pool, arg, &target(cmd)->sync_interval);
    return msg ? fail(cmd, msg) : NULL;
}

static const char *set_base_url(cmd_parms *cmd, void *dummy, const char *arg)
{
    msoauth_srv_conf_t *sc = conf_of(cmd);
    const char *msg;

    if ((msg = not_in_company(cmd)) != NULL) {
        return msg;
    }
    if ((msg = mso_check_base_url(cmd->pool, arg)) != NULL) {
        return fail(cmd, msg);
    }
    sc->base_url = apr_pstrdup(cmd->pool, arg);
    sc->base_url_at = where(cmd);
    return NULL;
}

static const char *set_redirect_path(cmd_parms *cmd, void *dummy, const char *arg)
{
    const char *msg;

    if ((msg = not_in_company(cmd)) != NULL) {
        return msg;
    }
    if ((msg = mso_check_redirect_path(cmd->pool, arg)) != NULL) {
        return fail(cmd, msg);
    }
    conf_of(cmd)->redirect_path = apr_pstrdup(cmd->pool, arg);
    return NULL;
}

static const char *set_key_files(cmd_parms *cmd, void *dummy, const char *args)
{
    msoauth_srv_conf_t *sc = conf_of(cmd);
    mso_keyring_t *kr;
    apr_array_header_t *files;
    const char *word, *msg;
    unsigned char key[MSO_KEY_LEN];
    apr_status_t rv;

    if ((msg = not_in_company(cmd)) != NULL) {
        return msg;
    }
    kr = mso_keyring_create(cmd->pool);
    files = apr_array_make(cmd->pool, 2, sizeof(const char *));
    while (*(word = ap_getword_conf(cmd->pool, &args))) {
        const char *path = ap_server_root_relative(cmd->pool, word);
        const char *why = NULL;

        if (!path) {
            return fail(cmd, apr_psprintf(cmd->pool, "invalid path '%s'", word));
        }
        rv = mso_key_read_file(cmd->temp_pool, path, key, &why);
        if (rv != APR_SUCCESS) {
            return fail(cmd, why);
        }
        rv = mso_keyring_add(kr, key);
        memset(key, 0, sizeof(key));
        if (rv == APR_EEXIST) {
            return fail(cmd, apr_psprintf(cmd->pool, "%s holds the same key as an earlier file "
                                          "on this line: list each key once", path));
        }
        if (rv != APR_SUCCESS) {
            return fail(cmd, apr_psprintf(cmd->pool, "too many key files (at most %d): remove "
                                          "keys no stored token uses any more",
                                          MSO_KEYRING_MAX));
        }
            APR_ARRAY_PUSH(files, const char *) = path;
    }
    if (files->nelts == 0) {
        return fail(cmd, "needs at least one key file; create one with: "
                    "openssl rand -hex 32 > /etc/apache2/msoauth.key && "
                    "chmod 600 /etc/apache2/msoauth.key");
    }
    sc->keyring = kr;
    sc->keyring_at = where(cmd);
    sc->key_files = files;
    return NULL;
}

const command_rec msoauth_cmds[] = {
    AP_INIT_RAW_ARGS("<MSOAuthCompany", set_company, NULL, RSRC_CONF,
        "<MSOAuthCompany NAME> ... </MSOAuthCompany>: a named set of Microsoft app "
        "credentials and settings; NAME is 1-64 of A-Z a-z 0-9 _ . -"),
    AP_INIT_RAW_ARGS("MSOAuthClientID", set_client_id, NULL, RSRC_CONF,
        "Application (client) ID of the app registration (a GUID); empty falls back to "
        "the main server's"),
    AP_INIT_RAW_ARGS("MSOAuthClientSecret", set_client_secret, NULL, RSRC_CONF,
        "the client secret Value (not its Secret ID); prefer ${ENV} or "
        "MSOAuthClientSecretFile to keep it out of the configuration"),
    AP_INIT_TAKE1("MSOAuthClientSecretFile", set_client_secret_file, NULL, RSRC_CONF,
        "a file holding the client secret Value, read once at startup"),
    AP_INIT_TAKE1("MSOAuthSecretExpires", set_secret_expires, NULL, RSRC_CONF,
        "YYYY-MM-DD: the secret's expiry, warned about 30 days ahead"),
    AP_INIT_TAKE1("MSOAuthTenant", set_tenant, NULL, RSRC_CONF,
        "common, organizations, consumers, a tenant GUID or a tenant domain"),
    AP_INIT_TAKE1("MSOAuthCloud", set_cloud, NULL, RSRC_CONF,
        "global, usgov, usgov-dod or china"),
    AP_INIT_TAKE1("MSOAuthAuthorityURL", set_service_url, NULL, RSRC_CONF,
        "overrides the sign-in host of the cloud (simulators, proxies)"),
    AP_INIT_TAKE1("MSOAuthGraphURL", set_service_url, "graph", RSRC_CONF,
        "overrides the Graph root URL of the cloud (without /v1.0)"),
    AP_INIT_TAKE1("MSOAuthEdition", set_edition, NULL, RSRC_CONF,
        "basic (Mail.Read) or pro (Mail.ReadWrite, writes changes back to Outlook)"),
    AP_INIT_RAW_ARGS("MSOAuthScope", set_scope, NULL, RSRC_CONF,
        "extra delegated scopes to request, e.g. Mail.Send"),
    AP_INIT_TAKE1("MSOAuthBaseURL", set_base_url, NULL, RSRC_CONF,
        "the public base URL, e.g. https://erp.example.com (no trailing slash)"),
    AP_INIT_TAKE1("MSOAuthRedirectPath", set_redirect_path, NULL, RSRC_CONF,
        "path of the msoauth-confirm handler; default /microsoft_outlook/confirm"),
    AP_INIT_RAW_ARGS("MSOAuthTokenKeyFile", set_key_files, NULL, RSRC_CONF,
        "files with 32-byte keys; the first seals, all open (rotation)"),
    AP_INIT_RAW_ARGS("MSOAuthSyncFolders", set_folders, NULL, RSRC_CONF,
        "well-known folder names to mirror; default inbox"),
    AP_INIT_TAKE1("MSOAuthSyncInterval", set_interval, NULL, RSRC_CONF,
        "seconds between incremental syncs of a mailbox; default 60"),
    {NULL}
};

/* --- the whole configuration --- */

static apr_array_header_t *single(apr_pool_t *p, const char *v)
{
    apr_array_header_t *a = apr_array_make(p, 1, sizeof(const char *));
    APR_ARRAY_PUSH(a, const char *) = v;
    return a;
}

static msoauth_company_t *resolve(apr_pool_t *p, server_rec *s, const char *name,
                                  const char *defined_at, const msoauth_settings_t *st)
{
    msoauth_company_t *c = apr_pcalloc(p, sizeof(*c));

    c->name = name;
    c->defined_at = defined_at;
    c->s = s;
    c->client_id = st->client_id;
    c->client_secret = st->client_secret;
    c->secret_at = st->client_secret_at;
    c->secret_file = st->secret_file;
    c->secret_expires = st->secret_expires;
    c->secret_expires_text = st->secret_expires_text;
    c->secret_expires_at = st->secret_expires_at;
    c->tenant = st->tenant ? st->tenant : "common";
    c->cloud = st->cloud >= 0 ? (mso_cloud_e)st->cloud : MSO_CLOUD_GLOBAL;
    c->authority_url = st->authority_url ? st->authority_url : mso_cloud_authority(c->cloud);
    c->graph_url = st->graph_url ? st->graph_url : mso_cloud_graph(c->cloud);
    c->edition = st->edition >= 0 ? (mso_edition_e)st->edition : MSO_EDITION_BASIC;
    c->scopes = st->scopes ? st->scopes : apr_array_make(p, 1, sizeof(const char *));
    c->folders = st->folders ? st->folders : single(p, "inbox");
    c->sync_interval = st->sync_interval > 0 ? st->sync_interval : MSOAUTH_DEFAULT_INTERVAL;
    return c;
}

static const char *server_name(apr_pool_t *p, server_rec *s)
{
    if (!s->is_virtual) {
        return "the main server";
    }
    return apr_psprintf(p, "virtual host %s (%s:%d)", s->server_hostname ? s->server_hostname
                        : "?", s->defn_name ? s->defn_name : "?", s->defn_line_number);
}

/* From ServerName, its port and scheme, when MSOAuthBaseURL is not given. */
static const char *derive_base_url(apr_pool_t *p, server_rec *s)
{
    const char *scheme = s->server_scheme ? s->server_scheme
                         : (s->port == 443 ? "https" : "http");
    int dflt = (!strcmp(scheme, "https") && s->port == 443)
               || (!strcmp(scheme, "http") && s->port == 80) || s->port == 0;

    if (dflt) {
        return apr_psprintf(p, "%s://%s", scheme, s->server_hostname);
    }
    return apr_psprintf(p, "%s://%s:%u", scheme, s->server_hostname, s->port);
}

typedef struct {
    apr_pool_t *p;
    int errors;
    int log_warnings;
    int expired_level;
    apr_hash_t *warned;     /* "file:line" of a value already warned about */
} check_ctx_t;

static int first_time(check_ctx_t *cx, const char *key)
{
    if (!key || apr_hash_get(cx->warned, key, APR_HASH_KEY_STRING)) {
        return 0;
    }
    apr_hash_set(cx->warned, key, APR_HASH_KEY_STRING, "");
    return 1;
}

/* A secret or key file that others can read defeats its purpose. */
static void warn_if_world_readable(check_ctx_t *cx, server_rec *s, const char *directive,
                                   const char *path)
{
    apr_finfo_t fi;

    if (!path || !cx->log_warnings || !first_time(cx, apr_pstrcat(cx->p, "perm:", path, NULL))) {
        return;
    }
    if (apr_stat(&fi, path, APR_FINFO_PROT, cx->p) == APR_SUCCESS
        && (fi.protection & APR_FPROT_WREAD)) {
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(001)
                     "%s: %s is readable by every user on this machine: chmod 600 it "
                     "(httpd reads it as root at startup)", directive, path);
    }
}

static void check_company(check_ctx_t *cx, server_rec *s, msoauth_company_t *c)
{
    apr_pool_t *p = cx->p;

    if (!c->client_id || !c->client_secret) {
        if (cx->log_warnings && first_time(cx, apr_pstrcat(p, "nocred:", c->defined_at, NULL))) {
            ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(002)
                         "MSOAuthCompany %s (%s) has no %s and none to fall back to in the "
                         "main server: sign-ins for it will fail with not_configured. Set "
                         "MSOAuthClientID and MSOAuthClientSecret(File) in the section or in "
                         "the main server configuration", c->name, c->defined_at,
                         !c->client_id ? "MSOAuthClientID" : "MSOAuthClientSecret");
        }
        return;
    }
    warn_if_world_readable(cx, s, "MSOAuthClientSecretFile", c->secret_file);
    if (mso_secret_looks_like_id(c->client_secret) && cx->log_warnings
        && first_time(cx, apr_pstrcat(p, "guid:", c->secret_at, NULL))) {
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(003)
                     "MSOAuthClientSecret (%s, used by company %s) is shaped like a GUID: "
                     "that is usually the secret's Secret ID, not its Value, and Microsoft "
                     "will refuse it (AADSTS7000215). Copy the Value column under "
                     "Certificates & secrets (it is shown only once; create a new secret "
                     "if it is hidden)", c->secret_at, c->name);
    }
    if (c->secret_expires && cx->log_warnings
        && first_time(cx, apr_pstrcat(p, "exp:", c->secret_expires_at, NULL))) {
        long days = mso_days_until(c->secret_expires, apr_time_now());

        if (days < 0) {
            ap_log_error(APLOG_MARK, cx->expired_level, 0, s, MSOLOGNO(004)
                         "MSOAuthSecretExpires (%s): the client secret of company %s expired "
                         "on %s; token calls will fail with client_secret_expired "
                         "(AADSTS7000222). Create a new secret under Certificates & secrets, "
                         "put its Value into the configuration and update "
                         "MSOAuthSecretExpires", c->secret_expires_at, c->name,
                         c->secret_expires_text);
        }
        else if (days < MSOAUTH_SECRET_WARN_DAYS) {
            ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(005)
                         "MSOAuthSecretExpires (%s): the client secret of company %s expires "
                         "in %ld day%s (%s). Create a new secret under Certificates & secrets "
                         "now, deploy its Value, then delete the old one", c->secret_expires_at,
                         c->name, days, days == 1 ? "" : "s", c->secret_expires_text);
        }
    }
}

static void finalize_server(check_ctx_t *cx, server_rec *s, msoauth_srv_conf_t *main_sc)
{
    apr_pool_t *p = cx->p;
    msoauth_srv_conf_t *sc = msoauth_srv_conf(s);
    apr_hash_t *names = apr_hash_make(p);
    apr_hash_index_t *hi;
    int with_credentials = 0;
    const char *msg;

    sc->s = s;
    sc->is_main = !s->is_virtual;
    sc->companies = apr_hash_make(p);

    /* Companies: the main server's sections, this vhost's, and "default". */
    for (hi = apr_hash_first(p, main_sc->decls); hi; hi = apr_hash_next(hi)) {
        apr_hash_set(names, apr_hash_this_key(hi), APR_HASH_KEY_STRING, "");
    }
    for (hi = apr_hash_first(p, sc->decls); hi; hi = apr_hash_next(hi)) {
        apr_hash_set(names, apr_hash_this_key(hi), APR_HASH_KEY_STRING, "");
    }
    if (sc->level.client_id || sc->level.client_secret) {
        apr_hash_set(names, MSOAUTH_DEFAULT_COMPANY, APR_HASH_KEY_STRING, "");
    }
    for (hi = apr_hash_first(p, names); hi; hi = apr_hash_next(hi)) {
        const char *name = apr_hash_this_key(hi);
        msoauth_company_decl_t *md = s->is_virtual
            ? apr_hash_get(main_sc->decls, name, APR_HASH_KEY_STRING) : NULL;
        msoauth_company_decl_t *own = apr_hash_get(sc->decls, name, APR_HASH_KEY_STRING);
        msoauth_settings_t eff = sc->level, tmp;
        const char *at;
        msoauth_company_t *c;

        if (md) {
            settings_merge(&tmp, &eff, &md->set);
            eff = tmp;
        }
        if (own) {
            settings_merge(&tmp, &eff, &own->set);
            eff = tmp;
        }
        at = own ? own->defined_at : md ? md->defined_at
             : (s->defn_name ? apr_psprintf(p, "%s:%d", s->defn_name, s->defn_line_number)
                : "the main server configuration");
        c = resolve(p, s, name, at, &eff);
        apr_hash_set(sc->companies, name, APR_HASH_KEY_STRING, c);
        if (c->client_id) {
            with_credentials++;
        }
        check_company(cx, s, c);
    }

    sc->redirect_path = sc->redirect_path ? sc->redirect_path : MSOAUTH_DEFAULT_REDIRECT_PATH;
    sc->effective_base_url = sc->base_url ? sc->base_url : derive_base_url(p, s);
    sc->redirect_uri = apr_pstrcat(p, sc->effective_base_url, sc->redirect_path, NULL);

    if (!with_credentials) {
        return;     /* nothing of ours runs on this server */
    }
    if (sc->key_files) {
        int i;
        for (i = 0; i < sc->key_files->nelts; i++) {
            warn_if_world_readable(cx, s, "MSOAuthTokenKeyFile",
                                   APR_ARRAY_IDX(sc->key_files, i, const char *));
        }
    }
    if (!sc->keyring) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(006)
                     "MSOAuthTokenKeyFile is missing for %s, which has %d compan%s configured: "
                     "tokens cannot be stored without a key. Create one with 'openssl rand "
                     "-hex 32 > /etc/apache2/msoauth.key && chmod 600 /etc/apache2/msoauth.key' "
                     "and add 'MSOAuthTokenKeyFile /etc/apache2/msoauth.key'",
                     server_name(p, s), with_credentials, with_credentials == 1 ? "y" : "ies");
        cx->errors++;
    }
    /* Only a warning: a vhost that merely inherits the main server's
     * credentials may never serve a sign-in. */
    if (!sc->base_url && (msg = mso_check_base_url(p, sc->effective_base_url)) != NULL
        && cx->log_warnings) {
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(007)
                     "MSOAuthBaseURL is not set for %s and the URL derived from ServerName "
                     "does not work as a Microsoft redirect URI: %s. Set MSOAuthBaseURL to the "
                     "public https:// address people use", server_name(p, s), msg);
    }
    if (strlen(sc->redirect_uri) > 256) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(008)
                     "the redirect URI %s is longer than the 256 characters Microsoft accepts: "
                     "shorten MSOAuthBaseURL or MSOAuthRedirectPath", sc->redirect_uri);
        cx->errors++;
    }
}

int msoauth_config_finalize(apr_pool_t *p, server_rec *main_s, int log_warnings,
                            int expired_level)
{
    msoauth_srv_conf_t *main_sc = msoauth_srv_conf(main_s);
    check_ctx_t cx;
    server_rec *s;

    cx.p = p;
    cx.errors = 0;
    cx.log_warnings = log_warnings;
    cx.expired_level = expired_level;
    cx.warned = apr_hash_make(p);
    for (s = main_s; s; s = s->next) {
        finalize_server(&cx, s, main_sc);
    }
    return cx.errors;
}
