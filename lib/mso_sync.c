/* One pass of Graph work (see mso_sync.h): the core that runs the mailboxes.
 *
 * Each mailbox runs a small state machine driven by the multi handle's
 * completions: pump() offers the mailbox's room (at most
 * MSO_SYNC_PER_MAILBOX requests in flight, nothing after the slice or once
 * it stopped) to each kind of work in turn (mso_sync_int.h), each
 * completion records its result in the database and pumps again. After the
 * pass every mailbox's lease is released with its schedule: each kind's
 * part, then throttling, a refused token or the first error. */
#include <string.h>

#include <apr_strings.h>

#include "mso_apptoken.h"
#include "mso_log.h"
#include "mso_refresh.h"
#include "mso_sync.h"
#include "mso_sync_int.h"

#define THROTTLE_DEFAULT 30         /* seconds when Graph gives no Retry-After */
/* A mailbox that does not exist or that a policy closes changes by an
 * administrator's hand: looked at again after 15 min, doubling to 6 h. */
#define MAILBOX_WAIT 900
#define MAILBOX_WAIT_MAX (6 * 3600)
/* An application token Graph refuses as such: a new one in 5 min. */
#define COMPANY_WAIT 300

static const mso_sync_kind_t *const kinds[MSO_KIND_MAX] = {
    &mso_sync_actions,
    &mso_sync_outbox,
    &mso_sync_folders,
    &mso_sync_attach,
};

/* A whole word, "NAME" or ".../NAME": Mail.Send does not match
 * Mail.Send.Shared (someone else's mailbox). */
int mso_sync_scope_has(const char *scopes, const char *scope)
{
    apr_size_t n = scope ? strlen(scope) : 0;
    const char *c = scopes;

    while (n && c && (c = strstr(c, scope)) != NULL) {
        char before = c == scopes ? ' ' : c[-1];

        if ((before == ' ' || before == '/') && (c[n] == '\0' || c[n] == ' ')) {
            return 1;
        }
        c += n;
    }
    return 0;
}

int mso_sync_scopes_can_write(const char *scopes)
{
    return mso_sync_scope_has(scopes, "Mail.ReadWrite");
}

int mso_sync_scopes_can_send(const char *scopes)
{
    return mso_sync_scope_has(scopes, "Mail.Send");
}

apr_int64_t mso_sync_now(void)
{
    return apr_time_sec(apr_time_now());
}

int mso_sync_room(const mso_box_t *b)
{
    return !b->stop && b->inflight < MSO_SYNC_PER_MAILBOX
           && apr_time_now() < b->pass->slice_end;
}

void mso_sync_error(mso_box_t *b, const char *text)
{
    if (!b->error) {
        b->error = apr_pstrdup(b->pool, text);
    }
    b->stop = 1;
}

void mso_sync_throttle(mso_box_t *b, const mso_graph_result_t *g)
{
    b->throttled = 1;
    if (g->retry_after > b->retry_after) {
        b->retry_after = g->retry_after;
    }
    if (!b->graph_error) {
        b->graph_error = mso_graph_result_text(b->pool, g);
    }
    b->stop = 1;
    b->pass->st->throttled++;
}

int mso_sync_mailbox_problem(mso_box_t *b, const mso_graph_result_t *g)
{
    const char *reason = mso_graph_mailbox_reason(g);

    if (!reason) {
        return 0;
    }
    if (!strcmp(reason, "admin_consent_required")) {
        if (!b->in->app_only) {
            return 0;               /* a delegated grant: the usual 403 */
        }
        if (!b->error) {
            b->company_reason = reason;
            b->error = apr_psprintf(b->pool, "Graph refused the company's application token "
                                    "(%s): grant the app's Application permissions with admin "
                                    "consent", mso_graph_result_text(b->pool, g));
        }
        b->stop = 1;
        return 1;
    }
    if (!b->error) {
        b->mailbox_reason = reason;
        b->error = !strcmp(reason, "mailbox_not_found")
            ? apr_psprintf(b->pool, "Graph does not know mailbox %s (%s): check the address",
                           b->in->work->acct->mailbox, mso_graph_result_text(b->pool, g))
            : apr_psprintf(b->pool, "an Exchange application access policy keeps the app out "
                           "of mailbox %s (%s): add the mailbox to the policy's group",
                           b->in->work->acct->mailbox, mso_graph_result_text(b->pool, g));
    }
    b->stop = 1;
    return 1;
}

void mso_sync_unauthorized(mso_box_t *b, const mso_graph_result_t *g)
{
    b->unauthorized = 1;
    b->stop = 1;
    if (!b->graph_error) {
        b->graph_error = mso_graph_result_text(b->pool, g);
    }
}

int mso_sync_in_folders(const mso_box_t *b, const char *name)
{
    int i;

    for (i = 0; name && i < b->in->folders->nelts; i++) {
        if (!strcmp(APR_ARRAY_IDX(b->in->folders, i, const char *), name)) {
            return 1;
        }
    }
    return 0;
}

