/* The mirror in the database (see mso_mirror.h). Same statements on SQLite
 * and PostgreSQL; every value is bound.
 *
 * Pages. New messages of a page go in with multi-row upserts (one statement
 * per chunk of up to CHUNK rows, 1,900 values: one round trip to PostgreSQL instead of one
 * per row). A chunk never holds the same id twice (ON CONFLICT DO UPDATE
 * refuses to touch a row twice in one statement), so a repeated id starts a
 * new chunk, which keeps the page's order. Partial updates (only the changed
 * properties) and removals run one statement each, in order. */
#include <string.h>

#include <apr_hash.h>
#include <apr_strings.h>

#include "mso_log.h"
#include "mso_mirror.h"
#include "mso_store_int.h"

#define CHUNK 100                   /* a whole page in one statement */
#define UPSERT_COLS 19

/* ------------------------------------------------------------------------- */
/* Statements */

/* The account row, then its Graph work (from MSO_ACCOUNT_NCOLS on). */
#define WORK_COLUMNS MSO_ACCOUNT_COLUMNS ", sync_due_at, sync_retry_at, " \
    "sync_phase, sync_error, sync_error_runs, auth_retry, " \
    "(SELECT COUNT(*) FROM msoauth_actions q WHERE q.account_id = msoauth_accounts.id " \
    "AND q.state = 'queued')"

static const mso_stmt_t ST_WORK_DUE = {
    "work_due",
    "SELECT id FROM msoauth_accounts a WHERE state = 'connected' "
    "AND (work_until IS NULL OR work_until < %lld) AND COALESCE(sync_retry_at, 0) <= %lld "
    "AND COALESCE(access_expires_at, 0) > %lld AND COALESCE(refresh_due_at, 0) > %lld "
    "AND (COALESCE(sync_due_at, 0) <= %lld OR EXISTS (SELECT 1 FROM msoauth_actions q "
    "WHERE q.state = 'queued' AND q.account_id = a.id)) "
    "ORDER BY COALESCE(sync_due_at, 0), id LIMIT %d", NULL
};
static const mso_stmt_t ST_WORK_CLAIM = {
    "work_claim",
    "UPDATE msoauth_accounts SET work_owner = %s, work_until = %lld WHERE id = %lld "
    "AND state = 'connected' AND (work_until IS NULL OR work_until < %lld OR work_owner = %s)",
    NULL
};
static const mso_stmt_t ST_WORK_GET = {
    "work_get", "SELECT " WORK_COLUMNS " FROM msoauth_accounts WHERE id = %lld", NULL
};
/* Every transaction of a mailbox's work starts here: it extends the lease
 * and proves it is still ours (a node that lost it writes nothing). */
static const mso_stmt_t ST_WORK_FENCE = {
    "work_fence",
    "UPDATE msoauth_accounts SET work_until = %lld WHERE id = %lld AND work_owner = %s",
    NULL
};
static const mso_stmt_t ST_WORK_RELEASE = {
    "work_release",
    "UPDATE msoauth_accounts SET work_owner = NULL, work_until = NULL, sync_due_at = %lld, "
    "sync_retry_at = %lld, sync_phase = %s, sync_error = %s, sync_error_runs = %d, "
    "auth_retry = %d, last_sync_at = COALESCE(%lld, last_sync_at), updated_at = %lld "
    "WHERE id = %lld AND work_owner = %s", NULL
};
static const mso_stmt_t ST_REFRESH_NOW = {
    "refresh_now",
    "UPDATE msoauth_accounts SET refresh_due_at = %lld WHERE id = %lld AND state = 'connected'",
    NULL
};
static const mso_stmt_t ST_SYNC_NOW = {
    "sync_now",
    "UPDATE msoauth_accounts SET sync_due_at = 0, sync_retry_at = CASE WHEN "
    "sync_phase = 'throttled' THEN sync_retry_at ELSE NULL END WHERE id = %lld", NULL
};

static const mso_stmt_t ST_FOLDERS = {
    "folders",
    "SELECT folder, delta_link, next_link, phase, round, last_sync_at, resyncs "
    "FROM msoauth_sync_folders WHERE account_id = %lld", NULL
};
static const mso_stmt_t ST_FOLDER_ADD = {
    "folder_add",
    "INSERT INTO msoauth_sync_folders (account_id, folder, phase, round, updated_at) "
    "VALUES (%lld, %s, 'initial', 1, %lld)", NULL
};
/* Only for the round it was read in: a restart meanwhile wins. */
static const mso_stmt_t ST_FOLDER_CURSOR = {
    "folder_cursor",
    "UPDATE msoauth_sync_folders SET next_link = %s, delta_link = %s, phase = %s, "
    "last_sync_at = COALESCE(%lld, last_sync_at), updated_at = %lld "
    "WHERE account_id = %lld AND folder = %s AND round = %d", NULL
};
static const mso_stmt_t ST_FOLDER_RESTART = {
    "folder_restart",
    "UPDATE msoauth_sync_folders SET round = round + 1, next_link = %s, delta_link = NULL, "
    "phase = 'initial', resyncs = resyncs + 1, updated_at = %lld "
    "WHERE account_id = %lld AND folder = %s", NULL
};

