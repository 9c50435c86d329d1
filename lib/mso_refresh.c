/* Keeping an account's tokens alive: one refresh of one account, the
 * classification of Microsoft's answer (the token endpoint's errors), and the
 * schedule (next refresh, backoff).
 *
 * Choices the header leaves open:
 *  - mso_refresh_account returns APR_SUCCESS whenever out describes the
 *    outcome (every result, failures included) and APR_EINVAL, with
 *    out->result MSO_REFRESH_FAILED and nothing touched, when an argument is
 *    missing.
 *  - Scopes: mso_token_scopes(signin_scopes, graph_resource, resource), i.e.
 *    the OIDC scopes (offline_access included, so Microsoft keeps rotating
 *    the refresh token) plus the company's sign-in scopes of that one
 *    resource. For a resource URL (https://outlook.office.com) the company's
 *    sign-in scopes must carry that resource's scopes (e.g.
 *    https://outlook.office.com/IMAP.AccessAsUser.All, added with the
 *    company's extra scopes); if they carry none the refresh is not attempted
 *    (MSO_REFRESH_FAILED, reason bad_request, lease released, nothing
 *    recorded on the account: it is the configuration that is wrong).
 *  - Any resource other than "graph" caches its token under kind "outlook".
 *  - A refresh token that cannot be opened (its key left the key ring) is
 *    MSO_REFRESH_FAILED for the caller and puts the account in
 *    reconnect_required: only a new sign-in (or the old key) makes it work.
 *  - mso_refresh_account and mso_refresh_batch share refresh_prepare (before
 *    Microsoft is asked) and refresh_finish (its answer classified and
 *    recorded); only the token call differs (blocking, or over a multi
 *    handle), so one account's outcome does not depend on the path. */
#include <string.h>

#include <apr_strings.h>
#include <apr_tables.h>

#include "mso_identity.h"
#include "mso_log.h"
#include "mso_refresh.h"

#define BACKOFF_FIRST 30            /* seconds after the first failure */
#define BACKOFF_CAP 3600
#define RETRY_AFTER_CAP 86400       /* a Retry-After beyond a day is not believed */
#define NEXT_DUE_MIN 5            /* seconds: the soonest a next refresh is scheduled */
#define UNKNOWN_RUNS_MAX 10         /* unknown failures in a row before reconnect_required */

#define OIDC_WORDS "openid profile email offline_access"

/* A uniform random value in [0, n]; the middle when the RNG fails. */
static apr_int64_t random_upto(apr_int64_t n)
{
    unsigned char b[8];
    apr_uint64_t v = 0;
    int i;

    if (n <= 0) {
        return 0;
    }
    if (mso_random_bytes(b, sizeof(b)) != APR_SUCCESS) {
        return n / 2;
    }
    for (i = 0; i < 8; i++) {
        v = (v << 8) | b[i];
    }
    return (apr_int64_t)(v % ((apr_uint64_t)n + 1));
}

apr_int64_t mso_refresh_next_due(const mso_refresh_ctx_t *ctx, apr_int64_t now,
                                 apr_int64_t access_expires_at)
{
    apr_int64_t remaining = access_expires_at - now, due, margin;

    if (remaining < 0) {
        remaining = 0;
    }
    /* The margin shrinks to a quarter of the token's life for short-lived
     * tokens, so they are still refreshed before they expire. */
    margin = ctx->margin > 0 ? ctx->margin : 0;
    if (margin > remaining / 4) {
        margin = remaining / 4;
    }
    due = access_expires_at - margin - random_upto(remaining / 10);
    /* Never a tight loop, whatever the token's life. */
    if (due < now + NEXT_DUE_MIN) {
        due = now + NEXT_DUE_MIN;
    }
    /* Idle or long-lived, the refresh token is still used this often, so
     * Microsoft's 90-day inactivity limit never runs out. */
    if (ctx->keepalive > 0 && due > now + ctx->keepalive) {
        due = now + ctx->keepalive;
    }
    return due;
}

/* 30 s doubling per failure up to 1 h, then +-50% jitter, the result again
 * capped at 1 h; a Retry-After (up to a day) is a lower bound. */
