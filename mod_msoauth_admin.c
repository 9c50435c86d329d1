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
#include "mso_identity.h"
#include "mso_json.h"
#include "mso_reason.h"
#include "mso_refresh.h"
#include "mso_account.h"
#include "mso_db.h"
#include "mso_job_runs.h"
#include "mso_mirror.h"
#include "mso_outbox.h"

APLOG_USE_MODULE(msoauth);

#define MIN_VALIDITY 300                /* a token handed out lives 5 more minutes */
#define WAIT_FOR_OTHER apr_time_from_sec(15)
#define OUTLOOK_RESOURCE "https://outlook.office.com"

static int send_json(request_rec *r, int status, json_t *j)
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

static int json_error(request_rec *r, int status, const char *reason, const char *detail)
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
    return send_json(r, status, j);
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

/* The stored token when it lives MIN_VALIDITY more seconds, else a refresh
 * under the account's lease. When the job (or another node) holds the lease,
 * waits for its result instead of racing it. */
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
        return json_error(r, HTTP_BAD_REQUEST, "bad_request", why);
    }
    if (!parse_id(apr_table_get(args, "account"), &id)) {
        return json_error(r, HTTP_BAD_REQUEST, "bad_request", "account must be an account ID");
    }
    res = apr_table_get(args, "resource");
    if (!res || !strcmp(res, "graph")) {
        resource = "graph";
    }
    else if (!strcmp(res, "imap") || !strcmp(res, "smtp")) {
        resource = OUTLOOK_RESOURCE;
    }
    else {
        return json_error(r, HTTP_BAD_REQUEST, "bad_request", "resource must be graph, imap or "
                          "smtp");
    }
    if (!(db = msoauth_request_db(r))) {
        return json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database unavailable");
    }
    if (mso_account_get(db, r->pool, id, &a) != APR_SUCCESS) {
        return json_error(r, HTTP_NOT_FOUND, "not_found", "no such account");
    }
    if (!msoauth_account_company(r->server, a->company, a->client_id)) {
        return json_error(r, HTTP_NOT_FOUND, "not_configured", "the account's company is not "
                          "configured on this virtual host");
    }
    if (strcmp(a->state, "connected")) {
        return send_json(r, HTTP_CONFLICT, account_state_json(a));
    }
    msoauth_account_token(r, db, a, resource, &f);
    if (!f.token) {
        if (mso_account_get(db, r->pool, id, &a) == APR_SUCCESS
            && strcmp(a->state, "connected")) {
            return send_json(r, HTTP_CONFLICT, account_state_json(a));
        }
        ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(301) "token for account %"
                      APR_INT64_T_FMT " not available: %s%s%s", id, f.reason,
                      f.aadsts ? apr_psprintf(r->pool, " AADSTS%ld", f.aadsts) : "",
                      f.detail ? apr_pstrcat(r->pool, " (", f.detail, ")", NULL) : "");
        return json_error(r, !strcmp(f.reason, "not_configured") ? HTTP_NOT_FOUND
                          : HTTP_SERVICE_UNAVAILABLE, f.reason, f.detail);
    }
    j = json_pack("{s:s, s:s, s:I, s:s, s:s, s:s}", "access_token", f.token,
                  "token_type", "Bearer", "expires_at", (json_int_t)f.expires_at,
                  "scope", f.scope ? f.scope : "", "mailbox", a->mailbox,
                  "xoauth2", xoauth2(r, a->mailbox, f.token));
    return send_json(r, HTTP_OK, j);
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
                                        "admin_consent_required", "not_configured", NULL};
    int i;

    for (i = 0; reason && admin[i]; i++) {
        if (!strcmp(reason, admin[i])) {
            return 1;
        }
    }
    return 0;
}

