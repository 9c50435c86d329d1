/* An account's recent errors (msoauth_account_events): the status page's
 * "last errors with time and fix". Each is written in the transaction that
 * records the error on the account (a failed refresh, a failed pass of
 * Graph work), and only the newest MSO_EVENTS_KEEP of an account are kept. */
#ifndef MSO_EVENTS_H
#define MSO_EVENTS_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_db.h"

#define MSO_EVENTS_KEEP 20

typedef struct {
    apr_int64_t id;
    apr_int64_t account_id;
    apr_int64_t at;
    const char *reason;             /* a reason code (mso_reason.h), or NULL */
    const char *text;               /* a sentence: never a token or secret */
} mso_event_t;

/* Inside the transaction that records the error: adds the event and drops
 * the account's events beyond the newest MSO_EVENTS_KEEP. */
apr_status_t mso_events_add_tx(mso_tx_t *tx, apr_int64_t account_id, const char *reason,
                               const char *text, apr_int64_t now);

/* The events (mso_event_t) of one account (account_id > 0) or of every
 * account (0), newest first within each account, ordered by account. */
apr_status_t mso_events_list(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                             apr_array_header_t **events);

#endif
