/* Accounts, tokens and leases (lib/mso_account), spent sign-in states
 * (lib/mso_flows_used) and the job's health (lib/mso_job_runs) against real
 * databases. */
#include "dbtest.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <apr_strings.h>

#include "mso_crypto.h"
#include "mso_flows_used.h"
#include "mso_job_runs.h"

#define ALICE "11111111-2222-3333-4444-555555555555"
#define BOB "22222222-3333-4444-5555-666666666666"
#define EVE "66666666-3333-4444-5555-666666666666"

static int count_of(mso_db_t *db, const char *table)
{
    return (int)num(db, apr_pstrcat(pool, "SELECT COUNT(*) FROM ", table, NULL));
}

START_TEST(connect_insert_then_update)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t a = sample("default", "Alice@Example.COM", ALICE), b;
    mso_account_t *got, *again;
    apr_int64_t first_id, big = APR_INT64_C(5000000000);
    const void *args[1];

    migrate_ok(db);
    a.access_expires_at = big;      /* does not fit 32 bits */
    got = connect_ok(db, &a, "sealed-refresh-1", "sealed-access-1", 1700000000);
    first_id = got->id;
    ck_assert_str_eq(got->state, "connected");

    got = get_ok(db, first_id);
    ck_assert_int_eq(got->id, first_id);
    ck_assert_str_eq(got->company, "default");
    ck_assert_str_eq(got->kind, "delegated");
    ck_assert_str_eq(got->client_id, "6731de76-14a6-49ae-97bc-6eba6914391e");
    ck_assert_str_eq(got->mailbox, "alice@example.com");
    ck_assert_str_eq(got->display_name, "Alice Example");
    ck_assert_str_eq(got->tenant_id, "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a");
    ck_assert_str_eq(got->object_id, ALICE);
    ck_assert_str_eq(got->scopes, "openid profile email offline_access Mail.Read");
    ck_assert_str_eq(got->state, "connected");
    ck_assert_str_eq(got->authority, "https://login.microsoftonline.com/common");
    ck_assert_int_eq(got->access_expires_at, big);
    ck_assert_int_eq(got->last_sync_at, 0);
    ck_assert_ptr_null(got->last_error);
    ck_assert_str_eq(got->connected_by, "admin");
    ck_assert_int_eq(got->created_at, 1700000000);
    ck_assert_int_eq(got->updated_at, 1700000000);
    token_is(db, first_id, "refresh", "sealed-refresh-1", 0);
    token_is(db, first_id, "graph", "sealed-access-1", big);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_tokens WHERE binding = 2"), 2);

    /* The job later marks it and caches an Outlook token. */
    args[0] = &first_id;
    ck_assert_int_eq(pexec(db, "UPDATE msoauth_accounts SET state = 'reconnect_required', "
                               "last_error = 'reconnect_required', last_sync_at = 1700000500 "
                               "WHERE id = %lld", args), 0);
    ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_tokens (account_id, kind, sealed, "
                               "updated_at) VALUES (%lld, 'outlook', 'old-outlook', 1)", args),
                     0);

    /* Reconnect: same row, new tokens, created_at kept. */
    b = sample("default", "alice@EXAMPLE.com", ALICE);
    b.display_name = "Alice Renamed";
    b.scopes = "openid profile email offline_access Mail.ReadWrite";
    b.access_expires_at = 1700007200;
    b.connected_by = "bob";
    again = connect_ok(db, &b, "sealed-refresh-2", "sealed-access-2", 1700003000);
    ck_assert_int_eq(again->id, first_id);
    ck_assert_int_eq(again->created_at, 1700000000);
    ck_assert_int_eq(count_of(db, "msoauth_accounts"), 1);

    got = get_ok(db, first_id);
    ck_assert_str_eq(got->display_name, "Alice Renamed");
    ck_assert_str_eq(got->tenant_id, "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a");
    ck_assert_str_eq(got->scopes, "openid profile email offline_access Mail.ReadWrite");
    ck_assert_str_eq(got->state, "connected");
    ck_assert_ptr_null(got->last_error);
    ck_assert_int_eq(got->last_sync_at, 1700000500);
    ck_assert_str_eq(got->connected_by, "bob");
    ck_assert_int_eq(got->created_at, 1700000000);
    ck_assert_int_eq(got->updated_at, 1700003000);
    ck_assert_int_eq(got->access_expires_at, 1700007200);
    token_is(db, first_id, "refresh", "sealed-refresh-2", 0);
    token_is(db, first_id, "graph", "sealed-access-2", 1700007200);
    {
        const char *s = NULL;

        ck_assert_int_eq(mso_account_token_get(db, pool, first_id, "outlook", &s, NULL),
                         APR_NOTFOUND);
    }
    ck_assert_int_eq(count_of(db, "msoauth_tokens"), 2);

    /* A display name the sign-in did not give is kept. */
    b.display_name = NULL;
    connect_ok(db, &b, "sealed-refresh-3", NULL, 1700003100);
    ck_assert_str_eq(get_ok(db, first_id)->display_name, "Alice Renamed");
}
END_TEST

