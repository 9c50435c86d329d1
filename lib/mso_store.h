/* The database: schema and versioned migrations, and the account/token rows,
 * over apr_dbd. Works the same on SQLite and PostgreSQL; every statement that
 * carries a value is a prepared statement. */
#ifndef MSO_STORE_H
#define MSO_STORE_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>
#include <apr_dbd.h>

typedef enum { MSO_DB_SQLITE = 1, MSO_DB_PGSQL = 2 } mso_db_kind_e;

typedef struct {
    apr_pool_t *pool;                 /* lifetime of the handle wrapper */
    const apr_dbd_driver_t *driver;
    apr_dbd_t *handle;
    mso_db_kind_e kind;
} mso_db_t;

/* Wraps a connection opened elsewhere (mod_dbd, or apr_dbd_open in tests).
 * APR_ENOTIMPL for drivers other than sqlite3 and pgsql. */
apr_status_t mso_db_wrap(apr_pool_t *p, const apr_dbd_driver_t *driver, apr_dbd_t *handle,
                         mso_db_t **db);

/* The schema version this build writes. */
int mso_store_latest_version(void);

/* The version found in the database, 0 when no schema exists yet. */
apr_status_t mso_store_schema_version(mso_db_t *db, int *version);

/* Brings the schema to the latest version: creates the tables on an empty
 * database, applies each missing migration in order, in one transaction,
 * serialized against other processes/nodes doing the same (PostgreSQL advisory
 * lock; SQLite BEGIN IMMEDIATE). Running it again is a no-op. A database newer
 * than this build is refused (APR_EGENERAL, *err says so). *err, when set, is a
 * sentence for the administrator with the database's own message. */
apr_status_t mso_store_migrate(mso_db_t *db, int *from_version, int *to_version,
                               const char **err);

/* One account row (msoauth_accounts). Strings may be NULL. */
typedef struct {
    apr_int64_t id;
    const char *company;
    const char *mailbox;              /* lower case */
    const char *display_name;
    const char *tenant_id;
    const char *object_id;
    const char *scopes;
    const char *state;                /* connected | reconnect_required | disconnected */
    const char *authority;            /* authority URL used for every token call */
    apr_int64_t access_expires_at;
    apr_int64_t last_sync_at;
    const char *last_error;
    const char *connected_by;
    apr_int64_t created_at;
    apr_int64_t updated_at;
    /* Schema v2: the background job's bookkeeping. */
    apr_int64_t refresh_due_at;       /* when the job refreshes next */
    apr_int64_t retry_at;             /* backoff after a transient failure (0: none) */
    int error_runs;                   /* consecutive failed refreshes */
    const char *reason;               /* reason code of last_error */
    long aadsts;                      /* Microsoft's code with it, 0 if none */
    apr_int64_t last_refresh_at;
    const char *lease_owner;
    apr_int64_t lease_until;
} mso_account_t;

/* Inserts or updates the account keyed by (company, mailbox) and, in the same
 * transaction, replaces its sealed tokens (refresh, and the Graph access token
 * with its expiry). Sets acct->id. Old tokens stay untouched on any failure.
 * Also sets refresh_due_at from acct and clears the job's error state. */
apr_status_t mso_store_account_connect(mso_db_t *db, mso_account_t *acct,
                                       const char *sealed_refresh, const char *sealed_access,
                                       apr_int64_t now, const char **err);

/* APR_NOTFOUND when no such row. */
apr_status_t mso_store_account_get(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                   mso_account_t **acct);
apr_status_t mso_store_account_find(mso_db_t *db, apr_pool_t *p, const char *company,
                                    const char *mailbox, mso_account_t **acct);

/* Sealed token of one kind for an account: "refresh", "graph", "outlook". */
apr_status_t mso_store_token_get(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                 const char *kind, const char **sealed, apr_int64_t *expires_at);

/* --- schema v2: the background job --- */

