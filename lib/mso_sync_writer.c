/* The pass's writer thread (mso_sync_int.h): runs one database write at a
 * time (a batch of attachment contents) beside the pass's own thread, which
 * goes on driving downloads meanwhile. Both use the pass's one connection,
 * never at once: the pass reaches it only through mso_sync_db(), which first
 * waits for the write in flight and hands its result back.
 *
 * Pools: the thread allocates only in a pool with an allocator of its own,
 * and in the connection's pool (a statement prepared on first use), which
 * is why a thread is only started when that pool's allocator has a mutex
 * (threaded MPMs). Anything else (no threads, no mutex, no thread) runs the
 * write on the pass's thread at once, as before. */
#include <apr_thread_cond.h>
#include <apr_thread_mutex.h>
#include <apr_thread_proc.h>

#include "mso_log.h"
#include "mso_sync_int.h"

typedef enum { W_IDLE, W_QUEUED, W_DONE } w_state_e;

struct mso_sync_writer_t {
#if APR_HAS_THREADS
    apr_pool_t *pool;               /* unmanaged: the thread's allocator */
    apr_pool_t *wp;                 /* a write's, cleared by the thread */
    apr_thread_mutex_t *mu;
    apr_thread_cond_t *cv;
    apr_thread_t *th;
    void *log_scope;
    mso_db_t *db;
    w_state_e state;                /* under mu */
    int quit;                       /* under mu */
    int pending;                    /* the pass's thread's own: a write not settled */
    mso_sync_write_fn *write;
    mso_sync_written_fn *written;
    void *baton;
    apr_status_t rv;
    const char *err;
#endif
    int inline_only;                /* no thread to be had: write here */
};

#if APR_HAS_THREADS
static void *APR_THREAD_FUNC writer_main(apr_thread_t *th, void *data)
{
    mso_sync_writer_t *w = data;

    mso_log_scope(w->log_scope);
    apr_thread_mutex_lock(w->mu);
    for (;;) {
        apr_status_t rv;
        const char *err = NULL;

        while (w->state != W_QUEUED && !w->quit) {
            apr_thread_cond_wait(w->cv, w->mu);
        }
        if (w->state != W_QUEUED) {
            break;
        }
        apr_thread_mutex_unlock(w->mu);
        /* The last write's error text was copied by its written. */
        apr_pool_clear(w->wp);
        rv = w->write(w->db, w->wp, w->baton, &err);
        apr_thread_mutex_lock(w->mu);
        w->rv = rv;
        w->err = err;
        w->state = W_DONE;
        apr_thread_cond_broadcast(w->cv);
    }
    apr_thread_mutex_unlock(w->mu);
    apr_thread_exit(th, APR_SUCCESS);
    return NULL;
}

static int writer_start(mso_sync_writer_t *w, mso_db_t *db)
{
    apr_allocator_t *a = apr_pool_allocator_get(db->pool);

    if (!a || !apr_allocator_mutex_get(a)
        || apr_pool_create_unmanaged_ex(&w->pool, NULL, NULL) != APR_SUCCESS) {
        return 0;
    }
    w->db = db;
    w->log_scope = mso_log_scope(NULL);
    mso_log_scope(w->log_scope);
    if (apr_pool_create(&w->wp, w->pool) != APR_SUCCESS
        || apr_thread_mutex_create(&w->mu, APR_THREAD_MUTEX_DEFAULT, w->pool) != APR_SUCCESS
        || apr_thread_cond_create(&w->cv, w->pool) != APR_SUCCESS
        || apr_thread_create(&w->th, NULL, writer_main, w, w->pool) != APR_SUCCESS) {
        apr_pool_destroy(w->pool);
        w->pool = NULL;
        w->th = NULL;
        return 0;
    }
    return 1;
}
#endif

/* Waits for the write in flight, then runs its written here. */
void mso_sync_settle(mso_pass_t *pass)
{
#if APR_HAS_THREADS
    mso_sync_writer_t *w = pass->writer;
    mso_sync_written_fn *written;
    void *baton;

    if (!w || !w->pending) {
        return;
    }
    apr_thread_mutex_lock(w->mu);
    while (w->state == W_QUEUED) {
        apr_thread_cond_wait(w->cv, w->mu);
    }
    w->state = W_IDLE;
    w->pending = 0;
    written = w->written;
    baton = w->baton;
    apr_thread_mutex_unlock(w->mu);
    written(baton, w->rv, w->err);
#else
    (void)pass;
#endif
}

mso_db_t *mso_sync_db(mso_pass_t *pass)
{
    mso_sync_settle(pass);
    return pass->db_;
}

void mso_sync_write(mso_pass_t *pass, mso_sync_write_fn *write, mso_sync_written_fn *written,
                    void *baton)
{
    mso_sync_writer_t *w = pass->writer;
    apr_pool_t *tmp;
    const char *err = NULL;
    apr_status_t rv;

    mso_sync_settle(pass);
    if (!w) {
        w = pass->writer = apr_pcalloc(pass->pool, sizeof(*w));
#if APR_HAS_THREADS
        w->inline_only = !writer_start(w, pass->db_);
#else
        w->inline_only = 1;
#endif
    }
#if APR_HAS_THREADS
    if (!w->inline_only) {
        apr_thread_mutex_lock(w->mu);
        w->write = write;
        w->written = written;
        w->baton = baton;
        w->state = W_QUEUED;
        w->pending = 1;
        apr_thread_cond_broadcast(w->cv);
        apr_thread_mutex_unlock(w->mu);
        return;
    }
#endif
    apr_pool_create(&tmp, pass->pool);
    rv = write(pass->db_, tmp, baton, &err);
    written(baton, rv, err);
    apr_pool_destroy(tmp);
}

void mso_sync_writer_stop(mso_pass_t *pass)
{
    mso_sync_writer_t *w = pass->writer;

    mso_sync_settle(pass);
#if APR_HAS_THREADS
    if (w && w->th) {
        apr_status_t trv;

        apr_thread_mutex_lock(w->mu);
        w->quit = 1;
        apr_thread_cond_broadcast(w->cv);
        apr_thread_mutex_unlock(w->mu);
        apr_thread_join(&trv, w->th);
        apr_pool_destroy(w->pool);
        w->th = NULL;
        w->pool = NULL;
    }
#endif
    pass->writer = NULL;
}
