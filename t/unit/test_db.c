/* The connection layer (lib/mso_db): the binder, the transaction helper,
 * statements after schema changes, and what a connection keeps. */
#include "dbtest.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/wait.h>
#include <unistd.h>

#include <apr_strings.h>
#include <apr_thread_proc.h>

#include "mso_flows_used.h"

static const mso_stmt_t ST_PUT = {
    "put a test row", "id:int name:text n:int",
    "INSERT INTO msoauth_test (id, name, n) VALUES (:id, :name, :n)", NULL
};
static const mso_stmt_t ST_GET = {
    "read a test row", "id:int",
    "SELECT id, name, n, name || '%' AS pct, ':not_an_arg' AS colon FROM msoauth_test "
    "WHERE id = :id", NULL
};
/* One name, two places; a cast on PostgreSQL. */
static const mso_stmt_t ST_TWICE = {
    "count test rows", "low:int",
    "SELECT COUNT(*) AS n FROM msoauth_test WHERE id >= :low AND n >= :low",
    "SELECT COUNT(*)::bigint AS n FROM msoauth_test WHERE id >= :low AND n >= :low"
};
static const mso_stmt_t ST_UNDECLARED = {
    "use an undeclared argument", "id:int",
    "SELECT id FROM msoauth_test WHERE id = :id AND name = :name", NULL
};
static const mso_stmt_t ST_UNUSED = {
    "declare an unused argument", "id:int name:text",
    "SELECT id FROM msoauth_test WHERE id = :id", NULL
};
static const mso_stmt_t ST_BADTYPE = {
    "declare a strange type", "id:float",
    "SELECT id FROM msoauth_test WHERE id = :id", NULL
};
/* A repeated group: :id_0 and :n_0, then :id_1 and :n_1. */
static const mso_stmt_t ST_ROWS2 = {
    "put two test rows", "name:text id_#:int n_#:int",
    "INSERT INTO msoauth_test (id, name, n) VALUES (:id_0, :name, :n_0), (:id_1, :name, :n_1)",
    NULL
};
/* Row 1 forgets a value of the group. */
static const mso_stmt_t ST_ROWS_SHORT = {
    "put uneven test rows", "name:text id_#:int n_#:int",
    "INSERT INTO msoauth_test (id, name, n) VALUES (:id_0, :name, :n_0), (:id_1, :name, 0)",
    NULL
};

static mso_db_t *test_db(int backend)
{
    mso_db_t *db = fresh_db(backend);

    exec_ok(db, "CREATE TABLE msoauth_test (id BIGINT PRIMARY KEY, name TEXT, n BIGINT)");
    return db;
}

static void put_ok(mso_db_t *db, apr_int64_t id, const char *name, apr_int64_t n)
{
    mso_args_t *a = mso_args(db, pool, &ST_PUT);
    const char *err = NULL;

    mso_arg_int(a, "id", id);
    mso_arg_text(a, "name", name);
    mso_arg_int(a, "n", n);
    ck_assert_msg(mso_exec(a, NULL, &err) == APR_SUCCESS, "put: %s", err ? err : "");
}

START_TEST(binder_runs_named_arguments)
{
    mso_db_t *db = test_db(_i);
    apr_int64_t big = APR_INT64_C(5000000000);
    mso_rows_t *rows = NULL;
    const char *err = NULL;
    mso_args_t *a;
    int n = -1;

    put_ok(db, 1, "one", big);
    put_ok(db, 2, "it's 100% ':x' %s", 2);

    a = mso_args(db, pool, &ST_GET);
    mso_arg_int(a, "id", 1);
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    ck_assert(mso_rows_next(rows));
    ck_assert_int_eq(mso_col_int(rows, "id"), 1);
    ck_assert_str_eq(mso_col_text(rows, pool, "name"), "one");
    ck_assert_int_eq(mso_col_int(rows, "n"), big);
    ck_assert_str_eq(mso_col_text(rows, pool, "pct"), "one%");
    ck_assert_str_eq(mso_col_text(rows, pool, "colon"), ":not_an_arg");
    ck_assert(!mso_rows_next(rows));

    /* The same arguments again, with one replaced. */
    mso_arg_int(a, "id", 2);
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    ck_assert(mso_rows_next(rows));
    ck_assert_str_eq(mso_col_text(rows, pool, "name"), "it's 100% ':x' %s");

    a = mso_args(db, pool, &ST_TWICE);
    mso_arg_int(a, "low", 2);
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    ck_assert(mso_rows_next(rows));
    ck_assert_int_eq(mso_col_int(rows, "n"), 1);

    /* SQL NULL three ways. */
    a = mso_args(db, pool, &ST_PUT);
    mso_arg_int(a, "id", 3);
    mso_arg_text(a, "name", NULL);
    mso_arg_opt(a, "n", 0);
    ck_assert_int_eq(mso_exec(a, &n, &err), APR_SUCCESS);
    ck_assert_int_eq(n, 1);
    mso_arg_int(a, "id", 4);
    mso_arg_null(a, "n");
    ck_assert_int_eq(mso_exec(a, &n, &err), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test WHERE name IS NULL AND "
                             "n IS NULL"), 2);
    a = mso_args(db, pool, &ST_GET);
    mso_arg_int(a, "id", 3);
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    ck_assert(mso_rows_next(rows));
    ck_assert_ptr_null(mso_col_text(rows, pool, "name"));
    ck_assert_int_eq(mso_col_int(rows, "n"), 0);

    /* Repeated groups: :id_0, :id_1 ... */
    a = mso_args(db, pool, &ST_ROWS2);
    mso_arg_text(a, "name", "pair");
    mso_args_row(a, 0);
    mso_arg_int(a, "id", 10);
    mso_arg_int(a, "n", 100);
    mso_args_row(a, 1);
    mso_arg_int(a, "id", 11);
    mso_arg_int(a, "n", 110);
    ck_assert_int_eq(mso_exec(a, &n, &err), APR_SUCCESS);
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq(num(db, "SELECT SUM(n) FROM msoauth_test WHERE name = 'pair'"), 210);
}
END_TEST