/* A partial update: what Graph left out stays as it is. */
static const mso_stmt_t ST_MSG_UPDATE = {
    "msg_update",
    "UPDATE msoauth_messages SET internet_message_id = COALESCE(%s, internet_message_id), "
    "conversation_id = COALESCE(%s, conversation_id), subject = COALESCE(%s, subject), "
    "from_address = COALESCE(%s, from_address), from_name = COALESCE(%s, from_name), "
    "to_json = COALESCE(%s, to_json), received_at = COALESCE(%lld, received_at), "
    "is_read = COALESCE(%d, is_read), has_attachments = COALESCE(%d, has_attachments), "
    "importance = COALESCE(%s, importance), body_preview = COALESCE(%s, body_preview), "
    "body_type = COALESCE(%s, body_type), body = COALESCE(%s, body), "
    "web_link = COALESCE(%s, web_link), folder = %s, removed = 0, updated_at = %lld, "
    "sync_round = %d WHERE account_id = %lld AND graph_id = %s", NULL
};
/* Removed from this folder only: the same id may already live in another
 * mirrored folder (a move reported there first). */
static const mso_stmt_t ST_MSG_REMOVE = {
    "msg_remove",
    "UPDATE msoauth_messages SET removed = 1, updated_at = %lld "
    "WHERE account_id = %lld AND graph_id = %s AND folder = %s AND removed = 0", NULL
};
static const mso_stmt_t ST_MSG_SWEEP = {
    "msg_sweep",
    "UPDATE msoauth_messages SET removed = 1, updated_at = %lld WHERE account_id = %lld "
    "AND folder = %s AND removed = 0 AND sync_round < %d", NULL
};

static const mso_stmt_t ST_ACTIONS = {
    "actions",
    "SELECT id, account_id, graph_id, action, destination, attempts, sent_at, created_at "
    "FROM msoauth_actions WHERE account_id = %lld AND state = 'queued' ORDER BY id LIMIT %d",
    NULL
};
static const mso_stmt_t ST_ACTION_SENDING = {
    "action_sending",
    "UPDATE msoauth_actions SET attempts = attempts + 1, sent_at = %lld, updated_at = %lld "
    "WHERE id = %lld AND state = 'queued'", NULL
};
static const mso_stmt_t ST_ACTION_DONE = {
    "action_done",
    "UPDATE msoauth_actions SET state = 'done', sent_at = NULL, last_error = NULL, "
    "reason = NULL, updated_at = %lld WHERE id = %lld AND state = 'queued'", NULL
};
static const mso_stmt_t ST_ACTION_FAILED = {
    "action_failed",
    "UPDATE msoauth_actions SET state = 'failed', sent_at = NULL, reason = %s, "
    "last_error = %s, updated_at = %lld WHERE id = %lld AND state = 'queued'", NULL
};
static const mso_stmt_t ST_ACTION_LATER = {
    "action_later",
    "UPDATE msoauth_actions SET last_error = %s, sent_at = %lld, updated_at = %lld "
    "WHERE id = %lld AND state = 'queued'", NULL
};
static const mso_stmt_t ST_MSG_SET_READ = {
    "msg_set_read",
    "UPDATE msoauth_messages SET is_read = %d, updated_at = %lld "
    "WHERE account_id = %lld AND graph_id = %s", NULL
};
static const mso_stmt_t ST_MSG_SET_FOLDER = {
    "msg_set_folder",
    "UPDATE msoauth_messages SET folder = %s, removed = %d, sync_round = 0, updated_at = %lld "
    "WHERE account_id = %lld AND graph_id = %s", NULL
};

static const mso_stmt_t ST_STATS_ACCOUNTS = {
    "stats_accounts",
    "SELECT id, sync_phase, sync_error, sync_due_at, sync_retry_at FROM msoauth_accounts", NULL
};
static const mso_stmt_t ST_STATS_MESSAGES = {
    "stats_messages",
    "SELECT account_id, COUNT(*) FROM msoauth_messages WHERE removed = 0 GROUP BY account_id",
    NULL
};
static const mso_stmt_t ST_STATS_ACTIONS = {
    "stats_actions",
    "SELECT account_id, SUM(CASE WHEN state = 'queued' THEN 1 ELSE 0 END), "
    "MIN(CASE WHEN state = 'queued' THEN created_at END), "
    "SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) FROM msoauth_actions "
    "WHERE state <> 'done' GROUP BY account_id", NULL
};

