/* One pass of Graph work (see mso_sync.h).
 *
 * Each mailbox runs a small state machine driven by the multi handle's
 * completions: pump() starts what may start (actions in queue order, but
 * never two for the same message at once and never one before an earlier
 * unfinished one of the same message; then the next page of each folder),
 * each completion records its result in the database and pumps again.
 *
 * Actions, exactly once: sent_at is committed before the write goes out.
 * When a later pass finds sent_at set, the earlier outcome is unknown (a
 * crash, a kill, a timeout), so it first asks Graph for the message's
 * current state and only writes when Outlook does not show it yet. */
#include <string.h>

#include <apr_atomic.h>
#include <apr_hash.h>
#include <apr_strings.h>
#include <apr_thread_proc.h>

#include "mso_graph.h"
#include "mso_json.h"
#include "mso_log.h"
#include "mso_refresh.h"
#include "mso_sync.h"

#define RESYNCS_PER_PASS 2          /* a folder restarting again and again waits */
#define THROTTLE_DEFAULT 30         /* seconds when Graph gives no Retry-After */

/* Page sizes that had to shrink, remembered across passes (the database has
 * no column for it): a page too big at 100 is asked for smaller in the next
 * pass too, instead of failing again at 100 when the pass ended before the
 * smaller retry could start. Per process, a few entries (oldest replaced),
 * shared by the job's threads under a spin lock held for a few loads. */
#define SMALL_PAGES 64

typedef struct {
    apr_int64_t account;
    char folder[48];
    int size;
} small_page_t;

static small_page_t small_pages[SMALL_PAGES];
static unsigned small_next;
static volatile apr_uint32_t small_lock;

static void small_lock_take(void)
{
    while (apr_atomic_cas32(&small_lock, 1, 0) != 0) {
        apr_thread_yield();
    }
}

/* The page size to start a folder with. */
static int page_size_get(apr_int64_t account, const char *folder)
{
    int i, size = MSO_SYNC_PAGE_SIZE;

    small_lock_take();
    for (i = 0; i < SMALL_PAGES; i++) {
        if (small_pages[i].size && small_pages[i].account == account
            && !strcmp(small_pages[i].folder, folder)) {
            size = small_pages[i].size;
            break;
        }
    }
    apr_atomic_set32(&small_lock, 0);
    return size;
}

/* Remembers size (MSO_SYNC_PAGE_SIZE: forgets). */
static void page_size_set(apr_int64_t account, const char *folder, int size)
{
    int i, slot = -1;

    if (strlen(folder) >= sizeof(small_pages[0].folder)) {
        return;
    }
    small_lock_take();
    for (i = 0; i < SMALL_PAGES; i++) {
        if (small_pages[i].size && small_pages[i].account == account
            && !strcmp(small_pages[i].folder, folder)) {
            slot = i;
            break;
        }
    }
    if (size >= MSO_SYNC_PAGE_SIZE) {
        if (slot >= 0) {
            small_pages[slot].size = 0;
        }
    }
    else {
        if (slot < 0) {
            slot = (int)(small_next++ % SMALL_PAGES);
        }
        small_pages[slot].account = account;
        apr_cpystrn(small_pages[slot].folder, folder, sizeof(small_pages[slot].folder));
        small_pages[slot].size = size;
    }
    apr_atomic_set32(&small_lock, 0);
}

typedef enum { ACT_PENDING, ACT_BUSY, ACT_FINISHED, ACT_WAITING } act_state_e;
typedef enum { STEP_WRITE, STEP_FOLDER, STEP_STATE } act_step_e;

struct box_rt_t;

typedef struct {
    mso_action_t *a;
    act_state_e state;
    mso_graph_request_t req;        /* the write, built and checked once */
    const char *dest;               /* Graph destination (move/delete) */
    const char *dest_id;            /* its folder id, once looked up */
} act_rt_t;

typedef struct {
    mso_folder_t *f;
    int busy, finished, resyncs, page_size;
} folder_rt_t;

typedef struct {
    apr_pool_t *pool;
    mso_db_t *db;
    const char *owner;
    mso_http_multi_t *m;
    apr_time_t slice_end;
    mso_sync_stats_t *st;
} pass_t;

