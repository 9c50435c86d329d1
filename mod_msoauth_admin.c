/* The token handler (a fresh access token for an account) and the admin
 * handler (status page, connection test, disconnect). */
#include <string.h>

#include <apr_strings.h>
#include <apr_lib.h>
#include <apr_base64.h>
#include <apr_dbd.h>
#include <jansson.h>

#include <httpd.h>
#include <http_config.h>
#include <http_core.h>
#include <http_log.h>
#include <http_protocol.h>
#include <http_request.h>
#include <mod_dbd.h>

#include "mod_msoauth.h"
#include "mod_msoauth_admin.h"
#include "mod_msoauth_config.h"
#include "mod_msoauth_guard.h"
#include "mod_msoauth_job.h"
#include "mso_apptoken.h"
#include "mso_config.h"
#include "mso_flow.h"
#include "mso_graph.h"
#include "mso_identity.h"
#include "mso_json.h"
#include "mso_reason.h"
#include "mso_refresh.h"
#include "mso_account.h"
#include "mso_attach.h"
#include "mso_db.h"
#include "mso_job_runs.h"
#include "mso_mirror.h"
#include "mso_events.h"
#include "mso_cert.h"
#include "mso_crypto.h"
#include "mso_outbox.h"

APLOG_USE_MODULE(msoauth);

#define MIN_VALIDITY 300                /* a token handed out lives 5 more minutes */
#define WAIT_FOR_OTHER apr_time_from_sec(15)
#define ADD_BODY_MAX 4096               /* POST accounts: {company, mailbox} */

int msoauth_send_json(request_rec *r, int status, json_t *j)
{
    char *text = json_dumps(j, JSON_COMPACT);

    json_decref(j);
    apr_table_setn(r->err_headers_out, "Cache-Control", "no-store");
    apr_table_setn(r->err_headers_out, "X-Content-Type-Options", "nosniff");
    r->status = status;
    ap_set_content_type(r, "application/json");
    if (text) {
        ap_rputs(text, r);
        ap_rputc('\n', r);
        free(text);
    }
    return OK;
}

int msoauth_json_error(request_rec *r, int status, const char *reason, const char *detail)
{
    const mso_reason_t *rs = mso_reason_get(reason);
    json_t *j = json_pack("{s:b, s:s}", "ok", 0, "reason", reason);

    if (rs) {
        json_object_set_new(j, "message", json_string(rs->message));
        json_object_set_new(j, "fix", json_string(rs->fix));
    }
    if (detail) {
        json_object_set_new(j, "detail", json_string(detail));
    }
    return msoauth_send_json(r, status, j);
}

int msoauth_parse_id(const char *s, apr_int64_t *id)
{
    char *end;

    if (!s || !*s || strlen(s) > 18) {
        return 0;
    }
    *id = apr_strtoi64(s, &end, 10);
    return !*end && *id > 0;
}

/* An app account's token: its company's application token for resource
 * (graph or outlook), from the cache when it lives MIN_VALIDITY more
 * seconds, else fetched under the row's lease (or waited for while another
 * process fetches it). A company whose last fetch failed answers that
 * failure until its backoff ends: no call to Microsoft per request. */
static void app_token(request_rec *r, mso_db_t *db, msoauth_srv_conf_t *sc,
                      msoauth_company_t *c, const char *resource, msoauth_token_t *f)
{
    apr_time_t give_up = apr_time_now() + WAIT_FOR_OTHER;
    mso_apptoken_key_t k;

    if (!c->set.app_only.value) {
        f->reason = "not_configured";
        f->detail = "the account is an app account, but its company is no longer app-only "
                    "(MSOAuthAppOnly on)";
        return;
    }
    msoauth_app_key(c, resource, &k);
    for (;;) {
        apr_int64_t now = apr_time_sec(apr_time_now());
        mso_apptoken_t *row = NULL;
        const char *plain = NULL;
        apr_status_t rv;

        if (mso_apptoken_get(db, r->pool, &k, &row) != APR_SUCCESS) {
            row = NULL;
        }
        if (mso_apptoken_open(r->pool, sc->keyring, &k, row, now, MIN_VALIDITY, &plain)
            == APR_SUCCESS) {
            f->token = plain;
            f->expires_at = row->expires_at;
            f->scope = row->roles;
            return;
        }
        if (row && row->reason && row->retry_at > now) {
            f->reason = row->reason;
            f->aadsts = row->aadsts;
            f->detail = row->last_error;
            return;
        }
        rv = mso_apptoken_lease(db, r->pool, &k, msoauth_process_owner(), now,
                                MSOAUTH_LEASE_SECONDS, 1);
        if (rv == APR_SUCCESS) {
            mso_apptoken_outcome_t out;
            mso_apptoken_ctx_t ctx;
            mso_http_opts_t http;

            msoauth_app_ctx(r->pool, sc, c, msoauth_process_owner(), &http, &ctx);
            http.keep_connection = 1;       /* a request thread, see msoauth_request_http_opts */
            mso_apptoken_fetch(db, r->pool, &ctx, &k, now, &out);
            if (out.access_token) {
                f->token = out.access_token;
                f->expires_at = out.expires_at;
                f->scope = out.roles;
                return;
            }
            f->reason = out.reason ? out.reason : "token_endpoint_unreachable";
            f->detail = out.detail;
            f->aadsts = out.aadsts;
            return;
        }
        if (rv != APR_EBUSY) {
            f->reason = "graph_error";
            f->detail = "the application token could not be read from the database";
            return;
        }
        if (apr_time_now() > give_up) {
            f->reason = "token_endpoint_unreachable";
            f->detail = "another process is fetching the application token and has not "
                        "finished";
            return;
        }
        apr_sleep(apr_time_from_msec(200));
    }
}

/* The stored token when it lives MIN_VALIDITY more seconds, else a refresh
 * under the account's lease. When the job (or another node) holds the lease,
 * waits for its result instead of racing it. An app account gets its
 * company's application token (resource "graph": Graph's, else Outlook's). */
void msoauth_account_token(request_rec *r, mso_db_t *db, mso_account_t *a,
                           const char *resource, msoauth_token_t *f)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(r->server);
    msoauth_company_t *c = msoauth_account_company(r->server, a->company, a->client_id);
    const char *kind = strcmp(resource, "graph") ? "outlook" : "graph";
    apr_time_t give_up = apr_time_now() + WAIT_FOR_OTHER;

    memset(f, 0, sizeof(*f));
    if (!msoauth_company_has_credentials(c) || !sc->keyring) {
        f->reason = "not_configured";
        f->detail = "the account's company has no credentials on this server";
        return;
    }
    if (a->kind && !strcmp(a->kind, "app")) {
        app_token(r, db, sc, c, strcmp(resource, "graph") ? "outlook" : "graph", f);
        return;
    }
    for (;;) {
        apr_int64_t now = apr_time_sec(apr_time_now()), exp = 0;
        const char *plain = NULL;
        apr_status_t rv;

        if (mso_account_token_open(db, r->pool, sc->keyring, a, kind, &plain, &exp)
            == APR_SUCCESS && exp - now >= MIN_VALIDITY) {
            f->token = plain;
            f->expires_at = exp;
            f->scope = a->scopes;
            return;
        }
        rv = mso_account_lease(db, r->pool, a->id, msoauth_process_owner(), now,
                               MSOAUTH_LEASE_SECONDS);
        if (rv == APR_SUCCESS) {
            mso_refresh_outcome_t out;
            mso_refresh_ctx_t ctx;
            mso_http_opts_t http;

            msoauth_refresh_ctx(r->pool, sc, c, msoauth_process_owner(), &http, &ctx);
            http.keep_connection = 1;       /* a request thread, see msoauth_request_http_opts */
            mso_refresh_account(db, r->pool, &ctx, a, resource, now, &out);
            if (out.result == MSO_REFRESHED) {
                f->token = out.access_token;
                f->expires_at = out.access_expires_at;
                f->scope = out.scope;
                return;
            }
            if (out.result != MSO_REFRESH_BUSY) {
                f->reason = out.reason ? out.reason : "token_endpoint_unreachable";
                f->detail = out.detail;
                f->aadsts = out.aadsts;
                return;
            }
        }
        else if (rv != APR_EBUSY) {
            f->reason = "graph_error";
            f->detail = "the account could not be read from the database";
            return;
        }
        if (apr_time_now() > give_up) {
            f->reason = "token_endpoint_unreachable";
            f->detail = "another process is refreshing this account and has not finished";
            return;
        }
        apr_sleep(apr_time_from_msec(200));
    }
}