START_TEST(binder_refuses_mistakes)
{
    mso_db_t *db = test_db(_i);
    const char *err = NULL;
    mso_args_t *a;

    /* Missing. */
    a = mso_args(db, pool, &ST_PUT);
    mso_arg_int(a, "id", 1);
    mso_arg_text(a, "name", "x");
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, ":n is not bound") && strstr(err, "put a test row"),
                  "message: %s", err ? err : "");
    /* Mistyped. */
    a = mso_args(db, pool, &ST_PUT);
    mso_arg_text(a, "id", "1");
    mso_arg_text(a, "name", "x");
    mso_arg_int(a, "n", 1);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, ":id is int, bound as text"), "message: %s", err);
    a = mso_args(db, pool, &ST_PUT);
    mso_arg_int(a, "id", 1);
    mso_arg_int(a, "name", 7);
    mso_arg_opt(a, "n", 1);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, ":name is text, bound as int"), "message: %s", err);
    /* Unknown. */
    a = mso_args(db, pool, &ST_PUT);
    mso_arg_int(a, "id", 1);
    mso_arg_text(a, "name", "x");
    mso_arg_int(a, "n", 1);
    mso_arg_int(a, "nn", 1);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, "no argument :nn"), "message: %s", err);
    a = mso_args(db, pool, &ST_ROWS2);
    mso_args_row(a, 2);
    mso_arg_int(a, "id", 1);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, "no argument :id_2"), "message: %s", err);
    /* Nothing of it reached the database. */
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 0);

    /* A declaration that does not match its SQL. */
    a = mso_args(db, pool, &ST_UNDECLARED);
    mso_arg_int(a, "id", 1);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, ":name, which is not declared"), "message: %s", err);
    a = mso_args(db, pool, &ST_UNUSED);
    mso_arg_int(a, "id", 1);
    mso_arg_text(a, "name", "x");
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, "name is declared but not used"), "message: %s", err);
    a = mso_args(db, pool, &ST_BADTYPE);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, "type other than text, int or blob"), "message: %s", err);
    a = mso_args(db, pool, &ST_ROWS_SHORT);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, "n_1 is declared but not used"), "message: %s", err);
    /* A value of the group left unbound in one row. */
    a = mso_args(db, pool, &ST_ROWS2);
    mso_arg_text(a, "name", "pair");
    mso_args_row(a, 0);
    mso_arg_int(a, "id", 10);
    mso_arg_int(a, "n", 100);
    mso_args_row(a, 1);
    mso_arg_int(a, "id", 11);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_msg(err && strstr(err, ":n_1 is not bound"), "message: %s", err);

    /* A database failure is a sentence with the database's words and a hint. */
    put_ok(db, 1, "x", 1);
    a = mso_args(db, pool, &ST_PUT);
    mso_arg_int(a, "id", 1);
    mso_arg_text(a, "name", "again");
    mso_arg_int(a, "n", 1);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EGENERAL);
    ck_assert_msg(err && strstr(err, "cannot put a test row in the ")
                  && strstr(err, "; check "), "message: %s", err);
}
END_TEST

typedef struct {
    int fail_at;                    /* 0: never */
    apr_status_t refuse;            /* returned after the writes, with a sentence */
} tx_plan_t;

static apr_status_t two_rows(mso_tx_t *tx, void *baton)
{
    tx_plan_t *plan = baton;
    apr_status_t rv;
    mso_args_t *a;
    int i;

    for (i = 1; i <= 2; i++) {
        a = mso_tx_args(tx, &ST_PUT);
        mso_arg_int(a, "id", plan->fail_at == i ? 100 : 100 + i);
        mso_arg_text(a, "name", "tx");
        mso_arg_int(a, "n", i);
        tx->step = i == 2 ? "put the second row" : NULL;
        if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
            goto leave;
        }
    }
    if (plan->refuse) {
        rv = mso_tx_fail(tx, plan->refuse, "refused after %d rows", i - 1);
    }

leave:
    return rv;
}

static apr_status_t nested(mso_tx_t *tx, void *baton)
{
    const char **err = baton;

    return mso_db_tx(tx->db, tx->p, NULL, two_rows, NULL, err);
}

