/* Attachments in the database (msoauth_attachments): one row per attachment
 * of a mirrored message, keyed by (account, message's immutable id,
 * attachment id), so a message that moves between mirrored folders keeps its
 * rows and a removed one takes them with it (mso_mirror, in the transaction
 * that removes it).
 *
 * A message's attachment list is read again after each change Graph reports
 * for it (its attach_due counts them), when it has attachments or an HTML
 * body that may show inline parts (cid:). A row's state says what its
 * content is:
 *   pending  the job downloads it (size within MSOAuthAttachmentMaxBytes)
 *   stored   content holds the bytes (a file's, an attached message's MIME,
 *            a reference's link), fetched_at when
 *   large    above the size limit (or the limit is 0): served on demand
 *   failed   Graph refused it, or it failed MSO_ATTACH_TRIES times: served
 *            on demand; the next change of the message tries again
 * Every write of the job is fenced by the mailbox's work lease
 * (mso_mirror_fence). */
#ifndef MSO_ATTACH_H
#define MSO_ATTACH_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_hash.h>
#include <apr_tables.h>

#include "mso_db.h"
#include "mso_graph.h"

/* Failed tries (listings or downloads Graph did not answer) before an item
 * is given up. Each try follows the mailbox's error backoff. */
#define MSO_ATTACH_TRIES 3

/* --- the job: listing messages --- */

/* A message whose attachment list must be read. */
typedef struct {
    const char *graph_id;
    apr_int64_t received_at;
    apr_int64_t due;                /* attach_due as read: only this is cleared */
    int tries;
} mso_attach_msg_t;

/* The account's messages to list, newest first, at most max. *out:
 * mso_attach_msg_t*. */
apr_status_t mso_attach_due_messages(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                     int max, apr_array_header_t **out);

/* Stores a message's list (mso_graph_att_t) in one fenced transaction when
 * the message is still mirrored and unchanged since m was read: rows added,
 * rows changed (another size or lastModifiedDateTime: their content goes,
 * to be fetched again), rows not in the list deleted, the message current.
 * New content is pending when within cap (0: none is), else large. A
 * message that changed meanwhile is left for the next listing (*stale 1,
 * nothing written). APR_EBUSY: the lease is gone. */
apr_status_t mso_attach_store_list(mso_db_t *db, apr_pool_t *p, const char *owner,
                                   apr_int64_t account_id, const mso_attach_msg_t *m,
                                   const apr_array_header_t *atts, apr_int64_t cap,
                                   apr_int64_t now, int *stale, const char **err);

/* A listing that failed: one more try, and at MSO_ATTACH_TRIES (or at once
 * with give_up: the message is gone from Graph) the message is left as it
 * is (*gave_up). */
apr_status_t mso_attach_list_failed(mso_db_t *db, apr_pool_t *p, const char *owner,
                                    apr_int64_t account_id, const mso_attach_msg_t *m,
                                    int give_up, int *gave_up);

/* --- the job: downloading --- */

typedef struct {
    const char *graph_id;
    const char *attachment_id;
    const char *kind;
    apr_int64_t size;               /* -1: unknown */
    const char *last_modified;
    int tries;
} mso_attach_item_t;

/* The account's pending attachments, those of the newest messages first, at
 * most max. *out: mso_attach_item_t*. */
apr_status_t mso_attach_pending(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id, int max,
                                 apr_array_header_t **out);

/* Stores the content of an attachment: state stored, fetched_at now. Only
 * while its content is still NULL and its lastModifiedDateTime the one it was
 * fetched for; with owner (the job) fenced and only a pending row, without
 * (a handler) any row. *stored 0 when nothing matched. data NULL with len 0
 * is an empty content. APR_EBUSY: the lease is gone. */
apr_status_t mso_attach_store_content(mso_db_t *db, apr_pool_t *p, const char *owner,
                                      apr_int64_t account_id, const char *graph_id,
                                      const char *attachment_id, const char *last_modified,
                                      const void *data, apr_size_t len, apr_int64_t now,
                                      int *stored, const char **err);

/* Several contents in one fenced transaction (a commit per megabyte costs
 * more than the write on PostgreSQL), each stored as by
 * mso_attach_store_content; c[i].stored says which were. */
typedef struct {
    const char *graph_id;
    const char *attachment_id;
    const char *last_modified;
    const void *data;
    apr_size_t len;
    int stored;                     /* out */
} mso_attach_content_t;

