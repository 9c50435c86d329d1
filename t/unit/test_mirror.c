/* The mirror in the database (lib/mso_mirror): delta pages, folder cursors,
 * the Graph work lease and the write-back queue, on SQLite and PostgreSQL. */
#include "dbtest.h"

#include <string.h>

#include <apr_strings.h>
#include <apr_time.h>

#include "mso_graph.h"
#include "mso_mirror.h"

#define LINK "https://graph.microsoft.com/v1.0/me/mailFolders('i')/messages/delta"

static mso_graph_page_t *page_of(const char *json)
{
    mso_graph_page_t *page = apr_palloc(pool, sizeof(*page));
    const char *err = NULL;

    ck_assert_msg(mso_graph_parse_page(pool, json, strlen(json), page, &err) == APR_SUCCESS,
                  "page: %s", err ? err : "");
    return page;
}

/* A connected account with a good token, leased for Graph work by "me". */
static mso_work_t *leased(mso_db_t *db, const char *mailbox, apr_int64_t now)
{
    apr_array_header_t *works = NULL;
    mso_connect_t a = sample("default", mailbox, apr_pstrcat(pool, "oid-", mailbox, NULL));

    a.access_expires_at = now + 3600;
    a.refresh_due_at = now + 3000;
    connect_ok(db, &a, "sealed-r", "sealed-a", now);
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);
    return APR_ARRAY_IDX(works, 0, mso_work_t *);
}

static mso_folder_t *inbox_of(mso_db_t *db, apr_int64_t id)
{
    apr_array_header_t *names = apr_array_make(pool, 1, sizeof(const char *)), *out = NULL;

    APR_ARRAY_PUSH(names, const char *) = "inbox";
    ck_assert_int_eq(mso_mirror_folders(db, pool, id, names, &out), APR_SUCCESS);
    ck_assert_int_eq(out->nelts, 1);
    return APR_ARRAY_IDX(out, 0, mso_folder_t *);
}

static void apply_ok(mso_db_t *db, apr_int64_t id, mso_folder_t *f, const char *json, int n)
{
    const char *err = NULL;
    int applied = -1;
    apr_status_t rv = mso_mirror_apply_page(db, pool, "me", id, f, page_of(json),
                                            apr_time_sec(apr_time_now()), &applied, &err);

    ck_assert_msg(rv == APR_SUCCESS, "apply: %s", err ? err : "");
    ck_assert_int_eq(applied, n);
}

static long long msg_num(mso_db_t *db, const char *what, const char *graph_id)
{
    return num(db, apr_psprintf(pool, "SELECT %s FROM msoauth_messages WHERE graph_id = '%s'",
                                what, graph_id));
}

#define FULL(id, subject, read) "{\"id\":\"" id "\",\"subject\":\"" subject "\",\"isRead\":" \
    read ",\"receivedDateTime\":\"2026-11-23T10:00:00Z\",\"from\":{\"emailAddress\":" \
    "{\"address\":\"a@x.com\"}}}"