START_TEST(tx_commits_or_rolls_back)
{
    mso_db_t *db = test_db(_i);
    tx_plan_t plan;
    const char *err = NULL, *inner = NULL;

    put_ok(db, 100, "there", 0);
    memset(&plan, 0, sizeof(plan));
    /* The second row collides: the first is rolled back with it. */
    plan.fail_at = 2;
    ck_assert_int_eq(mso_db_tx(db, pool, "for the test", two_rows, &plan, &err),
                     APR_EGENERAL);
    ck_assert_msg(err && strstr(err, "cannot put the second row for the test in the"),
                  "message: %s", err ? err : "");
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 1);
    /* A refusal of fn's own: its status and sentence, nothing kept. */
    memset(&plan, 0, sizeof(plan));
    plan.refuse = APR_EBUSY;
    ck_assert_int_eq(mso_db_tx(db, pool, NULL, two_rows, &plan, &err), APR_EBUSY);
    ck_assert_str_eq(err, "refused after 2 rows");
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 1);
    /* Not nestable; the outer one still rolls back. */
    ck_assert_int_eq(mso_db_tx(db, pool, NULL, nested, &inner, &err), APR_EGENERAL);
    ck_assert_msg(inner && strstr(inner, "one is open on this connection already"),
                  "message: %s", inner ? inner : "");
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 1);
    /* And it commits. */
    memset(&plan, 0, sizeof(plan));
    ck_assert_int_eq(mso_db_tx(db, pool, NULL, two_rows, &plan, &err), APR_SUCCESS);
    ck_assert_ptr_null(err);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 3);
}
END_TEST

/* What the connection says of waiting for the disk at commit: SQLite's
 * synchronous ("2" FULL, "1" NORMAL), PostgreSQL's synchronous_commit. */
static const char *commit_wait(mso_db_t *db)
{
    const char *v = NULL, *err = NULL;

    ck_assert_int_eq(mso_db_pragma(db, pool, db->kind == MSO_DB_SQLITE ? "PRAGMA synchronous"
                                   : "SHOW synchronous_commit", &v, &err), APR_SUCCESS);
    ck_assert_ptr_nonnull(v);
    return v;
}

typedef struct {
    tx_plan_t plan;
    const char *inside;
} lazy_t;

static apr_status_t lazy_rows(mso_tx_t *tx, void *baton)
{
    lazy_t *l = baton;

    l->inside = commit_wait(tx->db);
    return two_rows(tx, &l->plan);
}

START_TEST(lazy_tx_commits_without_waiting)
{
    mso_db_t *db = test_db(_i);
    const char *err = NULL, *durable;
    lazy_t l;

    if (_i == BACKEND_SQLITE) {
        /* Only with a write-ahead log (the module's schema sets it). */
        const char *mode = NULL;

        ck_assert_str_eq(commit_wait(db), "2");
        ck_assert_int_eq(mso_db_pragma(db, pool, "PRAGMA journal_mode = WAL", &mode, &err),
                         APR_SUCCESS);
        ck_assert_str_eq(mode, "wal");
    }
    durable = _i == BACKEND_SQLITE ? "2" : "on";
    ck_assert_str_eq(commit_wait(db), durable);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(mso_db_tx_lazy(db, pool, NULL, lazy_rows, &l, &err), APR_SUCCESS);
    ck_assert_str_eq(l.inside, _i == BACKEND_SQLITE ? "1" : "off");
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 2);
    /* Only for that transaction: the next ones wait again. */
    ck_assert_str_eq(commit_wait(db), durable);
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(mso_db_tx(db, pool, NULL, lazy_rows, &l, &err), APR_EGENERAL);
    ck_assert_str_eq(l.inside, durable);
    /* A failure rolls back as in mso_db_tx, and puts the setting back too. */
    exec_ok(db, "DELETE FROM msoauth_test");
    memset(&l, 0, sizeof(l));
    l.plan.refuse = APR_EBUSY;
    ck_assert_int_eq(mso_db_tx_lazy(db, pool, NULL, lazy_rows, &l, &err), APR_EBUSY);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 0);
    ck_assert_str_eq(commit_wait(db), durable);
}
END_TEST

START_TEST(sqlite_lazy_tx_needs_wal)
{
    mso_db_t *db = test_db(BACKEND_SQLITE);
    const char *err = NULL;
    lazy_t l;

    /* A rollback journal: NORMAL could corrupt the file at a power cut, so
     * the commit keeps waiting. */
    memset(&l, 0, sizeof(l));
    ck_assert_int_eq(mso_db_tx_lazy(db, pool, NULL, lazy_rows, &l, &err), APR_SUCCESS);
    ck_assert_str_eq(l.inside, "2");
    ck_assert_str_eq(commit_wait(db), "2");
}
END_TEST

/* Two writers on two SQLite connections of one process: the first holds
 * the write lock (hold), the second waits for it on a thread of its own,
 * in a transaction or, with autocommit, as one statement outside one. */
typedef struct {
    mso_db_t *db;
    volatile int held;              /* the first writer holds the write lock */
    apr_interval_time_t second_put; /* how long its next statement took */
    int autocommit;                 /* the waiting writer runs one statement alone */
    int hold_s;                     /* hold_lock: seconds the lock is held */
    apr_interval_time_t waited;     /* how long the waiting writer took */
    apr_status_t rv;                /* the waiting writer's outcome */
    const char *err;
} writers_t;

static apr_status_t hold_and_put(mso_tx_t *tx, void *baton)
{
    writers_t *w = baton;
    mso_args_t *a = mso_tx_args(tx, &ST_PUT);
    apr_time_t t0;
    apr_status_t rv;

    mso_arg_int(a, "id", 1);
    mso_arg_text(a, "name", "first");
    mso_arg_int(a, "n", 1);
    if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
        return rv;
    }
    __atomic_store_n(&w->held, 1, __ATOMIC_SEQ_CST);
    apr_sleep(apr_time_from_msec(300));     /* the other writer is waiting now */
    t0 = apr_time_now();
    mso_arg_int(a, "id", 2);
    rv = mso_tx_exec(tx, a, NULL);
    w->second_put = apr_time_now() - t0;
    return rv;
}