static json_t *companies_json(request_rec *r, msoauth_srv_conf_t *sc, apr_hash_t *flags)
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
        const mso_reason_t *rs = mso_reason_get(flag);

        /* Flagged once for the company, not per mailbox: one fix mends them all. */
        json_object_set_new(o, "problem", flag ? json_string(flag) : json_null());
        if (rs) {
            json_object_set_new(o, "problem_fix", json_string(rs->fix));
        }
        if (c->set.secret_expires.value) {
            long days = mso_days_until(c->set.secret_expires.value, now);
            json_object_set_new(o, "secret_expires", json_string(c->set.secret_expires.text));
            json_object_set_new(o, "secret_days_left", json_integer(days));
            json_object_set_new(o, "secret_warning", days < 0 ? json_string("expired")
                                : days < MSOAUTH_SECRET_WARN_DAYS ? json_string("expires soon")
                                : json_null());
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

static json_t *account_json(request_rec *r, mso_account_t *a, apr_hash_t *stats)
{
    json_t *o = account_state_json(a);

    json_object_set_new(o, "id", json_integer(a->id));
    json_object_del(o, "account");
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
    outbox_json(r, o, a->id, apr_time_sec(apr_time_now()));
    return o;
}

/* The one status model: JSON as is, and the HTML page is rendered from it.
 * NULL when the database cannot be read. */
static json_t *status_model(request_rec *r, msoauth_srv_conf_t *sc, mso_db_t *db)
{
    apr_array_header_t *accounts = NULL, *runs = NULL;
    apr_hash_t *flags = apr_hash_make(r->pool), *stats = NULL;
    json_t *accs = json_array(), *nodes = json_array(), *m;
    apr_int64_t now = apr_time_sec(apr_time_now());
    int i, due = 0, overdue = 0;

    outbox_stats_load(r, db);
    if (mso_mirror_stats(db, r->pool, &stats) != APR_SUCCESS
        || mso_account_list(db, r->pool, &accounts) != APR_SUCCESS
        || mso_job_runs_list(db, r->pool, &runs) != APR_SUCCESS) {
        json_decref(accs);
        json_decref(nodes);
        return NULL;
    }
    {
        for (i = 0; i < accounts->nelts; i++) {
            mso_account_t *a = APR_ARRAY_IDX(accounts, i, mso_account_t *);
            if (!msoauth_account_company(r->server, a->company, a->client_id)) {
                continue;       /* another virtual host's */
            }
            if (!strcmp(a->state, "connected") && a->refresh_due_at <= now) {
                due++;
                overdue += a->refresh_due_at + 300 < now;
            }
            if (is_admin_reason(a->reason)) {
                apr_hash_set(flags, a->company, APR_HASH_KEY_STRING, a->reason);
            }
            json_array_append_new(accs, account_json(r, a, stats));
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
    m = json_pack("{s:o, s:o, s:{s:i, s:i, s:o}, s:I}", "companies",
                  companies_json(r, sc, flags), "accounts", accs, "job", "refresh_due", due,
                  "refresh_overdue", overdue, "nodes", nodes, "now", (json_int_t)now);
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

static int status_page(request_rec *r, json_t *m)
{
    size_t i;
    json_t *c, *a;

    apr_table_setn(r->err_headers_out, "Cache-Control", "no-store");
    apr_table_setn(r->err_headers_out, "Content-Security-Policy",
                   "default-src 'none'; style-src 'unsafe-inline'");
    ap_set_content_type(r, "text/html; charset=utf-8");
    ap_rputs("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             "<title>mod_msoauth status</title><style>body{font-family:sans-serif;margin:2em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;"
             "text-align:left;vertical-align:top}.bad{color:#a00}</style></head><body>\n"
             "<h1>mod_msoauth status</h1>\n<h2>Companies</h2>\n<table><tr><th>Company</th>"
             "<th>Client ID</th><th>Secret</th><th>Tenant</th><th>Edition</th>"
             "<th>Redirect URI to register</th><th>Problem</th></tr>\n", r);
    json_array_foreach(mso_json_arr(m, "companies"), i, c) {
        const char *exp = mso_json_str(c, "secret_expires");
        const char *warn = mso_json_str(c, "secret_warning");
        apr_int64_t left = 0;

        mso_json_int(c, "secret_days_left", &left);
        ap_rprintf(r, "<tr><td>%s</td><td>%s</td><td%s>%s%s</td><td>%s</td><td>%s</td>"
                   "<td><code>%s</code></td><td class=bad>%s%s%s</td></tr>\n",
                   esc(r, mso_json_str(c, "name")),
                   esc(r, mso_json_str(c, "client_id")), warn ? " class=bad" : "",
                   json_is_true(json_object_get(c, "secret_set")) ? "set" : "missing",
                   exp ? apr_psprintf(r->pool, ", expires %s (%" APR_INT64_T_FMT " days)",
                                      esc(r, exp), left) : "",
                   esc(r, mso_json_str(c, "tenant")), esc(r, mso_json_str(c, "edition")),
                   esc(r, mso_json_str(c, "redirect_uri")), esc(r, mso_json_str(c, "problem")),
                   mso_json_str(c, "problem_fix") ? ": " : "",
                   esc(r, mso_json_str(c, "problem_fix")));
    }
    ap_rputs("</table>\n<h2>Accounts</h2>\n<table><tr><th>ID</th><th>Company</th>"
             "<th>Mailbox</th><th>State</th><th>Token expires</th><th>Last refresh</th>"
             "<th>Last sync</th><th>Messages</th><th>Sync</th><th>Write-back queue</th>"
             "<th>Outbox</th><th>Last error and fix</th></tr>\n", r);
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
        ap_rprintf(r, "<tr><td>%" APR_INT64_T_FMT "</td><td>%s</td><td>%s</td><td%s>%s</td>"
                   "<td>%s</td><td>%s</td><td>%s</td><td>%" APR_INT64_T_FMT "</td>"
                   "<td%s>%s%s%s</td><td%s>%" APR_INT64_T_FMT " queued%s, %" APR_INT64_T_FMT
                   " failed</td>%s<td>%s%s%s</td></tr>\n", id,
                   esc(r, mso_json_str(a, "company")), esc(r, mso_json_str(a, "mailbox")),
                   strcmp(mso_json_str(a, "state"), "connected") ? " class=bad" : "",
                   esc(r, mso_json_str(a, "state")), when(r, exp), when(r, ref), when(r, sync),
                   msgs, serr ? " class=bad" : "", esc(r, mso_json_str(sy, "phase")),
                   serr ? ": " : "", esc(r, serr), failed ? " class=bad" : "", queued,
                   queued ? apr_psprintf(r->pool, " (oldest %" APR_INT64_T_FMT " s)", age) : "",
                   failed, outbox_cell(r, ob), esc(r, err), err && fix ? "<br>Fix: " : "",
                   err && fix ? esc(r, fix) : "");
    }
    {
        apr_int64_t due = 0, overdue = 0;
        const json_t *job = mso_json_obj(m, "job");
        mso_json_int(job, "refresh_due", &due);
        mso_json_int(job, "refresh_overdue", &overdue);
        size_t k;
        json_t *n;

        ap_rprintf(r, "</table>\n<h2>Background job</h2>\n<p>Accounts due for a refresh: %"
                   APR_INT64_T_FMT "; overdue by more than 5 minutes: <span%s>%"
                   APR_INT64_T_FMT "</span>.</p>\n<table><tr><th>Node</th><th>Last cycle</th>"
                   "<th>Duration</th><th>Claimed</th><th>Refreshed</th><th>Failed</th></tr>\n",
                   due, overdue ? " class=bad" : "", overdue);
        json_array_foreach(mso_json_arr(job, "nodes"), k, n) {
            apr_int64_t at = 0, ms = 0, cl = 0, rf = 0, fl = 0;
            mso_json_int(n, "last_cycle_at", &at);
            mso_json_int(n, "cycle_ms", &ms);
            mso_json_int(n, "claimed", &cl);
            mso_json_int(n, "refreshed", &rf);
            mso_json_int(n, "failed", &fl);
            ap_rprintf(r, "<tr><td>%s</td><td>%s</td><td>%" APR_INT64_T_FMT " ms</td><td>%"
                       APR_INT64_T_FMT "</td><td>%" APR_INT64_T_FMT "</td><td>%"
                       APR_INT64_T_FMT "</td></tr>\n", esc(r, mso_json_str(n, "node")),
                       when(r, at), ms, cl, rf, fl);
        }
        ap_rputs("</table>\n</body></html>\n", r);
    }
    json_decref(m);
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

static int graph_test(request_rec *r, mso_db_t *db, mso_account_t *a)
{
    msoauth_company_t *c = msoauth_account_company(r->server, a->company, a->client_id);
    mso_http_response_t *resp = NULL;
    apr_array_header_t *h = apr_array_make(r->pool, 2, sizeof(const char *));
    mso_http_opts_t o;
    msoauth_token_t f;
    const char *url;
    apr_status_t rv;
    json_t *j;

    msoauth_account_token(r, db, a, "graph", &f);
    if (!f.token) {
        return json_error(r, HTTP_OK, f.reason, f.detail);
    }
    mso_http_opts_default(&o);
    o.timeout_ms = 30000;
    url = apr_pstrcat(r->pool, c->set.graph_url.value, "/v1.0/me/mailFolders/inbox"
                      "?$select=id,totalItemCount,unreadItemCount", NULL);
    APR_ARRAY_PUSH(h, const char *) = apr_pstrcat(r->pool, "Authorization: Bearer ", f.token,
                                                  NULL);
    APR_ARRAY_PUSH(h, const char *) = "Accept: application/json";
    rv = mso_http_request(r->pool, &o, "GET", url, h, NULL, 0, &resp);
    if (rv != APR_SUCCESS) {
        return json_error(r, HTTP_OK, "graph_error", resp && resp->error ? resp->error
                          : "Graph could not be reached");
    }
    if (resp->status == 429 || resp->status == 503) {
        return json_error(r, HTTP_OK, "throttled", apr_psprintf(r->pool, "Graph answered %d",
                                                                  resp->status));
    }
    if (resp->status == 403) {
        return json_error(r, HTTP_OK, "consent_required", "Graph refused access to the inbox "
                          "(403): the mailbox may lack a licence or the app Mail.Read");
    }
    if (resp->status != 200) {
        return json_error(r, HTTP_OK, "graph_error", apr_psprintf(r->pool, "Graph answered "
                                                                    "HTTP %d", resp->status));
    }
    j = mso_json_parse(r->pool, resp->body, resp->body_len, NULL);
    {
        apr_int64_t total = 0, unread = 0;
        mso_json_int(j, "totalItemCount", &total);
        mso_json_int(j, "unreadItemCount", &unread);
        return send_json(r, HTTP_OK, json_pack("{s:b, s:I, s:s, s:I, s:I}", "ok", 1, "account",
                                               (json_int_t)a->id, "mailbox", a->mailbox,
                                               "inbox_total", (json_int_t)total,
                                               "inbox_unread", (json_int_t)unread));
    }
}

int msoauth_admin_handler(request_rec *r)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(r->server);
    const char *tail = admin_tail(r);
    mso_db_t *db;
    mso_account_t *a;
    apr_int64_t id = 0;
    char *rest, *id_part, *action = NULL, *last;
    int rc, page = !*tail && r->method_number == M_GET && !wants_json(r);

    /* The HTML page is for a browser behind Require; everything a program
     * uses (JSON, actions) needs the API key when one is configured. */
    if ((rc = msoauth_guard(r, page ? MSOAUTH_GUARD_KEY_OPTIONAL : MSOAUTH_GUARD_KEY_REQUIRED,
                            NULL)) != DECLINED) {
        return rc;
    }
    if (*tail && strcmp(tail, "accounts")) {
        if (strncmp(tail, "accounts/", 9)) {
            return json_error(r, HTTP_NOT_FOUND, "not_found", "unknown admin path: use /, "
                              "/accounts, /accounts/ID or /accounts/ID/test|sync|disconnect");
        }
        rest = apr_pstrdup(r->pool, tail + 9);
        id_part = apr_strtok(rest, "/", &last);
        action = apr_strtok(NULL, "/", &last);
        if (!parse_id(id_part, &id) || apr_strtok(NULL, "/", &last)
            || (action && strcmp(action, "test") && strcmp(action, "sync")
                && strcmp(action, "disconnect"))) {
            return json_error(r, HTTP_NOT_FOUND, "not_found", "unknown admin path: use /, "
                              "/accounts, /accounts/ID or /accounts/ID/test|sync|disconnect");
        }
    }
    if (action) {
        if (r->method_number != M_POST) {
            r->allowed = AP_METHOD_BIT << M_POST;
            return HTTP_METHOD_NOT_ALLOWED;
        }
        if (!same_origin(r, sc)) {
            ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(302) "refused a "
                          "cross-origin admin POST");
            return json_error(r, HTTP_FORBIDDEN, "forbidden", "cross-origin POST refused");
        }
    }
    else if (r->method_number != M_GET) {
        r->allowed = AP_METHOD_BIT << M_GET;
        return HTTP_METHOD_NOT_ALLOWED;
    }
    db = msoauth_request_db(r);
    if (!*tail || !strcmp(tail, "accounts")) {
        json_t *m = db ? status_model(r, sc, db) : NULL;

        if (!m) {
            /* Never an empty list that looks like "no accounts". */
            return json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "the database is "
                              "unavailable: see the error log (DBDriver/DBDParams)");
        }
        if (!strcmp(tail, "accounts")) {
            json_t *accs = json_incref(json_object_get(m, "accounts"));
            json_decref(m);
            return send_json(r, HTTP_OK, accs);
        }
        return wants_json(r) ? send_json(r, HTTP_OK, m) : status_page(r, m);
    }
    if (!db) {
        return json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database unavailable");
    }
    if (mso_account_get(db, r->pool, id, &a) != APR_SUCCESS
        || !msoauth_account_company(r->server, a->company, a->client_id)) {
        return json_error(r, HTTP_NOT_FOUND, "not_found", "no such account");
    }
    if (!action) {
        apr_hash_t *stats = NULL;

        if (mso_mirror_stats(db, r->pool, &stats) != APR_SUCCESS) {
            stats = NULL;
        }
        outbox_stats_load(r, db);
        return send_json(r, HTTP_OK, account_json(r, a, stats));
    }
    if (!strcmp(action, "sync")) {
        if (strcmp(a->state, "connected")) {
            json_t *j = account_state_json(a);
            json_object_set_new(j, "ok", json_false());
            return send_json(r, HTTP_CONFLICT, j);
        }
        if (mso_mirror_sync_now(db, r->pool, a->id) != APR_SUCCESS) {
            return json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database write "
                              "failed");
        }
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r, MSOLOGNO(304) "sync of account %"
                      APR_INT64_T_FMT " (%s) requested by %s", a->id,
                      ap_escape_logitem(r->pool, a->mailbox),
                      r->user ? ap_escape_logitem(r->pool, r->user) : "anonymous");
        /* The job picks it up within a tick (about a second). */
        return send_json(r, HTTP_ACCEPTED, json_pack("{s:b, s:I, s:s}", "ok", 1, "account",
                                                     (json_int_t)a->id, "sync", "scheduled"));
    }
    if (!strcmp(action, "test")) {
        if (strcmp(a->state, "connected")) {
            json_t *j = account_state_json(a);
            json_object_set_new(j, "ok", json_false());
            return send_json(r, HTTP_OK, j);
        }
        return graph_test(r, db, a);
    }
    if (mso_account_disconnect(db, r->pool, a->id, apr_time_sec(apr_time_now()))
        != APR_SUCCESS) {
        return json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database write failed");
    }
    ap_log_rerror(APLOG_MARK, APLOG_NOTICE, 0, r, MSOLOGNO(303) "account %" APR_INT64_T_FMT
                  " (%s) disconnected by %s", a->id, ap_escape_logitem(r->pool, a->mailbox),
                  r->user ? ap_escape_logitem(r->pool, r->user) : "anonymous");
    return send_json(r, HTTP_OK, json_pack("{s:b, s:I, s:s}", "ok", 1, "account",
                                           (json_int_t)a->id, "state", "disconnected"));
}
