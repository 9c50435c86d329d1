/* The pass's writer thread (lib/mso_sync_writer.c), on SQLite and
 * PostgreSQL: a write runs on another thread while the caller goes on, its
 * result comes back on the caller's thread, the connection is only handed
 * out once no write is in flight, writes keep their order, and without a
 * thread-safe allocator everything runs on the caller's thread. */
#include "dbtest.h"

#include <pthread.h>
#include <string.h>

#include <apr_strings.h>
#include <apr_thread_cond.h>
#include <apr_thread_mutex.h>
#include <apr_time.h>

#include "mso_sync_int.h"

/* What one write saw, and what the caller lets it know. */
typedef struct {
    int seq, order;
    pthread_t write_thread, written_thread;
    int written;                    /* times written ran */
    apr_status_t rv_seen;
    char err_seen[64];
    /* The caller's go-ahead: the write waits for it (bounded). */
    apr_thread_mutex_t *mu;
    apr_thread_cond_t *cv;
    int go, saw_go, wait_for_go;
    int fail;
} probe_t;

static const mso_stmt_t ST_ADD = {
    "add a probe row", "seq:int", "INSERT INTO writer_probe (seq) VALUES (:seq)", NULL};
static int writes;                  /* writes begun, counted by the writes */

static apr_status_t probe_write(mso_db_t *db, apr_pool_t *p, void *baton, const char **err)
{
    probe_t *x = baton;
    mso_args_t *a;
    x->write_thread = pthread_self();
    x->order = ++writes;
    if (x->wait_for_go) {
        apr_time_t until = apr_time_now() + apr_time_from_sec(10);

        apr_thread_mutex_lock(x->mu);
        while (!x->go && apr_time_now() < until) {
            apr_thread_cond_timedwait(x->cv, x->mu, apr_time_from_msec(100));
        }
        x->saw_go = x->go;
        apr_thread_mutex_unlock(x->mu);
    }
    if (x->fail) {
        *err = apr_psprintf(p, "write %d refused", x->seq);
        return APR_EGENERAL;
    }
    a = mso_args(db, p, &ST_ADD);
    mso_arg_int(a, "seq", x->seq);
    return mso_exec(a, NULL, err);
}

static void probe_written(void *baton, apr_status_t rv, const char *err)
{
    probe_t *x = baton;

    x->written_thread = pthread_self();
    x->written++;
    x->rv_seen = rv;
    apr_cpystrn(x->err_seen, err ? err : "", sizeof(x->err_seen));
}

static void pass_on(mso_pass_t *pass, mso_db_t *db, apr_pool_t *p)
{
    memset(pass, 0, sizeof(*pass));
    pass->pool = p;
    pass->db_ = db;
    pass->owner = "test";
}

static probe_t *probe(apr_pool_t *p, int seq)
{
    probe_t *x = apr_pcalloc(p, sizeof(*x));

    x->seq = seq;
    ck_assert_int_eq(apr_thread_mutex_create(&x->mu, APR_THREAD_MUTEX_DEFAULT, p),
                     APR_SUCCESS);
    ck_assert_int_eq(apr_thread_cond_create(&x->cv, p), APR_SUCCESS);
    return x;
}

static void let_go(probe_t *x)
{
    apr_thread_mutex_lock(x->mu);
    x->go = 1;
    apr_thread_cond_broadcast(x->cv);
    apr_thread_mutex_unlock(x->mu);
}

/* A pool whose allocator has a mutex, as a threaded MPM's child pool. */
static apr_pool_t *threaded_pool(void)
{
    apr_allocator_t *a;
    apr_thread_mutex_t *m;
    apr_pool_t *p;

    ck_assert_int_eq(apr_allocator_create(&a), APR_SUCCESS);
    ck_assert_int_eq(apr_pool_create_ex(&p, pool, NULL, a), APR_SUCCESS);
    apr_allocator_owner_set(a, p);
    ck_assert_int_eq(apr_thread_mutex_create(&m, APR_THREAD_MUTEX_DEFAULT, p), APR_SUCCESS);
    apr_allocator_mutex_set(a, m);
    return p;
}

static mso_db_t *probe_db(int backend, apr_pool_t *p)
{
    mso_db_t *db;

    (void)fresh_db(backend);
    db = connect_db(backend, p);
    exec_ok(db, "DROP TABLE IF EXISTS writer_probe");
    exec_ok(db, "CREATE TABLE writer_probe (seq INTEGER NOT NULL)");
    return db;
}

