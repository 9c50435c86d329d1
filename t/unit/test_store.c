/* The database layer (lib/mso_store) against real databases: every test runs
 * once on SQLite (a temporary file) and once on PostgreSQL (MSO_TEST_PGSQL,
 * the apr_dbd params of a cluster started by t/pgcluster.sh). */
#include <check.h>

#include "unit.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <apr_dbd.h>
#include <apr_general.h>
#include <apr_strings.h>
#include <apr_tables.h>

#include "mso_mirror.h"
#include "mso_store.h"

#define BACKEND_SQLITE 0
#define BACKEND_PGSQL 1

static apr_pool_t *pool;
static char tmpdir[64];
static char sqlite_path[128];

static void setup(void)
{
    apr_pool_create(&pool, NULL);
    tmpdir[0] = sqlite_path[0] = '\0';
}

static void teardown(void)
{
    static const char *const suffix[] = {"", "-wal", "-shm", "-journal"};
    char path[160];
    size_t i;

    apr_pool_destroy(pool);
    if (!tmpdir[0]) {
        return;
    }
    for (i = 0; i < sizeof(suffix) / sizeof(suffix[0]); i++) {
        snprintf(path, sizeof(path), "%s%s", sqlite_path, suffix[i]);
        unlink(path);
    }
    rmdir(tmpdir);
}

typedef struct {
    const apr_dbd_driver_t *driver;
    apr_dbd_t *handle;
} conn_t;

static apr_status_t close_conn(void *data)
{
    conn_t *c = data;

    apr_dbd_close(c->driver, c->handle);
    return APR_SUCCESS;
}

/* A new connection of its own (each forked process needs one), closed with p. */
static mso_db_t *connect_db(int backend, apr_pool_t *p)
{
    const apr_dbd_driver_t *driver;
    apr_dbd_t *handle = NULL;
    const char *params, *error = NULL;
    mso_db_t *db;
    apr_status_t rv;

    if (backend == BACKEND_PGSQL) {
        params = getenv("MSO_TEST_PGSQL");
        ck_assert_msg(params && *params,
                      "MSO_TEST_PGSQL is not set: run scripts/test.sh or t/pgcluster.sh");
    }
    else {
        if (!sqlite_path[0]) {     /* one database file per test */
            strcpy(tmpdir, "/tmp/mso-store-XXXXXX");
            ck_assert_ptr_nonnull(mkdtemp(tmpdir));
            snprintf(sqlite_path, sizeof(sqlite_path), "%s/msoauth.db", tmpdir);
        }
        params = sqlite_path;
    }
    rv = apr_dbd_get_driver(p, backend == BACKEND_PGSQL ? "pgsql" : "sqlite3", &driver);
    ck_assert_msg(rv == APR_SUCCESS, "apr_dbd driver %s not available (rv %d): install "
                  "libaprutil1-dbd-sqlite3 / libaprutil1-dbd-pgsql",
                  backend == BACKEND_PGSQL ? "pgsql" : "sqlite3", rv);
    rv = apr_dbd_open_ex(driver, p, params, &handle, &error);
    ck_assert_msg(rv == APR_SUCCESS, "cannot open database '%s': %s", params,
                  error ? error : "(no message)");
    {
        conn_t *c = apr_palloc(p, sizeof(*c));

        c->driver = driver;
        c->handle = handle;
        apr_pool_cleanup_register(p, c, close_conn, apr_pool_cleanup_null);
    }
    /* The wrapper in a subpool: it must not outlive the connection. */
    {
        apr_pool_t *wp;

        apr_pool_create(&wp, p);
        ck_assert_int_eq(mso_db_wrap(wp, driver, handle, &db), APR_SUCCESS);
    }
    return db;
}

static void exec_ok(mso_db_t *db, const char *sql)
{
    int n = 0;
    int rc = apr_dbd_query(db->driver, db->handle, &n, sql);

    ck_assert_msg(rc == 0, "%s: %s", sql, apr_dbd_error(db->driver, db->handle, rc));
}

/* A clean database for the test: the SQLite file is new; on PostgreSQL the
 * tables of an earlier test are dropped. */
static mso_db_t *fresh_db(int backend)
{
    mso_db_t *db = connect_db(backend, pool);

    if (backend == BACKEND_PGSQL) {
        exec_ok(db, "DROP TABLE IF EXISTS msoauth_tokens, msoauth_sync_folders, "
                    "msoauth_flows_used, msoauth_job_runs, msoauth_actions, msoauth_messages, "
                    "msoauth_accounts, msoauth_schema "
                    "CASCADE");
    }
    return db;
}

/* Runs a select without values; returns 0 and the first column as a number,
 * or the driver's error code. */
static int select_num(mso_db_t *db, const char *sql, long long *value)
{
    apr_dbd_results_t *res = NULL;
    apr_dbd_row_t *row = NULL;
    const char *v;
    int rc;

    *value = -1;
    rc = apr_dbd_select(db->driver, pool, db->handle, &res, sql, 1);
    if (rc != 0) {
        return rc;
    }
    if (apr_dbd_get_row(db->driver, pool, res, &row, -1) == 0) {
        v = apr_dbd_get_entry(db->driver, row, 0);
        *value = (v && *v) ? atoll(v) : 0;
        while (apr_dbd_get_row(db->driver, pool, res, &row, -1) == 0) {
        }
    }
    return 0;
}

static long long num(mso_db_t *db, const char *sql)
{
    long long v;
    int rc = select_num(db, sql, &v);

    ck_assert_msg(rc == 0, "%s: %s", sql, apr_dbd_error(db->driver, db->handle, rc));
    return v;
}

/* A prepared statement with binary args, run once; returns the driver code. */
static int pexec(mso_db_t *db, const char *sql, const void **args)
{
    apr_dbd_prepared_t *st = NULL;
    int n = 0, rc;

    rc = apr_dbd_prepare(db->driver, pool, db->handle, sql, NULL, &st);
    if (rc != 0) {
        return rc;
    }
    return apr_dbd_pbquery(db->driver, pool, db->handle, &n, st, args);
}

