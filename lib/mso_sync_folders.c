/* The mirror's folders as a kind of Graph work (mso_sync_int.h): each
 * folder of MSOAuthSyncFolders follows its delta round page after page, each
 * page stored in one transaction with the cursor that follows it. */
#include <string.h>

#include <apr_atomic.h>
#include <apr_strings.h>
#include <apr_thread_proc.h>

#include "mso_graph.h"
#include "mso_log.h"
#include "mso_sync_int.h"

#define RESYNCS_PER_PASS 2          /* a folder restarting again and again waits */

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

typedef struct {
    mso_folder_t *f;
    int busy, finished, resyncs, page_size;
} folder_rt_t;

static void page_done(void *baton, apr_status_t rv, mso_http_response_t *resp);

static void folder_fetch(mso_box_t *b, folder_rt_t *fr)
{
    mso_folder_t *f = fr->f;
    const char *url = f->next_link ? f->next_link : f->delta_link;
    mso_req_t *rq;

    if (!url || !mso_graph_link_ok(b->in->graph_root, url)) {
        /* No cursor yet, or one that is not under MSOAuthGraphURL (changed
         * since): a full round, newest first. */
        url = mso_graph_delta_url(b->pool, b->in->mailbox_url, f->folder);
        if (f->next_link || f->delta_link) {
            if (mso_mirror_restart_folder(mso_sync_db(b->pass), b->pool, b->pass->owner, b->id, f,
                                          url, mso_sync_now()) != APR_SUCCESS) {
                fr->finished = 1;
                mso_sync_error(b, "cannot restart a folder's sync in the database");
                return;
            }
        }
    }
    rq = mso_sync_req(b, fr, 0);
    fr->busy = 1;
    if (mso_sync_send(rq, "GET", url, NULL, fr->page_size, page_done) != APR_SUCCESS) {
        fr->busy = 0;
        fr->finished = 1;
        mso_sync_error(b, "a delta request could not be sent");
    }
}

/* Stores a page (or, for a skipped one, no entries and its link) with the
 * cursor that follows it. */
