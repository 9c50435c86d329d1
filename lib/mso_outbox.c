/* The outbox in the database (see mso_outbox.h): msoauth_outbox and
 * msoauth_outbox_attachments. Same statements on SQLite and PostgreSQL but
 * for byte lengths and slices (SQLite's LENGTH counts characters of text,
 * so it measures the value cast to a blob). */
#include <string.h>

#include <apr_strings.h>

#include "mso_mirror.h"
#include "mso_outbox.h"

#define ROW_COLUMNS "id, account_id, to_json, cc_json, bcc_json, subject, body_type, " \
    "reply_to_graph_id, attempts, marker, phase, draft_id, internet_message_id, " \
    "sending_since, created_at"

static const mso_stmt_t ST_QUEUE = {
    "read the queued outgoing mail", "id:int now:int max:int",
    "SELECT " ROW_COLUMNS ", LENGTH(CAST(body AS BLOB)) AS body_len, "
    "(SELECT COUNT(*) FROM msoauth_outbox_attachments x WHERE x.outbox_id = o.id) AS atts "
    "FROM msoauth_outbox o WHERE account_id = :id AND state = 'queued' "
    "AND COALESCE(retry_at, 0) <= :now ORDER BY id LIMIT :max",
    "SELECT " ROW_COLUMNS ", OCTET_LENGTH(body) AS body_len, "
    "(SELECT COUNT(*) FROM msoauth_outbox_attachments x WHERE x.outbox_id = o.id) AS atts "
    "FROM msoauth_outbox o WHERE account_id = :id AND state = 'queued' "
    "AND COALESCE(retry_at, 0) <= :now ORDER BY id LIMIT :max"
};
#define ATT_COLUMNS "a.id, a.outbox_id, a.name, a.content_type, a.is_inline, a.content_id, " \
    "a.phase, a.graph_id"
static const mso_stmt_t ST_QUEUE_ATTS = {
    "read the attachments of queued outgoing mail", "id:int first:int last:int",
    "SELECT " ATT_COLUMNS ", LENGTH(CAST(a.content AS BLOB)) AS size "
    "FROM msoauth_outbox_attachments a JOIN msoauth_outbox o ON o.id = a.outbox_id "
    "WHERE o.account_id = :id AND o.state = 'queued' AND a.outbox_id >= :first "
    "AND a.outbox_id <= :last ORDER BY a.outbox_id, a.id",
    "SELECT " ATT_COLUMNS ", OCTET_LENGTH(a.content) AS size "
    "FROM msoauth_outbox_attachments a JOIN msoauth_outbox o ON o.id = a.outbox_id "
    "WHERE o.account_id = :id AND o.state = 'queued' AND a.outbox_id >= :first "
    "AND a.outbox_id <= :last ORDER BY a.outbox_id, a.id"
};
static const mso_stmt_t ST_BODY = {
    "read the body of outgoing mail", "id:int",
    "SELECT body FROM msoauth_outbox WHERE id = :id", NULL
};
/* substr counts from 1. */
static const mso_stmt_t ST_ATT_CHUNK = {
    "read an attachment of outgoing mail", "id:int from:int len:int",
    "SELECT SUBSTR(CAST(content AS BLOB), :from, :len) AS chunk "
    "FROM msoauth_outbox_attachments WHERE id = :id",
    "SELECT SUBSTRING(content FROM CAST(:from AS INTEGER) FOR CAST(:len AS INTEGER)) AS chunk "
    "FROM msoauth_outbox_attachments WHERE id = :id"
};