START_TEST(connect_rejects_missing_values)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t in = sample("default", "alice@example.com", ALICE), b;
    mso_account_t *a, *got = NULL;
    const char *err = NULL;

    migrate_ok(db);
    a = connect_ok(db, &in, "sealed-r", "sealed-a", 1700000000);

    b = sample("default", "alice@example.com", ALICE);
    b.display_name = "Changed";
    ck_assert_int_eq(connect_raw(db, &b, NULL, "new-a", 1700000100, &got, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "refresh token"), "message: %s", err);
    err = NULL;
    ck_assert_int_eq(connect_raw(db, &b, "", "new-a", 1700000100, &got, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(err);
    b.client_id = NULL;
    err = NULL;
    ck_assert_int_eq(connect_raw(db, &b, "r", "a", 1700000100, &got, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(err);
    b = sample("default", NULL, ALICE);
    err = NULL;
    ck_assert_int_eq(connect_raw(db, &b, "r", "a", 1700000100, &got, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_ptr_null(got);

    token_is(db, a->id, "refresh", "sealed-r", 0);
    token_is(db, a->id, "graph", "sealed-a", 1700003600);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->display_name, "Alice Example");
    ck_assert_int_eq(got->updated_at, 1700000000);
}
END_TEST

static void forced_failure_trigger(mso_db_t *db, int backend)
{
    if (backend == BACKEND_SQLITE) {
        exec_ok(db, "CREATE TRIGGER msoauth_test_fail BEFORE INSERT ON msoauth_tokens "
                    "WHEN NEW.sealed = 'FAIL' BEGIN SELECT RAISE(ABORT, 'forced failure'); "
                    "END");
    }
    else {
        exec_ok(db, "CREATE OR REPLACE FUNCTION msoauth_test_fail() RETURNS trigger "
                    "LANGUAGE plpgsql AS $$ BEGIN IF NEW.sealed = 'FAIL' THEN "
                    "RAISE EXCEPTION 'forced failure'; END IF; RETURN NEW; END $$");
        exec_ok(db, "CREATE TRIGGER msoauth_test_fail BEFORE INSERT ON msoauth_tokens "
                    "FOR EACH ROW EXECUTE FUNCTION msoauth_test_fail()");
    }
}

static void drop_forced_failure(mso_db_t *db, int backend)
{
    exec_ok(db, backend == BACKEND_SQLITE ? "DROP TRIGGER msoauth_test_fail"
                                          : "DROP TRIGGER msoauth_test_fail ON msoauth_tokens");
}

START_TEST(connect_rolls_back_on_db_error)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t in = sample("default", "alice@example.com", ALICE), b, c;
    mso_account_t *a, *got = NULL;
    const char *err = NULL;

    migrate_ok(db);
    a = connect_ok(db, &in, "sealed-r", "sealed-a", 1700000000);

    /* Make the second token insert fail inside the transaction, after the
     * account row was updated and the old tokens deleted. */
    forced_failure_trigger(db, _i);
    b = sample("default", "alice@example.com", ALICE);
    b.display_name = "Should Not Stick";
    ck_assert_int_eq(connect_raw(db, &b, "new-r", "FAIL", 1700000100, &got, &err),
                     APR_EGENERAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "forced failure") && strstr(err, "access token")
                  && strstr(err, "alice@example.com"), "message: %s", err);
    token_is(db, a->id, "refresh", "sealed-r", 0);
    token_is(db, a->id, "graph", "sealed-a", 1700003600);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->display_name, "Alice Example");
    ck_assert_int_eq(got->updated_at, 1700000000);

    /* A new account whose tokens fail leaves no row behind. */
    c = sample("default", "carol@example.com", BOB);
    err = NULL;
    ck_assert_int_eq(connect_raw(db, &c, "r", "FAIL", 1700000100, &got, &err), APR_EGENERAL);
    ck_assert_int_eq(mso_account_find(db, pool, "default", "carol@example.com", &got),
                     APR_NOTFOUND);
    ck_assert_int_eq(count_of(db, "msoauth_accounts"), 1);

    /* The connection is still usable, also after more schema changes. */
    drop_forced_failure(db, _i);
    connect_ok(db, &c, "r", "a", 1700000200);
    connect_ok(db, &b, "new-r", "new-a", 1700000200);
    token_is(db, a->id, "graph", "new-a", 1700003600);
}
END_TEST

START_TEST(mailbox_case_and_uniqueness)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t a = sample("acme", "Bob@X.COM", BOB);
    mso_connect_t b = sample("acme", "bob@x.com", BOB);
    mso_connect_t c = sample("other", "BOB@x.com", BOB);
    mso_account_t *ga, *gb, *gc, *got;
    apr_int64_t now = 1;

    migrate_ok(db);
    ga = connect_ok(db, &a, "r1", "a1", 1700000000);
    gb = connect_ok(db, &b, "r2", "a2", 1700000001);
    gc = connect_ok(db, &c, "r3", "a3", 1700000002);
    ck_assert_int_eq(ga->id, gb->id);
    ck_assert_int_ne(ga->id, gc->id);
    ck_assert_int_eq(count_of(db, "msoauth_accounts"), 2);
    ck_assert_int_eq(mso_account_find(db, pool, "acme", "BOB@x.Com", &got), APR_SUCCESS);
    ck_assert_int_eq(got->id, ga->id);
    ck_assert_str_eq(got->mailbox, "bob@x.com");
    ck_assert_int_eq(mso_account_find(db, pool, "other", "bob@x.com", &got), APR_SUCCESS);
    ck_assert_int_eq(got->id, gc->id);
    ck_assert_int_eq(mso_account_find(db, pool, "ACME", "bob@x.com", &got), APR_NOTFOUND);

    /* The table itself refuses a second row with the same key. */
    ck_assert_int_ne(pexec(db, "INSERT INTO msoauth_accounts (company, mailbox, created_at, "
                               "updated_at) VALUES (%s, %s, %lld, %lld)",
                           (const void *[]){"acme", "bob@x.com", &now, &now}), 0);
    /* ...and a state outside the list. */
    ck_assert_int_ne(pexec(db, "INSERT INTO msoauth_accounts (company, mailbox, state, "
                               "created_at, updated_at) VALUES (%s, 'new@x.com', 'bogus', "
                               "%lld, %lld)", (const void *[]){"acme", &now, &now}), 0);
}
END_TEST

START_TEST(values_with_sql_metacharacters)
{
    static const char nasty[] = "o'brien@x.com'; DROP TABLE msoauth_accounts;--";
    static const char nasty2[] = "Zo\xc3\xab \"Q\" \\ %s %d %lld $1 ? :x ''";
    mso_db_t *db = fresh_db(_i);
    mso_connect_t in = sample(nasty2, nasty, nasty2);
    mso_account_t *a, *got;

    migrate_ok(db);
    in.display_name = nasty;
    in.connected_by = nasty2;
    in.scopes = nasty;
    a = connect_ok(db, &in, nasty, nasty2, 1700000000);

    got = get_ok(db, a->id);
    ck_assert_str_eq(got->company, nasty2);
    ck_assert_str_eq(got->mailbox, "o'brien@x.com'; drop table msoauth_accounts;--");
    ck_assert_str_eq(got->display_name, nasty);
    ck_assert_str_eq(got->connected_by, nasty2);
    ck_assert_str_eq(got->scopes, nasty);
    ck_assert_str_eq(got->object_id, nasty2);
    ck_assert_int_eq(mso_account_find(db, pool, nasty2, nasty, &got), APR_SUCCESS);
    ck_assert_int_eq(got->id, a->id);
    token_is(db, a->id, "refresh", nasty, 0);
    token_is(db, a->id, "graph", nasty2, 1700003600);
    ck_assert_int_eq(count_of(db, "msoauth_accounts"), 1);
}
END_TEST

