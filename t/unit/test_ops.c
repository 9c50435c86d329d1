/* Operations on SQLite and PostgreSQL: an account's error history
 * (lib/mso_events), the job's counters (lib/mso_counters), the retention
 * sweep (lib/mso_retention) and the metrics (lib/mso_metrics: the model read
 * from the tables, and its text exposition). */
#include "dbtest.h"

#include <stdio.h>
#include <string.h>

#include <apr_strings.h>
#include <apr_time.h>

#include "mso_counters.h"
#include "mso_events.h"
#include "mso_job_runs.h"
#include "mso_metrics.h"
#include "mso_mirror.h"
#include "mso_retention.h"

static mso_account_t *account(mso_db_t *db, const char *company, const char *mailbox,
                              apr_int64_t now)
{
    mso_connect_t c = sample(company, mailbox, apr_pstrcat(pool, "oid-", mailbox, NULL));

    c.refresh_due_at = now - 10;
    c.access_expires_at = now + 3600;
    return connect_ok(db, &c, "sealed-r", "sealed-a", now);
}

static void lease(mso_db_t *db, apr_int64_t id, const char *owner, apr_int64_t now)
{
    ck_assert_int_eq(mso_account_lease(db, pool, id, owner, now, 60), APR_SUCCESS);
}

static apr_array_header_t *events_of(mso_db_t *db, apr_int64_t id)
{
    apr_array_header_t *ev = NULL;

    ck_assert_int_eq(mso_events_list(db, pool, id, &ev), APR_SUCCESS);
    return ev;
}

#define EV(ev, i) (&APR_ARRAY_IDX(ev, i, mso_event_t))

START_TEST(history_of_refresh_errors)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t *a, *b;
    apr_array_header_t *ev;
    int k;

    migrate_ok(db);
    a = account(db, "default", "alice@example.com", 1000);
    b = account(db, "default", "bob@example.com", 1000);

    lease(db, a->id, "A", 1001);
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "A", "connected",
                                                "token_endpoint_unreachable", 0,
                                                "the token endpoint answered HTTP 503", 1500,
                                                1001), APR_SUCCESS);
    ev = events_of(db, a->id);
    ck_assert_int_eq(ev->nelts, 1);
    ck_assert_int_eq(EV(ev, 0)->at, 1001);
    ck_assert_str_eq(EV(ev, 0)->reason, "token_endpoint_unreachable");
    ck_assert_str_eq(EV(ev, 0)->text, "the token endpoint answered HTTP 503");

    /* Not recorded by someone without the lease: no event either. */
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "B", "reconnect_required",
                                                "reconnect_required", 700082, "x", 0, 1002),
                     APR_EBUSY);
    ck_assert_int_eq(events_of(db, a->id)->nelts, 1);

    /* 25 more: the newest 20 stay, newest first; bob's are his own. */
    for (k = 0; k < 25; k++) {
        lease(db, a->id, "A", 2000 + k);
        ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "A", "connected",
                                                    "token_endpoint_unreachable", 0,
                                                    apr_psprintf(pool, "failure %d", k), 0,
                                                    2000 + k), APR_SUCCESS);
    }
    lease(db, b->id, "A", 3000);
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, b->id, "A", "reconnect_required",
                                                "reconnect_required", 700082,
                                                "the grant expired", 0, 3000), APR_SUCCESS);
    ev = events_of(db, a->id);
    ck_assert_int_eq(ev->nelts, MSO_EVENTS_KEEP);
    ck_assert_str_eq(EV(ev, 0)->text, "failure 24");
    ck_assert_str_eq(EV(ev, MSO_EVENTS_KEEP - 1)->text, "failure 5");
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_account_events "
                                          "WHERE account_id = %" APR_INT64_T_FMT, a->id)),
                     MSO_EVENTS_KEEP);
    ev = events_of(db, b->id);
    ck_assert_int_eq(ev->nelts, 1);
    ck_assert_str_eq(EV(ev, 0)->reason, "reconnect_required");
    /* All accounts at once: by account, newest first. */
    ck_assert_int_eq(mso_events_list(db, pool, 0, &ev), APR_SUCCESS);
    ck_assert_int_eq(ev->nelts, MSO_EVENTS_KEEP + 1);
    ck_assert_int_eq(EV(ev, 0)->account_id, a->id);
    ck_assert_int_eq(EV(ev, MSO_EVENTS_KEEP)->account_id, b->id);
    /* They go with their account. */
    exec_ok(db, apr_psprintf(pool, "DELETE FROM msoauth_accounts WHERE id = %" APR_INT64_T_FMT,
                             b->id));
    ck_assert_int_eq(events_of(db, b->id)->nelts, 0);
}
END_TEST

