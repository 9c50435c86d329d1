/* One pass of Graph work over a batch of leased mailboxes: queued write-back
 * actions first, then the folders' delta pages, all concurrently over one
 * multi handle with at most MSO_SYNC_PER_MAILBOX requests in flight per
 * mailbox. Everything it learns is in the database when it returns; nothing
 * is kept for the next pass. */
#ifndef MSO_SYNC_H
#define MSO_SYNC_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_http.h"
#include "mso_mirror.h"

#define MSO_SYNC_PER_MAILBOX 4      /* Outlook's concurrency limit per app and mailbox */
#define MSO_SYNC_PAGE_SIZE 100      /* Prefer: odata.maxpagesize */
#define MSO_SYNC_ACTIONS 100        /* queued actions read per mailbox and pass */
/* Attachment bodies a pass (one lane) downloads at once, over all its
 * mailboxes: with the multi handle's download budget, what bounds the
 * memory they take (see mod_msoauth_job.c). */
#define MSO_SYNC_DOWNLOADS 8
#define MSO_SYNC_SENDS 40           /* queued outgoing mail read per mailbox and pass */

typedef struct {
    mso_work_t *work;               /* from mso_mirror_claim: the lease is held */
    const char *access_token;       /* Graph access token; NULL when it could not be opened */
    const char *graph_root;         /* e.g. https://graph.microsoft.com: links are
                                     * followed only under it */
    const char *mailbox_url;        /* mso_graph_mailbox(): {root}/v1.0/me or .../users/{a} */
    const apr_array_header_t *folders;  /* well-known names to mirror (const char *) */
    int interval;                   /* seconds between incremental rounds */
    int can_write;                  /* the grant has Mail.ReadWrite */
    /* MSOAuthAttachmentMaxBytes: attachments up to this size are downloaded
     * into the mirror, larger ones never (0: metadata only). */
    apr_int64_t attach_max_bytes;
    /* access_token is the company's application token (an app account:
     * roles, not scopes; mailbox_url is /users/{address}): a 401 makes the
     * company's token due, not the account's. */
    int app_only;
    int can_send;                   /* the grant has Mail.Send (.Shared for a shared
                                     * mailbox, the role for an app account) */
} mso_sync_box_t;

typedef struct {
    int mailboxes, pages, messages, resyncs;
    int actions_done, actions_failed, actions_waiting;
    int sends_done, sends_failed, sends_waiting;
    int throttled, errors;
    int attach_lists, attach_stored;    /* attachment lists read, contents stored */
    apr_int64_t attach_bytes;
} mso_sync_stats_t;

/* Runs the pass. New requests start only before slice_end (a folder in the
 * middle of a round carries on in the next pass); requests still running at
 * deadline are cut off and count as transient failures. Each mailbox's lease
 * is released with its schedule (next sync, Retry-After, backoff, phase,
 * error) before this returns. Single-threaded. APR_EINVAL without db or m. */
apr_status_t mso_sync_run(mso_db_t *db, apr_pool_t *p, const char *owner,
                          mso_sync_box_t *boxes, int n, mso_http_multi_t *m,
                          apr_time_t slice_end, apr_time_t deadline, mso_sync_stats_t *st);

/* True when a granted scope list allows write-back (Mail.ReadWrite, short or
 * with the Graph prefix). */
int mso_sync_scopes_can_write(const char *scopes);

/* True when a granted scope list holds scope (a whole word, short or with a
 * resource prefix): "Mail.ReadWrite.Shared", "Mail.Send". */
int mso_sync_scope_has(const char *scopes, const char *scope);
/* True when a granted scope list allows sending as the mailbox (Mail.Send,
 * short or with the Graph prefix; not Mail.Send.Shared, which is for other
 * mailboxes). */
int mso_sync_scopes_can_send(const char *scopes);

#endif