START_TEST(not_found)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t in = sample("default", "alice@example.com", ALICE);
    mso_account_t *a, *got = (mso_account_t *)1;
    const char *sealed = "x";
    apr_int64_t exp = 7;

    migrate_ok(db);
    ck_assert_int_eq(mso_account_get(db, pool, 424242, &got), APR_NOTFOUND);
    ck_assert_ptr_null(got);
    ck_assert_int_eq(mso_account_find(db, pool, "default", "nobody@example.com", &got),
                     APR_NOTFOUND);
    a = connect_ok(db, &in, "r", NULL, 1700000000);     /* no access token given */
    ck_assert_int_eq(mso_account_token_get(db, pool, a->id, "graph", &sealed, &exp),
                     APR_NOTFOUND);
    ck_assert_ptr_null(sealed);
    ck_assert_int_eq(mso_account_token_get(db, pool, a->id + 1, "refresh", &sealed, &exp),
                     APR_NOTFOUND);
    ck_assert_int_eq(mso_account_token_get(db, pool, a->id, "refresh", &sealed, &exp),
                     APR_SUCCESS);
}
END_TEST

/* ---- who an account is (trust fix: identity keyed on the Microsoft object) */

START_TEST(identity_follows_the_object)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t alice = sample("acme", "alice@acme.com", ALICE);
    mso_connect_t bob = sample("acme", "bob@acme.com", BOB);
    mso_connect_t c;
    mso_account_t *a, *b, *got = NULL;
    const char *err = NULL;

    migrate_ok(db);
    a = connect_ok(db, &alice, "r-alice", "a-alice", 1000);
    b = connect_ok(db, &bob, "r-bob", "a-bob", 1000);

    /* (b) Someone else signs in for Alice's mailbox: refused, nothing changes. */
    c = sample("acme", "Alice@acme.com", EVE);
    ck_assert_int_eq(connect_raw(db, &c, "r-evil", "a-evil", 1100, &got, &err),
                     MSO_ACCOUNT_OTHER_OBJECT);
    ck_assert_ptr_null(got);
    ck_assert_msg(err && strstr(err, "alice@acme.com") && strstr(err, ALICE) && strstr(err, EVE),
                  "message: %s", err ? err : "");
    /* (a) Bob, who has an account, asking for Alice's address: his account
     * would move onto hers, which is refused the same way. */
    c = sample("acme", "alice@acme.com", BOB);
    ck_assert_int_eq(connect_raw(db, &c, "r-evil", "a-evil", 1100, &got, &err),
                     MSO_ACCOUNT_ADDRESS_TAKEN);
    token_is(db, b->id, "refresh", "r-bob", 0);
    ck_assert_str_eq(get_ok(db, b->id)->mailbox, "bob@acme.com");
    token_is(db, a->id, "refresh", "r-alice", 0);
    ck_assert_str_eq(get_ok(db, a->id)->object_id, ALICE);
    ck_assert_int_eq(get_ok(db, a->id)->updated_at, 1000);
    /* The same object in another tenant is another person too. */
    c = sample("acme", "alice@acme.com", ALICE);
    c.tenant_id = "99999999-1c1e-4d1b-9a7e-2b9f6c1d4e5a";
    ck_assert_int_eq(connect_raw(db, &c, "r-x", NULL, 1100, &got, &err),
                     MSO_ACCOUNT_OTHER_OBJECT);

    /* (a) Alice's address changes: same account, new mailbox. */
    c = sample("acme", "alice.smith@acme.com", ALICE);
    got = connect_ok(db, &c, "r-alice2", "a-alice2", 1200);
    ck_assert_int_eq(got->id, a->id);
    ck_assert_str_eq(got->mailbox, "alice.smith@acme.com");
    ck_assert_int_eq(count_of(db, "msoauth_accounts"), 2);
    token_is(db, a->id, "refresh", "r-alice2", 0);

    /* (a) ...but not onto an address another account has: refused. */
    c = sample("acme", "bob@acme.com", ALICE);
    err = NULL;
    ck_assert_int_eq(connect_raw(db, &c, "r-alice3", NULL, 1300, &got, &err),
                     MSO_ACCOUNT_ADDRESS_TAKEN);
    ck_assert_ptr_nonnull(err);
    ck_assert_str_eq(get_ok(db, a->id)->mailbox, "alice.smith@acme.com");
    token_is(db, a->id, "refresh", "r-alice2", 0);
    token_is(db, b->id, "refresh", "r-bob", 0);

    /* Disconnected, the mailbox belongs to nobody: the next sign-in for it,
     * whoever it is, takes the account over (same id). */
    ck_assert_int_eq(mso_account_disconnect(db, pool, b->id, 1400), APR_SUCCESS);
    got = get_ok(db, b->id);
    ck_assert_str_eq(got->state, "disconnected");
    ck_assert_ptr_null(got->object_id);
    ck_assert_ptr_null(got->tenant_id);
    c = sample("acme", "bob@acme.com", "33333333-3333-4444-5555-666666666666");
    got = connect_ok(db, &c, "r-new", NULL, 1500);
    ck_assert_int_eq(got->id, b->id);
    ck_assert_str_eq(got->object_id, "33333333-3333-4444-5555-666666666666");
    ck_assert_str_eq(got->state, "connected");

    /* An app-only account is never taken over by a sign-in. */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET kind = 'app', "
                             "object_id = NULL WHERE id = %" APR_INT64_T_FMT, b->id));
    ck_assert_int_eq(connect_raw(db, &c, "r-app", NULL, 1600, &got, &err),
                     MSO_ACCOUNT_OTHER_OBJECT);
    token_is(db, b->id, "refresh", "r-new", 0);

    /* (c) A new person, a new account. */
    c = sample("acme", "dave@acme.com", "44444444-3333-4444-5555-666666666666");
    got = connect_ok(db, &c, "r-dave", NULL, 1700);
    ck_assert_int_ne(got->id, a->id);
    ck_assert_int_ne(got->id, b->id);
    ck_assert_int_eq(count_of(db, "msoauth_accounts"), 3);
}
END_TEST

/* ---- tokens bound to client ID and account (trust fix) ------------------- */

