/* msoauthctl: mod_msoauth's accounts and keys from the command line, built
 * from lib/ as a2md drives mod_md's library. It reads nothing of httpd's
 * configuration: the values it needs (the database, the token keys, a
 * company's credentials for `test`) come as flags, the same values as
 * DBDriver, DBDParams, MSOAuthTokenKeyFile and the company's directives.
 * It never prints a token, secret or key; safe while httpd runs. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include <apr_general.h>
#include <apr_getopt.h>
#include <apr_strings.h>
#include <apr_time.h>
#include <apr_dbd.h>
#include <jansson.h>

#include "mso_account.h"
#include "mso_cert.h"
#include "mso_config.h"
#include "mso_crypto.h"
#include "mso_db.h"
#include "mso_events.h"
#include "mso_graph.h"
#include "mso_http.h"
#include "mso_identity.h"
#include "mso_json.h"
#include "mso_mirror.h"
#include "mso_refresh.h"
#include "mso_schema.h"
#include "mso_settings.h"
#include "mso_sync.h"

#ifndef MSO_VERSION
#define MSO_VERSION "0.2.0"
#endif

#define EXIT_USAGE 2
#define MIN_VALIDITY 300        /* as the token handler: 5 more minutes */
#define LEASE_SECONDS 90

typedef struct {
    apr_pool_t *p;
    const char *driver, *params;
    apr_array_header_t *key_files;      /* const char * */
    int json;
    /* test: the company, as its directives say */
    const char *client_id, *secret_file, *cert_file, *cert_key_file;
    const char *authority, *tenant, *graph, *cloud, *proxy, *ca_file;
    mso_keyring_t *keyring;
    mso_db_t *db;
    const apr_dbd_driver_t *drv;      /* the open connection, closed with the pool */
    apr_dbd_t *handle;
} ctl_t;