static const char *xoauth2(request_rec *r, const char *mailbox, const char *token)
{
    const char *raw = apr_pstrcat(r->pool, "user=", mailbox, "\001auth=Bearer ", token,
                                  "\001\001", NULL);
    int n = (int)strlen(raw);
    char *out = apr_palloc(r->pool, apr_base64_encode_len(n));

    apr_base64_encode(out, raw, n);
    return out;
}

static json_t *account_state_json(mso_account_t *a)
{
    const mso_reason_t *rs = mso_reason_get(a->reason);
    json_t *j = json_pack("{s:I, s:s, s:s, s:s}", "account", (json_int_t)a->id,
                          "mailbox", a->mailbox ? a->mailbox : "", "state",
                          a->state ? a->state : "", "company", a->company ? a->company : "");

    json_object_set_new(j, "reason", a->reason ? json_string(a->reason) : json_null());
    json_object_set_new(j, "last_error", a->last_error ? json_string(a->last_error)
                                                       : json_null());
    if (a->aadsts) {
        json_object_set_new(j, "aadsts", json_integer(a->aadsts));
    }
    if (rs) {
        json_object_set_new(j, "fix", json_string(rs->fix));
    }
    return j;
}

int msoauth_token_handler(request_rec *r)
{
    apr_table_t *args;
    const char *why, *resource, *res;
    apr_int64_t id;
    mso_account_t *a;
    msoauth_company_t *c;
    mso_db_t *db;
    msoauth_token_t f;
    json_t *j;
    int rc;

    if ((rc = msoauth_guard(r, MSOAUTH_GUARD_KEY_REQUIRED, NULL)) != DECLINED) {
        return rc;
    }
    if (r->method_number != M_GET) {
        r->allowed = AP_METHOD_BIT << M_GET;
        return HTTP_METHOD_NOT_ALLOWED;
    }
    if ((why = mso_query_parse(r->pool, r->args, &args)) != NULL) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", why);
    }
    if (!msoauth_parse_id(apr_table_get(args, "account"), &id)) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", "account must be an account ID");
    }
    res = apr_table_get(args, "resource");
    if (!res || !strcmp(res, "graph")) {
        resource = "graph";
    }
    else if (!strcmp(res, "imap") || !strcmp(res, "smtp")) {
        resource = "outlook";
    }
    else {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", "resource must be graph, imap or "
                          "smtp");
    }
    if (!(db = msoauth_request_db(r))) {
        return msoauth_json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database unavailable");
    }
    if (mso_account_get(db, r->pool, id, &a) != APR_SUCCESS) {
        return msoauth_json_error(r, HTTP_NOT_FOUND, "not_found", "no such account");
    }
    if (!(c = msoauth_account_company(r->server, a->company, a->client_id))) {
        return msoauth_json_error(r, HTTP_NOT_FOUND, "not_configured", "the account's company is not "
                          "configured on this virtual host");
    }
    if (!strcmp(resource, "outlook")) {
        /* Delegated: the Outlook resource of MSOAuthScope's IMAP/SMTP scopes. */
        resource = c->set.outlook_url.value;
    }
    if (strcmp(a->state, "connected")) {
        return msoauth_send_json(r, HTTP_CONFLICT, account_state_json(a));
    }
    msoauth_account_token(r, db, a, resource, &f);
    if (!f.token) {
        if (mso_account_get(db, r->pool, id, &a) == APR_SUCCESS
            && strcmp(a->state, "connected")) {
            return msoauth_send_json(r, HTTP_CONFLICT, account_state_json(a));
        }
        ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(301) "token for account %"
                      APR_INT64_T_FMT " not available: %s%s%s", id, f.reason,
                      f.aadsts ? apr_psprintf(r->pool, " AADSTS%ld", f.aadsts) : "",
                      f.detail ? apr_pstrcat(r->pool, " (", f.detail, ")", NULL) : "");
        return msoauth_json_error(r, !strcmp(f.reason, "not_configured") ? HTTP_NOT_FOUND
                          : HTTP_SERVICE_UNAVAILABLE, f.reason, f.detail);
    }
    j = json_pack("{s:s, s:s, s:I, s:s, s:s, s:s}", "access_token", f.token,
                  "token_type", "Bearer", "expires_at", (json_int_t)f.expires_at,
                  "scope", f.scope ? f.scope : "", "mailbox", a->mailbox,
                  "xoauth2", xoauth2(r, a->mailbox, f.token));
    return msoauth_send_json(r, HTTP_OK, j);
}

/* --- admin --- */

static int wants_json(request_rec *r)
{
    const char *accept = apr_table_get(r->headers_in, "Accept");
    return accept && strstr(accept, "application/json") && !strstr(accept, "text/html");
}

/* A POST must come from this site's own pages (or from a tool that sends no
 * Origin): browsers send Origin on every POST. */
static int same_origin(request_rec *r, msoauth_srv_conf_t *sc)
{
    const char *origin = apr_table_get(r->headers_in, "Origin");
    const char *site = apr_table_get(r->headers_in, "Sec-Fetch-Site");

    if (site && strcmp(site, "same-origin") && strcmp(site, "none")) {
        return 0;
    }
    return !origin || !strcasecmp(origin, sc->effective_base_url);
}

/* Reasons an administrator fixes once for the whole company. */
static int is_admin_reason(const char *reason)
{
    static const char *const admin[] = {"invalid_client_secret", "client_secret_expired",
                                        "app_not_found", "wrong_tenant", "redirect_uri_mismatch",
                                        "admin_consent_required", "not_configured",
                                        "certificate_invalid", "certificate_expired", NULL};
    int i;

    for (i = 0; reason && admin[i]; i++) {
        if (!strcmp(reason, admin[i])) {
            return 1;
        }
    }
    return 0;
}

/* The certificate credential: what to compare with the app registration's
 * Certificates & secrets, and when to renew. */
static json_t *certificate_json(const mso_cert_t *cert, apr_time_t now)
{
    long days = mso_days_until(mso_cert_not_after(cert), now);

    return json_pack("{s:s, s:s, s:s, s:I, s:i, s:o}", "thumbprint", mso_cert_sha1_hex(cert),
                     "x5t#S256", mso_cert_x5t_s256(cert), "subject", mso_cert_subject(cert),
                     "expires_at", (json_int_t)apr_time_sec(mso_cert_not_after(cert)),
                     "days_left", (int)days, "warning",
                     days < 0 ? json_string("expired")
                     : days < MSOAUTH_SECRET_WARN_DAYS ? json_string("expires soon")
                     : json_null());
}

/* An app-only company's Graph application token (never the token itself). */
static json_t *app_token_json(msoauth_company_t *c, apr_array_header_t *tokens,
                              apr_int64_t now)
{
    mso_apptoken_key_t k;
    int i;

    msoauth_app_key(c, "graph", &k);
    for (i = 0; tokens && i < tokens->nelts; i++) {
        mso_apptoken_t *t = APR_ARRAY_IDX(tokens, i, mso_apptoken_t *);
        json_t *o;

        if (strcmp(t->company, k.company) || strcasecmp(t->client_id, k.client_id)
            || strcmp(t->resource, "graph")) {
            continue;
        }
        o = json_pack("{s:s, s:I, s:I, s:s, s:i}", "state",
                      t->reason ? "failed" : t->sealed && t->expires_at > now ? "valid"
                      : "none", "expires_at", (json_int_t)t->expires_at, "fetched_at",
                      (json_int_t)t->fetched_at, "roles", t->roles ? t->roles : "", "fetches",
                      t->fetches);
        if (!t->roles) {
            json_object_set_new(o, "roles", json_null());     /* an opaque token */
        }
        json_object_set_new(o, "reason", t->reason ? json_string(t->reason) : json_null());
        json_object_set_new(o, "last_error", t->last_error ? json_string(t->last_error)
                                                           : json_null());
        if (t->aadsts) {
            json_object_set_new(o, "aadsts", json_integer(t->aadsts));
        }
        json_object_set_new(o, "retry_at", json_integer(t->retry_at));
        return o;
    }
    return json_pack("{s:s}", "state", "none");
}

static json_t *expiry_warning(long days)
{
    return days < 0 ? json_string("expired")
           : days < MSOAUTH_SECRET_WARN_DAYS ? json_string("expires soon") : json_null();
}

