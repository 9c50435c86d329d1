/* The outbox in the database (lib/mso_outbox): rows as applications insert
 * them, each step committed under the mailbox's work lease and only while
 * the row is queued, attachments read a chunk at a time, the admin figures
 * and the retention purge, on SQLite and PostgreSQL. */
#include "dbtest.h"

#include <string.h>

#include <apr_strings.h>
#include <apr_time.h>

#include "mso_mirror.h"
#include "mso_outbox.h"

/* As an application inserts: no times, no state. */
static const mso_stmt_t ST_APP_ROW = {
    "queue a message (test)", "account:int to:text subject:text body:text reply:text",
    "INSERT INTO msoauth_outbox (account_id, to_json, subject, body, reply_to_graph_id) "
    "VALUES (:account, :to, :subject, :body, :reply)", NULL
};
static const mso_stmt_t ST_APP_ATT = {
    "attach to a queued message (test)", "outbox:int name:text type:text content:blob "
    "inline:int cid:text",
    "INSERT INTO msoauth_outbox_attachments (outbox_id, name, content_type, content, is_inline, "
    "content_id) VALUES (:outbox, :name, :type, :content, :inline, :cid)", NULL
};

static apr_int64_t app_row(mso_db_t *db, apr_int64_t account, const char *subject,
                           const char *body)
{
    mso_args_t *a = mso_args(db, pool, &ST_APP_ROW);
    const char *err = NULL;

    mso_arg_int(a, "account", account);
    mso_arg_text(a, "to", "[{\"address\":\"c@x.com\",\"name\":\"C\"}]");
    mso_arg_text(a, "subject", subject);
    mso_arg_text(a, "body", body);
    mso_arg_text(a, "reply", NULL);
    ck_assert_msg(mso_exec(a, NULL, &err) == APR_SUCCESS, "insert: %s", err ? err : "");
    return num(db, apr_psprintf(pool, "SELECT MAX(id) FROM msoauth_outbox WHERE subject = '%s'",
                                subject));
}

static void app_att(mso_db_t *db, apr_int64_t outbox, const char *name, const void *bytes,
                    apr_size_t n, int is_inline, const char *cid)
{
    mso_args_t *a = mso_args(db, pool, &ST_APP_ATT);
    const char *err = NULL;

    mso_arg_int(a, "outbox", outbox);
    mso_arg_text(a, "name", name);
    mso_arg_text(a, "type", "application/octet-stream");
    mso_arg_blob(a, "content", bytes, n);
    mso_arg_int(a, "inline", is_inline);
    mso_arg_text(a, "cid", cid);
    ck_assert_msg(mso_exec(a, NULL, &err) == APR_SUCCESS, "attach: %s", err ? err : "");
}