typedef struct box_rt_t {
    pass_t *pass;
    mso_sync_box_t *in;
    apr_pool_t *pool;
    apr_int64_t id;
    int inflight;
    int sync_due;
    int stop;                       /* no new requests for this mailbox */
    int lost;                       /* the lease is gone: write nothing more */
    int throttled;
    long retry_after;
    int unauthorized;
    const char *error;              /* first failure of the pass */
    const char *graph_error;        /* Graph's answer with it, for the log */
    apr_array_header_t *acts;       /* act_rt_t* */
    apr_hash_t *seen;               /* pump's scratch: messages with an earlier action */
    apr_array_header_t *folders;    /* folder_rt_t* */
} box_rt_t;

typedef struct {
    box_rt_t *box;
    apr_pool_t *pool;
    act_rt_t *act;                  /* or */
    folder_rt_t *folder;
    act_step_e step;
} req_t;

static void pump(box_rt_t *b);

int mso_sync_scopes_can_write(const char *scopes)
{
    const char *c = scopes;

    while (c && (c = strstr(c, "Mail.ReadWrite")) != NULL) {
        char before = c == scopes ? ' ' : c[-1];
        char after = c[14];

        /* A whole word, "Mail.ReadWrite" or ".../Mail.ReadWrite"; not
         * Mail.ReadWrite.Shared (someone else's mailbox). */
        if ((before == ' ' || before == '/') && (after == '\0' || after == ' ')) {
            return 1;
        }
        c += 14;
    }
    return 0;
}

static apr_int64_t now_sec(void)
{
    return apr_time_sec(apr_time_now());
}

/* The first failure of the pass is what the account shows. */
static void box_error(box_rt_t *b, const char *text)
{
    if (!b->error) {
        b->error = apr_pstrdup(b->pool, text);
    }
    b->stop = 1;
}

static void box_throttle(box_rt_t *b, const mso_graph_result_t *g)
{
    b->throttled = 1;
    if (g->retry_after > b->retry_after) {
        b->retry_after = g->retry_after;
    }
    b->stop = 1;
    b->pass->st->throttled++;
}

static int in_folders(box_rt_t *b, const char *name)
{
    int i;

    for (i = 0; name && i < b->in->folders->nelts; i++) {
        if (!strcmp(APR_ARRAY_IDX(b->in->folders, i, const char *), name)) {
            return 1;
        }
    }
    return 0;
}

static apr_status_t send_req(box_rt_t *b, req_t *rq, const char *method, const char *url,
                             const char *body, int page_size, mso_http_done_fn *done)
{
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
    return rv;
}

static req_t *new_req(box_rt_t *b)
{
    apr_pool_t *rp;
    req_t *rq;

    apr_pool_create(&rp, b->pool);
    rq = apr_pcalloc(rp, sizeof(*rq));
    rq->box = b;
    rq->pool = rp;
    return rq;
}

/* ------------------------------------------------------------------------- */
/* Actions */

/* Finished for this pass, whatever rv says: APR_EBUSY means the row is no
 * longer queued (the app changed it) or the lease is gone, and either way it
 * is not ours to touch. */
static void act_finish(box_rt_t *b, act_rt_t *ar, apr_status_t rv)
{
    (void)b;
    (void)rv;
    ar->state = ACT_FINISHED;
}

static void act_fail(box_rt_t *b, act_rt_t *ar, const char *reason, const char *text)
{
    apr_status_t rv = mso_mirror_action_failed(b->pass->db, b->pool, b->pass->owner, ar->a,
                                               reason, text, now_sec());

    if (rv == APR_SUCCESS) {
        b->pass->st->actions_failed++;
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, APR_SUCCESS,
                       "mod_msoauth: action %" APR_INT64_T_FMT " (%s) of account %"
                       APR_INT64_T_FMT " failed: %s: %s", ar->a->id, ar->a->action, b->id,
                       reason, text);
    }
    act_finish(b, ar, rv);
}

