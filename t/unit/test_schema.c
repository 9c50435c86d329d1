/* The schema (lib/mso_schema): migrations on SQLite and PostgreSQL, from
 * nothing and from each older version, alone and concurrently. */
#include "dbtest.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <apr_strings.h>

#include "mso_crypto.h"

static const char *const schema_columns[][32] = {
    {"msoauth_schema", "version", "applied_at", NULL},
    {"msoauth_accounts", "id", "company", "mailbox", "display_name", "tenant_id", "object_id",
     "scopes", "state", "authority", "access_expires_at", "last_sync_at", "last_error",
     "connected_by", "created_at", "updated_at", NULL},
    /* schema v2 */
    {"msoauth_accounts", "refresh_due_at", "retry_at", "error_runs", "reason", "aadsts",
     "last_refresh_at", "lease_owner", "lease_until", NULL},
    {"msoauth_tokens", "account_id", "kind", "sealed", "expires_at", "updated_at", NULL},
    {"msoauth_messages", "id", "account_id", "graph_id", "folder", "internet_message_id",
     "conversation_id", "subject", "from_address", "from_name", "to_json", "received_at",
     "is_read", "has_attachments", "importance", "body_preview", "body_type", "body",
     "web_link", NULL},
    {"msoauth_messages", "removed", "updated_at", NULL},
    {"msoauth_actions", "id", "account_id", "graph_id", "action", "destination", "state",
     "attempts", "last_error", "created_at", "updated_at", NULL},
    {"msoauth_sync_folders", "account_id", "folder", "delta_link", "next_link", "phase",
     "updated_at", NULL},
    /* schema v3 */
    {"msoauth_accounts", "sync_due_at", "sync_retry_at", "sync_phase", "sync_error",
     "sync_error_runs", "auth_retry", "work_owner", "work_until", NULL},
    {"msoauth_sync_folders", "round", "last_sync_at", "resyncs", NULL},
    {"msoauth_messages", "sync_round", NULL},
    {"msoauth_actions", "sent_at", "reason", NULL},
    /* schema v4 */
    {"msoauth_accounts", "client_id", "kind", NULL},
    {"msoauth_tokens", "binding", NULL},
    {"msoauth_messages", "body_truncated", NULL},
    /* schema v5 */
    {"msoauth_outbox", "id", "account_id", "to_json", "cc_json", "bcc_json", "subject",
     "body_type", "body", "reply_to_graph_id", "state", "attempts", "reason", "last_error",
     "internet_message_id", "created_at", "updated_at", "sent_at", "marker", "phase",
     "draft_id", "sending_since", "retry_at", NULL},
    {"msoauth_outbox_attachments", "id", "outbox_id", "name", "content_type", "content",
     "is_inline", "content_id", "phase", "graph_id", NULL},
    /* schema v6 */
    {"msoauth_attachments", "account_id", "graph_id", "attachment_id", "name", "content_type",
     "size", "is_inline", "content_id", "kind", "content", "fetched_at", "state",
     "last_modified", "tries", "error", "updated_at", NULL},
    {"msoauth_messages", "attach_due", "attach_tries", NULL},
    /* schema v7 */
    {"msoauth_app_tokens", "company", "client_id", "resource", "sealed", "expires_at",
     "refresh_due_at", "roles", "fetched_at", "fetches", "retry_at", "error_runs", "reason",
     "aadsts", "last_error", "lease_owner", "lease_until", "updated_at", NULL},
    {"msoauth_accounts", "shared", NULL},
    /* schema v8 */
    {"msoauth_account_events", "id", "account_id", "created_at", "reason", "text", NULL},
    {"msoauth_counters", "node", "metric", "label", "value", "updated_at", NULL},
};


static int index_count(mso_db_t *db, int backend, const char *names)
{
    return (int)num(db, apr_psprintf(pool, backend == BACKEND_SQLITE
                                     ? "SELECT COUNT(*) FROM sqlite_master WHERE "
                                       "type = 'index' AND name IN (%s)"
                                     : "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = "
                                       "current_schema() AND indexname "
                                       "IN (%s)", names));
}