/* The multi-row upsert of n rows, built once per n for the connection's
 * lifetime (its label names n, so the prepared statement cache keys on it). */
static const mso_stmt_t *upsert_stmt(mso_db_t *db, int n)
{
    char key[48];
    void *found = NULL;
    mso_stmt_t *st;
    apr_array_header_t *parts;
    int i;

    apr_snprintf(key, sizeof(key), "mso_mirror:upsert:%d", n);
    apr_pool_userdata_get(&found, key, db->pool);
    if (found) {
        return found;
    }
    parts = apr_array_make(db->pool, n + 2, sizeof(const char *));
    APR_ARRAY_PUSH(parts, const char *) =
        "INSERT INTO msoauth_messages (account_id, graph_id, folder, internet_message_id, "
        "conversation_id, subject, from_address, from_name, to_json, received_at, is_read, "
        "has_attachments, importance, body_preview, body_type, body, web_link, updated_at, "
        "sync_round, removed) VALUES ";
    for (i = 0; i < n; i++) {
        APR_ARRAY_PUSH(parts, const char *) = i ? ", (%lld, %s, %s, %s, %s, %s, %s, %s, %s, "
            "%lld, %d, %d, %s, %s, %s, %s, %s, %lld, %d, 0)"
            : "(%lld, %s, %s, %s, %s, %s, %s, %s, %s, %lld, %d, %d, %s, %s, %s, %s, %s, %lld, "
              "%d, 0)";
    }
    APR_ARRAY_PUSH(parts, const char *) =
        " ON CONFLICT (account_id, graph_id) DO UPDATE SET folder = excluded.folder, "
        "internet_message_id = excluded.internet_message_id, "
        "conversation_id = excluded.conversation_id, subject = excluded.subject, "
        "from_address = excluded.from_address, from_name = excluded.from_name, "
        "to_json = excluded.to_json, received_at = excluded.received_at, "
        "is_read = excluded.is_read, has_attachments = excluded.has_attachments, "
        "importance = excluded.importance, body_preview = excluded.body_preview, "
        "body_type = excluded.body_type, body = excluded.body, web_link = excluded.web_link, "
        "removed = 0, updated_at = excluded.updated_at, sync_round = excluded.sync_round";
    st = apr_pcalloc(db->pool, sizeof(*st));
    st->label = apr_pstrdup(db->pool, key);
    st->sql = apr_array_pstrcat(db->pool, parts, 0);
    apr_pool_userdata_set(st, st->label, NULL, db->pool);
    return st;
}

/* ------------------------------------------------------------------------- */

static apr_status_t fail_text(mso_db_t *db, apr_pool_t *p, int rc, const char *what,
                              const char **err)
{
    const char *msg = apr_psprintf(p, "cannot %s in %s: %s; %s", what, mso_db_name(db),
                                   mso_db_error(db, p, rc), mso_db_write_hint(db));

    if (err) {
        *err = msg;
    }
    else {
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_ERR, APR_EGENERAL, "mod_msoauth: %s", msg);
    }
    return APR_EGENERAL;
}

/* Begins a transaction that may write for the mailbox: the lease must be
 * ours, and is renewed. APR_EBUSY (rolled back) when it is not. */
static apr_status_t fenced_begin(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                 const char *owner, const char **err)
{
    const void *args[3];
    apr_int64_t until = apr_time_sec(apr_time_now()) + MSO_MIRROR_LEASE;
    int rc, n = 0;

    rc = mso_db_tx_begin(db);
    if (rc != 0) {
        return fail_text(db, p, rc, "start a transaction", err);
    }
    args[0] = &until;
    args[1] = &account_id;
    args[2] = owner;
    rc = mso_db_stmt_run(db, p, &ST_WORK_FENCE, args, &n, NULL);
    if (rc != 0) {
        mso_db_tx_rollback(db, p);
        return fail_text(db, p, rc, "check the mailbox's work lease", err);
    }
    if (n != 1) {
        mso_db_tx_rollback(db, p);
        if (err) {
            *err = "the mailbox's work lease was taken over (it ran out); nothing written";
        }
        return APR_EBUSY;
    }
    return APR_SUCCESS;
}

static apr_status_t commit(mso_db_t *db, apr_pool_t *p, const char *what, const char **err)
{
    int rc = mso_db_tx_commit(db);

    if (rc != 0) {
        apr_status_t rv = fail_text(db, p, rc, what, err);

        mso_db_tx_rollback(db, p);
        return rv;
    }
    return APR_SUCCESS;
}

/* ------------------------------------------------------------------------- */
/* Work leases */