/* A connected account leased for Graph work by owner. */
static mso_work_t *leased_by(mso_db_t *db, const char *mailbox, const char *owner,
                             apr_int64_t now)
{
    apr_array_header_t *works = NULL;
    mso_connect_t c = sample("default", mailbox, apr_pstrcat(pool, "oid-", mailbox, NULL));

    c.access_expires_at = now + 3600;
    c.refresh_due_at = now + 3000;
    connect_ok(db, &c, "sealed-r", "sealed-a", now);
    ck_assert_int_eq(mso_mirror_claim(db, pool, owner, now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);
    return APR_ARRAY_IDX(works, 0, mso_work_t *);
}

static mso_work_t *leased(mso_db_t *db, const char *mailbox, apr_int64_t now)
{
    return leased_by(db, mailbox, "me", now);
}

static mso_outbox_t *queued_one(mso_db_t *db, apr_int64_t account, apr_int64_t now)
{
    apr_array_header_t *rows = NULL;

    ck_assert_int_eq(mso_outbox_queue(db, pool, account, now, 10, &rows), APR_SUCCESS);
    ck_assert_int_eq(rows->nelts, 1);
    return APR_ARRAY_IDX(rows, 0, mso_outbox_t *);
}

static apr_status_t step(mso_db_t *db, const char *owner, mso_outbox_t *o, mso_outbox_step_e e,
                         apr_int64_t now)
{
    mso_outbox_step_t s;

    memset(&s, 0, sizeof(s));
    s.step = e;
    return mso_outbox_record(db, pool, owner, o, &s, now);
}

static const char *col(mso_db_t *db, apr_int64_t id, const char *what)
{
    return text_of(db, apr_psprintf(pool, "SELECT %s FROM msoauth_outbox WHERE id = %"
                                    APR_INT64_T_FMT, what, id));
}

START_TEST(outbox_steps)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now()), id, id2;
    unsigned char bytes[300];
    apr_array_header_t *rows = NULL, *works = NULL;
    mso_outbox_step_t s;
    mso_outbox_att_t *at;
    mso_outbox_t *o;
    mso_work_t *w;
    int i;

    migrate_ok(db);
    w = leased(db, "send@example.com", now);
    ck_assert_int_eq(w->queued_sends, 0);
    for (i = 0; i < (int)sizeof(bytes); i++) {
        bytes[i] = (unsigned char)i;
    }
    /* Bytes, not characters: the body's length and the attachments' sizes. */
    id = app_row(db, w->acct->id, "first", "Gr\xc3\xbc\xc3\x9f" "e");
    app_att(db, id, "a.bin", bytes, sizeof(bytes), 0, NULL);
    app_att(db, id, "logo.png", "\0\1", 2, 1, "logo");
    id2 = app_row(db, w->acct->id, "second", NULL);
    ck_assert_str_eq(col(db, id, "state"), "queued");
    ck_assert_int_ge(num(db, apr_psprintf(pool, "SELECT created_at FROM msoauth_outbox WHERE "
                                          "id = %" APR_INT64_T_FMT, id)), now - 5);
    ck_assert_int_eq(mso_outbox_queue(db, pool, w->acct->id, now, 10, &rows), APR_SUCCESS);
    ck_assert_int_eq(rows->nelts, 2);
    o = APR_ARRAY_IDX(rows, 0, mso_outbox_t *);
    ck_assert_int_eq(o->id, id);
    ck_assert_int_eq(o->body_len, 7);
    ck_assert_str_eq(o->body_type, "text");
    ck_assert_ptr_null(o->phase);
    ck_assert_ptr_null(o->marker);
    ck_assert_int_eq(o->atts->nelts, 2);
    at = APR_ARRAY_IDX(o->atts, 0, mso_outbox_att_t *);
    ck_assert_str_eq(at->name, "a.bin");
    ck_assert_int_eq(at->size, 300);
    ck_assert_int_eq(at->is_inline, 0);
    ck_assert_int_eq(APR_ARRAY_IDX(o->atts, 1, mso_outbox_att_t *)->is_inline, 1);
    ck_assert_str_eq(APR_ARRAY_IDX(o->atts, 1, mso_outbox_att_t *)->content_id, "logo");
    ck_assert_int_eq(APR_ARRAY_IDX(rows, 1, mso_outbox_t *)->atts->nelts, 0);
    ck_assert_int_eq(APR_ARRAY_IDX(rows, 1, mso_outbox_t *)->body_len, 0);

    /* creating: the marker is committed once and kept; attempts count send
     * calls only. */
    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_CREATING;
    s.marker = "m1";
    s.retry_at = now + 10;
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    s.marker = "m2";
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    ck_assert_str_eq(o->marker, "m1");
    ck_assert_str_eq(col(db, id, "marker"), "m1");
    ck_assert_str_eq(col(db, id, "phase"), "creating");
    ck_assert_str_eq(col(db, id, "attempts"), "0");
    ck_assert_int_eq(o->attempts, 0);
    /* Held back until retry_at: the queue and the claim both wait. */
    ck_assert_int_eq(mso_outbox_queue(db, pool, w->acct->id, now, 10, &rows), APR_SUCCESS);
    ck_assert_int_eq(rows->nelts, 1);
    ck_assert_int_eq(mso_outbox_queue(db, pool, w->acct->id, now + 10, 10, &rows),
                     APR_SUCCESS);
    ck_assert_int_eq(rows->nelts, 2);

    /* Another owner, or a lease that is gone: nothing is written. */
    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_DRAFT;
    s.draft_id = "D1";
    s.internet_message_id = "<i@x>";
    ck_assert_int_eq(mso_outbox_record(db, pool, "other", o, &s, now), APR_EBUSY);
    ck_assert_str_eq(col(db, id, "phase"), "creating");
    ck_assert_str_eq(o->phase, "creating");
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    ck_assert_str_eq(col(db, id, "draft_id"), "D1");
    ck_assert_ptr_null(col(db, id, "retry_at"));

    at = APR_ARRAY_IDX(o->atts, 0, mso_outbox_att_t *);
    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_ATT_ADDING;
    s.att = at;
    s.retry_at = now + 10;
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    ck_assert_str_eq(at->phase, "adding");
    s.step = MSO_OUTBOX_ATT_ADDED;
    s.graph_id = "ATT1";
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    ck_assert_str_eq(at->graph_id, "ATT1");
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox_attachments WHERE "
                             "phase = 'added' AND graph_id = 'ATT1'"), 1);
    /* The draft went away in Outlook: everything from the start. */
    ck_assert_int_eq(step(db, "me", o, MSO_OUTBOX_RESTART, now), APR_SUCCESS);
    ck_assert_ptr_null(o->phase);
    ck_assert_ptr_null(o->draft_id);
    ck_assert_ptr_null(at->phase);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox_attachments WHERE "
                             "phase IS NULL AND graph_id IS NULL"), 2);
    ck_assert_str_eq(col(db, id, "marker"), "m1");

    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_SENDING;
    s.draft_id = "D2";
    s.retry_at = now + 10;
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    ck_assert_str_eq(col(db, id, "phase"), "sending");
    ck_assert_str_eq(col(db, id, "draft_id"), "D2");
    ck_assert_str_eq(col(db, id, "attempts"), "1");
    ck_assert_int_eq(o->attempts, 1);
    /* Sending again (a look found the draft unsent): attempts + 1. */
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    ck_assert_str_eq(col(db, id, "attempts"), "2");
    /* Unmark touches only a row in phase creating. */
    ck_assert_int_eq(step(db, "me", o, MSO_OUTBOX_UNMARK, now), APR_NOTFOUND);
    ck_assert_str_eq(col(db, id, "phase"), "sending");
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT sending_since FROM msoauth_outbox "
                                          "WHERE id = %" APR_INT64_T_FMT, id)), now);
    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_SENT;
    s.internet_message_id = "<sent@x>";
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    ck_assert_str_eq(col(db, id, "state"), "sent");
    ck_assert_str_eq(col(db, id, "internet_message_id"), "<sent@x>");
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT sent_at FROM msoauth_outbox WHERE "
                                          "id = %" APR_INT64_T_FMT, id)), now);
    /* Sent: no step touches it any more. */
    ck_assert_int_eq(step(db, "me", o, MSO_OUTBOX_RESTART, now), APR_NOTFOUND);
    ck_assert_str_eq(col(db, id, "state"), "sent");

    /* The application takes a row back (cancels it): left alone. */
    o = queued_one(db, w->acct->id, now);
    ck_assert_int_eq(o->id, id2);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_outbox SET state = 'failed' WHERE id = %"
                             APR_INT64_T_FMT, id2));
    ck_assert_int_eq(step(db, "me", o, MSO_OUTBOX_CREATING, now), APR_NOTFOUND);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_outbox SET state = 'queued' WHERE id = %"
                             APR_INT64_T_FMT, id2));
    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_LATER;
    s.phase = "draft";
    s.last_error = "Graph did not answer";
    s.retry_at = now + 30;
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    ck_assert_str_eq(col(db, id2, "last_error"), "Graph did not answer");
    memset(&s, 0, sizeof(s));
    s.step = MSO_OUTBOX_FAILED;
    s.reason = "bad_request";
    s.last_error = "to_json is not a JSON array";
    ck_assert_int_eq(mso_outbox_record(db, pool, "me", o, &s, now), APR_SUCCESS);
    ck_assert_str_eq(col(db, id2, "state"), "failed");
    ck_assert_str_eq(col(db, id2, "reason"), "bad_request");
    ck_assert_ptr_null(col(db, id2, "retry_at"));

    /* The work claim: a mailbox with queued mail is due; one whose only
     * row waits for its retry_at is not, until then. */
    ck_assert_int_eq(mso_mirror_release(db, pool, w->acct->id, "me", &(mso_work_done_t){
        .sync_due_at = now + 3600}, now), APR_SUCCESS);
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 0);
    id = app_row(db, w->acct->id, "third", "x");
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_outbox SET retry_at = %" APR_INT64_T_FMT
                             " WHERE id = %" APR_INT64_T_FMT, now + 20, id));
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 0);
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now + 20, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);
    ck_assert_int_eq(APR_ARRAY_IDX(works, 0, mso_work_t *)->queued_sends, 1);
}
END_TEST