START_TEST(mirror_pages)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now());
    mso_work_t *w;
    mso_folder_t *f;
    const char *err = NULL;
    int applied = 0;

    migrate_ok(db);
    w = leased(db, "pages@example.com", now);
    ck_assert_int_eq(w->sync_due_at, 0);            /* a new account syncs at once */
    f = inbox_of(db, w->acct->id);
    ck_assert_str_eq(f->phase, "initial");
    ck_assert_int_eq(f->round, 1);

    /* The same id twice in a page: the later one wins, no error. */
    apply_ok(db, w->acct->id, f, "{\"value\":[" FULL("A", "A1", "false") "," FULL("B", "B", "false")
             "," FULL("A", "A2", "true") "],\"@odata.nextLink\":\"" LINK "?$skiptoken=1\"}", 3);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages"), 2);
    ck_assert_int_eq(msg_num(db, "is_read", "A"), 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE subject = 'A2'"), 1);
    ck_assert_str_eq(f->phase, "backfill");
    ck_assert_ptr_nonnull(strstr(f->next_link, "skiptoken=1"));
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_sync_folders WHERE "
                             "next_link LIKE '%skiptoken=1' AND phase = 'backfill'"), 1);

    /* A partial update keeps what it does not carry; an unknown removal is
     * harmless; the deltaLink ends the round. */
    apply_ok(db, w->acct->id, f, "{\"value\":[{\"id\":\"B\",\"isRead\":true},"
             "{\"id\":\"Z\",\"@removed\":{\"reason\":\"deleted\"}}," FULL("C", "C", "false")
             "],\"@odata.deltaLink\":\"" LINK "?$deltatoken=1\"}", 3);
    ck_assert_int_eq(msg_num(db, "is_read", "B"), 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE subject = 'B'"), 1);
    ck_assert_str_eq(f->phase, "idle");
    ck_assert_ptr_null(f->next_link);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_sync_folders WHERE next_link IS NULL "
                             "AND delta_link LIKE '%deltatoken=1' AND last_sync_at > 0"), 1);
    /* A replay changes nothing. */
    apply_ok(db, w->acct->id, f, "{\"value\":[" FULL("C", "C", "false") "],"
             "\"@odata.deltaLink\":\"" LINK "?$deltatoken=2\"}", 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE removed = 0"), 3);

    /* Incremental @removed. */
    apply_ok(db, w->acct->id, f, "{\"value\":[{\"id\":\"C\",\"@removed\":{}}],"
             "\"@odata.deltaLink\":\"" LINK "?$deltatoken=3\"}", 1);
    ck_assert_int_eq(msg_num(db, "removed", "C"), 1);

    /* A full resync: what it does not see is removed at its end. */
    ck_assert_int_eq(mso_mirror_restart_folder(db, pool, "me", w->acct->id, f, LINK "?$deltatoken=",
                                               now), APR_SUCCESS);
    ck_assert_int_eq(f->round, 2);
    ck_assert_str_eq(f->phase, "initial");
    apply_ok(db, w->acct->id, f, "{\"value\":[" FULL("A", "A3", "true") "],"
             "\"@odata.nextLink\":\"" LINK "?$skiptoken=9\"}", 1);
    ck_assert_int_eq(msg_num(db, "removed", "B"), 0);      /* not before the round ends */
    apply_ok(db, w->acct->id, f, "{\"value\":[],\"@odata.deltaLink\":\"" LINK
             "?$deltatoken=4\"}", 0);
    ck_assert_int_eq(msg_num(db, "removed", "A"), 0);
    ck_assert_int_eq(msg_num(db, "removed", "B"), 1);
    ck_assert_int_eq(num(db, "SELECT resyncs FROM msoauth_sync_folders"), 1);

    /* Another owner took the lease: nothing is written. */
    exec_ok(db, "UPDATE msoauth_accounts SET work_owner = 'other'");
    ck_assert_int_eq(mso_mirror_apply_page(db, pool, "me", w->acct->id, f, page_of(
        "{\"value\":[" FULL("D", "D", "false") "],\"@odata.deltaLink\":\"" LINK "?d=5\"}"),
        now, &applied, &err), APR_EBUSY);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE graph_id = 'D'"), 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_sync_folders WHERE "
                             "delta_link LIKE '%deltatoken=4'"), 1);
}
END_TEST

/* More rows than a chunk, with values full of SQL and JSON metacharacters. */
START_TEST(mirror_big_page)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now());
    apr_array_header_t *parts = apr_array_make(pool, 130, sizeof(const char *));
    mso_work_t *w;
    mso_folder_t *f;
    int i;

    migrate_ok(db);
    w = leased(db, "big@example.com", now);
    f = inbox_of(db, w->acct->id);
    for (i = 0; i < 120; i++) {
        APR_ARRAY_PUSH(parts, const char *) = apr_psprintf(pool,
            "{\"id\":\"M%d\",\"subject\":\"it's \\\"%d\\\"; DROP TABLE x;--\",\"isRead\":%s,"
            "\"receivedDateTime\":\"2026-11-23T10:%02d:00Z\"}", i, i, i % 2 ? "true" : "false",
            i % 60);
    }
    apply_ok(db, w->acct->id, f, apr_pstrcat(pool, "{\"value\":[",
                                             apr_array_pstrcat(pool, parts, ','),
                                             "],\"@odata.deltaLink\":\"" LINK "?d=1\"}", NULL),
             120);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages"), 120);
    ck_assert_int_eq(num(db, "SELECT SUM(is_read) FROM msoauth_messages"), 60);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE subject = "
                             "'it''s \"77\"; DROP TABLE x;--'"), 1);
}
END_TEST

