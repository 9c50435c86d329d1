/* Outgoing mail as a kind of Graph work (mso_sync_int.h): the mailbox's
 * queued rows of msoauth_outbox, each a small state machine whose every step
 * is committed before the call that depends on it (the phases are in
 * mso_outbox.h).
 *
 * Exactly once. Graph's send carries no idempotency key, so a row is sent as
 * a draft of its own: the draft is created carrying the row's marker (a
 * random value committed on the row before the create call, in the
 * single-value extended property MSO_GRAPH_MARKER_PROPERTY), its id is
 * committed before anything else touches it, and the send is the send of
 * that one draft. A draft can be sent once: afterwards it is no draft any
 * more (with immutable ids it keeps its id in Sent Items). So:
 *  - never twice: a create whose outcome is unknown (phase creating) is
 *    followed by a look-up of the marker before any new create; duplicates
 *    found are deleted while still drafts, and only the draft whose id is
 *    committed is ever sent. A send whose outcome is unknown (phase sending)
 *    is followed by a look at that draft: no draft any more, or no longer in
 *    Drafts (submitted, in the Outbox), means sent. Graph carries out a send
 *    asynchronously (202), so that look waits SETTLE seconds after the send
 *    call started, committed with it as retry_at before the call.
 *  - never lost: the row stays queued until Graph's answer or the look says
 *    sent, or the failure is Graph's refusal of this message.
 *  - one node: every commit is fenced by the mailbox's work lease, so only
 *    its holder moves a row on, and a node that lost it stops.
 * Attachments are added one at a time, each committed as adding before its
 * call and as added with its Graph id after; one whose outcome is unknown is
 * looked for in the draft's attachment list (by name, among those whose ids
 * are not committed) before it is added again, and extra copies are deleted.
 *
 * Order. Rows start in queue order, several at once within the mailbox's 4
 * requests: Graph's send is asynchronous (202, delivered later), so sending
 * one after the other would not order deliveries either, and it would halve
 * what a mailbox sends. Rows that reply to the same message do go one after
 * the other, so a thread's replies are submitted in queue order.
 *
 * Memory. Bodies are read when their draft is made, attachments one chunk at
 * a time (at most MSO_GRAPH_UPLOAD_CHUNK, or one whole attachment under 3 MB
 * with its base64): each row has at most one request in flight. Request
 * bodies over SMALL_BODY count against a budget per pass (one job thread):
 * at most BUDGET bytes, or one request's when that alone is more, so a pass
 * holds at most BUDGET + MSO_GRAPH_MAX_REQUEST of them (plus the raw bytes
 * of one attachment being encoded). A row over the budget waits until a
 * request of any mailbox gives its bytes back. */
#include <stdlib.h>
#include <string.h>

#include <apr_atomic.h>
#include <apr_strings.h>
#include <apr_thread_proc.h>

#include "mso_crypto.h"
#include "mso_graph.h"
#include "mso_log.h"
#include "mso_outbox.h"
#include "mso_sync_int.h"

#define SETTLE 10                   /* seconds before an unknown outcome is looked at */
#define BUDGET (32 * 1024 * 1024)
#define SMALL_BODY 65536
#define SHARED_KEY "mso_sync_send:shared"
#define PENDING_MAX 256             /* deferred steps before they are written anyway */

typedef enum { SR_PENDING, SR_BUSY, SR_WAITING, SR_FINISHED } sr_state_e;
typedef enum {
    S_CREATE, S_LOOKUP, S_STATE, S_FOLDER, S_SEND, S_ATT_LIST, S_ATT_POST, S_ATT_SESSION,
    S_ATT_PUT, S_DISCARD
} step_e;

typedef struct {
    mso_outbox_t *o;
    sr_state_e state;
    int checked;                    /* passed the checks made before Graph */
    int resolve;                    /* an earlier call's outcome is unknown: look first */
    int att_resolve;                /* the attachment being added: list the draft's first */
    int lost_draft;                 /* the draft's id is gone: look up the marker */
    int premark;                    /* its creating step waits in the pending writes */
    int fresh;                      /* creating is committed, the create call not made */
    apr_status_t commit_rv;         /* the outcome of its last write */
    int need_folder;                /* the look needs the Drafts folder's id */
    int verified;                   /* the draft's attachments were listed before the send */
    int draft_uncommitted;          /* the draft's id is known, committed with the send */
    int done_after_discard;         /* sent or failed: only the discards are left */
    apr_array_header_t *discard;    /* URLs to DELETE (duplicates, a failed row's draft) */
    mso_outbox_att_t *att;          /* the attachment being added */
    const char *upload_url;
    apr_int64_t upload_off;
    const char *parent;             /* the state check's parentFolderId */
    apr_size_t held;                /* budget bytes of the request in flight */
} sr_t;

typedef struct {
    apr_array_header_t *rows;       /* sr_t* */
    apr_hash_t *seen;               /* pump's scratch: reply targets of earlier rows */
    const char *drafts_id;          /* the Drafts folder's id, once asked */
    int sent;
} outbox_t;

/* A step waiting to be written with the next transaction. */
typedef struct {
    mso_box_t *b;
    sr_t *sr;
    mso_outbox_step_t s;
    int applied;                    /* already in memory; else applied once committed */
} pend_t;

/* Shared by the pass's mailboxes (one thread): the memory budget and the
 * steps waiting to be written. */
typedef struct {
    apr_size_t held;
    apr_array_header_t *waiting;    /* mso_box_t* */
    apr_array_header_t *pending;    /* pend_t */
} shared_t;

static shared_t *shared_of(mso_box_t *b)
{
    void *v = NULL;
    shared_t *sh;

    apr_pool_userdata_get(&v, SHARED_KEY, b->pass->pool);
    if (v) {
        return v;
    }
    sh = apr_pcalloc(b->pass->pool, sizeof(*sh));
    sh->waiting = apr_array_make(b->pass->pool, 8, sizeof(mso_box_t *));
    sh->pending = apr_array_make(b->pass->pool, 64, sizeof(pend_t));
    apr_pool_userdata_setn(sh, SHARED_KEY, NULL, b->pass->pool);
    return sh;
}

/* 1 when n bytes may be held now (small ones always); else the mailbox is
 * woken when bytes are given back. */
static int budget_take(mso_box_t *b, sr_t *sr, apr_size_t n)
{
    shared_t *bu;
    int i;

    if (n <= SMALL_BODY) {
        return 1;
    }
    bu = shared_of(b);
    if (bu->held == 0 || bu->held + n <= BUDGET) {
        bu->held += n;
        sr->held = n;
        return 1;
    }
    for (i = 0; i < bu->waiting->nelts; i++) {
        if (APR_ARRAY_IDX(bu->waiting, i, mso_box_t *) == b) {
            return 0;
        }
    }
    APR_ARRAY_PUSH(bu->waiting, mso_box_t *) = b;
    return 0;
}

/* Gives the row's bytes back; wake: offer the waiting mailboxes room (from
 * a done callback only). */
static void budget_give(mso_box_t *b, sr_t *sr, int wake)
{
    shared_t *bu;
    apr_array_header_t *w;
    int i;

    if (!sr->held) {
        return;
    }
    bu = shared_of(b);
    bu->held -= sr->held;
    sr->held = 0;
    if (!wake || !bu->waiting->nelts) {
        return;
    }
    w = apr_array_copy(b->pool, bu->waiting);
    apr_array_clear(bu->waiting);
    for (i = 0; i < w->nelts; i++) {
        mso_box_t *o = APR_ARRAY_IDX(w, i, mso_box_t *);

        if (o != b) {
            mso_sync_pump(o);       /* b itself is pumped when its request finishes */
        }
    }
}