static json_t *companies_json(request_rec *r, msoauth_srv_conf_t *sc, apr_hash_t *flags,
                              apr_array_header_t *app_tokens)
{
    json_t *arr = json_array();
    apr_hash_index_t *hi;
    apr_time_t now = apr_time_now();

    for (hi = apr_hash_first(r->pool, sc->companies); hi; hi = apr_hash_next(hi)) {
        msoauth_company_t *c = apr_hash_this_val(hi);
        json_t *o = json_pack("{s:s, s:s?, s:b, s:s, s:s, s:s, s:s}", "name", c->name,
                              "client_id", c->set.client_id.value, "secret_set", c->set.client_secret.value != NULL,
                              "tenant", c->set.tenant.value, "cloud", mso_cloud_name((mso_cloud_e)c->set.cloud.value),
                              "edition", c->set.edition.value == MSO_EDITION_PRO ? "pro" : "basic",
                              "redirect_uri", sc->redirect_uri);
        const char *flag = apr_hash_get(flags, c->name, APR_HASH_KEY_STRING);
        const mso_reason_t *rs;

        json_object_set_new(o, "app_only", json_boolean(c->set.app_only.value));
        json_object_set_new(o, "credential", c->set.client_cert.cert ? json_string("certificate")
                            : c->set.client_secret.value ? json_string("secret") : json_null());
        json_object_set_new(o, "certificate", c->set.client_cert.cert
                            ? certificate_json(c->set.client_cert.cert, now) : json_null());
        if (c->set.app_only.value) {
            json_t *t = app_token_json(c, app_tokens, apr_time_sec(now));
            const char *tr = mso_json_str(t, "reason");

            json_object_set_new(o, "app_token", t);
            json_object_set_new(o, "mailboxes_configured",
                                json_integer(c->mailboxes ? c->mailboxes->nelts : 0));
            if (tr && !flag && strcmp(tr, "token_endpoint_unreachable")) {
                flag = apr_pstrdup(r->pool, tr);
            }
        }
        rs = mso_reason_get(flag);

        /* Flagged once for the company, not per mailbox: one fix mends them all. */
        json_object_set_new(o, "problem", flag ? json_string(flag) : json_null());
        if (rs) {
            json_object_set_new(o, "problem_fix", json_string(rs->fix));
        }
        if (c->set.secret_expires.value) {
            long days = mso_days_until(c->set.secret_expires.value, now);
            json_object_set_new(o, "secret_expires", json_string(c->set.secret_expires.text));
            json_object_set_new(o, "secret_days_left", json_integer(days));
            json_object_set_new(o, "secret_warning", expiry_warning(days));
        }
        if (c->set.client_cert.cert) {
            apr_time_t until = mso_cert_not_after(c->set.client_cert.cert);
            long days = mso_days_until(until, now);
            char date[APR_CTIME_LEN];

            apr_ctime(date, until);
            json_object_set_new(o, "certificate_expires", json_string(date));
            json_object_set_new(o, "certificate_days_left", json_integer(days));
            json_object_set_new(o, "certificate_warning", expiry_warning(days));
        }
        json_array_append_new(arr, o);
    }
    return arr;
}

/* Sync and write-back figures of one account (stats may be NULL). */
static void mirror_json(json_t *o, const mso_mirror_stats_t *ms, apr_int64_t now)
{
    json_t *sync = json_object(), *q = json_object();

    json_object_set_new(o, "messages", json_integer(ms ? ms->messages : 0));
    json_object_set_new(sync, "phase", ms && ms->sync_phase ? json_string(ms->sync_phase)
                                                            : json_string("initial"));
    json_object_set_new(sync, "last_error", ms && ms->sync_error ? json_string(ms->sync_error)
                                                                 : json_null());
    json_object_set_new(sync, "due_at", json_integer(ms ? ms->sync_due_at : 0));
    json_object_set_new(sync, "retry_at", json_integer(ms ? ms->sync_retry_at : 0));
    json_object_set_new(o, "sync", sync);
    json_object_set_new(q, "queued", json_integer(ms ? ms->queued : 0));
    json_object_set_new(q, "oldest_queued_age", json_integer(ms && ms->oldest_queued_at
                                                             ? now - ms->oldest_queued_at : 0));
    json_object_set_new(q, "failed", json_integer(ms ? ms->failed : 0));
    json_object_set_new(o, "actions", q);
}

#define OUTBOX_STATS_KEY "msoauth:outbox-stats"

/* The outbox figures of every account, read once per request. */
static void outbox_stats_load(request_rec *r, mso_db_t *db)
{
    apr_hash_t *h = NULL;

    if (mso_outbox_stats(db, r->pool, &h) == APR_SUCCESS) {
        apr_pool_userdata_setn(h, OUTBOX_STATS_KEY, NULL, r->pool);
    }
}

/* Queued and failed outgoing mail of one account, the newest failure with
 * its fix. */
static void outbox_json(request_rec *r, json_t *o, apr_int64_t id, apr_int64_t now)
{
    void *h = NULL;
    const mso_outbox_stats_t *os;
    const mso_reason_t *rs;
    json_t *q = json_object(), *f = json_null();

    apr_pool_userdata_get(&h, OUTBOX_STATS_KEY, r->pool);
    os = h ? apr_hash_get(h, apr_psprintf(r->pool, "%" APR_INT64_T_FMT, id),
                          APR_HASH_KEY_STRING) : NULL;
    json_object_set_new(q, "queued", json_integer(os ? os->queued : 0));
    json_object_set_new(q, "oldest_queued_age", json_integer(os && os->oldest_queued_at
                                                             ? now - os->oldest_queued_at : 0));
    json_object_set_new(q, "failed", json_integer(os ? os->failed : 0));
    json_object_set_new(q, "sent", json_integer(os ? os->sent : 0));
    if (os && os->last_failed_id) {
        rs = mso_reason_get(os->last_failed_reason);
        f = json_pack("{s:I, s:s?, s:s?, s:s?}", "id", (json_int_t)os->last_failed_id,
                      "reason", os->last_failed_reason, "last_error", os->last_failed_error,
                      "fix", rs ? rs->fix : NULL);
    }
    json_object_set_new(q, "last_failure", f);
    json_object_set_new(o, "outbox", q);
}

static const mso_mirror_stats_t *stats_of(request_rec *r, apr_hash_t *stats, apr_int64_t id)
{
    return stats ? apr_hash_get(stats, apr_psprintf(r->pool, "%" APR_INT64_T_FMT, id),
                                APR_HASH_KEY_STRING) : NULL;
}

/* The account's attachments (astats may be NULL). */
static void attach_json(request_rec *r, json_t *o, apr_hash_t *astats, apr_int64_t id)
{
    const mso_attach_stats_t *s = astats ? apr_hash_get(astats, apr_psprintf(
        r->pool, "%" APR_INT64_T_FMT, id), APR_HASH_KEY_STRING) : NULL;

    json_object_set_new(o, "attachments", json_pack(
        "{s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "count", (json_int_t)(s ? s->count : 0),
        "stored", (json_int_t)(s ? s->stored : 0), "pending", (json_int_t)(s ? s->pending : 0),
        "large", (json_int_t)(s ? s->large : 0), "failed", (json_int_t)(s ? s->failed : 0),
        "bytes", (json_int_t)(s ? s->bytes : 0), "lists_due",
        (json_int_t)(s ? s->lists_due : 0)));
}

/* The account's recent errors (mso_events), newest first, each with its fix. */
static json_t *history_json(const apr_array_header_t *events, apr_int64_t id)
{
    json_t *arr = json_array();
    int i;

    for (i = 0; events && i < events->nelts; i++) {
        const mso_event_t *e = &APR_ARRAY_IDX(events, i, mso_event_t);
        const mso_reason_t *rs = mso_reason_get(e->reason);

        if (e->account_id != id) {
            continue;
        }
        json_array_append_new(arr, json_pack("{s:I, s:s?, s:s, s:s?}", "at", (json_int_t)e->at,
                                             "reason", e->reason, "text", e->text ? e->text : "",
                                             "fix", rs ? rs->fix : NULL));
    }
    return arr;
}

static json_t *account_json(request_rec *r, mso_account_t *a, apr_hash_t *stats,
                            apr_hash_t *astats, const apr_array_header_t *events)
{
    json_t *o = account_state_json(a);

    json_object_set_new(o, "id", json_integer(a->id));
    json_object_del(o, "account");
    json_object_set_new(o, "kind", json_string(a->kind ? a->kind : "delegated"));
    json_object_set_new(o, "shared", json_boolean(a->shared));
    json_object_set_new(o, "display_name", a->display_name ? json_string(a->display_name)
                                                            : json_null());
    json_object_set_new(o, "tenant_id", a->tenant_id ? json_string(a->tenant_id) : json_null());
    json_object_set_new(o, "access_expires_at", json_integer(a->access_expires_at));
    json_object_set_new(o, "refresh_due_at", json_integer(a->refresh_due_at));
    json_object_set_new(o, "last_refresh_at", json_integer(a->last_refresh_at));
    json_object_set_new(o, "last_sync_at", json_integer(a->last_sync_at));
    json_object_set_new(o, "error_runs", json_integer(a->error_runs));
    json_object_set_new(o, "connected_by", a->connected_by ? json_string(a->connected_by)
                                                            : json_null());
    mirror_json(o, stats_of(r, stats, a->id), apr_time_sec(apr_time_now()));
    attach_json(r, o, astats, a->id);
    json_object_set_new(o, "history", history_json(events, a->id));
    outbox_json(r, o, a->id, apr_time_sec(apr_time_now()));
    return o;
}