/* A probe database on a connection a writer thread may use, and a pass on it. */
static mso_db_t *threaded_pass(int backend, mso_pass_t *pass)
{
    mso_db_t *db = probe_db(backend, threaded_pool());

    pass_on(pass, db, pool);
    return db;
}

START_TEST(a_write_runs_beside_the_caller)
{
    mso_pass_t pass;
    mso_db_t *db = threaded_pass(_i, &pass);
    probe_t *x = probe(pool, 1);

    x->wait_for_go = 1;
    mso_sync_write(&pass, probe_write, probe_written, x);
    /* Back here while the write still waits for us: it runs elsewhere. */
    ck_assert_int_eq(x->written, 0);
    let_go(x);
    mso_sync_settle(&pass);
    ck_assert_int_eq(x->saw_go, 1);
    ck_assert_int_eq(x->written, 1);
    ck_assert_int_eq(x->rv_seen, APR_SUCCESS);
    ck_assert(!pthread_equal(x->write_thread, pthread_self()));
    ck_assert(pthread_equal(x->written_thread, pthread_self()));
    mso_sync_writer_stop(&pass);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM writer_probe WHERE seq = 1"), 1);
}
END_TEST

START_TEST(the_connection_waits_for_the_write)
{
    mso_pass_t pass;
    mso_db_t *db = threaded_pass(_i, &pass);
    probe_t *x = probe(pool, 2), *y = probe(pool, 3);

    mso_sync_write(&pass, probe_write, probe_written, x);
    /* The connection comes back only after the write and its written. */
    ck_assert_ptr_eq(mso_sync_db(&pass), db);
    ck_assert_int_eq(x->written, 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM writer_probe WHERE seq = 2"), 1);
    /* A second write waits for the first; order is kept. */
    x->written = 0;
    mso_sync_write(&pass, probe_write, probe_written, y);
    mso_sync_write(&pass, probe_write, probe_written, x);
    ck_assert_int_eq(y->written, 1);
    mso_sync_writer_stop(&pass);
    ck_assert_int_eq(x->written, 1);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM writer_probe"), 3);
    ck_assert_int_lt(y->order, x->order);
}
END_TEST

START_TEST(a_failed_write_says_why)
{
    mso_pass_t pass;
    mso_db_t *db = threaded_pass(_i, &pass);
    probe_t *x = probe(pool, 4);

    x->fail = 1;
    mso_sync_write(&pass, probe_write, probe_written, x);
    mso_sync_writer_stop(&pass);
    ck_assert_int_eq(x->written, 1);
    ck_assert_int_eq(x->rv_seen, APR_EGENERAL);
    ck_assert_str_eq(x->err_seen, "write 4 refused");
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM writer_probe"), 0);
}
END_TEST

/* A connection whose pool's allocator has no mutex (what a non-threaded
 * MPM gives): another thread must not allocate there, so the write runs
 * here, at once. */
START_TEST(without_a_safe_allocator_it_writes_here)
{
    apr_pool_t *p;
    mso_db_t *db;
    mso_pass_t pass;
    probe_t *x;

    ck_assert_int_eq(apr_pool_create_unmanaged_ex(&p, NULL, NULL), APR_SUCCESS);
    db = probe_db(_i, p);
    ck_assert_ptr_null(apr_allocator_mutex_get(apr_pool_allocator_get(db->pool)));
    x = probe(p, 5);
    pass_on(&pass, db, p);
    mso_sync_write(&pass, probe_write, probe_written, x);
    ck_assert_int_eq(x->written, 1);
    ck_assert(pthread_equal(x->write_thread, pthread_self()));
    mso_sync_writer_stop(&pass);
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM writer_probe WHERE seq = 5"), 1);
    apr_pool_destroy(p);
}
END_TEST

static void add_tests(TCase *tc, int backend)
{
    ADD_BOTH(tc, a_write_runs_beside_the_caller, backend);
    ADD_BOTH(tc, the_connection_waits_for_the_write, backend);
    ADD_BOTH(tc, a_failed_write_says_why, backend);
    ADD_BOTH(tc, without_a_safe_allocator_it_writes_here, backend);
}

int main(void)
{
    return dbtest_main("writer", add_tests);
}