apr_int64_t mso_refresh_backoff(int error_runs, long retry_after, apr_int64_t now)
{
    apr_int64_t base = BACKOFF_FIRST, delay;
    int i;

    for (i = 0; i < error_runs && base < BACKOFF_CAP; i++) {
        base *= 2;
    }
    if (base > BACKOFF_CAP) {
        base = BACKOFF_CAP;
    }
    delay = base / 2 + random_upto(base);
    if (delay > BACKOFF_CAP) {
        delay = BACKOFF_CAP;
    }
    if (retry_after > 0) {
        apr_int64_t ra = retry_after > RETRY_AFTER_CAP ? RETRY_AFTER_CAP : retry_after;

        if (delay < ra) {
            delay = ra;
        }
    }
    return now + delay;
}

/* ------------------------------------------------------------------------- */

static int reason_in(const char *reason, const char *const *list)
{
    for (; reason && *list; list++) {
        if (!strcmp(reason, *list)) {
            return 1;
        }
    }
    return 0;
}

static const char *const admin_reasons[] = {
    "invalid_client_secret", "client_secret_expired", "app_not_found", "wrong_tenant",
    "redirect_uri_mismatch", "admin_consent_required", "certificate_invalid",
    "certificate_expired", NULL
};
static const char *const transient_reasons[] = {
    "token_endpoint_unreachable", "throttled", NULL
};

/* What the administrator fixes for a configuration failure. */
static const char *admin_fix(const char *reason)
{
    if (!strcmp(reason, "invalid_client_secret")) {
        return "the company's client secret is wrong (configure the secret's Value, not its "
               "ID)";
    }
    if (!strcmp(reason, "client_secret_expired")) {
        return "the company's client secret has expired: create a new one in the app "
               "registration and deploy it";
    }
    if (!strcmp(reason, "certificate_invalid")) {
        return "Microsoft refused the company's certificate credential: upload the "
               "certificate to the app registration (Certificates & secrets) and check "
               "MSOAuthClientCertificateFile";
    }
    if (!strcmp(reason, "certificate_expired")) {
        return "the company's certificate has expired: make and upload a new one";
    }
    if (!strcmp(reason, "app_not_found")) {
        return "Microsoft does not know the company's client ID in this tenant or cloud";
    }
    if (!strcmp(reason, "wrong_tenant")) {
        return "the mailbox's tenant cannot use the company's app (single-tenant app, wrong "
               "authority or cloud)";
    }
    if (!strcmp(reason, "redirect_uri_mismatch")) {
        return "the app registration does not match the configuration (redirect URI)";
    }
    return "an administrator of the mailbox's tenant must grant consent to the app";
}

/* Microsoft's answer in a few words, for last_error and the log. */
static const char *answer_of(apr_pool_t *p, const mso_token_result_t *tok)
{
    if (tok->error && *tok->error) {
        return apr_psprintf(p, "%s%s (HTTP %d)", tok->error,
                            tok->aadsts ? apr_psprintf(p, " AADSTS%ld", tok->aadsts) : "",
                            tok->http_status);
    }
    return tok->detail ? tok->detail : "no usable answer";
}

static const char *ids_of(apr_pool_t *p, const mso_token_result_t *tok)
{
    if (!tok || (!tok->trace_id && !tok->correlation_id)) {
        return "";
    }
    return apr_psprintf(p, " [trace ID %s, correlation ID %s]",
                        tok->trace_id ? tok->trace_id : "-",
                        tok->correlation_id ? tok->correlation_id : "-");
}

static void log_outcome(mso_log_level_e level, const mso_account_t *acct, const char *kind,
                        const mso_refresh_outcome_t *out, const char *ids, const char *then)
{
    char code[32] = "";

    if (out->aadsts) {
        apr_snprintf(code, sizeof(code), ", AADSTS%ld", out->aadsts);
    }
    mso_log_perror(MSO_LOG_MARK, level, APR_SUCCESS,
                   "mod_msoauth: refreshing the %s token of account %" APR_INT64_T_FMT
                   " (%s, company %s) failed: %s (reason %s%s)%s; %s", kind,
                   acct->id, acct->mailbox ? acct->mailbox : "?",
                   acct->company ? acct->company : "?", out->detail ? out->detail : "error",
                   out->reason ? out->reason : "none", code, ids, then);
}