static void act_wait(box_rt_t *b, act_rt_t *ar, const char *text, int maybe_applied)
{
    mso_mirror_action_later(b->pass->db, b->pool, b->pass->owner, ar->a, text,
                            maybe_applied, now_sec());
    if (maybe_applied && !ar->a->sent_at) {
        ar->a->sent_at = now_sec();
    }
    ar->state = ACT_WAITING;
    b->pass->st->actions_waiting++;
}

static void act_done(box_rt_t *b, act_rt_t *ar)
{
    const char *folder = NULL;
    int removed = 0;
    apr_status_t rv;

    if (ar->dest) {
        /* The mirror follows the message: into a mirrored folder, or out of
         * the mirror (removed) when its new folder is not mirrored. */
        folder = ar->dest;
        removed = !in_folders(b, folder);
    }
    rv = mso_mirror_action_done(b->pass->db, b->pool, b->pass->owner, ar->a, folder, removed,
                                now_sec());
    if (rv == APR_SUCCESS) {
        b->pass->st->actions_done++;
    }
    else if (rv != APR_EBUSY) {
        box_error(b, "cannot record an applied action in the database (see the error log)");
    }
    act_finish(b, ar, rv);
}

static const char *read_only_text(void)
{
    return "this mailbox was connected with read access only (Mail.Read): write-back needs "
           "Mail.ReadWrite. Set MSOAuthEdition pro for its company and connect the mailbox "
           "again";
}

/* What a Graph failure of an action's request means for it and its mailbox. */
static void act_failure(box_rt_t *b, act_rt_t *ar, const mso_graph_result_t *g,
                        int maybe_applied)
{
    const char *text = mso_graph_result_text(b->pool, g);

    switch (g->cls) {
    case MSO_GRAPH_THROTTLED:
        box_throttle(b, g);
        act_wait(b, ar, apr_pstrcat(b->pool, "throttled by Graph, retrying: ", text, NULL),
                 maybe_applied || g->maybe_applied);
        break;
    case MSO_GRAPH_UNAUTHORIZED:
        b->unauthorized = 1;
        b->stop = 1;
        act_wait(b, ar, apr_pstrcat(b->pool, "Graph refused the access token, refreshing it: ",
                                    text, NULL), maybe_applied);
        break;
    case MSO_GRAPH_FORBIDDEN:
        act_fail(b, ar, "read_only", apr_pstrcat(b->pool, "Graph refused the change (", text,
                                                 "): ", read_only_text(), NULL));
        break;
    case MSO_GRAPH_NOT_FOUND:
        act_fail(b, ar, "not_found", apr_pstrcat(b->pool, ar->dest_id || !ar->dest
                                                 ? "the message no longer exists in Outlook ("
                                                 : "the message or the destination folder no "
                                                   "longer exists in Outlook (", text, ")",
                                                 NULL));
        break;
    case MSO_GRAPH_FAILED:
    case MSO_GRAPH_RESYNC:
        act_fail(b, ar, "graph_error", apr_pstrcat(b->pool, "Graph refused the change: ", text,
                                                   NULL));
        break;
    default:
        act_wait(b, ar, apr_pstrcat(b->pool, "Graph did not answer, retrying: ", text, NULL),
                 maybe_applied || g->maybe_applied);
        box_error(b, apr_pstrcat(b->pool, "Graph is unreachable or failing: ", text, NULL));
        break;
    }
}

static void act_write_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void act_check_done(void *baton, apr_status_t rv, mso_http_response_t *resp);

/* Sends the write itself, sent_at committed first. */
static void act_write(box_rt_t *b, act_rt_t *ar)
{
    apr_status_t rv;
    req_t *rq;

    rv = mso_mirror_action_sending(b->pass->db, b->pool, b->pass->owner, ar->a, now_sec());
    if (rv != APR_SUCCESS) {
        if (rv == APR_EBUSY) {
            act_finish(b, ar, rv);
        }
        else {
            ar->state = ACT_WAITING;
            box_error(b, "cannot record an action as being sent in the database (see the "
                         "error log)");
        }
        return;
    }
    ar->a->sent_at = now_sec();
    ar->a->attempts++;
    rq = new_req(b);
    rq->act = ar;
    rq->step = STEP_WRITE;
    ar->state = ACT_BUSY;
    if (send_req(b, rq, ar->req.method, ar->req.url, ar->req.body, 0, act_write_done)
        != APR_SUCCESS) {
        apr_pool_destroy(rq->pool);
        act_wait(b, ar, "the request could not be sent", 0);
    }
}