/* Each changes the row only while it is queued. */
static const mso_stmt_t ST_CREATING = {
    "record outgoing mail as having its draft made", "id:int marker:text retry_at:int now:int",
    "UPDATE msoauth_outbox SET phase = 'creating', marker = COALESCE(marker, :marker), "
    "retry_at = :retry_at, updated_at = :now WHERE id = :id AND state = 'queued'", NULL
};
/* Only a row whose create call never went out. */
static const mso_stmt_t ST_UNMARK = {
    "record outgoing mail as not started", "id:int now:int",
    "UPDATE msoauth_outbox SET phase = NULL, retry_at = NULL, updated_at = :now "
    "WHERE id = :id AND state = 'queued' AND phase = 'creating'", NULL
};
static const mso_stmt_t ST_DRAFT = {
    "record the draft of outgoing mail", "id:int draft_id:text imid:text now:int",
    "UPDATE msoauth_outbox SET phase = 'draft', draft_id = :draft_id, "
    "internet_message_id = COALESCE(:imid, internet_message_id), retry_at = NULL, "
    "updated_at = :now WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_SENDING = {
    "record outgoing mail as being sent",
    "id:int draft_id:text imid:text retry_at:int now:int",
    "UPDATE msoauth_outbox SET phase = 'sending', draft_id = :draft_id, "
    "internet_message_id = COALESCE(:imid, internet_message_id), sending_since = :now, "
    "attempts = attempts + 1, retry_at = :retry_at, updated_at = :now "
    "WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_SENT = {
    "record outgoing mail as sent", "id:int imid:text now:int",
    "UPDATE msoauth_outbox SET state = 'sent', sent_at = :now, "
    "internet_message_id = COALESCE(:imid, internet_message_id), reason = NULL, "
    "last_error = NULL, retry_at = NULL, updated_at = :now "
    "WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_FAILED = {
    "record outgoing mail as failed", "id:int reason:text last_error:text now:int",
    "UPDATE msoauth_outbox SET state = 'failed', reason = :reason, last_error = :last_error, "
    "retry_at = NULL, updated_at = :now WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_LATER = {
    "record outgoing mail as waiting", "id:int phase:text last_error:text retry_at:int now:int",
    "UPDATE msoauth_outbox SET phase = :phase, last_error = :last_error, retry_at = :retry_at, "
    "updated_at = :now WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_RESTART = {
    "start outgoing mail again", "id:int last_error:text now:int",
    "UPDATE msoauth_outbox SET phase = NULL, draft_id = NULL, internet_message_id = NULL, "
    "sending_since = NULL, last_error = :last_error, retry_at = NULL, updated_at = :now "
    "WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_TOUCH = {
    "check that outgoing mail is still queued", "id:int retry_at:int now:int",
    "UPDATE msoauth_outbox SET retry_at = :retry_at, updated_at = :now "
    "WHERE id = :id AND state = 'queued'", NULL
};
static const mso_stmt_t ST_ATTS_RESET = {
    "start the attachments of outgoing mail again", "id:int",
    "UPDATE msoauth_outbox_attachments SET phase = NULL, graph_id = NULL "
    "WHERE outbox_id = :id", NULL
};
static const mso_stmt_t ST_ATT_SET = {
    "record an attachment of outgoing mail", "id:int att:int phase:text graph_id:text",
    "UPDATE msoauth_outbox_attachments SET phase = :phase, graph_id = :graph_id "
    "WHERE id = :att AND outbox_id = :id", NULL
};

static const mso_stmt_t ST_STATS = {
    "count outgoing mail per account", NULL,
    "SELECT account_id, "
    "SUM(CASE WHEN state = 'queued' THEN 1 ELSE 0 END) AS queued, "
    "SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed, "
    "SUM(CASE WHEN state = 'sent' THEN 1 ELSE 0 END) AS sent, "
    "MIN(CASE WHEN state = 'queued' THEN created_at END) AS oldest "
    "FROM msoauth_outbox GROUP BY account_id", NULL
};
static const mso_stmt_t ST_STATS_FAILED = {
    "read the newest failure of outgoing mail per account", NULL,
    "SELECT account_id, id, reason, last_error FROM msoauth_outbox WHERE id IN "
    "(SELECT MAX(id) FROM msoauth_outbox WHERE state = 'failed' GROUP BY account_id)", NULL
};

/* The same batch twice in one transaction: the oldest max rows by id. */
#define PURGE_BATCH "SELECT id FROM msoauth_outbox WHERE state = 'sent' " \
    "AND sent_at < :before ORDER BY id LIMIT :max"
static const mso_stmt_t ST_PURGE_ATTS = {
    "delete the attachments of sent mail past the retention", "before:int max:int",
    "DELETE FROM msoauth_outbox_attachments WHERE outbox_id IN (" PURGE_BATCH ")", NULL
};
static const mso_stmt_t ST_PURGE = {
    "delete sent mail past the retention", "before:int max:int",
    "DELETE FROM msoauth_outbox WHERE id IN (" PURGE_BATCH ")", NULL
};