/* Records a failed refresh on the account (which releases the lease). */
static void record_failure(mso_db_t *db, apr_pool_t *p, const mso_refresh_ctx_t *ctx,
                           const mso_account_t *acct, const mso_refresh_outcome_t *out,
                           const char *state, const char *last_error, apr_int64_t retry_at,
                           apr_int64_t now)
{
    apr_status_t rv = mso_account_refresh_failed(db, p, acct->id, ctx->owner, state,
                                                 out->reason, out->aadsts, last_error,
                                                 retry_at, now);

    if (rv == APR_EBUSY) {
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_NOTICE, rv, "mod_msoauth: the failed refresh of "
                       "account %" APR_INT64_T_FMT " (%s) was not recorded: this process no "
                       "longer holds the account's lease (another process holds it now, or "
                       "the mailbox was disconnected)", acct->id,
                       acct->mailbox ? acct->mailbox : "?");
    }
    else if (rv != APR_SUCCESS) {
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_ERR, rv, "mod_msoauth: the failed refresh of "
                       "account %" APR_INT64_T_FMT " (%s) could not be recorded in the "
                       "database; its lease runs out by itself", acct->id,
                       acct->mailbox ? acct->mailbox : "?");
    }
}

/* Our side failed before Microsoft was asked, or after: the lease goes back. */
static apr_status_t fail_ours(mso_db_t *db, apr_pool_t *p, const mso_refresh_ctx_t *ctx,
                              const mso_account_t *acct, const char *kind,
                              mso_refresh_outcome_t *out, const char *reason, const char *detail)
{
    out->result = MSO_REFRESH_FAILED;
    out->reason = reason;
    out->detail = detail;
    log_outcome(MSO_LOG_ERR, acct, kind, out, "", "the account is left as it was");
    mso_account_release(db, p, acct->id, ctx->owner);
    return APR_SUCCESS;
}

/* True when scopes holds a scope beyond the OIDC ones. */
static int has_resource_scope(apr_pool_t *p, const char *scopes)
{
    char *copy = apr_pstrdup(p, scopes), *last, *word;

    for (word = apr_strtok(copy, " ", &last); word; word = apr_strtok(NULL, " ", &last)) {
        if (strchr(word, '/') || !strstr(OIDC_WORDS, word)) {
            return 1;
        }
    }
    return 0;
}

/* One account's refresh between prepare and finish. */
typedef struct {
    mso_db_t *db;
    apr_pool_t *p;
    const mso_refresh_ctx_t *ctx;
    const mso_account_t *acct;
    apr_int64_t now;
    mso_refresh_outcome_t *out;
    const char *kind;
    const char *scopes;
    mso_app_t app;
    unsigned char *plain;           /* the refresh token: wiped once sent */
    apr_size_t plain_len;
    char *form;                     /* the batch's request body (holds secrets) */
} refresh_t;

static void wipe(void *s, apr_size_t n)
{
    volatile unsigned char *v = s;

    while (v && n--) {
        *v++ = 0;
    }
}

/* Everything before Microsoft is asked. APR_INCOMPLETE: ready for the token
 * call (the refresh token is open in r->plain); APR_SUCCESS: the outcome is
 * final and recorded (missing token, key gone, no scopes); APR_EINVAL: an
 * argument is missing, nothing touched. */