START_TEST(history_of_sync_errors)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = apr_time_sec(apr_time_now());
    apr_array_header_t *works = NULL, *ev;
    mso_work_done_t d;
    mso_account_t *a;
    mso_connect_t c;

    migrate_ok(db);
    c = sample("default", "carol@example.com", "oid-carol");
    c.access_expires_at = now + 3600;
    c.refresh_due_at = now + 3000;
    a = connect_ok(db, &c, "sealed-r", "sealed-a", now);

    /* A pass without an error leaves no event. */
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);
    memset(&d, 0, sizeof(d));
    d.sync_due_at = now;
    d.sync_phase = "initial";
    ck_assert_int_eq(mso_mirror_release(db, pool, a->id, "me", &d, now), APR_SUCCESS);
    ck_assert_int_eq(events_of(db, a->id)->nelts, 0);

    /* Throttled, then a Graph error. */
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    d.sync_phase = "throttled";
    d.sync_error = "Graph is throttling this mailbox; waiting 30 s as asked";
    d.sync_retry_at = now;
    ck_assert_int_eq(mso_mirror_release(db, pool, a->id, "me", &d, now), APR_SUCCESS);
    ck_assert_int_eq(mso_mirror_claim(db, pool, "me", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);
    d.sync_phase = "initial";
    d.sync_error = "Graph answered HTTP 500";
    ck_assert_int_eq(mso_mirror_release(db, pool, a->id, "me", &d, now + 1), APR_SUCCESS);
    ev = events_of(db, a->id);
    ck_assert_int_eq(ev->nelts, 2);
    ck_assert_str_eq(EV(ev, 0)->reason, "graph_error");
    ck_assert_str_eq(EV(ev, 0)->text, "Graph answered HTTP 500");
    ck_assert_str_eq(EV(ev, 1)->reason, "throttled");
    ck_assert_str_eq(text_of(db, "SELECT sync_error FROM msoauth_accounts"),
                     "Graph answered HTTP 500");

    /* Without the lease: neither the account nor its history changes. */
    ck_assert_int_eq(mso_mirror_release(db, pool, a->id, "other", &d, now + 2), APR_SUCCESS);
    ck_assert_int_eq(events_of(db, a->id)->nelts, 2);
}
END_TEST

START_TEST(counters_add_up)
{
    mso_db_t *db = fresh_db(_i);
    mso_counter_t c[] = {{"refreshes", "refreshed", 3}, {"refreshes", "transient", 0},
                         {"graph_pages", NULL, 7}};
    apr_array_header_t *rows = NULL;
    mso_counter_row_t *r;

    migrate_ok(db);
    ck_assert_int_eq(mso_counters_add(db, pool, "node1", c, 3, 100), APR_SUCCESS);
    c[0].value = 2;
    c[1].value = 1;
    ck_assert_int_eq(mso_counters_add(db, pool, "node1", c, 3, 101), APR_SUCCESS);
    ck_assert_int_eq(mso_counters_add(db, pool, "node2", c, 1, 101), APR_SUCCESS);
    c[0].value = c[1].value = c[2].value = 0;
    ck_assert_int_eq(mso_counters_add(db, pool, "node3", c, 3, 102), APR_SUCCESS);
    ck_assert_int_eq(mso_counters_add(db, pool, NULL, c, 3, 102), APR_EINVAL);

    ck_assert_int_eq(mso_counters_list(db, pool, &rows), APR_SUCCESS);
    ck_assert_int_eq(rows->nelts, 4);           /* node3 wrote nothing */
    r = &APR_ARRAY_IDX(rows, 0, mso_counter_row_t);
    ck_assert_str_eq(r->metric, "graph_pages");
    ck_assert_str_eq(r->label, "");
    ck_assert_int_eq(r->value, 14);
    r = &APR_ARRAY_IDX(rows, 1, mso_counter_row_t);
    ck_assert_str_eq(r->metric, "refreshes");
    ck_assert_str_eq(r->label, "refreshed");
    ck_assert_str_eq(r->node, "node1");
    ck_assert_int_eq(r->value, 5);
    r = &APR_ARRAY_IDX(rows, 2, mso_counter_row_t);
    ck_assert_str_eq(r->node, "node2");
    ck_assert_int_eq(r->value, 2);
    r = &APR_ARRAY_IDX(rows, 3, mso_counter_row_t);
    ck_assert_str_eq(r->label, "transient");
    ck_assert_int_eq(r->value, 1);
}
END_TEST

