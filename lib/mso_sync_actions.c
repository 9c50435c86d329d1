/* The write-back queue as a kind of Graph work (mso_sync_int.h): the
 * mailbox's queued actions in queue order, never two for the same message at
 * once and never one before an earlier unfinished one of the same message.
 *
 * Exactly once: sent_at is committed before the write goes out. When a later
 * pass finds sent_at set, the earlier outcome is unknown (a crash, a kill, a
 * timeout), so it first asks Graph for the message's current state and only
 * writes when Outlook does not show it yet. */
#include <string.h>

#include <apr_hash.h>
#include <apr_strings.h>

#include "mso_graph.h"
#include "mso_json.h"
#include "mso_log.h"
#include "mso_sync_int.h"

typedef enum { ACT_PENDING, ACT_BUSY, ACT_FINISHED, ACT_WAITING } act_state_e;
typedef enum { STEP_WRITE, STEP_FOLDER, STEP_STATE } act_step_e;

typedef struct {
    mso_action_t *a;
    act_state_e state;
    mso_graph_request_t req;        /* the write, built and checked once */
    const char *dest;               /* Graph destination (move/delete) */
    const char *dest_id;            /* its folder id, once looked up */
} act_rt_t;

typedef struct {
    apr_array_header_t *acts;       /* act_rt_t* */
    apr_hash_t *seen;               /* pump's scratch: messages with an earlier action */
} acts_t;

/* Finished for this pass, whatever rv says: APR_EBUSY means the row is no
 * longer queued (the app changed it) or the lease is gone, and either way it
 * is not ours to touch. */
static void act_finish(mso_box_t *b, act_rt_t *ar, apr_status_t rv)
{
    (void)b;
    (void)rv;
    ar->state = ACT_FINISHED;
}

static void act_fail(mso_box_t *b, act_rt_t *ar, const char *reason, const char *text)
{
    apr_status_t rv = mso_mirror_action_failed(mso_sync_db(b->pass), b->pool, b->pass->owner, ar->a,
                                               reason, text, mso_sync_now());

    if (rv == APR_SUCCESS) {
        b->pass->st->actions_failed++;
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, APR_SUCCESS,
                       "mod_msoauth: action %" APR_INT64_T_FMT " (%s) of account %"
                       APR_INT64_T_FMT " failed: %s: %s", ar->a->id, ar->a->action, b->id,
                       reason, text);
    }
    act_finish(b, ar, rv);
}

static void act_wait(mso_box_t *b, act_rt_t *ar, const char *text, int maybe_applied)
{
    mso_mirror_action_later(mso_sync_db(b->pass), b->pool, b->pass->owner, ar->a, text,
                            maybe_applied, mso_sync_now());
    if (maybe_applied && !ar->a->sent_at) {
        ar->a->sent_at = mso_sync_now();
    }
    ar->state = ACT_WAITING;
    b->pass->st->actions_waiting++;
}

static void act_done(mso_box_t *b, act_rt_t *ar)
{
    const char *folder = NULL;
    int removed = 0;
    apr_status_t rv;

    if (ar->dest) {
        /* The mirror follows the message: into a mirrored folder, or out of
         * the mirror (removed) when its new folder is not mirrored. */
        folder = ar->dest;
        removed = !mso_sync_in_folders(b, folder);
    }
    rv = mso_mirror_action_done(mso_sync_db(b->pass), b->pool, b->pass->owner, ar->a, folder,
                                removed, mso_sync_now());
    if (rv == APR_SUCCESS) {
        b->pass->st->actions_done++;
    }
    else if (rv != APR_EBUSY) {
        mso_sync_error(b, "cannot record an applied action in the database (see the error log)");
    }
    act_finish(b, ar, rv);
}

static const char *read_only_text(const mso_box_t *b)
{
    if (b->in->app_only) {
        return "the company's app has no Mail.ReadWrite application permission: write-back "
               "needs it. Add it under API permissions, Application permissions, and grant "
               "admin consent";
    }
    if (b->in->work->acct->shared) {
        return "this shared mailbox was connected without Mail.ReadWrite.Shared: write-back "
               "needs it. Add it to MSOAuthScope and connect the mailbox again";
    }
    return "this mailbox was connected with read access only (Mail.Read): write-back needs "
           "Mail.ReadWrite. Set MSOAuthEdition pro for its company and connect the mailbox "
           "again";
}

/* What a Graph failure of an action's request means for it and its mailbox. */
static void act_failure(mso_box_t *b, act_rt_t *ar, const mso_graph_result_t *g,
                        int maybe_applied)
{
    const char *text = mso_graph_result_text(b->pool, g);

    if (mso_sync_mailbox_problem(b, g)) {
        /* Not the action's fault: it waits with its mailbox. */
        act_wait(b, ar, apr_pstrcat(b->pool, "the mailbox cannot be reached: ", text, NULL),
                 maybe_applied || g->maybe_applied);
        return;
    }
    switch (g->cls) {
    case MSO_GRAPH_THROTTLED:
        mso_sync_throttle(b, g);
        act_wait(b, ar, apr_pstrcat(b->pool, "throttled by Graph, retrying: ", text, NULL),
                 maybe_applied || g->maybe_applied);
        break;
    case MSO_GRAPH_UNAUTHORIZED:
        mso_sync_unauthorized(b, g);
        act_wait(b, ar, apr_pstrcat(b->pool, "Graph refused the access token, refreshing it: ",
                                    text, NULL), maybe_applied);
        break;
    case MSO_GRAPH_FORBIDDEN:
        act_fail(b, ar, "read_only", apr_pstrcat(b->pool, "Graph refused the change (", text,
                                                 "): ", read_only_text(b), NULL));
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
        mso_sync_error(b, apr_pstrcat(b->pool, "Graph is unreachable or failing: ", text, NULL));
        break;
    }
}

