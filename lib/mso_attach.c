/* Attachments in the database (see mso_attach.h): the statements of
 * msoauth_attachments, and of the attachment columns of msoauth_messages
 * (attach_due, attach_tries). Same statements on SQLite and PostgreSQL
 * where the dialects agree. */
#include <string.h>

#include <apr_hash.h>
#include <apr_strings.h>

#include "mso_attach.h"
#include "mso_mirror.h"

#define NAME_MAX_BYTES 200          /* of a file name served */

/* ------------------------------------------------------------------------- */
/* Statements */

static const mso_stmt_t ST_DUE_MESSAGES = {
    "read the messages whose attachments are to be listed", "id:int max:int",
    "SELECT graph_id, received_at, attach_due, attach_tries FROM msoauth_messages "
    "WHERE account_id = :id AND attach_due > 0 AND removed = 0 "
    "ORDER BY received_at DESC LIMIT :max", NULL
};
static const mso_stmt_t ST_MESSAGE = {
    "read a message's attachment state", "account_id:int graph_id:text",
    "SELECT removed, attach_due FROM msoauth_messages "
    "WHERE account_id = :account_id AND graph_id = :graph_id", NULL
};
/* Only the changes that were listed: a change since keeps it due. */
static const mso_stmt_t ST_MESSAGE_LISTED = {
    "record a message's attachments as listed", "account_id:int graph_id:text due:int",
    "UPDATE msoauth_messages SET attach_due = 0, attach_tries = 0 "
    "WHERE account_id = :account_id AND graph_id = :graph_id AND attach_due = :due", NULL
};
static const mso_stmt_t ST_MESSAGE_LIST_FAILED = {
    "record a failed attachment listing",
    "account_id:int graph_id:text due:int give_up:int tries:int",
    "UPDATE msoauth_messages SET attach_tries = attach_tries + 1, "
    "attach_due = CASE WHEN :give_up = 1 OR attach_tries + 1 >= :tries THEN 0 "
    "ELSE attach_due END WHERE account_id = :account_id AND graph_id = :graph_id "
    "AND attach_due = :due", NULL
};
static const mso_stmt_t ST_IDS = {
    "read a message's attachment ids", "account_id:int graph_id:text",
    "SELECT attachment_id FROM msoauth_attachments "
    "WHERE account_id = :account_id AND graph_id = :graph_id", NULL
};

/* Unchanged (same size, lastModifiedDateTime and kind): a stored content
 * stays; otherwise the bytes are fetched again. */
#define SAME "(COALESCE(msoauth_attachments.size, -1) = COALESCE(excluded.size, -1) " \
    "AND COALESCE(msoauth_attachments.last_modified, '') = " \
    "COALESCE(excluded.last_modified, '') AND msoauth_attachments.kind = excluded.kind)"
#define KEPT "(" SAME " AND msoauth_attachments.state = 'stored')"

static const mso_stmt_t ST_UPSERT = {
    "store an attachment's description",
    "account_id:int graph_id:text attachment_id:text name:text content_type:text size:int "
    "is_inline:int content_id:text kind:text state:text last_modified:text now:int",
    "INSERT INTO msoauth_attachments (account_id, graph_id, attachment_id, name, "
    "content_type, size, is_inline, content_id, kind, state, last_modified, tries, "
    "updated_at) VALUES (:account_id, :graph_id, :attachment_id, :name, :content_type, "
    ":size, :is_inline, :content_id, :kind, :state, :last_modified, 0, :now) "
    "ON CONFLICT (account_id, graph_id, attachment_id) DO UPDATE SET "
    "content = CASE WHEN " KEPT " THEN msoauth_attachments.content ELSE NULL END, "
    "fetched_at = CASE WHEN " KEPT " THEN msoauth_attachments.fetched_at ELSE NULL END, "
    "state = CASE WHEN " KEPT " THEN 'stored' ELSE excluded.state END, "
    "tries = 0, error = NULL, name = excluded.name, content_type = excluded.content_type, "
    "size = excluded.size, is_inline = excluded.is_inline, content_id = excluded.content_id, "
    "kind = excluded.kind, last_modified = excluded.last_modified, "
    "updated_at = excluded.updated_at", NULL
};
static const mso_stmt_t ST_DELETE = {
    "delete an attachment no longer on its message",
    "account_id:int graph_id:text attachment_id:text",
    "DELETE FROM msoauth_attachments WHERE account_id = :account_id AND graph_id = :graph_id "
    "AND attachment_id = :attachment_id", NULL
};
static const mso_stmt_t ST_DROP = {
    "delete a removed message's attachments", "account_id:int graph_id:text",
    "DELETE FROM msoauth_attachments WHERE account_id = :account_id AND graph_id = :graph_id",
    NULL
};
/* The same condition as the sweep of mso_mirror (ST_MSG_SWEEP). */
static const mso_stmt_t ST_DROP_UNSEEN = {
    "delete the attachments of messages a full sync did not see",
    "account_id:int folder:text round:int",
    "DELETE FROM msoauth_attachments WHERE account_id = :account_id AND graph_id IN "
    "(SELECT graph_id FROM msoauth_messages WHERE account_id = :account_id "
    "AND folder = :folder AND removed = 0 AND sync_round < :round)", NULL
};
static const mso_stmt_t ST_PURGE = {
    "delete the attachments of messages no longer mirrored", "account_id:int",
    "DELETE FROM msoauth_attachments WHERE (:account_id = 0 OR account_id = :account_id) "
    "AND NOT EXISTS (SELECT 1 FROM msoauth_messages m WHERE "
    "m.account_id = msoauth_attachments.account_id "
    "AND m.graph_id = msoauth_attachments.graph_id AND m.removed = 0)", NULL
};