/* ------------------------------------------------------------------------- */
/* Uploads in progress, across passes. A pass starts requests for 1.5 s, an
 * attachment of 150 MB takes 40 fragments: its upload session goes on in
 * the next pass from where it stopped, in this process (another process or
 * node starts a new session: the URL is pre-authenticated and is never
 * written to the database, which the application can read). Shared by the
 * job's threads under a spin lock held for a few loads and stores. */
#define UPLOADS 32
#define UPLOAD_TTL 1800             /* seconds; Graph's sessions last longer */

typedef struct {
    apr_int64_t att_id;
    apr_int64_t offset;
    apr_int64_t until;
    char *url;                      /* malloc'ed */
} upload_t;

static upload_t uploads[UPLOADS];
static unsigned uploads_next;
static volatile apr_uint32_t uploads_lock;

static void uploads_take(void)
{
    while (apr_atomic_cas32(&uploads_lock, 1, 0) != 0) {
        apr_thread_yield();
    }
}

/* Remembers where att's upload stands (url NULL: forgets it). */
static void upload_keep(apr_int64_t att_id, const char *url, apr_int64_t offset)
{
    char *copy = url ? strdup(url) : NULL, *old = NULL;
    int i, slot = -1;

    uploads_take();
    for (i = 0; i < UPLOADS; i++) {
        if (uploads[i].url && uploads[i].att_id == att_id) {
            slot = i;
            break;
        }
    }
    if (slot < 0 && copy) {
        slot = (int)(uploads_next++ % UPLOADS);
    }
    if (slot >= 0) {
        old = uploads[slot].url;
        uploads[slot].att_id = att_id;
        uploads[slot].url = copy;
        uploads[slot].offset = offset;
        uploads[slot].until = mso_sync_now() + UPLOAD_TTL;
        copy = NULL;
    }
    apr_atomic_set32(&uploads_lock, 0);
    free(old);
    free(copy);
}

/* Where att's upload stands, if this process knows: its URL (in p) and the
 * next byte. */
static const char *upload_find(apr_pool_t *p, apr_int64_t att_id, apr_int64_t *offset)
{
    const char *url = NULL;
    int i;

    uploads_take();
    for (i = 0; i < UPLOADS; i++) {
        if (uploads[i].url && uploads[i].att_id == att_id
            && uploads[i].until > mso_sync_now()) {
            url = apr_pstrdup(p, uploads[i].url);
            *offset = uploads[i].offset;
            break;
        }
    }
    apr_atomic_set32(&uploads_lock, 0);
    return url;
}

/* ------------------------------------------------------------------------- */

static const char *mailbox_of(mso_box_t *b)
{
    const char *m = b->in->work->acct->mailbox;

    return m ? m : "?";
}

/* Group commit. A step that a call depends on (creating, sending, an
 * attachment adding) is written before the call, together with every step
 * that waits (sent, failed, a draft's id, an attachment added, ...): steps
 * whose loss a crash only costs a look at Graph wait for the next such
 * write, or the end of the pass. On SQLite, where each commit waits for the
 * disk, that is about one commit per message instead of three. */

static const char *opt_dup(apr_pool_t *p, const char *s)
{
    return s ? apr_pstrdup(p, s) : NULL;
}

static void pend(mso_box_t *b, sr_t *sr, const mso_outbox_step_t *s, int applied)
{
    shared_t *sh = shared_of(b);
    pend_t *pe = &APR_ARRAY_PUSH(sh->pending, pend_t);

    pe->b = b;
    pe->sr = sr;
    pe->s = *s;
    pe->applied = applied;
    pe->s.marker = opt_dup(b->pool, s->marker);
    pe->s.draft_id = opt_dup(b->pool, s->draft_id);
    pe->s.internet_message_id = opt_dup(b->pool, s->internet_message_id);
    pe->s.phase = opt_dup(b->pool, s->phase);
    pe->s.reason = opt_dup(b->pool, s->reason);
    pe->s.last_error = opt_dup(b->pool, s->last_error);
    pe->s.graph_id = opt_dup(b->pool, s->graph_id);
}

/* Writes what waits in one transaction; drop: leave out the steps that are
 * not in memory yet (a creating whose call never came: nothing depends on
 * it). A write that failed ends its row's pass: the lease is gone (the
 * mailbox stops), the row is no longer queued, or the database failed. */
static apr_status_t flush(mso_box_t *b, int drop)
{
    shared_t *sh = shared_of(b);
    mso_outbox_write_t *w;
    apr_pool_t *tmp;
    apr_int64_t now = mso_sync_now();
    apr_status_t rv;
    int i, n = 0;

    if (!sh->pending->nelts) {
        return APR_SUCCESS;
    }
    apr_pool_create(&tmp, b->pass->pool);
    w = apr_palloc(tmp, sizeof(*w) * sh->pending->nelts);
    for (i = 0; i < sh->pending->nelts; i++) {
        pend_t *pe = &APR_ARRAY_IDX(sh->pending, i, pend_t);

        if (drop && !pe->applied) {
            pe->sr->premark = 0;
            continue;
        }
        w[n].o = pe->sr->o;
        w[n].s = pe->s;
        w[n].rv = APR_SUCCESS;
        APR_ARRAY_IDX(sh->pending, n, pend_t) = *pe;
        n++;
    }
    rv = mso_outbox_commit(mso_sync_db(b->pass), tmp, b->pass->owner, w, n, now);
    for (i = 0; i < n; i++) {
        pend_t *pe = &APR_ARRAY_IDX(sh->pending, i, pend_t);
        sr_t *sr = pe->sr;

        sr->commit_rv = w[i].rv;
        if (pe->s.step == MSO_OUTBOX_CREATING) {
            sr->premark = 0;
        }
        if (w[i].rv == APR_SUCCESS) {
            if (!pe->applied) {
                mso_outbox_apply(pe->b->pool, sr->o, &pe->s, now);
            }
            sr->fresh |= pe->s.step == MSO_OUTBOX_CREATING;
        }
        else if (w[i].rv == APR_EBUSY) {
            pe->b->lost = pe->b->stop = 1;     /* another node holds the mailbox now */
            sr->state = SR_FINISHED;
        }
        else if (w[i].rv == APR_NOTFOUND) {
            sr->state = SR_FINISHED;           /* the application took the row back */
        }
        else {
            sr->state = SR_WAITING;
            mso_sync_error(pe->b, "cannot record a step of outgoing mail in the database "
                                  "(see the error log)");
        }
    }
    apr_array_clear(sh->pending);
    apr_pool_destroy(tmp);
    return rv;
}

/* A step a call depends on: written now, with what waits. */
static apr_status_t sr_commit(mso_box_t *b, sr_t *sr, const mso_outbox_step_t *s)
{
    pend(b, sr, s, 0);
    flush(b, 0);
    return sr->commit_rv;
}

/* A step nothing depends on yet: in memory now, written with the next. */
static void sr_defer(mso_box_t *b, sr_t *sr, const mso_outbox_step_t *s)
{
    mso_outbox_apply(b->pool, sr->o, s, mso_sync_now());
    pend(b, sr, s, 1);
    if (shared_of(b)->pending->nelts >= PENDING_MAX) {
        flush(b, 0);
    }
}