static void add_message(mso_db_t *db, apr_int64_t account, int k, int removed,
                        apr_int64_t updated)
{
    exec_ok(db, apr_psprintf(pool, "INSERT INTO msoauth_messages (account_id, graph_id, folder, "
                             "removed, updated_at) VALUES (%" APR_INT64_T_FMT ", 'm%d-%d', "
                             "'inbox', %d, %" APR_INT64_T_FMT ")", account, k, removed,
                             removed, updated));
}

static void add_action(mso_db_t *db, apr_int64_t account, const char *state,
                       apr_int64_t updated)
{
    exec_ok(db, apr_psprintf(pool, "INSERT INTO msoauth_actions (account_id, graph_id, action, "
                             "state, created_at, updated_at) VALUES (%" APR_INT64_T_FMT
                             ", 'g', 'mark_read', '%s', %" APR_INT64_T_FMT ", %"
                             APR_INT64_T_FMT ")", account, state, updated, updated));
}

static void add_outbox(mso_db_t *db, apr_int64_t account, const char *state,
                       apr_int64_t sent_at)
{
    exec_ok(db, apr_psprintf(pool, "INSERT INTO msoauth_outbox (account_id, to_json, subject, "
                             "state, sent_at, created_at, updated_at) VALUES (%" APR_INT64_T_FMT
                             ", '[\"x@example.com\"]', 's', '%s', %" APR_INT64_T_FMT ", 1, 1)",
                             account, state, sent_at));
}

START_TEST(retention_sweep)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = 100 * 86400, old = now - 31 * 86400, recent = now - 29 * 86400;
    apr_int64_t deleted[4] = {-1, -1, -1, -1};
    const mso_purge_t *list = mso_retention_list();
    const char *err = NULL;
    mso_account_t *a;
    int k, finished = -1;

    migrate_ok(db);
    ck_assert_str_eq(list[0].name, "actions");
    ck_assert_str_eq(list[1].name, "messages");
    ck_assert_str_eq(list[2].name, "outbox");
    ck_assert_ptr_null(list[3].what);
    a = account(db, "default", "dave@example.com", now);
    /* More than two batches of old done actions and removed messages. */
    exec_ok(db, "BEGIN");
    for (k = 0; k < 2 * MSO_RETENTION_BATCH + 7; k++) {
        add_action(db, a->id, "done", old - k);
        add_message(db, a->id, k, 1, old - k);
        add_outbox(db, a->id, "sent", old - k);
    }
    exec_ok(db, "INSERT INTO msoauth_outbox_attachments (outbox_id, name, content_type) "
                "VALUES ((SELECT MIN(id) FROM msoauth_outbox), 'a.txt', 'text/plain')");
    exec_ok(db, "COMMIT");
    /* Sent mail that stays: recent; failed and queued rows however old. */
    add_outbox(db, a->id, "sent", recent);
    add_outbox(db, a->id, "failed", old);
    add_outbox(db, a->id, "queued", 0);
    /* What stays: recent ones, queued and failed actions however old,
     * messages not removed however old. */
    add_action(db, a->id, "done", recent);
    add_action(db, a->id, "queued", old);
    add_action(db, a->id, "failed", old);
    add_message(db, a->id, 100000, 1, recent);
    add_message(db, a->id, 100001, 0, old);

    /* 0 keeps everything. */
    ck_assert_int_eq(mso_retention_sweep(db, pool, 0, now, apr_time_now() + apr_time_from_sec(60),
                                         deleted, &finished, &err), APR_SUCCESS);
    ck_assert_int_eq(finished, 1);
    ck_assert_int_eq(deleted[0], 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_actions"),
                     2 * MSO_RETENTION_BATCH + 10);
    /* A deadline already passed does nothing and says so. */
    ck_assert_int_eq(mso_retention_sweep(db, pool, 30, now, apr_time_now() - 1, deleted,
                                         &finished, &err), APR_SUCCESS);
    ck_assert_int_eq(finished, 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages"),
                     2 * MSO_RETENTION_BATCH + 9);

    ck_assert_int_eq(mso_retention_sweep(db, pool, 30, now,
                                         apr_time_now() + apr_time_from_sec(60), deleted,
                                         &finished, &err), APR_SUCCESS);
    ck_assert_ptr_null(err);
    ck_assert_int_eq(finished, 1);
    ck_assert_int_eq(deleted[0], 2 * MSO_RETENTION_BATCH + 7);
    ck_assert_int_eq(deleted[1], 2 * MSO_RETENTION_BATCH + 7);
    ck_assert_int_eq(deleted[2], 2 * MSO_RETENTION_BATCH + 7);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox"), 3);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox WHERE state = 'sent'"), 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_outbox_attachments"), 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_actions"), 3);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_actions WHERE state = 'done'"), 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages"), 2);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE removed = 0"), 1);
    /* Again: nothing left to do. */
    ck_assert_int_eq(mso_retention_sweep(db, pool, 30, now,
                                         apr_time_now() + apr_time_from_sec(60), deleted,
                                         &finished, &err), APR_SUCCESS);
    ck_assert_int_eq(deleted[0] + deleted[1] + deleted[2], 0);
}
END_TEST

