/* The application tokens of app-only companies (see mso_apptoken.h):
 * msoauth_app_tokens and its statements, the fetch lease, one fetch. */
#include <string.h>
#include <strings.h>

#include <apr_strings.h>

#include "mso_apptoken.h"
#include "mso_json.h"
#include "mso_log.h"
#include "mso_refresh.h"

#define AT_COLUMNS "company, client_id, resource, sealed, expires_at, refresh_due_at, roles, " \
    "fetched_at, fetches, retry_at, error_runs, reason, aadsts, last_error, lease_owner, " \
    "lease_until, updated_at"
#define AT_KEY "company = :company AND client_id = :client_id AND resource = :resource"

static const mso_stmt_t ST_AT_GET = {
    "read the application token", "company:text client_id:text resource:text",
    "SELECT " AT_COLUMNS " FROM msoauth_app_tokens WHERE " AT_KEY, NULL
};
static const mso_stmt_t ST_AT_LIST = {
    "list the application tokens", NULL,
    "SELECT " AT_COLUMNS " FROM msoauth_app_tokens ORDER BY company, client_id, resource", NULL
};
/* Another process may make it at the same moment: one row either way. */
static const mso_stmt_t ST_AT_MAKE = {
    "make the application token's row", "company:text client_id:text resource:text now:int",
    "INSERT INTO msoauth_app_tokens (company, client_id, resource, updated_at) "
    "VALUES (:company, :client_id, :resource, :now) "
    "ON CONFLICT (company, client_id, resource) DO NOTHING", NULL
};
static const mso_stmt_t ST_AT_LEASE_DUE = {
    "take the application token's fetch lease",
    "company:text client_id:text resource:text owner:text until:int now:int",
    "UPDATE msoauth_app_tokens SET lease_owner = :owner, lease_until = :until WHERE " AT_KEY
    " AND (lease_until IS NULL OR lease_until < :now OR lease_owner = :owner) "
    "AND COALESCE(refresh_due_at, 0) <= :now AND COALESCE(retry_at, 0) <= :now", NULL
};
static const mso_stmt_t ST_AT_LEASE_FORCE = {
    "take the application token's fetch lease",
    "company:text client_id:text resource:text owner:text until:int now:int",
    "UPDATE msoauth_app_tokens SET lease_owner = :owner, lease_until = :until WHERE " AT_KEY
    " AND (lease_until IS NULL OR lease_until < :now OR lease_owner = :owner)", NULL
};
static const mso_stmt_t ST_AT_RELEASE = {
    "release the application token's fetch lease",
    "company:text client_id:text resource:text owner:text",
    "UPDATE msoauth_app_tokens SET lease_owner = NULL, lease_until = NULL WHERE " AT_KEY
    " AND lease_owner = :owner", NULL
};
/* Only under the lease: one that ran out may have been taken by another node. */
static const mso_stmt_t ST_AT_STORE = {
    "store the application token",
    "company:text client_id:text resource:text owner:text sealed:text expires:int due:int "
    "roles:text now:int",
    "UPDATE msoauth_app_tokens SET sealed = :sealed, expires_at = :expires, "
    "refresh_due_at = :due, roles = :roles, fetched_at = :now, fetches = fetches + 1, "
    "retry_at = NULL, error_runs = 0, reason = NULL, aadsts = NULL, last_error = NULL, "
    "lease_owner = NULL, lease_until = NULL, updated_at = :now WHERE " AT_KEY
    " AND lease_owner = :owner", NULL
};
static const mso_stmt_t ST_AT_FAILED = {
    "record a failed application token fetch",
    "company:text client_id:text resource:text owner:text reason:text aadsts:int "
    "last_error:text retry_at:int now:int",
    "UPDATE msoauth_app_tokens SET reason = :reason, aadsts = :aadsts, "
    "last_error = :last_error, error_runs = error_runs + 1, retry_at = :retry_at, "
    "lease_owner = NULL, lease_until = NULL, updated_at = :now WHERE " AT_KEY
    " AND lease_owner = :owner", NULL
};
/* The first mailbox to find the token refused sets it; the job fetches a
 * new one at retry_at. */
static const mso_stmt_t ST_AT_REFUSED = {
    "record the company's token as refused by Graph",
    "id:int reason:text last_error:text retry_at:int now:int",
    "UPDATE msoauth_app_tokens SET reason = :reason, last_error = :last_error, "
    "error_runs = error_runs + 1, retry_at = :retry_at, refresh_due_at = :retry_at, "
    "updated_at = :now WHERE resource = 'graph' AND reason IS NULL "
    "AND EXISTS (SELECT 1 FROM msoauth_accounts a WHERE a.id = :id AND a.kind = 'app' "
    "AND a.company = msoauth_app_tokens.company "
    "AND a.client_id = msoauth_app_tokens.client_id)", NULL
};
static const mso_stmt_t ST_AT_DUE_NOW = {
    "make the company's Graph token due", "id:int now:int",
    "UPDATE msoauth_app_tokens SET refresh_due_at = :now WHERE resource = 'graph' "
    "AND EXISTS (SELECT 1 FROM msoauth_accounts a WHERE a.id = :id AND a.kind = 'app' "
    "AND a.company = msoauth_app_tokens.company "
    "AND a.client_id = msoauth_app_tokens.client_id)", NULL
};

