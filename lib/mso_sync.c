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

#include "mso_log.h"
#include "mso_refresh.h"
#include "mso_sync.h"
#include "mso_sync_int.h"

#define THROTTLE_DEFAULT 30         /* seconds when Graph gives no Retry-After */

static const mso_sync_kind_t *const kinds[MSO_KIND_MAX] = {
    &mso_sync_actions,
    &mso_sync_outbox,
    &mso_sync_folders,
};

/* A whole word of scopes, "NAME" or ".../NAME"; not NAME.Shared (someone
 * else's mailbox). */
static int scopes_have(const char *scopes, const char *name)
{
    const char *c = scopes;
    apr_size_t n = strlen(name);

    while (c && (c = strstr(c, name)) != NULL) {
        char before = c == scopes ? ' ' : c[-1];
        char after = c[n];

        if ((before == ' ' || before == '/') && (after == '\0' || after == ' ')) {
            return 1;
        }
        c += n;
    }
    return 0;
}

int mso_sync_scopes_can_write(const char *scopes)
{
    return scopes_have(scopes, "Mail.ReadWrite");
}

int mso_sync_scopes_can_send(const char *scopes)
{
    return scopes_have(scopes, "Mail.Send");
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

apr_status_t mso_sync_send_raw(mso_req_t *rq, const char *method, const char *url,
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
    apr_int64_t now = mso_sync_now();
    int k;

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
        d.sync_retry_at = wait > 0 ? now + (wait > 86400 ? 86400 : wait)
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
                       d.sync_retry_at - now);
    }
    mso_mirror_release(b->pass->db, b->pool, b->id, b->pass->owner, &d, now);
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
        mso_sync_error(b, "the stored access token cannot be opened (was the key ring "
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
    pass.db = db;
    pass.owner = owner;
    pass.m = m;
    pass.slice_end = slice_end;
    pass.st = st;
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
    apr_pool_destroy(pp);
    return APR_SUCCESS;
}
