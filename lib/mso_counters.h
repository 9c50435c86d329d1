/* Counters that add up over the life of each node (msoauth_counters): what
 * the job did, by kind and outcome, for the metrics. A counter is a metric
 * name, a label value ("" for none) and the node; it only grows, across
 * restarts of the node, so Prometheus' rate() works on it. */
#ifndef MSO_COUNTERS_H
#define MSO_COUNTERS_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_db.h"

typedef struct {
    const char *metric;             /* e.g. "refreshes": msoauth_refreshes_total */
    const char *label;              /* e.g. the outcome; "" or NULL for none */
    apr_int64_t value;
} mso_counter_t;

typedef struct {
    const char *node;
    const char *metric;
    const char *label;
    apr_int64_t value;
} mso_counter_row_t;

/* Adds the n values to node's counters in one transaction; values of 0 are
 * skipped (nothing is written when all are 0). */
apr_status_t mso_counters_add(mso_db_t *db, apr_pool_t *p, const char *node,
                              const mso_counter_t *c, int n, apr_int64_t now);

/* Every counter (mso_counter_row_t), by metric, label and node. */
apr_status_t mso_counters_list(mso_db_t *db, apr_pool_t *p, apr_array_header_t **rows);

#endif