static void sr_finish(mso_box_t *b, sr_t *sr)
{
    sr->state = sr->discard && sr->discard->nelts ? SR_PENDING : SR_FINISHED;
    sr->done_after_discard = 1;
    (void)b;
}

static void sr_discard(mso_box_t *b, sr_t *sr, const char *url)
{
    if (!sr->discard) {
        sr->discard = apr_array_make(b->pool, 2, sizeof(const char *));
    }
    APR_ARRAY_PUSH(sr->discard, const char *) = apr_pstrdup(b->pool, url);
}

static void sr_fail(mso_box_t *b, sr_t *sr, const char *reason, const char *text,
                    int discard_draft)
{
    mso_outbox_step_t s;

    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_FAILED;
    s.reason = reason;
    s.last_error = text;
    sr_defer(b, sr, &s);
    b->pass->st->sends_failed++;
    mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, APR_SUCCESS, "mod_msoauth: outgoing mail %"
                   APR_INT64_T_FMT " of account %" APR_INT64_T_FMT " (%s) failed: %s: %s",
                   sr->o->id, b->id, mailbox_of(b), reason, text);
    /* Only a draft that is certainly not sent: never a message in Sent Items. */
    if (discard_draft && sr->o->draft_id) {
        sr_discard(b, sr, mso_graph_message_url(b->pool, b->in->mailbox_url, sr->o->draft_id));
    }
    sr_finish(b, sr);
}

static void sr_sent(mso_box_t *b, sr_t *sr, const char *imid)
{
    outbox_t *q = b->kind[MSO_KIND_SEND];
    mso_outbox_step_t s;

    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_SENT;
    s.internet_message_id = imid;
    sr_defer(b, sr, &s);
    b->pass->st->sends_done++;
    q->sent = 1;
    sr_finish(b, sr);
}

/* Stays queued in phase, for this pass; retry: when to look again. */
static void sr_later(mso_box_t *b, sr_t *sr, const char *phase, const char *text,
                     apr_int64_t retry_at)
{
    mso_outbox_step_t s;

    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_LATER;
    s.phase = phase;
    s.last_error = text;
    s.retry_at = retry_at;
    sr_defer(b, sr, &s);
    sr->state = SR_WAITING;
    b->pass->st->sends_waiting++;
}

/* A Graph failure that is not this message's fault: throttled, a refused
 * token, Graph unreachable or failing. maybe: the call may have been carried
 * out (its phase stays, looked at after SETTLE); else the row goes back to
 * back_to. */
static void sr_wait_for_graph(mso_box_t *b, sr_t *sr, const mso_graph_result_t *g,
                              const char *back_to, int maybe)
{
    const char *text = mso_graph_result_text(b->pool, g);
    const char *phase = maybe ? sr->o->phase : back_to;
    apr_int64_t retry = maybe ? mso_sync_now() + SETTLE : 0;

    switch (g->cls) {
    case MSO_GRAPH_THROTTLED:
        mso_sync_throttle(b, g);
        sr_later(b, sr, phase, apr_pstrcat(b->pool, "throttled by Graph, retrying: ", text,
                                           NULL), retry);
        break;
    case MSO_GRAPH_UNAUTHORIZED:
        mso_sync_unauthorized(b, g);
        sr_later(b, sr, phase, apr_pstrcat(b->pool, "Graph refused the access token, "
                                           "refreshing it: ", text, NULL), retry);
        break;
    default:
        sr_later(b, sr, phase, apr_pstrcat(b->pool, "Graph did not answer, retrying: ", text,
                                           NULL), retry);
        mso_sync_error(b, apr_pstrcat(b->pool, "Graph is unreachable or failing: ", text,
                                      NULL));
        break;
    }
}

static const char *not_permitted_text(apr_pool_t *p, const char *what, const char *graph)
{
    return apr_pstrcat(p, what, graph ? " (" : "", graph ? graph : "", graph ? ")" : "",
                       ": set MSOAuthEdition pro for the mailbox's company (it asks for "
                       "Mail.Send and Mail.ReadWrite) and connect the mailbox again; nothing "
                       "was sent", NULL);
}

/* Every sr_* below ends the row's turn: a request started (1), or the row
 * waits, finished or is ready for its next step (0). */

static void create_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void lookup_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void state_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void folder_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void send_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void att_list_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void att_post_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void att_session_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void att_put_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void discard_done(void *baton, apr_status_t rv, mso_http_response_t *resp);

/* Sends rq (JSON body or none; raw: the headers of an upload fragment). */
static int sr_call(mso_box_t *b, sr_t *sr, mso_req_t *rq, const char *method, const char *url,
                   const char *body, const apr_array_header_t *raw, apr_size_t raw_len,
                   mso_http_done_fn *done)
{
    apr_status_t rv = raw ? mso_sync_send_upload(rq, method, url, raw, body, raw_len, done)
                          : mso_sync_send(rq, method, url, body, 0, done);

    if (rv != APR_SUCCESS) {
        budget_give(b, sr, 0);
        sr->state = SR_WAITING;
        mso_sync_error(b, "a request for outgoing mail could not be sent");
        return 0;
    }
    sr->state = SR_BUSY;
    return 1;
}

/* The checks before anything goes to Microsoft. */
static int sr_check(mso_box_t *b, sr_t *sr)
{
    mso_outbox_t *o = sr->o;
    mso_graph_mail_t m;
    apr_int64_t total = o->body_len;
    const char *err = NULL;
    int i;

    if (!b->in->can_send) {
        sr_fail(b, sr, "send_not_permitted", not_permitted_text(b->pool, "this mailbox's grant "
                "has no Mail.Send", NULL), 0);
        return 0;
    }
    if (!b->in->can_write) {
        sr_fail(b, sr, "send_not_permitted", not_permitted_text(b->pool, "this mailbox's grant "
                "has no Mail.ReadWrite, which drafts need", NULL), 0);
        return 0;
    }
    memset(&m, 0, sizeof(m));
    m.to_json = o->to_json;
    m.cc_json = o->cc_json;
    m.bcc_json = o->bcc_json;
    m.subject = o->subject;
    m.body_type = o->body_type;
    m.reply_to = o->reply_to_graph_id;
    if (mso_graph_mail_check(b->pool, &m, &err) != APR_SUCCESS) {
        sr_fail(b, sr, "bad_request", err, 0);
        return 0;
    }
    if (o->body_len > MSO_GRAPH_MAX_REQUEST) {
        sr_fail(b, sr, "bad_request", apr_psprintf(b->pool, "body is %" APR_INT64_T_FMT " bytes;"
                " Graph takes at most 4 MB in one request: send large content as an "
                "attachment", o->body_len), 0);
        return 0;
    }
    if (o->atts->nelts > MSO_GRAPH_MAX_ATTACHMENTS) {
        sr_fail(b, sr, "bad_request", apr_psprintf(b->pool, "the message has %d attachments; "
                "Exchange Online takes at most %d", o->atts->nelts,
                MSO_GRAPH_MAX_ATTACHMENTS), 0);
        return 0;
    }
    for (i = 0; i < o->atts->nelts; i++) {
        mso_outbox_att_t *at = APR_ARRAY_IDX(o->atts, i, mso_outbox_att_t *);
        const char *why = mso_graph_attachment_check(b->pool, at->name, at->content_type,
                                                     at->content_id, at->size);

        if (!why && at->size < MSO_GRAPH_UPLOAD_MIN
            && mso_graph_attachment_post_len(b->pool, at->name, at->content_type, at->is_inline,
                                             at->content_id, at->size) > MSO_GRAPH_MAX_REQUEST) {
            why = "with its base64 and name it is just over Graph's 4 MB request limit, yet "
                  "under the 3 MB an upload session needs: a shorter name (or a byte more or "
                  "less content) lets it through";
        }
        if (why) {
            sr_fail(b, sr, "bad_request", apr_psprintf(b->pool, "attachment %" APR_INT64_T_FMT
                                                       " (%s): %s", at->id,
                                                       at->name ? at->name : "no name", why), 0);
            return 0;
        }
        total += at->size;
    }
    if (total > MSO_GRAPH_MAX_MESSAGE) {
        sr_fail(b, sr, "bad_request", apr_psprintf(b->pool, "body and attachments take %"
                APR_INT64_T_FMT " bytes; Graph takes messages up to 150 MB (and the tenant's "
                "limit may be lower, 35 MB by default)", total), 0);
        return 0;
    }
    sr->checked = 1;
    return 1;
}