static void page_store(mso_box_t *b, folder_rt_t *fr, mso_req_t *rq,
                       mso_graph_page_t *page)
{
    const char *err = NULL;
    apr_status_t rv;
    int applied = 0;

    if ((page->next_link && !mso_graph_link_ok(b->in->graph_root, page->next_link))
        || (page->delta_link && !mso_graph_link_ok(b->in->graph_root, page->delta_link))) {
        fr->finished = 1;
        mso_sync_error(b, apr_pstrcat(b->pool, "Graph sent a link for folder ", fr->f->folder,
                                 " outside MSOAuthGraphURL; it is not followed (the access "
                                 "token would go with it)", NULL));
        return;
    }
    rv = mso_mirror_apply_page(mso_sync_db(b->pass), rq->pool, b->pass->owner, b->id, fr->f, page,
                               mso_sync_now(), &applied, &err);
    if (rv == APR_EBUSY) {
        fr->finished = 1;
        b->lost = b->stop = 1;
        return;
    }
    if (rv != APR_SUCCESS) {
        fr->finished = 1;
        mso_sync_error(b, err ? err : "cannot store a page of messages");
        return;
    }
    /* The cursor strings live in the request's pool: keep copies. */
    fr->f->next_link = fr->f->next_link ? apr_pstrdup(b->pool, fr->f->next_link) : NULL;
    fr->f->delta_link = fr->f->delta_link ? apr_pstrdup(b->pool, fr->f->delta_link) : NULL;
    b->pass->st->pages++;
    b->pass->st->messages += applied;
    b->pages_stored++;
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
static void page_unreadable(mso_box_t *b, folder_rt_t *fr, mso_req_t *rq,
                            mso_http_response_t *resp, const char *why)
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
        mso_sync_error(b, apr_pstrcat(b->pool, "Graph sent a delta page of folder ", fr->f->folder,
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

static void page_ok(mso_box_t *b, folder_rt_t *fr, mso_req_t *rq,
                    mso_http_response_t *resp)
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
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    folder_rt_t *fr = rq->item;
    mso_graph_result_t g;

    mso_sync_answered(rq);
    fr->busy = 0;
    if (b->lost) {
        apr_pool_destroy(rq->pool);
        return;
    }
    if (rv == APR_ENOSPC) {
        /* More than the response cap kept even with every string cut at
         * MSO_GRAPH_MAX_STRING (many large bodies), or received. */
        page_unreadable(b, fr, rq, resp, resp->error ? resp->error : "too large");
        mso_sync_finished(rq);
        return;
    }
    mso_graph_classify(rq->pool, rv, resp, &g);
    if (mso_sync_mailbox_problem(b, &g)) {
        fr->finished = 1;
        mso_sync_finished(rq);
        return;
    }
    switch (g.cls) {
    case MSO_GRAPH_OK:
        page_ok(b, fr, rq, resp);
        break;
    case MSO_GRAPH_RESYNC:
        /* The delta token is gone: a new full round (Location when Graph gave
         * a usable one), converging to exactly what the folder holds. */
        if (++fr->resyncs > RESYNCS_PER_PASS) {
            fr->finished = 1;
            mso_sync_error(b, apr_pstrcat(b->pool, "Graph keeps asking folder ", fr->f->folder,
                                     " to resync: ", mso_graph_result_text(b->pool, &g), NULL));
            break;
        }
        b->pass->st->resyncs++;
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_NOTICE, APR_SUCCESS,
                       "mod_msoauth: account %" APR_INT64_T_FMT ": folder %s starts a full "
                       "sync again (%s)", b->id, fr->f->folder,
                       mso_graph_result_text(rq->pool, &g));
        if (mso_mirror_restart_folder(mso_sync_db(b->pass), b->pool, b->pass->owner, b->id, fr->f,
                                      g.location && mso_graph_link_ok(b->in->graph_root,
                                                                      g.location)
                                      ? apr_pstrdup(b->pool, g.location)
                                      : mso_graph_delta_url(b->pool, b->in->mailbox_url,
                                                            fr->f->folder),
                                      mso_sync_now()) != APR_SUCCESS) {
            fr->finished = 1;
            mso_sync_error(b, "cannot restart a folder's sync in the database");
        }
        break;
    case MSO_GRAPH_THROTTLED:
        mso_sync_throttle(b, &g);
        break;
    case MSO_GRAPH_UNAUTHORIZED:
        mso_sync_unauthorized(b, &g);
        break;
    case MSO_GRAPH_FORBIDDEN:
        fr->finished = 1;
        mso_sync_error(b, apr_pstrcat(b->pool, "Graph refused to read folder ", fr->f->folder, " (",
                                 mso_graph_result_text(b->pool, &g), b->in->app_only
                                 ? "): the app needs the application permission Mail.Read "
                                   "with admin consent"
                                 : "): the grant needs Mail.Read; connect the mailbox again",
                                 NULL));
        break;
    case MSO_GRAPH_NOT_FOUND:
        fr->finished = 1;
        mso_sync_error(b, apr_pstrcat(b->pool, "folder ", fr->f->folder, " does not exist in this "
                                 "mailbox (", mso_graph_result_text(b->pool, &g), "); check "
                                 "MSOAuthSyncFolders", NULL));
        break;
    default:
        fr->finished = 1;
        mso_sync_error(b, apr_pstrcat(b->pool, "syncing folder ", fr->f->folder, " failed: ",
                                 mso_graph_result_text(b->pool, &g), NULL));
        break;
    }
    mso_sync_finished(rq);
}


static void folders_setup(mso_box_t *b)
{
    apr_array_header_t *folders = apr_array_make(b->pool, 4, sizeof(folder_rt_t *));
    apr_array_header_t *rows = NULL;
    int i;

    b->kind[MSO_KIND_FOLDERS] = folders;
    if (!b->sync_due) {
        return;
    }
    if (mso_mirror_folders(mso_sync_db(b->pass), b->pool, b->id, b->in->folders, &rows)
        != APR_SUCCESS) {
        mso_sync_error(b, "cannot read the folders' sync state from the database");
        return;
    }
    for (i = 0; i < rows->nelts; i++) {
        folder_rt_t *fr = apr_pcalloc(b->pool, sizeof(*fr));

        fr->f = APR_ARRAY_IDX(rows, i, mso_folder_t *);
        fr->page_size = page_size_get(b->id, fr->f->folder);
        APR_ARRAY_PUSH(folders, folder_rt_t *) = fr;
    }
}

static int folders_pump(mso_box_t *b)
{
    apr_array_header_t *folders = b->kind[MSO_KIND_FOLDERS];
    int i, started = 0;

    for (i = 0; b->sync_due && i < folders->nelts && mso_sync_room(b); i++) {
        folder_rt_t *fr = APR_ARRAY_IDX(folders, i, folder_rt_t *);

        if (!fr->busy && !fr->finished) {
            folder_fetch(b, fr);
            started = 1;
        }
    }
    return started;
}

/* The phase shown, and when the folders are due again: unfinished rounds go
 * on in the next pass, complete ones wait an interval. */
static void folders_release(mso_box_t *b, mso_work_done_t *d, apr_int64_t now)
{
    apr_array_header_t *folders = b->kind[MSO_KIND_FOLDERS];
    int i, mid_round = 0, initial = 0, backfill = 0;

    for (i = 0; i < folders->nelts; i++) {
        folder_rt_t *fr = APR_ARRAY_IDX(folders, i, folder_rt_t *);
        const char *ph = fr->f->phase ? fr->f->phase : "initial";

        mid_round |= !fr->finished || fr->f->next_link != NULL;
        initial |= !strcmp(ph, "initial");
        backfill |= !strcmp(ph, "backfill");
    }
    if (folders->nelts) {
        d->sync_phase = initial ? "initial" : backfill ? "backfill" : "idle";
    }
    if (b->sync_due) {
        d->sync_due_at = mid_round ? now : now + b->in->interval;
        if (!mid_round) {
            d->last_sync_at = now;
        }
    }
}

const mso_sync_kind_t mso_sync_folders = {"folders", folders_setup, folders_pump,
                                          folders_release};