static apr_status_t put_three(mso_tx_t *tx, void *baton)
{
    mso_args_t *a = mso_tx_args(tx, &ST_PUT);

    (void)baton;
    mso_arg_int(a, "id", 3);
    mso_arg_text(a, "name", "second");
    mso_arg_int(a, "n", 3);
    return mso_tx_exec(tx, a, NULL);
}

static void *APR_THREAD_FUNC second_writer(apr_thread_t *t, void *data)
{
    writers_t *w = data;
    apr_pool_t *p;
    apr_time_t t0;

    (void)t;
    while (!__atomic_load_n(&w->held, __ATOMIC_SEQ_CST)) {
        apr_sleep(apr_time_from_msec(1));
    }
    apr_pool_create(&p, NULL);
    t0 = apr_time_now();
    if (w->autocommit) {
        mso_args_t *a = mso_args(w->db, p, &ST_PUT);

        mso_arg_int(a, "id", 2);
        mso_arg_text(a, "name", "late");
        mso_arg_int(a, "n", 2);
        w->rv = mso_exec(a, NULL, &w->err);
    }
    else {
        w->rv = mso_db_tx(w->db, p, NULL, put_three, NULL, &w->err);
    }
    w->waited = apr_time_now() - t0;
    w->err = w->err ? strdup(w->err) : NULL;
    apr_pool_destroy(p);
    return NULL;
}

/* Runs hold on db (in WAL mode) while the second writer waits on another
 * connection to the same file; w->err is the caller's to free. */
static void two_writers(mso_db_t *db, writers_t *w, mso_tx_fn *hold)
{
    const char *mode = NULL, *err = NULL;
    apr_pool_t *p2;
    apr_thread_t *t;
    apr_status_t trv;

    ck_assert_int_eq(mso_db_pragma(db, pool, "PRAGMA journal_mode = WAL", &mode, &err),
                     APR_SUCCESS);
    apr_pool_create(&p2, NULL);
    w->db = connect_db(BACKEND_SQLITE, p2);
    ck_assert_int_eq(apr_thread_create(&t, NULL, second_writer, w, pool), APR_SUCCESS);
    ck_assert_int_eq(mso_db_tx(db, pool, NULL, hold, w, &err), APR_SUCCESS);
    apr_thread_join(&trv, t);
    apr_pool_destroy(p2);                       /* closes the second connection */
}

/* The sqlite3 driver runs every call under one process-wide mutex, so a
 * call waiting inside SQLite for the write lock must not wait long there,
 * or the thread holding the lock cannot run its next statement. */
START_TEST(sqlite_writers_in_one_process)
{
    mso_db_t *db = test_db(BACKEND_SQLITE);
    writers_t w;

    memset(&w, 0, sizeof(w));
    two_writers(db, &w, hold_and_put);
    /* It took the full busy timeout (10 s) when SQLite waited under the
     * driver's mutex. */
    ck_assert_msg(w.second_put < apr_time_from_sec(2), "the lock holder's next statement "
                  "waited %ld ms for the other writer", (long)(w.second_put / 1000));
    ck_assert_msg(w.rv == APR_SUCCESS, "the waiting writer failed: %s", w.err ? w.err : "");
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 3);
    free((void *)w.err);
}
END_TEST

/* Puts row 1, then keeps the write lock w->hold_s seconds. */
static apr_status_t hold_lock(mso_tx_t *tx, void *baton)
{
    writers_t *w = baton;
    mso_args_t *a = mso_tx_args(tx, &ST_PUT);
    apr_status_t rv;

    mso_arg_int(a, "id", 1);
    mso_arg_text(a, "name", "holder");
    mso_arg_int(a, "n", 1);
    if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
        return rv;
    }
    __atomic_store_n(&w->held, 1, __ATOMIC_SEQ_CST);
    apr_sleep(apr_time_from_sec(w->hold_s));
    return APR_SUCCESS;
}

/* One statement outside a transaction while another connection holds the
 * write lock hold_s seconds; w is filled with the outcome. */
static void write_while_held(mso_db_t *db, writers_t *w, int hold_s)
{
    memset(w, 0, sizeof(*w));
    w->autocommit = 1;
    w->hold_s = hold_s;
    two_writers(db, w, hold_lock);
}

/* A write outside a transaction while another connection holds the write
 * lock longer than the driver's own retries last (about 3 s): it waits, as
 * a transaction's BEGIN IMMEDIATE does, instead of failing with "database
 * is locked" (the job's health row was lost so during an attachment
 * benchmark). */
START_TEST(sqlite_autocommit_write_waits_for_the_lock)
{
    mso_db_t *db = test_db(BACKEND_SQLITE);
    writers_t w;

    write_while_held(db, &w, 4);
    ck_assert_msg(w.rv == APR_SUCCESS, "the write failed after %ld ms: %s",
                  (long)(w.waited / 1000), w.err ? w.err : "");
    /* It did wait for the holder's commit. */
    ck_assert_msg(w.waited > apr_time_from_msec(3500), "the write took only %ld ms",
                  (long)(w.waited / 1000));
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 2);
    free((void *)w.err);
}
END_TEST

/* The holder keeps the lock past the 10 s a writer waits (and the driver's
 * own retries of the last try, about 3 s more): the write fails, and its
 * sentence says who held the lock instead of blaming permissions. */