static void migrate_ok(mso_db_t *db)
{
    int from = -1, to = -1;
    const char *err = NULL;
    apr_status_t rv = mso_store_migrate(db, &from, &to, &err);

    ck_assert_msg(rv == APR_SUCCESS, "migrate: %s", err ? err : "(no message)");
    ck_assert_int_eq(to, mso_store_latest_version());
}

static mso_account_t sample(const char *company, const char *mailbox)
{
    mso_account_t a;

    memset(&a, 0, sizeof(a));
    a.company = company;
    a.mailbox = mailbox;
    a.display_name = "Alice Example";
    a.tenant_id = "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a";
    a.object_id = "11111111-2222-3333-4444-555555555555";
    a.scopes = "openid profile email offline_access Mail.Read";
    a.authority = "https://login.microsoftonline.com/common";
    a.access_expires_at = 1700003600;
    a.connected_by = "admin";
    return a;
}

static void connect_ok(mso_db_t *db, mso_account_t *a, const char *refresh, const char *access,
                       apr_int64_t now)
{
    const char *err = NULL;
    apr_status_t rv = mso_store_account_connect(db, a, refresh, access, now, &err);

    ck_assert_msg(rv == APR_SUCCESS, "account_connect: %s", err ? err : "(no message)");
    ck_assert_int_gt(a->id, 0);
}

static void token_is(mso_db_t *db, apr_int64_t id, const char *kind, const char *sealed,
                     apr_int64_t expires)
{
    const char *got = NULL;
    apr_int64_t exp = -1;

    ck_assert_int_eq(mso_store_token_get(db, pool, id, kind, &got, &exp), APR_SUCCESS);
    ck_assert_str_eq(got, sealed);
    ck_assert_int_eq(exp, expires);
}

/* ------------------------------------------------------------------------- */

static const char *const schema_columns[][20] = {
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
};

START_TEST(migrate_creates_schema)
{
    mso_db_t *db = fresh_db(_i);
    int from = -1, to = -1, version = -1;
    const char *err = NULL;
    long long v;
    size_t t, c;

    ck_assert_int_eq(mso_store_schema_version(db, &version), APR_SUCCESS);
    ck_assert_int_eq(version, 0);
    ck_assert_int_eq(mso_store_migrate(db, &from, &to, &err), APR_SUCCESS);
    ck_assert_ptr_null(err);
    ck_assert_int_eq(from, 0);
    ck_assert_int_eq(to, mso_store_latest_version());
    ck_assert_int_eq(mso_store_latest_version(), 3);
    ck_assert_int_eq(mso_store_schema_version(db, &version), APR_SUCCESS);
    ck_assert_int_eq(version, mso_store_latest_version());

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
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_schema"),
                     mso_store_latest_version());

    if (_i == BACKEND_SQLITE) {
        ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND "
                                 "name IN ('msoauth_messages_recent', 'msoauth_actions_queue', "
                                 "'msoauth_accounts_due')"), 3);
    }
    else {
        ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM pg_indexes WHERE indexname IN "
                                 "('msoauth_messages_recent', 'msoauth_actions_queue', "
                                 "'msoauth_accounts_due')"), 3);
    }

    /* Defaults and checks an application relies on when it queues an action. */
    {
        mso_account_t a = sample("default", "alice@example.com");
        const void *args[2];

        connect_ok(db, &a, "sealed-r", "sealed-a", 1700000000);
        args[0] = &a.id;
        args[1] = "AAMkAD-1";
        ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_actions (account_id, graph_id, action) "
                                   "VALUES (%lld, %s, 'mark_read')", args), 0);
        ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_actions WHERE state = 'queued' "
                                 "AND attempts = 0 AND created_at > 1600000000"), 1);
        ck_assert_int_ne(pexec(db, "INSERT INTO msoauth_actions (account_id, graph_id, action) "
                                   "VALUES (%lld, %s, 'explode')", args), 0);
    }
}
END_TEST

START_TEST(migrate_again_is_noop)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t a = sample("default", "alice@example.com");
    mso_account_t *got;
    int from = -1, to = -1;
    const char *err = NULL;

    migrate_ok(db);
    connect_ok(db, &a, "sealed-r", "sealed-a", 1700000000);
    ck_assert_int_eq(mso_store_migrate(db, &from, &to, &err), APR_SUCCESS);
    ck_assert_int_eq(from, mso_store_latest_version());
    ck_assert_int_eq(to, mso_store_latest_version());

    /* A second connection (another child) finds nothing to do either. */
    db = connect_db(_i, pool);
    ck_assert_int_eq(mso_store_migrate(db, &from, &to, &err), APR_SUCCESS);
    ck_assert_int_eq(from, mso_store_latest_version());
    ck_assert_int_eq(to, mso_store_latest_version());
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_schema"),
                     mso_store_latest_version());
    ck_assert_int_eq(mso_store_account_get(db, pool, a.id, &got), APR_SUCCESS);
    ck_assert_str_eq(got->mailbox, "alice@example.com");
    token_is(db, a.id, "refresh", "sealed-r", 0);
}
END_TEST