/* Group commit: several rows' steps in one transaction, each judged on its
 * own (written, lease gone, no longer queued); the rows in memory untouched
 * until applied. */
START_TEST(outbox_group_commit)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now()), a1, a2, b1;
    mso_outbox_write_t wr[4];
    mso_outbox_t *o1, *o2, *ob;
    apr_array_header_t *rows = NULL;
    mso_work_t *wa, *wb;

    migrate_ok(db);
    wa = leased_by(db, "group-a@example.com", "me", now);
    wb = leased_by(db, "group-b@example.com", "other", now);
    a1 = app_row(db, wa->acct->id, "a1", "x");
    a2 = app_row(db, wa->acct->id, "a2", "y");
    b1 = app_row(db, wb->acct->id, "b1", "z");
    ck_assert_int_eq(mso_outbox_queue(db, pool, wa->acct->id, now, 10, &rows), APR_SUCCESS);
    ck_assert_int_eq(rows->nelts, 2);
    o1 = APR_ARRAY_IDX(rows, 0, mso_outbox_t *);
    o2 = APR_ARRAY_IDX(rows, 1, mso_outbox_t *);
    ob = queued_one(db, wb->acct->id, now);
    /* The application takes a2 back. */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_outbox SET state = 'failed' WHERE id = %"
                             APR_INT64_T_FMT, a2));

    memset(wr, 0, sizeof(wr));
    wr[0].o = o1;
    wr[0].s.step = MSO_OUTBOX_CREATING;
    wr[0].s.marker = "ma1";
    wr[0].s.retry_at = now + 10;
    wr[1].o = ob;
    wr[1].s.step = MSO_OUTBOX_CREATING;
    wr[1].s.marker = "mb1";
    wr[2].o = o2;
    wr[2].s.step = MSO_OUTBOX_CREATING;
    wr[2].s.marker = "ma2";
    wr[3].o = o1;                       /* a second step of a row, in order */
    wr[3].s.step = MSO_OUTBOX_DRAFT;
    wr[3].s.draft_id = "DA1";
    ck_assert_int_eq(mso_outbox_commit(db, pool, "me", wr, 4, now), APR_SUCCESS);
    ck_assert_int_eq(wr[0].rv, APR_SUCCESS);
    ck_assert_int_eq(wr[1].rv, APR_EBUSY);
    ck_assert_int_eq(wr[2].rv, APR_NOTFOUND);
    ck_assert_int_eq(wr[3].rv, APR_SUCCESS);
    ck_assert_str_eq(col(db, a1, "marker"), "ma1");
    ck_assert_str_eq(col(db, a1, "phase"), "draft");
    ck_assert_str_eq(col(db, a1, "draft_id"), "DA1");
    ck_assert_ptr_null(col(db, b1, "marker"));
    ck_assert_ptr_null(col(db, b1, "phase"));
    ck_assert_ptr_null(col(db, a2, "marker"));
    ck_assert_str_eq(col(db, a2, "state"), "failed");
    /* Not applied to the rows in memory... */
    ck_assert_ptr_null(o1->marker);
    ck_assert_ptr_null(o1->phase);
    /* ...until the caller does. */
    mso_outbox_apply(pool, o1, &wr[0].s, now);
    mso_outbox_apply(pool, o1, &wr[3].s, now);
    ck_assert_str_eq(o1->marker, "ma1");
    ck_assert_str_eq(o1->phase, "draft");
    ck_assert_str_eq(o1->draft_id, "DA1");

    /* Marked creating, its call never made: back to no phase, the marker
     * kept for the next create. */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_outbox SET phase = 'creating', draft_id = "
                             "NULL WHERE id = %" APR_INT64_T_FMT, a1));
    o1->phase = "creating";
    ck_assert_int_eq(step(db, "me", o1, MSO_OUTBOX_UNMARK, now), APR_SUCCESS);
    ck_assert_ptr_null(o1->phase);
    ck_assert_ptr_null(col(db, a1, "phase"));
    ck_assert_ptr_null(col(db, a1, "retry_at"));
    ck_assert_str_eq(col(db, a1, "marker"), "ma1");
    ck_assert_str_eq(col(db, a1, "attempts"), "0");
    ck_assert_int_eq(mso_outbox_commit(db, pool, "me", wr, 0, now), APR_SUCCESS);
}
END_TEST

