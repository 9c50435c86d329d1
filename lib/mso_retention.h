/* Retention (MSOAuthRetentionDays): what the application no longer needs is
 * deleted once it is older than the retention, by the job, at most once an
 * hour per node: done actions, removed messages and sent mail. Each table's purge
 * lives with its statements and is one line of the list in
 * mso_retention.c. */
#ifndef MSO_RETENTION_H
#define MSO_RETENTION_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_time.h>

#include "mso_db.h"

#define MSO_RETENTION_BATCH 500     /* rows one statement deletes */
#define MSO_RETENTION_MAX 8         /* entries the list may have: size of deleted[] */

/* Deletes up to max rows last changed before `before`, in one statement. */
typedef apr_status_t mso_purge_fn(mso_db_t *db, apr_pool_t *p, apr_int64_t before, int max,
                                  int *deleted);

typedef struct {
    const char *what;               /* for logs and metrics: "done actions" */
    const char *name;               /* a metric label: "actions" */
    mso_purge_fn *purge;
} mso_purge_t;

/* The list, ending with a NULL what. */
const mso_purge_t *mso_retention_list(void);

/* One sweep: each table of the list in batches of MSO_RETENTION_BATCH until
 * nothing older than days is left or deadline passes. days 0 keeps
 * everything. deleted[i] (for the list's entry i; may be NULL) gets how many
 * rows went; *finished (may be NULL) is 0 when the deadline cut it short.
 * Stops at the first database failure (*err, in p). */
apr_status_t mso_retention_sweep(mso_db_t *db, apr_pool_t *p, int days, apr_int64_t now,
                                 apr_time_t deadline, apr_int64_t *deleted, int *finished,
                                 const char **err);

#endif