START_TEST(newer_schema_refused)
{
    mso_db_t *db = fresh_db(_i);
    int newer = mso_store_latest_version() + 1, version = -1, from = -1, to = -1;
    apr_int64_t now = 1700000000;
    const void *args[2] = {&newer, &now};
    const char *err = NULL;

    migrate_ok(db);
    ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_schema (version, applied_at) "
                               "VALUES (%d, %lld)", args), 0);
    ck_assert_int_eq(mso_store_schema_version(db, &version), APR_SUCCESS);
    ck_assert_int_eq(version, newer);

    ck_assert_int_eq(mso_store_migrate(db, &from, &to, &err), APR_EGENERAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "older than the schema") != NULL, "message: %s", err);
    ck_assert_msg(strstr(err, apr_itoa(pool, newer)) != NULL, "message: %s", err);
    ck_assert_int_eq(from, newer);
    ck_assert_int_eq(to, newer);
    /* Nothing was changed, and the connection is usable (no open transaction). */
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_schema"),
                     mso_store_latest_version() + 1);
    {
        mso_account_t a = sample("default", "x@example.com");

        connect_ok(db, &a, "r", "a", now);
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
            rv = mso_store_migrate(mine, &from, &to, &err);
            if (rv != APR_SUCCESS) {
                fprintf(stderr, "racer %d: %s\n", i, err ? err : "(no message)");
                _exit(1);
            }
            _exit(to == mso_store_latest_version() ? 0 : 2);
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
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_schema"),
                     mso_store_latest_version());
    ck_assert_int_eq(num(db, "SELECT COUNT(DISTINCT version) FROM msoauth_schema"),
                     mso_store_latest_version());
    ck_assert_int_eq(num(db, "SELECT MAX(version) FROM msoauth_schema"),
                     mso_store_latest_version());
}
END_TEST

START_TEST(connect_insert_then_update)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t a = sample("default", "Alice@Example.COM");
    mso_account_t b, *got;
    apr_int64_t first_id, big = APR_INT64_C(5000000000);
    const void *args[1];

    migrate_ok(db);
    a.access_expires_at = big;      /* does not fit 32 bits */
    connect_ok(db, &a, "sealed-refresh-1", "sealed-access-1", 1700000000);
    first_id = a.id;
    ck_assert_str_eq(a.state, "connected");

    ck_assert_int_eq(mso_store_account_get(db, pool, first_id, &got), APR_SUCCESS);
    ck_assert_int_eq(got->id, first_id);
    ck_assert_str_eq(got->company, "default");
    ck_assert_str_eq(got->mailbox, "alice@example.com");
    ck_assert_str_eq(got->display_name, "Alice Example");
    ck_assert_str_eq(got->tenant_id, "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a");
    ck_assert_str_eq(got->object_id, "11111111-2222-3333-4444-555555555555");
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

    /* The job later marks it and caches an Outlook token. */
    args[0] = &first_id;
    ck_assert_int_eq(pexec(db, "UPDATE msoauth_accounts SET state = 'reconnect_required', "
                               "last_error = 'reconnect_required', last_sync_at = 1700000500 "
                               "WHERE id = %lld", args), 0);
    ck_assert_int_eq(pexec(db, "INSERT INTO msoauth_tokens (account_id, kind, sealed, "
                               "updated_at) VALUES (%lld, 'outlook', 'old-outlook', 1)", args),
                     0);

    /* Reconnect: same row, new tokens, created_at kept. */
    b = sample("default", "alice@EXAMPLE.com");
    b.display_name = "Alice Renamed";
    b.tenant_id = NULL;             /* not given this time: kept */
    b.scopes = "openid profile email offline_access Mail.ReadWrite";
    b.access_expires_at = 1700007200;
    b.connected_by = "bob";
    connect_ok(db, &b, "sealed-refresh-2", "sealed-access-2", 1700003000);
    ck_assert_int_eq(b.id, first_id);
    ck_assert_int_eq(b.created_at, 1700000000);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts"), 1);

    ck_assert_int_eq(mso_store_account_get(db, pool, first_id, &got), APR_SUCCESS);
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

        ck_assert_int_eq(mso_store_token_get(db, pool, first_id, "outlook", &s, NULL),
                         APR_NOTFOUND);
    }
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_tokens"), 2);
}
END_TEST

START_TEST(connect_rejects_missing_values)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t a = sample("default", "alice@example.com");
    mso_account_t b, *got;
    const char *err = NULL;

    migrate_ok(db);
    connect_ok(db, &a, "sealed-r", "sealed-a", 1700000000);

    b = sample("default", "alice@example.com");
    b.display_name = "Changed";
    ck_assert_int_eq(mso_store_account_connect(db, &b, NULL, "new-a", 1700000100, &err),
                     APR_EINVAL);
    ck_assert_ptr_nonnull(err);
    err = NULL;
    ck_assert_int_eq(mso_store_account_connect(db, &b, "", "new-a", 1700000100, &err),
                     APR_EINVAL);
    ck_assert_ptr_nonnull(err);
    b.mailbox = NULL;
    err = NULL;
    ck_assert_int_eq(mso_store_account_connect(db, &b, "r", "a", 1700000100, &err),
                     APR_EINVAL);
    ck_assert_ptr_nonnull(err);

    token_is(db, a.id, "refresh", "sealed-r", 0);
    token_is(db, a.id, "graph", "sealed-a", 1700003600);
    ck_assert_int_eq(mso_store_account_get(db, pool, a.id, &got), APR_SUCCESS);
    ck_assert_str_eq(got->display_name, "Alice Example");
    ck_assert_int_eq(got->updated_at, 1700000000);
}
END_TEST