static mso_work_t *work_from_row(mso_db_t *db, apr_pool_t *p, apr_dbd_row_t *row)
{
    mso_work_t *w = apr_pcalloc(p, sizeof(*w));
    int c = MSO_ACCOUNT_NCOLS;

    w->acct = mso_db_account_from_row(db, p, row);
    w->sync_due_at = mso_db_col_i64(db, row, c);
    w->sync_retry_at = mso_db_col_i64(db, row, c + 1);
    w->sync_phase = mso_db_col_str(db, p, row, c + 2);
    w->sync_error = mso_db_col_str(db, p, row, c + 3);
    w->sync_error_runs = (int)mso_db_col_i64(db, row, c + 4);
    w->auth_retry = (int)mso_db_col_i64(db, row, c + 5);
    w->queued_actions = (int)mso_db_col_i64(db, row, c + 6);
    return w;
}

typedef struct {
    const char *owner;
    const apr_int64_t *until, *now;
} claim_baton_t;

static void claim_args(const void **args, const apr_int64_t *id, void *baton)
{
    claim_baton_t *c = baton;

    args[0] = c->owner;
    args[1] = c->until;
    args[2] = id;
    args[3] = c->now;
    args[4] = c->owner;
}

apr_status_t mso_mirror_claim(mso_db_t *db, apr_pool_t *p, const char *owner, apr_int64_t now,
                              int lease_seconds, int max, apr_array_header_t **works)
{
    apr_dbd_results_t *res = NULL;
    apr_dbd_row_t *row = NULL;
    apr_array_header_t *ids = NULL;
    apr_int64_t until = now + lease_seconds, token_floor = now + 60;
    claim_baton_t baton;
    const char *step = NULL;
    const void *args[6];
    int rc, i;

    *works = apr_array_make(p, max > 0 ? max : 1, sizeof(mso_work_t *));
    args[0] = &now;
    args[1] = &now;
    args[2] = &token_floor;
    args[3] = &now;
    args[4] = &now;
    args[5] = &max;
    baton.owner = owner;
    baton.until = &until;
    baton.now = &now;
    rc = mso_db_take_each(db, p, &ST_WORK_DUE, args, &ST_WORK_CLAIM, claim_args, &baton, &ids,
                          &step);
    if (rc != 0) {
        return fail_text(db, p, rc, apr_pstrcat(p, step, " for Graph work", NULL), NULL);
    }
    for (i = 0; i < ids->nelts; i++) {
        args[0] = &APR_ARRAY_IDX(ids, i, apr_int64_t);
        rc = mso_db_stmt_run(db, p, &ST_WORK_GET, args, NULL, &res);
        if (rc != 0) {
            /* Leased but unread: the lease runs out and another pass takes it. */
            fail_text(db, p, rc, "read a leased mailbox", NULL);
            continue;
        }
        row = mso_db_first_row(db, p, res);
        if (row) {
            APR_ARRAY_PUSH(*works, mso_work_t *) = work_from_row(db, p, row);
        }
    }
    return APR_SUCCESS;
}

