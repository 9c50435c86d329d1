/* Spent sign-in states (see mso_flows_used.h). */
#include "mso_flows_used.h"

static const mso_stmt_t ST_PURGE = {
    "purge the expired sign-in states", "now:int",
    "DELETE FROM msoauth_flows_used WHERE expires_at < :now", NULL
};
/* A replay changes nothing: no failure (which on SQLite would cost a
 * statement per replay, see mso_db.c), and no second look. A row whose
 * state has expired and was not purged yet is taken over. */
static const mso_stmt_t ST_SPEND = {
    "record a spent sign-in state", "digest:text expires_at:int now:int",
    "INSERT INTO msoauth_flows_used (state_digest, expires_at) VALUES (:digest, :expires_at) "
    "ON CONFLICT (state_digest) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE msoauth_flows_used.expires_at < :now", NULL
};

typedef struct {
    const char *digest;
    apr_int64_t expires_at, now;
    int n;
} spend_t;

static apr_status_t spend_tx(mso_tx_t *tx, void *baton)
{
    spend_t *sp = baton;
    mso_args_t *a = mso_tx_args(tx, &ST_SPEND);

    mso_arg_text(a, "digest", sp->digest);
    mso_arg_int(a, "expires_at", sp->expires_at);
    mso_arg_int(a, "now", sp->now);
    return mso_tx_exec(tx, a, &sp->n);
}

apr_status_t mso_flows_used_spend(mso_db_t *db, apr_pool_t *p, const char *state_digest,
                                  apr_int64_t expires_at, apr_int64_t now)
{
    spend_t sp;
    apr_status_t rv;

    if (!state_digest || !*state_digest) {
        return APR_EINVAL;
    }
    sp.digest = state_digest;
    sp.expires_at = expires_at;
    sp.now = now;
    sp.n = 0;
    /* Lazy: losing the row to a crash only lets the same state be redeemed
     * again, and Microsoft takes an authorization code once. The account
     * stored next commits durably and carries it along. */
    rv = mso_db_tx_lazy(db, p, NULL, spend_tx, &sp, NULL);
    return rv == APR_SUCCESS && sp.n == 0 ? APR_EEXIST : rv;
}

apr_status_t mso_flows_used_purge(mso_db_t *db, apr_pool_t *p, apr_int64_t now, int *deleted,
                                  const char **err)
{
    mso_args_t *a = mso_args(db, p, &ST_PURGE);

    *deleted = 0;
    mso_arg_int(a, "now", now);
    return mso_exec(a, deleted, err);
}