static const mso_stmt_t ST_PENDING = {
    "read the attachments to download", "id:int max:int",
    "SELECT t.graph_id, t.attachment_id, t.kind, t.size, t.last_modified, t.tries "
    "FROM msoauth_attachments t JOIN msoauth_messages m "
    "ON m.account_id = t.account_id AND m.graph_id = t.graph_id "
    "WHERE t.account_id = :id AND t.state = 'pending' AND m.removed = 0 "
    "ORDER BY m.received_at DESC, t.graph_id, t.attachment_id LIMIT :max", NULL
};
static const mso_stmt_t ST_CONTENT = {
    "store an attachment's content",
    "account_id:int graph_id:text attachment_id:text last_modified:text content:blob now:int "
    "any:int",
    "UPDATE msoauth_attachments SET content = :content, fetched_at = :now, state = 'stored', "
    "tries = 0, error = NULL, updated_at = :now WHERE account_id = :account_id "
    "AND graph_id = :graph_id AND attachment_id = :attachment_id AND content IS NULL "
    "AND COALESCE(last_modified, '') = COALESCE(:last_modified, '') "
    "AND (state = 'pending' OR :any = 1)", NULL
};
static const mso_stmt_t ST_STATE = {
    "record an attachment not downloaded",
    "account_id:int graph_id:text attachment_id:text state:text error:text now:int",
    "UPDATE msoauth_attachments SET state = :state, error = :error, updated_at = :now "
    "WHERE account_id = :account_id AND graph_id = :graph_id "
    "AND attachment_id = :attachment_id AND state = 'pending'", NULL
};
static const mso_stmt_t ST_FETCH_FAILED = {
    "record a failed download",
    "account_id:int graph_id:text attachment_id:text error:text now:int tries:int",
    "UPDATE msoauth_attachments SET tries = tries + 1, error = :error, updated_at = :now, "
    "state = CASE WHEN tries + 1 >= :tries THEN 'failed' ELSE state END "
    "WHERE account_id = :account_id AND graph_id = :graph_id "
    "AND attachment_id = :attachment_id AND state = 'pending'", NULL
};
static const mso_stmt_t ST_STATE_OF = {
    "read an attachment's state", "account_id:int graph_id:text attachment_id:text",
    "SELECT state FROM msoauth_attachments WHERE account_id = :account_id "
    "AND graph_id = :graph_id AND attachment_id = :attachment_id", NULL
};

#define ROW_COLUMNS "account_id, graph_id, attachment_id, name, content_type, size, " \
    "is_inline, content_id, kind, state, last_modified, fetched_at, "
static const mso_stmt_t ST_GET = {
    "read an attachment", "account_id:int graph_id:text attachment_id:text",
    "SELECT " ROW_COLUMNS "CASE WHEN content IS NULL THEN -1 ELSE length(content) END "
    "AS length FROM msoauth_attachments WHERE account_id = :account_id "
    "AND graph_id = :graph_id AND attachment_id = :attachment_id",
    "SELECT " ROW_COLUMNS "CASE WHEN content IS NULL THEN -1 ELSE octet_length(content) END "
    "AS length FROM msoauth_attachments WHERE account_id = :account_id "
    "AND graph_id = :graph_id AND attachment_id = :attachment_id"
};
/* SQLite reads a whole blob to cut a part of it: the handler asks it for
 * everything at once. PostgreSQL reads the parts of an out-of-line value. */