static const char *lower_ascii(apr_pool_t *p, const char *s)
{
    char *r, *c;

    if (!s) {
        return NULL;
    }
    r = apr_pstrdup(p, s);
    for (c = r; *c; c++) {
        if (*c >= 'A' && *c <= 'Z') {
            *c = (char)(*c - 'A' + 'a');
        }
    }
    return r;
}

static int key_ok(const mso_apptoken_key_t *k)
{
    return k && k->company && *k->company && k->client_id && *k->client_id && k->resource
           && *k->resource && k->resource_url && *k->resource_url;
}

static void bind_key(mso_args_t *a, apr_pool_t *p, const mso_apptoken_key_t *k)
{
    mso_arg_text(a, "company", k->company);
    mso_arg_text(a, "client_id", lower_ascii(p, k->client_id));
    mso_arg_text(a, "resource", k->resource);
}

const char *mso_apptoken_aad(apr_pool_t *p, const mso_apptoken_key_t *k)
{
    return apr_pstrcat(p, "apptoken:v1:", k->company, ":", lower_ascii(p, k->client_id), ":",
                       k->resource_url, NULL);
}

static mso_apptoken_t *row_of(mso_rows_t *r, apr_pool_t *p)
{
    mso_apptoken_t *t = apr_pcalloc(p, sizeof(*t));

    t->company = mso_col_text(r, p, "company");
    t->client_id = mso_col_text(r, p, "client_id");
    t->resource = mso_col_text(r, p, "resource");
    t->sealed = mso_col_text(r, p, "sealed");
    t->expires_at = mso_col_int(r, "expires_at");
    t->refresh_due_at = mso_col_int(r, "refresh_due_at");
    t->roles = mso_col_text(r, p, "roles");
    t->fetched_at = mso_col_int(r, "fetched_at");
    t->fetches = (int)mso_col_int(r, "fetches");
    t->retry_at = mso_col_int(r, "retry_at");
    t->error_runs = (int)mso_col_int(r, "error_runs");
    t->reason = mso_col_text(r, p, "reason");
    t->aadsts = (long)mso_col_int(r, "aadsts");
    t->last_error = mso_col_text(r, p, "last_error");
    t->lease_owner = mso_col_text(r, p, "lease_owner");
    t->lease_until = mso_col_int(r, "lease_until");
    t->updated_at = mso_col_int(r, "updated_at");
    return t;
}

