/* Attachments as a kind of Graph work (mso_sync_int.h). Graph's delta does
 * not expand attachments, so for each mirrored message whose list is due
 * (mso_attach.h) the kind reads /messages/{id}/attachments without the
 * bytes, stores the rows, then downloads the contents within
 * MSOAuthAttachmentMaxBytes one request each: a file's or an attached
 * message's $value as raw bytes, a reference's link from the beta endpoint.
 *
 * Order: the kind comes after the folders, so it only takes the room their
 * delta pages leave (the newest text is never behind an attachment), and
 * newest messages first. It shares the mailbox's 4 requests, its Retry-After
 * and its backoff. Memory: bodies go against the multi handle's download
 * budget (never pausing a delta page), at most MSO_SYNC_DOWNLOADS of them in
 * flight per pass. Completed ones wait in a batch of at most STORE_BATCH
 * bytes (plus the one that filled it), stored in one transaction and freed:
 * a commit per attachment would cost PostgreSQL more than the writes. A full
 * batch is written on the pass's writer thread (mso_sync_writer.c) while the
 * next one downloads, so two batches may be held at once. The
 * work is read at the start of a pass and again when it runs out after new
 * pages or lists were stored. */
#include <string.h>

#include <apr_hash.h>
#include <apr_strings.h>

#include "mso_attach.h"
#include "mso_graph.h"
#include "mso_log.h"
#include "mso_sync_int.h"

#define READ_LISTS 50               /* messages read at once to list */
#define READ_ITEMS 50               /* pending attachments read at once */
#define READS_PER_PASS 20           /* ... and how often in a pass */
#define LIST_PAGES 10               /* pages of one message's list followed */
#define STORE_BATCH (8 * 1024 * 1024)   /* bytes of contents stored per transaction */
#define STORE_BATCH_COUNT 32

typedef enum { STEP_LIST, STEP_CONTENT, STEP_LINK } att_step_e;

/* A message's listing: its pages gathered in its own pool. */
typedef struct {
    mso_attach_msg_t *m;
    apr_pool_t *pool;
    apr_array_header_t *atts;       /* mso_graph_att_t */
    int pages;
} list_rt_t;

/* A content downloaded (or a link read), waiting in the batch: its pool
 * holds the bytes. */
typedef struct {
    mso_attach_item_t *it;
    apr_pool_t *pool;
    const char *data;
    apr_size_t len;
} fetched_t;

/* A content or link request: the item, and the pool of a content's body. */
typedef struct {
    mso_attach_item_t *it;
    apr_pool_t *pool;
} fetch_rt_t;

typedef struct {
    apr_array_header_t *lists;      /* list_rt_t*, to start in order */
    apr_array_header_t *items;      /* mso_attach_item_t*, to start in order */
    int next_list, next_item;
    apr_hash_t *started;            /* keys started this pass: never twice */
    int pages_seen;                 /* b->pages_stored at the last read */
    int stored;                     /* lists stored since the last read */
    int reads;
    int fetching;                   /* contents and links in flight */
    apr_array_header_t *batch;      /* fetched_t, to store together */
    apr_size_t batch_bytes;
} att_t;

static void list_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void content_done(void *baton, apr_status_t rv, mso_http_response_t *resp);

/* Reads the work not started yet in this pass; 1 when there is some. */
static int att_read(mso_box_t *b, att_t *t)
{
    apr_array_header_t *ms = NULL, *its = NULL;
    int i;

    t->reads++;
    t->pages_seen = b->pages_stored;
    t->stored = 0;
    t->lists = apr_array_make(b->pool, 8, sizeof(list_rt_t *));
    t->items = apr_array_make(b->pool, 8, sizeof(mso_attach_item_t *));
    t->next_list = t->next_item = 0;
    if (mso_attach_due_messages(mso_sync_db(b->pass), b->pool, b->id, READ_LISTS, &ms)
            != APR_SUCCESS
        || mso_attach_pending(mso_sync_db(b->pass), b->pool, b->id, READ_ITEMS, &its)
            != APR_SUCCESS) {
        return 0;
    }
    for (i = 0; i < ms->nelts; i++) {
        mso_attach_msg_t *m = APR_ARRAY_IDX(ms, i, mso_attach_msg_t *);
        const char *key = apr_pstrcat(b->pool, "L", m->graph_id, NULL);
        list_rt_t *lr;

        if (apr_hash_get(t->started, key, APR_HASH_KEY_STRING)) {
            continue;
        }
        apr_hash_set(t->started, key, APR_HASH_KEY_STRING, key);
        lr = apr_pcalloc(b->pool, sizeof(*lr));
        lr->m = m;
        APR_ARRAY_PUSH(t->lists, list_rt_t *) = lr;
    }
    for (i = 0; i < its->nelts; i++) {
        mso_attach_item_t *it = APR_ARRAY_IDX(its, i, mso_attach_item_t *);
        const char *key = apr_pstrcat(b->pool, "C", it->graph_id, "/", it->attachment_id,
                                      NULL);

        if (apr_hash_get(t->started, key, APR_HASH_KEY_STRING)) {
            continue;
        }
        apr_hash_set(t->started, key, APR_HASH_KEY_STRING, key);
        APR_ARRAY_PUSH(t->items, mso_attach_item_t *) = it;
    }
    return t->lists->nelts + t->items->nelts > 0;
}

