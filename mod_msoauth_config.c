/* Directives, per-server and per-company configuration, inheritance, and the
 * start-up checks that need the whole configuration. */
#include <string.h>

#include <apr_strings.h>
#include <apr_hash.h>
#include <apr_file_info.h>
#include <apr_file_io.h>

#include <openssl/crypto.h>

#include <httpd.h>
#include <http_config.h>
#include <http_log.h>

#include "mod_msoauth.h"
#include "mod_msoauth_config.h"
#include "mso_cert.h"
#include "mso_flow.h"

APLOG_USE_MODULE(msoauth);

msoauth_srv_conf_t *msoauth_srv_conf(server_rec *s)
{
    return ap_get_module_config(s->module_config, &msoauth_module);
}

msoauth_dir_conf_t *msoauth_dir_conf(request_rec *r)
{
    return ap_get_module_config(r->per_dir_config, &msoauth_module);
}

msoauth_company_t *msoauth_company(server_rec *s, const char *name)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(s);
    return sc->companies && name ? apr_hash_get(sc->companies, name, APR_HASH_KEY_STRING)
                                 : NULL;
}

msoauth_company_t *msoauth_account_company(server_rec *s, const char *name,
                                           const char *client_id)
{
    msoauth_company_t *c = msoauth_company(s, name);

    if (c && client_id && (!c->set.client_id.value
                           || strcasecmp(c->set.client_id.value, client_id))) {
        return NULL;
    }
    return c;
}

int msoauth_server_in_use(server_rec *s)
{
    return msoauth_srv_conf(s)->in_use;
}

int msoauth_company_has_credentials(const msoauth_company_t *c)
{
    return c && c->set.client_id.value && (c->set.client_secret.value || c->set.client_cert.cert);
}

int msoauth_retention_days(const msoauth_srv_conf_t *sc)
{
    return sc->retention_days >= 0 ? sc->retention_days : MSOAUTH_DEFAULT_RETENTION_DAYS;
}

void msoauth_http_opts(const msoauth_srv_conf_t *sc, mso_http_opts_t *o)
{
    mso_http_opts_default(o);
    o->proxy = sc->http_proxy;
    o->ca_file = sc->ca_file;
}

void msoauth_request_http_opts(const msoauth_srv_conf_t *sc, mso_http_opts_t *o)
{
    msoauth_http_opts(sc, o);
    /* A worker thread is joined before its child exits, so it may keep its
     * connections to Microsoft for the next request it serves. */
    o->keep_connection = 1;
}

void *msoauth_create_srv_conf(apr_pool_t *p, server_rec *s)
{
    msoauth_srv_conf_t *sc = apr_pcalloc(p, sizeof(*sc));

    mso_settings_init(&sc->level);
    sc->decls = apr_hash_make(p);
    sc->retention_days = -1;
    sc->s = s;
    return sc;
}

void *msoauth_merge_srv_conf(apr_pool_t *p, void *basev, void *addv)
{
    msoauth_srv_conf_t *base = basev, *add = addv;
    msoauth_srv_conf_t *sc = apr_pcalloc(p, sizeof(*sc));

    mso_settings_merge(&sc->level, &base->level, &add->level);
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
    sc->api_key = add->api_key ? add->api_key : base->api_key;
    sc->api_key_file = add->api_key ? add->api_key_file : base->api_key_file;
    sc->retention_days = add->retention_days >= 0 ? add->retention_days : base->retention_days;
    sc->http_proxy = add->http_proxy ? add->http_proxy : base->http_proxy;
    sc->ca_file = add->ca_file ? add->ca_file : base->ca_file;
    sc->s = add->s;
    return sc;
}

void *msoauth_create_dir_conf(apr_pool_t *p, char *dir)
{
    msoauth_dir_conf_t *dc = apr_pcalloc(p, sizeof(*dc));

    dc->trust_proxy = -1;
    return dc;
}