START_TEST(migrate_creates_schema)
{
    mso_db_t *db = fresh_db(_i);
    int from = -1, to = -1, version = -1;
    const char *err = NULL;
    long long v;
    size_t t, c;

    ck_assert_int_eq(mso_schema_version(db, pool, &version, &err), APR_SUCCESS);
    ck_assert_int_eq(version, 0);
    ck_assert_int_eq(mso_schema_migrate(db, pool, &from, &to, &err), APR_SUCCESS);
    ck_assert_ptr_null(err);
    ck_assert_int_eq(from, 0);
    ck_assert_int_eq(to, mso_schema_latest());
    ck_assert_int_eq(mso_schema_latest(), 8);
    ck_assert_int_eq(mso_schema_version(db, pool, &version, &err), APR_SUCCESS);
    ck_assert_int_eq(version, mso_schema_latest());

    /* Every column answers by name (a missing one is an error). */
    for (t = 0; t < sizeof(schema_columns) / sizeof(schema_columns[0]); t++) {
        for (c = 1; schema_columns[t][c]; c++) {
            const char *sql = apr_psprintf(pool, "SELECT %s FROM %s WHERE 1 = 0",
                                           schema_columns[t][c], schema_columns[t][0]);
            int rc = select_num(db, sql, &v);

            ck_assert_msg(rc == 0, "%s: %s", sql, apr_dbd_error(db->driver, db->handle, rc));
        }
    }
    ck_assert_int_ne(select_num(db, "SELECT no_such_column FROM msoauth_accounts WHERE 1 = 0",
                                &v), 0);
    ck_assert_int_eq(num(db, "SELECT MAX(version) FROM msoauth_schema"), mso_schema_latest());
    ck_assert_int_eq(index_count(db, _i, "'msoauth_messages_recent', 'msoauth_actions_queue', "
                                         "'msoauth_accounts_due', 'msoauth_accounts_object', "
                                         "'msoauth_account_events_account', "
                                         "'msoauth_actions_done', 'msoauth_messages_removed'"),
                     7);

    /* Defaults and checks an application relies on when it queues an action. */
    {
        mso_connect_t in = sample("default", "alice@example.com", "oid-alice");
        mso_account_t *a = connect_ok(db, &in, "sealed-r", "sealed-a", 1700000000);
        const void *args[2];

        args[0] = &a->id;
        args[1] = "AAMkAD-1";
        ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_actions (account_id, graph_id, action) "
                                   "VALUES (%lld, %s, 'mark_read')", args), 0);
        ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_actions WHERE state = 'queued' "
                                 "AND attempts = 0 AND created_at > 1600000000"), 1);
        ck_assert_int_ne(pexec(db, "INSERT INTO msoauth_actions (account_id, graph_id, action) "
                                   "VALUES (%lld, %s, 'explode')", args), 0);
        /* Version 4: an account is delegated or app, nothing else. */
        ck_assert_int_ne(pexec(db, "UPDATE msoauth_accounts SET kind = 'robot' "
                                   "WHERE id = %lld", args), 0);
        ck_assert_str_eq(text_of(db, "SELECT kind FROM msoauth_accounts"), "delegated");
    }
}
END_TEST

START_TEST(migrate_again_is_noop)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t in = sample("default", "alice@example.com", "oid-alice");
    mso_account_t *a;
    int from = -1, to = -1;
    const char *err = NULL;

    migrate_ok(db);
    a = connect_ok(db, &in, "sealed-r", "sealed-a", 1700000000);
    ck_assert_int_eq(mso_schema_migrate(db, pool, &from, &to, &err), APR_SUCCESS);
    ck_assert_int_eq(from, mso_schema_latest());
    ck_assert_int_eq(to, mso_schema_latest());

    /* A second connection (another child) finds nothing to do either. */
    db = connect_db(_i, pool);
    ck_assert_int_eq(mso_schema_migrate(db, pool, &from, &to, &err), APR_SUCCESS);
    ck_assert_int_eq(from, mso_schema_latest());
    ck_assert_int_eq(to, mso_schema_latest());
    ck_assert_int_eq(num(db, "SELECT MAX(version) FROM msoauth_schema"), mso_schema_latest());
    ck_assert_str_eq(get_ok(db, a->id)->mailbox, "alice@example.com");
    token_is(db, a->id, "refresh", "sealed-r", 0);
}
END_TEST