/* A retry of a write whose outcome is unknown: look first. */
static void act_check(box_rt_t *b, act_rt_t *ar, act_step_e step)
{
    req_t *rq = new_req(b);
    const char *url = step == STEP_FOLDER
        ? mso_graph_folder_url(rq->pool, b->in->graph_root, ar->dest)
        : mso_graph_message_state_url(rq->pool, b->in->graph_root, ar->a->graph_id);

    rq->act = ar;
    rq->step = step;
    ar->state = ACT_BUSY;
    if (send_req(b, rq, "GET", url, NULL, 0, act_check_done) != APR_SUCCESS) {
        apr_pool_destroy(rq->pool);
        act_wait(b, ar, "the request could not be sent", 1);
    }
}

static void act_start(box_rt_t *b, act_rt_t *ar)
{
    const char *err = NULL;

    if (!b->in->can_write) {
        /* Nothing goes to Graph: the grant cannot write. */
        act_fail(b, ar, "read_only", read_only_text());
        return;
    }
    if (mso_graph_action_request(b->pool, b->in->graph_root, ar->a->action, ar->a->graph_id,
                                 ar->a->destination, &ar->req, &err) != APR_SUCCESS) {
        act_fail(b, ar, "bad_request", err);
        return;
    }
    if (strcmp(ar->a->action, "mark_read") && strcmp(ar->a->action, "mark_unread")) {
        ar->dest = mso_graph_action_destination(b->pool, ar->a->action, ar->a->destination);
    }
    if (ar->a->sent_at) {
        act_check(b, ar, ar->dest ? STEP_FOLDER : STEP_STATE);
        return;
    }
    act_write(b, ar);
}

static void act_write_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    req_t *rq = baton;
    box_rt_t *b = rq->box;
    act_rt_t *ar = rq->act;
    mso_graph_result_t g;

    b->inflight--;
    mso_graph_classify(rq->pool, rv, resp, &g);
    if (g.cls == MSO_GRAPH_OK) {
        act_done(b, ar);
    }
    else {
        act_failure(b, ar, &g, 0);
    }
    apr_pool_destroy(rq->pool);
    pump(b);
}

static void act_check_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    req_t *rq = baton;
    box_rt_t *b = rq->box;
    act_rt_t *ar = rq->act;
    mso_graph_result_t g;
    const char *perr = NULL;
    json_t *j = NULL;

    b->inflight--;
    mso_graph_classify(rq->pool, rv, resp, &g);
    if (g.cls == MSO_GRAPH_OK) {
        j = mso_json_parse(rq->pool, resp->body, resp->body_len, &perr);
    }
    if (g.cls != MSO_GRAPH_OK) {
        /* Nothing was written by a look, the earlier write is still unknown. */
        act_failure(b, ar, &g, 1);
    }
    else if (!j) {
        act_wait(b, ar, "Graph's answer about the message could not be read", 1);
        box_error(b, "Graph's answer about a message could not be read");
    }
    else if (rq->step == STEP_FOLDER) {
        const char *id = mso_json_str(j, "id");

        if (!id) {
            act_wait(b, ar, "Graph's answer about the destination folder has no id", 1);
            box_error(b, "Graph's answer about a folder has no id");
        }
        else {
            ar->dest_id = apr_pstrdup(b->pool, id);
            act_check(b, ar, STEP_STATE);
        }
    }
    else {
        int is_read = -1;
        const char *parent = mso_json_str(j, "parentFolderId");
        int already;

        mso_json_bool(j, "isRead", &is_read);
        if (ar->dest) {
            already = parent && ar->dest_id && !strcmp(parent, ar->dest_id);
        }
        else {
            already = is_read == (strcmp(ar->a->action, "mark_read") == 0);
        }
        if (already) {
            act_done(b, ar);            /* the earlier call did it */
        }
        else if (b->stop) {
            /* Throttled or failing meanwhile: not now. */
            act_wait(b, ar, "not applied yet: the mailbox is waiting for Graph", 1);
        }
        else {
            act_write(b, ar);
        }
    }
    apr_pool_destroy(rq->pool);
    pump(b);
}