static void act_write_done(void *baton, apr_status_t rv, mso_http_response_t *resp);
static void act_check_done(void *baton, apr_status_t rv, mso_http_response_t *resp);

/* Sends the write itself, sent_at committed first. */
static void act_write(mso_box_t *b, act_rt_t *ar)
{
    apr_status_t rv;
    mso_req_t *rq;

    rv = mso_mirror_action_sending(mso_sync_db(b->pass), b->pool, b->pass->owner, ar->a,
                                   mso_sync_now());
    if (rv != APR_SUCCESS) {
        if (rv == APR_EBUSY) {
            act_finish(b, ar, rv);
        }
        else {
            ar->state = ACT_WAITING;
            mso_sync_error(b, "cannot record an action as being sent in the database (see the "
                         "error log)");
        }
        return;
    }
    ar->a->sent_at = mso_sync_now();
    ar->a->attempts++;
    rq = mso_sync_req(b, ar, STEP_WRITE);
    ar->state = ACT_BUSY;
    if (mso_sync_send(rq, ar->req.method, ar->req.url, ar->req.body, 0, act_write_done)
        != APR_SUCCESS) {
        act_wait(b, ar, "the request could not be sent", 0);
    }
}

/* A retry of a write whose outcome is unknown: look first. */
static void act_check(mso_box_t *b, act_rt_t *ar, act_step_e step)
{
    mso_req_t *rq = mso_sync_req(b, ar, step);
    const char *url = step == STEP_FOLDER
        ? mso_graph_folder_url(rq->pool, b->in->mailbox_url, ar->dest)
        : mso_graph_message_state_url(rq->pool, b->in->mailbox_url, ar->a->graph_id);

    ar->state = ACT_BUSY;
    if (mso_sync_send(rq, "GET", url, NULL, 0, act_check_done) != APR_SUCCESS) {
        act_wait(b, ar, "the request could not be sent", 1);
    }
}

static void act_start(mso_box_t *b, act_rt_t *ar)
{
    const char *err = NULL;

    if (!b->in->can_write) {
        /* Nothing goes to Graph: the grant cannot write. */
        act_fail(b, ar, "read_only", read_only_text(b));
        return;
    }
    if (mso_graph_action_request(b->pool, b->in->mailbox_url, ar->a->action, ar->a->graph_id,
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
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    act_rt_t *ar = rq->item;
    mso_graph_result_t g;

    mso_sync_answered(rq);
    mso_graph_classify(rq->pool, rv, resp, &g);
    if (g.cls == MSO_GRAPH_OK) {
        act_done(b, ar);
    }
    else {
        act_failure(b, ar, &g, 0);
    }
    mso_sync_finished(rq);
}

static void act_check_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    mso_req_t *rq = baton;
    mso_box_t *b = rq->box;
    act_rt_t *ar = rq->item;
    mso_graph_result_t g;
    const char *perr = NULL;
    json_t *j = NULL;

    mso_sync_answered(rq);
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
        mso_sync_error(b, "Graph's answer about a message could not be read");
    }
    else if (rq->step == STEP_FOLDER) {
        const char *id = mso_json_str(j, "id");

        if (!id) {
            act_wait(b, ar, "Graph's answer about the destination folder has no id", 1);
            mso_sync_error(b, "Graph's answer about a folder has no id");
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
    mso_sync_finished(rq);
}


static void acts_setup(mso_box_t *b)
{
    acts_t *q = apr_pcalloc(b->pool, sizeof(*q));
    apr_array_header_t *rows = NULL;
    int i;

    q->acts = apr_array_make(b->pool, 8, sizeof(act_rt_t *));
    q->seen = apr_hash_make(b->pool);
    b->kind[MSO_KIND_ACTIONS] = q;
    if (b->in->work->queued_actions <= 0
        || mso_mirror_actions(mso_sync_db(b->pass), b->pool, b->id, MSO_SYNC_ACTIONS, &rows)
           != APR_SUCCESS) {
        return;
    }
    for (i = 0; i < rows->nelts; i++) {
        act_rt_t *ar = apr_pcalloc(b->pool, sizeof(*ar));

        ar->a = APR_ARRAY_IDX(rows, i, mso_action_t *);
        APR_ARRAY_PUSH(q->acts, act_rt_t *) = ar;
    }
}

/* In queue order; an unfinished earlier action on the same message holds
 * back the later ones. */
static int acts_pump(mso_box_t *b)
{
    acts_t *q = b->kind[MSO_KIND_ACTIONS];
    int i, started = 0;

    apr_hash_clear(q->seen);
    for (i = 0; i < q->acts->nelts && mso_sync_room(b); i++) {
        act_rt_t *ar = APR_ARRAY_IDX(q->acts, i, act_rt_t *);
        const char *gid = ar->a->graph_id ? ar->a->graph_id : "";

        if (ar->state == ACT_FINISHED) {
            continue;
        }
        if (apr_hash_get(q->seen, gid, APR_HASH_KEY_STRING)) {
            continue;
        }
        apr_hash_set(q->seen, gid, APR_HASH_KEY_STRING, ar);
        if (ar->state == ACT_PENDING) {
            act_start(b, ar);
            started = 1;
        }
    }
    return started;
}

const mso_sync_kind_t mso_sync_actions = {"actions", acts_setup, acts_pump, NULL};