/* A failure Graph may get over: one more try for the item, and the
 * mailbox backs off as for any Graph error. */
static void att_transient(mso_box_t *b, const char *what, const mso_graph_result_t *g)
{
    mso_sync_error(b, apr_pstrcat(b->pool, what, ": ", mso_graph_result_text(b->pool, g),
                                  NULL));
}

/* ---- lists --------------------------------------------------------------- */

static void list_fetch(mso_box_t *b, list_rt_t *lr, const char *url)
{
    mso_req_t *rq = mso_sync_req(b, lr, STEP_LIST);

    if (mso_sync_send(rq, "GET", url, NULL, 0, list_done) != APR_SUCCESS) {
        apr_pool_destroy(lr->pool);
        mso_sync_error(b, "an attachment list request could not be sent");
    }
}

static void list_start(mso_box_t *b, list_rt_t *lr)
{
    if (!mso_graph_id_ok(lr->m->graph_id)) {
        int gave_up = 0;

        mso_attach_list_failed(mso_sync_db(b->pass), b->pool, b->pass->owner, b->id, lr->m, 1,
                               &gave_up);
        return;
    }
    apr_pool_create(&lr->pool, b->pool);
    lr->atts = apr_array_make(lr->pool, 4, sizeof(mso_graph_att_t));
    list_fetch(b, lr, mso_graph_attachments_url(lr->pool, b->in->mailbox_url, lr->m->graph_id));
}

/* The listing gives up on this message (it is gone, or Graph refuses it):
 * logged, the mailbox goes on. */
static void list_give_up(mso_box_t *b, list_rt_t *lr, int at_once, const char *why)
{
    int gave_up = 0;

    if (mso_attach_list_failed(mso_sync_db(b->pass), b->pool, b->pass->owner, b->id, lr->m, at_once,
                               &gave_up) == APR_EBUSY) {
        b->lost = b->stop = 1;
    }
    if (gave_up) {
        mso_log_perror(MSO_LOG_MARK, at_once ? MSO_LOG_INFO : MSO_LOG_WARNING, APR_SUCCESS,
                       "mod_msoauth: account %" APR_INT64_T_FMT ": the attachments of a "
                       "message are not mirrored: %s", b->id, why);
    }
}

static void list_store(mso_box_t *b, list_rt_t *lr, mso_req_t *rq)
{
    const char *err = NULL;
    int stale = 0;
    apr_status_t rv;

    rv = mso_attach_store_list(mso_sync_db(b->pass), rq->pool, b->pass->owner, b->id, lr->m,
                               lr->atts, b->in->attach_max_bytes, mso_sync_now(), &stale, &err);
    if (rv == APR_EBUSY) {
        b->lost = b->stop = 1;
    }
    else if (rv != APR_SUCCESS) {
        mso_sync_error(b, err ? err : "cannot store an attachment list");
    }
    else if (!stale) {
        b->pass->st->attach_lists++;
        ((att_t *)b->kind[MSO_KIND_ATTACH])->stored++;
    }
}