static const mso_stmt_t ST_READ = {
    "read an attachment's content",
    "account_id:int graph_id:text attachment_id:text from:int len:int",
    "SELECT substr(content, :from, :len) AS part, content IS NULL AS missing "
    "FROM msoauth_attachments WHERE account_id = :account_id AND graph_id = :graph_id "
    "AND attachment_id = :attachment_id",
    "SELECT substring(content from CAST(:from AS INTEGER) for CAST(:len AS INTEGER)) AS part, "
    "CASE WHEN content IS NULL THEN 1 ELSE 0 END AS missing FROM msoauth_attachments "
    "WHERE account_id = :account_id AND graph_id = :graph_id "
    "AND attachment_id = :attachment_id"
};

static const mso_stmt_t ST_STATS = {
    "count the attachments", NULL,
    "SELECT account_id, COUNT(*) AS n, "
    "SUM(CASE WHEN state = 'stored' THEN 1 ELSE 0 END) AS stored, "
    "SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END) AS pending, "
    "SUM(CASE WHEN state = 'large' THEN 1 ELSE 0 END) AS large, "
    "SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed, "
    "SUM(CASE WHEN content IS NULL THEN 0 ELSE length(content) END) AS bytes "
    "FROM msoauth_attachments GROUP BY account_id",
    "SELECT account_id, COUNT(*) AS n, "
    "SUM(CASE WHEN state = 'stored' THEN 1 ELSE 0 END) AS stored, "
    "SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END) AS pending, "
    "SUM(CASE WHEN state = 'large' THEN 1 ELSE 0 END) AS large, "
    "SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed, "
    "SUM(CASE WHEN content IS NULL THEN 0 ELSE octet_length(content) END) AS bytes "
    "FROM msoauth_attachments GROUP BY account_id"
};
static const mso_stmt_t ST_STATS_DUE = {
    "count the messages whose attachments are to be listed", NULL,
    "SELECT account_id, COUNT(*) AS n FROM msoauth_messages WHERE attach_due > 0 "
    "AND removed = 0 GROUP BY account_id", NULL
};

/* ------------------------------------------------------------------------- */
/* Listing */

apr_status_t mso_attach_due_messages(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                     int max, apr_array_header_t **out)
{
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;

    *out = apr_array_make(p, max > 0 ? max : 1, sizeof(mso_attach_msg_t *));
    a = mso_args(db, p, &ST_DUE_MESSAGES);
    mso_arg_int(a, "id", account_id);
    mso_arg_int(a, "max", max);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_attach_msg_t *m = apr_pcalloc(p, sizeof(*m));

        m->graph_id = mso_col_text(rows, p, "graph_id");
        m->received_at = mso_col_int(rows, "received_at");
        m->due = mso_col_int(rows, "attach_due");
        m->tries = (int)mso_col_int(rows, "attach_tries");
        if (m->graph_id) {
            APR_ARRAY_PUSH(*out, mso_attach_msg_t *) = m;
        }
    }
    return APR_SUCCESS;
}

typedef struct {
    const char *owner;
    apr_int64_t account_id;
    const mso_attach_msg_t *m;
    const apr_array_header_t *atts;
    apr_int64_t cap, now;
    int stale;
    int give_up, gave_up;
} list_t;

/* The first step of the job's transactions: the lease is still ours. */
static apr_status_t fence(mso_tx_t *tx, apr_int64_t account_id, const char *owner)
{
    apr_status_t rv = mso_mirror_fence(tx, account_id, owner);

    if (rv == APR_EBUSY) {
        mso_tx_fail(tx, rv, "the mailbox's work lease was taken over (it ran out); nothing "
                    "written");
    }
    return rv;
}

/* Whether the job downloads an attachment's content. */
static const char *state_for(const mso_graph_att_t *att, apr_int64_t cap)
{
    if (cap <= 0) {
        return "large";
    }
    /* A link is small whatever the size of what it points to. */
    if (!strcmp(att->kind, "reference") || att->size < 0 || att->size <= cap) {
        return "pending";
    }
    return "large";
}