apr_status_t mso_apptoken_get(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                              mso_apptoken_t **row)
{
    apr_pool_t *tmp;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;

    *row = NULL;
    if (!key_ok(k)) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_AT_GET);
    bind_key(a, tmp, k);
    if (MSO_OK(mso_select(a, &rows, NULL))) {
        if (mso_rows_next(rows)) {
            *row = row_of(rows, p);
            while (mso_rows_next(rows)) {
            }
        }
        rv = *row ? APR_SUCCESS : APR_NOTFOUND;
    }
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_apptoken_list(mso_db_t *db, apr_pool_t *p, apr_array_header_t **rows)
{
    apr_pool_t *tmp;
    mso_rows_t *r = NULL;
    apr_status_t rv;

    *rows = apr_array_make(p, 4, sizeof(mso_apptoken_t *));
    apr_pool_create(&tmp, p);
    if (MSO_OK(mso_select(mso_args(db, tmp, &ST_AT_LIST), &r, NULL))) {
        while (mso_rows_next(r)) {
            APR_ARRAY_PUSH(*rows, mso_apptoken_t *) = row_of(r, p);
        }
    }
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_apptoken_open(apr_pool_t *p, const mso_keyring_t *keyring,
                               const mso_apptoken_key_t *k, const mso_apptoken_t *row,
                               apr_int64_t now, int min_validity, const char **plain)
{
    unsigned char *out = NULL;
    apr_size_t len = 0;

    *plain = NULL;
    if (!row || !row->sealed || row->expires_at - now < min_validity) {
        return APR_NOTFOUND;
    }
    if (!keyring || !key_ok(k)
        || mso_open(p, keyring, MSO_PURPOSE_TOKEN, mso_apptoken_aad(p, k), row->sealed, &out,
                    &len) != APR_SUCCESS) {
        return APR_EINVAL;
    }
    *plain = (const char *)out;
    return APR_SUCCESS;
}

apr_status_t mso_apptoken_lease(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                                const char *owner, apr_int64_t now, int lease_seconds,
                                int force)
{
    apr_pool_t *tmp;
    mso_apptoken_t *row = NULL;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    if (!key_ok(k) || !owner || !*owner) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_AT_MAKE);
    bind_key(a, tmp, k);
    mso_arg_int(a, "now", now);
    if (!MSO_OK(mso_exec(a, NULL, NULL))) {
        goto leave;
    }
    a = mso_args(db, tmp, force ? &ST_AT_LEASE_FORCE : &ST_AT_LEASE_DUE);
    bind_key(a, tmp, k);
    mso_arg_text(a, "owner", owner);
    mso_arg_int(a, "until", now + lease_seconds);
    mso_arg_int(a, "now", now);
    if (!MSO_OK(mso_exec(a, &n, NULL)) || n == 1) {
        goto leave;
    }
    /* Lost: to a live lease of another owner, or nothing is due. */
    if (MSO_OK(mso_apptoken_get(db, tmp, k, &row))) {
        rv = row->lease_owner && strcmp(row->lease_owner, owner) && row->lease_until >= now
             ? APR_EBUSY : APR_EAGAIN;
    }

leave:
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_apptoken_release(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                                  const char *owner)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    if (!key_ok(k) || !owner) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_AT_RELEASE);
    bind_key(a, tmp, k);
    mso_arg_text(a, "owner", owner);
    rv = mso_exec(a, NULL, NULL);
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_apptoken_store(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                                const char *owner, const char *sealed, apr_int64_t expires_at,
                                apr_int64_t refresh_due_at, const char *roles,
                                apr_int64_t now)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    if (!key_ok(k) || !owner || !sealed || !*sealed) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_AT_STORE);
    bind_key(a, tmp, k);
    mso_arg_text(a, "owner", owner);
    mso_arg_text(a, "sealed", sealed);
    mso_arg_int(a, "expires", expires_at);
    mso_arg_int(a, "due", refresh_due_at);
    mso_arg_text(a, "roles", roles);
    mso_arg_int(a, "now", now);
    if (MSO_OK(mso_exec(a, &n, NULL)) && n != 1) {
        rv = APR_EBUSY;
    }
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_apptoken_failed(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                                 const char *owner, const char *reason, long aadsts,
                                 const char *last_error, apr_int64_t retry_at,
                                 apr_int64_t now)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    if (!key_ok(k) || !owner || !reason) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_AT_FAILED);
    bind_key(a, tmp, k);
    mso_arg_text(a, "owner", owner);
    mso_arg_text(a, "reason", reason);
    mso_arg_opt(a, "aadsts", aadsts);
    mso_arg_text(a, "last_error", last_error);
    mso_arg_opt(a, "retry_at", retry_at);
    mso_arg_int(a, "now", now);
    if (MSO_OK(mso_exec(a, &n, NULL)) && n != 1) {
        rv = APR_EBUSY;
    }
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_apptoken_due_now(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                  apr_int64_t now)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_AT_DUE_NOW);
    mso_arg_int(a, "id", account_id);
    mso_arg_int(a, "now", now);
    rv = mso_exec(a, NULL, NULL);
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_apptoken_refused(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                  const char *reason, const char *last_error,
                                  apr_int64_t retry_at, apr_int64_t now)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_AT_REFUSED);
    mso_arg_int(a, "id", account_id);
    mso_arg_text(a, "reason", reason);
    mso_arg_text(a, "last_error", last_error);
    mso_arg_int(a, "retry_at", retry_at);
    mso_arg_int(a, "now", now);
    rv = mso_exec(a, NULL, NULL);
    apr_pool_destroy(tmp);
    return rv;
}

const char *mso_apptoken_roles(apr_pool_t *p, const char *access_token)
{
    const char *dot1 = access_token ? strchr(access_token, '.') : NULL;
    const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
    const char *out = "";
    unsigned char *raw = NULL;
    apr_size_t len = 0, i;
    const json_t *roles;
    json_t *claims;

    if (!dot2 || dot2 - dot1 > 65536
        || mso_b64url_decode(p, apr_pstrndup(p, dot1 + 1, dot2 - dot1 - 1), &raw, &len)
           != APR_SUCCESS
        || !(claims = mso_json_parse(p, (const char *)raw, len, NULL))
        || !json_is_object(claims)) {
        return NULL;
    }
    roles = mso_json_arr(claims, "roles");
    for (i = 0; roles && i < json_array_size(roles); i++) {
        const char *r = json_string_value(json_array_get(roles, i));

        /* Role values are names like Mail.ReadWrite: nothing else is kept. */
        if (r && *r && strlen(r) < 128 && !strpbrk(r, " \t\r\n")) {
            out = *out ? apr_pstrcat(p, out, " ", r, NULL) : apr_pstrdup(p, r);
        }
    }
    return out;
}