static void list_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    list_rt_t *lr = rq->item;
    apr_array_header_t *atts = NULL;
    const char *next = NULL, *err = NULL;
    mso_graph_result_t g;
    int skipped = 0, more = 0;

    mso_sync_answered(rq);
    if (b->lost) {
        apr_pool_destroy(rq->pool);
        apr_pool_destroy(lr->pool);
        return;
    }
    mso_graph_classify(rq->pool, rv, resp, &g);
    switch (g.cls) {
    case MSO_GRAPH_OK:
        /* Parsed into the listing's pool: the answer's goes now. */
        if (mso_graph_parse_attachments(lr->pool, resp->body, resp->body_len, &atts, &next,
                                        &skipped, &err) != APR_SUCCESS) {
            list_give_up(b, lr, 0, err);
            break;
        }
        apr_array_cat(lr->atts, atts);
        if (next && (!mso_graph_link_ok(b->in->graph_root, next)
                     || ++lr->pages >= LIST_PAGES)) {
            list_give_up(b, lr, 1, "Graph's attachment list goes on outside MSOAuthGraphURL "
                                   "or beyond 10 pages");
            break;
        }
        if (next) {
            more = 1;
            list_fetch(b, lr, next);
            break;
        }
        list_store(b, lr, rq);
        break;
    case MSO_GRAPH_THROTTLED:
        mso_sync_throttle(b, &g);
        break;
    case MSO_GRAPH_UNAUTHORIZED:
        mso_sync_unauthorized(b, &g);
        break;
    case MSO_GRAPH_NOT_FOUND:
        list_give_up(b, lr, 1, "Graph no longer has the message");
        break;
    case MSO_GRAPH_FORBIDDEN:
    case MSO_GRAPH_FAILED:
    case MSO_GRAPH_RESYNC:
        list_give_up(b, lr, 1, mso_graph_result_text(rq->pool, &g));
        break;
    default:
        list_give_up(b, lr, 0, mso_graph_result_text(rq->pool, &g));
        att_transient(b, "listing a message's attachments failed", &g);
        break;
    }
    if (!more) {
        apr_pool_destroy(lr->pool);
    }
    mso_sync_finished(rq);
}

/* ---- contents ------------------------------------------------------------ */

static void item_state(mso_box_t *b, mso_attach_item_t *it, const char *state,
                       const char *error)
{
    if (mso_attach_set_state(mso_sync_db(b->pass), b->pool, b->pass->owner, b->id, it->graph_id,
                             it->attachment_id, state, error, mso_sync_now()) == APR_EBUSY) {
        b->lost = b->stop = 1;
    }
}

/* A batch on its way to the database: its contents, and the pools that
 * hold their bytes until it is written. */
typedef struct {
    mso_box_t *b;                   /* the pass's thread's: written only */
    const char *owner;
    apr_int64_t id;
    apr_pool_t *pool;               /* this, c and pools */
    mso_attach_content_t *c;
    apr_pool_t **pools;
    int n;
    apr_int64_t now;
} flush_t;

static apr_status_t flush_write(mso_db_t *db, apr_pool_t *p, void *baton, const char **err)
{
    flush_t *f = baton;

    return mso_attach_store_contents(db, p, f->owner, f->id, f->c, f->n, f->now, err);
}

static void flush_written(void *baton, apr_status_t rv, const char *err)
{
    flush_t *f = baton;
    mso_box_t *b = f->b;
    int i;

    if (rv == APR_EBUSY) {
        b->lost = b->stop = 1;
    }
    else if (rv != APR_SUCCESS) {
        mso_sync_error(b, err ? err : "cannot store attachments");
    }
    for (i = 0; i < f->n; i++) {
        if (rv == APR_SUCCESS && f->c[i].stored) {
            b->pass->st->attach_stored++;
            b->pass->st->attach_bytes += (apr_int64_t)f->c[i].len;
        }
        apr_pool_destroy(f->pools[i]);
    }
    apr_pool_destroy(f->pool);
}

/* Stores the batch in one transaction, on the pass's writer thread while
 * the next downloads go on; its bytes are freed once written. */