static apr_status_t store_list_tx(mso_tx_t *tx, void *baton)
{
    list_t *l = baton;
    apr_hash_t *old = apr_hash_make(tx->ptemp);
    apr_hash_index_t *hi;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;
    int i;

    if (!MSO_OK(fence(tx, l->account_id, l->owner))) {
        goto leave;
    }
    a = mso_tx_args(tx, &ST_MESSAGE);
    mso_arg_int(a, "account_id", l->account_id);
    mso_arg_text(a, "graph_id", l->m->graph_id);
    if (!MSO_OK(mso_tx_select(tx, a, &rows))) {
        goto leave;
    }
    l->stale = 1;
    while (mso_rows_next(rows)) {
        l->stale = mso_col_int(rows, "removed") != 0
                   || mso_col_int(rows, "attach_due") != l->m->due;
    }
    if (l->stale) {
        goto leave;             /* changed meanwhile: listed again */
    }
    a = mso_tx_args(tx, &ST_IDS);
    mso_arg_int(a, "account_id", l->account_id);
    mso_arg_text(a, "graph_id", l->m->graph_id);
    if (!MSO_OK(mso_tx_select(tx, a, &rows))) {
        goto leave;
    }
    while (mso_rows_next(rows)) {
        const char *id = mso_col_text(rows, tx->ptemp, "attachment_id");

        if (id) {
            apr_hash_set(old, id, APR_HASH_KEY_STRING, id);
        }
    }
    for (i = 0; i < l->atts->nelts; i++) {
        const mso_graph_att_t *att = &APR_ARRAY_IDX(l->atts, i, mso_graph_att_t);

        apr_hash_set(old, att->id, APR_HASH_KEY_STRING, NULL);
        a = mso_tx_args(tx, &ST_UPSERT);
        mso_arg_int(a, "account_id", l->account_id);
        mso_arg_text(a, "graph_id", l->m->graph_id);
        mso_arg_text(a, "attachment_id", att->id);
        mso_arg_text(a, "name", att->name);
        mso_arg_text(a, "content_type", att->content_type);
        if (att->size >= 0) {
            mso_arg_int(a, "size", att->size);
        }
        else {
            mso_arg_null(a, "size");
        }
        mso_arg_int(a, "is_inline", att->is_inline != 0);
        mso_arg_text(a, "content_id", att->content_id);
        mso_arg_text(a, "kind", att->kind);
        mso_arg_text(a, "state", state_for(att, l->cap));
        mso_arg_text(a, "last_modified", att->last_modified);
        mso_arg_int(a, "now", l->now);
        if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
            goto leave;
        }
    }
    /* Removed from the message in Outlook (a draft edited). */
    for (hi = apr_hash_first(tx->ptemp, old); hi; hi = apr_hash_next(hi)) {
        a = mso_tx_args(tx, &ST_DELETE);
        mso_arg_int(a, "account_id", l->account_id);
        mso_arg_text(a, "graph_id", l->m->graph_id);
        mso_arg_text(a, "attachment_id", apr_hash_this_val(hi));
        if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
            goto leave;
        }
    }
    a = mso_tx_args(tx, &ST_MESSAGE_LISTED);
    mso_arg_int(a, "account_id", l->account_id);
    mso_arg_text(a, "graph_id", l->m->graph_id);
    mso_arg_int(a, "due", l->m->due);
    rv = mso_tx_exec(tx, a, NULL);

leave:
    return rv;
}

apr_status_t mso_attach_store_list(mso_db_t *db, apr_pool_t *p, const char *owner,
                                   apr_int64_t account_id, const mso_attach_msg_t *m,
                                   const apr_array_header_t *atts, apr_int64_t cap,
                                   apr_int64_t now, int *stale, const char **err)
{
    list_t l;
    apr_status_t rv;

    memset(&l, 0, sizeof(l));
    l.owner = owner;
    l.account_id = account_id;
    l.m = m;
    l.atts = atts;
    l.cap = cap;
    l.now = now;
    /* Undone by a crash, the list is due again and read again from Graph. */
    rv = mso_db_tx_lazy(db, p, NULL, store_list_tx, &l, err);
    *stale = rv == APR_SUCCESS && l.stale;
    return rv;
}

static apr_status_t list_failed_tx(mso_tx_t *tx, void *baton)
{
    list_t *l = baton;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;

    if (!MSO_OK(fence(tx, l->account_id, l->owner))) {
        goto leave;
    }
    a = mso_tx_args(tx, &ST_MESSAGE_LIST_FAILED);
    mso_arg_int(a, "account_id", l->account_id);
    mso_arg_text(a, "graph_id", l->m->graph_id);
    mso_arg_int(a, "due", l->m->due);
    mso_arg_int(a, "give_up", l->give_up);
    mso_arg_int(a, "tries", MSO_ATTACH_TRIES);
    if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
        goto leave;
    }
    a = mso_tx_args(tx, &ST_MESSAGE);
    mso_arg_int(a, "account_id", l->account_id);
    mso_arg_text(a, "graph_id", l->m->graph_id);
    if (MSO_OK(mso_tx_select(tx, a, &rows))) {
        while (mso_rows_next(rows)) {
            l->gave_up = mso_col_int(rows, "attach_due") == 0;
        }
    }

leave:
    return rv;
}