/* The one status model: JSON as is, and the HTML page is rendered from it.
 * NULL when the database cannot be read. */
static json_t *status_model(request_rec *r, msoauth_srv_conf_t *sc, mso_db_t *db)
{
    apr_array_header_t *accounts = NULL, *runs = NULL, *app_tokens = NULL, *events = NULL;
    apr_hash_t *flags = apr_hash_make(r->pool), *stats = NULL, *astats = NULL;
    json_t *accs = json_array(), *nodes = json_array(), *states = json_object(), *m;
    apr_int64_t now = apr_time_sec(apr_time_now());
    int i, due = 0, overdue = 0;

    outbox_stats_load(r, db);
    if (mso_mirror_stats(db, r->pool, &stats) != APR_SUCCESS
        || mso_account_list(db, r->pool, &accounts) != APR_SUCCESS
        || mso_job_runs_list(db, r->pool, &runs) != APR_SUCCESS
        || mso_apptoken_list(db, r->pool, &app_tokens) != APR_SUCCESS
        || mso_events_list(db, r->pool, 0, &events) != APR_SUCCESS) {
        json_decref(accs);
        json_decref(nodes);
        json_decref(states);
        return NULL;
    }
    if (mso_attach_stats(db, r->pool, &astats) != APR_SUCCESS) {
        astats = NULL;
    }
    json_object_set_new(states, "connected", json_integer(0));
    json_object_set_new(states, "reconnect_required", json_integer(0));
    json_object_set_new(states, "disconnected", json_integer(0));
    {
        for (i = 0; i < accounts->nelts; i++) {
            mso_account_t *a = APR_ARRAY_IDX(accounts, i, mso_account_t *);
            if (!msoauth_account_company(r->server, a->company, a->client_id)) {
                continue;       /* another virtual host's */
            }
            if (!strcmp(a->state, "connected") && a->refresh_due_at <= now
                && strcmp(a->kind, "app")) {
                due++;
                overdue += a->refresh_due_at + 300 < now;
            }
            if (is_admin_reason(a->reason)) {
                apr_hash_set(flags, a->company, APR_HASH_KEY_STRING, a->reason);
            }
            json_object_set_new(states, a->state, json_integer(
                json_integer_value(json_object_get(states, a->state)) + 1));
            json_array_append_new(accs, account_json(r, a, stats, astats, events));
        }
    }
    {
        for (i = 0; i < runs->nelts; i++) {
            mso_job_run_t *jr = &APR_ARRAY_IDX(runs, i, mso_job_run_t);
            json_array_append_new(nodes, json_pack("{s:s, s:I, s:I, s:i, s:i, s:i}", "node",
                                                   jr->node ? jr->node : "?", "last_cycle_at",
                                                   (json_int_t)jr->last_cycle_at, "cycle_ms",
                                                   (json_int_t)jr->cycle_ms, "claimed",
                                                   jr->claimed, "refreshed", jr->refreshed,
                                                   "failed", jr->failed));
        }
    }
    m = json_pack("{s:s, s:o, s:o, s:o, s:{s:i, s:i, s:o}, s:I}", "version", MSO_VERSION,
                  "states", states, "companies", companies_json(r, sc, flags, app_tokens),
                  "accounts", accs,
                  "job", "refresh_due", due, "refresh_overdue", overdue, "nodes", nodes, "now",
                  (json_int_t)now);
    return m;
}

static const char *esc(request_rec *r, const char *s)
{
    return ap_escape_html2(r->pool, s ? s : "", 1);
}

static const char *when(request_rec *r, json_int_t t)
{
    char buf[APR_RFC822_DATE_LEN];

    if (t <= 0) {
        return "—";
    }
    apr_rfc822_date(buf, apr_time_from_sec(t));
    return apr_pstrdup(r->pool, buf);
}

/* --- the HTML page: rendered from the status model, section by section --- */

/* The Outbox column: queued (with the oldest's age) and failed outgoing
 * mail, and the newest failure's reason. */
static const char *outbox_cell(request_rec *r, const json_t *ob)
{
    apr_int64_t queued = 0, age = 0, failed = 0;
    const json_t *lf = mso_json_obj(ob, "last_failure");

    mso_json_int(ob, "queued", &queued);
    mso_json_int(ob, "oldest_queued_age", &age);
    mso_json_int(ob, "failed", &failed);
    return apr_psprintf(r->pool, "<td%s>%" APR_INT64_T_FMT " queued%s, %" APR_INT64_T_FMT
                        " failed%s%s%s</td>", failed ? " class=bad" : "", queued,
                        queued ? apr_psprintf(r->pool, " (oldest %" APR_INT64_T_FMT " s)", age)
                               : "", failed,
                        lf ? " (last: " : "", lf ? esc(r, mso_json_str(lf, "reason")) : "",
                        lf ? ")" : "");
}

typedef struct {
    request_rec *r;
    const char *base;           /* the admin location: /microsoft_outlook/admin */
    const char *csrf;           /* the form token of the browser's session */
    const char *connect;        /* the connect handler, next to confirm */
} page_t;

static void page_head(page_t *pg, json_t *m)
{
    request_rec *r = pg->r;
    const json_t *st = mso_json_obj(m, "states");
    apr_int64_t conn = 0, rec = 0, disc = 0;

    mso_json_int(st, "connected", &conn);
    mso_json_int(st, "reconnect_required", &rec);
    mso_json_int(st, "disconnected", &disc);
    ap_rputs("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             "<title>mod_msoauth status</title><style>body{font-family:sans-serif;margin:2em}"
             "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;"
             "padding:.3em .6em;text-align:left;vertical-align:top}.bad{color:#a00}"
             "form{display:inline;margin:0 .2em}</style></head><body>\n"
             "<h1>mod_msoauth status</h1>\n", r);
    ap_rprintf(r, "<p id=\"states\">Accounts: %" APR_INT64_T_FMT " connected, <span%s>%"
               APR_INT64_T_FMT " to reconnect</span>, %" APR_INT64_T_FMT " disconnected.</p>\n",
               conn, rec ? " class=bad" : "", rec, disc);
}

/* "expires DATE (N days)" of a secret or certificate, or "". */
static const char *expiry(request_rec *r, const json_t *c, const char *what)
{
    const char *date = mso_json_str(c, apr_pstrcat(r->pool, what, "_expires", NULL));
    const char *warn = mso_json_str(c, apr_pstrcat(r->pool, what, "_warning", NULL));
    apr_int64_t left = 0;

    if (!date) {
        return "—";
    }
    mso_json_int(c, apr_pstrcat(r->pool, what, "_days_left", NULL), &left);
    return apr_psprintf(r->pool, "<span%s>%s (%" APR_INT64_T_FMT " days%s%s)</span>",
                        warn ? " class=bad" : "", esc(r, date), left, warn ? ": " : "",
                        warn ? esc(r, warn) : "");
}

static void page_companies(page_t *pg, json_t *m)
{
    request_rec *r = pg->r;
    size_t i;
    json_t *c;

    ap_rputs("<h2>Companies</h2>\n<table><tr><th>Company</th><th>Client ID</th>"
             "<th>Secret</th><th>Secret expires</th><th>Certificate expires</th>"
             "<th>Tenant</th><th>Edition</th><th>Redirect URI to register</th>"
             "<th>Problem</th></tr>\n", r);
    json_array_foreach(mso_json_arr(m, "companies"), i, c) {
        const json_t *cert = mso_json_obj(c, "certificate"), *at = mso_json_obj(c, "app_token");
        const char *roles = mso_json_str(at, "roles");
        apr_int64_t texp = 0;
        const char *app = "";

        mso_json_int(at, "expires_at", &texp);
        if (json_is_true(json_object_get(c, "app_only"))) {
            app = apr_pstrcat(r->pool, "<br>app-only, application token: ",
                              esc(r, mso_json_str(at, "state")),
                              texp ? apr_pstrcat(r->pool, " until ", when(r, texp), NULL) : "",
                              roles && *roles ? apr_pstrcat(r->pool, " (", esc(r, roles), ")",
                                                            NULL) : "", NULL);
        }
        ap_rprintf(r, "<tr><td>%s%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s%s%s%s</td>"
                   "<td>%s</td><td>%s</td><td><code>%s</code></td><td class=bad>%s%s%s</td>"
                   "</tr>\n",
                   esc(r, mso_json_str(c, "name")), app, esc(r, mso_json_str(c, "client_id")),
                   json_is_true(json_object_get(c, "secret_set")) ? "set" : "missing",
                   expiry(r, c, "secret"), expiry(r, c, "certificate"),
                   cert ? "<br>SHA-1 thumbprint <code>" : "",
                   cert ? esc(r, mso_json_str(cert, "thumbprint")) : "", cert ? "</code>" : "",
                   esc(r, mso_json_str(c, "tenant")), esc(r, mso_json_str(c, "edition")),
                   esc(r, mso_json_str(c, "redirect_uri")), esc(r, mso_json_str(c, "problem")),
                   mso_json_str(c, "problem_fix") ? ": " : "",
                   esc(r, mso_json_str(c, "problem_fix")));
    }
    ap_rputs("</table>\n", r);
}

