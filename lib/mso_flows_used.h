/* Spent sign-in states (msoauth_flows_used): a state is redeemed once,
 * across every process and node sharing the database. */
#ifndef MSO_FLOWS_USED_H
#define MSO_FLOWS_USED_H

#include <apr_pools.h>
#include <apr_errno.h>

#include "mso_db.h"

/* Records a sign-in state (its digest) as spent until expires_at. APR_EEXIST
 * when it was already and has not expired by now: the callback was hit
 * twice. APR_EGENERAL (logged) when the database failed. */
apr_status_t mso_flows_used_spend(mso_db_t *db, apr_pool_t *p, const char *state_digest,
                                  apr_int64_t expires_at, apr_int64_t now);

/* Deletes the states expired before now (the job, now and then: the sign-in
 * itself does not scan the table). *err in p. */
apr_status_t mso_flows_used_purge(mso_db_t *db, apr_pool_t *p, apr_int64_t now, int *deleted,
                                  const char **err);

#endif