static apr_status_t refresh_prepare(mso_db_t *db, apr_pool_t *p, const mso_refresh_ctx_t *ctx,
                                    const mso_account_t *acct, const char *resource,
                                    apr_int64_t now, mso_refresh_outcome_t *out, refresh_t *r)
{
    const char *plain = NULL;
    apr_status_t rv;

    memset(out, 0, sizeof(*out));
    memset(r, 0, sizeof(*r));
    out->result = MSO_REFRESH_FAILED;
    out->retry_after = -1;
    if (!db || !ctx || !ctx->keyring || !ctx->owner || !ctx->client_id || !ctx->graph_resource
        || !ctx->signin_scopes || !ctx->authority || !acct || !acct->company || !acct->mailbox
        || !resource
        || !*resource) {
        out->detail = "the refresh was called without its account, resource or settings";
        return APR_EINVAL;
    }
    r->db = db;
    r->p = p;
    r->ctx = ctx;
    r->acct = acct;
    r->now = now;
    r->out = out;
    r->kind = strcmp(resource, "graph") ? "outlook" : "graph";

    r->scopes = mso_token_scopes(p, ctx->signin_scopes, ctx->graph_resource, resource);
    if (!has_resource_scope(p, r->scopes)) {
        return fail_ours(db, p, ctx, acct, r->kind, out, "bad_request",
                         apr_psprintf(p, "the company's sign-in scopes include none for %s; "
                                      "add that resource's scopes (e.g. %s/IMAP.AccessAsUser.All) "
                                      "to the company's scopes and have the mailbox reconnected",
                                      resource, resource));
    }

    /* The refresh token, sealed for this very account. */
    rv = mso_account_token_open(db, p, ctx->keyring, acct, "refresh", &plain, NULL);
    if (rv == APR_NOTFOUND) {
        out->result = MSO_REFRESH_RECONNECT;
        out->reason = "reconnect_required";
        out->detail = "no refresh token is stored for the mailbox";
        log_outcome(MSO_LOG_WARNING, acct, r->kind, out, "",
                    "the mailbox must be connected again");
        record_failure(db, p, ctx, acct, out, "reconnect_required",
                       "no refresh token is stored for the mailbox: connect it again", 0, now);
        return APR_SUCCESS;
    }
    if (rv == MSO_ACCOUNT_UNBOUND) {
        out->result = MSO_REFRESH_FAILED;
        out->reason = "reconnect_required";
        out->detail = "the stored refresh token is still bound to the company and mailbox (as "
                      "before schema version 4) and was not sealed again for the account at "
                      "start-up: its company had no client ID, or the token did not open with "
                      "the keys in MSOAuthTokenKeyFile";
        log_outcome(MSO_LOG_ERR, acct, r->kind, out, "", "the mailbox is marked "
                    "reconnect_required and must be connected again");
        record_failure(db, p, ctx, acct, out, "reconnect_required",
                       "the stored refresh token was not bound to the account (it is from "
                       "before the upgrade and could not be sealed again): the mailbox must be "
                       "connected again", 0, now);
        return APR_SUCCESS;
    }
    if (rv != APR_SUCCESS && rv != APR_EINVAL) {
        return fail_ours(db, p, ctx, acct, r->kind, out, NULL,
                         "the refresh token could not be read from the database");
    }
    if (rv != APR_SUCCESS) {
        out->result = MSO_REFRESH_FAILED;
        out->reason = "reconnect_required";
        out->detail = "the stored refresh token cannot be opened: the key that sealed it is "
                      "not in the key ring (was a key removed from MSOAuthTokenKeyFile?), or "
                      "the stored value was altered or copied from another account";
        log_outcome(MSO_LOG_ERR, acct, r->kind, out, "", "the mailbox is marked "
                    "reconnect_required and must be connected again (if many mailboxes show "
                    "this, add the removed key back to MSOAuthTokenKeyFile as a second key)");
        record_failure(db, p, ctx, acct, out, "reconnect_required",
                       "the stored refresh token cannot be opened with the keys in "
                       "MSOAuthTokenKeyFile (the key that sealed it was removed from the key "
                       "ring): the mailbox must be connected again", 0, now);
        return APR_SUCCESS;
    }

    r->plain = (unsigned char *)plain;
    r->plain_len = strlen(plain);

    /* The configured authority, as at sign-in; never a value from the
     * database, which whoever can write it would point at their own host. */
    r->app.authority = ctx->authority;
    r->app.client_id = ctx->client_id;
    r->app.client_secret = ctx->client_secret;
    r->app.cert = ctx->cert;
    return APR_INCOMPLETE;
}