apr_status_t mso_attach_list_failed(mso_db_t *db, apr_pool_t *p, const char *owner,
                                    apr_int64_t account_id, const mso_attach_msg_t *m,
                                    int give_up, int *gave_up)
{
    list_t l;
    apr_status_t rv;

    memset(&l, 0, sizeof(l));
    l.owner = owner;
    l.account_id = account_id;
    l.m = m;
    l.give_up = give_up;
    rv = mso_db_tx(db, p, NULL, list_failed_tx, &l, NULL);
    *gave_up = rv == APR_SUCCESS && l.gave_up;
    return rv;
}

/* ------------------------------------------------------------------------- */
/* Downloading */

apr_status_t mso_attach_pending(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id, int max,
                                 apr_array_header_t **out)
{
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;

    *out = apr_array_make(p, max > 0 ? max : 1, sizeof(mso_attach_item_t *));
    a = mso_args(db, p, &ST_PENDING);
    mso_arg_int(a, "id", account_id);
    mso_arg_int(a, "max", max);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_attach_item_t *it = apr_pcalloc(p, sizeof(*it));
        const char *size = mso_col_text(rows, p, "size");

        it->graph_id = mso_col_text(rows, p, "graph_id");
        it->attachment_id = mso_col_text(rows, p, "attachment_id");
        it->kind = mso_col_text(rows, p, "kind");
        it->size = size ? mso_col_int(rows, "size") : -1;
        it->last_modified = mso_col_text(rows, p, "last_modified");
        it->tries = (int)mso_col_int(rows, "tries");
        if (it->graph_id && it->attachment_id && it->kind) {
            APR_ARRAY_PUSH(*out, mso_attach_item_t *) = it;
        }
    }
    return APR_SUCCESS;
}

typedef struct {
    const char *owner;
    apr_int64_t account_id;
    const char *graph_id, *attachment_id;
    const char *state, *error;
    apr_int64_t now;
    const char *after;              /* the row's state afterwards */
} item_t;

typedef struct {
    const char *owner;
    apr_int64_t account_id;
    mso_attach_content_t *c;
    int n;
    apr_int64_t now;
} contents_t;

static apr_status_t contents_tx(mso_tx_t *tx, void *baton)
{
    contents_t *x = baton;
    mso_args_t *a;
    apr_status_t rv = APR_SUCCESS;
    int i;

    if (x->owner && !MSO_OK(fence(tx, x->account_id, x->owner))) {
        goto leave;
    }
    for (i = 0; i < x->n; i++) {
        mso_attach_content_t *c = &x->c[i];

        a = mso_tx_args(tx, &ST_CONTENT);
        mso_arg_int(a, "account_id", x->account_id);
        mso_arg_text(a, "graph_id", c->graph_id);
        mso_arg_text(a, "attachment_id", c->attachment_id);
        mso_arg_text(a, "last_modified", c->last_modified);
        /* Not NULL for an empty file: "" is stored as zero bytes. */
        mso_arg_blob(a, "content", c->data ? c->data : "", c->len);
        mso_arg_int(a, "now", x->now);
        mso_arg_int(a, "any", x->owner == NULL);
        if (!MSO_OK(mso_tx_exec(tx, a, &c->stored))) {
            goto leave;
        }
    }

leave:
    return rv;
}

apr_status_t mso_attach_store_contents(mso_db_t *db, apr_pool_t *p, const char *owner,
                                       apr_int64_t account_id, mso_attach_content_t *c, int n,
                                       apr_int64_t now, const char **err)
{
    contents_t x;
    apr_status_t rv;
    int i;

    x.owner = owner;
    x.account_id = account_id;
    x.c = c;
    x.n = n;
    x.now = now;
    /* Undone by a crash, the contents are pending again and downloaded again. */
    rv = mso_db_tx_lazy(db, p, NULL, contents_tx, &x, err);
    for (i = 0; i < n; i++) {
        c[i].stored = rv == APR_SUCCESS && c[i].stored > 0;
    }
    return rv;
}

apr_status_t mso_attach_store_content(mso_db_t *db, apr_pool_t *p, const char *owner,
                                      apr_int64_t account_id, const char *graph_id,
                                      const char *attachment_id, const char *last_modified,
                                      const void *data, apr_size_t len, apr_int64_t now,
                                      int *stored, const char **err)
{
    mso_attach_content_t c;
    apr_status_t rv;

    c.graph_id = graph_id;
    c.attachment_id = attachment_id;
    c.last_modified = last_modified;
    c.data = data;
    c.len = len;
    c.stored = 0;
    rv = mso_attach_store_contents(db, p, owner, account_id, &c, 1, now, err);
    *stored = c.stored;
    return rv;
}