/* ---- rekey ---------------------------------------------------------------- */

static mso_keyring_t *ring(const char *first, const char *second)
{
    mso_keyring_t *kr = mso_keyring_create(pool);
    unsigned char key[MSO_KEY_LEN];
    const char *why = NULL;

    ck_assert_int_eq(mso_key_parse((const unsigned char *)first, strlen(first), key, &why),
                     APR_SUCCESS);
    ck_assert_int_eq(mso_keyring_add(kr, key), APR_SUCCESS);
    if (second) {
        ck_assert_int_eq(mso_key_parse((const unsigned char *)second, strlen(second), key,
                                       &why), APR_SUCCESS);
        ck_assert_int_eq(mso_keyring_add(kr, key), APR_SUCCESS);
    }
    return kr;
}

#define K1 "1111111111111111111111111111111111111111111111111111111111111111"
#define K2 "2222222222222222222222222222222222222222222222222222222222222222"
#define K3 "3333333333333333333333333333333333333333333333333333333333333333"

static mso_account_t *sealed_account(mso_db_t *db, mso_keyring_t *kr, const char *mailbox)
{
    mso_connect_t c = sample("default", mailbox, apr_pstrcat(pool, "oid-", mailbox, NULL));
    mso_token_sealer_t t;
    mso_account_t *a = NULL;
    const char *err = NULL;

    t.p = pool;
    t.keyring = kr;
    t.client_id = c.client_id;
    t.refresh_token = apr_pstrcat(pool, "refresh-of-", mailbox, NULL);
    t.access_token = apr_pstrcat(pool, "access-of-", mailbox, NULL);
    ck_assert_int_eq(mso_account_connect(db, pool, &c, mso_account_seal_tokens, &t, 1000, &a,
                                         &err), APR_SUCCESS);
    return a;
}