/* Everything after Microsoft answered (tok NULL: no answer): the
 * classification and the database writes. */
static apr_status_t refresh_finish(refresh_t *rf, mso_token_result_t *tok)
{
    mso_db_t *db = rf->db;
    apr_pool_t *p = rf->p;
    const mso_refresh_ctx_t *ctx = rf->ctx;
    const mso_account_t *acct = rf->acct;
    mso_refresh_outcome_t *out = rf->out;
    const char *kind = rf->kind;
    apr_int64_t now = rf->now;
    mso_refreshed_t r;
    const char *err = NULL, *last_error, *ids;
    const char *sealed_refresh = NULL, *sealed_access = NULL;
    apr_int64_t expires;
    apr_status_t rv;

    if (!tok) {
        mso_token_result_t *t = apr_pcalloc(p, sizeof(*t));

        t->reason = "token_endpoint_unreachable";
        t->detail = "the token request could not be made";
        t->retry_after = -1;
        tok = t;
    }

    if (!tok->ok) {
        const char *answer = answer_of(p, tok);
        apr_int64_t retry_at;

        out->reason = tok->reason ? tok->reason : "bad_request";
        out->aadsts = tok->aadsts;
        out->retry_after = tok->retry_after;
        out->detail = tok->detail ? tok->detail : answer;
        ids = ids_of(p, tok);

        if (!strcmp(out->reason, "reconnect_required")) {
            out->result = MSO_REFRESH_RECONNECT;
            last_error = apr_psprintf(p, "Microsoft refused the refresh token (%s): the grant "
                                      "expired or was revoked, or the sign-in needs a new "
                                      "interactive step; the mailbox must be connected again",
                                      answer);
            log_outcome(MSO_LOG_WARNING, acct, kind, out, ids,
                        "the mailbox must be connected again");
            record_failure(db, p, ctx, acct, out, "reconnect_required", last_error, 0, now);
        }
        else if (reason_in(out->reason, admin_reasons)) {
            /* The configuration, not the mailbox: it stays connected, and the
             * backoff keeps the job from hammering Microsoft meanwhile. */
            out->result = MSO_REFRESH_ADMIN;
            retry_at = mso_refresh_backoff(acct->error_runs, tok->retry_after, now);
            last_error = apr_psprintf(p, "Microsoft refused the company's app (%s): %s; the "
                                      "mailbox stays connected and the refresh is retried",
                                      answer, admin_fix(out->reason));
            log_outcome(MSO_LOG_ERR, acct, kind, out, ids,
                        apr_psprintf(p, "%s; retrying in %" APR_INT64_T_FMT " s",
                                     admin_fix(out->reason), retry_at - now));
            record_failure(db, p, ctx, acct, out, "connected", last_error, retry_at, now);
        }
        else if (reason_in(out->reason, transient_reasons)) {
            out->result = MSO_REFRESH_TRANSIENT;
            retry_at = mso_refresh_backoff(acct->error_runs, tok->retry_after, now);
            last_error = apr_psprintf(p, "Microsoft's token endpoint could not be used (%s); "
                                      "the refresh is retried", answer);
            log_outcome(MSO_LOG_WARNING, acct, kind, out, ids,
                        apr_psprintf(p, "retrying in %" APR_INT64_T_FMT " s", retry_at - now));
            record_failure(db, p, ctx, acct, out, "connected", last_error, retry_at, now);
        }
        else if (acct->error_runs + 1 >= UNKNOWN_RUNS_MAX) {
            /* An answer we do not understand, again and again: a person has
             * to look at it and connect the mailbox again. */
            out->result = MSO_REFRESH_RECONNECT;
            out->detail = apr_psprintf(p, "%s (reason %s), after %d failed refreshes in a row",
                                       out->detail, out->reason, acct->error_runs + 1);
            out->reason = "reconnect_required";
            last_error = apr_psprintf(p, "Microsoft refused the refresh %d times in a row "
                                      "(last: %s, %s); the mailbox must be connected again",
                                      acct->error_runs + 1, answer, tok->reason
                                      ? tok->reason : "bad_request");
            log_outcome(MSO_LOG_ERR, acct, kind, out, ids,
                        "the mailbox is marked reconnect_required");
            record_failure(db, p, ctx, acct, out, "reconnect_required", last_error, 0, now);
        }
        else {
            /* Unknown (bad_request and the like): our request or Microsoft
             * changed; loud in the log, retried with backoff for now. */
            out->result = MSO_REFRESH_TRANSIENT;
            retry_at = mso_refresh_backoff(acct->error_runs, tok->retry_after, now);
            last_error = apr_psprintf(p, "Microsoft refused the refresh (%s, %s); it is "
                                      "retried, and after %d failures in a row the mailbox "
                                      "must be connected again", answer, out->reason,
                                      UNKNOWN_RUNS_MAX);
            log_outcome(MSO_LOG_ERR, acct, kind, out, ids,
                        apr_psprintf(p, "unexpected answer, retrying in %" APR_INT64_T_FMT
                                     " s (failure %d of %d before reconnect_required)",
                                     retry_at - now, acct->error_runs + 1, UNKNOWN_RUNS_MAX));
            record_failure(db, p, ctx, acct, out, "connected", last_error, retry_at, now);
        }
        return APR_SUCCESS;
    }

    /* Success: seal what Microsoft sent and store it in one transaction. */
    expires = now + tok->expires_in;
    rv = APR_SUCCESS;
    if (tok->refresh_token && *tok->refresh_token) {
        rv = mso_account_token_seal(p, ctx->keyring, acct, "refresh", tok->refresh_token,
                                    &sealed_refresh);
    }
    if (rv == APR_SUCCESS) {
        rv = mso_account_token_seal(p, ctx->keyring, acct, kind, tok->access_token,
                                    &sealed_access);
    }
    if (rv != APR_SUCCESS) {
        /* The old refresh token stays valid at Microsoft: nothing is lost. */
        return fail_ours(db, p, ctx, acct, kind, out, NULL, "sealing the new tokens failed");
    }
    memset(&r, 0, sizeof(r));
    r.kind = kind;
    r.sealed_access = sealed_access;
    r.access_expires_at = expires;
    r.sealed_refresh = sealed_refresh;
    if (!strcmp(kind, "graph")) {
        r.scopes = tok->scope && *tok->scope ? tok->scope : NULL;
        r.refresh_due_at = mso_refresh_next_due(ctx, now, expires);
    }
    else {
        /* An Outlook token does not move the Graph schedule. */
        r.refresh_due_at = acct->refresh_due_at;
    }
    rv = mso_account_refreshed(db, p, acct->id, ctx->owner, &r, now, &err);
    if (rv == APR_EBUSY) {
        /* Lost the lease: whoever holds it now decides; do not release. */
        out->result = MSO_REFRESH_BUSY;
        out->detail = "the account's lease was lost before the new tokens could be stored";
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_NOTICE, rv, "mod_msoauth: %s token of %s: %s",
                       kind, acct->mailbox, err ? err : "the lease was lost");
        return APR_SUCCESS;
    }
    if (rv != APR_SUCCESS) {
        /* If Microsoft rotated the refresh token, the new one is lost with
         * this failure, but using a refresh token does not revoke it: the
         * stored one stays valid at Microsoft and the next run uses it. */
        return fail_ours(db, p, ctx, acct, kind, out, NULL,
                         err ? err : "the new tokens could not be stored");
    }
    out->result = MSO_REFRESHED;
    out->access_token = tok->access_token;
    out->access_expires_at = expires;
    out->scope = tok->scope;
    return APR_SUCCESS;
}