START_TEST(tokens_bound_to_client_and_account)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t alice = sample("acme", "alice@acme.com", ALICE);
    mso_connect_t bob = sample("acme", "bob@acme.com", BOB);
    mso_token_sealer_t sa, sb;
    mso_account_t *a, *b, *got = NULL;
    mso_keyring_t *kr = mso_keyring_create(pool);
    unsigned char key[MSO_KEY_LEN];
    const char *err = NULL, *plain = NULL;
    apr_int64_t exp = 0;

    memset(key, 5, sizeof(key));
    ck_assert_int_eq(mso_keyring_add(kr, key), APR_SUCCESS);
    migrate_ok(db);
    memset(&sa, 0, sizeof(sa));
    sa.p = pool;
    sa.keyring = kr;
    sa.client_id = alice.client_id;
    sa.refresh_token = "RT-alice";
    sa.access_token = "AT-alice";
    sb = sa;
    sb.refresh_token = "RT-bob";
    sb.access_token = NULL;
    ck_assert_int_eq(mso_account_connect(db, pool, &alice, mso_account_seal_tokens, &sa, 1000,
                                         &a, &err), APR_SUCCESS);
    ck_assert_int_eq(mso_account_connect(db, pool, &bob, mso_account_seal_tokens, &sb, 1000,
                                         &b, &err), APR_SUCCESS);

    ck_assert_int_eq(mso_account_token_open(db, pool, kr, a, "refresh", &plain, &exp),
                     APR_SUCCESS);
    ck_assert_str_eq(plain, "RT-alice");
    ck_assert_int_eq(exp, 0);
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, a, "graph", &plain, &exp),
                     APR_SUCCESS);
    ck_assert_str_eq(plain, "AT-alice");
    ck_assert_int_eq(exp, 1700003600);
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, b, "graph", &plain, NULL),
                     APR_NOTFOUND);

    /* Alice's sealed refresh token copied into Bob's row does not open. */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_tokens SET sealed = (SELECT sealed FROM "
                             "msoauth_tokens WHERE account_id = %" APR_INT64_T_FMT " AND kind = "
                             "'refresh') WHERE account_id = %" APR_INT64_T_FMT " AND kind = "
                             "'refresh'", a->id, b->id));
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, get_ok(db, b->id), "refresh",
                                            &plain, NULL), APR_EINVAL);
    ck_assert_ptr_null(plain);
    /* Nor as another kind of Alice's own. */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_tokens SET sealed = (SELECT sealed FROM "
                             "msoauth_tokens WHERE account_id = %" APR_INT64_T_FMT " AND kind = "
                             "'refresh') WHERE account_id = %" APR_INT64_T_FMT " AND kind = "
                             "'graph'", a->id, a->id));
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, a, "graph", &plain, NULL),
                     APR_EINVAL);
    /* An account moved to another company's credentials: its tokens do not
     * open (the mailbox and company did not change: the old binding opened). */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET client_id = "
                             "'00000000-0000-0000-0000-000000000001' WHERE id = %"
                             APR_INT64_T_FMT, a->id));
    got = get_ok(db, a->id);
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, got, "refresh", &plain, NULL),
                     APR_EINVAL);
    /* A row of binding 1 is refused by the normal path. */
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET client_id = '%s' WHERE id = %"
                             APR_INT64_T_FMT, "6731de76-14a6-49ae-97bc-6eba6914391e", a->id));
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, get_ok(db, a->id), "refresh", &plain,
                                            NULL), APR_SUCCESS);
    exec_ok(db, "UPDATE msoauth_tokens SET binding = 1");
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, get_ok(db, a->id), "refresh", &plain,
                                            NULL), MSO_ACCOUNT_UNBOUND);

    /* A deleted account's token put on the account that now has its mailbox
     * (same company and mailbox, another id) does not open either. */
    exec_ok(db, "UPDATE msoauth_tokens SET binding = 2");
    {
        const char *old = NULL;
        mso_connect_t again = sample("acme", "alice@acme.com",
                                     "55555555-3333-4444-5555-666666666666");
        mso_account_t *n = NULL;

        ck_assert_int_eq(mso_account_token_get(db, pool, a->id, "refresh", &old, NULL),
                         APR_SUCCESS);
        exec_ok(db, apr_psprintf(pool, "DELETE FROM msoauth_accounts WHERE id = %"
                                 APR_INT64_T_FMT, a->id));
        sa.refresh_token = "RT-new";
        ck_assert_int_eq(mso_account_connect(db, pool, &again, mso_account_seal_tokens, &sa,
                                             2000, &n, &err), APR_SUCCESS);
        ck_assert_int_ne(n->id, a->id);
        ck_assert_int_eq(pexec(db, "UPDATE msoauth_tokens SET sealed = %s WHERE account_id = "
                                   "%lld AND kind = 'refresh'",
                               (const void *[]){old, &n->id}), 0);
        ck_assert_int_eq(mso_account_token_open(db, pool, kr, n, "refresh", &plain, NULL),
                         APR_EINVAL);
    }
}
END_TEST

/* ---- schema v2: the background job ------------------------------------- */

/* An account due at `due` (0: now). */
static mso_account_t *due_account(mso_db_t *db, const char *mailbox, apr_int64_t due,
                                  apr_int64_t now)
{
    mso_connect_t in = sample("default", mailbox, apr_pstrcat(pool, "oid-", mailbox, NULL));

    in.refresh_due_at = due;
    return connect_ok(db, &in, "sealed-r", "sealed-a", now);
}

static int claim_count(mso_db_t *db, const char *owner, apr_int64_t now, int lease, int max)
{
    apr_array_header_t *due = NULL;

    ck_assert_int_eq(mso_account_claim_due(db, pool, owner, now, lease, max, &due),
                     APR_SUCCESS);
    return due->nelts;
}

