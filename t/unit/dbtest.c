/* The database tests' fixture (see dbtest.h). */
#include "dbtest.h"
#include "unit.h"

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <apr_general.h>
#include <apr_strings.h>

apr_pool_t *pool;
char sqlite_path[128];
static char tmpdir[64];
/* Each test program has its own PostgreSQL schema, so that programs run in
 * parallel (make -j check) do not drop each other's tables. */
static char pg_schema[64];

void dbtest_setup(void)
{
    apr_pool_create(&pool, NULL);
    tmpdir[0] = sqlite_path[0] = '\0';
}

void dbtest_teardown(void)
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

mso_db_t *connect_db(int backend, apr_pool_t *p)
{
    const apr_dbd_driver_t *driver;
    apr_dbd_t *handle = NULL;
    const char *params, *error = NULL;
    apr_pool_t *wp;
    mso_db_t *db;
    conn_t *c;
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
    c = apr_palloc(p, sizeof(*c));
    c->driver = driver;
    c->handle = handle;
    apr_pool_cleanup_register(p, c, close_conn, apr_pool_cleanup_null);
    /* The wrapper in a subpool: it must not outlive the connection. */
    apr_pool_create(&wp, p);
    ck_assert_int_eq(mso_db_wrap(wp, driver, handle, &db), APR_SUCCESS);
    if (backend == BACKEND_PGSQL) {
        exec_ok(db, apr_psprintf(p, "CREATE SCHEMA IF NOT EXISTS %s", pg_schema));
        exec_ok(db, apr_psprintf(p, "SET search_path TO %s", pg_schema));
    }
    return db;
}

void exec_ok(mso_db_t *db, const char *sql)
{
    int n = 0;
    int rc = apr_dbd_query(db->driver, db->handle, &n, sql);

    ck_assert_msg(rc == 0, "%s: %s", sql, apr_dbd_error(db->driver, db->handle, rc));
}

mso_db_t *fresh_db(int backend)
{
    mso_db_t *db = connect_db(backend, pool);

    if (backend == BACKEND_PGSQL) {
        exec_ok(db, apr_psprintf(pool, "DROP SCHEMA %s CASCADE", pg_schema));
        exec_ok(db, apr_psprintf(pool, "CREATE SCHEMA %s", pg_schema));
        exec_ok(db, apr_psprintf(pool, "SET search_path TO %s", pg_schema));
    }
    return db;
}

int select_num(mso_db_t *db, const char *sql, long long *value)
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

long long num(mso_db_t *db, const char *sql)
{
    long long v;
    int rc = select_num(db, sql, &v);

    ck_assert_msg(rc == 0, "%s: %s", sql, apr_dbd_error(db->driver, db->handle, rc));
    return v;
}

const char *text_of(mso_db_t *db, const char *sql)
{
    apr_dbd_results_t *res = NULL;
    apr_dbd_row_t *row = NULL;
    const char *v = NULL;
    char *d = NULL;
    int rc;

    rc = apr_dbd_select(db->driver, pool, db->handle, &res, sql, 1);
    ck_assert_msg(rc == 0, "%s: %s", sql, apr_dbd_error(db->driver, db->handle, rc));
    if (apr_dbd_get_row(db->driver, pool, res, &row, -1) == 0) {
        if (apr_dbd_datum_get(db->driver, row, 0, APR_DBD_TYPE_STRING, &d) == APR_SUCCESS
            && d) {
            v = apr_pstrdup(pool, d);
        }
        while (apr_dbd_get_row(db->driver, pool, res, &row, -1) == 0) {
        }
    }
    return v;
}

int pexec(mso_db_t *db, const char *sql, const void **args)
{
    apr_dbd_prepared_t *st = NULL;
    int n = 0, rc;

    rc = apr_dbd_prepare(db->driver, pool, db->handle, sql, NULL, &st);
    if (rc != 0) {
        return rc;
    }
    return apr_dbd_pbquery(db->driver, pool, db->handle, &n, st, args);
}