/* ------------------------------------------------------------------------- */

apr_status_t mso_outbox_queue(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                              apr_int64_t now, int max, apr_array_header_t **out)
{
    mso_rows_t *rows = NULL;
    apr_hash_t *by_id;
    mso_args_t *a;
    apr_status_t rv;
    apr_int64_t first = 0, last = 0;
    int with_atts = 0;

    *out = apr_array_make(p, 16, sizeof(mso_outbox_t *));
    by_id = apr_hash_make(p);
    a = mso_args(db, p, &ST_QUEUE);
    mso_arg_int(a, "id", account_id);
    mso_arg_int(a, "now", now);
    mso_arg_int(a, "max", max);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_outbox_t *o = apr_pcalloc(p, sizeof(*o));

        o->id = mso_col_int(rows, "id");
        o->account_id = mso_col_int(rows, "account_id");
        o->to_json = mso_col_text(rows, p, "to_json");
        o->cc_json = mso_col_text(rows, p, "cc_json");
        o->bcc_json = mso_col_text(rows, p, "bcc_json");
        o->subject = mso_col_text(rows, p, "subject");
        o->body_type = mso_col_text(rows, p, "body_type");
        o->body_len = mso_col_int(rows, "body_len");
        o->reply_to_graph_id = mso_col_text(rows, p, "reply_to_graph_id");
        o->attempts = (int)mso_col_int(rows, "attempts");
        o->marker = mso_col_text(rows, p, "marker");
        o->phase = mso_col_text(rows, p, "phase");
        o->draft_id = mso_col_text(rows, p, "draft_id");
        o->internet_message_id = mso_col_text(rows, p, "internet_message_id");
        o->sending_since = mso_col_int(rows, "sending_since");
        o->created_at = mso_col_int(rows, "created_at");
        o->atts = apr_array_make(p, 1, sizeof(mso_outbox_att_t *));
        with_atts |= mso_col_int(rows, "atts") > 0;
        if (!first) {
            first = o->id;
        }
        last = o->id;
        apr_hash_set(by_id, apr_pmemdup(p, &o->id, sizeof(o->id)), sizeof(o->id), o);
        APR_ARRAY_PUSH(*out, mso_outbox_t *) = o;
    }
    if (!with_atts) {
        return APR_SUCCESS;
    }
    a = mso_args(db, p, &ST_QUEUE_ATTS);
    mso_arg_int(a, "id", account_id);
    mso_arg_int(a, "first", first);
    mso_arg_int(a, "last", last);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        apr_int64_t oid = mso_col_int(rows, "outbox_id");
        mso_outbox_t *o = apr_hash_get(by_id, &oid, sizeof(oid));
        mso_outbox_att_t *at;

        if (!o) {
            continue;               /* a row queued since, or past max: not this pass */
        }
        at = apr_pcalloc(p, sizeof(*at));
        at->id = mso_col_int(rows, "id");
        at->outbox_id = oid;
        at->name = mso_col_text(rows, p, "name");
        at->content_type = mso_col_text(rows, p, "content_type");
        at->is_inline = mso_col_int(rows, "is_inline") != 0;
        at->content_id = mso_col_text(rows, p, "content_id");
        at->size = mso_col_int(rows, "size");
        at->phase = mso_col_text(rows, p, "phase");
        at->graph_id = mso_col_text(rows, p, "graph_id");
        APR_ARRAY_PUSH(o->atts, mso_outbox_att_t *) = at;
    }
    return APR_SUCCESS;
}

apr_status_t mso_outbox_body(mso_db_t *db, apr_pool_t *p, apr_int64_t id, const char **body)
{
    mso_rows_t *rows = NULL;
    mso_args_t *a = mso_args(db, p, &ST_BODY);
    apr_status_t rv;

    *body = "";
    mso_arg_int(a, "id", id);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    if (!mso_rows_next(rows)) {
        return APR_NOTFOUND;
    }
    *body = mso_col_text(rows, p, "body");
    if (!*body) {
        *body = "";
    }
    while (mso_rows_next(rows)) {
    }
    return APR_SUCCESS;
}