apr_status_t mso_mirror_release(mso_db_t *db, apr_int64_t id, const char *owner,
                                const mso_work_done_t *d, apr_int64_t now)
{
    apr_pool_t *tmp;
    const void *args[11];
    apr_status_t rv = APR_SUCCESS;
    int rc;

    apr_pool_create(&tmp, db->pool);
    if (d->refresh_now) {
        args[0] = &now;
        args[1] = &id;
        rc = mso_db_stmt_run(db, tmp, &ST_REFRESH_NOW, args, NULL, NULL);
        if (rc != 0) {
            rv = fail_text(db, tmp, rc, "schedule a token refresh", NULL);
        }
    }
    args[0] = &d->sync_due_at;
    args[1] = d->sync_retry_at ? (const void *)&d->sync_retry_at : NULL;
    args[2] = d->sync_phase;
    args[3] = d->sync_error;
    args[4] = &d->sync_error_runs;
    args[5] = &d->auth_retry;
    args[6] = d->last_sync_at ? (const void *)&d->last_sync_at : NULL;
    args[7] = &now;
    args[8] = &id;
    args[9] = owner;
    rc = mso_db_stmt_run(db, tmp, &ST_WORK_RELEASE, args, NULL, NULL);
    if (rc != 0) {
        rv = fail_text(db, tmp, rc, "record the mailbox's sync state", NULL);
    }
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_mirror_sync_now(mso_db_t *db, apr_int64_t id)
{
    apr_pool_t *tmp;
    const void *args[1];
    int rc, n = 0;
    apr_status_t rv = APR_SUCCESS;

    apr_pool_create(&tmp, db->pool);
    args[0] = &id;
    rc = mso_db_stmt_run(db, tmp, &ST_SYNC_NOW, args, &n, NULL);
    if (rc != 0) {
        rv = fail_text(db, tmp, rc, "schedule a sync", NULL);
    }
    else if (n == 0) {
        rv = APR_NOTFOUND;
    }
    apr_pool_destroy(tmp);
    return rv;
}

/* ------------------------------------------------------------------------- */
/* Folders and pages */

apr_status_t mso_mirror_folders(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                const apr_array_header_t *folders, apr_array_header_t **out)
{
    apr_dbd_results_t *res = NULL;
    apr_dbd_row_t *row = NULL;
    apr_hash_t *have = apr_hash_make(p);
    apr_int64_t now = apr_time_sec(apr_time_now());
    const void *args[3];
    int rc, i;

    *out = apr_array_make(p, folders->nelts + 1, sizeof(mso_folder_t *));
    args[0] = &account_id;
    rc = mso_db_stmt_run(db, p, &ST_FOLDERS, args, NULL, &res);
    if (rc != 0) {
        return fail_text(db, p, rc, "read the folder cursors", NULL);
    }
    while (apr_dbd_get_row(db->driver, p, res, &row, -1) == 0) {
        mso_folder_t *f = apr_pcalloc(p, sizeof(*f));

        f->folder = mso_db_col_str(db, p, row, 0);
        f->delta_link = mso_db_col_str(db, p, row, 1);
        f->next_link = mso_db_col_str(db, p, row, 2);
        f->phase = mso_db_col_str(db, p, row, 3);
        f->round = (int)mso_db_col_i64(db, row, 4);
        f->last_sync_at = mso_db_col_i64(db, row, 5);
        f->resyncs = (int)mso_db_col_i64(db, row, 6);
        if (f->folder) {
            apr_hash_set(have, f->folder, APR_HASH_KEY_STRING, f);
        }
    }
    for (i = 0; i < folders->nelts; i++) {
        const char *name = APR_ARRAY_IDX(folders, i, const char *);
        mso_folder_t *f = apr_hash_get(have, name, APR_HASH_KEY_STRING);

        if (!f) {
            args[0] = &account_id;
            args[1] = name;
            args[2] = &now;
            rc = mso_db_stmt_run(db, p, &ST_FOLDER_ADD, args, NULL, NULL);
            if (rc != 0) {
                /* Another node added it just now: read it next time. */
                continue;
            }
            f = apr_pcalloc(p, sizeof(*f));
            f->folder = name;
            f->phase = "initial";
            f->round = 1;
        }
        APR_ARRAY_PUSH(*out, mso_folder_t *) = f;
    }
    return APR_SUCCESS;
}

static const void *opt_str(const char *s)
{
    return s;
}

/* Fills the UPSERT_COLS arguments of one row. */
static void upsert_args(const void **args, const mso_graph_msg_t *m, const apr_int64_t *account_id,
                        const char *folder, const apr_int64_t *now, const int *round, int *flags)
{
    flags[0] = m->is_read > 0;
    flags[1] = m->has_attachments > 0;
    args[0] = account_id;
    args[1] = m->graph_id;
    args[2] = folder;
    args[3] = opt_str(m->internet_message_id);
    args[4] = opt_str(m->conversation_id);
    args[5] = opt_str(m->subject);
    args[6] = opt_str(m->from_address);
    args[7] = opt_str(m->from_name);
    args[8] = opt_str(m->to_json);
    args[9] = m->received_at >= 0 ? (const void *)&m->received_at : NULL;
    args[10] = &flags[0];
    args[11] = &flags[1];
    args[12] = opt_str(m->importance);
    args[13] = opt_str(m->body_preview);
    args[14] = opt_str(m->body_type);
    args[15] = opt_str(m->body);
    args[16] = opt_str(m->web_link);
    args[17] = now;
    args[18] = round;
}

/* Writes rows [from, to) of the page's full items in one statement. */
static int run_chunk(mso_db_t *db, apr_pool_t *p, const mso_graph_msg_t *const *rows, int n,
                     const apr_int64_t *account_id, const char *folder, const apr_int64_t *now,
                     const int *round)
{
    const void **args;
    int *flags, i;

    if (n == 0) {
        return 0;
    }
    args = apr_palloc(p, sizeof(*args) * UPSERT_COLS * n);
    flags = apr_palloc(p, sizeof(*flags) * 2 * n);
    for (i = 0; i < n; i++) {
        upsert_args(args + i * UPSERT_COLS, rows[i], account_id, folder, now, round,
                    flags + 2 * i);
    }
    return mso_db_stmt_run(db, p, upsert_stmt(db, n), args, NULL, NULL);
}

static int run_partial(mso_db_t *db, apr_pool_t *p, const mso_graph_msg_t *m,
                       const apr_int64_t *account_id, const char *folder, const apr_int64_t *now,
                       const int *round)
{
    const void *args[19];
    int is_read = m->is_read, att = m->has_attachments, rc, n = 0;
    const mso_graph_msg_t *one[1];

    args[0] = m->internet_message_id;
    args[1] = m->conversation_id;
    args[2] = m->subject;
    args[3] = m->from_address;
    args[4] = m->from_name;
    args[5] = m->to_json;
    args[6] = m->received_at >= 0 ? (const void *)&m->received_at : NULL;
    args[7] = is_read >= 0 ? (const void *)&is_read : NULL;
    args[8] = att >= 0 ? (const void *)&att : NULL;
    args[9] = m->importance;
    args[10] = m->body_preview;
    args[11] = m->body_type;
    args[12] = m->body;
    args[13] = m->web_link;
    args[14] = folder;
    args[15] = now;
    args[16] = round;
    args[17] = account_id;
    args[18] = m->graph_id;
    rc = mso_db_stmt_run(db, p, &ST_MSG_UPDATE, args, &n, NULL);
    if (rc != 0 || n > 0) {
        return rc;
    }
    /* Not mirrored yet: keep what there is. */
    one[0] = m;
    return run_chunk(db, p, one, 1, account_id, folder, now, round);
}

apr_status_t mso_mirror_apply_page(mso_db_t *db, apr_pool_t *p, const char *owner,
                                   apr_int64_t account_id, mso_folder_t *f,
                                   const mso_graph_page_t *page, apr_int64_t now,
                                   int *applied, const char **err)
{
    const mso_graph_msg_t **chunk;
    apr_hash_t *in_chunk;
    const char *next, *delta, *phase;
    apr_int64_t synced_at = 0;
    const void *args[8];
    apr_status_t rv;
    int rc = 0, n = 0, i, count = 0, rows = 0, round = f->round;
    const char *step = "store the messages";

    *applied = 0;
    rv = fenced_begin(db, p, account_id, owner, err);
    if (rv != APR_SUCCESS) {
        return rv;
    }
    chunk = apr_palloc(p, sizeof(*chunk) * CHUNK);
    in_chunk = apr_hash_make(p);
    for (i = 0; i <= page->items->nelts && rc == 0; i++) {
        const mso_graph_msg_t *m = i < page->items->nelts
            ? &APR_ARRAY_IDX(page->items, i, mso_graph_msg_t) : NULL;

        if (m && m->full && n < CHUNK
            && !apr_hash_get(in_chunk, m->graph_id, APR_HASH_KEY_STRING)) {
            chunk[n++] = m;
            apr_hash_set(in_chunk, m->graph_id, APR_HASH_KEY_STRING, m);
            continue;
        }
        /* Anything else first writes what is pending, to keep the order. */
        rc = run_chunk(db, p, chunk, n, &account_id, f->folder, &now, &round);
        count += n;
        n = 0;
        apr_hash_clear(in_chunk);
        if (rc != 0 || !m) {
            break;
        }
        if (m->full) {
            chunk[n++] = m;
            apr_hash_set(in_chunk, m->graph_id, APR_HASH_KEY_STRING, m);
        }
        else if (m->removed) {
            args[0] = &now;
            args[1] = &account_id;
            args[2] = m->graph_id;
            args[3] = f->folder;
            step = "mark a removed message";
            rc = mso_db_stmt_run(db, p, &ST_MSG_REMOVE, args, NULL, NULL);
            count++;
        }
        else {
            step = "update a changed message";
            rc = run_partial(db, p, m, &account_id, f->folder, &now, &round);
            count++;
        }
    }
    if (rc != 0) {
        mso_db_tx_rollback(db, p);
        return fail_text(db, p, rc, step, err);
    }

    if (page->delta_link) {
        /* A full round ends here: what it did not see is gone from the folder. */
        if (strcmp(f->phase ? f->phase : "initial", "idle") != 0) {
            args[0] = &now;
            args[1] = &account_id;
            args[2] = f->folder;
            args[3] = &round;
            rc = mso_db_stmt_run(db, p, &ST_MSG_SWEEP, args, NULL, NULL);
            if (rc != 0) {
                mso_db_tx_rollback(db, p);
                return fail_text(db, p, rc, "remove messages a full sync did not see", err);
            }
        }
        next = NULL;
        delta = page->delta_link;
        phase = "idle";
        synced_at = now;
    }
    else {
        next = page->next_link;
        delta = f->delta_link;
        phase = f->phase && !strcmp(f->phase, "idle") ? "idle" : "backfill";
    }
    args[0] = next;
    args[1] = delta;
    args[2] = phase;
    args[3] = synced_at ? (const void *)&synced_at : NULL;
    args[4] = &now;
    args[5] = &account_id;
    args[6] = f->folder;
    args[7] = &round;
    rc = mso_db_stmt_run(db, p, &ST_FOLDER_CURSOR, args, &rows, NULL);
    if (rc != 0) {
        mso_db_tx_rollback(db, p);
        return fail_text(db, p, rc, "store the folder's sync cursor", err);
    }
    if (rows != 1) {
        mso_db_tx_rollback(db, p);
        *err = "the folder's sync restarted meanwhile; the page is dropped";
        return APR_EBUSY;
    }
    rv = commit(db, p, "commit a page of messages", err);
    if (rv != APR_SUCCESS) {
        return rv;
    }
    f->next_link = next;
    f->delta_link = delta;
    f->phase = phase;
    if (synced_at) {
        f->last_sync_at = synced_at;
    }
    *applied = count;
    return APR_SUCCESS;
}

apr_status_t mso_mirror_restart_folder(mso_db_t *db, const char *owner,
                                       apr_int64_t account_id, mso_folder_t *f,
                                       const char *first_link, apr_int64_t now)
{
    apr_pool_t *tmp;
    const void *args[4];
    apr_status_t rv;
    int rc;

    apr_pool_create(&tmp, db->pool);
    rv = fenced_begin(db, tmp, account_id, owner, NULL);
    if (rv == APR_SUCCESS) {
        args[0] = first_link;
        args[1] = &now;
        args[2] = &account_id;
        args[3] = f->folder;
        rc = mso_db_stmt_run(db, tmp, &ST_FOLDER_RESTART, args, NULL, NULL);
        if (rc != 0) {
            mso_db_tx_rollback(db, tmp);
            rv = fail_text(db, tmp, rc, "restart a folder's sync", NULL);
        }
        else {
            rv = commit(db, tmp, "commit a folder's restart", NULL);
        }
    }
    if (rv == APR_SUCCESS) {
        f->round++;
        f->resyncs++;
        f->next_link = first_link;
        f->delta_link = NULL;
        f->phase = "initial";
    }
    apr_pool_destroy(tmp);
    return rv;
}

/* ------------------------------------------------------------------------- */
/* Actions */

apr_status_t mso_mirror_actions(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id, int max,
                                apr_array_header_t **actions)
{
    apr_dbd_results_t *res = NULL;
    apr_dbd_row_t *row = NULL;
    const void *args[2];
    int rc;

    *actions = apr_array_make(p, 16, sizeof(mso_action_t *));
    args[0] = &account_id;
    args[1] = &max;
    rc = mso_db_stmt_run(db, p, &ST_ACTIONS, args, NULL, &res);
    if (rc != 0) {
        return fail_text(db, p, rc, "read the queued actions", NULL);
    }
    while (apr_dbd_get_row(db->driver, p, res, &row, -1) == 0) {
        mso_action_t *a = apr_pcalloc(p, sizeof(*a));

        a->id = mso_db_col_i64(db, row, 0);
        a->account_id = mso_db_col_i64(db, row, 1);
        a->graph_id = mso_db_col_str(db, p, row, 2);
        a->action = mso_db_col_str(db, p, row, 3);
        a->destination = mso_db_col_str(db, p, row, 4);
        a->attempts = (int)mso_db_col_i64(db, row, 5);
        a->sent_at = mso_db_col_i64(db, row, 6);
        a->created_at = mso_db_col_i64(db, row, 7);
        APR_ARRAY_PUSH(*actions, mso_action_t *) = a;
    }
    return APR_SUCCESS;
}

/* One fenced transaction: the action's own statement (which must change its
 * row: still queued), then the mirror's, when given. */
static apr_status_t action_tx(mso_db_t *db, const char *owner, const mso_action_t *a,
                              const mso_stmt_t *st, const void **args,
                              const mso_stmt_t *mirror, const void **margs, const char *what)
{
    apr_pool_t *tmp;
    apr_status_t rv;
    int rc, n = 0;

    apr_pool_create(&tmp, db->pool);
    rv = fenced_begin(db, tmp, a->account_id, owner, NULL);
    if (rv != APR_SUCCESS) {
        apr_pool_destroy(tmp);
        return rv;
    }
    rc = mso_db_stmt_run(db, tmp, st, args, &n, NULL);
    if (rc == 0 && n != 1) {
        /* Someone changed the row (the app cancelled it): leave it alone. */
        mso_db_tx_rollback(db, tmp);
        apr_pool_destroy(tmp);
        return APR_EBUSY;
    }
    if (rc == 0 && mirror) {
        rc = mso_db_stmt_run(db, tmp, mirror, margs, NULL, NULL);
    }
    if (rc != 0) {
        mso_db_tx_rollback(db, tmp);
        rv = fail_text(db, tmp, rc, what, NULL);
    }
    else {
        rv = commit(db, tmp, what, NULL);
    }
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_mirror_action_sending(mso_db_t *db, const char *owner, const mso_action_t *a,
                                       apr_int64_t now)
{
    const void *args[3];

    args[0] = &now;
    args[1] = &now;
    args[2] = &a->id;
    return action_tx(db, owner, a, &ST_ACTION_SENDING, args, NULL, NULL,
                     "record an action as being sent");
}

apr_status_t mso_mirror_action_done(mso_db_t *db, const char *owner, const mso_action_t *a,
                                    const char *folder, int removed, apr_int64_t now)
{
    const void *args[2], *margs[5];
    int is_read = a->action && !strcmp(a->action, "mark_read");

    args[0] = &now;
    args[1] = &a->id;
    if (folder) {
        margs[0] = folder;
        margs[1] = &removed;
        margs[2] = &now;
        margs[3] = &a->account_id;
        margs[4] = a->graph_id;
        return action_tx(db, owner, a, &ST_ACTION_DONE, args, &ST_MSG_SET_FOLDER, margs,
                         "record an applied action");
    }
    margs[0] = &is_read;
    margs[1] = &now;
    margs[2] = &a->account_id;
    margs[3] = a->graph_id;
    return action_tx(db, owner, a, &ST_ACTION_DONE, args, &ST_MSG_SET_READ, margs,
                     "record an applied action");
}

apr_status_t mso_mirror_action_failed(mso_db_t *db, const char *owner, const mso_action_t *a,
                                      const char *reason, const char *last_error,
                                      apr_int64_t now)
{
    const void *args[4];

    args[0] = reason;
    args[1] = last_error;
    args[2] = &now;
    args[3] = &a->id;
    return action_tx(db, owner, a, &ST_ACTION_FAILED, args, NULL, NULL,
                     "record a failed action");
}

apr_status_t mso_mirror_action_later(mso_db_t *db, const char *owner, const mso_action_t *a,
                                     const char *last_error, int maybe_applied,
                                     apr_int64_t now)
{
    const void *args[4];
    apr_int64_t sent = a->sent_at ? a->sent_at : now;

    args[0] = last_error;
    args[1] = maybe_applied ? (const void *)&sent : NULL;
    args[2] = &now;
    args[3] = &a->id;
    return action_tx(db, owner, a, &ST_ACTION_LATER, args, NULL, NULL,
                     "record an action to retry");
}

/* ------------------------------------------------------------------------- */

static mso_mirror_stats_t *stats_for(apr_pool_t *p, apr_hash_t *h, apr_int64_t id)
{
    const char *key = apr_psprintf(p, "%" APR_INT64_T_FMT, id);
    mso_mirror_stats_t *s = apr_hash_get(h, key, APR_HASH_KEY_STRING);

    if (!s) {
        s = apr_pcalloc(p, sizeof(*s));
        s->account_id = id;
        apr_hash_set(h, key, APR_HASH_KEY_STRING, s);
    }
    return s;
}

apr_status_t mso_mirror_stats(mso_db_t *db, apr_pool_t *p, apr_hash_t **stats)
{
    apr_dbd_results_t *res = NULL;
    apr_dbd_row_t *row = NULL;
    int rc;

    *stats = apr_hash_make(p);
    rc = mso_db_stmt_run(db, p, &ST_STATS_ACCOUNTS, NULL, NULL, &res);
    if (rc != 0) {
        return fail_text(db, p, rc, "read the sync state", NULL);
    }
    while (apr_dbd_get_row(db->driver, p, res, &row, -1) == 0) {
        mso_mirror_stats_t *s = stats_for(p, *stats, mso_db_col_i64(db, row, 0));

        s->sync_phase = mso_db_col_str(db, p, row, 1);
        s->sync_error = mso_db_col_str(db, p, row, 2);
        s->sync_due_at = mso_db_col_i64(db, row, 3);
        s->sync_retry_at = mso_db_col_i64(db, row, 4);
    }
    rc = mso_db_stmt_run(db, p, &ST_STATS_MESSAGES, NULL, NULL, &res);
    if (rc != 0) {
        return fail_text(db, p, rc, "count the mirrored messages", NULL);
    }
    while (apr_dbd_get_row(db->driver, p, res, &row, -1) == 0) {
        stats_for(p, *stats, mso_db_col_i64(db, row, 0))->messages = mso_db_col_i64(db, row, 1);
    }
    rc = mso_db_stmt_run(db, p, &ST_STATS_ACTIONS, NULL, NULL, &res);
    if (rc != 0) {
        return fail_text(db, p, rc, "count the queued actions", NULL);
    }
    while (apr_dbd_get_row(db->driver, p, res, &row, -1) == 0) {
        mso_mirror_stats_t *s = stats_for(p, *stats, mso_db_col_i64(db, row, 0));

        s->queued = mso_db_col_i64(db, row, 1);
        s->oldest_queued_at = mso_db_col_i64(db, row, 2);
        s->failed = mso_db_col_i64(db, row, 3);
    }
    return APR_SUCCESS;
}