apr_status_t mso_attach_store_contents(mso_db_t *db, apr_pool_t *p, const char *owner,
                                       apr_int64_t account_id, mso_attach_content_t *c, int n,
                                       apr_int64_t now, const char **err);

/* A pending attachment not downloaded: state large (above the limit) or
 * failed (Graph refused it, error says how), fenced. */
apr_status_t mso_attach_set_state(mso_db_t *db, apr_pool_t *p, const char *owner,
                                  apr_int64_t account_id, const char *graph_id,
                                  const char *attachment_id, const char *state,
                                  const char *error, apr_int64_t now);

/* A download that failed for now: one more try; at MSO_ATTACH_TRIES it is
 * failed (*gave_up). */
apr_status_t mso_attach_fetch_failed(mso_db_t *db, apr_pool_t *p, const char *owner,
                                     apr_int64_t account_id, const char *graph_id,
                                     const char *attachment_id, const char *error,
                                     apr_int64_t now, int *gave_up);

/* --- the mirror's removals (inside mso_mirror's transactions) --- */

/* The rows of one message. */
apr_status_t mso_attach_drop_tx(mso_tx_t *tx, apr_int64_t account_id, const char *graph_id);

/* The rows of the messages a full round of folder is about to mark removed
 * (not seen by round): run before that sweep. */
apr_status_t mso_attach_drop_unseen_tx(mso_tx_t *tx, apr_int64_t account_id,
                                       const char *folder, int round);

/* --- retention --- */

/* Deletes the rows whose message is no longer mirrored (purged by retention,
 * or removed): of one account, or of all with account_id 0. *purged: rows
 * deleted (may be NULL). The _tx form runs inside the caller's transaction
 * (after its purge of messages). */
apr_status_t mso_attach_purge(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                              int *purged, const char **err);
apr_status_t mso_attach_purge_tx(mso_tx_t *tx, apr_int64_t account_id, int *purged);

/* --- serving --- */

typedef struct {
    apr_int64_t account_id;
    const char *graph_id;
    const char *attachment_id;
    const char *name;
    const char *content_type;
    apr_int64_t size;
    int is_inline;
    const char *content_id;
    const char *kind;
    const char *state;
    const char *last_modified;
    apr_int64_t fetched_at;
    apr_int64_t length;             /* bytes of content; -1 when NULL */
} mso_attach_t;

/* Whether the message is mirrored (not removed), and whether its list is
 * being read again (due). */
apr_status_t mso_attach_message(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                const char *graph_id, int *mirrored, int *due);

/* A row without its content; APR_NOTFOUND when there is none. */
apr_status_t mso_attach_get(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                            const char *graph_id, const char *attachment_id,
                            mso_attach_t **out);

/* len bytes of content from offset (0-based): *data in p, *got fewer at
 * the end; APR_NOTFOUND when the content is NULL (changed meanwhile). Read
 * a large content piece by piece: the whole of it is never needed at once. */
apr_status_t mso_attach_read(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                             const char *graph_id, const char *attachment_id,
                             apr_int64_t offset, apr_size_t len,
                             const unsigned char **data, apr_size_t *got);

/* The Content-Type to serve: an item is message/rfc822, a reference
 * text/uri-list; a file's type from Graph only when it is a plain
 * type/subtype of token characters (lower-cased, parameters dropped), else
 * application/octet-stream. */
const char *mso_attach_safe_type(apr_pool_t *p, const char *kind, const char *content_type);

/* The Content-Disposition of an attachment named name (hostile): attachment;
 * filename="ASCII"; filename*=UTF-8''... (RFC 6266). No path, no quotes,
 * backslashes, controls, bidirectional overrides or invalid UTF-8; "."
 * and spaces trimmed at both ends; at most 200 bytes; "attachment" when
 * nothing is left. */
const char *mso_attach_disposition(apr_pool_t *p, const char *name);

/* --- the status page --- */

typedef struct {
    apr_int64_t account_id;
    apr_int64_t count, stored, pending, large, failed;
    apr_int64_t bytes;              /* of stored content */
    apr_int64_t lists_due;          /* messages whose list is to be read */
} mso_attach_stats_t;

/* Per account (apr_hash keyed by the account id as a decimal string). */
apr_status_t mso_attach_stats(mso_db_t *db, apr_pool_t *p, apr_hash_t **stats);

#endif