apr_status_t mso_outbox_att_bytes(mso_db_t *db, apr_pool_t *p, apr_int64_t att_id,
                                  apr_int64_t offset, apr_int64_t len,
                                  const unsigned char **data, apr_size_t *n)
{
    mso_rows_t *rows = NULL;
    mso_args_t *a = mso_args(db, p, &ST_ATT_CHUNK);
    apr_status_t rv;

    *data = NULL;
    *n = 0;
    mso_arg_int(a, "id", att_id);
    mso_arg_int(a, "from", offset + 1);
    mso_arg_int(a, "len", len);
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    if (!mso_rows_next(rows)) {
        return APR_NOTFOUND;
    }
    *data = mso_col_blob(rows, p, "chunk", n);
    if (!*data) {
        *data = (const unsigned char *)"";
        *n = 0;
    }
    while (mso_rows_next(rows)) {
    }
    return APR_SUCCESS;
}

/* ------------------------------------------------------------------------- */
/* Steps */

static const mso_stmt_t *row_statement(mso_outbox_step_e step)
{
    switch (step) {
    case MSO_OUTBOX_CREATING:
        return &ST_CREATING;
    case MSO_OUTBOX_UNMARK:
        return &ST_UNMARK;
    case MSO_OUTBOX_DRAFT:
        return &ST_DRAFT;
    case MSO_OUTBOX_SENDING:
        return &ST_SENDING;
    case MSO_OUTBOX_SENT:
        return &ST_SENT;
    case MSO_OUTBOX_FAILED:
        return &ST_FAILED;
    case MSO_OUTBOX_LATER:
        return &ST_LATER;
    case MSO_OUTBOX_RESTART:
        return &ST_RESTART;
    default:
        return &ST_TOUCH;
    }
}

/* One write; APR_NOTFOUND when the row (or attachment) is no longer queued. */
static apr_status_t write_one(mso_tx_t *tx, mso_outbox_write_t *w, apr_int64_t now)
{
    const mso_outbox_step_t *s = &w->s;
    mso_args_t *a = mso_tx_args(tx, row_statement(s->step));
    apr_status_t rv;
    int n = 0;

    mso_arg_int(a, "id", w->o->id);
    mso_arg_int(a, "now", now);
    switch (s->step) {
    case MSO_OUTBOX_CREATING:
        mso_arg_text(a, "marker", s->marker);
        mso_arg_opt(a, "retry_at", s->retry_at);
        break;
    case MSO_OUTBOX_DRAFT:
        mso_arg_text(a, "draft_id", s->draft_id);
        mso_arg_text(a, "imid", s->internet_message_id);
        break;
    case MSO_OUTBOX_SENDING:
        mso_arg_text(a, "draft_id", s->draft_id);
        mso_arg_text(a, "imid", s->internet_message_id);
        mso_arg_opt(a, "retry_at", s->retry_at);
        break;
    case MSO_OUTBOX_SENT:
        mso_arg_text(a, "imid", s->internet_message_id);
        break;
    case MSO_OUTBOX_FAILED:
        mso_arg_text(a, "reason", s->reason);
        mso_arg_text(a, "last_error", s->last_error);
        break;
    case MSO_OUTBOX_LATER:
        mso_arg_text(a, "phase", s->phase);
        mso_arg_text(a, "last_error", s->last_error);
        mso_arg_opt(a, "retry_at", s->retry_at);
        break;
    case MSO_OUTBOX_RESTART:
        mso_arg_text(a, "last_error", s->last_error);
        break;
    case MSO_OUTBOX_UNMARK:
        break;
    default:
        mso_arg_opt(a, "retry_at", s->retry_at);
        break;
    }
    if (!MSO_OK(mso_tx_exec(tx, a, &n))) {
        return rv;
    }
    if (n != 1) {
        return APR_NOTFOUND;        /* no longer queued: not ours to touch */
    }
    if (s->step == MSO_OUTBOX_RESTART) {
        a = mso_tx_args(tx, &ST_ATTS_RESET);
        mso_arg_int(a, "id", w->o->id);
        return mso_tx_exec(tx, a, NULL);
    }
    if (s->step == MSO_OUTBOX_ATT_ADDING || s->step == MSO_OUTBOX_ATT_ADDED) {
        a = mso_tx_args(tx, &ST_ATT_SET);
        mso_arg_int(a, "id", w->o->id);
        mso_arg_int(a, "att", s->att->id);
        mso_arg_text(a, "phase", s->step == MSO_OUTBOX_ATT_ADDING ? "adding" : "added");
        mso_arg_text(a, "graph_id", s->step == MSO_OUTBOX_ATT_ADDED ? s->graph_id : NULL);
        if (MSO_OK(mso_tx_exec(tx, a, &n)) && n != 1) {
            rv = APR_NOTFOUND;      /* the application took the attachment back */
        }
    }
    return rv;
}

