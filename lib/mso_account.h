/* Accounts, their tokens and the refresh lease: msoauth_accounts (identity,
 * state, the job's refresh bookkeeping) and msoauth_tokens. The Graph work
 * columns of the account row (sync_*, work_*) are the mirror's
 * (mso_mirror.h).
 *
 * Who an account is. An account belongs to one company and is the mailbox
 * of one Microsoft object (tenant_id, object_id: the person who signed in).
 * mso_account_connect finds it in this order, in one transaction:
 *  (a) a delegated account of the company with the same tenant_id and
 *      object_id is this person's: it is reconnected (same id), its mailbox
 *      updated to the new address when that changed -- unless another
 *      account of the company has that address already: then nothing
 *      changes (MSO_ACCOUNT_ADDRESS_TAKEN);
 *  (b) else the company's account with the same mailbox: bound to no object
 *      (never bound, or disconnected) it is taken over by this one; bound to
 *      another object, or not a delegated account, nothing changes
 *      (MSO_ACCOUNT_OTHER_OBJECT: the glue answers mailbox_mismatch);
 *  (c) else a new account.
 * On any refusal or failure the old row and its tokens stay as they were.
 * mso_account_disconnect drops the tokens and the object: the next sign-in
 * for that mailbox, by whoever owns the address then, takes it over.
 *
 * Shared mailboxes (mso_connect_t.shared). A person with Full Access to a
 * shared mailbox (support@) connects it with their own sign-in: the row is
 * kind delegated, shared 1, mailbox the shared address, tenant_id and
 * object_id the person's, and its tokens the person's, reaching the mailbox
 * at /users/{mailbox} (Mail.Read.Shared / Mail.ReadWrite.Shared). The row
 * says "this person's grant, used on that mailbox": a person has at most one
 * account of their own (shared 0, found by (a)) and any number of shared
 * ones, each found by its mailbox: the person's own shared row is
 * reconnected, a row bound to nobody is taken over, a row bound to another
 * object (another person's shared row, or the owner's own account) or an
 * app account is refused (MSO_ACCOUNT_OTHER_OBJECT). Each shared row keeps
 * its own refresh token chain (Microsoft keeps every one of them valid).
 *
 * App accounts (kind app) belong to an app-only company: no person, no
 * object, no tokens of their own (they use the company's application token,
 * mso_apptoken.h), no refresh schedule; made by mso_account_ensure_app
 * (MSOAuthMailbox, at start-up) and mso_account_add_app (the admin page).
 *
 * How tokens are bound. Each token is sealed (mso_seal, MSO_PURPOSE_TOKEN)
 * with associated data naming the company's client ID and the account id,
 * "token:v2:KIND:CLIENTID:ID" (binding 2), so a sealed value copied or
 * edited into another account, or an account moved to another company's
 * credentials, does not open. Tokens stored before schema version 4 are
 * bound to company and mailbox (binding 1) until mso_account_rebind seals
 * them again; mso_account_token_open opens binding 2 only. */
#ifndef MSO_ACCOUNT_H
#define MSO_ACCOUNT_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_crypto.h"
#include "mso_db.h"

/* Refusals of mso_account_connect and mso_account_token_open. */
#define MSO_ACCOUNT_OTHER_OBJECT  (APR_OS_START_USERERR + 1)
#define MSO_ACCOUNT_ADDRESS_TAKEN (APR_OS_START_USERERR + 2)
#define MSO_ACCOUNT_UNBOUND       (APR_OS_START_USERERR + 3)

/* One account row (msoauth_accounts). Strings may be NULL. */
typedef struct {
    apr_int64_t id;
    const char *company;
    const char *kind;                 /* delegated | app */
    const char *client_id;            /* the company's client ID it was connected with
                                       * (lower case); NULL: not rebound yet */
    const char *mailbox;              /* lower case */
    const char *display_name;
    const char *tenant_id;
    const char *object_id;            /* NULL: bound to nobody (disconnected) */
    const char *scopes;
    const char *state;                /* connected | reconnect_required | disconnected */
    const char *authority;            /* authority URL used for every token call */
    apr_int64_t access_expires_at;
    apr_int64_t last_sync_at;
    const char *last_error;
    const char *connected_by;
    apr_int64_t created_at;
    apr_int64_t updated_at;
    /* The background job's bookkeeping. */
    apr_int64_t refresh_due_at;       /* when the job refreshes next */
    apr_int64_t retry_at;             /* backoff after a transient failure (0: none) */
    int error_runs;                   /* consecutive failed refreshes */
    const char *reason;               /* reason code of last_error */
    long aadsts;                      /* Microsoft's code with it, 0 if none */
    apr_int64_t last_refresh_at;
    const char *lease_owner;
    apr_int64_t lease_until;
    int shared;                       /* delegated, on a mailbox not the person's own */
} mso_account_t;