START_TEST(claim_and_lease)
{
    mso_db_t *db = fresh_db(_i);
    apr_array_header_t *due = NULL;
    mso_account_t *a, *later, *got;
    mso_account_t *acc;

    migrate_ok(db);
    a = due_account(db, "alice@example.com", 0, 900);
    later = due_account(db, "later@example.com", 5000, 900);

    /* A claims the due one (not the later one) with a lease. */
    ck_assert_int_eq(mso_account_claim_due(db, pool, "A", 1000, 60, 10, &due), APR_SUCCESS);
    ck_assert_int_eq(due->nelts, 1);
    acc = APR_ARRAY_IDX(due, 0, mso_account_t *);
    ck_assert_int_eq(acc->id, a->id);
    ck_assert_str_eq(acc->lease_owner, "A");
    ck_assert_int_eq(acc->lease_until, 1060);
    ck_assert_str_eq(acc->mailbox, "alice@example.com");
    ck_assert_str_eq(acc->authority, "https://login.microsoftonline.com/common");

    /* B gets nothing while A's lease lasts, by claim or by lease. */
    ck_assert_int_eq(claim_count(db, "B", 1030, 60, 10), 0);
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "B", 1030, 60), APR_EBUSY);
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "B", 1060, 60), APR_EBUSY);
    ck_assert_int_eq(mso_account_lease(db, pool, a->id + 1000, "B", 1030, 60), APR_NOTFOUND);
    /* A may extend its own. */
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "A", 1030, 60), APR_SUCCESS);
    ck_assert_int_eq(get_ok(db, a->id)->lease_until, 1090);
    ck_assert_int_eq(claim_count(db, "B", 1090, 60, 10), 0);
    /* Once it ran out, B can claim it. */
    ck_assert_int_eq(claim_count(db, "B", 1091, 60, 10), 1);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->lease_owner, "B");
    ck_assert_int_eq(got->lease_until, 1151);
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "A", 1100, 60), APR_EBUSY);

    /* Only the owner releases. */
    ck_assert_int_eq(mso_account_release(db, pool, a->id, "A"), APR_SUCCESS);
    ck_assert_str_eq(get_ok(db, a->id)->lease_owner, "B");
    ck_assert_int_eq(mso_account_release(db, pool, a->id, "B"), APR_SUCCESS);
    got = get_ok(db, a->id);
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_int_eq(got->lease_until, 0);
    /* The token handler leases any account, due or not. */
    ck_assert_int_eq(mso_account_lease(db, pool, later->id, "A", 1100, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_account_lease(db, pool, later->id, "B", 1100, 60), APR_EBUSY);
    ck_assert_int_eq(mso_account_release(db, pool, later->id, "A"), APR_SUCCESS);

    /* Most overdue first, at most max; states other than connected never. */
    {
        mso_account_t *c = due_account(db, "carol@example.com", 100, 900);
        mso_account_t *d = due_account(db, "dave@example.com", 50, 900);
        mso_account_t *e = due_account(db, "eve@example.com", 10, 900);
        const void *args[1];

        args[0] = &e->id;
        ck_assert_int_eq(pexec(db, "UPDATE msoauth_accounts SET state = 'reconnect_required' "
                                   "WHERE id = %lld", args), 0);
        ck_assert_int_eq(mso_account_claim_due(db, pool, "C", 2000, 60, 2, &due), APR_SUCCESS);
        ck_assert_int_eq(due->nelts, 2);
        ck_assert_int_eq(APR_ARRAY_IDX(due, 0, mso_account_t *)->id, a->id);   /* due 0 */
        ck_assert_int_eq(APR_ARRAY_IDX(due, 1, mso_account_t *)->id, d->id);
        ck_assert_int_eq(mso_account_claim_due(db, pool, "C", 2000, 60, 5, &due), APR_SUCCESS);
        ck_assert_int_eq(due->nelts, 1);
        ck_assert_int_eq(APR_ARRAY_IDX(due, 0, mso_account_t *)->id, c->id);
        ck_assert_int_eq(claim_count(db, "C", 2000, 60, 5), 0);
        ck_assert_int_eq(claim_count(db, "D", 6000, 60, 0), 0);
    }
}
END_TEST

#define CLAIMERS 4
#define CLAIM_ACCOUNTS 50

START_TEST(concurrent_claims)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t ids[CLAIM_ACCOUNTS], got;
    int seen[CLAIM_ACCOUNTS];
    pid_t pids[CLAIMERS];
    int go[2], out[2], i, j, status, total = 0;
    char c;

    migrate_ok(db);
    for (i = 0; i < CLAIM_ACCOUNTS; i++) {
        ids[i] = due_account(db, apr_psprintf(pool, "user%d@example.com", i), i % 7, 900)->id;
        seen[i] = 0;
    }
    ck_assert_int_eq(pipe(go), 0);
    ck_assert_int_eq(pipe(out), 0);
    for (i = 0; i < CLAIMERS; i++) {
        pids[i] = fork();
        ck_assert_int_ge(pids[i], 0);
        if (pids[i] == 0) {
            apr_pool_t *p;
            mso_db_t *mine;
            const char *owner;
            apr_array_header_t *due;

            close(go[1]);
            close(out[0]);
            apr_pool_create(&p, NULL);
            mine = connect_db(_i, p);
            owner = apr_psprintf(p, "node-%d", i);
            if (read(go[0], &c, 1) < 0) {
                _exit(3);
            }
            do {
                due = NULL;
                if (mso_account_claim_due(mine, p, owner, 1000, 300, 20, &due)
                    != APR_SUCCESS) {
                    _exit(1);
                }
                for (j = 0; j < due->nelts; j++) {
                    mso_account_t *a = APR_ARRAY_IDX(due, j, mso_account_t *);

                    /* 8 bytes: atomic on a pipe. */
                    if (strcmp(a->lease_owner, owner) != 0
                        || write(out[1], &a->id, sizeof(a->id)) != sizeof(a->id)) {
                        _exit(2);
                    }
                }
            } while (due->nelts > 0);
            _exit(0);
        }
    }
    close(go[0]);
    close(out[1]);
    usleep(200000);
    close(go[1]);
    while (read(out[0], &got, sizeof(got)) == sizeof(got)) {
        for (i = 0; i < CLAIM_ACCOUNTS && ids[i] != got; i++) {
        }
        ck_assert_msg(i < CLAIM_ACCOUNTS, "claimed an unknown id %lld", (long long)got);
        seen[i]++;
        total++;
    }
    close(out[0]);
    for (i = 0; i < CLAIMERS; i++) {
        ck_assert_int_eq(waitpid(pids[i], &status, 0), pids[i]);
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                      "claimer %d failed (status %d)", i, status);
    }
    for (i = 0; i < CLAIM_ACCOUNTS; i++) {
        ck_assert_msg(seen[i] == 1, "account %lld claimed %d times", (long long)ids[i],
                      seen[i]);
    }
    ck_assert_int_eq(total, CLAIM_ACCOUNTS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE lease_owner LIKE "
                             "'node-%' AND lease_until = 1300"), CLAIM_ACCOUNTS);
}
END_TEST

static void refreshed_ok(mso_db_t *db, apr_int64_t id, const char *owner,
                         const mso_refreshed_t *r, apr_int64_t now)
{
    const char *err = NULL;
    apr_status_t rv = mso_account_refreshed(db, pool, id, owner, r, now, &err);

    ck_assert_msg(rv == APR_SUCCESS, "refreshed: %s", err ? err : "(no message)");
    ck_assert_ptr_null(err);
}