static const char *new_marker(apr_pool_t *p)
{
    unsigned char r[16];
    char *hex = apr_palloc(p, 33);
    int i;

    if (mso_random_bytes(r, sizeof(r)) != APR_SUCCESS) {
        return NULL;
    }
    for (i = 0; i < 16; i++) {
        apr_snprintf(hex + 2 * i, 3, "%02x", r[i]);
    }
    return hex;
}

/* The row's creating step: the marker and phase creating committed before
 * the create call (with setup's pre-marks of the whole pass when it is
 * one of them). */
static int sr_creating(mso_box_t *b, sr_t *sr)
{
    mso_outbox_step_t s;
    const char *marker = sr->o->marker;

    if (sr->fresh) {
        return 1;
    }
    if (sr->premark) {
        flush(b, 0);
        return sr->fresh;
    }
    if (!marker && !(marker = new_marker(b->pool))) {
        sr->state = SR_WAITING;
        mso_sync_error(b, "no random bytes for the marker of outgoing mail");
        return 0;
    }
    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_CREATING;
    s.marker = marker;
    s.retry_at = mso_sync_now() + SETTLE;
    return sr_commit(b, sr, &s) == APR_SUCCESS && sr->fresh;
}

/* Makes the draft: creating committed, the body read, the request built,
 * then the call. */
static int sr_create(mso_box_t *b, sr_t *sr)
{
    mso_outbox_t *o = sr->o;
    apr_size_t charge = (apr_size_t)o->body_len * 2 + 4096;
    mso_graph_request_t req;
    mso_graph_mail_t m;
    const char *body = NULL, *err = NULL;
    mso_req_t *rq;

    if (!budget_take(b, sr, charge)) {
        return 0;
    }
    if (!sr_creating(b, sr)) {
        budget_give(b, sr, 0);
        return 0;
    }
    rq = mso_sync_req(b, sr, S_CREATE);
    if (mso_outbox_body(mso_sync_db(b->pass), rq->pool, o->id, &body) != APR_SUCCESS) {
        goto not_now;
    }
    memset(&m, 0, sizeof(m));
    m.to_json = o->to_json;
    m.cc_json = o->cc_json;
    m.bcc_json = o->bcc_json;
    m.subject = o->subject;
    m.body_type = o->body_type;
    m.body = body;
    m.reply_to = o->reply_to_graph_id;
    m.marker = o->marker;
    if (mso_graph_mail_create(rq->pool, b->in->mailbox_url, &m, &req, &err) != APR_SUCCESS) {
        err = apr_pstrdup(b->pool, err);
        apr_pool_destroy(rq->pool);
        budget_give(b, sr, 0);
        sr->fresh = 0;
        sr_fail(b, sr, "bad_request", err, 0);
        return 0;
    }
    sr->fresh = 0;                  /* from here on a draft may exist */
    return sr_call(b, sr, rq, req.method, req.url, req.body, NULL, 0, create_done);

not_now:
    apr_pool_destroy(rq->pool);
    budget_give(b, sr, 0);
    sr->state = SR_WAITING;
    mso_sync_error(b, "cannot read outgoing mail from the database");
    return 0;
}

static int sr_get(mso_box_t *b, sr_t *sr, step_e step, const char *url, mso_http_done_fn *done)
{
    mso_req_t *rq = mso_sync_req(b, sr, step);

    return sr_call(b, sr, rq, "GET", url, NULL, NULL, 0, done);
}

static int sr_send(mso_box_t *b, sr_t *sr)
{
    mso_outbox_step_t s;
    mso_req_t *rq;

    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_SENDING;
    s.draft_id = sr->o->draft_id;
    s.internet_message_id = sr->o->internet_message_id;
    s.retry_at = mso_sync_now() + SETTLE;
    if (sr_commit(b, sr, &s) != APR_SUCCESS) {
        return 0;
    }
    sr->draft_uncommitted = 0;
    rq = mso_sync_req(b, sr, S_SEND);
    return sr_call(b, sr, rq, "POST", mso_graph_send_url(rq->pool, b->in->mailbox_url,
                                                         sr->o->draft_id), NULL, NULL, 0,
                   send_done);
}

/* One fragment of an upload session, read from the database as it goes. */
static int sr_put(mso_box_t *b, sr_t *sr)
{
    mso_outbox_att_t *at = sr->att;
    apr_int64_t n = at->size - sr->upload_off;
    const unsigned char *data = NULL;
    apr_array_header_t *h;
    apr_size_t got = 0;
    mso_req_t *rq;

    if (n > MSO_GRAPH_UPLOAD_CHUNK) {
        n = MSO_GRAPH_UPLOAD_CHUNK;
    }
    if (!budget_take(b, sr, (apr_size_t)n)) {
        return 0;
    }
    if (sr->upload_off + n >= at->size) {
        upload_keep(at->id, NULL, 0);   /* the last one: its outcome decides, not a resume */
    }
    rq = mso_sync_req(b, sr, S_ATT_PUT);
    if (mso_outbox_att_bytes(mso_sync_db(b->pass), rq->pool, at->id, sr->upload_off, n, &data, &got)
        != APR_SUCCESS || (apr_int64_t)got != n) {
        apr_pool_destroy(rq->pool);
        budget_give(b, sr, 0);
        sr->state = SR_WAITING;
        mso_sync_error(b, "cannot read an attachment of outgoing mail from the database (or it "
                          "changed while it was uploaded)");
        return 0;
    }
    h = apr_array_make(rq->pool, 3, sizeof(const char *));
    APR_ARRAY_PUSH(h, const char *) = "Content-Type: application/octet-stream";
    APR_ARRAY_PUSH(h, const char *) = apr_psprintf(rq->pool, "Content-Range: bytes %"
                                                   APR_INT64_T_FMT "-%" APR_INT64_T_FMT "/%"
                                                   APR_INT64_T_FMT, sr->upload_off,
                                                   sr->upload_off + n - 1, at->size);
    APR_ARRAY_PUSH(h, const char *) = "Accept: application/json";
    /* The upload URL is pre-authenticated: no token goes with it. */
    return sr_call(b, sr, rq, "PUT", sr->upload_url, (const char *)data, h, got, att_put_done);
}