typedef struct {
    const char *owner;
    mso_outbox_write_t *w;
    int n;
    apr_int64_t now;
} commit_t;

static apr_status_t commit_tx(mso_tx_t *tx, void *baton)
{
    commit_t *c = baton;
    apr_hash_t *fenced = apr_hash_make(tx->ptemp);
    apr_status_t rv = APR_SUCCESS;
    int i;

    for (i = 0; i < c->n; i++) {
        mso_outbox_write_t *w = &c->w[i];
        apr_int64_t acct = w->o->account_id;
        apr_status_t *f = apr_hash_get(fenced, &acct, sizeof(acct));

        if (!f) {
            /* Once per mailbox and transaction: its lease, extended. */
            f = apr_palloc(tx->ptemp, sizeof(*f));
            *f = mso_mirror_fence(tx, acct, c->owner);
            if (*f != APR_SUCCESS && *f != APR_EBUSY) {
                return *f;
            }
            apr_hash_set(fenced, apr_pmemdup(tx->ptemp, &acct, sizeof(acct)), sizeof(acct), f);
        }
        if (*f != APR_SUCCESS) {
            w->rv = APR_EBUSY;
            continue;
        }
        w->rv = write_one(tx, w, c->now);
        if (w->rv != APR_SUCCESS && w->rv != APR_NOTFOUND) {
            return w->rv;
        }
    }
    return rv;
}

apr_status_t mso_outbox_commit(mso_db_t *db, apr_pool_t *p, const char *owner,
                               mso_outbox_write_t *w, int n, apr_int64_t now)
{
    commit_t c;
    apr_pool_t *tmp;
    apr_status_t rv;
    int i;

    if (n <= 0) {
        return APR_SUCCESS;
    }
    c.owner = owner;
    c.w = w;
    c.n = n;
    c.now = now;
    apr_pool_create(&tmp, p);
    rv = mso_db_tx(db, tmp, n == 1 ? apr_psprintf(tmp, "(outgoing mail %" APR_INT64_T_FMT ")",
                                                  w[0].o->id)
                                   : "(outgoing mail)", commit_tx, &c, NULL);
    apr_pool_destroy(tmp);
    if (rv != APR_SUCCESS) {
        for (i = 0; i < n; i++) {
            w[i].rv = rv;           /* rolled back: nothing of it is written */
        }
    }
    return rv;
}

void mso_outbox_apply(apr_pool_t *p, mso_outbox_t *o, const mso_outbox_step_t *s,
                      apr_int64_t now)
{
    int i;

    switch (s->step) {
    case MSO_OUTBOX_CREATING:
        o->phase = "creating";
        if (!o->marker) {
            o->marker = apr_pstrdup(p, s->marker);
        }
        break;
    case MSO_OUTBOX_UNMARK:
        o->phase = NULL;
        break;
    case MSO_OUTBOX_DRAFT:
    case MSO_OUTBOX_SENDING:
        o->phase = s->step == MSO_OUTBOX_DRAFT ? "draft" : "sending";
        if (s->draft_id != o->draft_id) {
            o->draft_id = apr_pstrdup(p, s->draft_id);
        }
        if (s->internet_message_id && s->internet_message_id != o->internet_message_id) {
            o->internet_message_id = apr_pstrdup(p, s->internet_message_id);
        }
        if (s->step == MSO_OUTBOX_SENDING) {
            o->sending_since = now;
            o->attempts++;
        }
        break;
    case MSO_OUTBOX_SENT:
        if (s->internet_message_id && s->internet_message_id != o->internet_message_id) {
            o->internet_message_id = apr_pstrdup(p, s->internet_message_id);
        }
        break;
    case MSO_OUTBOX_LATER:
        o->phase = s->phase ? apr_pstrdup(p, s->phase) : NULL;
        break;
    case MSO_OUTBOX_RESTART:
        o->phase = o->draft_id = o->internet_message_id = NULL;
        o->sending_since = 0;
        for (i = 0; i < o->atts->nelts; i++) {
            mso_outbox_att_t *at = APR_ARRAY_IDX(o->atts, i, mso_outbox_att_t *);

            at->phase = at->graph_id = NULL;
        }
        break;
    case MSO_OUTBOX_ATT_ADDING:
        s->att->phase = "adding";
        break;
    case MSO_OUTBOX_ATT_ADDED:
        s->att->phase = "added";
        s->att->graph_id = s->graph_id ? apr_pstrdup(p, s->graph_id) : NULL;
        break;
    default:
        break;
    }
}