START_TEST(refreshed_stores_tokens)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t *a, *got;
    mso_refreshed_t r;
    const char *err = NULL, *sealed = NULL;

    migrate_ok(db);
    a = due_account(db, "alice@example.com", 0, 900);
    token_is(db, a->id, "refresh", "sealed-r", 0);

    /* Earlier failures, to be cleared by the success. */
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "A", 1000, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "A", "connected",
                                                "token_endpoint_unreachable", 0, "down", 1000,
                                                1000), APR_SUCCESS);

    /* Graph, Microsoft sent no new refresh token: the stored one stays. */
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "A", 1001, 60), APR_SUCCESS);
    memset(&r, 0, sizeof(r));
    r.kind = "graph";
    r.sealed_access = "sealed-a2";
    r.access_expires_at = 5000;
    r.refresh_due_at = 4000;
    refreshed_ok(db, a->id, "A", &r, 1010);
    token_is(db, a->id, "refresh", "sealed-r", 0);
    token_is(db, a->id, "graph", "sealed-a2", 5000);
    got = get_ok(db, a->id);
    ck_assert_int_eq(got->access_expires_at, 5000);
    ck_assert_int_eq(got->refresh_due_at, 4000);
    ck_assert_int_eq(got->last_refresh_at, 1010);
    ck_assert_int_eq(got->updated_at, 1010);
    ck_assert_int_eq(got->error_runs, 0);
    ck_assert_int_eq(got->retry_at, 0);
    ck_assert_ptr_null(got->reason);
    ck_assert_ptr_null(got->last_error);
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_int_eq(got->lease_until, 0);
    ck_assert_str_eq(got->scopes, "openid profile email offline_access Mail.Read");
    ck_assert_str_eq(got->state, "connected");

    /* Outlook with a rotated refresh token and scopes: the Graph side stays. */
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "A", 1100, 60), APR_SUCCESS);
    memset(&r, 0, sizeof(r));
    r.kind = "outlook";
    r.sealed_access = "sealed-o1";
    r.access_expires_at = 6000;
    r.sealed_refresh = "sealed-r2";
    r.scopes = "https://outlook.office.com/IMAP.AccessAsUser.All";
    r.refresh_due_at = 4000;
    refreshed_ok(db, a->id, "A", &r, 1110);
    token_is(db, a->id, "refresh", "sealed-r2", 0);
    token_is(db, a->id, "outlook", "sealed-o1", 6000);
    token_is(db, a->id, "graph", "sealed-a2", 5000);
    got = get_ok(db, a->id);
    ck_assert_int_eq(got->access_expires_at, 5000);
    ck_assert_str_eq(got->scopes, "https://outlook.office.com/IMAP.AccessAsUser.All");
    ck_assert_int_eq(count_of(db, "msoauth_tokens"), 3);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_tokens WHERE binding = 2"), 3);

    /* A's lease ran out and B took the account: A's result is not stored. */
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "A", 2000, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "B", 2061, 60), APR_SUCCESS);
    memset(&r, 0, sizeof(r));
    r.kind = "graph";
    r.sealed_access = "sealed-a3";
    r.access_expires_at = 9000;
    r.sealed_refresh = "sealed-r3";
    r.refresh_due_at = 8000;
    ck_assert_int_eq(mso_account_refreshed(db, pool, a->id, "A", &r, 2070, &err), APR_EBUSY);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "lease") != NULL, "message: %s", err);
    token_is(db, a->id, "refresh", "sealed-r2", 0);
    token_is(db, a->id, "graph", "sealed-a2", 5000);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->lease_owner, "B");
    ck_assert_int_eq(got->refresh_due_at, 4000);
    ck_assert_int_eq(got->last_refresh_at, 1110);
    /* Without any lease it is refused too, and the connection is still fine. */
    ck_assert_int_eq(mso_account_release(db, pool, a->id, "B"), APR_SUCCESS);
    ck_assert_int_eq(mso_account_refreshed(db, pool, a->id, "A", &r, 2080, &err), APR_EBUSY);
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "B", 2080, 60), APR_SUCCESS);
    refreshed_ok(db, a->id, "B", &r, 2081);
    token_is(db, a->id, "refresh", "sealed-r3", 0);
    token_is(db, a->id, "graph", "sealed-a3", 9000);

    /* Bad input is refused before anything is written. */
    r.kind = "refresh";
    ck_assert_int_eq(mso_account_refreshed(db, pool, a->id, "B", &r, 2090, &err), APR_EINVAL);
    r.kind = "graph";
    r.sealed_access = NULL;
    ck_assert_int_eq(mso_account_refreshed(db, pool, a->id, "B", &r, 2090, &err), APR_EINVAL);
    ck_assert_int_eq(mso_account_token_get(db, pool, a->id, "graph", &sealed, NULL),
                     APR_SUCCESS);
    ck_assert_str_eq(sealed, "sealed-a3");
}
END_TEST

START_TEST(refreshed_rolls_back)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t *a, *got;
    mso_refreshed_t r;
    const char *err = NULL;

    migrate_ok(db);
    a = due_account(db, "alice@example.com", 0, 900);
    forced_failure_trigger(db, _i);
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "A", 1000, 60), APR_SUCCESS);
    memset(&r, 0, sizeof(r));
    r.kind = "graph";
    r.sealed_access = "sealed-a2";
    r.access_expires_at = 5000;
    r.sealed_refresh = "FAIL";
    r.refresh_due_at = 4000;
    ck_assert_int_eq(mso_account_refreshed(db, pool, a->id, "A", &r, 1010, &err), APR_EGENERAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "forced failure") && strstr(err, "refresh token"),
                  "message: %s", err);
    /* Nothing changed: old tokens, the lease still held. */
    token_is(db, a->id, "refresh", "sealed-r", 0);
    token_is(db, a->id, "graph", "sealed-a", 1700003600);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->lease_owner, "A");
    ck_assert_int_eq(got->last_refresh_at, 0);
    ck_assert_int_eq(got->refresh_due_at, 0);
    drop_forced_failure(db, _i);
    r.sealed_refresh = "sealed-r2";
    refreshed_ok(db, a->id, "A", &r, 1020);
    token_is(db, a->id, "refresh", "sealed-r2", 0);
}
END_TEST