/* Claims up to max accounts whose refresh is due (state connected,
 * refresh_due_at <= now, retry_at <= now), most overdue first, each with a
 * lease for owner until now + lease_seconds. A row leased by another owner
 * whose lease has not run out is skipped; claiming is atomic per row, so two
 * nodes never hold the same account. *accounts: mso_account_t* in p. */
apr_status_t mso_store_claim_due(mso_db_t *db, apr_pool_t *p, const char *owner,
                                 apr_int64_t now, int lease_seconds, int max,
                                 apr_array_header_t **accounts);

/* Leases one account (the token handler). APR_EBUSY when another owner holds
 * a live lease, APR_NOTFOUND when there is no such account. */
apr_status_t mso_store_lease(mso_db_t *db, apr_int64_t id, const char *owner, apr_int64_t now,
                             int lease_seconds);
apr_status_t mso_store_release(mso_db_t *db, apr_int64_t id, const char *owner);

typedef struct {
    const char *kind;                 /* token kind refreshed: graph | outlook */
    const char *sealed_access;
    apr_int64_t access_expires_at;
    const char *sealed_refresh;       /* NULL when Microsoft sent none: keep the stored one */
    const char *scopes;               /* NULL: keep */
    apr_int64_t refresh_due_at;
} mso_refreshed_t;

/* Stores a successful refresh in one transaction, only while owner still
 * holds the lease (APR_EBUSY: nothing written). Clears last_error, reason,
 * error_runs and retry_at, sets last_refresh_at and, for graph,
 * access_expires_at; releases the lease. */
apr_status_t mso_store_refreshed(mso_db_t *db, apr_int64_t id, const char *owner,
                                 const mso_refreshed_t *r, apr_int64_t now, const char **err);

/* Records a failed refresh: the state (connected or reconnect_required),
 * reason, aadsts and last_error (a sentence, no secrets), error_runs + 1 and
 * retry_at; releases the lease. Tokens are not touched. */
apr_status_t mso_store_refresh_failed(mso_db_t *db, apr_int64_t id, const char *owner,
                                      const char *state, const char *reason, long aadsts,
                                      const char *last_error, apr_int64_t retry_at,
                                      apr_int64_t now);

/* Every owner holding a lease of either kind (refresh or Graph work). */
apr_status_t mso_store_lease_owners(mso_db_t *db, apr_pool_t *p, apr_array_header_t **owners);

/* Lets go of every lease owner holds: for a process known to be dead, so its
 * accounts need not wait for the leases to run out. */
apr_status_t mso_store_drop_owner(mso_db_t *db, const char *owner);

/* Drops every token of the account and marks it disconnected. */
apr_status_t mso_store_disconnect(mso_db_t *db, apr_int64_t id, apr_int64_t now);

/* Every account (mso_account_t*), ordered by id. */
apr_status_t mso_store_accounts(mso_db_t *db, apr_pool_t *p, apr_array_header_t **accounts);

/* One node's last job cycle (msoauth_job_runs). */
typedef struct {
    const char *node;                 /* lease owner of the job */
    apr_int64_t last_cycle_at;
    apr_int64_t cycle_ms;
    int claimed, refreshed, failed;
} mso_job_run_t;

apr_status_t mso_store_job_record(mso_db_t *db, const mso_job_run_t *run);
/* Every node's last cycle (mso_job_run_t), newest first. */
apr_status_t mso_store_job_runs(mso_db_t *db, apr_pool_t *p, apr_array_header_t **runs);

/* Records a sign-in state (its digest) as redeemed. APR_EEXIST when it was
 * already: the callback was hit twice. Rows are purged once expired. */
apr_status_t mso_store_flow_consume(mso_db_t *db, const char *state_digest,
                                    apr_int64_t expires_at, apr_int64_t now);

/* The associated data that binds a sealed token to its account and kind, so a
 * blob copied into another row does not open. */
const char *mso_token_aad(apr_pool_t *p, const char *company, const char *mailbox,
                          const char *kind);

#endif