/* Adds one attachment: committed as adding, then one POST (under 3 MB) or
 * an upload session. */
static int sr_attach(mso_box_t *b, sr_t *sr, mso_outbox_att_t *at)
{
    mso_outbox_t *o = sr->o;
    apr_size_t len = mso_graph_attachment_post_len(b->pool, at->name, at->content_type,
                                                   at->is_inline, at->content_id, at->size);
    int post = len <= MSO_GRAPH_MAX_REQUEST;
    mso_graph_request_t req;
    mso_outbox_step_t s;
    mso_req_t *rq;

    sr->att = at;
    if (post && !budget_take(b, sr, len)) {
        return 0;
    }
    rq = mso_sync_req(b, sr, post ? S_ATT_POST : S_ATT_SESSION);
    if (post) {
        const unsigned char *data = NULL;
        apr_size_t got = 0;
        apr_pool_t *raw;
        apr_status_t rv;

        /* The raw bytes only while they are encoded. */
        apr_pool_create(&raw, rq->pool);
        rv = mso_outbox_att_bytes(mso_sync_db(b->pass), raw, at->id, 0, at->size, &data, &got);
        if (rv == APR_SUCCESS && (apr_int64_t)got == at->size) {
            rv = mso_graph_attachment_post(rq->pool, b->in->mailbox_url, o->draft_id, at->name,
                                           at->content_type, at->is_inline, at->content_id,
                                           data, got, &req, &len);
        }
        else {
            rv = APR_EGENERAL;
        }
        apr_pool_destroy(raw);
        if (rv != APR_SUCCESS) {
            apr_pool_destroy(rq->pool);
            budget_give(b, sr, 0);
            sr->state = SR_WAITING;
            mso_sync_error(b, "cannot read an attachment of outgoing mail from the database");
            return 0;
        }
    }
    else {
        mso_graph_upload_session(rq->pool, b->in->mailbox_url, o->draft_id, at->name,
                                 at->content_type, at->is_inline, at->content_id, at->size, &req);
    }
    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_ATT_ADDING;
    s.att = at;
    s.retry_at = mso_sync_now() + SETTLE;
    if (sr_commit(b, sr, &s) != APR_SUCCESS) {
        apr_pool_destroy(rq->pool);
        budget_give(b, sr, 0);
        return 0;
    }
    return sr_call(b, sr, rq, req.method, req.url, req.body, NULL, 0,
                   post ? att_post_done : att_session_done);
}

/* The row's next step. */
static int sr_go(mso_box_t *b, sr_t *sr)
{
    mso_outbox_t *o = sr->o;
    int i;

    if (sr->discard && sr->discard->nelts) {
        const char *url = APR_ARRAY_IDX(sr->discard, sr->discard->nelts - 1, const char *);
        mso_req_t *rq = mso_sync_req(b, sr, S_DISCARD);

        sr->discard->nelts--;
        return sr_call(b, sr, rq, "DELETE", url, NULL, NULL, 0, discard_done);
    }
    if (sr->done_after_discard) {
        sr->state = SR_FINISHED;
        return 0;
    }
    if (!o->phase || sr->fresh) {
        if (!sr->checked && !sr_check(b, sr)) {
            return 0;
        }
        return sr_create(b, sr);
    }
    if (!strcmp(o->phase, "creating") || sr->lost_draft) {
        return sr_get(b, sr, S_LOOKUP, mso_graph_marker_url(b->pool, b->in->mailbox_url,
                                                            o->marker), lookup_done);
    }
    if (!strcmp(o->phase, "sending")) {
        if (sr->resolve && sr->need_folder) {
            return sr_get(b, sr, S_FOLDER, mso_graph_folder_url(b->pool, b->in->mailbox_url,
                                                                "drafts"), folder_done);
        }
        if (sr->resolve) {
            return sr_get(b, sr, S_STATE, mso_graph_item_url(b->pool, b->in->mailbox_url,
                                                             o->draft_id), state_done);
        }
        return sr_send(b, sr);
    }
    /* draft: the attachments in order, then the send. */
    for (i = 0; i < o->atts->nelts; i++) {
        mso_outbox_att_t *at = APR_ARRAY_IDX(o->atts, i, mso_outbox_att_t *);

        if (at->phase && !strcmp(at->phase, "added")) {
            continue;
        }
        if (sr->att_resolve && !sr->upload_url
            && (sr->upload_url = upload_find(b->pool, at->id, &sr->upload_off)) != NULL) {
            sr->att = at;               /* an upload of an earlier pass goes on */
            sr->att_resolve = 0;
        }
        if (sr->att_resolve) {
            sr->att = at;
            return sr_get(b, sr, S_ATT_LIST, mso_graph_draft_attachments_url(b->pool,
                                                                       b->in->mailbox_url,
                                                                       o->draft_id),
                          att_list_done);
        }
        if (sr->upload_url && sr->att == at) {
            return sr_put(b, sr);
        }
        return sr_attach(b, sr, at);
    }
    if (o->atts->nelts && !sr->verified) {
        /* A transport that repeats a POST on its own (curl does, on a reused
         * connection that closes without an answer) may have added one
         * twice: the draft's list shows it before the send. */
        sr->att = NULL;
        return sr_get(b, sr, S_ATT_LIST, mso_graph_draft_attachments_url(b->pool, b->in->mailbox_url,
                                                                   o->draft_id),
                      att_list_done);
    }
    return sr_send(b, sr);
}

/* ------------------------------------------------------------------------- */
/* Answers */

/* The start of every done callback: the request is answered, its budget
 * bytes given back; NULL when the mailbox was lost meanwhile. */
static sr_t *answered(mso_req_t *rq, apr_status_t rv, mso_http_response_t *resp,
                      mso_graph_result_t *g)
{
    mso_box_t *b = rq->box;
    sr_t *sr = rq->item;

    mso_sync_answered(rq);
    budget_give(b, sr, 1);
    sr->state = SR_PENDING;
    mso_graph_classify(rq->pool, rv, resp, g);
    if (b->lost) {
        sr->state = SR_FINISHED;
        return NULL;
    }
    return sr;
}

static int id_of(apr_pool_t *p, const mso_http_response_t *resp, mso_graph_item_t *it)
{
    apr_array_header_t *items = NULL;
    const char *err = NULL;

    if (mso_graph_parse_items(p, resp->body, resp->body_len, &items, &err) != APR_SUCCESS
        || items->nelts != 1) {
        return 0;
    }
    *it = APR_ARRAY_IDX(items, 0, mso_graph_item_t);
    return 1;
}