START_TEST(sqlite_lock_held_too_long_is_named)
{
    mso_db_t *db = test_db(BACKEND_SQLITE);
    writers_t w;

    write_while_held(db, &w, 15);
    ck_assert_msg(w.rv != APR_SUCCESS, "the write went through after %ld ms",
                  (long)(w.waited / 1000));
    ck_assert_msg(w.waited > apr_time_from_msec(9500), "it gave up after %ld ms",
                  (long)(w.waited / 1000));
    ck_assert_ptr_nonnull(w.err);
    ck_assert_msg(strstr(w.err, "kept its write lock") && strstr(w.err, "nothing of this")
                  && !strstr(w.err, "can write the database file"), "%s", w.err);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 1);
    free((void *)w.err);
}
END_TEST

/* Another process begins a transaction right after each commit, holding
 * the lock 20 ms each time, for 8 s: a writer here still gets its turn
 * well inside its 10 s wait (SQLite has no queue; the other run of
 * transactions pauses now and then). */
static apr_status_t hold_twenty_ms(mso_tx_t *tx, void *baton)
{
    mso_args_t *a = mso_tx_args(tx, &ST_PUT);
    int *k = baton;

    mso_arg_int(a, "id", 100 + (*k)++);
    mso_arg_text(a, "name", "busy");
    mso_arg_int(a, "n", 0);
    apr_sleep(apr_time_from_msec(20));
    return mso_tx_exec(tx, a, NULL);
}

START_TEST(sqlite_back_to_back_writer_lets_others_in)
{
    mso_db_t *db = test_db(BACKEND_SQLITE);
    const char *mode = NULL, *err = NULL;
    mso_args_t *a;
    apr_time_t t0;
    apr_status_t rv;
    int ready[2], status = 0;
    pid_t pid;
    char c;

    ck_assert_int_eq(mso_db_pragma(db, pool, "PRAGMA journal_mode = WAL", &mode, &err),
                     APR_SUCCESS);
    ck_assert_int_eq(pipe(ready), 0);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        apr_pool_t *p;
        mso_db_t *other;
        apr_time_t until;
        int k = 0;

        apr_pool_create(&p, NULL);
        other = connect_db(BACKEND_SQLITE, p);
        until = apr_time_now() + apr_time_from_sec(8);
        while (apr_time_now() < until) {
            if (mso_db_tx(other, p, NULL, hold_twenty_ms, &k, NULL) != APR_SUCCESS) {
                _exit(2);
            }
            if (k == 1 && write(ready[1], "x", 1) != 1) {
                _exit(3);
            }
        }
        _exit(0);
    }
    close(ready[1]);
    ck_assert_int_eq(read(ready[0], &c, 1), 1);
    close(ready[0]);
    apr_sleep(apr_time_from_msec(100));
    t0 = apr_time_now();
    a = mso_args(db, pool, &ST_PUT);
    mso_arg_int(a, "id", 1);
    mso_arg_text(a, "name", "waiting");
    mso_arg_int(a, "n", 1);
    rv = mso_exec(a, NULL, &err);
    t0 = apr_time_now() - t0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(rv == APR_SUCCESS, "the write failed after %ld ms: %s",
                  (long)(t0 / 1000), err ? err : "");
    ck_assert_msg(t0 < apr_time_from_sec(5), "the write waited %ld ms", (long)(t0 / 1000));
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "the busy process failed (status %d)", status);
}
END_TEST

/* ---- what a connection keeps --------------------------------------------- */

/* Prepared statements the SQLite connection holds (the driver frees them
 * only when it closes). */
static int sqlite_statements(mso_db_t *db)
{
    void *(*next)(void *, void *) = NULL;
    void *conn = apr_dbd_native_handle(db->driver, db->handle), *st = NULL;
    int n = 0;

    *(void **)&next = dlsym(RTLD_DEFAULT, "sqlite3_next_stmt");
    ck_assert_msg(next != NULL, "sqlite3_next_stmt not found: %s", dlerror());
    while ((st = next(conn, st)) != NULL) {
        n++;
    }
    return n;
}

/* What the sqlite3 driver answers for a statement whose schema changed: the
 * facts lib/mso_db.c relies on to prepare again only then. */
START_TEST(sqlite_stale_statement)
{
    mso_db_t *db = test_db(BACKEND_SQLITE), *other = connect_db(BACKEND_SQLITE, pool);
    apr_dbd_prepared_t *st = NULL;
    const void *args[3];
    apr_int64_t id = 1, n = 1;
    mso_rows_t *rows = NULL;
    const char *err = NULL;
    mso_args_t *a;
    int rows_changed = 0, before;

    args[0] = &id;
    args[1] = "x";
    args[2] = &n;
    ck_assert_int_eq(apr_dbd_prepare(db->driver, pool, db->handle,
                                     "INSERT INTO msoauth_test (id, name, n) "
                                     "VALUES (%lld, %s, %lld)", NULL, &st), 0);
    exec_ok(other, "CREATE TABLE msoauth_test_other (x INTEGER)");
    ck_assert_int_eq(apr_dbd_pbquery(db->driver, pool, db->handle, &rows_changed, st, args),
                     1);
    ck_assert_str_eq(apr_dbd_error(db->driver, db->handle, 1), "database schema has changed");
    ck_assert_int_eq(apr_dbd_pbquery(db->driver, pool, db->handle, &rows_changed, st, args),
                     1);
    ck_assert_str_eq(apr_dbd_error(db->driver, db->handle, 1), "not an error");

    /* Through the layer: a cached statement, DDL on another connection, the
     * statement again: it is prepared once more and works. */
    put_ok(db, 2, "two", 2);
    a = mso_args(db, pool, &ST_GET);
    mso_arg_int(a, "id", 2);
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    before = sqlite_statements(db);
    exec_ok(other, "CREATE INDEX msoauth_test_n ON msoauth_test (n)");
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    ck_assert(mso_rows_next(rows));
    ck_assert_str_eq(mso_col_text(rows, pool, "name"), "two");
    ck_assert_int_eq(sqlite_statements(db), before + 1);
    /* DDL on the same connection: the same. */
    exec_ok(db, "CREATE TABLE msoauth_test_mine (x INTEGER)");
    put_ok(db, 3, "three", 3);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 2);

    /* A real failure is not prepared again: no statement per failed run. */
    before = sqlite_statements(db);
    for (id = 0; id < 50; id++) {
        a = mso_args(db, pool, &ST_PUT);
        mso_arg_int(a, "id", 3);
        mso_arg_text(a, "name", "dup");
        mso_arg_int(a, "n", 0);
        ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EGENERAL);
        ck_assert_msg(strstr(err, "UNIQUE"), "message: %s", err);
    }
    ck_assert_int_eq(sqlite_statements(db), before);
}
END_TEST