mso_req_t *mso_sync_req(mso_box_t *b, void *item, int step)
{
    apr_pool_t *rp;
    mso_req_t *rq;

    apr_pool_create(&rp, b->pool);
    rq = apr_pcalloc(rp, sizeof(*rq));
    rq->box = b;
    rq->pool = rp;
    rq->item = item;
    rq->step = step;
    return rq;
}

apr_status_t mso_sync_send(mso_req_t *rq, const char *method, const char *url,
                           const char *body, int page_size, mso_http_done_fn *done)
{
    mso_box_t *b = rq->box;
    apr_array_header_t *h = mso_graph_headers(rq->pool, b->in->access_token, page_size);
    apr_status_t rv;

    if (body) {
        APR_ARRAY_PUSH(h, const char *) = "Content-Type: application/json";
    }
    rv = mso_http_multi_add(b->pass->m, rq->pool, method, url, h, body,
                            body ? strlen(body) : 0, done, rq);
    if (rv == APR_SUCCESS) {
        b->inflight++;
    }
    else {
        apr_pool_destroy(rq->pool);
    }
    return rv;
}

apr_status_t mso_sync_send_raw(mso_req_t *rq, apr_pool_t *pool, const char *url,
                               apr_size_t max_body, mso_http_done_fn *done)
{
    mso_box_t *b = rq->box;
    apr_array_header_t *h = mso_graph_headers(rq->pool, b->in->access_token, 0);
    apr_status_t rv;
    int i;

    for (i = 0; i < h->nelts; i++) {
        if (!strcmp(APR_ARRAY_IDX(h, i, const char *), "Accept: application/json")) {
            APR_ARRAY_IDX(h, i, const char *) = "Accept: */*";
        }
    }
    rv = mso_http_multi_add_raw(b->pass->m, pool, url, h, max_body, done, rq);
    if (rv == APR_SUCCESS) {
        b->inflight++;
    }
    else {
        apr_pool_destroy(rq->pool);
    }
    return rv;
}

apr_status_t mso_sync_send_upload(mso_req_t *rq, const char *method, const char *url,
                                  const apr_array_header_t *headers, const char *body,
                                  apr_size_t len, mso_http_done_fn *done)
{
    mso_box_t *b = rq->box;
    apr_status_t rv;

    rv = mso_http_multi_add(b->pass->m, rq->pool, method, url, headers, body, len, done, rq);
    if (rv == APR_SUCCESS) {
        b->inflight++;
    }
    else {
        apr_pool_destroy(rq->pool);
    }
    return rv;
}

void mso_sync_answered(mso_req_t *rq)
{
    rq->box->inflight--;
}

void mso_sync_pump(mso_box_t *b)
{
    int k, progress = 1;

    while (progress && mso_sync_room(b)) {
        progress = 0;
        for (k = 0; k < MSO_KIND_MAX && mso_sync_room(b); k++) {
            progress |= kinds[k]->pump(b);
        }
    }
}

void mso_sync_finished(mso_req_t *rq)
{
    mso_box_t *b = rq->box;

    apr_pool_destroy(rq->pool);
    mso_sync_pump(b);
}

