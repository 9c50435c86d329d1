/* Retention (see mso_retention.h). */
#include <apr_strings.h>

#include "mso_mirror.h"
#include "mso_outbox.h"
#include "mso_retention.h"

/* A new table with rows to let go adds one line here. */
static const mso_purge_t purges[] = {
    {"done actions", "actions", mso_mirror_purge_actions},
    {"removed messages", "messages", mso_mirror_purge_messages},
    {"sent mail", "outbox", mso_outbox_purge},
    {NULL, NULL, NULL}
};

const mso_purge_t *mso_retention_list(void)
{
    return purges;
}

apr_status_t mso_retention_sweep(mso_db_t *db, apr_pool_t *p, int days, apr_int64_t now,
                                 apr_time_t deadline, apr_int64_t *deleted, int *finished,
                                 const char **err)
{
    apr_int64_t before = now - (apr_int64_t)days * 86400;
    apr_status_t rv = APR_SUCCESS;
    int i, n;

    if (finished) {
        *finished = 1;
    }
    *err = NULL;
    for (i = 0; purges[i].what; i++) {
        if (deleted) {
            deleted[i] = 0;
        }
    }
    if (days <= 0) {
        return APR_SUCCESS;
    }
    for (i = 0; purges[i].what; i++) {
        do {
            if (apr_time_now() > deadline) {
                if (finished) {
                    *finished = 0;
                }
                return APR_SUCCESS;
            }
            n = 0;
            rv = purges[i].purge(db, p, before, MSO_RETENTION_BATCH, &n);
            if (rv != APR_SUCCESS) {
                *err = apr_psprintf(p, "deleting %s older than %d days failed in %s (see the "
                                    "error above)", purges[i].what, days, mso_db_name(db));
                return rv;
            }
            if (deleted) {
                deleted[i] += n;
            }
        } while (n == MSO_RETENTION_BATCH);
    }
    return APR_SUCCESS;
}