START_TEST(connect_rolls_back_on_db_error)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t a = sample("default", "alice@example.com");
    mso_account_t b, c, *got;
    const char *err = NULL;

    migrate_ok(db);
    connect_ok(db, &a, "sealed-r", "sealed-a", 1700000000);

    /* Make the second token insert fail inside the transaction, after the
     * account row was updated and the old tokens deleted. */
    if (_i == BACKEND_SQLITE) {
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

    b = sample("default", "alice@example.com");
    b.display_name = "Should Not Stick";
    ck_assert_int_eq(mso_store_account_connect(db, &b, "new-r", "FAIL", 1700000100, &err),
                     APR_EGENERAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "forced failure") != NULL, "message: %s", err);
    token_is(db, a.id, "refresh", "sealed-r", 0);
    token_is(db, a.id, "graph", "sealed-a", 1700003600);
    ck_assert_int_eq(mso_store_account_get(db, pool, a.id, &got), APR_SUCCESS);
    ck_assert_str_eq(got->display_name, "Alice Example");
    ck_assert_int_eq(got->updated_at, 1700000000);

    /* A new account whose tokens fail leaves no row behind. */
    c = sample("default", "carol@example.com");
    err = NULL;
    ck_assert_int_eq(mso_store_account_connect(db, &c, "r", "FAIL", 1700000100, &err),
                     APR_EGENERAL);
    ck_assert_int_eq(mso_store_account_find(db, pool, "default", "carol@example.com", &got),
                     APR_NOTFOUND);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts"), 1);

    /* The connection is still usable, also after more schema changes. */
    exec_ok(db, _i == BACKEND_SQLITE ? "DROP TRIGGER msoauth_test_fail"
                                     : "DROP TRIGGER msoauth_test_fail ON msoauth_tokens");
    connect_ok(db, &c, "r", "a", 1700000200);
    connect_ok(db, &b, "new-r", "new-a", 1700000200);
    token_is(db, a.id, "graph", "new-a", 1700003600);
}
END_TEST

START_TEST(mailbox_case_and_uniqueness)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t a = sample("acme", "Bob@X.COM");
    mso_account_t b = sample("acme", "bob@x.com");
    mso_account_t c = sample("other", "BOB@x.com");
    mso_account_t *got;
    apr_int64_t now = 1;

    migrate_ok(db);
    connect_ok(db, &a, "r1", "a1", 1700000000);
    connect_ok(db, &b, "r2", "a2", 1700000001);
    connect_ok(db, &c, "r3", "a3", 1700000002);
    ck_assert_int_eq(a.id, b.id);
    ck_assert_int_ne(a.id, c.id);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts"), 2);
    ck_assert_int_eq(mso_store_account_find(db, pool, "acme", "BOB@x.Com", &got), APR_SUCCESS);
    ck_assert_int_eq(got->id, a.id);
    ck_assert_str_eq(got->mailbox, "bob@x.com");
    ck_assert_int_eq(mso_store_account_find(db, pool, "other", "bob@x.com", &got), APR_SUCCESS);
    ck_assert_int_eq(got->id, c.id);
    ck_assert_int_eq(mso_store_account_find(db, pool, "ACME", "bob@x.com", &got),
                     APR_NOTFOUND);

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
    mso_account_t a = sample(nasty2, nasty);
    mso_account_t *got;

    migrate_ok(db);
    a.display_name = nasty;
    a.connected_by = nasty2;
    a.scopes = nasty;
    connect_ok(db, &a, nasty, nasty2, 1700000000);

    ck_assert_int_eq(mso_store_account_get(db, pool, a.id, &got), APR_SUCCESS);
    ck_assert_str_eq(got->company, nasty2);
    ck_assert_str_eq(got->mailbox, "o'brien@x.com'; drop table msoauth_accounts;--");
    ck_assert_str_eq(got->display_name, nasty);
    ck_assert_str_eq(got->connected_by, nasty2);
    ck_assert_str_eq(got->scopes, nasty);
    ck_assert_int_eq(mso_store_account_find(db, pool, nasty2, nasty, &got), APR_SUCCESS);
    ck_assert_int_eq(got->id, a.id);
    token_is(db, a.id, "refresh", nasty, 0);
    token_is(db, a.id, "graph", nasty2, 1700003600);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts"), 1);
}
END_TEST

START_TEST(not_found)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t a = sample("default", "alice@example.com");
    mso_account_t *got = (mso_account_t *)1;
    const char *sealed = "x";
    apr_int64_t exp = 7;

    migrate_ok(db);
    ck_assert_int_eq(mso_store_account_get(db, pool, 424242, &got), APR_NOTFOUND);
    ck_assert_ptr_null(got);
    ck_assert_int_eq(mso_store_account_find(db, pool, "default", "nobody@example.com", &got),
                     APR_NOTFOUND);
    connect_ok(db, &a, "r", NULL, 1700000000);     /* no access token given */
    ck_assert_int_eq(mso_store_token_get(db, pool, a.id, "graph", &sealed, &exp),
                     APR_NOTFOUND);
    ck_assert_ptr_null(sealed);
    ck_assert_int_eq(mso_store_token_get(db, pool, a.id + 1, "refresh", &sealed, &exp),
                     APR_NOTFOUND);
    ck_assert_int_eq(mso_store_token_get(db, pool, a.id, "refresh", &sealed, &exp),
                     APR_SUCCESS);
}
END_TEST

START_TEST(flow_states_are_single_use)
{
    mso_db_t *db = fresh_db(_i);

    migrate_ok(db);
    ck_assert_int_eq(mso_store_flow_consume(db, "digest-one", 2000, 1000), APR_SUCCESS);
    ck_assert_int_eq(mso_store_flow_consume(db, "digest-one", 2000, 1001), APR_EEXIST);
    ck_assert_int_eq(mso_store_flow_consume(db, "digest-two", 2000, 1001), APR_SUCCESS);
    /* Once expired the digest is purged, so the table does not grow forever;
     * the cookie's own expiry already refuses such a late replay. */
    ck_assert_int_eq(mso_store_flow_consume(db, "digest-three", 3000, 2500), APR_SUCCESS);
    ck_assert_int_eq(mso_store_flow_consume(db, "digest-one", 3000, 2501), APR_SUCCESS);
    ck_assert_int_eq(mso_store_flow_consume(db, "", 3000, 2501), APR_EINVAL);
    ck_assert_str_eq(mso_token_aad(pool, "acme", "A@Example.com", "refresh"),
                     "token:refresh:acme:a@example.com");
}
END_TEST