static mso_action_t *queued_action(mso_db_t *db, apr_int64_t account, const char *graph_id,
                                   const char *action, const char *dest)
{
    apr_array_header_t *list = NULL;
    int i;

    exec_ok(db, apr_psprintf(pool, "INSERT INTO msoauth_actions (account_id, graph_id, action, "
                             "destination) VALUES (%" APR_INT64_T_FMT ", '%s', '%s', %s)",
                             account, graph_id, action,
                             dest ? apr_psprintf(pool, "'%s'", dest) : "NULL"));
    ck_assert_int_eq(mso_mirror_actions(db, pool, account, 100, &list), APR_SUCCESS);
    for (i = 0; i < list->nelts; i++) {
        mso_action_t *a = APR_ARRAY_IDX(list, i, mso_action_t *);

        if (i > 0) {            /* oldest first */
            ck_assert_int_gt(a->id, APR_ARRAY_IDX(list, i - 1, mso_action_t *)->id);
        }
        if (!strcmp(a->graph_id, graph_id) && !strcmp(a->action, action) && !a->attempts) {
            return a;
        }
    }
    ck_abort_msg("queued action not found");
    return NULL;
}

START_TEST(mirror_claims_and_actions)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now());
    apr_array_header_t *works = NULL;
    apr_hash_t *stats = NULL;
    mso_mirror_stats_t *st;
    mso_work_done_t d;
    mso_work_t *w;
    mso_folder_t *f;
    mso_action_t *read, *move, *bad, *later;

    migrate_ok(db);
    w = leased(db, "acts@example.com", now);
    f = inbox_of(db, w->acct->id);
    apply_ok(db, w->acct->id, f, "{\"value\":[" FULL("X", "X", "false") "," FULL("Y", "Y",
             "false") "],\"@odata.deltaLink\":\"" LINK "?d=1\"}", 2);
    /* Leased by "me": nobody else gets it. */
    ck_assert_int_eq(mso_mirror_claim(db, pool, "you", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 0);
    memset(&d, 0, sizeof(d));
    d.sync_due_at = now + 100;
    d.sync_phase = "idle";
    d.last_sync_at = now;
    ck_assert_int_eq(mso_mirror_release(db, pool, w->acct->id, "me", &d, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE work_owner IS NULL "
                             "AND sync_phase = 'idle' AND last_sync_at > 0"), 1);
    /* Not due, no action: nothing to claim. A queued action makes it due. */
    ck_assert_int_eq(mso_mirror_claim(db, pool, "you", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 0);
    read = queued_action(db, w->acct->id, "X", "mark_read", NULL);
    ck_assert_int_eq(mso_mirror_claim(db, pool, "you", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);
    ck_assert_int_eq(APR_ARRAY_IDX(works, 0, mso_work_t *)->queued_actions, 1);
    ck_assert_int_eq(mso_mirror_release(db, pool, w->acct->id, "you", &d, now), APR_SUCCESS);
    /* Throttled, or a token about to expire: it waits. */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET sync_retry_at = %"
                             APR_INT64_T_FMT, now + 30));
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 0);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET sync_retry_at = NULL, "
                             "access_expires_at = %" APR_INT64_T_FMT, now + 30));
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 0);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET access_expires_at = %"
                             APR_INT64_T_FMT, now + 3600));
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);

    /* sending, then done: the mirror row follows in the same transaction. */
    ck_assert_int_eq(mso_mirror_action_sending(db, pool, "me", read, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT attempts FROM msoauth_actions WHERE "
                                          "id = %" APR_INT64_T_FMT " AND sent_at = %"
                                          APR_INT64_T_FMT, read->id, now)), 1);
    ck_assert_int_eq(mso_mirror_action_done(db, pool, "me", read, NULL, 0, now), APR_SUCCESS);
    ck_assert_int_eq(msg_num(db, "is_read", "X"), 1);
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_actions WHERE "
                                          "id = %" APR_INT64_T_FMT " AND state = 'done' AND "
                                          "sent_at IS NULL", read->id)), 1);
    /* Done twice is refused: it is no longer queued. */
    ck_assert_int_eq(mso_mirror_action_done(db, pool, "me", read, NULL, 0, now), APR_EBUSY);

    move = queued_action(db, w->acct->id, "Y", "move", "archive");
    ck_assert_int_eq(mso_mirror_action_done(db, pool, "me", move, "archive", 1, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE graph_id = 'Y' AND "
                             "folder = 'archive' AND removed = 1"), 1);

    bad = queued_action(db, w->acct->id, "Q", "mark_read", NULL);
    ck_assert_int_eq(mso_mirror_action_failed(db, pool, "me", bad, "not_found", "gone", now),
                     APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_actions WHERE state = 'failed' AND "
                             "reason = 'not_found' AND last_error = 'gone'"), 1);

    later = queued_action(db, w->acct->id, "X", "mark_unread", NULL);
    ck_assert_int_eq(mso_mirror_action_later(db, pool, "me", later, "503", 1, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_actions WHERE "
                                          "id = %" APR_INT64_T_FMT " AND state = 'queued' AND "
                                          "sent_at IS NOT NULL", later->id)), 1);
    ck_assert_int_eq(mso_mirror_action_later(db, pool, "me", later, "429", 0, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_actions WHERE "
                                          "id = %" APR_INT64_T_FMT " AND sent_at IS NULL",
                                          later->id)), 1);
    /* Without the lease nothing is recorded. */
    ck_assert_int_eq(mso_mirror_action_done(db, pool, "other", later, NULL, 0, now), APR_EBUSY);

    ck_assert_int_eq(mso_mirror_stats(db, pool, &stats), APR_SUCCESS);
    st = apr_hash_get(stats, apr_psprintf(pool, "%" APR_INT64_T_FMT, w->acct->id),
                      APR_HASH_KEY_STRING);
    ck_assert_ptr_nonnull(st);
    ck_assert_int_eq(st->messages, 1);          /* Y left the mirror */
    ck_assert_int_eq(st->queued, 1);
    ck_assert_int_eq(st->failed, 1);
    ck_assert_int_gt(st->oldest_queued_at, 0);

    /* Sync now: due at once; a backoff goes, a Retry-After stays. */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET sync_due_at = %" APR_INT64_T_FMT
                             ", sync_retry_at = %" APR_INT64_T_FMT ", sync_phase = 'idle'",
                             now + 60, now + 60));
    ck_assert_int_eq(mso_mirror_sync_now(db, pool, w->acct->id), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE sync_due_at = 0 AND "
                             "sync_retry_at IS NULL"), 1);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET sync_retry_at = %"
                             APR_INT64_T_FMT ", sync_phase = 'throttled'", now + 60));
    ck_assert_int_eq(mso_mirror_sync_now(db, pool, w->acct->id), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE sync_retry_at > 0"),
                     1);
    ck_assert_int_eq(mso_mirror_sync_now(db, pool, 999999), APR_NOTFOUND);
}
END_TEST

