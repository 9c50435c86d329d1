/* The mirror in the database (see mso_mirror.h): msoauth_messages,
 * msoauth_sync_folders, msoauth_actions, and the Graph work columns of
 * msoauth_accounts (sync_*, work_*, auth_retry). Same statements on SQLite
 * and PostgreSQL; every value is bound.
 *
 * Pages. New messages of a page go in with multi-row upserts (one statement
 * per chunk of up to CHUNK rows, 2,000 values: one round trip to PostgreSQL
 * instead of one per row; a shorter chunk is split into powers of two, so a
 * connection prepares few sizes). A chunk never holds the same id twice (ON
 * CONFLICT DO UPDATE refuses to touch a row twice in one statement), so a
 * repeated id starts a new chunk, which keeps the page's order. Partial
 * updates (only the changed properties) and removals run one statement
 * each, in order.
 *
 * Fencing. Every transaction of a mailbox's Graph work starts with
 * ST_WORK_FENCE: it extends the work lease and proves it is still ours, so a
 * node that lost the lease writes nothing. */
#include <string.h>
#include <strings.h>

#include <apr_hash.h>
#include <apr_strings.h>
#include <apr_time.h>

#include "mso_account.h"
#include "mso_attach.h"
#include "mso_apptoken.h"
#include "mso_events.h"
#include "mso_log.h"
#include "mso_mirror.h"

#define CHUNK 100                   /* a whole page in one statement */

/* ------------------------------------------------------------------------- */
/* Statements */

/* The account row, then its Graph work. */
#define WORK_COLUMNS MSO_ACCOUNT_COLUMNS ", sync_due_at, sync_retry_at, " \
    "sync_phase, sync_error, sync_error_runs, auth_retry, " \
    "(SELECT COUNT(*) FROM msoauth_actions q WHERE q.account_id = msoauth_accounts.id " \
    "AND q.state = 'queued') AS queued_actions, " \
    "CASE WHEN EXISTS (SELECT 1 FROM msoauth_messages m WHERE " \
    "m.account_id = msoauth_accounts.id AND m.attach_due > 0 AND m.removed = 0) OR EXISTS " \
    "(SELECT 1 FROM msoauth_attachments t JOIN msoauth_messages m ON m.account_id = " \
    "t.account_id AND m.graph_id = t.graph_id WHERE t.account_id = msoauth_accounts.id " \
    "AND t.state = 'pending' AND m.removed = 0) THEN 1 ELSE 0 END AS attach_work, " \
    "(SELECT COUNT(*) FROM msoauth_outbox o WHERE o.account_id = msoauth_accounts.id " \
    "AND o.state = 'queued') AS queued_sends"

/* A delegated account works with its own token; an app account with its
 * company's application token (mso_apptoken.h), so it waits while that one
 * is missing or failing. */
static const mso_stmt_t ST_WORK_DUE = {
    "look for mailboxes with Graph work", "now:int token_floor:int max:int",
    "SELECT id FROM msoauth_accounts a WHERE state = 'connected' "
    "AND (work_until IS NULL OR work_until < :now) AND COALESCE(sync_retry_at, 0) <= :now "
    "AND ((kind = 'delegated' AND COALESCE(access_expires_at, 0) > :token_floor "
    "AND COALESCE(refresh_due_at, 0) > :now) OR (kind = 'app' AND EXISTS (SELECT 1 "
    "FROM msoauth_app_tokens t WHERE t.company = a.company AND t.client_id = a.client_id "
    "AND t.resource = 'graph' AND t.expires_at > :token_floor "
    "AND (t.reason IS NULL OR t.reason = 'token_endpoint_unreachable')))) "
    "AND (COALESCE(sync_due_at, 0) <= :now OR EXISTS (SELECT 1 FROM msoauth_actions q "
    "WHERE q.state = 'queued' AND q.account_id = a.id) "
    /* outgoing mail queued and not held back */
    "OR EXISTS (SELECT 1 FROM msoauth_outbox o WHERE o.state = 'queued' "
    "AND o.account_id = a.id AND COALESCE(o.retry_at, 0) <= :now) "
    /* attachment work pending: a list to read or a content to download */
    "OR EXISTS (SELECT 1 FROM msoauth_messages m WHERE m.account_id = a.id "
    "AND m.attach_due > 0 AND m.removed = 0) OR EXISTS (SELECT 1 FROM msoauth_attachments t "
    "JOIN msoauth_messages m ON m.account_id = t.account_id AND m.graph_id = t.graph_id "
    "WHERE t.account_id = a.id AND t.state = 'pending' AND m.removed = 0)) "
    "ORDER BY COALESCE(sync_due_at, 0), id LIMIT :max", NULL
};
static const mso_stmt_t ST_WORK_CLAIM = {
    "take a Graph work lease", "id:int owner:text until:int now:int",
    "UPDATE msoauth_accounts SET work_owner = :owner, work_until = :until WHERE id = :id "
    "AND state = 'connected' AND (work_until IS NULL OR work_until < :now "
    "OR work_owner = :owner)", NULL
};
static const mso_stmt_t ST_WORK_GET = {
    "read a leased mailbox", "id:int",
    "SELECT " WORK_COLUMNS " FROM msoauth_accounts WHERE id = :id", NULL
};
static const mso_stmt_t ST_WORK_FENCE = {
    "check the mailbox's work lease", "id:int owner:text until:int",
    "UPDATE msoauth_accounts SET work_until = :until WHERE id = :id AND work_owner = :owner",
    NULL
};
static const mso_stmt_t ST_WORK_RELEASE = {
    "record the mailbox's sync state",
    "id:int owner:text due:int retry_at:int phase:text error:text error_runs:int "
    "auth_retry:int last_sync_at:int now:int",
    "UPDATE msoauth_accounts SET work_owner = NULL, work_until = NULL, sync_due_at = :due, "
    "sync_retry_at = :retry_at, sync_phase = :phase, sync_error = :error, "
    "sync_error_runs = :error_runs, auth_retry = :auth_retry, "
    "last_sync_at = COALESCE(:last_sync_at, last_sync_at), updated_at = :now "
    "WHERE id = :id AND work_owner = :owner", NULL
};
static const mso_stmt_t ST_REFRESH_NOW = {
    "schedule a token refresh", "id:int now:int",
    "UPDATE msoauth_accounts SET refresh_due_at = :now WHERE id = :id AND state = 'connected'",
    NULL
};
static const mso_stmt_t ST_SYNC_NOW = {
    "schedule a sync", "id:int",
    "UPDATE msoauth_accounts SET sync_due_at = 0, sync_retry_at = CASE WHEN "
    "sync_phase = 'throttled' THEN sync_retry_at ELSE NULL END WHERE id = :id", NULL
};

