/* The outbox in the database (msoauth_outbox, msoauth_outbox_attachments):
 * what the application queued to send, and each step of a send as it is
 * committed. A row goes through phases (see mso_schema.c, version 5):
 *
 *   NULL      nothing of it is at Graph
 *   creating  a call that makes its draft may have gone out: the draft, if
 *             any, is found by the row's marker
 *   draft     the draft's id is committed; attachments follow one by one,
 *             each with its own phase (NULL, adding: the call may have gone
 *             out, added: its Graph id is committed)
 *   sending   the send call may have gone out since sending_since
 *
 * and ends in state sent (internet_message_id, sent_at) or failed (reason,
 * last_error). Every write for a row runs in one transaction that starts
 * with the mailbox's work lease fence (mso_mirror_fence) and changes the row
 * only while it is still queued: a node that lost the lease, or a row the
 * application took back, is left alone. */
#ifndef MSO_OUTBOX_H
#define MSO_OUTBOX_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_hash.h>
#include <apr_tables.h>

#include "mso_db.h"

typedef struct {
    apr_int64_t id;
    apr_int64_t outbox_id;
    const char *name;
    const char *content_type;
    int is_inline;
    const char *content_id;
    apr_int64_t size;               /* bytes of content (0 for NULL) */
    const char *phase;              /* NULL | adding | added */
    const char *graph_id;           /* once added */
} mso_outbox_att_t;

/* A queued row, without its body (mso_outbox_body reads it when needed). */
typedef struct {
    apr_int64_t id;
    apr_int64_t account_id;
    const char *to_json, *cc_json, *bcc_json;
    const char *subject;
    const char *body_type;
    apr_int64_t body_len;           /* bytes */
    const char *reply_to_graph_id;
    int attempts;
    const char *marker;             /* NULL until the first attempt */
    const char *phase;              /* NULL | creating | draft | sending */
    const char *draft_id;
    const char *internet_message_id;
    apr_int64_t sending_since;
    apr_int64_t created_at;
    apr_array_header_t *atts;       /* mso_outbox_att_t*, in id order */
} mso_outbox_t;

/* The account's queued rows whose retry_at has come, oldest first, at most
 * max, each with its attachments' metadata (no bytes). *rows: mso_outbox_t*
 * in p. */
apr_status_t mso_outbox_queue(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                              apr_int64_t now, int max, apr_array_header_t **rows);

/* The row's body ("" for NULL), in p. */
apr_status_t mso_outbox_body(mso_db_t *db, apr_pool_t *p, apr_int64_t id, const char **body);

/* len bytes of an attachment's content from offset (fewer at its end), in
 * p: one chunk in memory, never the whole of a large attachment. */
apr_status_t mso_outbox_att_bytes(mso_db_t *db, apr_pool_t *p, apr_int64_t att_id,
                                  apr_int64_t offset, apr_int64_t len,
                                  const unsigned char **data, apr_size_t *n);

/* One committed step of a row. */
typedef enum {
    MSO_OUTBOX_CREATING,            /* marker (kept if set), retry_at */
    MSO_OUTBOX_UNMARK,              /* creating, but its call never went out: phase NULL */
    MSO_OUTBOX_DRAFT,               /* draft_id, internet_message_id; retry_at cleared */
    MSO_OUTBOX_SENDING,             /* draft_id, sending_since now, retry_at, attempts + 1
                                     * (attempts counts the send calls) */
    MSO_OUTBOX_SENT,                /* state sent, sent_at now, internet_message_id */
    MSO_OUTBOX_FAILED,              /* state failed, reason, last_error */
    MSO_OUTBOX_LATER,               /* stays queued: phase, last_error, retry_at */
    MSO_OUTBOX_RESTART,             /* the draft is gone before any send: everything
                                     * from the start (phase NULL, attachments too) */
    MSO_OUTBOX_ATT_ADDING,          /* att: the call may go out; the row's retry_at */
    MSO_OUTBOX_ATT_ADDED            /* att: graph_id */
} mso_outbox_step_e;

typedef struct {
    mso_outbox_step_e step;
    const char *marker;
    const char *draft_id;
    const char *internet_message_id;    /* NULL keeps the stored one */
    const char *phase;                  /* LATER */
    const char *reason;
    const char *last_error;
    apr_int64_t retry_at;               /* 0: none */
    mso_outbox_att_t *att;
    const char *graph_id;
} mso_outbox_step_t;

typedef struct {
    mso_outbox_t *o;
    mso_outbox_step_t s;
    apr_status_t rv;                    /* out */
} mso_outbox_write_t;

/* Commits n steps in order in one transaction (group commit: one sync to
 * disk for all), each fenced by owner's work lease on its row's mailbox.
 * Per write, rv: APR_SUCCESS, APR_EBUSY (the lease is gone: nothing of it
 * written) or APR_NOTFOUND (the row or attachment is no longer queued:
 * left alone). Returns the database's failure (then nothing is committed
 * and every rv is it), else APR_SUCCESS. The rows in memory are not
 * touched: see mso_outbox_apply. */
apr_status_t mso_outbox_commit(mso_db_t *db, apr_pool_t *p, const char *owner,
                               mso_outbox_write_t *w, int n, apr_int64_t now);

/* o (and s->att) as the database holds them once s is committed. */
void mso_outbox_apply(apr_pool_t *p, mso_outbox_t *o, const mso_outbox_step_t *s,
                      apr_int64_t now);

/* One step: committed, then applied to o. */
apr_status_t mso_outbox_record(mso_db_t *db, apr_pool_t *p, const char *owner,
                               mso_outbox_t *o, const mso_outbox_step_t *s, apr_int64_t now);

/* --- for the admin page --- */

typedef struct {
    apr_int64_t account_id;
    apr_int64_t queued, failed, sent;
    apr_int64_t oldest_queued_at;   /* 0: none */
    apr_int64_t last_failed_id;     /* the newest failed row, 0: none */
    const char *last_failed_reason;
    const char *last_failed_error;
} mso_outbox_stats_t;

/* Per account (apr_hash keyed by the account id as a decimal string). */
apr_status_t mso_outbox_stats(mso_db_t *db, apr_pool_t *p, apr_hash_t **stats);

/* Retention (an mso_purge_fn): deletes up to max sent rows whose sent_at
 * is before `before`, with their attachments, in one transaction; *deleted:
 * rows deleted. Failed rows stay until the application deletes them. */
apr_status_t mso_outbox_purge(mso_db_t *db, apr_pool_t *p, apr_int64_t before, int max,
                              int *deleted);

#endif