/* Trust fix: whether a body was cut is stored, and partial updates keep it
 * unless they carry a body. */
START_TEST(mirror_body_truncated)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now());
    mso_graph_page_t *page;
    mso_work_t *w;
    mso_folder_t *f;
    const char *err = NULL;
    int applied = 0;

    migrate_ok(db);
    w = leased(db, "big@example.com", now);
    f = inbox_of(db, w->acct->id);
    page = page_of("{\"value\":[" FULL("T", "T", "false") "," FULL("K", "K", "false")
                   "],\"@odata.nextLink\":\"" LINK "?$skiptoken=1\"}");
    ck_assert_int_le(APR_ARRAY_IDX(page->items, 0, mso_graph_msg_t).body_truncated, 0);
    APR_ARRAY_IDX(page->items, 0, mso_graph_msg_t).body_truncated = 1;
    ck_assert_int_eq(mso_mirror_apply_page(db, pool, "me", w->acct->id, f, page, now, &applied,
                                           &err), APR_SUCCESS);
    ck_assert_int_eq(msg_num(db, "body_truncated", "T"), 1);
    ck_assert_int_eq(msg_num(db, "body_truncated", "K"), 0);

    /* A change without a body leaves the flag; a new body sets it again. */
    page = page_of("{\"value\":[{\"id\":\"T\",\"isRead\":true}],"
                   "\"@odata.nextLink\":\"" LINK "?$skiptoken=2\"}");
    ck_assert_int_eq(APR_ARRAY_IDX(page->items, 0, mso_graph_msg_t).body_truncated, -1);
    ck_assert_int_eq(mso_mirror_apply_page(db, pool, "me", w->acct->id, f, page, now, &applied,
                                           &err), APR_SUCCESS);
    ck_assert_int_eq(msg_num(db, "body_truncated", "T"), 1);
    ck_assert_int_eq(msg_num(db, "is_read", "T"), 1);
    page = page_of("{\"value\":[{\"id\":\"T\",\"body\":{\"contentType\":\"text\","
                   "\"content\":\"short now\"}},{\"id\":\"K\",\"isRead\":true}],"
                   "\"@odata.nextLink\":\"" LINK "?$skiptoken=3\"}");
    APR_ARRAY_IDX(page->items, 1, mso_graph_msg_t).body_truncated = 1;
    ck_assert_int_eq(mso_mirror_apply_page(db, pool, "me", w->acct->id, f, page, now, &applied,
                                           &err), APR_SUCCESS);
    ck_assert_int_eq(msg_num(db, "body_truncated", "T"), 0);
    ck_assert_int_eq(msg_num(db, "body_truncated", "K"), 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE graph_id = 'T' AND "
                             "body = 'short now'"), 1);
}
END_TEST