static const mso_stmt_t ST_FOLDERS = {
    "read the folder cursors", "id:int",
    "SELECT folder, delta_link, next_link, phase, round, last_sync_at, resyncs "
    "FROM msoauth_sync_folders WHERE account_id = :id", NULL
};
static const mso_stmt_t ST_FOLDER_ADD = {
    "add a folder cursor", "id:int folder:text now:int",
    "INSERT INTO msoauth_sync_folders (account_id, folder, phase, round, updated_at) "
    "VALUES (:id, :folder, 'initial', 1, :now)", NULL
};
/* Only for the round it was read in: a restart meanwhile wins. */
static const mso_stmt_t ST_FOLDER_CURSOR = {
    "store the folder's sync cursor",
    "id:int folder:text round:int next:text delta:text phase:text synced_at:int now:int",
    "UPDATE msoauth_sync_folders SET next_link = :next, delta_link = :delta, phase = :phase, "
    "last_sync_at = COALESCE(:synced_at, last_sync_at), updated_at = :now "
    "WHERE account_id = :id AND folder = :folder AND round = :round", NULL
};
static const mso_stmt_t ST_FOLDER_RESTART = {
    "restart a folder's sync", "id:int folder:text first:text now:int",
    "UPDATE msoauth_sync_folders SET round = round + 1, next_link = :first, "
    "delta_link = NULL, phase = 'initial', resyncs = resyncs + 1, updated_at = :now "
    "WHERE account_id = :id AND folder = :folder", NULL
};

/* A changed message's attachments are listed again (attach_due counts the
 * changes) when it may have some (want, else the row's flag), or still has
 * rows (all of them removed in Outlook); else it has none to list. */
#define ATTACH_DUE(ROW, ROW_FLAG, WANT, ACCOUNT, GRAPH_ID) \
    "attach_due = CASE WHEN COALESCE(" WANT ", " ROW_FLAG ") > 0 OR EXISTS (SELECT 1 " \
    "FROM msoauth_attachments t WHERE t.account_id = " ACCOUNT " AND t.graph_id = " \
    GRAPH_ID ") THEN " ROW "attach_due + 1 ELSE 0 END, attach_tries = 0"

/* A partial update: what Graph left out stays as it is. */
static const mso_stmt_t ST_MSG_UPDATE = {
    "update a changed message",
    "account_id:int graph_id:text folder:text now:int round:int internet_message_id:text "
    "conversation_id:text subject:text from_address:text from_name:text to_json:text "
    "received_at:int is_read:int has_attachments:int importance:text body_preview:text "
    "body_type:text body:text web_link:text body_truncated:int attach_want:int",
    "UPDATE msoauth_messages SET "
    "internet_message_id = COALESCE(:internet_message_id, internet_message_id), "
    "conversation_id = COALESCE(:conversation_id, conversation_id), "
    "subject = COALESCE(:subject, subject), from_address = COALESCE(:from_address, from_address), "
    "from_name = COALESCE(:from_name, from_name), to_json = COALESCE(:to_json, to_json), "
    "received_at = COALESCE(:received_at, received_at), is_read = COALESCE(:is_read, is_read), "
    "has_attachments = COALESCE(:has_attachments, has_attachments), "
    "importance = COALESCE(:importance, importance), "
    "body_preview = COALESCE(:body_preview, body_preview), "
    "body_type = COALESCE(:body_type, body_type), body = COALESCE(:body, body), "
    "web_link = COALESCE(:web_link, web_link), "
    "body_truncated = COALESCE(:body_truncated, body_truncated), folder = :folder, "
    "removed = 0, updated_at = :now, sync_round = :round, " ATTACH_DUE("", "has_attachments",
    ":attach_want", ":account_id", ":graph_id") " "
    "WHERE account_id = :account_id AND graph_id = :graph_id", NULL
};
/* Removed from this folder only: the same id may already live in another
 * mirrored folder (a move reported there first). */
static const mso_stmt_t ST_MSG_REMOVE = {
    "mark a removed message", "account_id:int graph_id:text folder:text now:int",
    "UPDATE msoauth_messages SET removed = 1, attach_due = 0, attach_tries = 0, "
    "updated_at = :now WHERE account_id = :account_id AND graph_id = :graph_id "
    "AND folder = :folder AND removed = 0", NULL
};
static const mso_stmt_t ST_MSG_SWEEP = {
    "remove messages a full sync did not see", "account_id:int folder:text round:int now:int",
    "UPDATE msoauth_messages SET removed = 1, attach_due = 0, attach_tries = 0, "
    "updated_at = :now WHERE account_id = :account_id AND folder = :folder AND removed = 0 "
    "AND sync_round < :round", NULL
};