static apr_status_t item_state_tx(mso_tx_t *tx, void *baton)
{
    item_t *x = baton;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;

    if (!MSO_OK(fence(tx, x->account_id, x->owner))) {
        goto leave;
    }
    if (x->state) {
        a = mso_tx_args(tx, &ST_STATE);
        mso_arg_text(a, "state", x->state);
    }
    else {
        a = mso_tx_args(tx, &ST_FETCH_FAILED);
        mso_arg_int(a, "tries", MSO_ATTACH_TRIES);
    }
    mso_arg_int(a, "account_id", x->account_id);
    mso_arg_text(a, "graph_id", x->graph_id);
    mso_arg_text(a, "attachment_id", x->attachment_id);
    mso_arg_text(a, "error", x->error);
    mso_arg_int(a, "now", x->now);
    if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
        goto leave;
    }
    a = mso_tx_args(tx, &ST_STATE_OF);
    mso_arg_int(a, "account_id", x->account_id);
    mso_arg_text(a, "graph_id", x->graph_id);
    mso_arg_text(a, "attachment_id", x->attachment_id);
    if (MSO_OK(mso_tx_select(tx, a, &rows))) {
        while (mso_rows_next(rows)) {
            x->after = mso_col_text(rows, tx->p, "state");
        }
    }

leave:
    return rv;
}

apr_status_t mso_attach_set_state(mso_db_t *db, apr_pool_t *p, const char *owner,
                                  apr_int64_t account_id, const char *graph_id,
                                  const char *attachment_id, const char *state,
                                  const char *error, apr_int64_t now)
{
    item_t x;

    memset(&x, 0, sizeof(x));
    x.owner = owner;
    x.account_id = account_id;
    x.graph_id = graph_id;
    x.attachment_id = attachment_id;
    x.state = state;
    x.error = error;
    x.now = now;
    return mso_db_tx(db, p, NULL, item_state_tx, &x, NULL);
}

apr_status_t mso_attach_fetch_failed(mso_db_t *db, apr_pool_t *p, const char *owner,
                                     apr_int64_t account_id, const char *graph_id,
                                     const char *attachment_id, const char *error,
                                     apr_int64_t now, int *gave_up)
{
    item_t x;
    apr_status_t rv;

    memset(&x, 0, sizeof(x));
    x.owner = owner;
    x.account_id = account_id;
    x.graph_id = graph_id;
    x.attachment_id = attachment_id;
    x.error = error;
    x.now = now;
    rv = mso_db_tx(db, p, NULL, item_state_tx, &x, NULL);
    *gave_up = rv == APR_SUCCESS && x.after && !strcmp(x.after, "failed");
    return rv;
}

/* ------------------------------------------------------------------------- */
/* Removals and retention */

apr_status_t mso_attach_drop_tx(mso_tx_t *tx, apr_int64_t account_id, const char *graph_id)
{
    mso_args_t *a = mso_tx_args(tx, &ST_DROP);

    mso_arg_int(a, "account_id", account_id);
    mso_arg_text(a, "graph_id", graph_id);
    return mso_tx_exec(tx, a, NULL);
}

apr_status_t mso_attach_drop_unseen_tx(mso_tx_t *tx, apr_int64_t account_id,
                                       const char *folder, int round)
{
    mso_args_t *a = mso_tx_args(tx, &ST_DROP_UNSEEN);

    mso_arg_int(a, "account_id", account_id);
    mso_arg_text(a, "folder", folder);
    mso_arg_int(a, "round", round);
    return mso_tx_exec(tx, a, NULL);
}

apr_status_t mso_attach_purge_tx(mso_tx_t *tx, apr_int64_t account_id, int *purged)
{
    mso_args_t *a = mso_tx_args(tx, &ST_PURGE);
    int n = 0;
    apr_status_t rv;

    mso_arg_int(a, "account_id", account_id);
    rv = mso_tx_exec(tx, a, &n);
    if (purged) {
        *purged = n;
    }
    return rv;
}

apr_status_t mso_attach_purge(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                              int *purged, const char **err)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_PURGE);
    mso_arg_int(a, "account_id", account_id);
    rv = mso_exec(a, &n, err);
    if (err && *err) {
        *err = apr_pstrdup(p, *err);
    }
    apr_pool_destroy(tmp);
    if (purged) {
        *purged = n;
    }
    return rv;
}

/* ------------------------------------------------------------------------- */
/* Serving */