/* What a sign-in tells about the account. */
typedef struct {
    const char *company;
    const char *client_id;            /* the company's application (client) ID */
    const char *tenant_id;            /* tid of the ID token */
    const char *object_id;            /* oid of the ID token: who signed in */
    const char *mailbox;              /* the address Graph /me gave */
    const char *display_name;         /* NULL: keep the stored one */
    const char *scopes;
    const char *authority;
    const char *connected_by;
    apr_int64_t access_expires_at;    /* 0: unknown */
    apr_int64_t refresh_due_at;       /* 0: now */
    int shared;                       /* mailbox is a shared one the person reaches
                                       * with Full Access, not Graph /me's address */
} mso_connect_t;

/* Seals the tokens for the account once its id is known (inside the
 * transaction): *sealed_access may be left NULL (no access token stored). */
typedef apr_status_t mso_account_seal_fn(void *baton, apr_int64_t account_id,
                                         const char **sealed_refresh,
                                         const char **sealed_access);

/* Finds or creates the account as the top of this file says, and replaces
 * its tokens (refresh, and the Graph access token) with the ones seal
 * gives, in one transaction; sets refresh_due_at and clears the job's error
 * state and lease. *acct: the stored row, in p. APR_EINVAL (nothing touched)
 * when company, client ID or mailbox are missing; MSO_ACCOUNT_OTHER_OBJECT,
 * MSO_ACCOUNT_ADDRESS_TAKEN as above; APR_EGENERAL when the database failed.
 * *err: a sentence in p on any refusal or failure. */
apr_status_t mso_account_connect(mso_db_t *db, apr_pool_t *p, const mso_connect_t *c,
                                 mso_account_seal_fn *seal, void *baton, apr_int64_t now,
                                 mso_account_t **acct, const char **err);

/* The usual seal callback: seals refresh_token and access_token (which may
 * be NULL) in p, bound to client_id and the account. */
typedef struct {
    apr_pool_t *p;
    const mso_keyring_t *keyring;
    const char *client_id;
    const char *refresh_token;
    const char *access_token;
} mso_token_sealer_t;

apr_status_t mso_account_seal_tokens(void *baton, apr_int64_t account_id,
                                     const char **sealed_refresh, const char **sealed_access);

/* The associated data of binding 2: "token:v2:KIND:CLIENTID:ID", the client
 * ID in lower case. */
const char *mso_token_aad(apr_pool_t *p, const char *client_id, apr_int64_t account_id,
                          const char *kind);

/* Seals plain as acct's token of kind (binding 2). APR_EINVAL when the
 * account has no client ID (not rebound yet). */
apr_status_t mso_account_token_seal(apr_pool_t *p, const mso_keyring_t *keyring,
                                    const mso_account_t *acct, const char *kind,
                                    const char *plain, const char **sealed);

/* Reads acct's token of kind ("refresh", "graph", "outlook") and opens it:
 * *plain in p, NUL-terminated; *expires_at (may be NULL) 0 when unknown.
 * APR_NOTFOUND: none stored; MSO_ACCOUNT_UNBOUND: stored under binding 1
 * (rebind has not run for it) or the account has no client ID; APR_EINVAL:
 * it does not open (its key is not in the ring, or it was altered or copied
 * from another account); APR_EGENERAL: the database failed (logged). */
apr_status_t mso_account_token_open(mso_db_t *db, apr_pool_t *p, const mso_keyring_t *keyring,
                                    const mso_account_t *acct, const char *kind,
                                    const char **plain, apr_int64_t *expires_at);

