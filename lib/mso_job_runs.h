/* The job's health (msoauth_job_runs): each node's last cycle, for the
 * status page. */
#ifndef MSO_JOB_RUNS_H
#define MSO_JOB_RUNS_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_db.h"

typedef struct {
    const char *node;                 /* lease owner of the job */
    apr_int64_t last_cycle_at;
    apr_int64_t cycle_ms;
    int claimed, refreshed, failed;
} mso_job_run_t;

/* Records the node's last cycle (one row per node). */
apr_status_t mso_job_runs_record(mso_db_t *db, apr_pool_t *p, const mso_job_run_t *run);

/* Every node's last cycle (mso_job_run_t), newest first. */
apr_status_t mso_job_runs_list(mso_db_t *db, apr_pool_t *p, apr_array_header_t **runs);

#endif