/* ------------------------------------------------------------------------- */
/* Folders */

static void page_done(void *baton, apr_status_t rv, mso_http_response_t *resp);

static void folder_fetch(box_rt_t *b, folder_rt_t *fr)
{
    mso_folder_t *f = fr->f;
    const char *url = f->next_link ? f->next_link : f->delta_link;
    req_t *rq;

    if (!url || !mso_graph_link_ok(b->in->graph_root, url)) {
        /* No cursor yet, or one that is not under MSOAuthGraphURL (changed
         * since): a full round, newest first. */
        url = mso_graph_delta_url(b->pool, b->in->graph_root, f->folder);
        if (f->next_link || f->delta_link) {
            if (mso_mirror_restart_folder(b->pass->db, b->pool, b->pass->owner, b->id, f,
                                          url, now_sec()) != APR_SUCCESS) {
                fr->finished = 1;
                box_error(b, "cannot restart a folder's sync in the database");
                return;
            }
        }
    }
    rq = new_req(b);
    rq->folder = fr;
    fr->busy = 1;
    if (send_req(b, rq, "GET", url, NULL, fr->page_size, page_done) != APR_SUCCESS) {
        apr_pool_destroy(rq->pool);
        fr->busy = 0;
        fr->finished = 1;
        box_error(b, "a delta request could not be sent");
    }
}

/* Stores a page (or, for a skipped one, no entries and its link) with the
 * cursor that follows it. */
static void page_store(box_rt_t *b, folder_rt_t *fr, req_t *rq, mso_graph_page_t *page)
{
    const char *err = NULL;
    apr_status_t rv;
    int applied = 0;

    if ((page->next_link && !mso_graph_link_ok(b->in->graph_root, page->next_link))
        || (page->delta_link && !mso_graph_link_ok(b->in->graph_root, page->delta_link))) {
        fr->finished = 1;
        box_error(b, apr_pstrcat(b->pool, "Graph sent a link for folder ", fr->f->folder,
                                 " outside MSOAuthGraphURL; it is not followed (the access "
                                 "token would go with it)", NULL));
        return;
    }
    rv = mso_mirror_apply_page(b->pass->db, rq->pool, b->pass->owner, b->id, fr->f, page,
                               now_sec(), &applied, &err);
    if (rv == APR_EBUSY) {
        fr->finished = 1;
        b->lost = b->stop = 1;
        return;
    }
    if (rv != APR_SUCCESS) {
        fr->finished = 1;
        box_error(b, err ? err : "cannot store a page of messages");
        return;
    }
    /* The cursor strings live in the request's pool: keep copies. */
    fr->f->next_link = fr->f->next_link ? apr_pstrdup(b->pool, fr->f->next_link) : NULL;
    fr->f->delta_link = fr->f->delta_link ? apr_pstrdup(b->pool, fr->f->delta_link) : NULL;
    b->pass->st->pages++;
    b->pass->st->messages += applied;
    if (page->delta_link) {
        fr->finished = 1;           /* the round is complete */
        if (fr->page_size < MSO_SYNC_PAGE_SIZE) {
            fr->page_size = MSO_SYNC_PAGE_SIZE;
            page_size_set(b->id, fr->f->folder, fr->page_size);
        }
    }
    else if (fr->page_size < MSO_SYNC_PAGE_SIZE) {
        /* Past the big messages, probably: larger pages again, step by step. */
        fr->page_size = fr->page_size * 2 < MSO_SYNC_PAGE_SIZE ? fr->page_size * 2
                                                                : MSO_SYNC_PAGE_SIZE;
        page_size_set(b->id, fr->f->folder, fr->page_size);
    }
}