START_TEST(newer_schema_refused)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t newer = mso_schema_latest() + 1, now = 1700000000;
    const void *args[2] = {&newer, &now};
    int version = -1, from = -1, to = -1;
    const char *err = NULL;

    migrate_ok(db);
    ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_schema (version, applied_at) "
                               "VALUES (%lld, %lld)", args), 0);
    ck_assert_int_eq(mso_schema_version(db, pool, &version, &err), APR_SUCCESS);
    ck_assert_int_eq(version, newer);

    ck_assert_int_eq(mso_schema_migrate(db, pool, &from, &to, &err), APR_EGENERAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "older than the schema") != NULL, "message: %s", err);
    ck_assert_msg(strstr(err, apr_ltoa(pool, (long)newer)) != NULL, "message: %s", err);
    ck_assert_int_eq(from, newer);
    ck_assert_int_eq(to, newer);
    /* Nothing was changed, and the connection is usable (no open transaction). */
    ck_assert_int_eq(num(db, "SELECT MAX(version) FROM msoauth_schema"), mso_schema_latest() + 1);
    {
        mso_connect_t in = sample("default", "x@example.com", "oid-x");

        connect_ok(db, &in, "r", "a", now);
    }
}
END_TEST

#define RACERS 3

START_TEST(concurrent_migrations)
{
    mso_db_t *db = fresh_db(_i);
    pid_t pids[RACERS];
    int go[2], i, status;
    char c;

    ck_assert_int_eq(pipe(go), 0);
    for (i = 0; i < RACERS; i++) {
        pids[i] = fork();
        ck_assert_int_ge(pids[i], 0);
        if (pids[i] == 0) {
            apr_pool_t *p;
            mso_db_t *mine;
            int from = -1, to = -1;
            const char *err = NULL;
            apr_status_t rv;

            close(go[1]);
            apr_pool_create(&p, NULL);
            mine = connect_db(_i, p);
            /* Start together: wait until the parent closes the pipe. */
            if (read(go[0], &c, 1) < 0) {
                _exit(3);
            }
            rv = mso_schema_migrate(mine, p, &from, &to, &err);
            if (rv != APR_SUCCESS) {
                fprintf(stderr, "racer %d: %s\n", i, err ? err : "(no message)");
                _exit(1);
            }
            _exit(to == mso_schema_latest() ? 0 : 2);
        }
    }
    close(go[0]);
    usleep(200000);
    close(go[1]);
    for (i = 0; i < RACERS; i++) {
        ck_assert_int_eq(waitpid(pids[i], &status, 0), pids[i]);
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                      "migration %d failed (status %d)", i, status);
    }
    ck_assert_int_eq(num(db, "SELECT MAX(version) FROM msoauth_schema"), mso_schema_latest());
    /* Each version once: no migration ran twice. */
    ck_assert_int_eq(num(db, "SELECT COUNT(DISTINCT version) FROM msoauth_schema"),
                     num(db, "SELECT COUNT(*) FROM msoauth_schema"));
    ck_assert_int_eq(num(db, "SELECT MAX(version) FROM msoauth_schema"), mso_schema_latest());
}
END_TEST

static void migrate_to_ok(mso_db_t *db, int version)
{
    int from = -1, to = -1;
    const char *err = NULL;

    ck_assert_msg(mso_schema_migrate_to(db, pool, version, &from, &to, &err) == APR_SUCCESS,
                  "migrate to %d: %s", version, err ? err : "");
    ck_assert_int_eq(to, version);
}

/* An account row as version 1 wrote it, with a refresh token. */
static apr_int64_t v1_account(mso_db_t *db, const char *mailbox, apr_int64_t expires,
                              const char *sealed)
{
    apr_int64_t now = 1700000000, id;
    const void *exp = expires ? (const void *)&expires : NULL;

    ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_accounts (company, mailbox, tenant_id, "
                               "object_id, state, authority, access_expires_at, created_at, "
                               "updated_at) VALUES ('default', %s, 'tid', 'oid', 'connected', "
                               "'https://login.microsoftonline.com/common', %lld, %lld, %lld)",
                           (const void *[]){mailbox, exp, &now, &now}), 0);
    id = num(db, apr_psprintf(pool, "SELECT id FROM msoauth_accounts WHERE mailbox = '%s'",
                              mailbox));
    ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_tokens (account_id, kind, sealed, "
                               "updated_at) VALUES (%lld, 'refresh', %s, %lld)",
                           (const void *[]){&id, sealed, &now}), 0);
    return id;
}