static void create_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    mso_graph_result_t g;
    mso_graph_item_t it;
    mso_outbox_step_t s;
    sr_t *sr = answered(rq, rv, resp, &g);

    if (!sr) {
        goto leave;
    }
    memset(&s, 0, sizeof(s));
    switch (g.cls) {
    case MSO_GRAPH_OK:
        if (!id_of(rq->pool, resp, &it)) {
            /* Made, but which: the marker will tell. */
            sr_later(b, sr, "creating", "Graph's answer to the draft has no id; looking it up",
                     mso_sync_now());
            break;
        }
        if (!sr->o->atts->nelts) {
            /* The draft's id goes with the send's commit (sr_send); until
             * then the row is in phase creating, and the marker finds it. */
            sr->o->draft_id = apr_pstrdup(b->pool, it.id);
            sr->o->internet_message_id = it.internet_message_id
                ? apr_pstrdup(b->pool, it.internet_message_id) : NULL;
            sr->o->phase = "draft";
            sr->draft_uncommitted = 1;
            break;
        }
        s.step = MSO_OUTBOX_DRAFT;
        s.draft_id = it.id;
        s.internet_message_id = it.internet_message_id;
        sr_defer(b, sr, &s);
        break;
    case MSO_GRAPH_NOT_FOUND:
        if (sr->o->reply_to_graph_id) {
            sr_fail(b, sr, "not_found", apr_pstrcat(b->pool, "the message to reply to "
                    "(reply_to_graph_id) no longer exists in Outlook (",
                    mso_graph_result_text(b->pool, &g), ")", NULL), 0);
        }
        else {
            sr_fail(b, sr, "graph_error", apr_pstrcat(b->pool, "Graph refused the draft: ",
                    mso_graph_result_text(b->pool, &g), NULL), 0);
        }
        break;
    case MSO_GRAPH_FORBIDDEN:
        sr_fail(b, sr, "send_not_permitted", not_permitted_text(b->pool, "Graph refused to "
                "create the draft", mso_graph_result_text(b->pool, &g)), 0);
        break;
    case MSO_GRAPH_FAILED:
    case MSO_GRAPH_RESYNC:
        sr_fail(b, sr, "bad_request", apr_pstrcat(b->pool, "Graph refused the message: ",
                mso_graph_result_text(b->pool, &g), NULL), 0);
        break;
    default:
        sr_wait_for_graph(b, sr, &g, NULL, g.maybe_applied);
        break;
    }

leave:
    mso_sync_finished(rq);
}

static void lookup_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    apr_array_header_t *items = NULL;
    const mso_graph_item_t *sent = NULL, *keep = NULL;
    const char *err = NULL;
    mso_graph_result_t g;
    mso_outbox_step_t s;
    sr_t *sr = answered(rq, rv, resp, &g);
    int i;

    if (!sr) {
        goto leave;
    }
    if (g.cls != MSO_GRAPH_OK) {
        sr_wait_for_graph(b, sr, &g, sr->o->phase, 1);
        goto leave;
    }
    if (mso_graph_parse_items(rq->pool, resp->body, resp->body_len, &items, &err)
        != APR_SUCCESS) {
        sr_later(b, sr, sr->o->phase, err, 0);
        mso_sync_error(b, err);
        goto leave;
    }
    for (i = 0; i < items->nelts; i++) {
        const mso_graph_item_t *it = &APR_ARRAY_IDX(items, i, mso_graph_item_t);

        if (it->is_draft == 0) {
            sent = sent ? sent : it;
        }
        else if (!keep) {
            keep = it;
        }
    }
    /* Drafts that are not kept, and every draft once one was sent, go. */
    for (i = 0; i < items->nelts; i++) {
        const mso_graph_item_t *it = &APR_ARRAY_IDX(items, i, mso_graph_item_t);

        if (it->is_draft != 0 && (sent || it != keep)) {
            sr_discard(b, sr, mso_graph_message_url(b->pool, b->in->mailbox_url, it->id));
        }
    }
    sr->resolve = 0;
    if (sent) {
        sr_sent(b, sr, sent->internet_message_id);
    }
    else if (sr->lost_draft) {
        /* The draft that was being sent is gone and no sent copy shows: it
         * may have gone out and been deleted since. Other drafts of the
         * row (spares) are removed; nothing is sent again. */
        for (i = 0; keep && i < items->nelts; i++) {
            const mso_graph_item_t *it = &APR_ARRAY_IDX(items, i, mso_graph_item_t);

            if (it == keep) {
                sr_discard(b, sr, mso_graph_message_url(b->pool, b->in->mailbox_url, it->id));
            }
        }
        sr_fail(b, sr, "not_found", "the draft of this message disappeared from the mailbox "
                "(deleted in Outlook?) before Graph confirmed that it was sent; it is not sent "
                "again, as it may have gone out: check Sent Items", 0);
    }
    else if (keep) {
        memset(&s, 0, sizeof(s));
        s.step = MSO_OUTBOX_DRAFT;
        s.draft_id = keep->id;
        s.internet_message_id = keep->internet_message_id;
        sr_defer(b, sr, &s);
    }
    else {
        /* The create never took effect: make the draft (again). */
        sr->o->phase = NULL;
    }

leave:
    mso_sync_finished(rq);
}

/* After a send whose outcome was unknown: sent when the draft is no draft
 * any more or has left Drafts (submitted); else it goes again. */
static void state_decide(mso_box_t *b, sr_t *sr, int is_draft, const char *imid)
{
    outbox_t *q = b->kind[MSO_KIND_SEND];

    if (is_draft == 0 || (sr->parent && q->drafts_id && strcmp(sr->parent, q->drafts_id))) {
        sr_sent(b, sr, imid);
        return;
    }
    sr->resolve = 0;
}

static void state_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    outbox_t *q = b->kind[MSO_KIND_SEND];
    mso_graph_result_t g;
    mso_graph_item_t it;
    sr_t *sr = answered(rq, rv, resp, &g);

    if (!sr) {
        goto leave;
    }
    if (g.cls == MSO_GRAPH_NOT_FOUND) {
        sr->lost_draft = 1;         /* not under its id: by the marker */
        goto leave;
    }
    if (g.cls != MSO_GRAPH_OK) {
        sr_wait_for_graph(b, sr, &g, "sending", 1);
        goto leave;
    }
    if (!id_of(rq->pool, resp, &it)) {
        sr_later(b, sr, "sending", "Graph's answer about the draft could not be read", 0);
        mso_sync_error(b, "Graph's answer about a draft could not be read");
        goto leave;
    }
    sr->parent = it.parent_folder_id ? apr_pstrdup(b->pool, it.parent_folder_id) : NULL;
    if (it.internet_message_id) {
        sr->o->internet_message_id = apr_pstrdup(b->pool, it.internet_message_id);
    }
    if (it.is_draft != 0 && sr->parent && !q->drafts_id) {
        sr->need_folder = 1;        /* where Drafts is: asked once per mailbox and pass */
        goto leave;
    }
    state_decide(b, sr, it.is_draft, it.internet_message_id);

leave:
    mso_sync_finished(rq);
}

static void folder_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    outbox_t *q = b->kind[MSO_KIND_SEND];
    apr_array_header_t *items = NULL;
    const char *err = NULL;
    mso_graph_result_t g;
    sr_t *sr = answered(rq, rv, resp, &g);

    if (!sr) {
        goto leave;
    }
    sr->need_folder = 0;
    if (g.cls != MSO_GRAPH_OK) {
        sr_wait_for_graph(b, sr, &g, "sending", 1);
        goto leave;
    }
    if (mso_graph_parse_items(rq->pool, resp->body, resp->body_len, &items, &err)
        != APR_SUCCESS || items->nelts != 1) {
        sr_later(b, sr, "sending", "Graph's answer about the Drafts folder could not be read",
                 0);
        mso_sync_error(b, "Graph's answer about the Drafts folder could not be read");
        goto leave;
    }
    q->drafts_id = apr_pstrdup(b->pool, APR_ARRAY_IDX(items, 0, mso_graph_item_t).id);
    state_decide(b, sr, 1, sr->o->internet_message_id);

leave:
    mso_sync_finished(rq);
}