apr_status_t mso_attach_message(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                const char *graph_id, int *mirrored, int *due)
{
    mso_rows_t *rows = NULL;
    mso_args_t *a = mso_args(db, p, &ST_MESSAGE);
    apr_status_t rv;

    *mirrored = *due = 0;
    mso_arg_int(a, "account_id", account_id);
    mso_arg_text(a, "graph_id", graph_id);
    if (MSO_OK(mso_select(a, &rows, NULL))) {
        while (mso_rows_next(rows)) {
            *mirrored = mso_col_int(rows, "removed") == 0;
            *due = mso_col_int(rows, "attach_due") > 0;
        }
    }
    return rv;
}

apr_status_t mso_attach_get(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                            const char *graph_id, const char *attachment_id,
                            mso_attach_t **out)
{
    mso_rows_t *rows = NULL;
    mso_args_t *a = mso_args(db, p, &ST_GET);
    apr_status_t rv;

    *out = NULL;
    mso_arg_int(a, "account_id", account_id);
    mso_arg_text(a, "graph_id", graph_id);
    mso_arg_text(a, "attachment_id", attachment_id);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_attach_t *t = apr_pcalloc(p, sizeof(*t));

        t->account_id = mso_col_int(rows, "account_id");
        t->graph_id = mso_col_text(rows, p, "graph_id");
        t->attachment_id = mso_col_text(rows, p, "attachment_id");
        t->name = mso_col_text(rows, p, "name");
        t->content_type = mso_col_text(rows, p, "content_type");
        t->size = mso_col_text(rows, p, "size") ? mso_col_int(rows, "size") : -1;
        t->is_inline = mso_col_int(rows, "is_inline") != 0;
        t->content_id = mso_col_text(rows, p, "content_id");
        t->kind = mso_col_text(rows, p, "kind");
        t->state = mso_col_text(rows, p, "state");
        t->last_modified = mso_col_text(rows, p, "last_modified");
        t->fetched_at = mso_col_int(rows, "fetched_at");
        t->length = mso_col_int(rows, "length");
        *out = t;
    }
    return *out ? APR_SUCCESS : APR_NOTFOUND;
}

apr_status_t mso_attach_read(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                             const char *graph_id, const char *attachment_id,
                             apr_int64_t offset, apr_size_t len,
                             const unsigned char **data, apr_size_t *got)
{
    mso_rows_t *rows = NULL;
    mso_args_t *a = mso_args(db, p, &ST_READ);
    apr_status_t rv;
    int found = 0;

    *data = NULL;
    *got = 0;
    mso_arg_int(a, "account_id", account_id);
    mso_arg_text(a, "graph_id", graph_id);
    mso_arg_text(a, "attachment_id", attachment_id);
    mso_arg_int(a, "from", offset + 1);
    mso_arg_int(a, "len", (apr_int64_t)len);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        if (!mso_col_int(rows, "missing")) {
            found = 1;
            *data = mso_col_blob(rows, p, "part", got);
            if (!*data) {
                *data = (const unsigned char *)"";
                *got = 0;
            }
        }
    }
    return found ? APR_SUCCESS : APR_NOTFOUND;
}

/* RFC 7230 tchar. */
static int tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
           || (c && strchr("!#$%&'*+-.^_`|~", c));
}

const char *mso_attach_safe_type(apr_pool_t *p, const char *kind, const char *content_type)
{
    const char *c = content_type, *slash = NULL, *end, *stop;
    char *out, *o;

    if (kind && !strcmp(kind, "item")) {
        return "message/rfc822";
    }
    if (kind && !strcmp(kind, "reference")) {
        return "text/uri-list; charset=utf-8";
    }
    if (!c) {
        return "application/octet-stream";
    }
    while (*c == ' ' || *c == '\t') {
        c++;
    }
    for (end = c; *end && *end != ';'; end++) {
        if (*end == '/' && !slash) {
            slash = end;
        }
        else if (!tchar((unsigned char)*end)) {
            break;
        }
    }
    /* Only blanks may follow before the parameters (which are dropped). */
    for (stop = end; *end == ' ' || *end == '\t'; end++) {
    }
    if ((*end && *end != ';') || !slash || slash == c || slash + 1 == stop || stop - c > 127) {
        return "application/octet-stream";
    }
    out = o = apr_pstrmemdup(p, c, stop - c);
    for (; *o; o++) {
        if (*o >= 'A' && *o <= 'Z') {
            *o = (char)(*o - 'A' + 'a');
        }
    }
    return out;
}

/* The length of the valid UTF-8 sequence at s (at most n bytes), 0 when
 * there is none; *cp the code point. */
