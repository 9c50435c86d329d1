/* The application token of an app-only company (client credentials grant),
 * cached per company, client ID and resource in msoauth_app_tokens.
 *
 * One row per (company, client_id, resource): resource is "graph" (the
 * mirror, write-back, sending, the token handler's resource=graph) or
 * "outlook" (IMAP/SMTP through the token handler). The token is sealed
 * (mso_seal, MSO_PURPOSE_TOKEN) with the associated data
 * "apptoken:v1:COMPANY:CLIENTID:RESOURCE_URL", so a row copied to another
 * company, another app or another resource (or a cloud changed in the
 * configuration) does not open.
 *
 * The row is also the lease under which one process of one node fetches the
 * token: the job fetches the Graph token ahead of expiry (refresh_due_at), the
 * token handler fetches on demand; everyone else reads the row. A failed
 * fetch is the company's problem (secret, certificate, consent, tenant): it
 * is kept on the row with a backoff (retry_at), and the company's app
 * accounts wait -- the work claim takes them only while the Graph token is
 * valid (mso_mirror_claim). */
#ifndef MSO_APPTOKEN_H
#define MSO_APPTOKEN_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_crypto.h"
#include "mso_db.h"
#include "mso_http.h"
#include "mso_identity.h"

/* Which token: the company, its client ID (compared in lower case), the
 * resource name and its URL (the .default scope's, and the sealing's). */
typedef struct {
    const char *company;
    const char *client_id;
    const char *resource;           /* graph | outlook */
    const char *resource_url;       /* https://graph.microsoft.com, https://outlook.office365.com */
} mso_apptoken_key_t;

/* One row. Strings may be NULL. */
typedef struct {
    const char *company, *client_id, *resource;
    const char *sealed;             /* NULL: none fetched yet (or only failures) */
    apr_int64_t expires_at;
    apr_int64_t refresh_due_at;     /* when the job fetches the next one */
    const char *roles;              /* the token's application permissions, space separated;
                                     * NULL when the token does not tell (not a JWT) */
    apr_int64_t fetched_at;
    int fetches;                    /* tokens fetched into this row */
    apr_int64_t retry_at;           /* after a failure: not before */
    int error_runs;
    const char *reason;             /* the last failure's reason code, NULL after a success */
    long aadsts;
    const char *last_error;
    const char *lease_owner;
    apr_int64_t lease_until;
    apr_int64_t updated_at;
} mso_apptoken_t;

/* "apptoken:v1:COMPANY:CLIENTID:RESOURCE_URL", the client ID in lower case. */
const char *mso_apptoken_aad(apr_pool_t *p, const mso_apptoken_key_t *k);

/* The row, in p; APR_NOTFOUND when there is none. */
apr_status_t mso_apptoken_get(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                              mso_apptoken_t **row);
/* Every row (mso_apptoken_t*), for the admin page. */
apr_status_t mso_apptoken_list(mso_db_t *db, apr_pool_t *p, apr_array_header_t **rows);

/* The row's token in clear, NUL-terminated in p, when it opens and lives
 * at least min_validity more seconds (APR_SUCCESS); APR_NOTFOUND when there
 * is none or it expires sooner; APR_EINVAL when it does not open. */
apr_status_t mso_apptoken_open(apr_pool_t *p, const mso_keyring_t *keyring,
                               const mso_apptoken_key_t *k, const mso_apptoken_t *row,
                               apr_int64_t now, int min_validity, const char **plain);

/* Takes the fetch lease for owner until now + lease_seconds, making the row
 * when there is none. Without force, only when a fetch is due
 * (refresh_due_at and retry_at passed); with force, also before (a 401 with
 * a token believed valid, an expired one, a restart after a failure).
 * APR_SUCCESS: ours; APR_EBUSY: another owner holds a live lease;
 * APR_EAGAIN: not due (and not forced). */
apr_status_t mso_apptoken_lease(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                                const char *owner, apr_int64_t now, int lease_seconds,
                                int force);
apr_status_t mso_apptoken_release(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                                  const char *owner);