static const mso_stmt_t ST_ACTIONS = {
    "read the queued actions", "id:int max:int",
    "SELECT id, account_id, graph_id, action, destination, attempts, sent_at, created_at "
    "FROM msoauth_actions WHERE account_id = :id AND state = 'queued' ORDER BY id LIMIT :max",
    NULL
};
static const mso_stmt_t ST_ACTION_SENDING = {
    "record an action as being sent", "id:int now:int",
    "UPDATE msoauth_actions SET attempts = attempts + 1, sent_at = :now, updated_at = :now "
    "WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_ACTION_DONE = {
    "record an applied action", "id:int now:int",
    "UPDATE msoauth_actions SET state = 'done', sent_at = NULL, last_error = NULL, "
    "reason = NULL, updated_at = :now WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_ACTION_FAILED = {
    "record a failed action", "id:int reason:text last_error:text now:int",
    "UPDATE msoauth_actions SET state = 'failed', sent_at = NULL, reason = :reason, "
    "last_error = :last_error, updated_at = :now WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_ACTION_LATER = {
    "record an action to retry", "id:int last_error:text sent_at:int now:int",
    "UPDATE msoauth_actions SET last_error = :last_error, sent_at = :sent_at, "
    "updated_at = :now WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_MSG_SET_READ = {
    "mark the mirrored message read or unread",
    "account_id:int graph_id:text is_read:int now:int",
    "UPDATE msoauth_messages SET is_read = :is_read, updated_at = :now "
    "WHERE account_id = :account_id AND graph_id = :graph_id", NULL
};
static const mso_stmt_t ST_MSG_SET_FOLDER = {
    "move the mirrored message",
    "account_id:int graph_id:text folder:text removed:int now:int",
    "UPDATE msoauth_messages SET folder = :folder, removed = :removed, sync_round = 0, "
    "attach_due = CASE WHEN :removed = 1 THEN 0 ELSE attach_due END, "
    "updated_at = :now WHERE account_id = :account_id AND graph_id = :graph_id", NULL
};

static const mso_stmt_t ST_STATS_ACCOUNTS = {
    "read the sync state", NULL,
    "SELECT id, sync_phase, sync_error, sync_due_at, sync_retry_at FROM msoauth_accounts", NULL
};
static const mso_stmt_t ST_STATS_MESSAGES = {
    "count the mirrored messages", NULL,
    "SELECT account_id, COUNT(*) AS messages FROM msoauth_messages WHERE removed = 0 "
    "GROUP BY account_id", NULL
};
static const mso_stmt_t ST_STATS_ACTIONS = {
    "count the queued actions", NULL,
    "SELECT account_id, SUM(CASE WHEN state = 'queued' THEN 1 ELSE 0 END) AS queued, "
    "MIN(CASE WHEN state = 'queued' THEN created_at END) AS oldest, "
    "SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed FROM msoauth_actions "
    "WHERE state <> 'done' GROUP BY account_id", NULL
};

/* The multi-row upsert: row i's values are :graph_id_i and so on (each '#'
 * of UPSERT_ROW is the row number, each name_# of UPSERT_PARAMS one value per
 * row); account, folder, time and round are shared by every row. */
#define UPSERT_HEAD \
    "INSERT INTO msoauth_messages (account_id, graph_id, folder, internet_message_id, " \
    "conversation_id, subject, from_address, from_name, to_json, received_at, is_read, " \
    "has_attachments, importance, body_preview, body_type, body, web_link, body_truncated, " \
    "updated_at, sync_round, removed, attach_due) VALUES "
#define UPSERT_ROW \
    "(:account_id, :graph_id_#, :folder, :internet_message_id_#, :conversation_id_#, " \
    ":subject_#, :from_address_#, :from_name_#, :to_json_#, :received_at_#, :is_read_#, " \
    ":has_attachments_#, :importance_#, :body_preview_#, :body_type_#, :body_#, " \
    ":web_link_#, :body_truncated_#, :now, :round, 0, :attach_want_#)"
#define UPSERT_TAIL \
    " ON CONFLICT (account_id, graph_id) DO UPDATE SET folder = excluded.folder, " \
    "internet_message_id = excluded.internet_message_id, " \
    "conversation_id = excluded.conversation_id, subject = excluded.subject, " \
    "from_address = excluded.from_address, from_name = excluded.from_name, " \
    "to_json = excluded.to_json, received_at = excluded.received_at, " \
    "is_read = excluded.is_read, has_attachments = excluded.has_attachments, " \
    "importance = excluded.importance, body_preview = excluded.body_preview, " \
    "body_type = excluded.body_type, body = excluded.body, web_link = excluded.web_link, " \
    "body_truncated = excluded.body_truncated, removed = 0, " \
    "updated_at = excluded.updated_at, sync_round = excluded.sync_round, " \
    ATTACH_DUE("msoauth_messages.", "0", "excluded.attach_due", "msoauth_messages.account_id", \
               "msoauth_messages.graph_id")
#define UPSERT_PARAMS "account_id:int folder:text now:int round:int " \
    "graph_id_#:text internet_message_id_#:text conversation_id_#:text subject_#:text " \
    "from_address_#:text from_name_#:text to_json_#:text received_at_#:int is_read_#:int " \
    "has_attachments_#:int importance_#:text body_preview_#:text body_type_#:text " \
    "body_#:text web_link_#:text body_truncated_#:int attach_want_#:int"

/* template with each '#' replaced by row. */
static const char *expand(apr_pool_t *p, const char *template, int row)
{
    apr_array_header_t *parts = apr_array_make(p, 24, sizeof(const char *));
    const char *num = apr_itoa(p, row), *c, *start;

    for (start = c = template; *c; c++) {
        if (*c == '#') {
            APR_ARRAY_PUSH(parts, const char *) = apr_pstrmemdup(p, start, c - start);
            APR_ARRAY_PUSH(parts, const char *) = num;
            start = c + 1;
        }
    }
    APR_ARRAY_PUSH(parts, const char *) = start;
    return apr_array_pstrcat(p, parts, 0);
}

/* The upsert of n rows, built once per n for the connection's lifetime
 * (the connection keeps its prepared form, not the text it was made from). */