static void send_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    mso_graph_result_t g;
    sr_t *sr = answered(rq, rv, resp, &g);

    if (!sr) {
        goto leave;
    }
    switch (g.cls) {
    case MSO_GRAPH_OK:
        sr_sent(b, sr, sr->o->internet_message_id);
        break;
    case MSO_GRAPH_NOT_FOUND:
        /* No draft under that id any more: perhaps sent already; look, later. */
        sr->resolve = 1;
        sr_later(b, sr, "sending", apr_pstrcat(b->pool, "Graph no longer finds the draft to "
                 "send (", mso_graph_result_text(b->pool, &g), "); checking whether it went "
                 "out", NULL), mso_sync_now() + SETTLE);
        break;
    case MSO_GRAPH_FORBIDDEN:
        sr_fail(b, sr, "send_not_permitted", not_permitted_text(b->pool, "Graph refused to "
                "send", mso_graph_result_text(b->pool, &g)), 1);
        break;
    case MSO_GRAPH_FAILED:
    case MSO_GRAPH_RESYNC:
        sr_fail(b, sr, "bad_request", apr_pstrcat(b->pool, "Graph refused to send the message: ",
                mso_graph_result_text(b->pool, &g), NULL), 1);
        break;
    default:
        sr->resolve = 1;
        sr_wait_for_graph(b, sr, &g, "draft", g.maybe_applied);
        break;
    }

leave:
    mso_sync_finished(rq);
}

/* An attachment's Graph failure that is about the message (bad_request,
 * permissions), the draft gone (start again), or Graph's trouble. */
static void att_failure(mso_box_t *b, sr_t *sr, const mso_graph_result_t *g, int maybe)
{
    mso_outbox_step_t s;

    switch (g->cls) {
    case MSO_GRAPH_NOT_FOUND:
        memset(&s, 0, sizeof(s));
        s.step = MSO_OUTBOX_RESTART;
        s.last_error = apr_pstrcat(b->pool, "the draft disappeared before it was sent (",
                                   mso_graph_result_text(b->pool, g), "); making it again",
                                   NULL);
        sr->att_resolve = 0;
        sr->upload_url = NULL;
        sr_defer(b, sr, &s);
        break;
    case MSO_GRAPH_FORBIDDEN:
        sr_fail(b, sr, "send_not_permitted", not_permitted_text(b->pool, "Graph refused the "
                "attachment", mso_graph_result_text(b->pool, g)), 1);
        break;
    case MSO_GRAPH_FAILED:
    case MSO_GRAPH_RESYNC:
        sr_fail(b, sr, "bad_request", apr_psprintf(b->pool, "Graph refused attachment %"
                APR_INT64_T_FMT " (%s): %s", sr->att ? sr->att->id : 0,
                sr->att && sr->att->name ? sr->att->name : "",
                mso_graph_result_text(b->pool, g)), 1);
        break;
    default:
        /* It may be on the draft: the list tells, next time. */
        sr->att_resolve = maybe;
        sr->upload_url = NULL;
        sr_wait_for_graph(b, sr, g, "draft", 0);
        break;
    }
}

static void att_added(mso_box_t *b, sr_t *sr, const char *graph_id)
{
    mso_outbox_step_t s;

    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_ATT_ADDED;
    s.att = sr->att;
    s.graph_id = graph_id;
    sr->upload_url = NULL;
    sr->att_resolve = 0;
    sr_defer(b, sr, &s);
}

static void att_list_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    apr_array_header_t *items = NULL;
    const mso_graph_att_item_t *found = NULL;
    const char *err = NULL;
    mso_graph_result_t g;
    apr_hash_t *known, *names;
    sr_t *sr = answered(rq, rv, resp, &g);
    int i;

    if (!sr) {
        goto leave;
    }
    if (g.cls != MSO_GRAPH_OK) {
        att_failure(b, sr, &g, 1);
        goto leave;
    }
    if (mso_graph_parse_draft_attachments(rq->pool, resp->body, resp->body_len, &items, &err)
        != APR_SUCCESS) {
        sr_later(b, sr, "draft", err, 0);
        mso_sync_error(b, err);
        goto leave;
    }
    /* Ours are the committed ones. Resolving (sr->att): one more of its name
     * is the one whose outcome was unknown, any further copy goes. Before
     * the send (no sr->att): any other of one of our names is a copy. */
    known = apr_hash_make(rq->pool);
    names = apr_hash_make(rq->pool);
    for (i = 0; i < sr->o->atts->nelts; i++) {
        const mso_outbox_att_t *at = APR_ARRAY_IDX(sr->o->atts, i, mso_outbox_att_t *);

        if (at->graph_id) {
            apr_hash_set(known, at->graph_id, APR_HASH_KEY_STRING, at);
        }
        apr_hash_set(names, at->name, APR_HASH_KEY_STRING, at);
    }
    for (i = 0; i < items->nelts; i++) {
        const mso_graph_att_item_t *it = &APR_ARRAY_IDX(items, i, mso_graph_att_item_t);

        if (apr_hash_get(known, it->id, APR_HASH_KEY_STRING) || !it->name) {
            continue;
        }
        if (sr->att ? strcmp(it->name, sr->att->name) || it->is_inline != sr->att->is_inline
                    : !apr_hash_get(names, it->name, APR_HASH_KEY_STRING)) {
            continue;
        }
        if (sr->att && !found) {
            found = it;
        }
        else {
            sr_discard(b, sr, mso_graph_draft_attachment_url(b->pool, b->in->mailbox_url,
                                                       sr->o->draft_id, it->id));
        }
    }
    if (!sr->att) {
        sr->verified = 1;           /* the copies go first, then the send */
    }
    else if (found) {
        att_added(b, sr, found->id);
    }
    else {
        sr->att_resolve = 0;        /* not there: add it (again) */
    }

leave:
    mso_sync_finished(rq);
}

static void att_post_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    mso_graph_result_t g;
    mso_graph_item_t it;
    sr_t *sr = answered(rq, rv, resp, &g);

    if (!sr) {
        goto leave;
    }
    if (g.cls != MSO_GRAPH_OK) {
        att_failure(b, sr, &g, g.maybe_applied);
    }
    else if (id_of(rq->pool, resp, &it)) {
        att_added(b, sr, it.id);
    }
    else {
        sr->att_resolve = 1;        /* added, but which: the list tells */
    }

leave:
    mso_sync_finished(rq);
}

static void att_session_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    const char *err = NULL, *url;
    mso_graph_result_t g;
    sr_t *sr = answered(rq, rv, resp, &g);

    if (!sr) {
        goto leave;
    }
    if (g.cls != MSO_GRAPH_OK) {
        /* A session alone attaches nothing. */
        att_failure(b, sr, &g, 0);
        goto leave;
    }
    url = mso_graph_parse_upload_url(b->pool, b->in->graph_root, resp->body, resp->body_len,
                                     &err);
    if (!url) {
        sr_fail(b, sr, "graph_error", err, 1);
        goto leave;
    }
    sr->upload_url = url;
    sr->upload_off = 0;
    upload_keep(sr->att->id, url, 0);

leave:
    mso_sync_finished(rq);
}