/* A page whose answer cannot be used: more than the cap kept even with its
 * strings cut (many large bodies: normal), or not JSON.
 * First, smaller pages, down to one entry (the last resort for large
 * bodies; for a broken page it isolates the culprit).
 * One entry that still cannot be read is no sender's doing (its strings
 * keep at most 4 MiB each, 1 GiB may be received, Exchange takes 150 MB a
 * message): Graph is failing, after the same position failed at 100, 25, 6
 * and 1. No answer may stop a folder for good, so the page is skipped, but
 * only when that is safe: its own link to what follows (@odata.nextLink or
 * deltaLink, read by the clip as it passed, under MSOAuthGraphURL) is
 * known, so the round resumes right after the one entry lost. That loss is
 * logged: the message's change is missing, and in a full round its row,
 * not seen, ends up marked removed. Without that link nothing resumes
 * after the page (a new round meets it again): the folder retries later
 * with the error shown. */
static void page_unreadable(box_rt_t *b, folder_rt_t *fr, req_t *rq, mso_http_response_t *resp,
                            const char *why)
{
    const char *next = resp->captured ? apr_table_get(resp->captured, "@odata.nextLink") : NULL;
    const char *delta = resp->captured ? apr_table_get(resp->captured, "@odata.deltaLink")
                                       : NULL;
    mso_graph_page_t page;

    if (fr->page_size > 1) {
        fr->page_size = fr->page_size / 4 > 0 ? fr->page_size / 4 : 1;
        page_size_set(b->id, fr->f->folder, fr->page_size);
        return;
    }
    if ((next != NULL) == (delta != NULL)) {
        fr->finished = 1;
        box_error(b, apr_pstrcat(b->pool, "Graph sent a delta page of folder ", fr->f->folder,
                                 " with a single entry that cannot be read (", why, "); it "
                                 "cannot be skipped (the page's link to what follows was not "
                                 "read); retrying later", NULL));
        return;
    }
    memset(&page, 0, sizeof(page));
    page.items = apr_array_make(rq->pool, 1, sizeof(mso_graph_msg_t));
    page.next_link = next;
    page.delta_link = delta;
    mso_log_perror(MSO_LOG_MARK, MSO_LOG_ERR, APR_SUCCESS, "mod_msoauth: account %"
                   APR_INT64_T_FMT ": Graph sent a delta page of folder %s with a single "
                   "entry that cannot be read even alone (%s); it is skipped, so the mirror "
                   "may miss that one message until the folder's next full round", b->id,
                   fr->f->folder, why);
    page_store(b, fr, rq, &page);
}

static void page_ok(box_rt_t *b, folder_rt_t *fr, req_t *rq, mso_http_response_t *resp)
{
    mso_graph_page_t page;
    const char *err = NULL;

    if (mso_graph_parse_page(rq->pool, resp->body, resp->body_len, &page, &err)
        != APR_SUCCESS) {
        page_unreadable(b, fr, rq, resp, err);
        return;
    }
    page_store(b, fr, rq, &page);
}