/* Reconnect (the connect URL for the account's company and mailbox, back to
 * this page), and the actions as forms that carry the session's token. */
static const char *account_actions(page_t *pg, const json_t *a, apr_int64_t id)
{
    request_rec *r = pg->r;
    static const char *const acts[][2] = {{"test", "Test"}, {"sync", "Sync now"},
                                          {"disconnect", "Disconnect"}};
    const char *html, *state = mso_json_str(a, "state");
    const char *link = apr_pstrcat(r->pool, pg->connect, "?company=",
                                   mso_url_encode(r->pool, mso_json_str(a, "company")),
                                   "&mailbox=", mso_url_encode(r->pool, mso_json_str(a, "mailbox")),
                                   "&return_to=", mso_url_encode(r->pool,
                                                                 apr_pstrcat(r->pool, pg->base,
                                                                             "/", NULL)), NULL);
    size_t k;

    html = apr_psprintf(r->pool, "<a id=\"reconnect-%" APR_INT64_T_FMT "\" href=\"%s\">"
                        "Reconnect</a>", id, esc(r, link));
    for (k = 0; k < sizeof(acts) / sizeof(acts[0]); k++) {
        if (strcmp(acts[k][0], "disconnect") && state && strcmp(state, "connected")) {
            continue;           /* only a connected mailbox can be tested or synced */
        }
        if (!strcmp(acts[k][0], "disconnect") && state && !strcmp(state, "disconnected")) {
            continue;
        }
        html = apr_psprintf(r->pool, "%s<form method=\"post\" action=\"%s/accounts/%"
                            APR_INT64_T_FMT "/%s\"><input type=\"hidden\" name=\"csrf\" "
                            "value=\"%s\"><button id=\"%s-%" APR_INT64_T_FMT "\">%s</button>"
                            "</form>", html, esc(r, pg->base), id, acts[k][0], esc(r, pg->csrf),
                            acts[k][0], id, acts[k][1]);
    }
    return html;
}

static void page_accounts(page_t *pg, json_t *m)
{
    request_rec *r = pg->r;
    size_t i;
    json_t *a;

    ap_rputs("<h2>Accounts</h2>\n<table><tr><th>ID</th><th>Company</th><th>Mailbox</th>"
             "<th>State</th><th>Token expires</th><th>Last refresh</th><th>Last sync</th>"
             "<th>Messages</th><th>Sync</th><th>Write-back queue</th><th>Outbox</th>"
             "<th>Last error and fix</th><th>Actions</th></tr>\n", r);
    json_array_foreach(mso_json_arr(m, "accounts"), i, a) {
        apr_int64_t id = 0, exp = 0, ref = 0, sync = 0, msgs = 0, queued = 0, age = 0;
        apr_int64_t failed = 0;
        const char *err = mso_json_str(a, "last_error"), *fix = mso_json_str(a, "fix");
        const json_t *sy = mso_json_obj(a, "sync"), *q = mso_json_obj(a, "actions");
        const json_t *ob = mso_json_obj(a, "outbox");
        const char *serr = mso_json_str(sy, "last_error");

        mso_json_int(a, "id", &id);
        mso_json_int(a, "access_expires_at", &exp);
        mso_json_int(a, "last_refresh_at", &ref);
        mso_json_int(a, "last_sync_at", &sync);
        mso_json_int(a, "messages", &msgs);
        mso_json_int(q, "queued", &queued);
        mso_json_int(q, "oldest_queued_age", &age);
        mso_json_int(q, "failed", &failed);
        ap_rprintf(r, "<tr id=\"account-%" APR_INT64_T_FMT "\"><td>%" APR_INT64_T_FMT "</td>"
                   "<td>%s</td><td>%s</td><td class=\"state%s\">%s</td>"
                   "<td>%s</td><td>%s</td><td>%s</td><td>%" APR_INT64_T_FMT "</td>"
                   "<td%s>%s%s%s</td><td%s>%" APR_INT64_T_FMT " queued%s, %" APR_INT64_T_FMT
                   " failed</td>%s<td>%s%s%s</td><td>%s</td></tr>\n", id, id,
                   esc(r, mso_json_str(a, "company")), esc(r, mso_json_str(a, "mailbox")),
                   strcmp(mso_json_str(a, "state"), "connected") ? " bad" : "",
                   esc(r, mso_json_str(a, "state")), when(r, exp), when(r, ref), when(r, sync),
                   msgs, serr ? " class=bad" : "", esc(r, mso_json_str(sy, "phase")),
                   serr ? ": " : "", esc(r, serr), failed ? " class=bad" : "", queued,
                   queued ? apr_psprintf(r->pool, " (oldest %" APR_INT64_T_FMT " s)", age) : "",
                   failed, outbox_cell(r, ob), esc(r, err), err && fix ? "<br>Fix: " : "",
                   err && fix ? esc(r, fix) : "", account_actions(pg, a, id));
    }
    ap_rputs("</table>\n", r);
}

/* Each account's last errors with time and fix (the newest first). */
static void page_history(page_t *pg, json_t *m)
{
    request_rec *r = pg->r;
    size_t i, k;
    json_t *a, *e;
    int any = 0;

    json_array_foreach(mso_json_arr(m, "accounts"), i, a) {
        const json_t *h = mso_json_arr(a, "history");
        apr_int64_t id = 0;

        if (!json_array_size(h)) {
            continue;
        }
        if (!any++) {
            ap_rputs("<h2>Last errors</h2>\n", r);
        }
        mso_json_int(a, "id", &id);
        ap_rprintf(r, "<h3>Account %" APR_INT64_T_FMT " (%s)</h3>\n<table id=\"history-%"
                   APR_INT64_T_FMT "\"><tr><th>Time</th><th>Reason</th><th>What happened</th>"
                   "<th>Fix</th></tr>\n", id, esc(r, mso_json_str(a, "mailbox")), id);
        json_array_foreach(h, k, e) {
            apr_int64_t at = 0;

            mso_json_int(e, "at", &at);
            ap_rprintf(r, "<tr><td>%s</td><td><code>%s</code></td><td>%s</td><td>%s</td>"
                       "</tr>\n", when(r, at), esc(r, mso_json_str(e, "reason")),
                       esc(r, mso_json_str(e, "text")), esc(r, mso_json_str(e, "fix")));
        }
        ap_rputs("</table>\n", r);
    }
}

static void page_job(page_t *pg, json_t *m)
{
    request_rec *r = pg->r;
    apr_int64_t due = 0, overdue = 0;
    const json_t *job = mso_json_obj(m, "job");
    size_t k;
    json_t *n;

    mso_json_int(job, "refresh_due", &due);
    mso_json_int(job, "refresh_overdue", &overdue);
    ap_rprintf(r, "<h2>Background job</h2>\n<p>Accounts due for a refresh: %" APR_INT64_T_FMT
               "; overdue by more than 5 minutes: <span%s>%" APR_INT64_T_FMT "</span>.</p>\n"
               "<table><tr><th>Node</th><th>Last cycle</th><th>Duration</th><th>Claimed</th>"
               "<th>Refreshed</th><th>Failed</th></tr>\n", due, overdue ? " class=bad" : "",
               overdue);
    json_array_foreach(mso_json_arr(job, "nodes"), k, n) {
        apr_int64_t at = 0, ms = 0, cl = 0, rf = 0, fl = 0;

        mso_json_int(n, "last_cycle_at", &at);
        mso_json_int(n, "cycle_ms", &ms);
        mso_json_int(n, "claimed", &cl);
        mso_json_int(n, "refreshed", &rf);
        mso_json_int(n, "failed", &fl);
        ap_rprintf(r, "<tr><td>%s</td><td>%s</td><td>%" APR_INT64_T_FMT " ms</td><td>%"
                   APR_INT64_T_FMT "</td><td>%" APR_INT64_T_FMT "</td><td>%" APR_INT64_T_FMT
                   "</td></tr>\n", esc(r, mso_json_str(n, "node")), when(r, at), ms, cl, rf,
                   fl);
    }
    ap_rputs("</table>\n", r);
}