START_TEST(migrate_from_v1)
{
    mso_db_t *db = fresh_db(_i);
    apr_int64_t a, b;
    mso_account_t *got;
    int from = -1, to = -1;
    const char *err = NULL;
    long long v;

    /* A version 1 database with accounts. */
    migrate_to_ok(db, 1);
    a = v1_account(db, "alice@example.com", 1700003600, "r-a");
    b = v1_account(db, "bob@example.com", 0, "r-b");
    ck_assert_int_ne(select_num(db, "SELECT lease_owner FROM msoauth_accounts", &v), 0);

    /* A new connection, as after an upgrade of the module. */
    db = connect_db(_i, pool);
    ck_assert_int_eq(mso_schema_migrate(db, pool, &from, &to, &err), APR_SUCCESS);
    ck_assert_ptr_null(err);
    ck_assert_int_eq(from, 1);
    ck_assert_int_eq(to, mso_schema_latest());
    ck_assert_int_eq(num(db, "SELECT MAX(version) FROM msoauth_schema"), mso_schema_latest());

    /* Existing accounts are due when their token expires, or at once. */
    got = get_ok(db, a);
    ck_assert_int_eq(got->refresh_due_at, 1700003600);
    ck_assert_int_eq(got->error_runs, 0);
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_ptr_null(got->reason);
    ck_assert_int_eq(got->retry_at, 0);
    ck_assert_str_eq(got->kind, "delegated");
    ck_assert_ptr_null(got->client_id);
    ck_assert_int_eq(get_ok(db, b)->refresh_due_at, 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE refresh_due_at IS "
                             "NOT NULL AND error_runs = 0"), 2);
    token_is(db, a, "refresh", "r-a", 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_tokens WHERE binding = 1"), 2);
    {
        apr_array_header_t *due = NULL;

        ck_assert_int_eq(mso_account_claim_due(db, pool, "job", 1700000100, 60, 10, &due),
                         APR_SUCCESS);
        ck_assert_int_eq(due->nelts, 1);
        ck_assert_int_eq(APR_ARRAY_IDX(due, 0, mso_account_t *)->id, b);
    }
}
END_TEST

/* ---- version 4: tokens bound to client ID and account ------------------- */

#define CLIENT_ACME "6731DE76-14A6-49AE-97BC-6EBA6914391E"

static mso_keyring_t *keyring_of(unsigned char fill)
{
    unsigned char key[MSO_KEY_LEN];
    mso_keyring_t *kr = mso_keyring_create(pool);

    memset(key, fill, sizeof(key));
    ck_assert_int_eq(mso_keyring_add(kr, key), APR_SUCCESS);
    return kr;
}

/* What a version 3 build stored: "token:KIND:COMPANY:MAILBOX". */
static const char *legacy_sealed(const mso_keyring_t *kr, const char *company,
                                 const char *mailbox, const char *kind, const char *plain)
{
    const char *s = NULL;

    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_TOKEN,
                              apr_pstrcat(pool, "token:", kind, ":", company, ":", mailbox,
                                          NULL), plain, strlen(plain), &s), APR_SUCCESS);
    return s;
}

static apr_int64_t v3_account(mso_db_t *db, const char *company, const char *mailbox,
                              const char *state, const char *oid)
{
    apr_int64_t now = 1700000000;

    ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_accounts (company, mailbox, tenant_id, "
                               "object_id, state, authority, access_expires_at, created_at, "
                               "updated_at, refresh_due_at) VALUES (%s, %s, 'tid', %s, %s, "
                               "'https://login.microsoftonline.com/common', %lld, %lld, %lld, "
                               "%lld)",
                           (const void *[]){company, mailbox, oid, state, &now, &now, &now,
                                            &now}), 0);
    return num(db, apr_psprintf(pool, "SELECT id FROM msoauth_accounts WHERE company = '%s' "
                                "AND mailbox = '%s'", company, mailbox));
}