static void page_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    req_t *rq = baton;
    box_rt_t *b = rq->box;
    folder_rt_t *fr = rq->folder;
    mso_graph_result_t g;

    b->inflight--;
    fr->busy = 0;
    if (b->lost) {
        apr_pool_destroy(rq->pool);
        return;
    }
    if (rv == APR_ENOSPC) {
        /* More than the response cap kept even with every string cut at
         * MSO_GRAPH_MAX_STRING (many large bodies), or received. */
        page_unreadable(b, fr, rq, resp, resp->error ? resp->error : "too large");
        apr_pool_destroy(rq->pool);
        pump(b);
        return;
    }
    mso_graph_classify(rq->pool, rv, resp, &g);
    switch (g.cls) {
    case MSO_GRAPH_OK:
        page_ok(b, fr, rq, resp);
        break;
    case MSO_GRAPH_RESYNC:
        /* The delta token is gone: a new full round (Location when Graph gave
         * a usable one), converging to exactly what the folder holds. */
        if (++fr->resyncs > RESYNCS_PER_PASS) {
            fr->finished = 1;
            box_error(b, apr_pstrcat(b->pool, "Graph keeps asking folder ", fr->f->folder,
                                     " to resync: ", mso_graph_result_text(b->pool, &g), NULL));
            break;
        }
        b->pass->st->resyncs++;
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_NOTICE, APR_SUCCESS,
                       "mod_msoauth: account %" APR_INT64_T_FMT ": folder %s starts a full "
                       "sync again (%s)", b->id, fr->f->folder,
                       mso_graph_result_text(rq->pool, &g));
        if (mso_mirror_restart_folder(b->pass->db, b->pool, b->pass->owner, b->id, fr->f,
                                      g.location && mso_graph_link_ok(b->in->graph_root,
                                                                      g.location)
                                      ? apr_pstrdup(b->pool, g.location)
                                      : mso_graph_delta_url(b->pool, b->in->graph_root,
                                                            fr->f->folder),
                                      now_sec()) != APR_SUCCESS) {
            fr->finished = 1;
            box_error(b, "cannot restart a folder's sync in the database");
        }
        break;
    case MSO_GRAPH_THROTTLED:
        box_throttle(b, &g);
        b->graph_error = mso_graph_result_text(b->pool, &g);
        break;
    case MSO_GRAPH_UNAUTHORIZED:
        b->unauthorized = 1;
        b->stop = 1;
        b->graph_error = mso_graph_result_text(b->pool, &g);
        break;
    case MSO_GRAPH_FORBIDDEN:
        fr->finished = 1;
        box_error(b, apr_pstrcat(b->pool, "Graph refused to read folder ", fr->f->folder, " (",
                                 mso_graph_result_text(b->pool, &g), "): the grant needs "
                                 "Mail.Read; connect the mailbox again", NULL));
        break;
    case MSO_GRAPH_NOT_FOUND:
        fr->finished = 1;
        box_error(b, apr_pstrcat(b->pool, "folder ", fr->f->folder, " does not exist in this "
                                 "mailbox (", mso_graph_result_text(b->pool, &g), "); check "
                                 "MSOAuthSyncFolders", NULL));
        break;
    default:
        fr->finished = 1;
        box_error(b, apr_pstrcat(b->pool, "syncing folder ", fr->f->folder, " failed: ",
                                 mso_graph_result_text(b->pool, &g), NULL));
        break;
    }
    apr_pool_destroy(rq->pool);
    pump(b);
}

/* ------------------------------------------------------------------------- */

static void pump(box_rt_t *b)
{
    int i, progress = 1;

    while (progress && !b->stop && b->inflight < MSO_SYNC_PER_MAILBOX
           && apr_time_now() < b->pass->slice_end) {
        progress = 0;
        /* Actions: in queue order; an unfinished earlier action on the same
         * message holds back the later ones. */
        apr_hash_clear(b->seen);
        for (i = 0; i < b->acts->nelts && b->inflight < MSO_SYNC_PER_MAILBOX && !b->stop;
             i++) {
            act_rt_t *ar = APR_ARRAY_IDX(b->acts, i, act_rt_t *);
            const char *gid = ar->a->graph_id ? ar->a->graph_id : "";

            if (ar->state == ACT_FINISHED) {
                continue;
            }
            if (apr_hash_get(b->seen, gid, APR_HASH_KEY_STRING)) {
                continue;
            }
            apr_hash_set(b->seen, gid, APR_HASH_KEY_STRING, ar);
            if (ar->state == ACT_PENDING) {
                act_start(b, ar);
                progress = 1;
            }
        }
        if (!b->sync_due) {
            continue;
        }
        for (i = 0; i < b->folders->nelts && b->inflight < MSO_SYNC_PER_MAILBOX && !b->stop;
             i++) {
            folder_rt_t *fr = APR_ARRAY_IDX(b->folders, i, folder_rt_t *);

            if (!fr->busy && !fr->finished) {
                folder_fetch(b, fr);
                progress = 1;
            }
        }
    }
}