START_TEST(rekey_under_the_first_key)
{
    mso_db_t *db = fresh_db(_i);
    mso_keyring_t *old = ring(K1, NULL), *both = ring(K2, K1), *only_new = ring(K2, NULL);
    apr_array_header_t *tokens = NULL;
    mso_account_t *a, *b, *lost;
    const char *plain = NULL, *legacy = NULL;
    mso_rekey_t n;
    int i;

    migrate_ok(db);
    a = sealed_account(db, old, "ann@example.com");
    b = sealed_account(db, both, "ben@example.com");         /* already under K2 */
    lost = sealed_account(db, ring(K3, NULL), "lou@example.com");
    /* A token of binding 1 (before schema version 4), under K1. */
    ck_assert_int_eq(mso_seal(pool, old, MSO_PURPOSE_TOKEN,
                              "token:refresh:default:ann@example.com", "legacy-refresh", 14,
                              &legacy), APR_SUCCESS);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_tokens SET sealed = '%s', binding = 1 "
                             "WHERE account_id = %" APR_INT64_T_FMT " AND kind = 'refresh'",
                             legacy, a->id));

    ck_assert_int_eq(mso_account_rekey(db, pool, both, &n), APR_SUCCESS);
    ck_assert_int_eq(n.tokens, 6);
    ck_assert_int_eq(n.resealed, 2);
    ck_assert_int_eq(n.current, 2);
    ck_assert_int_eq(n.unopened, 2);
    ck_assert_int_eq(n.changed + n.gone + n.failed, 0);

    /* Every token that opened now opens with the new key alone. */
    ck_assert_int_eq(mso_account_token_open(db, pool, only_new, a, "graph", &plain, NULL),
                     APR_SUCCESS);
    ck_assert_str_eq(plain, "access-of-ann@example.com");
    ck_assert_int_eq(mso_account_token_open(db, pool, only_new, b, "refresh", &plain, NULL),
                     APR_SUCCESS);
    ck_assert_str_eq(plain, "refresh-of-ben@example.com");
    ck_assert_int_eq(mso_account_token_open(db, pool, only_new, lost, "refresh", &plain, NULL),
                     APR_EINVAL);
    /* The binding-1 token keeps its binding, sealed under K2 for the same data. */
    ck_assert_int_eq(mso_account_tokens(db, pool, a->id, &tokens), APR_SUCCESS);
    ck_assert_int_eq(tokens->nelts, 2);
    for (i = 0; i < tokens->nelts; i++) {
        mso_token_info_t *t = &APR_ARRAY_IDX(tokens, i, mso_token_info_t);

        ck_assert_str_eq(t->kid, mso_keyring_kid(only_new, 0));
        ck_assert_int_eq(t->binding, strcmp(t->kind, "refresh") ? 2 : 1);
    }
    {
        unsigned char *out = NULL;
        apr_size_t len = 0;

        ck_assert_int_eq(mso_open(pool, only_new, MSO_PURPOSE_TOKEN,
                                  "token:refresh:default:ann@example.com",
                                  text_of(db, apr_psprintf(pool, "SELECT sealed FROM "
                                                           "msoauth_tokens WHERE account_id = %"
                                                           APR_INT64_T_FMT " AND kind = "
                                                           "'refresh'", a->id)), &out, &len),
                         APR_SUCCESS);
        ck_assert_str_eq((const char *)out, "legacy-refresh");
    }
    /* Again: nothing left to do but the tokens no key opens. */
    ck_assert_int_eq(mso_account_rekey(db, pool, both, &n), APR_SUCCESS);
    ck_assert_int_eq(n.current, 4);
    ck_assert_int_eq(n.resealed, 0);
    ck_assert_int_eq(n.unopened, 2);
    ck_assert_int_eq(mso_account_rekey(db, pool, mso_keyring_create(pool), &n), APR_EINVAL);
}
END_TEST

/* ---- metrics ------------------------------------------------------------- */

static int only_default(void *baton, const char *company, const char *client_id)
{
    return !strcmp(company, "default") || !strcmp(company, "acme");
}

static const char *render(mso_metrics_t *m)
{
    return mso_metrics_render(pool, m);
}

static void has_line(const char *text, const char *line)
{
    if (!strstr(text, apr_pstrcat(pool, line, "\n", NULL))) {
        fprintf(stderr, "--- metrics ---\n%s---\n", text);
    }
    ck_assert_msg(strstr(text, apr_pstrcat(pool, "\n", line, "\n", NULL)) != NULL
                  || !strncmp(text, apr_pstrcat(pool, line, "\n", NULL), strlen(line) + 1),
                  "missing line '%s' in:\n%s", line, text);
}