int mso_roles_have(const char *list, const char *word)
{
    apr_size_t n = word ? strlen(word) : 0;
    const char *c = list;

    while (n && c && (c = strstr(c, word)) != NULL) {
        if ((c == list || c[-1] == ' ') && (c[n] == '\0' || c[n] == ' ')) {
            return 1;
        }
        c += n;
    }
    return 0;
}

const char *mso_apptoken_outlook_resource(const char *outlook_url, int given)
{
    if (!given && outlook_url && !strcasecmp(outlook_url, "https://outlook.office.com")) {
        return "https://outlook.office365.com";
    }
    return outlook_url;
}

/* When the next token is fetched: margin before expiry, at most a quarter of
 * its life, never sooner than 5 s from now. */
static apr_int64_t next_due(const mso_apptoken_ctx_t *ctx, apr_int64_t now,
                            apr_int64_t expires_in)
{
    apr_int64_t margin = ctx->margin > 0 ? ctx->margin : 600;
    apr_int64_t due;

    if (margin > expires_in / 4) {
        margin = expires_in / 4;
    }
    due = now + expires_in - margin;
    return due < now + 5 ? now + 5 : due;
}

apr_status_t mso_apptoken_fetch(mso_db_t *db, apr_pool_t *p, const mso_apptoken_ctx_t *ctx,
                                const mso_apptoken_key_t *k, apr_int64_t now,
                                mso_apptoken_outcome_t *out)
{
    mso_token_result_t *res = NULL;
    mso_apptoken_t *row = NULL;
    const char *sealed = NULL, *roles = NULL;
    apr_status_t rv;
    int runs;

    memset(out, 0, sizeof(*out));
    out->retry_after = -1;
    if (!key_ok(k) || !ctx || !ctx->owner) {
        out->result = MSO_APPTOKEN_FAILED;
        out->reason = "not_configured";
        return APR_EINVAL;
    }
    runs = mso_apptoken_get(db, p, k, &row) == APR_SUCCESS ? row->error_runs : 0;
    mso_token_for_app(p, ctx->http, &ctx->app, k->resource_url, &res);
    if (res->ok) {
        roles = mso_apptoken_roles(p, res->access_token);
        /* Known to have none (a JWT without roles); an opaque token cannot
         * tell, and Graph's refusal of it is caught by the mailboxes. */
        if (!strcmp(k->resource, "graph") && roles && !*roles) {
            res->ok = 0;
            res->reason = "admin_consent_required";
            res->aadsts = 0;
            res->detail = "the application token carries no application permissions (roles): "
                          "grant Mail.Read or Mail.ReadWrite (and Mail.Send) as Application "
                          "permissions with admin consent";
        }
    }
    if (!res->ok) {
        out->reason = res->reason ? res->reason : "token_endpoint_unreachable";
        out->aadsts = res->aadsts;
        out->detail = res->detail;
        out->retry_after = res->retry_after;
        out->result = !strcmp(out->reason, "token_endpoint_unreachable")
                      ? MSO_APPTOKEN_TRANSIENT : MSO_APPTOKEN_ADMIN;
        rv = mso_apptoken_failed(db, p, k, ctx->owner, out->reason, out->aadsts,
                                 out->detail ? out->detail : out->reason,
                                 mso_refresh_backoff(runs, res->retry_after, now), now);
        if (rv != APR_SUCCESS && rv != APR_EBUSY) {
            mso_apptoken_release(db, p, k, ctx->owner);
        }
        return APR_SUCCESS;
    }
    out->access_token = res->access_token;
    out->expires_at = now + res->expires_in;
    out->roles = roles;
    if (mso_seal(p, ctx->keyring, MSO_PURPOSE_TOKEN, mso_apptoken_aad(p, k), res->access_token,
                 strlen(res->access_token), &sealed) != APR_SUCCESS) {
        out->result = MSO_APPTOKEN_FAILED;
        out->reason = "not_configured";
        out->detail = "the application token could not be sealed (MSOAuthTokenKeyFile)";
        mso_apptoken_release(db, p, k, ctx->owner);
        return APR_SUCCESS;
    }
    rv = mso_apptoken_store(db, p, k, ctx->owner, sealed, out->expires_at,
                            next_due(ctx, now, res->expires_in), out->roles, now);
    if (rv == APR_EBUSY) {
        out->result = MSO_APPTOKEN_BUSY;
        out->detail = "the fetch lease ran out before the token was stored";
    }
    else if (rv != APR_SUCCESS) {
        out->result = MSO_APPTOKEN_FAILED;
        out->reason = "graph_error";
        out->detail = "the application token could not be stored in the database";
        mso_apptoken_release(db, p, k, ctx->owner);
    }
    return APR_SUCCESS;
}