#define REPLAYS 2000
/* What the process may grow by anyway (one step of malloc's heap); before,
 * each replay or failure kept a statement (SQLite, ~2 KB) or a sentence (~300
 * bytes) for the connection's life: 600 KB to 25 MB over 2,000 runs. */
#define MEMORY_SLACK (192 * 1024)

/* Trust fix: replaying a spent sign-in state does not grow the connection:
 * no statement per replay (SQLite), no memory. */
START_TEST(spent_state_replays_keep_the_connection_small)
{
    mso_db_t *db = fresh_db(_i);
    long long mem0, mem1;
    int i, stmts = 0;

    migrate_ok(db);
    ck_assert_int_eq(mso_flows_used_spend(db, pool, "spent", 5000, 1000), APR_SUCCESS);
    for (i = 0; i < 20; i++) {      /* everything prepared once */
        ck_assert_int_eq(mso_flows_used_spend(db, pool, "spent", 5000, 1000), APR_EEXIST);
    }
    if (_i == BACKEND_SQLITE) {
        stmts = sqlite_statements(db);
    }
    mem0 = memory_in_use();
    for (i = 0; i < REPLAYS; i++) {
        apr_pool_t *req;

        apr_pool_create(&req, pool);
        ck_assert_int_eq(mso_flows_used_spend(db, req, "spent", 5000, 1000), APR_EEXIST);
        apr_pool_destroy(req);
    }
    mem1 = memory_in_use();
    if (_i == BACKEND_SQLITE) {
        ck_assert_int_eq(sqlite_statements(db), stmts);
    }
    fprintf(stderr, "%s: %d replays: %+lld bytes\n", _i ? "pgsql" : "sqlite", REPLAYS,
            mem1 - mem0);
    ck_assert_msg(!MEMORY_MEASURABLE || mem1 - mem0 < MEMORY_SLACK,
                  "%d replays grew the process by %lld bytes", REPLAYS, mem1 - mem0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_flows_used"), 1);
}
END_TEST

typedef struct {
    const char *refresh, *access;
} fake_t;

static apr_status_t fake_seal(void *baton, apr_int64_t account_id, const char **r,
                              const char **acc)
{
    fake_t *f = baton;

    (void)account_id;
    *r = f->refresh;
    *acc = f->access;
    return APR_SUCCESS;
}

/* Trust fix: failing calls leave their sentences in the caller's pool, not
 * in the connection's. */
START_TEST(failing_calls_keep_the_connection_small)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t in = sample("acme", "alice@acme.com", "oid-alice");
    mso_account_t *a = NULL;
    mso_refreshed_t r;
    fake_t fake = {"r", "FAIL"};
    long long mem0 = 0, mem1;
    apr_int64_t id;
    int i, stmts = 0;

    migrate_ok(db);
    id = connect_ok(db, &in, "r0", "a0", 1000)->id;
    ck_assert_int_eq(mso_account_lease(db, pool, id, "me", 1000, 60), APR_SUCCESS);
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
    memset(&r, 0, sizeof(r));
    r.kind = "graph";
    r.sealed_access = "FAIL";
    r.access_expires_at = 5000;
    for (i = 0; i < REPLAYS + 20; i++) {
        apr_pool_t *req;
        const char *err = NULL;

        if (i == 20) {              /* everything prepared once */
            mem0 = memory_in_use();
            if (_i == BACKEND_SQLITE) {
                stmts = sqlite_statements(db);
            }
        }
        apr_pool_create(&req, pool);
        ck_assert_int_eq(mso_account_connect(db, req, &in, fake_seal, &fake, 1100, &a, &err),
                         APR_EGENERAL);
        ck_assert_msg(err && strstr(err, "forced failure"), "message: %s", err ? err : "");
        ck_assert_ptr_null(a);
        ck_assert_int_eq(mso_account_refreshed(db, req, id, "me", &r, 1100, &err),
                         APR_EGENERAL);
        ck_assert_msg(err && strstr(err, "forced failure"), "message: %s", err ? err : "");
        apr_pool_destroy(req);
    }
    mem1 = memory_in_use();
    if (_i == BACKEND_SQLITE) {
        ck_assert_int_eq(sqlite_statements(db), stmts);
    }
    fprintf(stderr, "%s: %d failing calls: %+lld bytes\n", _i ? "pgsql" : "sqlite",
            2 * REPLAYS, mem1 - mem0);
    ck_assert_msg(!MEMORY_MEASURABLE || mem1 - mem0 < MEMORY_SLACK,
                  "%d failing calls grew the process by %lld bytes", 2 * REPLAYS, mem1 - mem0);
    token_is(db, id, "refresh", "r0", 0);
    token_is(db, id, "graph", "a0", 1700003600);
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
    if (_i == BACKEND_SQLITE) {
        ck_assert_int_eq(num(db, "PRAGMA foreign_keys"), 1);
        ck_assert_int_eq(num(db, "PRAGMA busy_timeout"), 100);
        ck_assert_int_eq(num(db, "PRAGMA wal_autocheckpoint"), 8192);
        ck_assert_str_eq(text_of(db, "PRAGMA journal_mode"), "wal");
    }
}
END_TEST

