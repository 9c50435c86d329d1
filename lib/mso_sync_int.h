/* Inside one pass of Graph work (lib/mso_sync*.c only): the pass, a
 * mailbox's runtime, requests, and the kinds of work a mailbox has. The core
 * (mso_sync.c) runs the mailboxes; each kind (write-back actions, folder
 * delta pages, ...) lives in its own file and plugs in with three hooks. */
#ifndef MSO_SYNC_INT_H
#define MSO_SYNC_INT_H

#include <apr_pools.h>
#include <apr_time.h>

#include "mso_graph.h"
#include "mso_http.h"
#include "mso_sync.h"

typedef struct mso_sync_writer_t mso_sync_writer_t;

typedef struct {
    apr_pool_t *pool;
    mso_db_t *db_;                  /* only through mso_sync_db() */
    mso_sync_writer_t *writer;      /* NULL until the first mso_sync_write */
    const char *owner;
    mso_http_multi_t *m;
    apr_time_t slice_end;
    mso_sync_stats_t *st;
    int downloads;                  /* attachment bodies in flight (MSO_SYNC_DOWNLOADS) */
} mso_pass_t;

/* The kinds, in the order the core offers them room: small writes the
 * application waits for first, then the mirror's pages. */
typedef enum {
    MSO_KIND_ACTIONS = 0,
    MSO_KIND_SEND,
    MSO_KIND_FOLDERS,
    MSO_KIND_ATTACH,                /* attachments: after the text, in the room left */
    MSO_KIND_MAX
} mso_kind_e;

typedef struct mso_box_t {
    mso_pass_t *pass;
    mso_sync_box_t *in;
    apr_pool_t *pool;
    apr_int64_t id;
    int inflight;
    int sync_due;                   /* the folders' rounds are due this pass */
    int stop;                       /* no new requests for this mailbox */
    int lost;                       /* the lease is gone: write nothing more */
    int throttled;
    long retry_after;
    int unauthorized;
    const char *error;              /* first failure of the pass */
    const char *mailbox_reason;     /* mso_graph_mailbox_reason of that failure, or NULL */
    const char *company_reason;     /* the company's token was refused as such, or NULL */
    const char *graph_error;        /* Graph's answer with it, for the log */
    int pages_stored;               /* delta pages stored this pass (new mail) */
    void *kind[MSO_KIND_MAX];       /* each kind's runtime for this mailbox */
} mso_box_t;

/* One kind of Graph work of a mailbox. */
typedef struct {
    const char *name;
    /* Reads the mailbox's work of this kind when the pass starts. */
    void (*setup)(mso_box_t *b);
    /* Starts what may start while mso_sync_room(b); 1 when it started
     * something (the core offers room again), 0 when it has nothing now. */
    int (*pump)(mso_box_t *b);
    /* Its part of the mailbox's schedule after the pass, before the core
     * adds throttling and errors (NULL: none). */
    void (*release)(mso_box_t *b, mso_work_done_t *d, apr_int64_t now);
} mso_sync_kind_t;

extern const mso_sync_kind_t mso_sync_actions;
extern const mso_sync_kind_t mso_sync_outbox;
extern const mso_sync_kind_t mso_sync_folders;
extern const mso_sync_kind_t mso_sync_attach;

/* One request of a mailbox: its own pool (the answer lives in it), the item
 * of the kind it is for and a step of the kind's choosing. */
typedef struct {
    mso_box_t *box;
    apr_pool_t *pool;
    void *item;
    int step;
} mso_req_t;

apr_int64_t mso_sync_now(void);
/* True while the mailbox may start one more request in this pass. */
int mso_sync_room(const mso_box_t *b);
/* The first failure of the pass is what the account shows; no more
 * requests for the mailbox in this pass. */
void mso_sync_error(mso_box_t *b, const char *text);
/* Graph asked to wait (429/503): the mailbox stops for Retry-After. */
void mso_sync_throttle(mso_box_t *b, const mso_graph_result_t *g);
/* True (and the mailbox stops, with its reason) when Graph's answer says
 * the mailbox itself cannot be reached (mso_graph_mailbox_reason): the
 * kinds check it first, so that such an answer is never taken for a
 * missing message or folder. */
int mso_sync_mailbox_problem(mso_box_t *b, const mso_graph_result_t *g);
/* Graph refused the token (401): refreshed once, then retried. */
void mso_sync_unauthorized(mso_box_t *b, const mso_graph_result_t *g);
/* True when name is one of the mailbox's mirrored folders. */
int mso_sync_in_folders(const mso_box_t *b, const char *name);

mso_req_t *mso_sync_req(mso_box_t *b, void *item, int step);
/* Sends rq with the mailbox's token (and a page size cap when page_size >
 * 0); done gets rq as its baton. Not sent: rq's pool is destroyed and the
 * error returned. */
apr_status_t mso_sync_send(mso_req_t *rq, const char *method, const char *url,
                           const char *body, int page_size, mso_http_done_fn *done);
/* A GET of bytes (an attachment's $value): kept as received up to max_body,
 * against the multi handle's download budget, in pool (the answer outlives
 * the request when pool is not rq's); otherwise as mso_sync_send. */
apr_status_t mso_sync_send_raw(mso_req_t *rq, apr_pool_t *pool, const char *url,
                               apr_size_t max_body, mso_http_done_fn *done);
/* A request with its own headers and a body of len bytes, without the
 * mailbox's token (a pre-authenticated upload URL); otherwise as
 * mso_sync_send. */
apr_status_t mso_sync_send_upload(mso_req_t *rq, const char *method, const char *url,
                                  const apr_array_header_t *headers, const char *body,
                                  apr_size_t len, mso_http_done_fn *done);
/* Offers the mailbox's room to its kinds again (a kind that waited for
 * something another mailbox released). */
void mso_sync_pump(mso_box_t *b);
/* First thing in a done callback: the mailbox has one request less. */
void mso_sync_answered(mso_req_t *rq);
/* Last thing in a done callback: the request's pool goes, and the mailbox
 * is offered room again. */
void mso_sync_finished(mso_req_t *rq);

/* ---- the pass's writer thread (mso_sync_writer.c) ------------------------ */

/* A write to run beside the pass: err and whatever it allocates in p
 * (cleared before the next write). */
typedef apr_status_t mso_sync_write_fn(mso_db_t *db, apr_pool_t *p, void *baton,
                                       const char **err);
/* Its result, back on the pass's thread; err goes with the next write. */
typedef void mso_sync_written_fn(void *baton, apr_status_t rv, const char *err);

/* The pass's connection, once no write is in flight (whose written runs
 * first). Every use of the database in a pass goes through it. */
mso_db_t *mso_sync_db(mso_pass_t *pass);
/* Runs write on the pass's writer thread and returns; written runs later on
 * the pass's thread, at the next mso_sync_db, mso_sync_write or
 * mso_sync_settle. One write at a time: this waits for the one before. The
 * caller leaves baton and what it points to alone until written. Without a
 * thread (no threads, an allocator without a mutex) both run here now. */
void mso_sync_write(mso_pass_t *pass, mso_sync_write_fn *write, mso_sync_written_fn *written,
                    void *baton);
/* Waits for the write in flight, if any, and runs its written. */
void mso_sync_settle(mso_pass_t *pass);
/* Settles and ends the writer thread: the end of the pass. */
void mso_sync_writer_stop(mso_pass_t *pass);

#endif