static int utf8_next(const unsigned char *s, apr_size_t n, unsigned *cp)
{
    int len, i;
    unsigned c = s[0], min;

    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2, c &= 0x1f, min = 0x80;
    }
    else if (c >= 0xe0 && c <= 0xef) {
        len = 3, c &= 0x0f, min = 0x800;
    }
    else if (c >= 0xf0 && c <= 0xf4) {
        len = 4, c &= 0x07, min = 0x10000;
    }
    else {
        return 0;
    }
    if ((apr_size_t)len > n) {
        return 0;
    }
    for (i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) {
            return 0;
        }
        c = (c << 6) | (s[i] & 0x3f);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) {
        return 0;
    }
    *cp = c;
    return len;
}

/* Characters a file name must not carry: C0 and C1 controls, DEL, and the
 * bidirectional controls that make "exe.pdf" look like "fdp.exe". */
static int bad_char(unsigned cp)
{
    return cp < 0x20 || (cp >= 0x7f && cp <= 0x9f) || cp == 0x200e || cp == 0x200f
           || (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069)
           || cp == 0xfeff;
}

const char *mso_attach_disposition(apr_pool_t *p, const char *name)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *s, *base;
    apr_size_t n, i, len;
    char *clean, *ascii, *enc, *o, *e;
    unsigned cp;

    s = base = (const unsigned char *)(name ? name : "");
    for (; *s; s++) {
        if (*s == '/' || *s == '\\') {
            base = s + 1;           /* no path: the last part only */
        }
    }
    n = strlen((const char *)base);
    /* Cleaned UTF-8, and its ASCII form, character by character. */
    clean = o = apr_palloc(p, n + 1);
    ascii = e = apr_palloc(p, n + 1);
    for (i = 0; i < n; i += len) {
        len = (apr_size_t)utf8_next(base + i, n - i, &cp);
        if (!len) {
            len = 1;
            cp = '_';               /* not UTF-8 */
        }
        if (bad_char(cp)) {
            continue;
        }
        if (cp < 0x80 && strchr("\"\\:*?<>|%;", (int)cp)) {
            cp = '_';
        }
        if ((apr_size_t)(o - clean) + len > NAME_MAX_BYTES) {
            break;
        }
        if (cp < 0x80) {
            *o++ = (char)cp;
            *e++ = (char)cp;
        }
        else {
            memcpy(o, base + i, len);
            o += len;
            *e++ = '_';
        }
    }
    *o = *e = '\0';
    /* No hidden files, no names Windows refuses to end with. */
    while (*clean == '.' || *clean == ' ') {
        clean++;
        ascii++;
    }
    while (o > clean && (o[-1] == '.' || o[-1] == ' ')) {
        *--o = '\0';
        *--e = '\0';
    }
    if (!*clean) {
        clean = ascii = "attachment";
    }
    enc = o = apr_palloc(p, strlen(clean) * 3 + 1);
    for (s = (const unsigned char *)clean; *s; s++) {
        if ((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9')
            || strchr("!#$&+-.^_`|~", *s)) {
            *o++ = (char)*s;
        }
        else {
            *o++ = '%';
            *o++ = hex[*s >> 4];
            *o++ = hex[*s & 15];
        }
    }
    *o = '\0';
    return apr_pstrcat(p, "attachment; filename=\"", ascii, "\"; filename*=UTF-8''", enc,
                       NULL);
}

/* ------------------------------------------------------------------------- */

static mso_attach_stats_t *stats_for(apr_pool_t *p, apr_hash_t *h, apr_int64_t id)
{
    const char *key = apr_psprintf(p, "%" APR_INT64_T_FMT, id);
    mso_attach_stats_t *s = apr_hash_get(h, key, APR_HASH_KEY_STRING);

    if (!s) {
        s = apr_pcalloc(p, sizeof(*s));
        s->account_id = id;
        apr_hash_set(h, key, APR_HASH_KEY_STRING, s);
    }
    return s;
}

apr_status_t mso_attach_stats(mso_db_t *db, apr_pool_t *p, apr_hash_t **stats)
{
    mso_rows_t *rows = NULL;
    apr_status_t rv;

    *stats = apr_hash_make(p);
    if (!MSO_OK(mso_select(mso_args(db, p, &ST_STATS), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_attach_stats_t *s = stats_for(p, *stats, mso_col_int(rows, "account_id"));

        s->count = mso_col_int(rows, "n");
        s->stored = mso_col_int(rows, "stored");
        s->pending = mso_col_int(rows, "pending");
        s->large = mso_col_int(rows, "large");
        s->failed = mso_col_int(rows, "failed");
        s->bytes = mso_col_int(rows, "bytes");
    }
    if (!MSO_OK(mso_select(mso_args(db, p, &ST_STATS_DUE), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        stats_for(p, *stats, mso_col_int(rows, "account_id"))->lists_due
            = mso_col_int(rows, "n");
    }
    return APR_SUCCESS;
}