void migrate_ok(mso_db_t *db)
{
    int from = -1, to = -1;
    const char *err = NULL;
    apr_status_t rv = mso_schema_migrate(db, pool, &from, &to, &err);

    ck_assert_msg(rv == APR_SUCCESS, "migrate: %s", err ? err : "(no message)");
    ck_assert_int_eq(to, mso_schema_latest());
}

mso_connect_t sample(const char *company, const char *mailbox, const char *oid)
{
    mso_connect_t c;

    memset(&c, 0, sizeof(c));
    c.company = company;
    c.client_id = "6731DE76-14a6-49ae-97bc-6eba6914391e";
    c.tenant_id = "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a";
    c.object_id = oid;
    c.mailbox = mailbox;
    c.display_name = "Alice Example";
    c.scopes = "openid profile email offline_access Mail.Read";
    c.authority = "https://login.microsoftonline.com/common";
    c.access_expires_at = 1700003600;
    c.connected_by = "admin";
    return c;
}

typedef struct {
    const char *refresh, *access;
} plain_t;

/* "Seals" by storing the values as given: the tests compare them. */
static apr_status_t store_as_is(void *baton, apr_int64_t account_id,
                                const char **sealed_refresh, const char **sealed_access)
{
    plain_t *t = baton;

    (void)account_id;
    *sealed_refresh = t->refresh;
    *sealed_access = t->access;
    return t->refresh ? APR_SUCCESS : APR_EINVAL;
}

apr_status_t connect_raw(mso_db_t *db, const mso_connect_t *c, const char *refresh,
                         const char *access, apr_int64_t now, mso_account_t **acct,
                         const char **err)
{
    plain_t t;

    t.refresh = refresh;
    t.access = access;
    return mso_account_connect(db, pool, c, store_as_is, &t, now, acct, err);
}

mso_account_t *connect_ok(mso_db_t *db, const mso_connect_t *c, const char *refresh,
                          const char *access, apr_int64_t now)
{
    mso_account_t *a = NULL;
    const char *err = NULL;
    apr_status_t rv = connect_raw(db, c, refresh, access, now, &a, &err);

    ck_assert_msg(rv == APR_SUCCESS, "account_connect: %s", err ? err : "(no message)");
    ck_assert_ptr_nonnull(a);
    ck_assert_int_gt(a->id, 0);
    return a;
}

void token_is(mso_db_t *db, apr_int64_t id, const char *kind, const char *sealed,
              apr_int64_t expires)
{
    const char *got = NULL;
    apr_int64_t exp = -1;

    ck_assert_int_eq(mso_account_token_get(db, pool, id, kind, &got, &exp), APR_SUCCESS);
    ck_assert_str_eq(got, sealed);
    ck_assert_int_eq(exp, expires);
}

mso_account_t *get_ok(mso_db_t *db, apr_int64_t id)
{
    mso_account_t *got = NULL;

    ck_assert_int_eq(mso_account_get(db, pool, id, &got), APR_SUCCESS);
    return got;
}

long long memory_in_use(void)
{
    long long pages = 0, heap = 0;
    FILE *f = fopen("/proc/self/statm", "r");

    if (f) {
        if (fscanf(f, "%lld", &pages) != 1) {
            pages = 0;
        }
        fclose(f);
    }
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
    heap = (long long)mallinfo2().uordblks;
#endif
    return pages * sysconf(_SC_PAGESIZE) + heap;
}

int dbtest_main(const char *name, void (*add_tests)(TCase *tc, int backend))
{
    Suite *s = suite_create(name);
    apr_pool_t *p;
    int failed, backend;

    apr_snprintf(pg_schema, sizeof(pg_schema), "mso_unit_%s", name);
    apr_initialize();
    /* Load the drivers once here, before the test processes fork. */
    apr_pool_create(&p, NULL);
    apr_dbd_init(p);
    for (backend = BACKEND_SQLITE; backend <= BACKEND_PGSQL; backend++) {
        TCase *tc = tcase_create(backend == BACKEND_SQLITE ? "sqlite" : "pgsql");

        tcase_add_checked_fixture(tc, dbtest_setup, dbtest_teardown);
        tcase_set_timeout(tc, 120);
        add_tests(tc, backend);
        suite_add_tcase(s, tc);
    }
    failed = mso_check_run(s);
    apr_pool_destroy(p);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