static const mso_stmt_t *upsert_stmt(mso_db_t *db, int n)
{
    char key[48];
    void *found = NULL;
    mso_stmt_t *st;
    apr_array_header_t *sql;
    apr_pool_t *tmp;
    int i;

    apr_snprintf(key, sizeof(key), "mso_mirror:upsert:%d", n);
    apr_pool_userdata_get(&found, key, db->pool);
    if (found) {
        return found;
    }
    apr_pool_create(&tmp, db->pool);
    sql = apr_array_make(tmp, n + 2, sizeof(const char *));
    APR_ARRAY_PUSH(sql, const char *) = UPSERT_HEAD;
    for (i = 0; i < n; i++) {
        APR_ARRAY_PUSH(sql, const char *) = expand(tmp, i ? ", " UPSERT_ROW : UPSERT_ROW, i);
    }
    APR_ARRAY_PUSH(sql, const char *) = UPSERT_TAIL;
    st = apr_pcalloc(db->pool, sizeof(*st));
    st->what = "store new messages";
    st->params = UPSERT_PARAMS;
    st->sql = apr_array_pstrcat(tmp, sql, 0);
    /* Read once, now, into the connection's form: the text is not kept. */
    mso_args(db, tmp, st);
    st->sql = NULL;
    apr_pool_destroy(tmp);
    apr_pool_userdata_set(st, apr_pstrdup(db->pool, key), NULL, db->pool);
    return st;
}

/* ------------------------------------------------------------------------- */
/* The work lease */

static mso_work_t *work_from_row(mso_rows_t *r, apr_pool_t *p)
{
    mso_work_t *w = apr_pcalloc(p, sizeof(*w));

    w->acct = mso_account_from_row(r, p);
    w->sync_due_at = mso_col_int(r, "sync_due_at");
    w->sync_retry_at = mso_col_int(r, "sync_retry_at");
    w->sync_phase = mso_col_text(r, p, "sync_phase");
    w->sync_error = mso_col_text(r, p, "sync_error");
    w->sync_error_runs = (int)mso_col_int(r, "sync_error_runs");
    w->auth_retry = (int)mso_col_int(r, "auth_retry");
    w->queued_actions = (int)mso_col_int(r, "queued_actions");
    w->attach_work = (int)mso_col_int(r, "attach_work");
    w->queued_sends = (int)mso_col_int(r, "queued_sends");
    return w;
}

/* The first statement of every transaction that writes for the mailbox:
 * the lease must be ours, and is renewed. APR_EBUSY when it is not. */
apr_status_t mso_mirror_fence(mso_tx_t *tx, apr_int64_t account_id, const char *owner)
{
    mso_args_t *a = mso_tx_args(tx, &ST_WORK_FENCE);
    apr_status_t rv;
    int n = 0;

    mso_arg_int(a, "id", account_id);
    mso_arg_text(a, "owner", owner);
    mso_arg_int(a, "until", apr_time_sec(apr_time_now()) + MSO_MIRROR_LEASE);
    if (MSO_OK(mso_tx_exec(tx, a, &n)) && n != 1) {
        rv = APR_EBUSY;             /* not an error: whoever holds it now does the work */
    }
    return rv;
}

apr_status_t mso_mirror_claim(mso_db_t *db, apr_pool_t *p, const char *owner, apr_int64_t now,
                              int lease_seconds, int max, apr_array_header_t **works)
{
    apr_array_header_t *ids = NULL;
    mso_rows_t *rows = NULL;
    mso_args_t *find, *take, *a;
    apr_status_t rv;
    int i;

    *works = apr_array_make(p, max > 0 ? max : 1, sizeof(mso_work_t *));
    find = mso_args(db, p, &ST_WORK_DUE);
    mso_arg_int(find, "now", now);
    mso_arg_int(find, "token_floor", now + 60);
    mso_arg_int(find, "max", max);
    take = mso_args(db, p, &ST_WORK_CLAIM);
    mso_arg_text(take, "owner", owner);
    mso_arg_int(take, "until", now + lease_seconds);
    mso_arg_int(take, "now", now);
    if (!MSO_OK(mso_db_claim(db, p, find, take, &ids, NULL))) {
        return rv;
    }
    for (i = 0; i < ids->nelts; i++) {
        a = mso_args(db, p, &ST_WORK_GET);
        mso_arg_int(a, "id", APR_ARRAY_IDX(ids, i, apr_int64_t));
        /* Leased but unread: the lease runs out and another pass takes it. */
        if (mso_select(a, &rows, NULL) == APR_SUCCESS && mso_rows_next(rows)) {
            APR_ARRAY_PUSH(*works, mso_work_t *) = work_from_row(rows, p);
            while (mso_rows_next(rows)) {
            }
        }
    }
    return APR_SUCCESS;
}

typedef struct {
    apr_int64_t id;
    const char *owner;
    const mso_work_done_t *d;
    apr_int64_t now;
} release_t;

static void bind_release(mso_args_t *a, const release_t *r)
{
    mso_arg_int(a, "id", r->id);
    mso_arg_text(a, "owner", r->owner);
    mso_arg_int(a, "due", r->d->sync_due_at);
    mso_arg_opt(a, "retry_at", r->d->sync_retry_at);
    mso_arg_text(a, "phase", r->d->sync_phase);
    mso_arg_text(a, "error", r->d->sync_error);
    mso_arg_int(a, "error_runs", r->d->sync_error_runs);
    mso_arg_int(a, "auth_retry", r->d->auth_retry);
    mso_arg_opt(a, "last_sync_at", r->d->last_sync_at);
    mso_arg_int(a, "now", r->now);
}

/* A pass that ended in an error: the account's state and its history. */
static apr_status_t release_error_tx(mso_tx_t *tx, void *baton)
{
    release_t *r = baton;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    a = mso_tx_args(tx, &ST_WORK_RELEASE);
    bind_release(a, r);
    if (MSO_OK(mso_tx_exec(tx, a, &n)) && n == 1) {
        rv = mso_events_add_tx(tx, r->id, r->d->sync_phase
                               && !strcmp(r->d->sync_phase, "throttled") ? "throttled"
                               : "graph_error", r->d->sync_error, r->now);
    }
    return rv;
}