static void page_headers(request_rec *r)
{
    apr_table_setn(r->err_headers_out, "Cache-Control", "no-store");
    apr_table_setn(r->err_headers_out, "X-Content-Type-Options", "nosniff");
    /* not no-referrer: browsers then send "Origin: null" with the forms */
    apr_table_setn(r->err_headers_out, "Referrer-Policy", "same-origin");
    apr_table_setn(r->err_headers_out, "X-Frame-Options", "DENY");
    apr_table_setn(r->err_headers_out, "Content-Security-Policy",
                   "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                   "frame-ancestors 'none'");
    ap_set_content_type(r, "text/html; charset=utf-8");
}

static int status_page(request_rec *r, json_t *m, const char *base, const char *csrf)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(r->server);
    const char *slash = strrchr(sc->redirect_path, '/');
    page_t pg;

    pg.r = r;
    pg.base = base;
    pg.csrf = csrf ? csrf : "";
    /* connect lives in the folder of the redirect path (the README says so:
     * the sign-in cookie is scoped to it). */
    pg.connect = apr_pstrcat(r->pool, apr_pstrndup(r->pool, sc->redirect_path,
                                                   slash ? slash - sc->redirect_path + 1 : 0),
                             "connect", NULL);
    page_headers(r);
    page_head(&pg, m);
    page_companies(&pg, m);
    page_accounts(&pg, m);
    page_history(&pg, m);
    page_job(&pg, m);
    ap_rprintf(r, "<p>mod_msoauth %s</p>\n</body></html>\n",
               esc(r, mso_json_str(m, "version")));
    json_decref(m);
    return OK;
}

/* What a form of the page did, as a page with the way back. */
static int action_page(request_rec *r, const char *base, int status, const char *title,
                       const char *text, const char *fix)
{
    page_headers(r);
    r->status = status;
    ap_rprintf(r, "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
               "<title>%s</title><style>body{font-family:sans-serif;margin:2em}</style>"
               "</head><body>\n<h1>%s</h1>\n<p id=\"result\">%s</p>\n%s%s%s"
               "<p><a id=\"back\" href=\"%s/\">Back to the status page</a></p>\n"
               "</body></html>\n", esc(r, title), esc(r, title), esc(r, text),
               fix ? "<p id=\"fix\">Fix: " : "", fix ? esc(r, fix) : "", fix ? "</p>\n" : "",
               esc(r, base));
    return OK;
}

/* The request's path below the admin location, without slashes at either
 * end: "", "accounts", "accounts/7", "accounts/7/test"; NULL when the URI is
 * not under the location (a LocationMatch: then from the last "/accounts"). */
static const char *admin_tail(request_rec *r)
{
    /* The path of the section that mapped the handler (<Location>). */
    core_dir_config *cd = ap_get_core_module_config(r->per_dir_config);
    const char *loc = cd && cd->d && cd->d[0] == '/' && !cd->r ? cd->d : NULL;
    apr_size_t n = loc ? strlen(loc) : 0;
    const char *t;
    char *tail;

    while (n > 0 && loc[n - 1] == '/') {
        n--;
    }
    if (loc && !strncmp(r->uri, loc, n) && (r->uri[n] == '/' || r->uri[n] == '\0')) {
        t = r->uri + n;
    }
    else {
        const char *p = strstr(r->uri, "/accounts"), *last = NULL;

        while (p) {
            last = p;
            p = strstr(p + 1, "/accounts");
        }
        t = last ? last : "";
    }
    while (*t == '/') {
        t++;
    }
    tail = apr_pstrdup(r->pool, t);
    n = strlen(tail);
    while (n > 0 && tail[n - 1] == '/') {
        tail[--n] = '\0';
    }
    return tail;
}

/* An answer of an action: ok, or the reason with its message and fix. */
static json_t *result_error(const char *reason, const char *detail)
{
    const mso_reason_t *rs = mso_reason_get(reason);
    json_t *j = json_pack("{s:b, s:s}", "ok", 0, "reason", reason);

    if (rs) {
        json_object_set_new(j, "message", json_string(rs->message));
        json_object_set_new(j, "fix", json_string(rs->fix));
    }
    if (detail) {
        json_object_set_new(j, "detail", json_string(detail));
    }
    return j;
}

/* A real Graph call with the account's token: the inbox's counts. */
static json_t *graph_test(request_rec *r, mso_db_t *db, mso_account_t *a)
{
    msoauth_company_t *c = msoauth_account_company(r->server, a->company, a->client_id);
    mso_http_response_t *resp = NULL;
    apr_array_header_t *h = apr_array_make(r->pool, 2, sizeof(const char *));
    apr_int64_t total = 0, unread = 0;
    mso_http_opts_t o;
    msoauth_token_t f;
    const char *url;
    apr_status_t rv;
    json_t *j;

    msoauth_account_token(r, db, a, "graph", &f);
    if (!f.token) {
        return result_error(f.reason, f.detail);
    }
    msoauth_request_http_opts(msoauth_srv_conf(r->server), &o);
    o.timeout_ms = 30000;
    /* An app or shared account's mailbox is /users/{address}. */
    url = apr_pstrcat(r->pool, mso_graph_mailbox(r->pool, c->set.graph_url.value,
                                                 strcmp(a->kind, "app") && !a->shared
                                                 ? NULL : a->mailbox),
                      "/mailFolders/inbox?$select=id,totalItemCount,unreadItemCount", NULL);
    APR_ARRAY_PUSH(h, const char *) = apr_pstrcat(r->pool, "Authorization: Bearer ", f.token,
                                                  NULL);
    APR_ARRAY_PUSH(h, const char *) = "Accept: application/json";
    rv = mso_http_request(r->pool, &o, "GET", url, h, NULL, 0, &resp);
    if (rv != APR_SUCCESS) {
        return result_error("graph_error", resp && resp->error ? resp->error
                            : "Graph could not be reached");
    }
    {
        mso_graph_result_t g;
        const char *mr;

        mso_graph_classify(r->pool, rv, resp, &g);
        if ((mr = mso_graph_mailbox_reason(&g)) != NULL) {
            return result_error(mr, mso_graph_result_text(r->pool, &g));
        }
    }
    if (resp->status == 429 || resp->status == 503) {
        return result_error("throttled", apr_psprintf(r->pool, "Graph answered %d",
                                                      resp->status));
    }
    if (resp->status == 403) {
        return result_error("consent_required", "Graph refused access to the inbox (403): the "
                            "mailbox may lack a licence or the app Mail.Read");
    }
    if (resp->status != 200) {
        return result_error("graph_error", apr_psprintf(r->pool, "Graph answered HTTP %d",
                                                        resp->status));
    }
    j = mso_json_parse(r->pool, resp->body, resp->body_len, NULL);
    mso_json_int(j, "totalItemCount", &total);
    mso_json_int(j, "unreadItemCount", &unread);
    return json_pack("{s:b, s:I, s:s, s:I, s:I}", "ok", 1, "account", (json_int_t)a->id,
                     "mailbox", a->mailbox, "inbox_total", (json_int_t)total, "inbox_unread",
                     (json_int_t)unread);
}

/* --- the forms of the page: a browser session and its token --- */

#define SESSION_COOKIE "msoauth_admin"
#define FORM_MAX 4096

/* The value of cookie name, or NULL. */
static const char *cookie_value(request_rec *r, const char *name)
{
    const char *all = apr_table_get(r->headers_in, "Cookie");
    char *copy, *part, *last;
    apr_size_t n = strlen(name);

    if (!all) {
        return NULL;
    }
    copy = apr_pstrdup(r->pool, all);
    for (part = apr_strtok(copy, ";", &last); part; part = apr_strtok(NULL, ";", &last)) {
        while (*part == ' ') {
            part++;
        }
        if (!strncmp(part, name, n) && part[n] == '=') {
            return part + n + 1;
        }
    }
    return NULL;
}

/* The browser's session id: 22 characters of base64url (16 random bytes). */
static const char *session_of(request_rec *r)
{
    const char *v = cookie_value(r, SESSION_COOKIE);
    apr_size_t i;

    if (!v || strlen(v) != 22) {
        return NULL;
    }
    for (i = 0; i < 22; i++) {
        if (!apr_isalnum(v[i]) && v[i] != '-' && v[i] != '_') {
            return NULL;
        }
    }
    return v;
}