START_TEST(outbox_bytes)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now()), id;
    apr_size_t size = 1024 * 1024 + 7, n = 0, off;
    unsigned char *big = apr_palloc(pool, size);
    const unsigned char *got = NULL;
    const char *body = NULL;
    mso_outbox_t *o;
    mso_work_t *w;

    migrate_ok(db);
    w = leased(db, "bytes@example.com", now);
    for (off = 0; off < size; off++) {
        big[off] = (unsigned char)((off * 7 + off / 256) & 0xff);
    }
    id = app_row(db, w->acct->id, "bytes", "the body");
    app_att(db, id, "big.bin", big, size, 0, NULL);
    app_att(db, id, "empty.txt", NULL, 0, 0, NULL);
    o = queued_one(db, w->acct->id, now);
    ck_assert_int_eq(APR_ARRAY_IDX(o->atts, 0, mso_outbox_att_t *)->size, (apr_int64_t)size);
    ck_assert_int_eq(APR_ARRAY_IDX(o->atts, 1, mso_outbox_att_t *)->size, 0);
    /* Chunk by chunk, as an upload session reads it; the last one short. */
    for (off = 0; off < size; off += 300000) {
        ck_assert_int_eq(mso_outbox_att_bytes(db, pool, APR_ARRAY_IDX(o->atts, 0,
                                                                      mso_outbox_att_t *)->id,
                                              off, 300000, &got, &n), APR_SUCCESS);
        ck_assert_uint_eq(n, size - off < 300000 ? size - off : 300000);
        ck_assert_int_eq(memcmp(got, big + off, n), 0);
    }
    ck_assert_int_eq(mso_outbox_att_bytes(db, pool, APR_ARRAY_IDX(o->atts, 1,
                                                                  mso_outbox_att_t *)->id,
                                          0, 10, &got, &n), APR_SUCCESS);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(mso_outbox_att_bytes(db, pool, 999999, 0, 10, &got, &n), APR_NOTFOUND);
    ck_assert_int_eq(mso_outbox_body(db, pool, id, &body), APR_SUCCESS);
    ck_assert_str_eq(body, "the body");
}
END_TEST