/* The mailbox's schedule after the pass; releases its lease. */
static void box_release(mso_box_t *b)
{
    mso_work_t *w = b->in->work;
    mso_work_done_t d;
    apr_int64_t now;
    int k;

    mso_sync_settle(b->pass);       /* a write in flight may find the lease gone */
    now = mso_sync_now();
    if (b->lost) {
        return;                     /* another node holds it now */
    }
    memset(&d, 0, sizeof(d));
    d.sync_phase = w->sync_phase;
    d.sync_due_at = w->sync_due_at;
    for (k = 0; k < MSO_KIND_MAX; k++) {
        if (kinds[k]->release) {
            kinds[k]->release(b, &d, now);
        }
    }
    if (b->throttled) {
        long wait = b->retry_after > 0 ? b->retry_after : -1;

        d.sync_error_runs = w->sync_error_runs + 1;
        /* The clock here counts whole seconds: one more so the wait is never
         * shorter than asked (Graph counts a retry before Retry-After). */
        d.sync_retry_at = wait > 0 ? now + 1 + (wait > 86400 ? 86400 : wait)
                                   : mso_refresh_backoff(w->sync_error_runs, THROTTLE_DEFAULT,
                                                         now);
        d.sync_phase = "throttled";
        d.sync_error = apr_psprintf(b->pool, "Graph is throttling this mailbox; waiting %"
                                    APR_INT64_T_FMT " s as asked%s%s", d.sync_retry_at - now,
                                    b->graph_error ? ": " : "",
                                    b->graph_error ? b->graph_error : "");
        if (b->sync_due) {
            d.sync_due_at = now;
            d.last_sync_at = 0;
        }
    }
    else if (b->unauthorized && !b->error) {
        if (!w->auth_retry) {
            /* One refresh, then a retry: a 401 is not a reason to reconnect. */
            d.refresh_now = 1;
            d.auth_retry = 1;
            d.sync_due_at = now;
            d.last_sync_at = 0;
        }
        else {
            b->error = apr_pstrcat(b->pool, "Graph refused the access token again after a "
                                   "refresh (", b->graph_error ? b->graph_error : "HTTP 401",
                                   "); retrying later", NULL);
        }
    }
    if (b->error) {
        d.sync_error = b->error;
        d.sync_error_runs = w->sync_error_runs + 1;
        d.sync_retry_at = mso_refresh_backoff(w->sync_error_runs, -1, now);
        if (b->mailbox_reason) {
            apr_int64_t wait = MAILBOX_WAIT;
            int r;

            for (r = 0; r < w->sync_error_runs && wait < MAILBOX_WAIT_MAX; r++) {
                wait *= 2;
            }
            d.sync_retry_at = now + (wait < MAILBOX_WAIT_MAX ? wait : MAILBOX_WAIT_MAX);
            mso_account_mailbox_reason(mso_sync_db(b->pass), b->pool, b->id, b->mailbox_reason,
                                       b->error, now);
        }
        if (b->company_reason) {
            /* Every mailbox of the company waits for a new token (the claim
             * takes none while the token is refused), and only for it. */
            mso_apptoken_refused(mso_sync_db(b->pass), b->pool, b->id, b->company_reason, b->error,
                                 now + COMPANY_WAIT, now);
            d.sync_retry_at = 0;
            d.sync_error_runs = w->sync_error_runs;
        }
        d.auth_retry = 0;
        /* A token that cannot be opened is replaced by a refresh. */
        d.refresh_now = !b->in->access_token;
        if (b->sync_due) {
            d.sync_due_at = now;
            d.last_sync_at = 0;
        }
        b->pass->st->errors++;
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, APR_SUCCESS,
                       "mod_msoauth: Graph work for account %" APR_INT64_T_FMT " (%s) failed: "
                       "%s; retrying in %" APR_INT64_T_FMT " s", b->id,
                       w->acct->mailbox ? w->acct->mailbox : "?", b->error,
                       d.sync_retry_at ? d.sync_retry_at - now : (apr_int64_t)COMPANY_WAIT);
    }
    else if (!b->throttled && !b->unauthorized && w->acct->reason
             && (!strcmp(w->acct->reason, "mailbox_not_found")
                 || !strcmp(w->acct->reason, "access_denied_by_policy"))) {
        /* Reachable again. */
        mso_account_mailbox_reason(mso_sync_db(b->pass), b->pool, b->id, NULL, NULL, now);
    }
    mso_mirror_release(mso_sync_db(b->pass), b->pool, b->id, b->pass->owner, &d, now);
}

static mso_box_t *box_setup(mso_pass_t *pass, mso_sync_box_t *in)
{
    mso_box_t *b;
    apr_pool_t *bp;
    int k;

    apr_pool_create(&bp, pass->pool);
    b = apr_pcalloc(bp, sizeof(*b));
    b->pass = pass;
    b->in = in;
    b->pool = bp;
    b->id = in->work->acct->id;
    b->retry_after = -1;
    b->sync_due = in->work->sync_due_at <= mso_sync_now();
    for (k = 0; k < MSO_KIND_MAX && !b->stop; k++) {
        kinds[k]->setup(b);
    }
    if (!in->access_token) {
        mso_sync_error(b, in->app_only
                       ? "the company's application token cannot be opened (was the key ring "
                         "changed?); fetching a new one"
                       : "the stored access token cannot be opened (was the key ring "
                         "changed?); refreshing it");
    }
    return b;
}

apr_status_t mso_sync_run(mso_db_t *db, apr_pool_t *p, const char *owner,
                          mso_sync_box_t *boxes, int n, mso_http_multi_t *m,
                          apr_time_t slice_end, apr_time_t deadline, mso_sync_stats_t *st)
{
    mso_pass_t pass;
    mso_box_t **rts;
    apr_pool_t *pp;
    int i;

    if (!db || !m || (n > 0 && !boxes)) {
        return APR_EINVAL;
    }
    apr_pool_create(&pp, p);
    pass.pool = pp;
    pass.db_ = db;
    pass.writer = NULL;
    pass.owner = owner;
    pass.m = m;
    pass.slice_end = slice_end;
    pass.st = st;
    pass.downloads = 0;
    rts = apr_pcalloc(pp, sizeof(*rts) * (n > 0 ? n : 1));
    for (i = 0; i < n; i++) {
        rts[i] = box_setup(&pass, &boxes[i]);
        st->mailboxes++;
    }
    for (i = 0; i < n; i++) {
        mso_sync_pump(rts[i]);
    }
    mso_http_multi_run(m, deadline - apr_time_now());
    for (i = 0; i < n; i++) {
        /* Work read but not reached stays queued as it is. */
        box_release(rts[i]);
    }
    mso_sync_writer_stop(&pass);
    apr_pool_destroy(pp);
    return APR_SUCCESS;
}