START_TEST(wrap_reuses_wrapper)
{
    mso_db_t *db = fresh_db(_i);
    mso_db_t *again = NULL;

    ck_assert_int_eq(db->kind, _i == BACKEND_SQLITE ? MSO_DB_SQLITE : MSO_DB_PGSQL);
    ck_assert_int_eq(mso_db_wrap(db->pool, db->driver, db->handle, &again), APR_SUCCESS);
    ck_assert_ptr_eq(again, db);
    migrate_ok(again);
}
END_TEST

/* ---- schema v2: the background job ------------------------------------- */

static const char *const v2_columns[] = {
    "refresh_due_at", "retry_at", "error_runs", "reason", "aadsts", "last_refresh_at",
    "lease_owner", "lease_until", NULL
};

static const char *const v3_columns[][2] = {
    {"msoauth_accounts", "sync_due_at"}, {"msoauth_accounts", "sync_retry_at"},
    {"msoauth_accounts", "sync_phase"}, {"msoauth_accounts", "sync_error"},
    {"msoauth_accounts", "sync_error_runs"}, {"msoauth_accounts", "auth_retry"},
    {"msoauth_accounts", "work_owner"}, {"msoauth_accounts", "work_until"},
    {"msoauth_sync_folders", "round"}, {"msoauth_sync_folders", "last_sync_at"},
    {"msoauth_sync_folders", "resyncs"}, {"msoauth_messages", "sync_round"},
    {"msoauth_actions", "sent_at"}, {"msoauth_actions", "reason"}, {NULL, NULL}
};

START_TEST(migrate_from_v1)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t a = sample("default", "alice@example.com");
    mso_account_t b = sample("default", "bob@example.com");
    mso_account_t *got;
    int from = -1, to = -1;
    const char *err = NULL;
    long long v;
    size_t i;

    /* A version 1 database with accounts: the latest schema taken back to 1. */
    migrate_ok(db);
    b.access_expires_at = 0;
    connect_ok(db, &a, "r-a", "a-a", 1700000000);
    connect_ok(db, &b, "r-b", NULL, 1700000000);
    exec_ok(db, "DROP INDEX msoauth_accounts_due");
    for (i = 0; v2_columns[i]; i++) {
        exec_ok(db, apr_pstrcat(pool, "ALTER TABLE msoauth_accounts DROP COLUMN ",
                                v2_columns[i], NULL));
    }
    exec_ok(db, "DROP TABLE msoauth_job_runs");
    /* ... and without version 3's columns. */
    exec_ok(db, "DROP INDEX msoauth_messages_folder");
    for (i = 0; v3_columns[i][0]; i++) {
        exec_ok(db, apr_pstrcat(pool, "ALTER TABLE ", v3_columns[i][0], " DROP COLUMN ",
                                v3_columns[i][1], NULL));
    }
    exec_ok(db, "DELETE FROM msoauth_schema WHERE version > 1");
    ck_assert_int_ne(select_num(db, "SELECT lease_owner FROM msoauth_accounts", &v), 0);

    /* A new connection, as after an upgrade of the module. */
    db = connect_db(_i, pool);
    ck_assert_int_eq(mso_store_migrate(db, &from, &to, &err), APR_SUCCESS);
    ck_assert_ptr_null(err);
    ck_assert_int_eq(from, 1);
    ck_assert_int_eq(to, 3);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_schema"), 3);

    /* Existing accounts are due when their token expires, or at once. */
    ck_assert_int_eq(mso_store_account_get(db, pool, a.id, &got), APR_SUCCESS);
    ck_assert_int_eq(got->refresh_due_at, 1700003600);
    ck_assert_int_eq(got->error_runs, 0);
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_ptr_null(got->reason);
    ck_assert_int_eq(got->retry_at, 0);
    ck_assert_int_eq(mso_store_account_get(db, pool, b.id, &got), APR_SUCCESS);
    ck_assert_int_eq(got->refresh_due_at, 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE refresh_due_at IS "
                             "NOT NULL AND error_runs = 0"), 2);
    token_is(db, a.id, "refresh", "r-a", 0);
    {
        apr_array_header_t *due = NULL;

        ck_assert_int_eq(mso_store_claim_due(db, pool, "job", 1700000100, 60, 10, &due),
                         APR_SUCCESS);
        ck_assert_int_eq(due->nelts, 1);
        ck_assert_int_eq(APR_ARRAY_IDX(due, 0, mso_account_t *)->id, b.id);
    }
}
END_TEST

/* An account due at `due` (0: now). */
static mso_account_t *due_account(mso_db_t *db, const char *mailbox, apr_int64_t due,
                                  apr_int64_t now)
{
    mso_account_t *a = apr_palloc(pool, sizeof(*a));

    *a = sample("default", mailbox);
    a->refresh_due_at = due;
    connect_ok(db, a, "sealed-r", "sealed-a", now);
    return a;
}

static mso_account_t *get_ok(mso_db_t *db, apr_int64_t id)
{
    mso_account_t *got = NULL;

    ck_assert_int_eq(mso_store_account_get(db, pool, id, &got), APR_SUCCESS);
    return got;
}