static void att_put_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    mso_graph_result_t g;
    sr_t *sr = answered(rq, rv, resp, &g);
    apr_int64_t n;

    if (!sr) {
        goto leave;
    }
    n = sr->att->size - sr->upload_off;
    n = n > MSO_GRAPH_UPLOAD_CHUNK ? MSO_GRAPH_UPLOAD_CHUNK : n;
    if (g.cls != MSO_GRAPH_OK) {
        upload_keep(sr->att->id, NULL, 0);
    }
    if (g.cls == MSO_GRAPH_THROTTLED || g.cls == MSO_GRAPH_UNAUTHORIZED) {
        att_failure(b, sr, &g, 1);
    }
    else if (g.cls != MSO_GRAPH_OK) {
        /* A fragment refused may be a repeat of one that arrived (a range
         * already taken, a session already complete): the upload starts
         * again after a look at the draft's list, later. */
        sr->att_resolve = 1;
        sr->upload_url = NULL;
        sr_later(b, sr, "draft", apr_pstrcat(b->pool, "an upload of attachment ", sr->att->name,
                                             " failed, starting it again: ",
                                             mso_graph_result_text(b->pool, &g), NULL), 0);
        mso_sync_error(b, apr_pstrcat(b->pool, "an attachment upload failed: ",
                                      mso_graph_result_text(b->pool, &g), NULL));
    }
    else if (sr->upload_off + n < sr->att->size) {
        sr->upload_off += n;
        upload_keep(sr->att->id, sr->upload_url, sr->upload_off);
    }
    else {
        const char *loc = resp->headers ? apr_table_get(resp->headers, "Location") : NULL;
        const char *id = mso_graph_location_attachment_id(rq->pool, loc);

        if (id) {
            att_added(b, sr, id);
        }
        else {
            sr->upload_url = NULL;
            sr->att_resolve = 1;    /* attached, but which: the list tells */
        }
    }

leave:
    mso_sync_finished(rq);
}

static void discard_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    mso_graph_result_t g;
    sr_t *sr = answered(rq, rv, resp, &g);

    /* Best effort: a duplicate draft left behind is never sent. */
    if (sr && g.cls != MSO_GRAPH_OK && g.cls != MSO_GRAPH_NOT_FOUND) {
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_NOTICE, APR_SUCCESS, "mod_msoauth: account %"
                       APR_INT64_T_FMT ": a duplicate or failed draft of outgoing mail %"
                       APR_INT64_T_FMT " could not be deleted: %s", b->id, sr->o->id,
                       mso_graph_result_text(rq->pool, &g));
        if (g.cls == MSO_GRAPH_THROTTLED) {
            mso_sync_throttle(b, &g);
        }
    }
    if (sr && sr->done_after_discard && !(sr->discard && sr->discard->nelts)) {
        sr->state = SR_FINISHED;
    }

    mso_sync_finished(rq);
}

/* ------------------------------------------------------------------------- */

static void outbox_setup(mso_box_t *b)
{
    outbox_t *q = apr_pcalloc(b->pool, sizeof(*q));
    apr_array_header_t *rows = NULL;
    int i, k;

    q->rows = apr_array_make(b->pool, 8, sizeof(sr_t *));
    q->seen = apr_hash_make(b->pool);
    b->kind[MSO_KIND_SEND] = q;
    if (b->in->work->queued_sends <= 0
        || mso_outbox_queue(mso_sync_db(b->pass), b->pool, b->id, mso_sync_now(), MSO_SYNC_SENDS,
                            &rows) != APR_SUCCESS) {
        return;
    }
    for (i = 0; i < rows->nelts; i++) {
        sr_t *sr = apr_pcalloc(b->pool, sizeof(*sr));

        sr->o = APR_ARRAY_IDX(rows, i, mso_outbox_t *);
        /* From an earlier pass: what a call may have done is looked at first. */
        sr->resolve = sr->o->phase && (!strcmp(sr->o->phase, "creating")
                                       || !strcmp(sr->o->phase, "sending"));
        sr->checked = sr->o->phase != NULL;
        for (k = 0; k < sr->o->atts->nelts; k++) {
            const mso_outbox_att_t *at = APR_ARRAY_IDX(sr->o->atts, k, mso_outbox_att_t *);

            sr->att_resolve |= at->phase && !strcmp(at->phase, "adding");
        }
        APR_ARRAY_PUSH(q->rows, sr_t *) = sr;
        if (!sr->o->phase && sr_check(b, sr)) {
            /* Pre-marked: the first create call of the pass writes the
             * creating steps of every mailbox's new rows in one go. */
            mso_outbox_step_t s;

            memset(&s, 0, sizeof(s));
            s.step = MSO_OUTBOX_CREATING;
            s.marker = new_marker(b->pool);
            s.retry_at = mso_sync_now() + SETTLE;
            if (s.marker) {
                pend(b, sr, &s, 0);
                sr->premark = 1;
            }
        }
    }
}

/* In queue order; a row replying to the same message as an earlier
 * unfinished one waits for it. */
static int outbox_pump(mso_box_t *b)
{
    outbox_t *q = b->kind[MSO_KIND_SEND];
    int i, started = 0;

    apr_hash_clear(q->seen);
    for (i = 0; i < q->rows->nelts && mso_sync_room(b); i++) {
        sr_t *sr = APR_ARRAY_IDX(q->rows, i, sr_t *);
        const char *thread = sr->o->reply_to_graph_id;

        if (sr->state == SR_FINISHED) {
            continue;
        }
        if (thread && !sr->done_after_discard) {
            if (apr_hash_get(q->seen, thread, APR_HASH_KEY_STRING)) {
                continue;
            }
            apr_hash_set(q->seen, thread, APR_HASH_KEY_STRING, sr);
        }
        if (sr->state == SR_PENDING) {
            started |= sr_go(b, sr);
        }
    }
    return started;
}

/* What waits is written (every mailbox's: the first release of the pass
 * does it), and what the next pass needs to go on at once: a draft made
 * (its id), an upload between two fragments (no call's outcome is unknown:
 * the row is not held back), a row marked creating whose call never came
 * (no look-up needed). Mail just sent shows in a mirrored Sent Items at the
 * next pass. */
static void outbox_release(mso_box_t *b, mso_work_done_t *d, apr_int64_t now)
{
    outbox_t *q = b->kind[MSO_KIND_SEND];
    mso_outbox_step_t s;
    int i;

    for (i = 0; q && !b->lost && i < q->rows->nelts; i++) {
        sr_t *sr = APR_ARRAY_IDX(q->rows, i, sr_t *);

        if (sr->state == SR_FINISHED || (sr->state == SR_WAITING && !sr->fresh)) {
            continue;
        }
        memset(&s, 0, sizeof(s));
        if (sr->fresh) {
            /* Marked creating, then waiting before its call (the body not
             * read, say): nothing to look up next time. */
            s.step = MSO_OUTBOX_UNMARK;
            sr->fresh = 0;
        }
        else if (sr->draft_uncommitted) {
            s.step = MSO_OUTBOX_DRAFT;
            s.draft_id = sr->o->draft_id;
            s.internet_message_id = sr->o->internet_message_id;
        }
        else if (sr->upload_url && sr->att) {
            s.step = MSO_OUTBOX_LATER;
            s.phase = "draft";
        }
        else {
            continue;
        }
        sr->draft_uncommitted = 0;
        sr_defer(b, sr, &s);
    }
    flush(b, 1);
    if (q && q->sent && !b->sync_due && mso_sync_in_folders(b, "sentitems")) {
        d->sync_due_at = now;
    }
}

const mso_sync_kind_t mso_sync_outbox = {"outbox", outbox_setup, outbox_pump, outbox_release};