/* The session of the page's forms: the browser's, or a new one in a cookie
 * for the admin location only, never sent by another site (SameSite). */
static const char *page_session(request_rec *r, msoauth_srv_conf_t *sc, const char *base)
{
    const char *s = session_of(r), *path = *base ? base : "/";
    apr_size_t i;

    if (s) {
        return s;
    }
    s = mso_random_token(r->pool, 16);
    if (!s) {
        return NULL;
    }
    for (i = 0; path[i]; i++) {
        if (!apr_isalnum(path[i]) && !strchr("/._~-", path[i])) {
            path = "/";
            break;
        }
    }
    apr_table_addn(r->err_headers_out, "Set-Cookie",
                   apr_pstrcat(r->pool, SESSION_COOKIE, "=", s, "; Path=", path,
                               "; HttpOnly; SameSite=Strict",
                               !strncasecmp(sc->effective_base_url, "https:", 6)
                               ? "; Secure" : "", NULL));
    return s;
}

/* The fields of a small url-encoded form body; NULL when there is none or
 * it is not one. */
static apr_table_t *read_form(request_rec *r)
{
    const char *type = apr_table_get(r->headers_in, "Content-Type");
    char *buf;
    apr_size_t len = 0;
    apr_table_t *fields = NULL;
    long n;

    if (!type || strncasecmp(type, "application/x-www-form-urlencoded", 33)
        || ap_setup_client_block(r, REQUEST_CHUNKED_ERROR) != OK
        || !ap_should_client_block(r)) {
        return NULL;
    }
    buf = apr_palloc(r->pool, FORM_MAX + 1);
    while ((n = ap_get_client_block(r, buf + len, FORM_MAX - len)) > 0) {
        len += (apr_size_t)n;
        if (len >= FORM_MAX) {
            return NULL;
        }
    }
    if (n < 0) {
        return NULL;
    }
    buf[len] = '\0';
    return mso_query_parse(r->pool, buf, &fields) ? NULL : fields;
}

/* The path of the admin location: the request's without the tail. */
static const char *admin_base(request_rec *r, const char *tail)
{
    apr_size_t n = strlen(r->uri), t = strlen(tail);

    while (n > 0 && r->uri[n - 1] == '/') {
        n--;
    }
    if (t && n >= t && !strncmp(r->uri + n - t, tail, t)) {
        n -= t;
        while (n > 0 && r->uri[n - 1] == '/') {
            n--;
        }
    }
    return apr_pstrndup(r->pool, r->uri, n);
}

/* The answer of an action: JSON for a program, a page for a form. */
static int action_answer(request_rec *r, const char *base, int form, int status, json_t *j,
                         const char *title, const char *done)
{
    const char *text, *fix;

    if (!form) {
        return msoauth_send_json(r, status, j);
    }
    if (json_is_true(json_object_get(j, "ok"))) {
        apr_int64_t total = 0, unread = 0;

        if (mso_json_int(j, "inbox_total", &total)) {
            mso_json_int(j, "inbox_unread", &unread);
            done = apr_psprintf(r->pool, "%s The inbox holds %" APR_INT64_T_FMT " messages, %"
                                APR_INT64_T_FMT " unread.", done, total, unread);
        }
        text = done;
        fix = NULL;
    }
    else {
        const char *msg = mso_json_str(j, "message"), *detail = mso_json_str(j, "detail");
        const char *state = mso_json_str(j, "state");

        text = apr_pstrcat(r->pool, state ? apr_pstrcat(r->pool, "The account is ", state,
                                                        ". ", NULL) : "",
                           msg ? msg : "It did not work.", detail ? " (" : "",
                           detail ? detail : "", detail ? ")" : "", NULL);
        fix = mso_json_str(j, "fix");
    }
    action_page(r, base, status == HTTP_ACCEPTED ? HTTP_OK : status, title, text, fix);
    json_decref(j);
    return OK;
}

/* The request body, at most max bytes: NULL (and *why) when it is longer,
 * unreadable or not JSON text. */
static const char *read_body(request_rec *r, apr_size_t max, apr_size_t *len, const char **why)
{
    char *buf = apr_palloc(r->pool, max + 1);
    apr_size_t n = 0;
    long got;

    *why = NULL;
    if (ap_setup_client_block(r, REQUEST_CHUNKED_DECHUNK) != OK || !ap_should_client_block(r)) {
        *why = "a JSON body is needed";
        return NULL;
    }
    while ((got = ap_get_client_block(r, buf + n, max + 1 - n)) > 0) {
        n += (apr_size_t)got;
        if (n > max) {
            *why = "the body is too long";
            return NULL;
        }
    }
    if (got < 0) {
        *why = "the body could not be read";
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* POST .../admin/accounts {"company": NAME, "mailbox": ADDRESS}: a mailbox of
 * an app-only company, worked on with the company's application token. */
static int add_account(request_rec *r, mso_db_t *db)
{
    const char *ctype = apr_table_get(r->headers_in, "Content-Type");
    const char *body, *why = NULL, *name, *mailbox, *err = NULL;
    msoauth_company_t *c;
    mso_app_account_t in;
    mso_account_t *a = NULL;
    apr_size_t len = 0;
    apr_status_t rv;
    json_t *j, *o;
    int created = 0;

    /* A form or text/plain is what another site's page could send. */
    if (!ctype || strncasecmp(ctype, "application/json", 16)) {
        return msoauth_json_error(r, HTTP_UNSUPPORTED_MEDIA_TYPE, "bad_request", "send "
                          "Content-Type: application/json");
    }
    if (!(body = read_body(r, ADD_BODY_MAX, &len, &why))) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", why);
    }
    j = mso_json_parse(r->pool, body, len, NULL);
    name = mso_json_str(j, "company");
    mailbox = mso_json_str(j, "mailbox");
    if (!j || !json_is_object(j) || !name || !mailbox) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", "the body must be a JSON object "
                          "with company and mailbox");
    }
    if (mso_check_company_name(r->pool, name)) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", "company is not a valid name");
    }
    if ((why = mso_check_mailbox(mailbox)) != NULL
        || (why = mso_check_text_param(mailbox)) != NULL) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", apr_pstrcat(r->pool, "mailbox: ",
                                                                          why, NULL));
    }
    c = msoauth_company(r->server, name);
    if (!msoauth_company_has_credentials(c)) {
        return msoauth_json_error(r, HTTP_NOT_FOUND, "not_configured", apr_psprintf(r->pool, "no "
                          "company %s with credentials is configured here", name));
    }
    if (!c->set.app_only.value) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", apr_psprintf(r->pool, "company "
                          "%s is not app-only (MSOAuthAppOnly on): its mailboxes are connected "
                          "by the people who own them, through the Connect link", c->name));
    }
    if (!db) {
        return msoauth_json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database unavailable");
    }
    memset(&in, 0, sizeof(in));
    in.company = c->name;
    in.client_id = c->set.client_id.value;
    in.tenant_id = mso_is_guid(c->set.tenant.value) ? c->set.tenant.value : NULL;
    in.authority = mso_authority(r->pool, c->set.authority_url.value, c->set.tenant.value);
    in.connected_by = r->user ? r->user : "admin";
    rv = mso_account_add_app(db, r->pool, &in, mso_lower(r->pool, mailbox),
                             apr_time_sec(apr_time_now()), &a, &created, &err);
    if (rv == MSO_ACCOUNT_OTHER_OBJECT) {
        return msoauth_json_error(r, HTTP_CONFLICT, "mailbox_mismatch", err);
    }
    if (rv != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, rv, r, MSOLOGNO(308) "adding mailbox %s to "
                      "company %s failed: %s", ap_escape_logitem(r->pool, mailbox), c->name,
                      err ? ap_escape_logitem(r->pool, err) : "");
        return msoauth_json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database write failed");
    }
    ap_log_rerror(APLOG_MARK, APLOG_NOTICE, 0, r, MSOLOGNO(306) "mailbox %s added to app-only "
                  "company %s as account %" APR_INT64_T_FMT " by %s%s",
                  ap_escape_logitem(r->pool, a->mailbox), c->name, a->id,
                  r->user ? ap_escape_logitem(r->pool, r->user) : "anonymous",
                  created ? "" : " (it existed)");
    o = account_json(r, a, NULL, NULL, NULL);
    json_object_set_new(o, "ok", json_true());
    json_object_set_new(o, "created", json_boolean(created));
    return msoauth_send_json(r, created ? HTTP_CREATED : HTTP_OK, o);
}