/* Pages of every size from 1 to 100 new messages: every row stored, and on
 * PostgreSQL the connection holds at most eight upserts (100 and the powers
 * of two below it), not one per size. */
START_TEST(mirror_pages_of_every_size)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now());
    mso_work_t *w;
    mso_folder_t *f;
    int size, i, id = 0;

    migrate_ok(db);
    w = leased(db, "sizes@example.com", now);
    f = inbox_of(db, w->acct->id);
    for (size = 1; size <= 100; size++) {
        apr_array_header_t *parts = apr_array_make(pool, size, sizeof(const char *));

        for (i = 0; i < size; i++, id++) {
            APR_ARRAY_PUSH(parts, const char *) = apr_psprintf(pool,
                "{\"id\":\"S%d\",\"subject\":\"%d of %d\",\"isRead\":true,"
                "\"receivedDateTime\":\"2026-11-23T10:00:00Z\"}", id, i, size);
        }
        apply_ok(db, w->acct->id, f, apr_pstrcat(pool, "{\"value\":[",
                                                 apr_array_pstrcat(pool, parts, ','),
                                                 "],\"@odata.nextLink\":\"" LINK "?n=1\"}", NULL),
                 size);
    }
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages"), 5050);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE subject = '63 of 64'"), 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE subject = '98 of 99'"), 1);
    if (_i == BACKEND_PGSQL) {
        long long upserts = num(db, "SELECT COUNT(*) FROM pg_prepared_statements WHERE "
                                    "statement LIKE '%INSERT INTO msoauth_messages%'");

        ck_assert_msg(upserts >= 7 && upserts <= 8, "%lld upserts prepared", upserts);
    }
}
END_TEST

static void add_tests(TCase *tc, int backend)
{
    ADD_BOTH(tc, mirror_pages, backend);
    ADD_BOTH(tc, mirror_big_page, backend);
    ADD_BOTH(tc, mirror_pages_of_every_size, backend);
    ADD_BOTH(tc, mirror_claims_and_actions, backend);
    ADD_BOTH(tc, mirror_body_truncated, backend);
}

int main(void)
{
    return dbtest_main("mirror", add_tests);
}
