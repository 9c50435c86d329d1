/* Spent sign-in states (see mso_flows_used.h). */
#include "mso_flows_used.h"

static const mso_stmt_t ST_PURGE = {
    "purge the expired sign-in states", "now:int",
    "DELETE FROM msoauth_flows_used WHERE expires_at < :now", NULL
};
/* A replay inserts nothing: no failure (which on SQLite would cost a
 * statement per replay, see mso_db.c), and no second look. */
static const mso_stmt_t ST_SPEND = {
    "record a spent sign-in state", "digest:text expires_at:int",
    "INSERT INTO msoauth_flows_used (state_digest, expires_at) VALUES (:digest, :expires_at) "
    "ON CONFLICT (state_digest) DO NOTHING", NULL
};

apr_status_t mso_flows_used_spend(mso_db_t *db, apr_pool_t *p, const char *state_digest,
                                  apr_int64_t expires_at, apr_int64_t now)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    if (!state_digest || !*state_digest) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    /* Spent states are only needed while their cookie could still be replayed. */
    a = mso_args(db, tmp, &ST_PURGE);
    mso_arg_int(a, "now", now);
    mso_exec(a, NULL, NULL);
    a = mso_args(db, tmp, &ST_SPEND);
    mso_arg_text(a, "digest", state_digest);
    mso_arg_int(a, "expires_at", expires_at);
    if (MSO_OK(mso_exec(a, &n, NULL)) && n == 0) {
        rv = APR_EEXIST;
    }
    apr_pool_destroy(tmp);
    return rv;
}