/* Stores a fetched token (sealed for k) while owner holds the lease, clears
 * the failure and releases the lease; APR_EBUSY (nothing written) when the
 * lease is no longer owner's. */
apr_status_t mso_apptoken_store(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                                const char *owner, const char *sealed, apr_int64_t expires_at,
                                apr_int64_t refresh_due_at, const char *roles,
                                apr_int64_t now);
/* Records a failed fetch (the stored token, if any, stays: it may still be
 * valid), error_runs + 1 and retry_at; releases the lease. APR_EBUSY when
 * the lease is no longer owner's. */
apr_status_t mso_apptoken_failed(mso_db_t *db, apr_pool_t *p, const mso_apptoken_key_t *k,
                                 const char *owner, const char *reason, long aadsts,
                                 const char *last_error, apr_int64_t retry_at,
                                 apr_int64_t now);

/* Graph refused the company's token as such for app account account_id
 * (403 "Either scp or roles claim need to be present": no application
 * permission granted): the company's problem, kept on the row (reason,
 * last_error) with a new fetch at retry_at. The first report wins. */
apr_status_t mso_apptoken_refused(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                  const char *reason, const char *last_error,
                                  apr_int64_t retry_at, apr_int64_t now);

/* Graph refused the company's token for app account account_id (a 401):
 * the company's Graph token is due now (its retry_at is kept). */
apr_status_t mso_apptoken_due_now(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                  apr_int64_t now);

/* The "roles" claim of a token answer's access token, read without
 * verifying it (it came from the token endpoint over TLS, and it is only
 * used to know what the app may do: Graph enforces the roles itself): space
 * separated, "" when the token has none; NULL when it is not a JWT (Microsoft
 * calls access tokens opaque: then the company's MSOAuthEdition says what
 * to expect, pro = Mail.ReadWrite and Mail.Send). */
const char *mso_apptoken_roles(apr_pool_t *p, const char *access_token);
/* True when the space-separated list holds word (case-sensitive, whole). */
int mso_roles_have(const char *list, const char *word);

/* The resource of an app-only company's IMAP/SMTP token: MSOAuthOutlookURL
 * when it was given; else the cloud's default, except that the global
 * cloud's https://outlook.office.com (the delegated scopes' resource) is
 * https://outlook.office365.com for application permissions. */
const char *mso_apptoken_outlook_resource(const char *outlook_url, int given);

/* --- one fetch --- */

typedef struct {
    const mso_keyring_t *keyring;
    const mso_http_opts_t *http;
    const char *owner;
    mso_app_t app;                  /* authority (tenant), client ID, secret or certificate */
    int margin;                     /* fetch again this long before expiry */
} mso_apptoken_ctx_t;

typedef enum {
    MSO_APPTOKEN_OK = 0,
    MSO_APPTOKEN_TRANSIENT,         /* network, 5xx, 429: retried with backoff */
    MSO_APPTOKEN_ADMIN,             /* secret, certificate, consent, tenant: the company's */
    MSO_APPTOKEN_BUSY,              /* the lease was lost meanwhile: nothing stored */
    MSO_APPTOKEN_FAILED             /* our side (sealing, database) */
} mso_apptoken_result_e;

typedef struct {
    mso_apptoken_result_e result;
    const char *access_token;       /* plaintext (the token handler's answer) */
    apr_int64_t expires_at;
    const char *roles;              /* NULL: the token does not tell */
    const char *reason;
    long aadsts;
    const char *detail;             /* for the log: never a token or secret */
    long retry_after;
} mso_apptoken_outcome_t;

/* Fetches k's token with the client credentials grant while the caller
 * holds k's lease (mso_apptoken_lease), stores it or the failure, and
 * releases the lease. A Graph token without roles is refused as
 * admin_consent_required: Graph would refuse every call with it. */
apr_status_t mso_apptoken_fetch(mso_db_t *db, apr_pool_t *p, const mso_apptoken_ctx_t *ctx,
                                const mso_apptoken_key_t *k, apr_int64_t now,
                                mso_apptoken_outcome_t *out);

#endif