static void att_flush(mso_box_t *b, att_t *t)
{
    apr_pool_t *fp;
    flush_t *f;
    int i, n = t->batch->nelts;

    if (!n) {
        return;
    }
    apr_pool_create(&fp, b->pool);
    f = apr_pcalloc(fp, sizeof(*f));
    f->b = b;
    f->owner = b->pass->owner;
    f->id = b->id;
    f->pool = fp;
    f->n = n;
    f->now = mso_sync_now();
    f->c = apr_pcalloc(fp, sizeof(*f->c) * n);
    f->pools = apr_pcalloc(fp, sizeof(*f->pools) * n);
    for (i = 0; i < n; i++) {
        fetched_t *g = &APR_ARRAY_IDX(t->batch, i, fetched_t);

        f->c[i].graph_id = g->it->graph_id;
        f->c[i].attachment_id = g->it->attachment_id;
        f->c[i].last_modified = g->it->last_modified;
        f->c[i].data = g->data;
        f->c[i].len = g->len;
        f->pools[i] = g->pool;
    }
    apr_array_clear(t->batch);
    t->batch_bytes = 0;
    if (b->lost) {
        flush_written(f, APR_EBUSY, NULL);
        return;
    }
    mso_sync_write(b->pass, flush_write, flush_written, f);
}

/* A content in: stored with others once the batch is full, or when nothing
 * else of the mailbox is on its way. */
static void att_keep(mso_box_t *b, att_t *t, mso_attach_item_t *it, apr_pool_t *pool,
                     const char *data, apr_size_t len)
{
    fetched_t *f = apr_array_push(t->batch);

    f->it = it;
    f->pool = pool;
    f->data = data;
    f->len = len;
    t->batch_bytes += len;
    if (t->batch_bytes >= STORE_BATCH || t->batch->nelts >= STORE_BATCH_COUNT
        || !t->fetching) {
        att_flush(b, t);
    }
}

static void item_start(mso_box_t *b, att_t *t, mso_attach_item_t *it)
{
    apr_int64_t cap = b->in->attach_max_bytes;
    fetch_rt_t *fr = apr_pcalloc(b->pool, sizeof(*fr));
    mso_req_t *rq;

    if (!mso_graph_id_ok(it->graph_id) || !mso_graph_id_ok(it->attachment_id)) {
        item_state(b, it, "failed", "not a Graph id");
        return;
    }
    if (!strcmp(it->kind, "reference")) {
        if (cap <= 0) {
            item_state(b, it, "large", NULL);
            return;
        }
        fr->it = it;
        rq = mso_sync_req(b, fr, STEP_LINK);
        if (mso_sync_send(rq, "GET", mso_graph_attachment_link_url(rq->pool, b->in->mailbox_url,
                                                                   it->graph_id,
                                                                   it->attachment_id),
                          NULL, 0, content_done) != APR_SUCCESS) {
            mso_sync_error(b, "an attachment request could not be sent");
            return;
        }
        t->fetching++;
        return;
    }
    /* Larger than the limit (changed since it was listed): never downloaded. */
    if (cap <= 0 || it->size > cap) {
        item_state(b, it, "large", NULL);
        return;
    }
    /* The body lives in a pool of its own: it waits in the batch after the
     * request is done. */
    fr->it = it;
    apr_pool_create(&fr->pool, b->pool);
    rq = mso_sync_req(b, fr, STEP_CONTENT);
    if (mso_sync_send_raw(rq, fr->pool, mso_graph_attachment_value_url(
                              rq->pool, b->in->mailbox_url, it->graph_id, it->attachment_id),
                          (apr_size_t)cap, content_done) != APR_SUCCESS) {
        apr_pool_destroy(fr->pool);
        mso_sync_error(b, "an attachment request could not be sent");
        return;
    }
    t->fetching++;
    b->pass->downloads++;
}