apr_status_t mso_outbox_record(mso_db_t *db, apr_pool_t *p, const char *owner,
                               mso_outbox_t *o, const mso_outbox_step_t *s, apr_int64_t now)
{
    mso_outbox_write_t w;
    apr_status_t rv;

    w.o = o;
    w.s = *s;
    w.rv = APR_SUCCESS;
    rv = mso_outbox_commit(db, p, owner, &w, 1, now);
    if (rv == APR_SUCCESS && w.rv == APR_SUCCESS) {
        mso_outbox_apply(p, o, s, now);
    }
    return rv == APR_SUCCESS ? w.rv : rv;
}

/* ------------------------------------------------------------------------- */

static mso_outbox_stats_t *stats_for(apr_pool_t *p, apr_hash_t *h, apr_int64_t id)
{
    const char *key = apr_psprintf(p, "%" APR_INT64_T_FMT, id);
    mso_outbox_stats_t *s = apr_hash_get(h, key, APR_HASH_KEY_STRING);

    if (!s) {
        s = apr_pcalloc(p, sizeof(*s));
        s->account_id = id;
        apr_hash_set(h, key, APR_HASH_KEY_STRING, s);
    }
    return s;
}

apr_status_t mso_outbox_stats(mso_db_t *db, apr_pool_t *p, apr_hash_t **stats)
{
    mso_rows_t *rows = NULL;
    apr_status_t rv;

    *stats = apr_hash_make(p);
    if (!MSO_OK(mso_select(mso_args(db, p, &ST_STATS), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_outbox_stats_t *s = stats_for(p, *stats, mso_col_int(rows, "account_id"));

        s->queued = mso_col_int(rows, "queued");
        s->failed = mso_col_int(rows, "failed");
        s->sent = mso_col_int(rows, "sent");
        s->oldest_queued_at = mso_col_int(rows, "oldest");
    }
    if (!MSO_OK(mso_select(mso_args(db, p, &ST_STATS_FAILED), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        mso_outbox_stats_t *s = stats_for(p, *stats, mso_col_int(rows, "account_id"));

        s->last_failed_id = mso_col_int(rows, "id");
        s->last_failed_reason = mso_col_text(rows, p, "reason");
        s->last_failed_error = mso_col_text(rows, p, "last_error");
    }
    return APR_SUCCESS;
}

typedef struct {
    apr_int64_t before;
    int max, n;
} purge_t;

static apr_status_t purge_tx(mso_tx_t *tx, void *baton)
{
    purge_t *pg = baton;
    mso_args_t *a;
    apr_status_t rv;

    /* The attachments first: also without SQLite's foreign_keys. */
    a = mso_tx_args(tx, &ST_PURGE_ATTS);
    mso_arg_int(a, "before", pg->before);
    mso_arg_int(a, "max", pg->max);
    if (MSO_OK(mso_tx_exec(tx, a, NULL))) {
        a = mso_tx_args(tx, &ST_PURGE);
        mso_arg_int(a, "before", pg->before);
        mso_arg_int(a, "max", pg->max);
        rv = mso_tx_exec(tx, a, &pg->n);
    }
    return rv;
}

apr_status_t mso_outbox_purge(mso_db_t *db, apr_pool_t *p, apr_int64_t before, int max,
                              int *deleted)
{
    purge_t pg;
    apr_status_t rv;

    pg.before = before;
    pg.max = max;
    pg.n = 0;
    rv = mso_db_tx(db, p, NULL, purge_tx, &pg, NULL);     /* a failure is logged */
    *deleted = rv == APR_SUCCESS ? pg.n : 0;
    return rv;
}