apr_status_t mso_refresh_account(mso_db_t *db, apr_pool_t *p, const mso_refresh_ctx_t *ctx,
                                 const mso_account_t *acct, const char *resource,
                                 apr_int64_t now, mso_refresh_outcome_t *out)
{
    mso_token_result_t *tok = NULL;
    refresh_t r;
    apr_status_t rv;

    rv = refresh_prepare(db, p, ctx, acct, resource, now, out, &r);
    if (rv != APR_INCOMPLETE) {
        return rv;
    }
    rv = mso_token_from_refresh(p, ctx->http, &r.app, (const char *)r.plain, r.scopes, &tok);
    wipe(r.plain, r.plain_len);
    return refresh_finish(&r, rv == APR_SUCCESS ? tok : NULL);
}

/* ---- many accounts at once ----------------------------------------------- */

/* The token call of one account in a batch is over. Runs on the batch's
 * thread, inside mso_http_multi_run: the database writes happen here. */
static void batch_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    refresh_t *r = baton;

    wipe(r->form, strlen(r->form));
    if (rv == APR_TIMEUP && resp && resp->not_sent) {
        /* Never sent: nothing happened at Microsoft, nothing to record; the
         * lease goes back so the next tick (or another node) does it. */
        r->out->result = MSO_REFRESH_DEFERRED;
        r->out->detail = "not attempted: the time budget of this run ran out";
        mso_account_release(r->db, r->p, r->acct->id, r->ctx->owner);
        return;
    }
    {
        mso_token_result_t *tok = mso_token_result_from_response(r->p, rv, resp, 1);

        tok->reason = mso_reason_for_client(&r->app, tok->reason);
        refresh_finish(r, tok);
    }
}