static const mso_stmt_t ST_BLOB_PUT = {
    "store bytes", "id:int b:blob",
    "INSERT INTO msoauth_blob (id, b) VALUES (:id, :b)", NULL
};
static const mso_stmt_t ST_BLOB_GET = {
    "read bytes", "id:int",
    "SELECT b, length(b) AS len FROM msoauth_blob WHERE id = :id", NULL
};

/* Bytes in and out unchanged: NUL, 0xff, quotes and backslashes, empty, SQL
 * NULL, and a megabyte. */
START_TEST(binder_blobs)
{
    mso_db_t *db = fresh_db(_i);
    static const unsigned char odd[] = {'a', 0, 'b', '\\', 'x', 0xff, 0x80, '\'', '%', 0};
    apr_size_t big_len = 1024 * 1024, len = 99, i;
    unsigned char *big = apr_palloc(pool, big_len);
    const unsigned char *got;
    mso_rows_t *rows = NULL;
    const char *err = NULL;
    mso_args_t *a;

    exec_ok(db, _i == BACKEND_PGSQL ? "CREATE TABLE msoauth_blob (id BIGINT, b BYTEA)"
                                    : "CREATE TABLE msoauth_blob (id BIGINT, b BLOB)");
    for (i = 0; i < big_len; i++) {
        big[i] = (unsigned char)(i * 7 + (i >> 9));
    }
    a = mso_args(db, pool, &ST_BLOB_PUT);
    mso_arg_int(a, "id", 1);
    mso_arg_blob(a, "b", odd, sizeof(odd));
    ck_assert_msg(mso_exec(a, NULL, &err) == APR_SUCCESS, "%s", err);
    mso_arg_int(a, "id", 2);
    mso_arg_blob(a, "b", "", 0);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_SUCCESS);
    mso_arg_int(a, "id", 3);
    mso_arg_blob(a, "b", NULL, 0);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_SUCCESS);
    mso_arg_int(a, "id", 4);
    mso_arg_blob(a, "b", big, big_len);
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_SUCCESS);

    a = mso_args(db, pool, &ST_BLOB_GET);
    mso_arg_int(a, "id", 1);
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    ck_assert(mso_rows_next(rows));
    got = mso_col_blob(rows, pool, "b", &len);
    ck_assert_uint_eq(len, sizeof(odd));
    ck_assert(!memcmp(got, odd, sizeof(odd)));
    ck_assert_int_eq(mso_col_int(rows, "len"), sizeof(odd));
    mso_arg_int(a, "id", 2);
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    ck_assert(mso_rows_next(rows));
    got = mso_col_blob(rows, pool, "b", &len);
    ck_assert_ptr_nonnull(got);
    ck_assert_uint_eq(len, 0);
    mso_arg_int(a, "id", 3);
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    ck_assert(mso_rows_next(rows));
    ck_assert_ptr_null(mso_col_blob(rows, pool, "b", &len));
    ck_assert_uint_eq(len, 0);
    mso_arg_int(a, "id", 4);
    ck_assert_int_eq(mso_select(a, &rows, &err), APR_SUCCESS);
    ck_assert(mso_rows_next(rows));
    got = mso_col_blob(rows, pool, "b", &len);
    ck_assert_uint_eq(len, big_len);
    ck_assert(!memcmp(got, big, big_len));

    /* A blob bound as text is a bug the binder names. */
    a = mso_args(db, pool, &ST_BLOB_PUT);
    mso_arg_int(a, "id", 5);
    mso_arg_text(a, "b", "x");
    ck_assert_int_eq(mso_exec(a, NULL, &err), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, ":b is blob, bound as text"));
}
END_TEST

/* ---- PostgreSQL: named server-side statements ----------------------------- */

static const mso_stmt_t ST_ALL = {
    "read a whole test row", "id:int",
    "SELECT * FROM msoauth_test WHERE id = :id", NULL
};

/* The server's prepared statements of this session named as mso_db names them. */
static long long pg_prepared(mso_db_t *db, const char *like)
{
    return num(db, apr_psprintf(pool, "SELECT COUNT(*) FROM pg_prepared_statements "
                                "WHERE left(name, 4) = 'mso_' AND statement LIKE '%s'", like));
}

static int read_all_ok(mso_db_t *db, apr_int64_t id)
{
    mso_args_t *a = mso_args(db, pool, &ST_ALL);
    mso_rows_t *rows = NULL;
    const char *err = NULL;
    int n = 0;

    mso_arg_int(a, "id", id);
    ck_assert_msg(mso_select(a, &rows, &err) == APR_SUCCESS, "select: %s", err ? err : "");
    while (mso_rows_next(rows)) {
        ck_assert_int_eq(mso_col_int(rows, "id"), id);
        n++;
    }
    return n;
}