static void content_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    att_t *t = b->kind[MSO_KIND_ATTACH];
    fetch_rt_t *fr = rq->item;
    mso_attach_item_t *it = fr->it;
    apr_pool_t *ip = fr->pool;
    mso_graph_result_t g;
    const char *url = NULL, *err = NULL;
    int gave_up = 0;

    mso_sync_answered(rq);
    t->fetching--;
    fr->pool = NULL;
    if (rq->step == STEP_CONTENT) {
        b->pass->downloads--;
    }
    if (b->lost) {
        if (ip) {
            apr_pool_destroy(ip);
        }
        apr_pool_destroy(rq->pool);
        return;
    }
    if (rv == APR_ENOSPC && rq->step == STEP_CONTENT) {
        /* More bytes than the limit: never kept, served on demand. */
        apr_pool_destroy(ip);
        ip = NULL;
        item_state(b, it, "large", NULL);
        rv = APR_SUCCESS;
        goto done;
    }
    mso_graph_classify(rq->pool, rv, resp, &g);
    switch (g.cls) {
    case MSO_GRAPH_OK:
        if (rq->step == STEP_CONTENT) {
            att_keep(b, t, it, ip, resp->body, resp->body_len);
            ip = NULL;              /* the batch's now */
        }
        else if (mso_graph_parse_link(rq->pool, resp->body, resp->body_len, &url, &err)
                 == APR_SUCCESS) {
            apr_pool_create(&ip, b->pool);
            url = apr_pstrdup(ip, url);
            att_keep(b, t, it, ip, url, strlen(url));
            ip = NULL;
        }
        else {
            item_state(b, it, "failed", err);
        }
        break;
    case MSO_GRAPH_THROTTLED:
        mso_sync_throttle(b, &g);
        break;
    case MSO_GRAPH_UNAUTHORIZED:
        mso_sync_unauthorized(b, &g);
        break;
    case MSO_GRAPH_NOT_FOUND:
    case MSO_GRAPH_FORBIDDEN:
    case MSO_GRAPH_FAILED:
    case MSO_GRAPH_RESYNC:
        /* Refused for good (gone, not allowed, no beta): on demand only. */
        item_state(b, it, "failed", mso_graph_result_text(rq->pool, &g));
        break;
    default:
        if (mso_attach_fetch_failed(mso_sync_db(b->pass), b->pool, b->pass->owner, b->id,
                                    it->graph_id, it->attachment_id,
                                    mso_graph_result_text(rq->pool, &g),
                                    mso_sync_now(), &gave_up) == APR_EBUSY) {
            b->lost = b->stop = 1;
            break;
        }
        if (gave_up) {
            mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, APR_SUCCESS,
                           "mod_msoauth: account %" APR_INT64_T_FMT ": an attachment is not "
                           "downloaded after %d tries (%s); it is served on demand", b->id,
                           MSO_ATTACH_TRIES, mso_graph_result_text(rq->pool, &g));
        }
        att_transient(b, "downloading an attachment failed", &g);
        break;
    }

done:
    if (ip) {
        apr_pool_destroy(ip);
    }
    /* The last one of the mailbox: what waits is stored now. */
    if (!t->fetching) {
        att_flush(b, t);
    }
    mso_sync_finished(rq);
}

/* ---- the kind ------------------------------------------------------------ */

static void att_setup(mso_box_t *b)
{
    att_t *t = apr_pcalloc(b->pool, sizeof(*t));

    t->started = apr_hash_make(b->pool);
    t->batch = apr_array_make(b->pool, 8, sizeof(fetched_t));
    t->lists = apr_array_make(b->pool, 1, sizeof(list_rt_t *));
    t->items = apr_array_make(b->pool, 1, sizeof(mso_attach_item_t *));
    b->kind[MSO_KIND_ATTACH] = t;
    if (b->in->work->attach_work) {
        att_read(b, t);
    }
}

static int att_pump(mso_box_t *b)
{
    att_t *t = b->kind[MSO_KIND_ATTACH];
    int started = 0;

    while (mso_sync_room(b) && !b->lost) {
        if (t->next_list < t->lists->nelts) {
            list_start(b, APR_ARRAY_IDX(t->lists, t->next_list++, list_rt_t *));
            started = 1;
        }
        else if (t->next_item < t->items->nelts) {
            mso_attach_item_t *it = APR_ARRAY_IDX(t->items, t->next_item, mso_attach_item_t *);

            if (strcmp(it->kind, "reference") && b->pass->downloads >= MSO_SYNC_DOWNLOADS) {
                break;          /* the pass's bodies: wait for one to finish */
            }
            t->next_item++;
            item_start(b, t, it);
            started = 1;
        }
        else if (t->reads >= READS_PER_PASS
                 || (t->pages_seen == b->pages_stored && !t->stored)
                 || !att_read(b, t)) {
            break;
        }
    }
    return started;
}

/* Whatever still waits is stored before the lease goes, and its outcome
 * (a lost lease, an error) is the mailbox's before its schedule is made. */
static void att_release(mso_box_t *b, mso_work_done_t *d, apr_int64_t now)
{
    (void)d;
    (void)now;
    att_flush(b, b->kind[MSO_KIND_ATTACH]);
    mso_sync_settle(b->pass);
}

const mso_sync_kind_t mso_sync_attach = {"attachments", att_setup, att_pump, att_release};
