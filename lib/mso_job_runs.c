/* The job's health (see mso_job_runs.h). */
#include "mso_job_runs.h"

static const mso_stmt_t ST_RECORD = {
    "record the job's cycle",
    "node:text at:int ms:int claimed:int refreshed:int failed:int",
    "INSERT INTO msoauth_job_runs (node, last_cycle_at, cycle_ms, claimed, refreshed, failed, "
    "updated_at) VALUES (:node, :at, :ms, :claimed, :refreshed, :failed, :at) "
    "ON CONFLICT (node) DO UPDATE SET last_cycle_at = excluded.last_cycle_at, "
    "cycle_ms = excluded.cycle_ms, claimed = excluded.claimed, "
    "refreshed = excluded.refreshed, failed = excluded.failed, "
    "updated_at = excluded.updated_at", NULL
};
static const mso_stmt_t ST_LIST = {
    "read the job's cycles", NULL,
    "SELECT node, last_cycle_at, cycle_ms, claimed, refreshed, failed FROM msoauth_job_runs "
    "ORDER BY last_cycle_at DESC", NULL
};

apr_status_t mso_job_runs_record(mso_db_t *db, apr_pool_t *p, const mso_job_run_t *run)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    if (!run || !run->node) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_RECORD);
    mso_arg_text(a, "node", run->node);
    mso_arg_int(a, "at", run->last_cycle_at);
    mso_arg_int(a, "ms", run->cycle_ms);
    mso_arg_int(a, "claimed", run->claimed);
    mso_arg_int(a, "refreshed", run->refreshed);
    mso_arg_int(a, "failed", run->failed);
    rv = mso_exec(a, NULL, NULL);
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_job_runs_list(mso_db_t *db, apr_pool_t *p, apr_array_header_t **runs)
{
    apr_pool_t *tmp;
    mso_rows_t *rows = NULL;
    apr_status_t rv;

    *runs = apr_array_make(p, 2, sizeof(mso_job_run_t));
    apr_pool_create(&tmp, p);
    if (MSO_OK(mso_select(mso_args(db, tmp, &ST_LIST), &rows, NULL))) {
        while (mso_rows_next(rows)) {
            mso_job_run_t *r = apr_array_push(*runs);

            r->node = mso_col_text(rows, p, "node");
            r->last_cycle_at = mso_col_int(rows, "last_cycle_at");
            r->cycle_ms = mso_col_int(rows, "cycle_ms");
            r->claimed = (int)mso_col_int(rows, "claimed");
            r->refreshed = (int)mso_col_int(rows, "refreshed");
            r->failed = (int)mso_col_int(rows, "failed");
        }
    }
    apr_pool_destroy(tmp);
    return rv;
}