int msoauth_admin_handler(request_rec *r)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(r->server);
    const char *tail = admin_tail(r), *base = admin_base(r, tail), *title;
    mso_db_t *db;
    mso_account_t *a;
    apr_int64_t id = 0;
    char *rest, *id_part, *action = NULL, *last;
    int rc, keyed = 0, form = 0;
    int page = !*tail && r->method_number == M_GET && !wants_json(r);
    int post = r->method_number == M_POST;

    /* The HTML page is for a browser behind Require; what a program reads
     * (JSON) needs the API key when one is configured. An action needs the
     * API key or a form of the page (its session's token), see below. */
    if ((rc = msoauth_guard(r, page || post ? MSOAUTH_GUARD_KEY_OPTIONAL
                                            : MSOAUTH_GUARD_KEY_REQUIRED, &keyed)) != DECLINED) {
        return rc;
    }
    if (*tail && strcmp(tail, "accounts")) {
        if (strncmp(tail, "accounts/", 9)) {
            return msoauth_json_error(r, HTTP_NOT_FOUND, "not_found", "unknown admin path: use /, "
                              "/accounts, /accounts/ID or /accounts/ID/test|sync|disconnect");
        }
        rest = apr_pstrdup(r->pool, tail + 9);
        id_part = apr_strtok(rest, "/", &last);
        action = apr_strtok(NULL, "/", &last);
        if (!msoauth_parse_id(id_part, &id) || apr_strtok(NULL, "/", &last)
            || (action && strcmp(action, "test") && strcmp(action, "sync")
                && strcmp(action, "disconnect"))) {
            return msoauth_json_error(r, HTTP_NOT_FOUND, "not_found", "unknown admin path: use /, "
                              "/accounts, /accounts/ID or /accounts/ID/test|sync|disconnect");
        }
    }
    if (!strcmp(tail, "accounts") && r->method_number == M_POST) {
        if (!same_origin(r, sc)) {
            ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(302) "refused a "
                          "cross-origin admin POST");
            return msoauth_json_error(r, HTTP_FORBIDDEN, "forbidden", "cross-origin POST refused");
        }
        /* A program's call (no form adds mailboxes): the API key when one is set. */
        if (sc->api_key && !keyed) {
            ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(307) "refused an admin "
                          "POST to add a mailbox without the API key");
            apr_table_setn(r->err_headers_out, "WWW-Authenticate", "Bearer realm=\"mod_msoauth\"");
            return msoauth_json_error(r, HTTP_UNAUTHORIZED, "forbidden", "adding a mailbox needs the "
                              "API key ('Authorization: Bearer KEY')");
        }
        return add_account(r, msoauth_request_db(r));
    }
    if (action) {
        apr_table_t *fields;

        if (!post) {
            r->allowed = AP_METHOD_BIT << M_POST;
            return HTTP_METHOD_NOT_ALLOWED;
        }
        if (!same_origin(r, sc)) {
            ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(302) "refused a "
                          "cross-origin admin POST");
            return msoauth_json_error(r, HTTP_FORBIDDEN, "forbidden", "cross-origin POST refused");
        }
        /* A program has the API key; a person's browser posts a form of the
         * page, whose token belongs to the session in its cookie (a forged
         * form of another site has neither: its cookie is not sent, and the
         * token cannot be made without the key ring). Compared in constant
         * time. */
        if (!keyed) {
            fields = read_form(r);
            if (!sc->keyring || !fields
                || !mso_csrf_check(r->pool, sc->keyring, session_of(r),
                                   apr_table_get(fields, "csrf"))) {
                ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(305) "refused an "
                              "admin POST without the API key or a valid form token");
                return msoauth_json_error(r, HTTP_FORBIDDEN, "forbidden", "an admin action needs the "
                                  "API key ('Authorization: Bearer KEY') or a form of the "
                                  "status page: reload the page and try again");
            }
            /* A page answers a form; JSON who asks for it. */
            form = !wants_json(r);
        }
    }
    else if (r->method_number != M_GET) {
        r->allowed = (AP_METHOD_BIT << M_GET)
                     | (!strcmp(tail, "accounts") ? AP_METHOD_BIT << M_POST : 0);
        return HTTP_METHOD_NOT_ALLOWED;
    }
    db = msoauth_request_db(r);
    if (!*tail || !strcmp(tail, "accounts")) {
        json_t *m = db ? status_model(r, sc, db) : NULL;

        if (!m) {
            /* Never an empty list that looks like "no accounts". */
            return msoauth_json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "the database is "
                              "unavailable: see the error log (DBDriver/DBDParams)");
        }
        if (!strcmp(tail, "accounts")) {
            json_t *accs = json_incref(json_object_get(m, "accounts"));
            json_decref(m);
            return msoauth_send_json(r, HTTP_OK, accs);
        }
        if (wants_json(r)) {
            return msoauth_send_json(r, HTTP_OK, m);
        }
        return status_page(r, m, base, sc->keyring ? mso_csrf_token(r->pool, sc->keyring,
                                                                    page_session(r, sc, base))
                                                   : NULL);
    }
    if (!db) {
        return msoauth_json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database unavailable");
    }
    if (mso_account_get(db, r->pool, id, &a) != APR_SUCCESS
        || !msoauth_account_company(r->server, a->company, a->client_id)) {
        return msoauth_json_error(r, HTTP_NOT_FOUND, "not_found", "no such account");
    }
    if (!action) {
        apr_hash_t *stats = NULL, *astats = NULL;
        apr_array_header_t *events = NULL;

        if (mso_mirror_stats(db, r->pool, &stats) != APR_SUCCESS) {
            stats = NULL;
        }
        outbox_stats_load(r, db);
        if (mso_attach_stats(db, r->pool, &astats) != APR_SUCCESS) {
            astats = NULL;
        }
        if (mso_events_list(db, r->pool, a->id, &events) != APR_SUCCESS) {
            events = NULL;
        }
        return msoauth_send_json(r, HTTP_OK, account_json(r, a, stats, astats, events));
    }
    title = apr_psprintf(r->pool, "%s: account %" APR_INT64_T_FMT " (%s)",
                         !strcmp(action, "test") ? "Test" : !strcmp(action, "sync")
                         ? "Sync now" : "Disconnect", a->id, a->mailbox);
    if (!strcmp(action, "sync")) {
        if (strcmp(a->state, "connected")) {
            json_t *j = account_state_json(a);
            json_object_set_new(j, "ok", json_false());
            return action_answer(r, base, form, HTTP_CONFLICT, j, title, NULL);
        }
        if (mso_mirror_sync_now(db, r->pool, a->id) != APR_SUCCESS) {
            return action_answer(r, base, form, HTTP_SERVICE_UNAVAILABLE,
                                 result_error("graph_error", "database write failed"), title,
                                 NULL);
        }
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r, MSOLOGNO(304) "sync of account %"
                      APR_INT64_T_FMT " (%s) requested by %s", a->id,
                      ap_escape_logitem(r->pool, a->mailbox),
                      r->user ? ap_escape_logitem(r->pool, r->user) : "anonymous");
        /* The job picks it up within a tick (about a second). */
        return action_answer(r, base, form, HTTP_ACCEPTED,
                             json_pack("{s:b, s:I, s:s}", "ok", 1, "account",
                                       (json_int_t)a->id, "sync", "scheduled"), title,
                             "A sync is scheduled: the background job starts it within a few "
                             "seconds.");
    }
    if (!strcmp(action, "test")) {
        if (strcmp(a->state, "connected")) {
            json_t *j = account_state_json(a);
            json_object_set_new(j, "ok", json_false());
            return action_answer(r, base, form, HTTP_OK, j, title, NULL);
        }
        return action_answer(r, base, form, HTTP_OK, graph_test(r, db, a), title,
                             "Microsoft Graph answered with the account's token.");
    }
    if (mso_account_disconnect(db, r->pool, a->id, apr_time_sec(apr_time_now()))
        != APR_SUCCESS) {
        return action_answer(r, base, form, HTTP_SERVICE_UNAVAILABLE,
                             result_error("graph_error", "database write failed"), title,
                             NULL);
    }
    ap_log_rerror(APLOG_MARK, APLOG_NOTICE, 0, r, MSOLOGNO(303) "account %" APR_INT64_T_FMT
                  " (%s) disconnected by %s", a->id, ap_escape_logitem(r->pool, a->mailbox),
                  r->user ? ap_escape_logitem(r->pool, r->user) : "anonymous");
    return action_answer(r, base, form, HTTP_OK,
                         json_pack("{s:b, s:I, s:s}", "ok", 1, "account", (json_int_t)a->id,
                                   "state", "disconnected"), title,
                         "The mailbox is disconnected: its tokens are deleted. Reconnect it "
                         "from the status page when it is needed again.");
}