START_TEST(refresh_failed_records)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t again;
    mso_account_t *a, *got;

    migrate_ok(db);
    a = due_account(db, "alice@example.com", 0, 900);

    /* Transient: still connected, backed off. */
    ck_assert_int_eq(claim_count(db, "A", 1000, 60, 10), 1);
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "A", "connected",
                                                "token_endpoint_unreachable", 0,
                                                "the token endpoint answered HTTP 503", 1500,
                                                1001), APR_SUCCESS);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->state, "connected");
    ck_assert_str_eq(got->reason, "token_endpoint_unreachable");
    ck_assert_int_eq(got->aadsts, 0);
    ck_assert_str_eq(got->last_error, "the token endpoint answered HTTP 503");
    ck_assert_int_eq(got->error_runs, 1);
    ck_assert_int_eq(got->retry_at, 1500);
    ck_assert_int_eq(got->updated_at, 1001);
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_int_eq(got->lease_until, 0);
    token_is(db, a->id, "refresh", "sealed-r", 0);
    /* Not claimed again before retry_at. */
    ck_assert_int_eq(claim_count(db, "A", 1499, 60, 10), 0);
    ck_assert_int_eq(claim_count(db, "A", 1500, 60, 10), 1);

    /* Another owner cannot record over A's lease. */
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "B", "reconnect_required",
                                                "reconnect_required", 700082, "x", 0, 1501),
                     APR_EBUSY);
    ck_assert_int_eq(get_ok(db, a->id)->error_runs, 1);

    /* The refresh token is dead: reconnect_required, never claimed. */
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "A", "reconnect_required",
                                                "reconnect_required", 700082,
                                                "Microsoft no longer accepts the refresh token",
                                                0, 1502), APR_SUCCESS);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->state, "reconnect_required");
    ck_assert_str_eq(got->reason, "reconnect_required");
    ck_assert_int_eq(got->aadsts, 700082);
    ck_assert_int_eq(got->error_runs, 2);
    ck_assert_int_eq(got->retry_at, 0);
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_int_eq(claim_count(db, "A", 999999, 60, 10), 0);
    /* Without a lease nothing is recorded (the token handler leases first). */
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "C", "reconnect_required",
                                                "reconnect_required", 700082, "again", 0, 1503),
                     APR_EBUSY);
    ck_assert_int_eq(get_ok(db, a->id)->error_runs, 2);
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "C", 1503, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "C", "reconnect_required",
                                                "reconnect_required", 700082, "again", 0, 1503),
                     APR_SUCCESS);
    ck_assert_int_eq(get_ok(db, a->id)->error_runs, 3);
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "C", "disconnected", "x", 0,
                                                "x", 0, 1503), APR_EINVAL);

    /* A reconnect clears the job's error state and schedules the account. */
    again = sample("default", "alice@example.com", "oid-alice@example.com");
    again.refresh_due_at = 4000;
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "A", 1600, 60), APR_SUCCESS);
    connect_ok(db, &again, "sealed-r9", "sealed-a9", 1700);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->state, "connected");
    ck_assert_ptr_null(got->reason);
    ck_assert_ptr_null(got->last_error);
    ck_assert_int_eq(got->aadsts, 0);
    ck_assert_int_eq(got->error_runs, 0);
    ck_assert_int_eq(got->retry_at, 0);
    ck_assert_int_eq(got->refresh_due_at, 4000);
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_int_eq(got->lease_until, 0);
}
END_TEST

/* Trust fix: a refresh that fails while a disconnect runs does not bring the
 * account back to connected. */
START_TEST(failed_refresh_after_disconnect)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t *a, *got;

    migrate_ok(db);
    a = due_account(db, "alice@example.com", 0, 900);
    ck_assert_int_eq(claim_count(db, "job", 1000, 60, 10), 1);
    /* The admin disconnects the mailbox while the job's call is out. */
    ck_assert_int_eq(mso_account_disconnect(db, pool, a->id, 1001), APR_SUCCESS);
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "job", "connected",
                                                "token_endpoint_unreachable", 0, "timeout",
                                                1500, 1002), APR_EBUSY);
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "job", "reconnect_required",
                                                "reconnect_required", 700082, "dead", 0, 1002),
                     APR_EBUSY);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->state, "disconnected");
    ck_assert_ptr_null(got->reason);
    ck_assert_int_eq(got->error_runs, 0);
    ck_assert_int_eq(got->updated_at, 1001);
    /* Even a lease taken on the disconnected row cannot revive it. */
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "job", 1003, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_account_refresh_failed(db, pool, a->id, "job", "connected",
                                                "token_endpoint_unreachable", 0, "timeout",
                                                1500, 1004), APR_EBUSY);
    ck_assert_str_eq(get_ok(db, a->id)->state, "disconnected");
}
END_TEST

START_TEST(disconnect_and_list)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t *a, *b, *got;
    apr_array_header_t *all = NULL;
    const char *sealed = NULL;

    migrate_ok(db);
    a = due_account(db, "alice@example.com", 0, 900);
    b = due_account(db, "bob@example.com", 0, 900);
    {
        const void *args[1] = {&a->id};

        ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_tokens (account_id, kind, sealed, "
                                   "updated_at) VALUES (%lld, 'outlook', 'o', 1)", args), 0);
    }
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "A", 1000, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_account_disconnect(db, pool, a->id, 1010), APR_SUCCESS);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->state, "disconnected");
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_ptr_null(got->object_id);
    ck_assert_ptr_null(got->tenant_id);
    ck_assert_int_eq(got->updated_at, 1010);
    ck_assert_int_eq(mso_account_token_get(db, pool, a->id, "refresh", &sealed, NULL),
                     APR_NOTFOUND);
    ck_assert_int_eq(mso_account_token_get(db, pool, a->id, "graph", &sealed, NULL),
                     APR_NOTFOUND);
    ck_assert_int_eq(count_of(db, "msoauth_tokens"), 2);   /* b's */
    token_is(db, b->id, "refresh", "sealed-r", 0);
    ck_assert_int_eq(mso_account_disconnect(db, pool, b->id + 1000, 1010), APR_NOTFOUND);

    /* The job leaves it alone. */
    {
        apr_array_header_t *due = NULL;

        ck_assert_int_eq(mso_account_claim_due(db, pool, "A", 2000, 60, 10, &due),
                         APR_SUCCESS);
        ck_assert_int_eq(due->nelts, 1);
        ck_assert_int_eq(APR_ARRAY_IDX(due, 0, mso_account_t *)->id, b->id);
    }

    ck_assert_int_eq(mso_account_list(db, pool, &all), APR_SUCCESS);
    ck_assert_int_eq(all->nelts, 2);
    ck_assert_int_eq(APR_ARRAY_IDX(all, 0, mso_account_t *)->id, a->id);
    ck_assert_str_eq(APR_ARRAY_IDX(all, 0, mso_account_t *)->state, "disconnected");
    ck_assert_int_eq(APR_ARRAY_IDX(all, 1, mso_account_t *)->id, b->id);
    ck_assert_str_eq(APR_ARRAY_IDX(all, 1, mso_account_t *)->lease_owner, "A");
}
END_TEST