static int claim_count(mso_db_t *db, const char *owner, apr_int64_t now, int lease, int max)
{
    apr_array_header_t *due = NULL;

    ck_assert_int_eq(mso_store_claim_due(db, pool, owner, now, lease, max, &due),
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
    ck_assert_int_eq(mso_store_claim_due(db, pool, "A", 1000, 60, 10, &due), APR_SUCCESS);
    ck_assert_int_eq(due->nelts, 1);
    acc = APR_ARRAY_IDX(due, 0, mso_account_t *);
    ck_assert_int_eq(acc->id, a->id);
    ck_assert_str_eq(acc->lease_owner, "A");
    ck_assert_int_eq(acc->lease_until, 1060);
    ck_assert_str_eq(acc->mailbox, "alice@example.com");
    ck_assert_str_eq(acc->authority, "https://login.microsoftonline.com/common");

    /* B gets nothing while A's lease lasts, by claim or by lease. */
    ck_assert_int_eq(claim_count(db, "B", 1030, 60, 10), 0);
    ck_assert_int_eq(mso_store_lease(db, a->id, "B", 1030, 60), APR_EBUSY);
    ck_assert_int_eq(mso_store_lease(db, a->id, "B", 1060, 60), APR_EBUSY);
    ck_assert_int_eq(mso_store_lease(db, a->id + 1000, "B", 1030, 60), APR_NOTFOUND);
    /* A may extend its own. */
    ck_assert_int_eq(mso_store_lease(db, a->id, "A", 1030, 60), APR_SUCCESS);
    ck_assert_int_eq(get_ok(db, a->id)->lease_until, 1090);
    ck_assert_int_eq(claim_count(db, "B", 1090, 60, 10), 0);
    /* Once it ran out, B can claim it. */
    ck_assert_int_eq(claim_count(db, "B", 1091, 60, 10), 1);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->lease_owner, "B");
    ck_assert_int_eq(got->lease_until, 1151);
    ck_assert_int_eq(mso_store_lease(db, a->id, "A", 1100, 60), APR_EBUSY);

    /* Only the owner releases. */
    ck_assert_int_eq(mso_store_release(db, a->id, "A"), APR_SUCCESS);
    ck_assert_str_eq(get_ok(db, a->id)->lease_owner, "B");
    ck_assert_int_eq(mso_store_release(db, a->id, "B"), APR_SUCCESS);
    got = get_ok(db, a->id);
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_int_eq(got->lease_until, 0);
    /* The token handler leases any account, due or not. */
    ck_assert_int_eq(mso_store_lease(db, later->id, "A", 1100, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_store_lease(db, later->id, "B", 1100, 60), APR_EBUSY);
    ck_assert_int_eq(mso_store_release(db, later->id, "A"), APR_SUCCESS);

    /* Most overdue first, at most max; states other than connected never. */
    {
        mso_account_t *c = due_account(db, "carol@example.com", 100, 900);
        mso_account_t *d = due_account(db, "dave@example.com", 50, 900);
        mso_account_t *e = due_account(db, "eve@example.com", 10, 900);
        const void *args[1];

        args[0] = &e->id;
        ck_assert_int_eq(pexec(db, "UPDATE msoauth_accounts SET state = 'reconnect_required' "
                                   "WHERE id = %lld", args), 0);
        ck_assert_int_eq(mso_store_claim_due(db, pool, "C", 2000, 60, 2, &due), APR_SUCCESS);
        ck_assert_int_eq(due->nelts, 2);
        ck_assert_int_eq(APR_ARRAY_IDX(due, 0, mso_account_t *)->id, a->id);   /* due 0 */
        ck_assert_int_eq(APR_ARRAY_IDX(due, 1, mso_account_t *)->id, d->id);
        ck_assert_int_eq(mso_store_claim_due(db, pool, "C", 2000, 60, 5, &due), APR_SUCCESS);
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
                if (mso_store_claim_due(mine, p, owner, 1000, 300, 20, &due) != APR_SUCCESS) {
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
    apr_status_t rv = mso_store_refreshed(db, id, owner, r, now, &err);

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
    ck_assert_int_eq(mso_store_lease(db, a->id, "A", 1000, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_store_refresh_failed(db, a->id, "A", "connected",
                                              "token_endpoint_unreachable", 0, "down", 1000,
                                              1000), APR_SUCCESS);

    /* Graph, Microsoft sent no new refresh token: the stored one stays. */
    ck_assert_int_eq(mso_store_lease(db, a->id, "A", 1001, 60), APR_SUCCESS);
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
    ck_assert_int_eq(mso_store_lease(db, a->id, "A", 1100, 60), APR_SUCCESS);
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
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_tokens"), 3);

    /* A's lease ran out and B took the account: A's result is not stored. */
    ck_assert_int_eq(mso_store_lease(db, a->id, "A", 2000, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_store_lease(db, a->id, "B", 2061, 60), APR_SUCCESS);
    memset(&r, 0, sizeof(r));
    r.kind = "graph";
    r.sealed_access = "sealed-a3";
    r.access_expires_at = 9000;
    r.sealed_refresh = "sealed-r3";
    r.refresh_due_at = 8000;
    ck_assert_int_eq(mso_store_refreshed(db, a->id, "A", &r, 2070, &err), APR_EBUSY);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "lease") != NULL, "message: %s", err);
    token_is(db, a->id, "refresh", "sealed-r2", 0);
    token_is(db, a->id, "graph", "sealed-a2", 5000);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->lease_owner, "B");
    ck_assert_int_eq(got->refresh_due_at, 4000);
    ck_assert_int_eq(got->last_refresh_at, 1110);
    /* Without any lease it is refused too, and the connection is still fine. */
    ck_assert_int_eq(mso_store_release(db, a->id, "B"), APR_SUCCESS);
    ck_assert_int_eq(mso_store_refreshed(db, a->id, "A", &r, 2080, &err), APR_EBUSY);
    ck_assert_int_eq(mso_store_lease(db, a->id, "B", 2080, 60), APR_SUCCESS);
    refreshed_ok(db, a->id, "B", &r, 2081);
    token_is(db, a->id, "refresh", "sealed-r3", 0);
    token_is(db, a->id, "graph", "sealed-a3", 9000);

    /* Bad input is refused before anything is written. */
    r.kind = "refresh";
    ck_assert_int_eq(mso_store_refreshed(db, a->id, "B", &r, 2090, &err), APR_EINVAL);
    r.kind = "graph";
    r.sealed_access = NULL;
    ck_assert_int_eq(mso_store_refreshed(db, a->id, "B", &r, 2090, &err), APR_EINVAL);
    ck_assert_int_eq(mso_store_token_get(db, pool, a->id, "graph", &sealed, NULL),
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
    if (_i == BACKEND_SQLITE) {
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
    ck_assert_int_eq(mso_store_lease(db, a->id, "A", 1000, 60), APR_SUCCESS);
    memset(&r, 0, sizeof(r));
    r.kind = "graph";
    r.sealed_access = "sealed-a2";
    r.access_expires_at = 5000;
    r.sealed_refresh = "FAIL";
    r.refresh_due_at = 4000;
    ck_assert_int_eq(mso_store_refreshed(db, a->id, "A", &r, 1010, &err), APR_EGENERAL);
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
    exec_ok(db, _i == BACKEND_SQLITE ? "DROP TRIGGER msoauth_test_fail"
                                     : "DROP TRIGGER msoauth_test_fail ON msoauth_tokens");
    r.sealed_refresh = "sealed-r2";
    refreshed_ok(db, a->id, "A", &r, 1020);
    token_is(db, a->id, "refresh", "sealed-r2", 0);
}
END_TEST

START_TEST(refresh_failed_records)
{
    mso_db_t *db = fresh_db(_i);
    mso_account_t *a, *got, again;

    migrate_ok(db);
    a = due_account(db, "alice@example.com", 0, 900);

    /* Transient: still connected, backed off. */
    ck_assert_int_eq(claim_count(db, "A", 1000, 60, 10), 1);
    ck_assert_int_eq(mso_store_refresh_failed(db, a->id, "A", "connected",
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
    ck_assert_int_eq(mso_store_refresh_failed(db, a->id, "B", "reconnect_required",
                                              "reconnect_required", 700082, "x", 0, 1501),
                     APR_EBUSY);
    ck_assert_int_eq(get_ok(db, a->id)->error_runs, 1);

    /* The refresh token is dead: reconnect_required, never claimed. */
    ck_assert_int_eq(mso_store_refresh_failed(db, a->id, "A", "reconnect_required",
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
    /* Without a lease held by anyone, recording works (token handler paths). */
    ck_assert_int_eq(mso_store_refresh_failed(db, a->id, "C", "reconnect_required",
                                              "reconnect_required", 700082, "again", 0, 1503),
                     APR_SUCCESS);
    ck_assert_int_eq(get_ok(db, a->id)->error_runs, 3);
    ck_assert_int_eq(mso_store_refresh_failed(db, a->id, "C", "disconnected", "x", 0, "x", 0,
                                              1503), APR_EINVAL);

    /* A reconnect clears the job's error state and schedules the account. */
    again = sample("default", "alice@example.com");
    again.refresh_due_at = 4000;
    ck_assert_int_eq(mso_store_lease(db, a->id, "A", 1600, 60), APR_SUCCESS);
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
    ck_assert_int_eq(mso_store_lease(db, a->id, "A", 1000, 60), APR_SUCCESS);
    ck_assert_int_eq(mso_store_disconnect(db, a->id, 1010), APR_SUCCESS);
    got = get_ok(db, a->id);
    ck_assert_str_eq(got->state, "disconnected");
    ck_assert_ptr_null(got->lease_owner);
    ck_assert_int_eq(got->updated_at, 1010);
    ck_assert_int_eq(mso_store_token_get(db, pool, a->id, "refresh", &sealed, NULL),
                     APR_NOTFOUND);
    ck_assert_int_eq(mso_store_token_get(db, pool, a->id, "graph", &sealed, NULL),
                     APR_NOTFOUND);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_tokens"), 2);   /* b's */
    token_is(db, b->id, "refresh", "sealed-r", 0);
    ck_assert_int_eq(mso_store_disconnect(db, b->id + 1000, 1010), APR_NOTFOUND);

    /* The job leaves it alone. */
    {
        apr_array_header_t *due = NULL;

        ck_assert_int_eq(mso_store_claim_due(db, pool, "A", 2000, 60, 10, &due), APR_SUCCESS);
        ck_assert_int_eq(due->nelts, 1);
        ck_assert_int_eq(APR_ARRAY_IDX(due, 0, mso_account_t *)->id, b->id);
    }

    ck_assert_int_eq(mso_store_accounts(db, pool, &all), APR_SUCCESS);
    ck_assert_int_eq(all->nelts, 2);
    ck_assert_int_eq(APR_ARRAY_IDX(all, 0, mso_account_t *)->id, a->id);
    ck_assert_str_eq(APR_ARRAY_IDX(all, 0, mso_account_t *)->state, "disconnected");
    ck_assert_int_eq(APR_ARRAY_IDX(all, 1, mso_account_t *)->id, b->id);
    ck_assert_str_eq(APR_ARRAY_IDX(all, 1, mso_account_t *)->lease_owner, "A");
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
    ck_assert_int_eq(mso_store_migrate(ro, &from, &to, &err), APR_EGENERAL);
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err, "msoauth_") && strstr(err, "readonly") &&
                  strstr(err, "check that the httpd user can write"), "message: %s", err);
    ck_assert_int_eq(from, 0);
    ck_assert_int_eq(to, 0);
    apr_dbd_close(driver, handle);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Schema v3: the mirror (lib/mso_mirror) */

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
    mso_account_t a = sample("default", mailbox);

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
    ck_assert_int_eq(mso_mirror_restart_folder(db, "me", w->acct->id, f, LINK "?$deltatoken=",
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
    ck_assert_int_eq(mso_mirror_release(db, w->acct->id, "me", &d, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE work_owner IS NULL "
                             "AND sync_phase = 'idle' AND last_sync_at > 0"), 1);
    /* Not due, no action: nothing to claim. A queued action makes it due. */
    ck_assert_int_eq(mso_mirror_claim(db, pool, "you", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 0);
    read = queued_action(db, w->acct->id, "X", "mark_read", NULL);
    ck_assert_int_eq(mso_mirror_claim(db, pool, "you", now, 45, 10, &works), APR_SUCCESS);
    ck_assert_int_eq(works->nelts, 1);
    ck_assert_int_eq(APR_ARRAY_IDX(works, 0, mso_work_t *)->queued_actions, 1);
    ck_assert_int_eq(mso_mirror_release(db, w->acct->id, "you", &d, now), APR_SUCCESS);
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
    ck_assert_int_eq(mso_mirror_action_sending(db, "me", read, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT attempts FROM msoauth_actions WHERE "
                                          "id = %" APR_INT64_T_FMT " AND sent_at = %"
                                          APR_INT64_T_FMT, read->id, now)), 1);
    ck_assert_int_eq(mso_mirror_action_done(db, "me", read, NULL, 0, now), APR_SUCCESS);
    ck_assert_int_eq(msg_num(db, "is_read", "X"), 1);
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_actions WHERE "
                                          "id = %" APR_INT64_T_FMT " AND state = 'done' AND "
                                          "sent_at IS NULL", read->id)), 1);
    /* Done twice is refused: it is no longer queued. */
    ck_assert_int_eq(mso_mirror_action_done(db, "me", read, NULL, 0, now), APR_EBUSY);

    move = queued_action(db, w->acct->id, "Y", "move", "archive");
    ck_assert_int_eq(mso_mirror_action_done(db, "me", move, "archive", 1, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_messages WHERE graph_id = 'Y' AND "
                             "folder = 'archive' AND removed = 1"), 1);

    bad = queued_action(db, w->acct->id, "Q", "mark_read", NULL);
    ck_assert_int_eq(mso_mirror_action_failed(db, "me", bad, "not_found", "gone", now),
                     APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_actions WHERE state = 'failed' AND "
                             "reason = 'not_found' AND last_error = 'gone'"), 1);

    later = queued_action(db, w->acct->id, "X", "mark_unread", NULL);
    ck_assert_int_eq(mso_mirror_action_later(db, "me", later, "503", 1, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_actions WHERE "
                                          "id = %" APR_INT64_T_FMT " AND state = 'queued' AND "
                                          "sent_at IS NOT NULL", later->id)), 1);
    ck_assert_int_eq(mso_mirror_action_later(db, "me", later, "429", 0, now), APR_SUCCESS);
    ck_assert_int_eq(num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM msoauth_actions WHERE "
                                          "id = %" APR_INT64_T_FMT " AND sent_at IS NULL",
                                          later->id)), 1);
    /* Without the lease nothing is recorded. */
    ck_assert_int_eq(mso_mirror_action_done(db, "other", later, NULL, 0, now), APR_EBUSY);

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
    ck_assert_int_eq(mso_mirror_sync_now(db, w->acct->id), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE sync_due_at = 0 AND "
                             "sync_retry_at IS NULL"), 1);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET sync_retry_at = %"
                             APR_INT64_T_FMT ", sync_phase = 'throttled'", now + 60));
    ck_assert_int_eq(mso_mirror_sync_now(db, w->acct->id), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_accounts WHERE sync_retry_at > 0"),
                     1);
    ck_assert_int_eq(mso_mirror_sync_now(db, 999999), APR_NOTFOUND);
}
END_TEST