/* The mailbox's schedule after the pass; releases its lease. */
static void box_release(box_rt_t *b)
{
    mso_work_t *w = b->in->work;
    mso_work_done_t d;
    apr_int64_t now = now_sec();
    int i, mid_round = 0, initial = 0, backfill = 0;

    if (b->lost) {
        return;                     /* another node holds it now */
    }
    memset(&d, 0, sizeof(d));
    for (i = 0; i < b->folders->nelts; i++) {
        folder_rt_t *fr = APR_ARRAY_IDX(b->folders, i, folder_rt_t *);
        const char *ph = fr->f->phase ? fr->f->phase : "initial";

        mid_round |= !fr->finished || fr->f->next_link != NULL;
        initial |= !strcmp(ph, "initial");
        backfill |= !strcmp(ph, "backfill");
    }
    d.sync_phase = !b->folders->nelts ? w->sync_phase
                   : initial ? "initial" : backfill ? "backfill" : "idle";
    d.sync_due_at = w->sync_due_at;
    d.sync_error = NULL;
    d.sync_error_runs = 0;
    d.auth_retry = 0;
    if (b->sync_due) {
        /* Unfinished rounds go on in the next pass; complete ones wait an
         * interval. */
        d.sync_due_at = mid_round ? now : now + b->in->interval;
        if (!mid_round) {
            d.last_sync_at = now;
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

static apr_status_t box_setup(pass_t *pass, mso_sync_box_t *in, box_rt_t **out)
{
    box_rt_t *b;
    apr_array_header_t *acts = NULL, *folders = NULL;
    apr_pool_t *bp;
    int i;

    apr_pool_create(&bp, pass->pool);
    b = apr_pcalloc(bp, sizeof(*b));
    b->pass = pass;
    b->in = in;
    b->pool = bp;
    b->id = in->work->acct->id;
    b->retry_after = -1;
    b->sync_due = in->work->sync_due_at <= now_sec();
    b->acts = apr_array_make(bp, 8, sizeof(act_rt_t *));
    b->seen = apr_hash_make(bp);
    b->folders = apr_array_make(bp, 4, sizeof(folder_rt_t *));
    *out = b;
    if (in->work->queued_actions > 0
        && mso_mirror_actions(pass->db, bp, b->id, MSO_SYNC_ACTIONS, &acts) == APR_SUCCESS) {
        for (i = 0; i < acts->nelts; i++) {
            act_rt_t *ar = apr_pcalloc(bp, sizeof(*ar));

            ar->a = APR_ARRAY_IDX(acts, i, mso_action_t *);
            APR_ARRAY_PUSH(b->acts, act_rt_t *) = ar;
        }
    }
    if (b->sync_due) {
        if (mso_mirror_folders(pass->db, bp, b->id, in->folders, &folders) != APR_SUCCESS) {
            box_error(b, "cannot read the folders' sync state from the database");
            return APR_SUCCESS;
        }
        for (i = 0; i < folders->nelts; i++) {
            folder_rt_t *fr = apr_pcalloc(bp, sizeof(*fr));

            fr->f = APR_ARRAY_IDX(folders, i, mso_folder_t *);
            fr->page_size = page_size_get(b->id, fr->f->folder);
            APR_ARRAY_PUSH(b->folders, folder_rt_t *) = fr;
        }
    }
    if (!in->access_token) {
        box_error(b, "the stored access token cannot be opened (was the key ring changed?); "
                     "refreshing it");
    }
    return APR_SUCCESS;
}

apr_status_t mso_sync_run(mso_db_t *db, apr_pool_t *p, const char *owner,
                          mso_sync_box_t *boxes, int n, mso_http_multi_t *m,
                          apr_time_t slice_end, apr_time_t deadline, mso_sync_stats_t *st)
{
    pass_t pass;
    box_rt_t **rts;
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
        box_setup(&pass, &boxes[i], &rts[i]);
        st->mailboxes++;
    }
    for (i = 0; i < n; i++) {
        pump(rts[i]);
    }
    mso_http_multi_run(m, deadline - apr_time_now());
    for (i = 0; i < n; i++) {
        /* Actions read but not reached stay queued as they are. */
        box_release(rts[i]);
    }
    apr_pool_destroy(pp);
    return APR_SUCCESS;
}