/* The sealed token of one kind as stored (APR_NOTFOUND when none). */
apr_status_t mso_account_token_get(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                   const char *kind, const char **sealed,
                                   apr_int64_t *expires_at);

/* Re-seals every binding-1 token under binding 2: opened with the legacy
 * associated data ("token:KIND:COMPANY:MAILBOX"), sealed for the account's
 * client ID. Accounts without a client ID get their company's current one
 * from client_id_of (NULL: the company has none here; they are left alone).
 * Tokens that do not open are left as they are, and counted. Safe to run in
 * several processes at once: each token is written only while it is still
 * the binding-1 value that was read. One transaction. */
typedef const char *mso_client_id_fn(void *baton, const char *company);

typedef struct {
    int accounts;                     /* accounts given their company's client ID */
    int tokens;                       /* tokens sealed again under binding 2 */
    int unopened;                     /* binding-1 tokens that did not open */
    int no_client;                    /* accounts whose company has no client ID here */
} mso_rebind_t;

apr_status_t mso_account_rebind(mso_db_t *db, apr_pool_t *p, const mso_keyring_t *keyring,
                                mso_client_id_fn *client_id_of, void *baton,
                                mso_rebind_t *counts, const char **err);

/* --- app accounts --- */

/* What an app account is created with. */
typedef struct {
    const char *company;
    const char *client_id;
    const char *tenant_id;            /* the company's tenant GUID, or NULL (a domain) */
    const char *authority;
    const char *connected_by;         /* "MSOAuthMailbox", or the admin's user */
} mso_app_account_t;

/* Creates an app account (kind app, connected, due for its first sync) for
 * each mailbox (const char *) the company has no account for yet, in one
 * transaction; accounts that exist are left as they are (a delegated one
 * with that address too: *conflicts counts them). *created: how many were
 * made. */
apr_status_t mso_account_ensure_app(mso_db_t *db, apr_pool_t *p, const mso_app_account_t *in,
                                    const apr_array_header_t *mailboxes, apr_int64_t now,
                                    int *created, int *conflicts, const char **err);

/* The admin page's add: the app account of mailbox, made (*created 1), or
 * the existing one, connected again when it was disconnected (*created 0).
 * MSO_ACCOUNT_OTHER_OBJECT when the company has a delegated account with
 * that address. *acct in p. */
apr_status_t mso_account_add_app(mso_db_t *db, apr_pool_t *p, const mso_app_account_t *in,
                                 const char *mailbox, apr_int64_t now, mso_account_t **acct,
                                 int *created, const char **err);

/* Records what Graph says of an app or shared account's mailbox (reason
 * mailbox_not_found or access_denied_by_policy, with a sentence), or clears
 * such a reason (reason NULL); other reasons (the refresh's) are not
 * touched by a clear. */
apr_status_t mso_account_mailbox_reason(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                        const char *reason, const char *last_error,
                                        apr_int64_t now);
/* A stored token without its value: for tools and the status of a key. */
typedef struct {
    apr_int64_t account_id;
    const char *kind;                 /* refresh | graph | outlook */
    int binding;                      /* 1 or 2, see the top of this file */
    apr_int64_t expires_at;           /* 0: unknown (refresh tokens) */
    apr_int64_t updated_at;
    const char *kid;                  /* the key id that sealed it (mso_sealed_kid) */
} mso_token_info_t;

/* The tokens (mso_token_info_t) of one account, or of all (account_id 0). */
apr_status_t mso_account_tokens(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                apr_array_header_t **tokens);

/* Seals every token again under the keyring's first key, so that the other
 * keys can be removed: row by row, each token read, opened with any key of
 * the ring and written back in a statement of its own only while it is
 * still the value that was read (a refresh meanwhile wins: it was sealed by
 * httpd's own first key). Safe while httpd runs. Tokens that do not open
 * are left as they are and counted. APR_EGENERAL when a database write
 * failed (counts say how far it got). */
typedef struct {
    int tokens;                       /* tokens looked at */
    int resealed;                     /* sealed again under the first key */
    int current;                      /* sealed under the first key already */
    int unopened;                     /* open with no key of the ring: left as they are */
    int changed;                      /* replaced meanwhile: left to their writer */
    int gone;                         /* deleted meanwhile */
    int failed;                       /* database or sealing failures */
} mso_rekey_t;

