/* The mirror in the database: message pages applied together with the folder
 * cursor that follows them, the Graph work lease on a mailbox, and the
 * write-back queue. Every write that belongs to a mailbox's Graph work runs
 * only while the caller still holds that mailbox's work lease. */
#ifndef MSO_MIRROR_H
#define MSO_MIRROR_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_hash.h>
#include <apr_tables.h>

#include "mso_graph.h"
#include "mso_account.h"
#include "mso_db.h"

/* Seconds a work lease lasts from the last write that renewed it: a pass
 * writes at least every tick budget (20 s), and a node that died lets go of
 * its mailboxes this long after. */
#define MSO_MIRROR_LEASE 45

/* A mailbox claimed for Graph work, with its sync bookkeeping. */
typedef struct {
    mso_account_t *acct;
    apr_int64_t sync_due_at;        /* 0: now */
    apr_int64_t sync_retry_at;
    const char *sync_phase;         /* initial | backfill | idle | throttled */
    const char *sync_error;
    int sync_error_runs;
    int auth_retry;                 /* 1: a 401 asked for a refresh; the next one is an error */
    int queued_actions;             /* claimed because actions wait */
    int attach_work;                /* attachments to list or download */
    int queued_sends;               /* rows of msoauth_outbox queued */
} mso_work_t;

/* Claims up to max connected mailboxes with Graph work to do: a sync due,
 * an action or a row of the outbox queued (and not held back by its
 * retry_at), attachments to fetch, not throttled (sync_retry_at), with an
 * access token good for at least a minute whose refresh is not due (an app
 * account: its company's Graph application token good for a minute), and
 * no live work lease of another owner. Each gets a lease until now +
 * lease_seconds. *works:
 * mso_work_t* in p. */
apr_status_t mso_mirror_claim(mso_db_t *db, apr_pool_t *p, const char *owner, apr_int64_t now,
                              int lease_seconds, int max, apr_array_header_t **works);

/* The first statement of every transaction that writes for a mailbox's
 * Graph work (here, in mso_attach and mso_outbox): extends the work lease
 * and proves it is still owner's. APR_EBUSY when it is not: nothing may be
 * written. */
apr_status_t mso_mirror_fence(mso_tx_t *tx, apr_int64_t account_id, const char *owner);

/* What one pass of work leaves on the account; releases the lease (only if
 * still ours). last_sync_at 0: unchanged. */
typedef struct {
    apr_int64_t sync_due_at;
    apr_int64_t sync_retry_at;      /* 0: none */
    const char *sync_phase;
    const char *sync_error;         /* NULL clears it */
    int sync_error_runs;
    int auth_retry;
    apr_int64_t last_sync_at;
    int refresh_now;                /* a 401: make the token's refresh due now */
} mso_work_done_t;

apr_status_t mso_mirror_release(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                const char *owner, const mso_work_done_t *d, apr_int64_t now);

/* "Sync now" (admin): due at once; an error backoff is dropped, a
 * Retry-After from Microsoft is kept. APR_NOTFOUND for no such account. */
apr_status_t mso_mirror_sync_now(mso_db_t *db, apr_pool_t *p, apr_int64_t id);

/* A folder's cursor (msoauth_sync_folders). */
typedef struct {
    const char *folder;
    const char *delta_link;         /* end of the last complete round */
    const char *next_link;          /* the page to fetch next in a round in progress */
    const char *phase;              /* initial | backfill | idle */
    int round;
    apr_int64_t last_sync_at;
    int resyncs;
} mso_folder_t;

/* The cursors of the account's folders, in the order of folders (const char
 * *), creating rows for folders not seen before. *out: mso_folder_t*. */
apr_status_t mso_mirror_folders(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                const apr_array_header_t *folders, apr_array_header_t **out);

/* Applies one delta page of folder f in one transaction with the cursor that
 * follows it (page->next_link, or page->delta_link which ends the round): new
 * and changed messages are upserted by (account, graph_id), @removed marks
 * them removed, and the end of a full round removes what the round did not
 * see. Replays are harmless. On success f is updated. APR_EBUSY when the
 * lease is no longer ours (nothing written); *err on failure. */
apr_status_t mso_mirror_apply_page(mso_db_t *db, apr_pool_t *p, const char *owner,
                                   apr_int64_t account_id, mso_folder_t *f,
                                   const mso_graph_page_t *page, apr_int64_t now,
                                   int *applied, const char **err);

/* Starts a new full round of folder f from first_link (410 / syncStateNotFound):
 * round + 1, the old delta link dropped. f->next_link becomes first_link
 * itself (not a copy): it must live as long as f. */
apr_status_t mso_mirror_restart_folder(mso_db_t *db, apr_pool_t *p, const char *owner,
                                       apr_int64_t account_id, mso_folder_t *f,
                                       const char *first_link, apr_int64_t now);

/* --- the write-back queue --- */

typedef struct {
    apr_int64_t id;
    apr_int64_t account_id;
    const char *graph_id;
    const char *action;             /* mark_read | mark_unread | move | delete */
    const char *destination;
    int attempts;
    apr_int64_t sent_at;            /* 0: no Graph call can have happened */
    apr_int64_t created_at;
} mso_action_t;

/* The account's queued actions, oldest first (mso_action_t*). */
apr_status_t mso_mirror_actions(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id, int max,
                                apr_array_header_t **actions);

/* Committed before the Graph call: attempts + 1 and sent_at, so a crash after
 * the call is known to leave an uncertain outcome. */
apr_status_t mso_mirror_action_sending(mso_db_t *db, apr_pool_t *p, const char *owner,
                                       const mso_action_t *a, apr_int64_t now);

/* Done: the action and the mirror row in one transaction. For move/delete,
 * folder is the destination as stored and removed says whether the folder is
 * outside the mirror. */
apr_status_t mso_mirror_action_done(mso_db_t *db, apr_pool_t *p, const char *owner,
                                    const mso_action_t *a, const char *folder, int removed,
                                    apr_int64_t now);

/* Failed for good: reason code and a sentence. */
apr_status_t mso_mirror_action_failed(mso_db_t *db, apr_pool_t *p, const char *owner,
                                      const mso_action_t *a, const char *reason,
                                      const char *last_error, apr_int64_t now);

/* Not done yet, stays queued: last_error, and whether a call may have been
 * carried out (sent_at kept) or certainly was not (sent_at cleared). */
apr_status_t mso_mirror_action_later(mso_db_t *db, apr_pool_t *p, const char *owner,
                                     const mso_action_t *a, const char *last_error,
                                     int maybe_applied, apr_int64_t now);

/* --- for the admin page --- */

typedef struct {
    apr_int64_t account_id;
    apr_int64_t messages;           /* not removed */
    apr_int64_t queued, failed;
    apr_int64_t oldest_queued_at;   /* 0: none */
    const char *sync_phase;
    const char *sync_error;
    apr_int64_t sync_due_at, sync_retry_at;
} mso_mirror_stats_t;

/* Per account (apr_hash keyed by the account id as a decimal string). */
apr_status_t mso_mirror_stats(mso_db_t *db, apr_pool_t *p, apr_hash_t **stats);

/* --- retention (mso_retention.h's list): up to max rows last changed
 * before `before`, in one statement; *deleted: how many went --- */

/* Actions in state done. */
apr_status_t mso_mirror_purge_actions(mso_db_t *db, apr_pool_t *p, apr_int64_t before,
                                      int max, int *deleted);
/* Messages marked removed. */
apr_status_t mso_mirror_purge_messages(mso_db_t *db, apr_pool_t *p, apr_int64_t before,
                                       int max, int *deleted);

#endif