static void v3_token(mso_db_t *db, apr_int64_t id, const char *kind, const char *sealed)
{
    apr_int64_t now = 1700000000;

    ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_tokens (account_id, kind, sealed, "
                               "expires_at, updated_at) VALUES (%lld, %s, %s, %lld, %lld)",
                           (const void *[]){&id, kind, sealed, &now, &now}), 0);
}

static const char *client_of(void *baton, const char *company)
{
    (void)baton;
    return !strcmp(company, "acme") ? CLIENT_ACME : NULL;
}

static const char *open_ok(mso_db_t *db, const mso_keyring_t *kr, apr_int64_t id,
                           const char *kind)
{
    const char *plain = NULL;

    ck_assert_int_eq(mso_account_token_open(db, pool, kr, get_ok(db, id), kind, &plain, NULL),
                     APR_SUCCESS);
    return plain;
}

START_TEST(migrate_v3_to_v4_and_rebind)
{
    mso_db_t *db = fresh_db(_i);
    mso_keyring_t *kr = keyring_of(7), *other = keyring_of(9);
    apr_int64_t alice, bob, gone, orphan;
    mso_rebind_t n;
    const char *plain = NULL, *err = NULL, *sealed = NULL;
    int from = -1, to = -1;

    /* A version 3 database: accounts of acme (its client ID known now) and of
     * a company no longer configured, one disconnected, tokens as v3 sealed
     * them, one sealed by a key that is gone. */
    migrate_to_ok(db, 3);
    alice = v3_account(db, "acme", "alice@acme.com", "connected", "oid-alice");
    bob = v3_account(db, "acme", "bob@acme.com", "connected", "oid-bob");
    gone = v3_account(db, "acme", "gone@acme.com", "disconnected", "oid-gone");
    orphan = v3_account(db, "oldco", "carol@oldco.com", "connected", "oid-carol");
    v3_token(db, alice, "refresh", legacy_sealed(kr, "acme", "alice@acme.com", "refresh",
                                                 "RT-alice"));
    v3_token(db, alice, "graph", legacy_sealed(kr, "acme", "alice@acme.com", "graph",
                                               "AT-alice"));
    v3_token(db, bob, "refresh", legacy_sealed(other, "acme", "bob@acme.com", "refresh",
                                               "RT-bob"));
    v3_token(db, orphan, "refresh", legacy_sealed(kr, "oldco", "carol@oldco.com", "refresh",
                                                  "RT-carol"));

    db = connect_db(_i, pool);
    ck_assert_int_eq(mso_schema_migrate(db, pool, &from, &to, &err), APR_SUCCESS);
    ck_assert_int_eq(from, 3);
    ck_assert_int_eq(to, mso_schema_latest());
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_tokens WHERE binding = 1"), 4);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE kind = 'delegated' "
                             "AND client_id IS NULL"), 4);
    /* Disconnected accounts belong to nobody any more. */
    ck_assert_ptr_null(get_ok(db, gone)->object_id);
    ck_assert_ptr_null(get_ok(db, gone)->tenant_id);
    ck_assert_str_eq(get_ok(db, alice)->object_id, "oid-alice");

    /* Before the rebind, the normal path does not open binding 1. */
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, get_ok(db, alice), "refresh",
                                            &plain, NULL), MSO_ACCOUNT_UNBOUND);

    ck_assert_int_eq(mso_account_rebind(db, pool, kr, client_of, NULL, &n, &err), APR_SUCCESS);
    ck_assert_int_eq(n.accounts, 3);        /* acme's, the disconnected one too */
    ck_assert_int_eq(n.tokens, 2);          /* alice's refresh and graph */
    ck_assert_int_eq(n.unopened, 1);        /* bob's: its key is not in the ring */
    ck_assert_int_eq(n.no_client, 1);       /* carol's company has no client ID here */
    ck_assert_str_eq(get_ok(db, alice)->client_id, "6731de76-14a6-49ae-97bc-6eba6914391e");
    ck_assert_ptr_null(get_ok(db, orphan)->client_id);
    ck_assert_str_eq(open_ok(db, kr, alice, "refresh"), "RT-alice");
    ck_assert_str_eq(open_ok(db, kr, alice, "graph"), "AT-alice");
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_tokens WHERE "
                                          "binding = 2 AND account_id = %" APR_INT64_T_FMT,
                                          alice)), 2);
    /* What could not be rebound stays as it was, and does not open. */
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, get_ok(db, bob), "refresh", &plain,
                                            NULL), MSO_ACCOUNT_UNBOUND);
    ck_assert_int_eq(mso_account_token_open(db, pool, kr, get_ok(db, orphan), "refresh",
                                            &plain, NULL), MSO_ACCOUNT_UNBOUND);
    /* The new binding: the same sealed value does not open as another account's. */
    ck_assert_int_eq(mso_account_token_get(db, pool, alice, "refresh", &sealed, NULL),
                     APR_SUCCESS);
    {
        unsigned char *out = NULL;
        apr_size_t len = 0;

        ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN,
                                  mso_token_aad(pool, CLIENT_ACME, alice, "refresh"), sealed,
                                  &out, &len), APR_SUCCESS);
        ck_assert_str_eq(mso_token_aad(pool, CLIENT_ACME, alice, "refresh"),
                         apr_psprintf(pool, "token:v2:refresh:"
                                      "6731de76-14a6-49ae-97bc-6eba6914391e:%" APR_INT64_T_FMT,
                                      alice));
        ck_assert_int_ne(mso_open(pool, kr, MSO_PURPOSE_TOKEN,
                                  mso_token_aad(pool, CLIENT_ACME, bob, "refresh"), sealed,
                                  &out, &len), APR_SUCCESS);
    }

    /* Again (another child starting): nothing left to do. */
    ck_assert_int_eq(mso_account_rebind(db, pool, kr, client_of, NULL, &n, &err), APR_SUCCESS);
    ck_assert_int_eq(n.accounts, 0);
    ck_assert_int_eq(n.tokens, 0);
    ck_assert_str_eq(open_ok(db, kr, alice, "refresh"), "RT-alice");
    /* Once the key is back, a later start rebinds the rest. */
    {
        mso_keyring_t *both = keyring_of(7);
        unsigned char key[MSO_KEY_LEN];

        memset(key, 9, sizeof(key));
        ck_assert_int_eq(mso_keyring_add(both, key), APR_SUCCESS);
        ck_assert_int_eq(mso_account_rebind(db, pool, both, client_of, NULL, &n, &err),
                         APR_SUCCESS);
        ck_assert_int_eq(n.tokens, 1);
        ck_assert_str_eq(open_ok(db, both, bob, "refresh"), "RT-bob");
    }
}
END_TEST