void *msoauth_merge_dir_conf(apr_pool_t *p, void *basev, void *addv)
{
    msoauth_dir_conf_t *base = basev, *add = addv;
    msoauth_dir_conf_t *dc = apr_pcalloc(p, sizeof(*dc));

    dc->trust_proxy = add->trust_proxy >= 0 ? add->trust_proxy : base->trust_proxy;
    return dc;
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
static mso_settings_t *target(cmd_parms *cmd)
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
    mso_settings_init(&decl->set);
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
    mso_settings_t *st = target(cmd);
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
    st->client_id.value = apr_pstrdup(cmd->pool, arg);
    st->client_id.at = where(cmd);
    return NULL;
}

static const char *set_client_secret(cmd_parms *cmd, void *dummy, const char *args)
{
    mso_settings_t *st = target(cmd);
    const char *msg, *arg;

    if ((msg = one_word(cmd, args, &arg)) != NULL) {
        return msg;
    }
    if (!*arg) {
        return NULL;
    }
    if (st->client_secret.file) {
        return fail(cmd, "the secret is already read from MSOAuthClientSecretFile here: "
                    "keep only one of the two");
    }
    st->client_secret.value = apr_pstrdup(cmd->pool, arg);
    st->client_secret.at = where(cmd);
    return NULL;
}