apr_status_t mso_refresh_batch(mso_db_t *db, apr_pool_t *p,
                               const mso_refresh_ctx_t *const *ctxs,
                               const mso_account_t *const *accts, int n, const char *resource,
                               mso_http_multi_t *m, apr_interval_time_t budget,
                               apr_int64_t now, mso_refresh_outcome_t *outs)
{
    apr_array_header_t *hdrs;
    refresh_t *rs;
    int i;

    if (!db || !p || n < 0 || (n && (!ctxs || !accts || !outs)) || !m) {
        return APR_EINVAL;
    }
    hdrs = apr_array_make(p, 2, sizeof(const char *));
    APR_ARRAY_PUSH(hdrs, const char *) = "Content-Type: application/x-www-form-urlencoded";
    APR_ARRAY_PUSH(hdrs, const char *) = "Accept: application/json";
    rs = apr_pcalloc(p, sizeof(*rs) * (n ? n : 1));

    for (i = 0; i < n; i++) {
        refresh_t *r = &rs[i];
        apr_status_t rv;

        if (refresh_prepare(db, p, ctxs[i], accts[i], resource, now, &outs[i], r)
            != APR_INCOMPLETE) {
            continue;
        }
        r->form = (char *)mso_token_refresh_form(p, &r->app, (const char *)r->plain, r->scopes);
        wipe(r->plain, r->plain_len);
        if (!r->form || (r->app.cert && mso_cert_not_after(r->app.cert) <= apr_time_now())) {
            mso_token_result_t *t = apr_pcalloc(p, sizeof(*t));
            int expired = r->app.cert && mso_cert_not_after(r->app.cert) <= apr_time_now();

            t->reason = expired ? "certificate_expired" : "certificate_invalid";
            t->detail = expired ? "the certificate in MSOAuthClientCertificateFile has expired; "
                                  "nothing was sent"
                                : "the client assertion could not be signed with the "
                                  "certificate's key";
            t->retry_after = -1;
            if (r->form) {
                wipe(r->form, strlen(r->form));
            }
            refresh_finish(r, t);
            continue;
        }
        rv = mso_http_multi_add(m, p, "POST", mso_token_url(p, &r->app), hdrs, r->form,
                                strlen(r->form), batch_done, r);
        if (rv != APR_SUCCESS) {
            mso_http_response_t refused;

            /* Refused before sending (an authority that is no URL): the
             * same outcome as a transport failure of the synchronous path. */
            memset(&refused, 0, sizeof(refused));
            refused.error = "the token request was refused before it was sent (is the "
                            "account's authority a valid URL?)";
            wipe(r->form, strlen(r->form));
            refresh_finish(r, mso_token_result_from_response(p, rv, &refused, 1));
        }
    }
    mso_http_multi_run(m, budget);
    return APR_SUCCESS;
}