apr_status_t mso_mirror_release(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                const char *owner, const mso_work_done_t *d, apr_int64_t now)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    release_t r;
    apr_status_t rv = APR_SUCCESS, rv2;

    apr_pool_create(&tmp, p);
    if (d->refresh_now) {
        a = mso_args(db, tmp, &ST_REFRESH_NOW);
        mso_arg_int(a, "id", id);
        mso_arg_int(a, "now", now);
        rv = mso_exec(a, NULL, NULL);
        if (rv == APR_SUCCESS) {
            /* An app account's token is its company's. */
            rv = mso_apptoken_due_now(db, tmp, id, now);
        }
    }
    r.id = id;
    r.owner = owner;
    r.d = d;
    r.now = now;
    if (d->sync_error) {
        rv2 = mso_db_tx(db, tmp, apr_psprintf(tmp, "of account %" APR_INT64_T_FMT, id),
                        release_error_tx, &r, NULL);
    }
    else {
        a = mso_args(db, tmp, &ST_WORK_RELEASE);
        bind_release(a, &r);
        rv2 = mso_exec(a, NULL, NULL);
    }
    apr_pool_destroy(tmp);
    return rv2 != APR_SUCCESS ? rv2 : rv;
}

apr_status_t mso_mirror_sync_now(mso_db_t *db, apr_pool_t *p, apr_int64_t id)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_SYNC_NOW);
    mso_arg_int(a, "id", id);
    if (MSO_OK(mso_exec(a, &n, NULL)) && n == 0) {
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
    mso_rows_t *rows = NULL;
    apr_hash_t *have = apr_hash_make(p);
    apr_int64_t now = apr_time_sec(apr_time_now());
    mso_args_t *a;
    apr_status_t rv;
    int i;

    *out = apr_array_make(p, folders->nelts + 1, sizeof(mso_folder_t *));
    a = mso_args(db, p, &ST_FOLDERS);
    mso_arg_int(a, "id", account_id);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_folder_t *f = apr_pcalloc(p, sizeof(*f));

        f->folder = mso_col_text(rows, p, "folder");
        f->delta_link = mso_col_text(rows, p, "delta_link");
        f->next_link = mso_col_text(rows, p, "next_link");
        f->phase = mso_col_text(rows, p, "phase");
        f->round = (int)mso_col_int(rows, "round");
        f->last_sync_at = mso_col_int(rows, "last_sync_at");
        f->resyncs = (int)mso_col_int(rows, "resyncs");
        if (f->folder) {
            apr_hash_set(have, f->folder, APR_HASH_KEY_STRING, f);
        }
    }
    for (i = 0; i < folders->nelts; i++) {
        const char *name = APR_ARRAY_IDX(folders, i, const char *);
        mso_folder_t *f = apr_hash_get(have, name, APR_HASH_KEY_STRING);
        const char *err = NULL;

        if (!f) {
            a = mso_args(db, p, &ST_FOLDER_ADD);
            mso_arg_int(a, "id", account_id);
            mso_arg_text(a, "folder", name);
            mso_arg_int(a, "now", now);
            if (mso_exec(a, NULL, &err) != APR_SUCCESS) {
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

/* A flag of a message: -1 (absent) is SQL NULL. */
static void arg_flag(mso_args_t *a, const char *name, int flag)
{
    if (flag < 0) {
        mso_arg_null(a, name);
    }
    else {
        mso_arg_int(a, name, flag > 0);
    }
}

/* True when text holds "cid:" in any case (an inline part's URL). */
static int has_cid(const char *text)
{
    const char *c;

    for (c = text; c && *c; c++) {
        if ((*c == 'c' || *c == 'C') && (c[1] == 'i' || c[1] == 'I')
            && (c[2] == 'd' || c[2] == 'D') && c[3] == ':') {
            return 1;
        }
    }
    return 0;
}

/* Whether the message's attachments are to be listed: it has some, or an
 * HTML body may show inline parts (cid:), which Graph's hasAttachments
 * does not count; a body too long to keep may too. -1 when the update
 * does not say. */
static int attach_want(const mso_graph_msg_t *m)
{
    int html = m->body_type && !strcasecmp(m->body_type, "html");

    if (m->has_attachments > 0 || (html && (m->body_truncated > 0 || has_cid(m->body)))) {
        return 1;
    }
    if (m->has_attachments == 0 && (m->body_type || m->body || m->body_truncated >= 0)) {
        return 0;
    }
    return -1;
}

/* The message's own values, in the arguments of the upsert (one row) or of
 * the partial update. */
static void bind_message(mso_args_t *a, const mso_graph_msg_t *m)
{
    mso_arg_text(a, "graph_id", m->graph_id);
    mso_arg_text(a, "internet_message_id", m->internet_message_id);
    mso_arg_text(a, "conversation_id", m->conversation_id);
    mso_arg_text(a, "subject", m->subject);
    mso_arg_text(a, "from_address", m->from_address);
    mso_arg_text(a, "from_name", m->from_name);
    mso_arg_text(a, "to_json", m->to_json);
    if (m->received_at >= 0) {
        mso_arg_int(a, "received_at", m->received_at);
    }
    else {
        mso_arg_null(a, "received_at");
    }
    arg_flag(a, "is_read", m->is_read);
    arg_flag(a, "has_attachments", m->has_attachments);
    mso_arg_text(a, "importance", m->importance);
    mso_arg_text(a, "body_preview", m->body_preview);
    mso_arg_text(a, "body_type", m->body_type);
    mso_arg_text(a, "body", m->body);
    mso_arg_text(a, "web_link", m->web_link);
    arg_flag(a, "body_truncated", m->body_truncated);
    arg_flag(a, "attach_want", attach_want(m));
}

typedef struct {
    const char *owner;
    apr_int64_t account_id;
    mso_folder_t *f;
    const mso_graph_page_t *page;
    apr_int64_t now;
    int count;                      /* out: entries applied */
    const char *next, *delta, *phase;
    apr_int64_t synced_at;
} page_t;

/* Writes n new messages in one statement. */
/* The rows of the next upsert for n pending: CHUNK, else the largest power
 * of two not above n. A connection so prepares at most eight upserts, not
 * one per page size: a 100-row upsert is about 1.2 MB of plan on a
 * PostgreSQL server, kept for the connection's life. */
static int upsert_rows(int n)
{
    int k = 1;

    if (n >= CHUNK) {
        return CHUNK;
    }
    while (k * 2 <= n) {
        k *= 2;
    }
    return k;
}

static apr_status_t write_chunk(mso_tx_t *tx, page_t *pg, const mso_graph_msg_t **rows, int n)
{
    apr_status_t rv = APR_SUCCESS;
    mso_args_t *a;
    int i, k;

    for (; n > 0 && rv == APR_SUCCESS; rows += k, n -= k) {
        k = upsert_rows(n);
        a = mso_tx_args(tx, upsert_stmt(tx->db, k));
        mso_arg_int(a, "account_id", pg->account_id);
        mso_arg_text(a, "folder", pg->f->folder);
        mso_arg_int(a, "now", pg->now);
        mso_arg_int(a, "round", pg->f->round);
        for (i = 0; i < k; i++) {
            mso_args_row(a, i);
            bind_message(a, rows[i]);
            /* A new row has every flag: absent means false. */
            mso_arg_int(a, "is_read", rows[i]->is_read > 0);
            mso_arg_int(a, "has_attachments", rows[i]->has_attachments > 0);
            mso_arg_int(a, "body_truncated", rows[i]->body_truncated > 0);
            mso_arg_int(a, "attach_want", attach_want(rows[i]) > 0);
        }
        pg->count += k;
        rv = mso_tx_exec(tx, a, NULL);
    }
    return rv;
}

/* A changed message: only what it carries; not mirrored yet, it is new. */
static apr_status_t write_partial(mso_tx_t *tx, page_t *pg, const mso_graph_msg_t *m)
{
    mso_args_t *a = mso_tx_args(tx, &ST_MSG_UPDATE);
    apr_status_t rv;
    int n = 0;

    mso_arg_int(a, "account_id", pg->account_id);
    mso_arg_text(a, "folder", pg->f->folder);
    mso_arg_int(a, "now", pg->now);
    mso_arg_int(a, "round", pg->f->round);
    bind_message(a, m);
    if (MSO_OK(mso_tx_exec(tx, a, &n)) && n == 0) {
        pg->count--;                /* counted once, by the chunk */
        rv = write_chunk(tx, pg, &m, 1);
    }
    return rv;
}

static apr_status_t page_tx(mso_tx_t *tx, void *baton)
{
    page_t *pg = baton;
    const mso_graph_page_t *page = pg->page;
    mso_folder_t *f = pg->f;
    const mso_graph_msg_t **chunk;
    apr_hash_t *in_chunk;
    mso_args_t *a;
    apr_status_t rv;
    int i, n = 0, rows = 0;

    if (!MSO_OK(mso_mirror_fence(tx, pg->account_id, pg->owner))) {
        if (rv == APR_EBUSY) {
            mso_tx_fail(tx, rv, "the mailbox's work lease was taken over (it ran out); "
                        "nothing written");
        }
        goto leave;
    }
    chunk = apr_palloc(tx->ptemp, sizeof(*chunk) * CHUNK);
    in_chunk = apr_hash_make(tx->ptemp);
    for (i = 0; i <= page->items->nelts; i++) {
        const mso_graph_msg_t *m = i < page->items->nelts
            ? &APR_ARRAY_IDX(page->items, i, mso_graph_msg_t) : NULL;

        if (m && m->full && n < CHUNK
            && !apr_hash_get(in_chunk, m->graph_id, APR_HASH_KEY_STRING)) {
            chunk[n++] = m;
            apr_hash_set(in_chunk, m->graph_id, APR_HASH_KEY_STRING, m);
            continue;
        }
        /* Anything else first writes what is pending, to keep the order. */
        if (!MSO_OK(write_chunk(tx, pg, chunk, n))) {
            goto leave;
        }
        n = 0;
        apr_hash_clear(in_chunk);
        if (!m) {
            break;
        }
        if (m->full) {
            chunk[n++] = m;
            apr_hash_set(in_chunk, m->graph_id, APR_HASH_KEY_STRING, m);
            continue;
        }
        pg->count++;
        if (m->removed) {
            int gone = 0;

            a = mso_tx_args(tx, &ST_MSG_REMOVE);
            mso_arg_int(a, "account_id", pg->account_id);
            mso_arg_text(a, "graph_id", m->graph_id);
            mso_arg_text(a, "folder", f->folder);
            mso_arg_int(a, "now", pg->now);
            if (MSO_OK(mso_tx_exec(tx, a, &gone)) && gone) {
                /* Its attachments go with it. */
                rv = mso_attach_drop_tx(tx, pg->account_id, m->graph_id);
            }
        }
        else {
            rv = write_partial(tx, pg, m);
        }
        if (rv != APR_SUCCESS) {
            goto leave;
        }
    }

    if (page->delta_link) {
        /* A full round ends here: what it did not see is gone from the folder. */
        if (strcmp(f->phase ? f->phase : "initial", "idle") != 0) {
            if (!MSO_OK(mso_attach_drop_unseen_tx(tx, pg->account_id, f->folder, f->round))) {
                goto leave;
            }
            a = mso_tx_args(tx, &ST_MSG_SWEEP);
            mso_arg_int(a, "account_id", pg->account_id);
            mso_arg_text(a, "folder", f->folder);
            mso_arg_int(a, "round", f->round);
            mso_arg_int(a, "now", pg->now);
            if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
                goto leave;
            }
        }
        pg->next = NULL;
        pg->delta = page->delta_link;
        pg->phase = "idle";
        pg->synced_at = pg->now;
    }
    else {
        pg->next = page->next_link;
        pg->delta = f->delta_link;
        pg->phase = f->phase && !strcmp(f->phase, "idle") ? "idle" : "backfill";
    }
    a = mso_tx_args(tx, &ST_FOLDER_CURSOR);
    mso_arg_int(a, "id", pg->account_id);
    mso_arg_text(a, "folder", f->folder);
    mso_arg_int(a, "round", f->round);
    mso_arg_text(a, "next", pg->next);
    mso_arg_text(a, "delta", pg->delta);
    mso_arg_text(a, "phase", pg->phase);
    mso_arg_opt(a, "synced_at", pg->synced_at);
    mso_arg_int(a, "now", pg->now);
    if (MSO_OK(mso_tx_exec(tx, a, &rows)) && rows != 1) {
        rv = mso_tx_fail(tx, APR_EBUSY, "the folder's sync restarted meanwhile; the page is "
                         "dropped");
    }

leave:
    return rv;
}

apr_status_t mso_mirror_apply_page(mso_db_t *db, apr_pool_t *p, const char *owner,
                                   apr_int64_t account_id, mso_folder_t *f,
                                   const mso_graph_page_t *page, apr_int64_t now,
                                   int *applied, const char **err)
{
    page_t pg;
    apr_status_t rv;

    *applied = 0;
    memset(&pg, 0, sizeof(pg));
    pg.owner = owner;
    pg.account_id = account_id;
    pg.f = f;
    pg.page = page;
    pg.now = now;
    /* The rows and the cursor that follows them commit together, so a crash
     * that undoes the commit sends the next pass back to the page before:
     * Graph serves it again. Waiting for the disk was a tenth of ingest. */
    rv = mso_db_tx_lazy(db, p, NULL, page_tx, &pg, err);
    if (rv == APR_SUCCESS) {
        f->next_link = pg.next;
        f->delta_link = pg.delta;
        f->phase = pg.phase;
        if (pg.synced_at) {
            f->last_sync_at = pg.synced_at;
        }
        *applied = pg.count;
    }
    return rv;
}

typedef struct {
    const char *owner;
    apr_int64_t account_id;
    mso_folder_t *f;
    const char *first_link;
    apr_int64_t now;
} restart_t;

static apr_status_t restart_tx(mso_tx_t *tx, void *baton)
{
    restart_t *r = baton;
    mso_args_t *a;
    apr_status_t rv;

    if (MSO_OK(mso_mirror_fence(tx, r->account_id, r->owner))) {
        a = mso_tx_args(tx, &ST_FOLDER_RESTART);
        mso_arg_int(a, "id", r->account_id);
        mso_arg_text(a, "folder", r->f->folder);
        mso_arg_text(a, "first", r->first_link);
        mso_arg_int(a, "now", r->now);
        rv = mso_tx_exec(tx, a, NULL);
    }
    return rv;
}

apr_status_t mso_mirror_restart_folder(mso_db_t *db, apr_pool_t *p, const char *owner,
                                       apr_int64_t account_id, mso_folder_t *f,
                                       const char *first_link, apr_int64_t now)
{
    restart_t r;
    apr_status_t rv;

    r.owner = owner;
    r.account_id = account_id;
    r.f = f;
    r.first_link = first_link;
    r.now = now;
    rv = mso_db_tx(db, p, NULL, restart_tx, &r, NULL);
    if (rv == APR_SUCCESS) {
        f->round++;
        f->resyncs++;
        f->next_link = first_link;
        f->delta_link = NULL;
        f->phase = "initial";
    }
    return rv;
}

/* ------------------------------------------------------------------------- */
/* Actions */

apr_status_t mso_mirror_actions(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id, int max,
                                apr_array_header_t **actions)
{
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;

    *actions = apr_array_make(p, 16, sizeof(mso_action_t *));
    a = mso_args(db, p, &ST_ACTIONS);
    mso_arg_int(a, "id", account_id);
    mso_arg_int(a, "max", max);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_action_t *act = apr_pcalloc(p, sizeof(*act));

        act->id = mso_col_int(rows, "id");
        act->account_id = mso_col_int(rows, "account_id");
        act->graph_id = mso_col_text(rows, p, "graph_id");
        act->action = mso_col_text(rows, p, "action");
        act->destination = mso_col_text(rows, p, "destination");
        act->attempts = (int)mso_col_int(rows, "attempts");
        act->sent_at = mso_col_int(rows, "sent_at");
        act->created_at = mso_col_int(rows, "created_at");
        APR_ARRAY_PUSH(*actions, mso_action_t *) = act;
    }
    return APR_SUCCESS;
}

/* One fenced transaction: the action's own statement (which must change its
 * row: still queued), then the mirror's, when given. */
typedef struct {
    const char *owner;
    const mso_action_t *act;
    const mso_stmt_t *st;           /* the action's */
    const char *reason, *last_error;
    int maybe_applied;
    const char *folder;             /* done: the move's destination, or NULL */
    int removed;
    apr_int64_t now;
} action_t;

static apr_status_t action_tx(mso_tx_t *tx, void *baton)
{
    action_t *x = baton;
    const mso_action_t *act = x->act;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    if (!MSO_OK(mso_mirror_fence(tx, act->account_id, x->owner))) {
        goto leave;
    }
    a = mso_tx_args(tx, x->st);
    mso_arg_int(a, "id", act->id);
    mso_arg_int(a, "now", x->now);
    if (x->st == &ST_ACTION_FAILED) {
        mso_arg_text(a, "reason", x->reason);
        mso_arg_text(a, "last_error", x->last_error);
    }
    else if (x->st == &ST_ACTION_LATER) {
        mso_arg_text(a, "last_error", x->last_error);
        mso_arg_opt(a, "sent_at", x->maybe_applied ? (act->sent_at ? act->sent_at : x->now)
                                                   : 0);
    }
    if (!MSO_OK(mso_tx_exec(tx, a, &n))) {
        goto leave;
    }
    if (n != 1) {
        /* Someone changed the row (the app cancelled it): leave it alone. */
        rv = APR_EBUSY;
        goto leave;
    }
    if (x->st != &ST_ACTION_DONE) {
        goto leave;
    }
    if (x->folder) {
        a = mso_tx_args(tx, &ST_MSG_SET_FOLDER);
        mso_arg_text(a, "folder", x->folder);
        mso_arg_int(a, "removed", x->removed);
    }
    else {
        a = mso_tx_args(tx, &ST_MSG_SET_READ);
        mso_arg_int(a, "is_read", act->action && !strcmp(act->action, "mark_read"));
    }
    mso_arg_int(a, "account_id", act->account_id);
    mso_arg_text(a, "graph_id", act->graph_id);
    mso_arg_int(a, "now", x->now);
    if (MSO_OK(mso_tx_exec(tx, a, NULL)) && x->folder && x->removed) {
        /* Moved out of the mirror: its attachments go with it. */
        rv = mso_attach_drop_tx(tx, act->account_id, act->graph_id);
    }

leave:
    return rv;
}

static apr_status_t action_run(mso_db_t *db, apr_pool_t *p, action_t *x)
{
    return mso_db_tx(db, p, apr_psprintf(p, "(action %" APR_INT64_T_FMT ")", x->act->id),
                     action_tx, x, NULL);
}

apr_status_t mso_mirror_action_sending(mso_db_t *db, apr_pool_t *p, const char *owner,
                                       const mso_action_t *a, apr_int64_t now)
{
    action_t x;

    memset(&x, 0, sizeof(x));
    x.owner = owner;
    x.act = a;
    x.st = &ST_ACTION_SENDING;
    x.now = now;
    return action_run(db, p, &x);
}

apr_status_t mso_mirror_action_done(mso_db_t *db, apr_pool_t *p, const char *owner,
                                    const mso_action_t *a, const char *folder, int removed,
                                    apr_int64_t now)
{
    action_t x;

    memset(&x, 0, sizeof(x));
    x.owner = owner;
    x.act = a;
    x.st = &ST_ACTION_DONE;
    x.folder = folder;
    x.removed = removed;
    x.now = now;
    return action_run(db, p, &x);
}

apr_status_t mso_mirror_action_failed(mso_db_t *db, apr_pool_t *p, const char *owner,
                                      const mso_action_t *a, const char *reason,
                                      const char *last_error, apr_int64_t now)
{
    action_t x;

    memset(&x, 0, sizeof(x));
    x.owner = owner;
    x.act = a;
    x.st = &ST_ACTION_FAILED;
    x.reason = reason;
    x.last_error = last_error;
    x.now = now;
    return action_run(db, p, &x);
}

apr_status_t mso_mirror_action_later(mso_db_t *db, apr_pool_t *p, const char *owner,
                                     const mso_action_t *a, const char *last_error,
                                     int maybe_applied, apr_int64_t now)
{
    action_t x;

    memset(&x, 0, sizeof(x));
    x.owner = owner;
    x.act = a;
    x.st = &ST_ACTION_LATER;
    x.last_error = last_error;
    x.maybe_applied = maybe_applied;
    x.now = now;
    return action_run(db, p, &x);
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
    mso_rows_t *rows = NULL;
    apr_status_t rv;

    *stats = apr_hash_make(p);
    if (!MSO_OK(mso_select(mso_args(db, p, &ST_STATS_ACCOUNTS), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_mirror_stats_t *s = stats_for(p, *stats, mso_col_int(rows, "id"));

        s->sync_phase = mso_col_text(rows, p, "sync_phase");
        s->sync_error = mso_col_text(rows, p, "sync_error");
        s->sync_due_at = mso_col_int(rows, "sync_due_at");
        s->sync_retry_at = mso_col_int(rows, "sync_retry_at");
    }
    if (!MSO_OK(mso_select(mso_args(db, p, &ST_STATS_MESSAGES), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        stats_for(p, *stats, mso_col_int(rows, "account_id"))->messages
            = mso_col_int(rows, "messages");
    }
    if (!MSO_OK(mso_select(mso_args(db, p, &ST_STATS_ACTIONS), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_mirror_stats_t *s = stats_for(p, *stats, mso_col_int(rows, "account_id"));

        s->queued = mso_col_int(rows, "queued");
        s->oldest_queued_at = mso_col_int(rows, "oldest");
        s->failed = mso_col_int(rows, "failed");
    }
    return APR_SUCCESS;
}

/* ------------------------------------------------------------------------- */
/* Retention (mso_retention.h): small batches, each its own statement, so no
 * sweep holds a long transaction over the tables the job writes. */

static const mso_stmt_t ST_PURGE_ACTIONS = {
    "delete done actions past the retention", "before:int max:int",
    "DELETE FROM msoauth_actions WHERE id IN (SELECT id FROM msoauth_actions "
    "WHERE state = 'done' AND updated_at < :before LIMIT :max)", NULL
};
static const mso_stmt_t ST_PURGE_MESSAGES = {
    "delete removed messages past the retention", "before:int max:int",
    "DELETE FROM msoauth_messages WHERE id IN (SELECT id FROM msoauth_messages "
    "WHERE removed = 1 AND updated_at < :before LIMIT :max)", NULL
};

static apr_status_t purge(mso_db_t *db, apr_pool_t *p, const mso_stmt_t *st,
                          apr_int64_t before, int max, int *deleted)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    *deleted = 0;
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, st);
    mso_arg_int(a, "before", before);
    mso_arg_int(a, "max", max);
    rv = mso_exec(a, deleted, NULL);
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_mirror_purge_actions(mso_db_t *db, apr_pool_t *p, apr_int64_t before,
                                      int max, int *deleted)
{
    return purge(db, p, &ST_PURGE_ACTIONS, before, max, deleted);
}

apr_status_t mso_mirror_purge_messages(mso_db_t *db, apr_pool_t *p, apr_int64_t before,
                                       int max, int *deleted)
{
    return purge(db, p, &ST_PURGE_MESSAGES, before, max, deleted);
}