/* Each statement is prepared once per session and run by name; a second
 * wrapper of the same session never collides with the first one's names; a
 * plan that no longer gives the same columns is prepared again. A statement
 * the server lost (a pooler in transaction mode, DISCARD ALL) turns the
 * connection to unnamed statements: at once outside a transaction, after
 * one failed transaction inside one; so does a name taken already. */
START_TEST(pgsql_named_statements)
{
    mso_db_t *db = test_db(BACKEND_PGSQL), *other = NULL, *third = NULL, *fourth = NULL;
    apr_pool_t *sub, *sub2, *sub3;
    const char *name;
    long pid = 0;
    unsigned number = 0, k = 0;
    tx_plan_t plan;
    const char *err = NULL;

    put_ok(db, 1, "one", 1);
    put_ok(db, 2, "two", 2);
    ck_assert_int_eq(pg_prepared(db, "%AS INSERT INTO msoauth_test%"), 1);

    apr_pool_create(&sub, pool);
    ck_assert_int_eq(mso_db_wrap(sub, db->driver, db->handle, &other), APR_SUCCESS);
    ck_assert_ptr_ne(other, db);
    put_ok(other, 3, "three", 3);
    ck_assert_int_eq(pg_prepared(db, "%AS INSERT INTO msoauth_test%"), 2);

    /* SELECT * after a column is added: the old plan cannot answer. */
    ck_assert_int_eq(read_all_ok(db, 1), 1);
    exec_ok(db, "ALTER TABLE msoauth_test ADD COLUMN extra TEXT");
    ck_assert_int_eq(read_all_ok(db, 1), 1);
    ck_assert_int_eq(read_all_ok(db, 2), 1);
    ck_assert_int_eq(pg_prepared(db, "%AS SELECT * FROM msoauth_test%"), 2);

    /* Lost inside a transaction: that one rolls back, the next one runs. */
    exec_ok(db, "DEALLOCATE ALL");
    memset(&plan, 0, sizeof(plan));
    ck_assert_int_eq(mso_db_tx(db, pool, NULL, two_rows, &plan, &err), APR_EGENERAL);
    ck_assert_msg(err && strstr(err, "does not exist"), "message: %s", err ? err : "");
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 3);
    err = NULL;
    ck_assert_int_eq(mso_db_tx(db, pool, NULL, two_rows, &plan, &err), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 5);
    ck_assert_int_eq(read_all_ok(db, 2), 1);
    put_ok(db, 4, "four", 4);
    ck_assert_int_eq(pg_prepared(db, "%"), 0);

    /* Lost outside one: the run is repeated at once. */
    apr_pool_create(&sub2, pool);
    apr_pool_create(&sub3, pool);
    ck_assert_int_eq(mso_db_wrap(sub2, db->driver, db->handle, &third), APR_SUCCESS);
    put_ok(third, 5, "five", 5);
    ck_assert_int_eq(pg_prepared(db, "%AS INSERT INTO msoauth_test%"), 1);
    name = text_of(db, "SELECT name FROM pg_prepared_statements WHERE left(name, 4) = 'mso_'");
    ck_assert_int_eq(sscanf(name ? name : "", "mso_%ld_%u_%u", &pid, &number, &k), 3);
    exec_ok(db, "DEALLOCATE ALL");
    put_ok(third, 6, "six", 6);
    put_ok(other, 7, "seven", 7);
    ck_assert_int_eq(pg_prepared(db, "%"), 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 9);

    /* The next wrapper's first name is taken on the server already (another
     * client behind a pooler): unnamed at once. */
    exec_ok(db, apr_psprintf(pool, "PREPARE mso_%ld_%u_1 AS SELECT 1", pid, number + 1));
    ck_assert_int_eq(mso_db_wrap(sub3, db->driver, db->handle, &fourth), APR_SUCCESS);
    put_ok(fourth, 8, "eight", 8);
    ck_assert_int_eq(pg_prepared(db, "%AS INSERT INTO msoauth_test%"), 0);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_test"), 10);
    apr_pool_destroy(sub2);
    apr_pool_destroy(sub);
}
END_TEST

static void add_tests(TCase *tc, int backend)
{
    ADD_BOTH(tc, binder_runs_named_arguments, backend);
    ADD_BOTH(tc, binder_refuses_mistakes, backend);
    ADD_BOTH(tc, binder_blobs, backend);
    ADD_BOTH(tc, tx_commits_or_rolls_back, backend);
    ADD_BOTH(tc, lazy_tx_commits_without_waiting, backend);
    ADD_BOTH(tc, spent_state_replays_keep_the_connection_small, backend);
    ADD_BOTH(tc, failing_calls_keep_the_connection_small, backend);
    ADD_BOTH(tc, wrap_reuses_wrapper, backend);
    if (backend == BACKEND_SQLITE) {
        tcase_add_test(tc, sqlite_stale_statement);
        tcase_add_test(tc, sqlite_lazy_tx_needs_wal);
        tcase_add_test(tc, sqlite_writers_in_one_process);
        tcase_add_test(tc, sqlite_autocommit_write_waits_for_the_lock);
        tcase_add_test(tc, sqlite_lock_held_too_long_is_named);
        tcase_add_test(tc, sqlite_back_to_back_writer_lets_others_in);
    }
    else {
        tcase_add_test(tc, pgsql_named_statements);
    }
}

int main(void)
{
    return dbtest_main("db", add_tests);
}