apr_status_t mso_account_rekey(mso_db_t *db, apr_pool_t *p, const mso_keyring_t *keyring,
                               mso_rekey_t *counts);

/* APR_NOTFOUND when no such row; APR_EGENERAL (logged) when the database failed. */
apr_status_t mso_account_get(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                             mso_account_t **acct);
apr_status_t mso_account_find(mso_db_t *db, apr_pool_t *p, const char *company,
                              const char *mailbox, mso_account_t **acct);
/* Every account (mso_account_t*), ordered by id. */
apr_status_t mso_account_list(mso_db_t *db, apr_pool_t *p, apr_array_header_t **accounts);

/* Drops every token of the account, releases it from its Microsoft object
 * and marks it disconnected. APR_NOTFOUND when there is no such account. */
apr_status_t mso_account_disconnect(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                    apr_int64_t now);

/* --- the refresh lease --- */

/* Claims up to max delegated accounts whose refresh is due (state connected,
 * refresh_due_at <= now, retry_at <= now), most overdue first, each with a
 * lease for owner until now + lease_seconds (mso_db_claim). A row leased by
 * another owner whose lease has not run out is skipped; two nodes never hold
 * the same account. *accounts: mso_account_t* in p. */
apr_status_t mso_account_claim_due(mso_db_t *db, apr_pool_t *p, const char *owner,
                                   apr_int64_t now, int lease_seconds, int max,
                                   apr_array_header_t **accounts);

/* Leases one account (the token handler). APR_EBUSY when another owner holds
 * a live lease, APR_NOTFOUND when there is no such account. */
apr_status_t mso_account_lease(mso_db_t *db, apr_pool_t *p, apr_int64_t id, const char *owner,
                               apr_int64_t now, int lease_seconds);
apr_status_t mso_account_release(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                 const char *owner);

typedef struct {
    const char *kind;                 /* token kind refreshed: graph | outlook */
    const char *sealed_access;
    apr_int64_t access_expires_at;
    const char *sealed_refresh;       /* NULL when Microsoft sent none: keep the stored one */
    const char *scopes;               /* NULL: keep */
    apr_int64_t refresh_due_at;
} mso_refreshed_t;

/* Stores a successful refresh (tokens sealed with mso_account_token_seal) in
 * one transaction, only while owner still holds the lease (APR_EBUSY:
 * nothing written). Clears last_error, reason, error_runs and retry_at, sets
 * last_refresh_at and, for graph, access_expires_at; releases the lease. */
apr_status_t mso_account_refreshed(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                   const char *owner, const mso_refreshed_t *r,
                                   apr_int64_t now, const char **err);

/* Records a failed refresh: the state (connected or reconnect_required),
 * reason, aadsts and last_error (a sentence, no secrets), error_runs + 1 and
 * retry_at; releases the lease. Only while owner holds the lease, and never
 * on a disconnected account (APR_EBUSY: nothing written). Tokens are not
 * touched. */
apr_status_t mso_account_refresh_failed(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                        const char *owner, const char *state,
                                        const char *reason, long aadsts,
                                        const char *last_error, apr_int64_t retry_at,
                                        apr_int64_t now);

/* Every owner holding a lease of either kind (refresh or Graph work). */
apr_status_t mso_account_lease_owners(mso_db_t *db, apr_pool_t *p,
                                      apr_array_header_t **owners);

/* Lets go of every lease (of either kind) owner holds: for a process known
 * to be dead, so its accounts need not wait for the leases to run out. */
apr_status_t mso_account_drop_owner(mso_db_t *db, apr_pool_t *p, const char *owner);

/* For the other files of the database layer: the account columns of a
 * select, and the account they describe (strings copied into p). */
#define MSO_ACCOUNT_COLUMNS \
    "id, company, kind, client_id, mailbox, display_name, tenant_id, object_id, scopes, " \
    "state, authority, access_expires_at, last_sync_at, last_error, connected_by, " \
    "created_at, updated_at, refresh_due_at, retry_at, error_runs, reason, aadsts, " \
    "last_refresh_at, lease_owner, lease_until, shared"
mso_account_t *mso_account_from_row(mso_rows_t *r, apr_pool_t *p);

#endif