START_TEST(metrics_from_the_tables)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t now = 1700000000;
    apr_array_header_t *companies = apr_array_make(pool, 3, sizeof(const char *));
    mso_counter_t c[] = {{"refreshes", "refreshed", 4}, {"refreshes", "reconnect", 1},
                         {"graph_messages", NULL, 120}, {"not_known", "x", 9}};
    mso_job_run_t run;
    mso_metrics_t *m = mso_metrics_make(pool);
    mso_account_t *a, *b;
    const char *text;

    migrate_ok(db);
    APR_ARRAY_PUSH(companies, const char *) = "default";
    APR_ARRAY_PUSH(companies, const char *) = "acme";
    a = account(db, "default", "erin@example.com", now - 500);
    b = account(db, "default", "frank@example.com", now - 400);
    account(db, "other", "gina@example.com", now - 400);   /* another vhost's */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET last_sync_at = %"
                             APR_INT64_T_FMT " WHERE id = %" APR_INT64_T_FMT, now - 90, a->id));
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET last_sync_at = %"
                             APR_INT64_T_FMT " WHERE id = %" APR_INT64_T_FMT, now - 30, b->id));
    account(db, "default", "hank@example.com", now - 100);
    exec_ok(db, "UPDATE msoauth_accounts SET state = 'reconnect_required' "
                "WHERE mailbox = 'hank@example.com'");
    add_action(db, a->id, "queued", now - 50);
    add_action(db, b->id, "queued", now - 20);
    add_action(db, a->id, "failed", now - 20);
    add_action(db, a->id, "done", now - 20);
    add_outbox(db, a->id, "queued", 0);
    add_outbox(db, b->id, "queued", 0);
    add_outbox(db, a->id, "failed", 0);
    add_outbox(db, a->id, "sent", now - 5);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_outbox SET created_at = %" APR_INT64_T_FMT
                             " - 10 * id", now));
    ck_assert_int_eq(mso_counters_add(db, pool, "nodeA", c, 4, now), APR_SUCCESS);
    memset(&run, 0, sizeof(run));
    run.node = "nodeA:123:old";
    run.last_cycle_at = now - 100;
    run.cycle_ms = 900;
    ck_assert_int_eq(mso_job_runs_record(db, pool, &run), APR_SUCCESS);
    run.node = "nodeA:456:new";
    run.last_cycle_at = now - 2;
    run.cycle_ms = 250;
    ck_assert_int_eq(mso_job_runs_record(db, pool, &run), APR_SUCCESS);

    ck_assert_int_eq(mso_metrics_collect(db, pool, now, only_default, NULL, companies, m),
                     APR_SUCCESS);
    text = render(m);
    has_line(text, "# TYPE msoauth_accounts gauge");
    has_line(text, "msoauth_accounts{company=\"default\",state=\"connected\"} 2");
    has_line(text, "msoauth_accounts{company=\"default\",state=\"reconnect_required\"} 1");
    has_line(text, "msoauth_accounts{company=\"default\",state=\"disconnected\"} 0");
    has_line(text, "msoauth_accounts{company=\"acme\",state=\"connected\"} 0");
    ck_assert_ptr_null(strstr(text, "company=\"other\""));
    has_line(text, "msoauth_actions{company=\"default\",state=\"queued\"} 2");
    has_line(text, "msoauth_actions{company=\"default\",state=\"failed\"} 1");
    has_line(text, "msoauth_actions{company=\"acme\",state=\"queued\"} 0");
    has_line(text, "msoauth_actions_oldest_queued_seconds{company=\"default\"} 50");
    has_line(text, "msoauth_actions_oldest_queued_seconds{company=\"acme\"} 0");
    has_line(text, "msoauth_outbox{company=\"default\",state=\"queued\"} 2");
    has_line(text, "msoauth_outbox{company=\"default\",state=\"failed\"} 1");
    has_line(text, "msoauth_outbox{company=\"acme\",state=\"failed\"} 0");
    ck_assert_ptr_null(strstr(text, "state=\"sent\""));
    /* created 10 s x id ago: the older queued row is id 2, the failed one
     * (id 3, older still) does not count */
    has_line(text, "msoauth_outbox_oldest_queued_seconds{company=\"default\"} 20");
    has_line(text, "msoauth_outbox_oldest_queued_seconds{company=\"acme\"} 0");
    /* erin synced 90 s ago, frank 30 s ago; hank is not connected */
    has_line(text, "msoauth_sync_lag_seconds{company=\"default\"} 90");
    has_line(text, "# TYPE msoauth_refreshes_total counter");
    has_line(text, "msoauth_refreshes_total{node=\"nodeA\",outcome=\"refreshed\"} 4");
    has_line(text, "msoauth_refreshes_total{node=\"nodeA\",outcome=\"reconnect\"} 1");
    has_line(text, "msoauth_graph_messages_total{node=\"nodeA\"} 120");
    ck_assert_ptr_null(strstr(text, "not_known"));
    has_line(text, "msoauth_job_cycle_seconds{node=\"nodeA\"} 0.25");
    has_line(text, "msoauth_job_last_cycle_age_seconds{node=\"nodeA\"} 2");
    /* No mailbox in any label, nor anywhere else. */
    ck_assert_ptr_null(strstr(text, "@"));
}
END_TEST

