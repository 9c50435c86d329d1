/* Keeping an account's tokens alive: one refresh of one account (rotated
 * refresh token and new access token stored together), or of many at once
 * for the job, the classification of failures, and when the next refresh is
 * due. */
#ifndef MSO_REFRESH_H
#define MSO_REFRESH_H

#include <apr_pools.h>
#include <apr_errno.h>

#include "mso_cert.h"
#include "mso_crypto.h"
#include "mso_http.h"
#include "mso_account.h"
#include "mso_db.h"

typedef struct {
    const mso_keyring_t *keyring;
    const mso_http_opts_t *http;
    const char *owner;              /* lease owner: this process, unique per node */
    const char *authority;          /* the company's sign-in authority URL + tenant: where
                                     * the secret and refresh token go, from the
                                     * configuration only (never from the database) */
    const char *client_id;          /* the account's company's credentials: */
    const char *client_secret;      /* its secret, */
    const mso_cert_t *cert;         /* or its certificate (used when set) */
    const char *graph_resource;     /* https://graph.microsoft.com (cloud's) */
    const char *signin_scopes;      /* what the company asks at sign-in */
    int margin;                     /* refresh this long before the access token expires */
    int keepalive;                  /* and at least this often, even when idle */
} mso_refresh_ctx_t;

typedef enum {
    MSO_REFRESHED = 0,
    MSO_REFRESH_TRANSIENT,          /* network, 5xx, 429: retry later, still connected */
    MSO_REFRESH_RECONNECT,          /* refresh token dead: reconnect_required */
    MSO_REFRESH_ADMIN,              /* secret wrong/expired, app gone: the company is flagged */
    MSO_REFRESH_BUSY,               /* another process holds the lease: nothing done */
    MSO_REFRESH_FAILED,             /* our side (database, key) */
    MSO_REFRESH_DEFERRED            /* batch: time ran out before the call was sent;
                                     * lease released, nothing recorded */
} mso_refresh_result_e;

typedef struct {
    mso_refresh_result_e result;
    const char *reason;             /* reason code when not refreshed */
    long aadsts;
    const char *detail;             /* for the log: never a token or secret */
    long retry_after;               /* seconds Microsoft asked to wait, -1 if none */
    const char *access_token;       /* plaintext, for the token handler only */
    apr_int64_t access_expires_at;
    const char *scope;
} mso_refresh_outcome_t;

/* Refreshes acct's token for resource: "graph", or a resource URL such as
 * https://outlook.office.com (IMAP/SMTP). The caller holds acct's lease
 * (mso_account_claim_due or mso_account_lease); it is released on every outcome
 * but MSO_REFRESH_BUSY. The rotated refresh token and the new access token are
 * committed in one transaction; a failure is recorded on the account (state,
 * reason, AADSTS, backoff). */
apr_status_t mso_refresh_account(mso_db_t *db, apr_pool_t *p, const mso_refresh_ctx_t *ctx,
                                 const mso_account_t *acct, const char *resource,
                                 apr_int64_t now, mso_refresh_outcome_t *out);

/* Refreshes n accounts at once, each with its company's ctxs[i], their token
 * calls made concurrently over m (mso_http_multi_*, bounded connections,
 * reused across calls). Each outcome in outs[i] is what mso_refresh_account
 * would give, recorded the same way as each answer arrives; the caller holds
 * every account's lease. budget bounds the whole run: calls still running
 * when it ends fail as transient, calls not yet sent end MSO_REFRESH_DEFERRED
 * (lease released, nothing recorded). Single-threaded: database writes happen
 * on the calling thread. p must outlive the outcomes. APR_EINVAL when db, m
 * or the arrays are missing (nothing done); APR_SUCCESS otherwise. */
apr_status_t mso_refresh_batch(mso_db_t *db, apr_pool_t *p,
                               const mso_refresh_ctx_t *const *ctxs,
                               const mso_account_t *const *accts, int n, const char *resource,
                               mso_http_multi_t *m, apr_interval_time_t budget,
                               apr_int64_t now, mso_refresh_outcome_t *outs);

/* When the next refresh is due: margin before expiry (at most a quarter of the
 * token's remaining life), earlier by a jitter of up to 10% of that life (so
 * thousands of accounts do not refresh in the same second), never sooner
 * than 5 s from now and never later than now + keepalive. */
apr_int64_t mso_refresh_next_due(const mso_refresh_ctx_t *ctx, apr_int64_t now,
                                 apr_int64_t access_expires_at);

/* Backoff after error_runs consecutive transient failures: doubling from 30 s,
 * capped at 1 h, +-50% jitter, and never sooner than Retry-After. */
apr_int64_t mso_refresh_backoff(int error_runs, long retry_after, apr_int64_t now);

#endif