static TCase *backend_case(const char *name, int backend)
{
    TCase *tc = tcase_create(name);

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, migrate_creates_schema, backend, backend + 1);
    tcase_add_loop_test(tc, migrate_again_is_noop, backend, backend + 1);
    tcase_add_loop_test(tc, newer_schema_refused, backend, backend + 1);
    tcase_add_loop_test(tc, concurrent_migrations, backend, backend + 1);
    tcase_add_loop_test(tc, connect_insert_then_update, backend, backend + 1);
    tcase_add_loop_test(tc, connect_rejects_missing_values, backend, backend + 1);
    tcase_add_loop_test(tc, connect_rolls_back_on_db_error, backend, backend + 1);
    tcase_add_loop_test(tc, mailbox_case_and_uniqueness, backend, backend + 1);
    tcase_add_loop_test(tc, values_with_sql_metacharacters, backend, backend + 1);
    tcase_add_loop_test(tc, not_found, backend, backend + 1);
    tcase_add_loop_test(tc, wrap_reuses_wrapper, backend, backend + 1);
    tcase_add_loop_test(tc, flow_states_are_single_use, backend, backend + 1);
    tcase_add_loop_test(tc, migrate_from_v1, backend, backend + 1);
    tcase_add_loop_test(tc, claim_and_lease, backend, backend + 1);
    tcase_add_loop_test(tc, concurrent_claims, backend, backend + 1);
    tcase_add_loop_test(tc, refreshed_stores_tokens, backend, backend + 1);
    tcase_add_loop_test(tc, refreshed_rolls_back, backend, backend + 1);
    tcase_add_loop_test(tc, refresh_failed_records, backend, backend + 1);
    tcase_add_loop_test(tc, disconnect_and_list, backend, backend + 1);
    tcase_add_loop_test(tc, mirror_pages, backend, backend + 1);
    tcase_add_loop_test(tc, mirror_big_page, backend, backend + 1);
    tcase_add_loop_test(tc, mirror_claims_and_actions, backend, backend + 1);
    if (backend == BACKEND_SQLITE) {
        tcase_add_test(tc, sqlite_readonly_error);
    }
    return tc;
}

int main(void)
{
    Suite *s = suite_create("store");
    apr_pool_t *p;
    int failed;

    apr_initialize();
    /* Load the drivers once here, before the test processes fork. */
    apr_pool_create(&p, NULL);
    apr_dbd_init(p);
    suite_add_tcase(s, backend_case("sqlite", BACKEND_SQLITE));
    suite_add_tcase(s, backend_case("pgsql", BACKEND_PGSQL));
    failed = mso_check_run(s);
    apr_pool_destroy(p);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