START_TEST(metrics_text_exposition)
{
    mso_metrics_t *m = mso_metrics_make(pool);
    mso_metric_family_t *f;
    const char *text;

    f = mso_metrics_family(m, "msoauth_test_total", MSO_METRIC_COUNTER,
                           "A help with a \\ backslash\nand a newline \"quoted\"");
    mso_metrics_set(f, 3, "a", "plain", "b", "quote \" back \\ nl \n end", NULL);
    mso_metrics_add(f, 2, "a", "plain", "b", "quote \" back \\ nl \n end", NULL);
    mso_metrics_set(f, 1.5, NULL);
    f = mso_metrics_family(m, "msoauth_info", MSO_METRIC_GAUGE, "Version");
    mso_metrics_set(f, 1, "version", "0.1.0", NULL);
    /* The same family again is the same family. */
    ck_assert_ptr_eq(mso_metrics_family(m, "msoauth_info", MSO_METRIC_GAUGE, "x"), f);
    mso_metrics_set(mso_metrics_family(m, "msoauth_big", MSO_METRIC_GAUGE, "b"), 1e20, NULL);
    mso_metrics_set(mso_metrics_family(m, "msoauth_neg", MSO_METRIC_GAUGE, "n"), -7, NULL);
    mso_metrics_set(mso_metrics_family(m, "msoauth_frac", MSO_METRIC_GAUGE, "f"), 0.1, NULL);

    text = render(m);
    if (strncmp(text, "# HELP msoauth_test_total A help with a \\\\ b", 20)) {
        fprintf(stderr, "--- metrics ---\n%s---\n", text);
    }
    ck_assert_str_eq(text,
        "# HELP msoauth_test_total A help with a \\\\ backslash\\nand a newline \"quoted\"\n"
        "# TYPE msoauth_test_total counter\n"
        "msoauth_test_total{a=\"plain\",b=\"quote \\\" back \\\\ nl \\n end\"} 5\n"
        "msoauth_test_total 1.5\n"
        "# HELP msoauth_info Version\n"
        "# TYPE msoauth_info gauge\n"
        "msoauth_info{version=\"0.1.0\"} 1\n"
        "# HELP msoauth_big b\n"
        "# TYPE msoauth_big gauge\n"
        "msoauth_big 1e+20\n"
        "# HELP msoauth_neg n\n"
        "# TYPE msoauth_neg gauge\n"
        "msoauth_neg -7\n"
        "# HELP msoauth_frac f\n"
        "# TYPE msoauth_frac gauge\n"
        "msoauth_frac 0.1\n");
    /* Nothing collected, nothing rendered. */
    ck_assert_str_eq(render(mso_metrics_make(pool)), "");
}
END_TEST

static void add_tests(TCase *tc, int backend)
{
    ADD_BOTH(tc, history_of_refresh_errors, backend);
    ADD_BOTH(tc, history_of_sync_errors, backend);
    ADD_BOTH(tc, counters_add_up, backend);
    ADD_BOTH(tc, retention_sweep, backend);
    ADD_BOTH(tc, rekey_under_the_first_key, backend);
    ADD_BOTH(tc, metrics_from_the_tables, backend);
    if (backend == BACKEND_SQLITE) {
        tcase_add_test(tc, metrics_text_exposition);
    }
}

int main(void)
{
    return dbtest_main("ops", add_tests);
}