static const char *set_client_secret_file(cmd_parms *cmd, void *dummy, const char *arg)
{
    mso_settings_t *st = target(cmd);
    const char *path = ap_server_root_relative(cmd->pool, arg);
    apr_file_t *f;
    apr_status_t rv;
    char buf[1024];
    apr_size_t n = sizeof(buf) - 1;
    char *secret;

    if (!path) {
        return fail(cmd, apr_psprintf(cmd->pool, "invalid path '%s'", arg));
    }
    if (st->client_secret.value) {
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
    st->client_secret.value = apr_pstrdup(cmd->pool, secret);
    OPENSSL_cleanse(buf, sizeof(buf));
    st->client_secret.at = where(cmd);
    st->client_secret.file = path;
    return NULL;
}

static const char *set_secret_expires(cmd_parms *cmd, void *dummy, const char *arg)
{
    mso_settings_t *st = target(cmd);
    const char *msg = mso_check_date(cmd->pool, arg, &st->secret_expires.value);

    if (msg) {
        return fail(cmd, msg);
    }
    st->secret_expires.at = where(cmd);
    st->secret_expires.text = apr_pstrdup(cmd->pool, arg);
    return NULL;
}

static const char *set_tenant(cmd_parms *cmd, void *dummy, const char *arg)
{
    const char *msg = mso_check_tenant(cmd->pool, arg);

    if (msg) {
        return fail(cmd, msg);
    }
    target(cmd)->tenant.value = apr_pstrdup(cmd->pool, arg);
    target(cmd)->tenant.at = where(cmd);
    return NULL;
}

static const char *set_cloud(cmd_parms *cmd, void *dummy, const char *arg)
{
    mso_cloud_e cloud;
    const char *msg = mso_check_cloud(cmd->pool, arg, &cloud);

    if (msg) {
        return fail(cmd, msg);
    }
    target(cmd)->cloud.value = (int)cloud;
    target(cmd)->cloud.given = 1;
    target(cmd)->cloud.at = where(cmd);
    return NULL;
}

static const char *set_edition(cmd_parms *cmd, void *dummy, const char *arg)
{
    mso_edition_e edition;
    const char *msg = mso_check_edition(cmd->pool, arg, &edition);

    if (msg) {
        return fail(cmd, msg);
    }
    target(cmd)->edition.value = (int)edition;
    target(cmd)->edition.given = 1;
    target(cmd)->edition.at = where(cmd);
    return NULL;
}

static const char *set_service_url(cmd_parms *cmd, void *dummy, const char *arg)
{
    int graph = cmd->info != NULL;
    const char *msg = mso_check_service_url(cmd->pool, arg, graph);

    if (msg) {
        return fail(cmd, msg);
    }
    *(graph ? &target(cmd)->graph_url : &target(cmd)->authority_url) = (mso_setting_str_t){
        apr_pstrdup(cmd->pool, arg), where(cmd)};
    return NULL;
}

/* Words of a RAW_ARGS line; each directive line replaces the previous one. */
static const char *set_word_list(cmd_parms *cmd, const char *args, mso_setting_list_t *list,
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
    list->value = arr;
    list->at = where(cmd);
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
    mso_setting_int_t *v = &target(cmd)->sync_interval;
    const char *msg = mso_check_interval(cmd->pool, arg, &v->value);

    if (msg) {
        return fail(cmd, msg);
    }
    v->given = 1;
    v->at = where(cmd);
    return NULL;
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

/* Reads a small secret file (API key): surrounding white space trimmed, one
 * line. NULL and *value on success, else the directive's error. */
static const char *read_small_secret(cmd_parms *cmd, const char *arg, const char *what,
                                     const char **path, const char **value)
{
    apr_file_t *f;
    apr_status_t rv;
    char buf[1024];
    apr_size_t n = sizeof(buf) - 1;
    char *v;

    *path = ap_server_root_relative(cmd->pool, arg);
    if (!*path) {
        return fail(cmd, apr_psprintf(cmd->pool, "invalid path '%s'", arg));
    }
    rv = apr_file_open(&f, *path, APR_FOPEN_READ, 0, cmd->temp_pool);
    if (rv != APR_SUCCESS) {
        return fail(cmd, apr_psprintf(cmd->pool, "cannot read %s (%pm): %s", *path, &rv,
                                      what));
    }
    rv = apr_file_read_full(f, buf, n, &n);
    apr_file_close(f);
    if (rv != APR_SUCCESS && rv != APR_EOF) {
        return fail(cmd, apr_psprintf(cmd->pool, "cannot read %s (%pm)", *path, &rv));
    }
    if (n >= sizeof(buf) - 1) {
        OPENSSL_cleanse(buf, sizeof(buf));
        return fail(cmd, apr_psprintf(cmd->pool, "%s is too large: %s", *path, what));
    }
    buf[n] = '\0';
    v = mso_trim(buf);
    *value = apr_pstrdup(cmd->pool, v);
    OPENSSL_cleanse(buf, sizeof(buf));
    return NULL;
}

static const char *set_api_key_file(cmd_parms *cmd, void *dummy, const char *arg)
{
    msoauth_srv_conf_t *sc = conf_of(cmd);
    static const char *how = "create it with 'openssl rand -hex 32 > /etc/apache2/"
                             "msoauth-api.key && chmod 600 /etc/apache2/msoauth-api.key'";
    const char *msg, *path, *key, *c;

    if ((msg = not_in_company(cmd)) != NULL) {
        return msg;
    }
    if ((msg = read_small_secret(cmd, arg, how, &path, &key)) != NULL) {
        return msg;
    }
    /* A bearer token: printable, no spaces, long enough not to be guessed. */
    for (c = key; *c; c++) {
        if (*c <= ' ' || *c > '~') {
            return fail(cmd, apr_psprintf(cmd->pool, "%s holds white space or other "
                                          "characters that cannot be sent in an Authorization "
                                          "header: put one key on one line; %s", path, how));
        }
    }
    if (strlen(key) < 32) {
        return fail(cmd, apr_psprintf(cmd->pool, "%s holds a key shorter than 32 characters: "
                                      "%s", path, how));
    }
    sc->api_key = key;
    sc->api_key_file = path;
    return NULL;
}

static const char *set_trust_proxy(cmd_parms *cmd, void *dirconf, int on)
{
    msoauth_dir_conf_t *dc = dirconf;

    if (conf_of(cmd)->current) {
        return fail(cmd, "is set per location, virtual host or server, not inside "
                    "<MSOAuthCompany>: move it outside the section");
    }
    dc->trust_proxy = on ? 1 : 0;
    return NULL;
}

static const char *set_client_cert(cmd_parms *cmd, void *dummy, const char *cert,
                                   const char *key)
{
    mso_setting_cert_t *v = &target(cmd)->client_cert;
    const char *cp = ap_server_root_relative(cmd->pool, cert);
    const char *kp = key ? ap_server_root_relative(cmd->pool, key) : NULL;
    const char *why = NULL;

    if (!cp || (key && !kp)) {
        return fail(cmd, "invalid path");
    }
    if (mso_cert_load(cmd->pool, cp, kp, &v->cert, &why) != APR_SUCCESS) {
        return fail(cmd, why);
    }
    v->cert_file = cp;
    v->key_file = kp;
    v->at = where(cmd);
    return NULL;
}

static const char *set_app_only(cmd_parms *cmd, void *dummy, int on)
{
    mso_setting_int_t *v = &target(cmd)->app_only;

    v->value = on;
    v->given = 1;
    v->at = where(cmd);
    return NULL;
}

static const char *set_mailboxes(cmd_parms *cmd, void *dummy, const char *args)
{
    msoauth_srv_conf_t *sc = conf_of(cmd);
    apr_array_header_t *list = sc->current && sc->current->mailboxes
                               ? sc->current->mailboxes
                               : apr_array_make(cmd->pool, 4, sizeof(const char *));
    const char *word, *msg;
    int i;

    if (!sc->current) {
        return fail(cmd, "belongs inside <MSOAuthCompany NAME> of an app-only company "
                    "(MSOAuthAppOnly on): each company lists its own mailboxes");
    }
    while (*(word = ap_getword_conf(cmd->pool, &args))) {
        const char *m = mso_lower(cmd->pool, word);

        if ((msg = mso_check_mailbox(m)) != NULL || (msg = mso_check_text_param(m)) != NULL) {
            return fail(cmd, apr_psprintf(cmd->pool, "'%s': %s", word, msg));
        }
        for (i = 0; i < list->nelts; i++) {
            if (!strcmp(APR_ARRAY_IDX(list, i, const char *), m)) {
                return fail(cmd, apr_psprintf(cmd->pool, "%s is listed twice", m));
            }
        }
        APR_ARRAY_PUSH(list, const char *) = m;
    }
    if (!list->nelts) {
        return fail(cmd, "needs at least one mailbox address, e.g. support@contoso.com");
    }
    sc->current->mailboxes = list;
    sc->current->mailboxes_at = where(cmd);
    return NULL;
}

static const char *set_outlook_url(cmd_parms *cmd, void *dummy, const char *arg)
{
    const char *msg = mso_check_service_url(cmd->pool, arg, 0);

    if (msg) {
        return fail(cmd, msg);
    }
    target(cmd)->outlook_url = (mso_setting_str_t){apr_pstrdup(cmd->pool, arg), where(cmd)};
    return NULL;
}

static const char *set_attachment_max(cmd_parms *cmd, void *dummy, const char *arg)
{
    mso_setting_i64_t *v = &target(cmd)->attachment_max_bytes;
    const char *msg = mso_check_bytes(cmd->pool, arg, &v->value);

    if (msg) {
        return fail(cmd, msg);
    }
    v->given = 1;
    v->at = where(cmd);
    return NULL;
}

static const char *set_retention(cmd_parms *cmd, void *dummy, const char *arg)
{
    const char *msg;

    if ((msg = not_in_company(cmd)) != NULL) {
        return msg;
    }
    msg = mso_check_days(cmd->pool, arg, &conf_of(cmd)->retention_days);
    return msg ? fail(cmd, msg) : NULL;
}

static const char *set_http_proxy(cmd_parms *cmd, void *dummy, const char *arg)
{
    const char *msg;

    if ((msg = not_in_company(cmd)) != NULL) {
        return msg;
    }
    if (strncasecmp(arg, "http://", 7) && strncasecmp(arg, "https://", 8)
        && strncasecmp(arg, "socks5h://", 10)) {
        return fail(cmd, apr_psprintf(cmd->pool, "'%s' is not a proxy URL: use "
                                      "http://proxy.example:3128 (https:// and socks5h:// work "
                                      "too)", arg));
    }
    if (mso_check_text_param(arg) || strchr(arg, ' ')) {
        return fail(cmd, "the proxy URL holds spaces or control characters");
    }
    conf_of(cmd)->http_proxy = apr_pstrdup(cmd->pool, arg);
    return NULL;
}

static const char *set_ca_file(cmd_parms *cmd, void *dummy, const char *arg)
{
    const char *path = ap_server_root_relative(cmd->pool, arg), *msg;
    apr_finfo_t fi;

    if ((msg = not_in_company(cmd)) != NULL) {
        return msg;
    }
    if (!path || apr_stat(&fi, path, APR_FINFO_TYPE, cmd->temp_pool) != APR_SUCCESS
        || fi.filetype != APR_REG) {
        return fail(cmd, apr_psprintf(cmd->pool, "cannot read %s: give a PEM file with the CA "
                                      "certificates to trust for calls to Microsoft (the "
                                      "system's trust store is used without this directive)",
                                      path ? path : arg));
    }
    conf_of(cmd)->ca_file = path;
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
    AP_INIT_TAKE1("MSOAuthAPIKeyFile", set_api_key_file, NULL, RSRC_CONF,
        "a file holding the key that the token, admin (JSON) and metrics handlers require "
        "as 'Authorization: Bearer KEY'"),
    AP_INIT_FLAG("MSOAuthTrustProxy", set_trust_proxy, NULL, RSRC_CONF | ACCESS_CONF,
        "On: accept requests to the token, admin and metrics handlers that came through a "
        "proxy (Forwarded, X-Forwarded-For, Via); default Off"),
    AP_INIT_TAKE12("MSOAuthClientCertificateFile", set_client_cert, NULL, RSRC_CONF,
        "CERT [KEY]: a PEM certificate uploaded to the app registration and its RSA key (in "
        "CERT when KEY is not given); used instead of the client secret"),
    AP_INIT_FLAG("MSOAuthAppOnly", set_app_only, NULL, RSRC_CONF,
        "On: the company uses application permissions (client credentials) for the "
        "mailboxes of MSOAuthMailbox and the admin page; needs a tenant GUID or domain"),
    AP_INIT_RAW_ARGS("MSOAuthMailbox", set_mailboxes, NULL, RSRC_CONF,
        "mailbox addresses of an app-only company (inside <MSOAuthCompany>)"),
    AP_INIT_TAKE1("MSOAuthOutlookURL", set_outlook_url, NULL, RSRC_CONF,
        "overrides the Outlook resource of IMAP/SMTP tokens (default per cloud, "
        "https://outlook.office.com in the global cloud)"),
    AP_INIT_TAKE1("MSOAuthAttachmentMaxBytes", set_attachment_max, NULL, RSRC_CONF,
        "attachments up to this size are stored in msoauth_attachments, larger ones are "
        "fetched on demand (0: metadata only); default 10485760"),
    AP_INIT_TAKE1("MSOAuthRetentionDays", set_retention, NULL, RSRC_CONF,
        "days to keep done actions, sent mail and removed messages (0 keeps them); "
        "default 30"),
    AP_INIT_TAKE1("MSOAuthHTTPProxy", set_http_proxy, NULL, RSRC_CONF,
        "a proxy for the calls to Microsoft (http://host:port)"),
    AP_INIT_TAKE1("MSOAuthCACertificateFile", set_ca_file, NULL, RSRC_CONF,
        "PEM file of the CA certificates trusted for the calls to Microsoft (default: the "
        "system's)"),
    {NULL}
};

/* --- the whole configuration --- */

static msoauth_company_t *resolve(apr_pool_t *p, server_rec *s, const char *name,
                                  const char *defined_at, const mso_settings_t *st)
{
    msoauth_company_t *c = apr_pcalloc(p, sizeof(*c));

    c->name = name;
    c->defined_at = defined_at;
    c->s = s;
    c->set = *st;
    mso_settings_resolve(p, &c->set);
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

    const mso_settings_t *st = &c->set;

    if (st->app_only.value && mso_tenant_is_multi(st->tenant.value)) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(009)
                     "MSOAuthAppOnly (%s): company %s uses application permissions, which "
                     "Microsoft grants per directory: set MSOAuthTenant to its Directory "
                     "(tenant) ID or a verified domain, not %s (AADSTS9001023)",
                     st->app_only.at ? st->app_only.at : c->defined_at, c->name,
                     st->tenant.value);
        cx->errors++;
    }
    if (c->mailboxes && !st->app_only.value) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, s, MSOLOGNO(010)
                     "MSOAuthMailbox in company %s (%s), which is not app-only: add "
                     "'MSOAuthAppOnly on' to the section (shared mailboxes without a person), "
                     "or remove the list (delegated mailboxes are connected by signing in)",
                     c->name, c->defined_at);
        cx->errors++;
    }
    if (st->client_cert.cert) {
        long days = mso_days_until(mso_cert_not_after(st->client_cert.cert), apr_time_now());

        warn_if_world_readable(cx, s, "MSOAuthClientCertificateFile",
                               st->client_cert.key_file ? st->client_cert.key_file
                                                        : st->client_cert.cert_file);
        if (cx->log_warnings && first_time(cx, apr_pstrcat(p, "cert:", st->client_cert.at, NULL))) {
            if (days < 0) {
                ap_log_error(APLOG_MARK, cx->expired_level, 0, s, MSOLOGNO(011)
                             "MSOAuthClientCertificateFile (%s): the certificate of company %s "
                             "(%s, thumbprint %s) has expired; token calls fail with "
                             "certificate_expired. Make a new certificate, upload it under "
                             "Certificates & secrets and point the directive at it",
                             st->client_cert.at, c->name,
                             mso_cert_subject(st->client_cert.cert),
                             mso_cert_sha1_hex(st->client_cert.cert));
            }
            else if (days < MSOAUTH_SECRET_WARN_DAYS) {
                ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(012)
                             "MSOAuthClientCertificateFile (%s): the certificate of company %s "
                             "(thumbprint %s) expires in %ld day%s: make a new one, upload it "
                             "and switch to it now", st->client_cert.at, c->name,
                             mso_cert_sha1_hex(st->client_cert.cert), days,
                             days == 1 ? "" : "s");
            }
        }
    }
    if (!st->client_id.value || (!st->client_secret.value && !st->client_cert.cert)) {
        if (cx->log_warnings && first_time(cx, apr_pstrcat(p, "nocred:", c->defined_at, NULL))) {
            ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(002)
                         "MSOAuthCompany %s (%s) has no %s and none to fall back to in the "
                         "main server: sign-ins for it will fail with not_configured. Set "
                         "MSOAuthClientID and MSOAuthClientSecret(File) or "
                         "MSOAuthClientCertificateFile in the section or in the main server "
                         "configuration", c->name, c->defined_at,
                         !st->client_id.value ? "MSOAuthClientID"
                         : "MSOAuthClientSecret or MSOAuthClientCertificateFile");
        }
        return;
    }
    if (!strcmp(st->client_id.value, "00000000-0000-0000-0000-000000000000") && cx->log_warnings
        && first_time(cx, apr_pstrcat(p, "zero:", st->client_id.at, NULL))) {
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(013)
                     "MSOAuthClientID (%s, company %s) is the sample's placeholder "
                     "00000000-0000-0000-0000-000000000000: put the Application (client) ID "
                     "from the app registration's Overview page there", st->client_id.at,
                     c->name);
    }
    warn_if_world_readable(cx, s, "MSOAuthClientSecretFile", st->client_secret.file);
    if (st->client_secret.value && mso_secret_looks_like_id(st->client_secret.value)
        && cx->log_warnings
        && first_time(cx, apr_pstrcat(p, "guid:", st->client_secret.at, NULL))) {
        ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(003)
                     "MSOAuthClientSecret (%s, used by company %s) is shaped like a GUID: "
                     "that is usually the secret's Secret ID, not its Value, and Microsoft "
                     "will refuse it (AADSTS7000215). Copy the Value column under "
                     "Certificates & secrets (it is shown only once; create a new secret "
                     "if it is hidden)", st->client_secret.at, c->name);
    }
    if (st->secret_expires.value && cx->log_warnings
        && first_time(cx, apr_pstrcat(p, "exp:", st->secret_expires.at, NULL))) {
        long days = mso_days_until(st->secret_expires.value, apr_time_now());

        if (days < 0) {
            ap_log_error(APLOG_MARK, cx->expired_level, 0, s, MSOLOGNO(004)
                         "MSOAuthSecretExpires (%s): the client secret of company %s expired "
                         "on %s; token calls will fail with client_secret_expired "
                         "(AADSTS7000222). Create a new secret under Certificates & secrets, "
                         "put its Value into the configuration and update "
                         "MSOAuthSecretExpires", st->secret_expires.at, c->name,
                         st->secret_expires.text);
        }
        else if (days < MSOAUTH_SECRET_WARN_DAYS) {
            ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(005)
                         "MSOAuthSecretExpires (%s): the client secret of company %s expires "
                         "in %ld day%s (%s). Create a new secret under Certificates & secrets "
                         "now, deploy its Value, then delete the old one", st->secret_expires.at,
                         c->name, days, days == 1 ? "" : "s", st->secret_expires.text);
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
    if (sc->level.client_id.value || sc->level.client_secret.value) {
        apr_hash_set(names, MSOAUTH_DEFAULT_COMPANY, APR_HASH_KEY_STRING, "");
    }
    for (hi = apr_hash_first(p, names); hi; hi = apr_hash_next(hi)) {
        const char *name = apr_hash_this_key(hi);
        msoauth_company_decl_t *md = s->is_virtual
            ? apr_hash_get(main_sc->decls, name, APR_HASH_KEY_STRING) : NULL;
        msoauth_company_decl_t *own = apr_hash_get(sc->decls, name, APR_HASH_KEY_STRING);
        mso_settings_t eff = sc->level, tmp;
        const char *at;
        msoauth_company_t *c;

        if (md) {
            mso_settings_merge(&tmp, &eff, &md->set);
            eff = tmp;
        }
        if (own) {
            mso_settings_merge(&tmp, &eff, &own->set);
            eff = tmp;
        }
        at = own ? own->defined_at : md ? md->defined_at
             : (s->defn_name ? apr_psprintf(p, "%s:%d", s->defn_name, s->defn_line_number)
                : "the main server configuration");
        c = resolve(p, s, name, at, &eff);
        c->mailboxes = own && own->mailboxes ? own->mailboxes : md ? md->mailboxes : NULL;
        apr_hash_set(sc->companies, name, APR_HASH_KEY_STRING, c);
        if (msoauth_company_has_credentials(c)) {
            with_credentials++;
        }
        check_company(cx, s, c);
    }

    sc->redirect_path = sc->redirect_path ? sc->redirect_path : MSOAUTH_DEFAULT_REDIRECT_PATH;
    sc->effective_base_url = sc->base_url ? sc->base_url : derive_base_url(p, s);
    sc->redirect_uri = apr_pstrcat(p, sc->effective_base_url, sc->redirect_path, NULL);

    sc->in_use = with_credentials > 0;
    if (!with_credentials) {
        return;     /* nothing of ours runs on this server */
    }
    warn_if_world_readable(cx, s, "MSOAuthAPIKeyFile", sc->api_key_file);
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