/* SQLite only: the error names the cause and what the administrator checks. */
START_TEST(sqlite_readonly_error)
{
    mso_db_t *db = fresh_db(BACKEND_SQLITE);
    const apr_dbd_driver_t *driver = db->driver;
    apr_dbd_t *handle = NULL;
    const char *error = NULL, *err = NULL;
    mso_db_t *ro;
    int from = -1, to = -1;

    exec_ok(db, "CREATE TABLE unrelated (a INTEGER)");  /* make the file exist */
    ck_assert_int_eq(apr_dbd_open_ex(driver, pool,
                                     apr_pstrcat(pool, "file:", sqlite_path, "?mode=ro", NULL),
                                     &handle, &error), APR_SUCCESS);
    ck_assert_int_eq(mso_db_wrap(pool, driver, handle, &ro), APR_SUCCESS);
    ck_assert_int_eq(mso_schema_migrate(ro, pool, &from, &to, &err), APR_EGENERAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "msoauth_") && strstr(err, "readonly") &&
                  strstr(err, "check that the httpd user can write"), "message: %s", err);
    ck_assert_int_eq(from, 0);
    ck_assert_int_eq(to, 0);
    apr_dbd_close(driver, handle);
}
END_TEST

static void add_tests(TCase *tc, int backend)
{
    ADD_BOTH(tc, migrate_creates_schema, backend);
    ADD_BOTH(tc, migrate_again_is_noop, backend);
    ADD_BOTH(tc, newer_schema_refused, backend);
    ADD_BOTH(tc, concurrent_migrations, backend);
    ADD_BOTH(tc, migrate_from_v1, backend);
    ADD_BOTH(tc, migrate_v3_to_v4_and_rebind, backend);
    if (backend == BACKEND_SQLITE) {
        tcase_add_test(tc, sqlite_readonly_error);
    }
}

int main(void)
{
    return dbtest_main("schema", add_tests);
}