START_TEST(lease_owners_and_dead_ones)
{
    mso_db_t *db = fresh_db(_i);
    apr_array_header_t *owners = NULL;
    mso_account_t *a, *b;

    migrate_ok(db);
    a = due_account(db, "alice@example.com", 0, 900);
    b = due_account(db, "bob@example.com", 0, 900);
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, "host:1:x", 1000, 60), APR_SUCCESS);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET work_owner = 'host:2:y', "
                             "work_until = 2000 WHERE id = %" APR_INT64_T_FMT, b->id));
    ck_assert_int_eq(mso_account_lease_owners(db, pool, &owners), APR_SUCCESS);
    ck_assert_int_eq(owners->nelts, 2);
    ck_assert_int_eq(mso_account_drop_owner(db, pool, "host:2:y"), APR_SUCCESS);
    ck_assert_int_eq(mso_account_lease_owners(db, pool, &owners), APR_SUCCESS);
    ck_assert_int_eq(owners->nelts, 1);
    ck_assert_str_eq(APR_ARRAY_IDX(owners, 0, const char *), "host:1:x");
    ck_assert_int_eq(mso_account_drop_owner(db, pool, "host:1:x"), APR_SUCCESS);
    ck_assert_int_eq(mso_account_lease_owners(db, pool, &owners), APR_SUCCESS);
    ck_assert_int_eq(owners->nelts, 0);
}
END_TEST

/* ---- the small tables ---------------------------------------------------- */

START_TEST(flow_states_are_single_use)
{
    mso_db_t *db = fresh_db(_i);
    const char *err = NULL;
    int n = -1;

    migrate_ok(db);
    ck_assert_int_eq(mso_flows_used_spend(db, pool, "digest-one", 2000, 1000), APR_SUCCESS);
    ck_assert_int_eq(mso_flows_used_spend(db, pool, "digest-one", 2000, 1001), APR_EEXIST);
    ck_assert_int_eq(mso_flows_used_spend(db, pool, "digest-two", 2000, 1001), APR_SUCCESS);
    /* An expired digest not purged yet is taken over (the cookie's own
     * expiry already refuses such a late replay), and spent again. */
    ck_assert_int_eq(mso_flows_used_spend(db, pool, "digest-three", 3000, 2500), APR_SUCCESS);
    ck_assert_int_eq(mso_flows_used_spend(db, pool, "digest-one", 3000, 2501), APR_SUCCESS);
    ck_assert_int_eq(mso_flows_used_spend(db, pool, "digest-one", 3000, 2502), APR_EEXIST);
    ck_assert_int_eq(mso_flows_used_spend(db, pool, "", 3000, 2501), APR_EINVAL);
    ck_assert_int_eq(count_of(db, "msoauth_flows_used"), 3);
    /* The job's purge, so the table does not grow forever: only the expired. */
    ck_assert_int_eq(mso_flows_used_purge(db, pool, 2501, &n, &err), APR_SUCCESS);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(count_of(db, "msoauth_flows_used"), 2);
    ck_assert_int_eq(mso_flows_used_spend(db, pool, "digest-two", 3000, 2502), APR_SUCCESS);
    ck_assert_int_eq(mso_flows_used_purge(db, pool, 2502, &n, &err), APR_SUCCESS);
    ck_assert_int_eq(n, 0);
}
END_TEST

START_TEST(job_runs_per_node)
{
    mso_db_t *db = fresh_db(_i);
    apr_array_header_t *runs = NULL;
    mso_job_run_t run;

    migrate_ok(db);
    memset(&run, 0, sizeof(run));
    run.node = "node-a";
    run.last_cycle_at = 1000;
    run.cycle_ms = 12;
    run.claimed = 3;
    ck_assert_int_eq(mso_job_runs_record(db, pool, &run), APR_SUCCESS);
    run.node = "node-b";
    run.last_cycle_at = 1001;
    ck_assert_int_eq(mso_job_runs_record(db, pool, &run), APR_SUCCESS);
    run.node = "node-a";
    run.last_cycle_at = 1002;
    run.refreshed = 2;
    run.failed = 1;
    ck_assert_int_eq(mso_job_runs_record(db, pool, &run), APR_SUCCESS);
    ck_assert_int_eq(mso_job_runs_list(db, pool, &runs), APR_SUCCESS);
    ck_assert_int_eq(runs->nelts, 2);
    ck_assert_str_eq(APR_ARRAY_IDX(runs, 0, mso_job_run_t).node, "node-a");
    ck_assert_int_eq(APR_ARRAY_IDX(runs, 0, mso_job_run_t).last_cycle_at, 1002);
    ck_assert_int_eq(APR_ARRAY_IDX(runs, 0, mso_job_run_t).refreshed, 2);
    ck_assert_int_eq(APR_ARRAY_IDX(runs, 0, mso_job_run_t).failed, 1);
    ck_assert_int_eq(APR_ARRAY_IDX(runs, 0, mso_job_run_t).claimed, 3);
    ck_assert_int_eq(APR_ARRAY_IDX(runs, 0, mso_job_run_t).cycle_ms, 12);
    ck_assert_str_eq(APR_ARRAY_IDX(runs, 1, mso_job_run_t).node, "node-b");
    ck_assert_int_eq(mso_job_runs_record(db, pool, NULL), APR_EINVAL);
}
END_TEST

static void add_tests(TCase *tc, int backend)
{
    ADD_BOTH(tc, connect_insert_then_update, backend);
    ADD_BOTH(tc, connect_rejects_missing_values, backend);
    ADD_BOTH(tc, connect_rolls_back_on_db_error, backend);
    ADD_BOTH(tc, mailbox_case_and_uniqueness, backend);
    ADD_BOTH(tc, values_with_sql_metacharacters, backend);
    ADD_BOTH(tc, not_found, backend);
    ADD_BOTH(tc, identity_follows_the_object, backend);
    ADD_BOTH(tc, tokens_bound_to_client_and_account, backend);
    ADD_BOTH(tc, claim_and_lease, backend);
    ADD_BOTH(tc, concurrent_claims, backend);
    ADD_BOTH(tc, refreshed_stores_tokens, backend);
    ADD_BOTH(tc, refreshed_rolls_back, backend);
    ADD_BOTH(tc, refresh_failed_records, backend);
    ADD_BOTH(tc, failed_refresh_after_disconnect, backend);
    ADD_BOTH(tc, disconnect_and_list, backend);
    ADD_BOTH(tc, lease_owners_and_dead_ones, backend);
    ADD_BOTH(tc, flow_states_are_single_use, backend);
    ADD_BOTH(tc, job_runs_per_node, backend);
}

int main(void)
{
    return dbtest_main("account", add_tests);
}