START_TEST(outbox_stats_and_purge)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now()), a, old, recent, failed;
    apr_hash_t *stats = NULL;
    const mso_outbox_stats_t *st;
    mso_work_t *w;
    int n = -1;

    migrate_ok(db);
    w = leased(db, "stats@example.com", now);
    a = w->acct->id;
    old = app_row(db, a, "old", "x");
    app_att(db, old, "o.bin", "abc", 3, 0, NULL);
    recent = app_row(db, a, "recent", "x");
    app_att(db, recent, "r.bin", "abc", 3, 0, NULL);
    failed = app_row(db, a, "failed", "x");
    app_row(db, a, "queued", "x");
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_outbox SET state = 'sent', sent_at = %"
                             APR_INT64_T_FMT " WHERE id = %" APR_INT64_T_FMT, now - 40 * 86400,
                             old));
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_outbox SET state = 'sent', sent_at = %"
                             APR_INT64_T_FMT " WHERE id = %" APR_INT64_T_FMT, now - 86400,
                             recent));
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_outbox SET state = 'failed', reason = "
                             "'bad_request', last_error = 'no recipient', created_at = 1 "
                             "WHERE id = %" APR_INT64_T_FMT, failed));
    ck_assert_int_eq(mso_outbox_stats(db, pool, &stats), APR_SUCCESS);
    st = apr_hash_get(stats, apr_psprintf(pool, "%" APR_INT64_T_FMT, a), APR_HASH_KEY_STRING);
    ck_assert_ptr_nonnull(st);
    ck_assert_int_eq(st->queued, 1);
    ck_assert_int_eq(st->failed, 1);
    ck_assert_int_eq(st->sent, 2);
    ck_assert_int_ge(st->oldest_queued_at, now - 5);
    ck_assert_int_eq(st->last_failed_id, failed);
    ck_assert_str_eq(st->last_failed_reason, "bad_request");
    ck_assert_str_eq(st->last_failed_error, "no recipient");

    /* Retention: sent rows older than the cut go, with their attachments;
     * failed and queued rows stay, whatever their age. */
    ck_assert_int_eq(mso_outbox_purge(db, pool, now - 30 * 86400, 500, &n), APR_SUCCESS);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox"), 3);
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_outbox WHERE "
                                          "id = %" APR_INT64_T_FMT, old)), 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox_attachments"), 1);
    ck_assert_int_eq(mso_outbox_purge(db, pool, now - 30 * 86400, 500, &n), APR_SUCCESS);
    ck_assert_int_eq(n, 0);
    /* In batches of max rows. */
    ck_assert_int_eq(mso_outbox_purge(db, pool, now, 0, &n), APR_SUCCESS);
    ck_assert_int_eq(n, 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox_attachments"), 1);
    ck_assert_int_eq(mso_outbox_purge(db, pool, now, 1, &n), APR_SUCCESS);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox_attachments"), 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox"), 2);
    /* An account that goes takes its outbox with it. */
    exec_ok(db, apr_psprintf(pool, "DELETE FROM msoauth_accounts WHERE id = %" APR_INT64_T_FMT,
                             a));
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox"), 0);
}
END_TEST

static void add_tests(TCase *tc, int backend)
{
    ADD_BOTH(tc, outbox_steps, backend);
    ADD_BOTH(tc, outbox_group_commit, backend);
    ADD_BOTH(tc, outbox_bytes, backend);
    ADD_BOTH(tc, outbox_stats_and_purge, backend);
}

int main(void)
{
    return dbtest_main("outbox", add_tests);
}