static void usage(FILE *f)
{
    fprintf(f,
"usage: msoauthctl [options] COMMAND [ARGS]\n"
"\n"
"commands:\n"
"  list                 the accounts (--json: an array)\n"
"  show ID              one account, its tokens (kind, key id, expiry) and last errors\n"
"  test ID              refresh the account's token if needed and call Graph /me\n"
"  disconnect ID        drop the account's tokens and mark it disconnected\n"
"  rekey                seal every token again under the first --key, so that the\n"
"                       other keys can be removed (safe while httpd runs)\n"
"  migrate              create or update the tables (as httpd does at start)\n"
"  check-key FILE       check a key file and print its key id; with a database,\n"
"                       count the tokens that need it\n"
"\n"
"database (DBDriver, DBDParams):\n"
"  --driver sqlite3|pgsql   --params STRING\n"
"keys (MSOAuthTokenKeyFile, in its order; the first seals):\n"
"  --key FILE               repeat for each key\n"
"the company, for test (its directives):\n"
"  --client-id GUID  --secret-file FILE | --cert FILE [--key-file FILE]\n"
"  --tenant T (common)  --cloud global|usgov|usgov-dod|china (global)\n"
"  --authority URL  --graph URL (the cloud's)  --proxy URL  --ca-file FILE\n"
"output:\n"
"  --json                   JSON for list and show\n"
"  --version, --help\n");
}

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int fail(const char *fmt, ...)
{
    va_list ap;

    fputs("msoauthctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return EXIT_FAILURE;
}

static const char *when(apr_pool_t *p, apr_int64_t t)
{
    apr_time_exp_t x;
    char buf[32];
    apr_size_t n;

    if (t <= 0) {
        return "-";
    }
    apr_time_exp_gmt(&x, apr_time_from_sec(t));
    apr_strftime(buf, &n, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &x);
    return apr_pstrdup(p, buf);
}

static const char *or_dash(const char *s)
{
    return s && *s ? s : "-";
}

static int parse_id(const char *s, apr_int64_t *id)
{
    char *end;

    if (!s || !*s || strlen(s) > 18) {
        return 0;
    }
    *id = apr_strtoi64(s, &end, 10);
    return !*end && *id > 0;
}

/* ---- set-up -------------------------------------------------------------- */

static apr_status_t close_db(void *data)
{
    ctl_t *c = data;

    if (c->handle) {
        apr_dbd_close(c->drv, c->handle);
        c->handle = NULL;
    }
    return APR_SUCCESS;
}

static int open_db(ctl_t *c)
{
    const apr_dbd_driver_t *drv = NULL;
    apr_dbd_t *handle = NULL;
    const char *err = NULL;
    apr_status_t rv;

    if (!c->driver || !c->params) {
        return fail("give the database: --driver sqlite3|pgsql --params STRING (the values "
                    "of DBDriver and DBDParams)");
    }
    apr_dbd_init(c->p);
    rv = apr_dbd_get_driver(c->p, c->driver, &drv);
    if (rv != APR_SUCCESS) {
        return fail("no apr_dbd driver '%s': use sqlite3 or pgsql (Debian: "
                    "libaprutil1-dbd-sqlite3 or libaprutil1-dbd-pgsql)", c->driver);
    }
    rv = apr_dbd_open_ex(drv, c->p, c->params, &handle, &err);
    if (rv != APR_SUCCESS || !handle) {
        return fail("cannot open the %s database: %s", c->driver,
                    err ? err : "check --params");
    }
    c->drv = drv;
    c->handle = handle;
    /* apr_dbd leaves closing to its caller (mod_dbd does it in httpd): here
     * the pool does it, before the driver's library is unloaded. */
    apr_pool_cleanup_register(c->p, c, close_db, apr_pool_cleanup_null);
    if (mso_db_wrap(c->p, drv, handle, &c->db) != APR_SUCCESS) {
        return fail("the database driver '%s' is not supported: use sqlite3 or pgsql",
                    c->driver);
    }
    if (c->db->kind == MSO_DB_SQLITE) {
        /* httpd writes at the same time: wait for it rather than fail */
        const char *why = NULL;

        mso_db_pragma(c->db, c->p, "PRAGMA busy_timeout = 10000", NULL, &why);
    }
    return EXIT_SUCCESS;
}

/* The schema must be the one this build knows: msoauthctl never migrates
 * unless asked to. */
static int check_schema(ctl_t *c)
{
    const char *err = NULL;
    int version = 0;

    if (mso_schema_version(c->db, c->p, &version, &err) != APR_SUCCESS) {
        return fail("cannot read the schema version: %s", err ? err : "see above");
    }
    if (version != mso_schema_latest()) {
        return fail("the tables are at schema version %d, this msoauthctl knows %d: %s",
                    version, mso_schema_latest(), version < mso_schema_latest()
                    ? "run 'msoauthctl migrate' (or start httpd with the new module)"
                    : "use the msoauthctl of the newer mod_msoauth");
    }
    return EXIT_SUCCESS;
}

static int load_keys(ctl_t *c)
{
    int i;

    if (!c->key_files->nelts) {
        return fail("give the token keys: --key FILE for each file of MSOAuthTokenKeyFile, "
                    "in its order");
    }
    c->keyring = mso_keyring_create(c->p);
    for (i = 0; i < c->key_files->nelts; i++) {
        const char *path = APR_ARRAY_IDX(c->key_files, i, const char *), *why = NULL;
        unsigned char key[MSO_KEY_LEN];
        apr_status_t rv = mso_key_read_file(c->p, path, key, &why);

        if (rv != APR_SUCCESS) {
            return fail("%s", why);
        }
        rv = mso_keyring_add(c->keyring, key);
        memset(key, 0, sizeof(key));
        if (rv == APR_EEXIST) {
            return fail("%s holds the same key as an earlier --key", path);
        }
        if (rv != APR_SUCCESS) {
            return fail("too many keys (at most %d)", MSO_KEYRING_MAX);
        }
    }
    return EXIT_SUCCESS;
}

/* ---- list and show -------------------------------------------------------- */

static json_t *account_json(const mso_account_t *a)
{
    json_t *j = json_object();

    json_object_set_new(j, "id", json_integer(a->id));
    json_object_set_new(j, "company", json_string(a->company ? a->company : ""));
    json_object_set_new(j, "kind", a->kind ? json_string(a->kind) : json_null());
    json_object_set_new(j, "client_id", a->client_id ? json_string(a->client_id) : json_null());
    json_object_set_new(j, "mailbox", json_string(a->mailbox ? a->mailbox : ""));
    json_object_set_new(j, "display_name", a->display_name ? json_string(a->display_name)
                                                            : json_null());
    json_object_set_new(j, "tenant_id", a->tenant_id ? json_string(a->tenant_id) : json_null());
    json_object_set_new(j, "state", json_string(a->state ? a->state : ""));
    json_object_set_new(j, "reason", a->reason ? json_string(a->reason) : json_null());
    json_object_set_new(j, "aadsts", a->aadsts ? json_integer(a->aadsts) : json_null());
    json_object_set_new(j, "last_error", a->last_error ? json_string(a->last_error)
                                                        : json_null());
    json_object_set_new(j, "scopes", a->scopes ? json_string(a->scopes) : json_null());
    json_object_set_new(j, "access_expires_at", json_integer(a->access_expires_at));
    json_object_set_new(j, "refresh_due_at", json_integer(a->refresh_due_at));
    json_object_set_new(j, "last_refresh_at", json_integer(a->last_refresh_at));
    json_object_set_new(j, "last_sync_at", json_integer(a->last_sync_at));
    json_object_set_new(j, "connected_by", a->connected_by ? json_string(a->connected_by)
                                                            : json_null());
    json_object_set_new(j, "created_at", json_integer(a->created_at));
    json_object_set_new(j, "updated_at", json_integer(a->updated_at));
    return j;
}

static void print_json(json_t *j)
{
    char *text = json_dumps(j, JSON_INDENT(2));

    if (text) {
        puts(text);
        free(text);
    }
    json_decref(j);
}

static int cmd_list(ctl_t *c)
{
    apr_array_header_t *accounts = NULL;
    int i;

    if (mso_account_list(c->db, c->p, &accounts) != APR_SUCCESS) {
        return fail("cannot read the accounts (see above)");
    }
    if (c->json) {
        json_t *arr = json_array();

        for (i = 0; i < accounts->nelts; i++) {
            json_array_append_new(arr, account_json(APR_ARRAY_IDX(accounts, i,
                                                                  mso_account_t *)));
        }
        print_json(arr);
        return EXIT_SUCCESS;
    }
    printf("%-6s %-16s %-36s %-19s %-28s %-20s %-20s\n", "ID", "COMPANY", "MAILBOX", "STATE",
           "REASON", "TOKEN EXPIRES", "LAST SYNC");
    for (i = 0; i < accounts->nelts; i++) {
        mso_account_t *a = APR_ARRAY_IDX(accounts, i, mso_account_t *);

        printf("%-6" APR_INT64_T_FMT " %-16s %-36s %-19s %-28s %-20s %-20s\n", a->id,
               or_dash(a->company), or_dash(a->mailbox), or_dash(a->state), or_dash(a->reason),
               when(c->p, a->access_expires_at), when(c->p, a->last_sync_at));
    }
    return EXIT_SUCCESS;
}

static int get_account(ctl_t *c, const char *arg, mso_account_t **a)
{
    apr_int64_t id = 0;
    apr_status_t rv;

    if (!parse_id(arg, &id)) {
        fail("'%s' is not an account ID (see msoauthctl list)", arg ? arg : "");
        return EXIT_USAGE;
    }
    rv = mso_account_get(c->db, c->p, id, a);
    if (rv == APR_NOTFOUND) {
        return fail("no account %" APR_INT64_T_FMT, id);
    }
    if (rv != APR_SUCCESS) {
        return fail("cannot read account %" APR_INT64_T_FMT " (see above)", id);
    }
    return EXIT_SUCCESS;
}

static int cmd_show(ctl_t *c, const char *arg)
{
    apr_array_header_t *tokens = NULL, *events = NULL;
    apr_hash_t *stats = NULL;
    mso_mirror_stats_t *ms = NULL;
    mso_account_t *a = NULL;
    int rc, i;

    if ((rc = get_account(c, arg, &a)) != EXIT_SUCCESS) {
        return rc;
    }
    if (mso_account_tokens(c->db, c->p, a->id, &tokens) != APR_SUCCESS
        || mso_events_list(c->db, c->p, a->id, &events) != APR_SUCCESS
        || mso_mirror_stats(c->db, c->p, &stats) != APR_SUCCESS) {
        return fail("cannot read account %" APR_INT64_T_FMT "'s tokens, errors or mirror "
                    "(see above)", a->id);
    }
    ms = apr_hash_get(stats, apr_psprintf(c->p, "%" APR_INT64_T_FMT, a->id),
                      APR_HASH_KEY_STRING);
    if (c->json) {
        json_t *j = account_json(a), *tk = json_array(), *ev = json_array();

        for (i = 0; i < tokens->nelts; i++) {
            mso_token_info_t *t = &APR_ARRAY_IDX(tokens, i, mso_token_info_t);

            json_array_append_new(tk, json_pack("{s:s, s:i, s:s?, s:I, s:I}", "kind", t->kind,
                                                "binding", t->binding, "key_id", t->kid,
                                                "expires_at", (json_int_t)t->expires_at,
                                                "updated_at", (json_int_t)t->updated_at));
        }
        for (i = 0; i < events->nelts; i++) {
            mso_event_t *e = &APR_ARRAY_IDX(events, i, mso_event_t);

            json_array_append_new(ev, json_pack("{s:I, s:s?, s:s}", "at", (json_int_t)e->at,
                                                "reason", e->reason, "text",
                                                e->text ? e->text : ""));
        }
        json_object_set_new(j, "tokens", tk);
        json_object_set_new(j, "history", ev);
        json_object_set_new(j, "messages", json_integer(ms ? ms->messages : 0));
        json_object_set_new(j, "actions_queued", json_integer(ms ? ms->queued : 0));
        json_object_set_new(j, "actions_failed", json_integer(ms ? ms->failed : 0));
        json_object_set_new(j, "sync_phase", ms && ms->sync_phase ? json_string(ms->sync_phase)
                                                                  : json_null());
        json_object_set_new(j, "sync_error", ms && ms->sync_error ? json_string(ms->sync_error)
                                                                  : json_null());
        print_json(j);
        return EXIT_SUCCESS;
    }
    printf("account %" APR_INT64_T_FMT "\n", a->id);
    printf("  company        %s (client ID %s)\n", or_dash(a->company), or_dash(a->client_id));
    printf("  mailbox        %s (%s)\n", or_dash(a->mailbox), or_dash(a->display_name));
    printf("  kind           %s, tenant %s\n", or_dash(a->kind), or_dash(a->tenant_id));
    printf("  state          %s", or_dash(a->state));
    if (a->reason) {
        printf(" (%s%s)", a->reason, a->aadsts ? apr_psprintf(c->p, ", AADSTS%ld", a->aadsts)
                                                : "");
    }
    printf("\n  last error     %s\n", or_dash(a->last_error));
    printf("  scopes         %s\n", or_dash(a->scopes));
    printf("  token expires  %s, refresh due %s, last refresh %s\n",
           when(c->p, a->access_expires_at), when(c->p, a->refresh_due_at),
           when(c->p, a->last_refresh_at));
    printf("  mirror         %" APR_INT64_T_FMT " messages, last sync %s, phase %s%s%s\n",
           ms ? ms->messages : 0, when(c->p, a->last_sync_at),
           ms ? or_dash(ms->sync_phase) : "-", ms && ms->sync_error ? ", error: " : "",
           ms && ms->sync_error ? ms->sync_error : "");
    printf("  actions        %" APR_INT64_T_FMT " queued, %" APR_INT64_T_FMT " failed\n",
           ms ? ms->queued : 0, ms ? ms->failed : 0);
    printf("  connected      %s by %s\n", when(c->p, a->created_at), or_dash(a->connected_by));
    printf("tokens (values are never shown)\n");
    for (i = 0; i < tokens->nelts; i++) {
        mso_token_info_t *t = &APR_ARRAY_IDX(tokens, i, mso_token_info_t);

        printf("  %-8s key id %-8s binding %d  expires %s  stored %s\n", t->kind,
               or_dash(t->kid), t->binding, when(c->p, t->expires_at),
               when(c->p, t->updated_at));
    }
    if (!tokens->nelts) {
        printf("  none\n");
    }
    printf("last errors\n");
    for (i = 0; i < events->nelts; i++) {
        mso_event_t *e = &APR_ARRAY_IDX(events, i, mso_event_t);

        printf("  %s  %-28s %s\n", when(c->p, e->at), or_dash(e->reason), or_dash(e->text));
    }
    if (!events->nelts) {
        printf("  none\n");
    }
    return EXIT_SUCCESS;
}

/* ---- test ------------------------------------------------------------------ */

/* The company of the flags as the module would resolve it. */
static int company_ctx(ctl_t *c, const mso_account_t *a, mso_http_opts_t *http,
                       mso_refresh_ctx_t *ctx)
{
    mso_cloud_e cloud = MSO_CLOUD_GLOBAL;
    const char *why = NULL, *msg;

    if (!c->client_id || (!c->secret_file && !c->cert_file)) {
        return fail("test needs the account's company: --client-id and --secret-file (or "
                    "--cert [--key-file]), as its MSOAuthClientID and MSOAuthClientSecretFile "
                    "(MSOAuthClientCertificateFile)");
    }
    if ((msg = mso_check_guid(c->p, c->client_id, "Application (client) ID")) != NULL) {
        return fail("--client-id: %s", msg);
    }
    if (a->client_id && strcasecmp(a->client_id, c->client_id)) {
        return fail("account %" APR_INT64_T_FMT " was connected with client ID %s, not %s: "
                    "give its company's", a->id, a->client_id, c->client_id);
    }
    if (c->cloud && (msg = mso_check_cloud(c->p, c->cloud, &cloud)) != NULL) {
        return fail("--cloud: %s", msg);
    }
    if (c->tenant && (msg = mso_check_tenant(c->p, c->tenant)) != NULL) {
        return fail("--tenant: %s", msg);
    }
    if (c->authority && (msg = mso_check_service_url(c->p, c->authority, 0)) != NULL) {
        return fail("--authority: %s", msg);
    }
    if (c->graph && (msg = mso_check_service_url(c->p, c->graph, 1)) != NULL) {
        return fail("--graph: %s", msg);
    }
    mso_http_opts_default(http);
    http->proxy = c->proxy;
    http->ca_file = c->ca_file;
    memset(ctx, 0, sizeof(*ctx));
    ctx->keyring = c->keyring;
    ctx->http = http;
    ctx->owner = apr_psprintf(c->p, "msoauthctl:%ld:%s", (long)getpid(),
                              mso_random_token(c->p, 6));
    ctx->authority = mso_authority(c->p, c->authority ? c->authority
                                                      : mso_cloud_authority(cloud),
                                   c->tenant ? c->tenant : MSO_DEFAULT_TENANT);
    ctx->client_id = c->client_id;
    if (c->cert_file) {
        mso_cert_t *cert = NULL;

        if (mso_cert_load(c->p, c->cert_file, c->cert_key_file, &cert, &why) != APR_SUCCESS) {
            return fail("%s", why);
        }
        ctx->cert = cert;
    }
    else {
        char buf[1024];
        FILE *f = fopen(c->secret_file, "r");
        size_t n;

        if (!f) {
            return fail("cannot read --secret-file %s", c->secret_file);
        }
        n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = '\0';
        ctx->client_secret = apr_pstrdup(c->p, mso_trim(buf));
        memset(buf, 0, sizeof(buf));
        if (!*ctx->client_secret) {
            return fail("--secret-file %s is empty", c->secret_file);
        }
    }
    ctx->graph_resource = mso_cloud_graph(cloud);
    ctx->signin_scopes = mso_signin_scopes(c->p, ctx->graph_resource,
                                           mso_sync_scopes_can_write(a->scopes), NULL);
    ctx->margin = 600;
    ctx->keepalive = 14 * 86400;
    if (!c->graph) {
        c->graph = mso_cloud_graph(cloud);
    }
    return EXIT_SUCCESS;
}

static int cmd_test(ctl_t *c, const char *arg)
{
    mso_account_t *a = NULL;
    mso_http_opts_t http;
    mso_refresh_ctx_t ctx;
    mso_http_response_t *resp = NULL;
    mso_graph_result_t g;
    mso_graph_me_t me;
    const char *token = NULL, *err = NULL;
    apr_time_t give_up = apr_time_now() + apr_time_from_sec(20);
    apr_int64_t exp = 0;
    apr_status_t rv;
    int rc;

    if ((rc = get_account(c, arg, &a)) != EXIT_SUCCESS
        || (rc = company_ctx(c, a, &http, &ctx)) != EXIT_SUCCESS) {
        return rc;
    }
    if (strcmp(a->state, "connected")) {
        return fail("account %" APR_INT64_T_FMT " (%s) is %s%s%s: %s", a->id, a->mailbox,
                    a->state, a->reason ? ", " : "", a->reason ? a->reason : "",
                    or_dash(a->last_error));
    }
    /* The stored token while it lives 5 more minutes, else a refresh under
     * the account's lease (waiting for httpd's job when it holds it). */
    for (;;) {
        apr_int64_t now = apr_time_sec(apr_time_now());
        mso_refresh_outcome_t out;

        rv = mso_account_token_open(c->db, c->p, c->keyring, a, "graph", &token, &exp);
        if (rv == APR_SUCCESS && exp - now >= MIN_VALIDITY) {
            break;
        }
        token = NULL;
        rv = mso_account_lease(c->db, c->p, a->id, ctx.owner, now, LEASE_SECONDS);
        if (rv == APR_SUCCESS) {
            mso_refresh_account(c->db, c->p, &ctx, a, "graph", now, &out);
            if (out.result == MSO_REFRESHED) {
                token = out.access_token;
                printf("refreshed: a new access token until %s\n",
                       when(c->p, out.access_expires_at));
                break;
            }
            if (out.result != MSO_REFRESH_BUSY) {
                return fail("the refresh of account %" APR_INT64_T_FMT " failed: %s%s (%s)",
                            a->id, or_dash(out.reason),
                            out.aadsts ? apr_psprintf(c->p, " AADSTS%ld", out.aadsts) : "",
                            or_dash(out.detail));
            }
        }
        else if (rv != APR_EBUSY) {
            return fail("cannot lease account %" APR_INT64_T_FMT " (see above)", a->id);
        }
        if (apr_time_now() > give_up) {
            return fail("httpd is refreshing account %" APR_INT64_T_FMT " and has not "
                        "finished: try again", a->id);
        }
        apr_sleep(apr_time_from_msec(250));
    }
    http.timeout_ms = 30000;
    rv = mso_http_request(c->p, &http, "GET", mso_graph_me_url(c->p, c->graph),
                          mso_graph_headers(c->p, token, 0), NULL, 0, &resp);
    mso_graph_classify(c->p, rv, resp, &g);
    if (g.cls != MSO_GRAPH_OK) {
        return fail("Graph /me failed for account %" APR_INT64_T_FMT ": %s", a->id,
                    mso_graph_result_text(c->p, &g));
    }
    if (mso_graph_parse_me(c->p, resp->body, resp->body_len, &me, &err) != APR_SUCCESS) {
        return fail("Graph /me: %s", err);
    }
    printf("ok: account %" APR_INT64_T_FMT " (%s): Graph /me answers %s <%s>\n", a->id,
           a->mailbox, or_dash(me.display_name), or_dash(mso_graph_me_address(c->p, &me)));
    return EXIT_SUCCESS;
}

/* ---- the rest ------------------------------------------------------------- */

static int cmd_disconnect(ctl_t *c, const char *arg)
{
    mso_account_t *a = NULL;
    int rc;

    if ((rc = get_account(c, arg, &a)) != EXIT_SUCCESS) {
        return rc;
    }
    if (mso_account_disconnect(c->db, c->p, a->id, apr_time_sec(apr_time_now()))
        != APR_SUCCESS) {
        return fail("cannot disconnect account %" APR_INT64_T_FMT " (see above)", a->id);
    }
    printf("account %" APR_INT64_T_FMT " (%s) disconnected: its tokens are deleted\n", a->id,
           a->mailbox);
    return EXIT_SUCCESS;
}

static int cmd_rekey(ctl_t *c)
{
    mso_rekey_t n;
    apr_array_header_t *tokens = NULL;
    apr_status_t rv = mso_account_rekey(c->db, c->p, c->keyring, &n);
    int i, other = 0;

    printf("%d tokens: %d sealed again under key %s, %d were already, %d changed meanwhile "
           "(stored by httpd), %d deleted meanwhile, %d do not open with these keys\n",
           n.tokens, n.resealed, mso_keyring_kid(c->keyring, 0), n.current, n.changed, n.gone,
           n.unopened);
    if (rv != APR_SUCCESS) {
        return fail("%d tokens could not be written (see above): run rekey again", n.failed);
    }
    if (mso_account_tokens(c->db, c->p, 0, &tokens) == APR_SUCCESS) {
        for (i = 0; i < tokens->nelts; i++) {
            const char *kid = APR_ARRAY_IDX(tokens, i, mso_token_info_t).kid;

            other += !kid || strcmp(kid, mso_keyring_kid(c->keyring, 0));
        }
        if (other) {
            printf("%d tokens are sealed under another key: is key %s first in httpd's "
                   "MSOAuthTokenKeyFile (and httpd reloaded)? Then run rekey again\n", other,
                   mso_keyring_kid(c->keyring, 0));
        }
        else {
            printf("every token is sealed under key %s: the other keys can be removed from "
                   "MSOAuthTokenKeyFile\n", mso_keyring_kid(c->keyring, 0));
        }
    }
    return n.unopened ? EXIT_FAILURE : EXIT_SUCCESS;
}

static int cmd_migrate(ctl_t *c)
{
    const char *err = NULL;
    int from = 0, to = 0;

    if (mso_schema_migrate(c->db, c->p, &from, &to, &err) != APR_SUCCESS) {
        return fail("migration failed: %s", err ? err : "see above");
    }
    if (from == to) {
        printf("schema version %d: nothing to do\n", to);
    }
    else {
        printf("schema migrated from version %d to %d\n", from, to);
    }
    return EXIT_SUCCESS;
}

static int cmd_check_key(ctl_t *c, const char *path)
{
    unsigned char key[MSO_KEY_LEN];
    mso_keyring_t *kr = mso_keyring_create(c->p);
    apr_array_header_t *tokens = NULL;
    const char *why = NULL, *kid;
    struct stat st;
    int i, sealed = 0, total = 0;

    if (!path) {
        fail("check-key needs a FILE");
        return EXIT_USAGE;
    }
    if (mso_key_read_file(c->p, path, key, &why) != APR_SUCCESS) {
        return fail("%s", why);
    }
    mso_keyring_add(kr, key);
    memset(key, 0, sizeof(key));
    kid = mso_keyring_kid(kr, 0);
    printf("%s: a valid key, key id %s\n", path, kid);
    if (stat(path, &st) == 0 && (st.st_mode & (S_IRGRP | S_IROTH))) {
        printf("warning: %s is readable by others than its owner: chmod 600 it\n", path);
    }
    if (!c->driver) {
        return EXIT_SUCCESS;
    }
    if (open_db(c) != EXIT_SUCCESS || check_schema(c) != EXIT_SUCCESS) {
        return EXIT_FAILURE;
    }
    if (mso_account_tokens(c->db, c->p, 0, &tokens) != APR_SUCCESS) {
        return fail("cannot read the tokens (see above)");
    }
    for (i = 0; i < tokens->nelts; i++) {
        const char *t = APR_ARRAY_IDX(tokens, i, mso_token_info_t).kid;

        total++;
        sealed += t && !strcmp(t, kid);
    }
    printf("%d of %d stored tokens are sealed under key %s%s\n", sealed, total, kid,
           sealed ? ": keep it in MSOAuthTokenKeyFile (or rekey first)"
                  : ": no token needs it");
    return EXIT_SUCCESS;
}

int main(int argc, const char *const *argv)
{
    static const apr_getopt_option_t opts[] = {
        {"driver", 'd', 1, "DBDriver"}, {"params", 'p', 1, "DBDParams"},
        {"key", 'k', 1, "token key file"}, {"json", 'j', 0, "JSON output"},
        {"client-id", 256, 1, ""}, {"secret-file", 257, 1, ""}, {"cert", 258, 1, ""},
        {"key-file", 259, 1, ""}, {"authority", 260, 1, ""}, {"tenant", 261, 1, ""},
        {"graph", 262, 1, ""}, {"cloud", 263, 1, ""}, {"proxy", 264, 1, ""},
        {"ca-file", 265, 1, ""}, {"help", 'h', 0, ""}, {"version", 'V', 0, ""},
        {NULL, 0, 0, NULL}
    };
    apr_getopt_t *g;
    const char *arg, *cmd, *cmd_arg;
    apr_status_t rv;
    ctl_t c;
    int opt, rc;

    apr_app_initialize(&argc, &argv, NULL);
    memset(&c, 0, sizeof(c));
    apr_pool_create(&c.p, NULL);
    c.key_files = apr_array_make(c.p, 2, sizeof(const char *));
    apr_getopt_init(&g, c.p, argc, argv);
    g->interleave = 1;
    while ((rv = apr_getopt_long(g, opts, &opt, &arg)) == APR_SUCCESS) {
        switch (opt) {
        case 'd': c.driver = arg; break;
        case 'p': c.params = arg; break;
        case 'k': APR_ARRAY_PUSH(c.key_files, const char *) = arg; break;
        case 'j': c.json = 1; break;
        case 256: c.client_id = arg; break;
        case 257: c.secret_file = arg; break;
        case 258: c.cert_file = arg; break;
        case 259: c.cert_key_file = arg; break;
        case 260: c.authority = arg; break;
        case 261: c.tenant = arg; break;
        case 262: c.graph = arg; break;
        case 263: c.cloud = arg; break;
        case 264: c.proxy = arg; break;
        case 265: c.ca_file = arg; break;
        case 'h': usage(stdout); return EXIT_SUCCESS;
        case 'V': printf("msoauthctl (mod_msoauth) %s\n", MSO_VERSION); return EXIT_SUCCESS;
        }
    }
    if (rv != APR_EOF || g->ind >= argc) {
        usage(stderr);
        return EXIT_USAGE;
    }
    /* (interleaved options: the words are in apr_getopt's permuted copy) */
    cmd = g->argv[g->ind];
    cmd_arg = g->ind + 1 < argc ? g->argv[g->ind + 1] : NULL;
    if (g->ind + 2 < argc) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (mso_http_global_init() != APR_SUCCESS) {
        return fail("libcurl initialisation failed");
    }
    if (!strcmp(cmd, "check-key")) {
        rc = cmd_check_key(&c, cmd_arg);
    }
    else if (!strcmp(cmd, "migrate")) {
        rc = open_db(&c);
        rc = rc ? rc : cmd_migrate(&c);
    }
    else if (!strcmp(cmd, "list") || !strcmp(cmd, "show") || !strcmp(cmd, "disconnect")
             || !strcmp(cmd, "test") || !strcmp(cmd, "rekey")) {
        int needs_id = strcmp(cmd, "list") && strcmp(cmd, "rekey");

        if (needs_id != (cmd_arg != NULL)) {
            usage(stderr);
            return EXIT_USAGE;
        }
        rc = open_db(&c);
        rc = rc ? rc : check_schema(&c);
        if (!rc && (!strcmp(cmd, "test") || !strcmp(cmd, "rekey"))) {
            rc = load_keys(&c);
        }
        if (!rc) {
            rc = !strcmp(cmd, "list") ? cmd_list(&c)
                 : !strcmp(cmd, "show") ? cmd_show(&c, cmd_arg)
                 : !strcmp(cmd, "disconnect") ? cmd_disconnect(&c, cmd_arg)
                 : !strcmp(cmd, "test") ? cmd_test(&c, cmd_arg) : cmd_rekey(&c);
        }
    }
    else {
        fail("unknown command '%s'", cmd);
        usage(stderr);
        return EXIT_USAGE;
    }
    apr_pool_destroy(c.p);
    apr_terminate();
    return rc;
}
