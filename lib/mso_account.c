/* Accounts, tokens and the refresh lease (see mso_account.h). */
#include <string.h>

#include <apr_hash.h>
#include <apr_strings.h>

#include "mso_account.h"
#include "mso_events.h"
#include "mso_log.h"

/* The leases. A lease is a row's lease_owner/lease_until pair; it can be
 * taken when there is none, when it ran out, or by its own owner (which
 * extends it). Each take is one conditional UPDATE, which both databases
 * apply to a row one writer at a time, re-checking the condition: the
 * affected-row count says who won. */

static const mso_stmt_t ST_ACCOUNT_GET = {
    "read an account", "id:int",
    "SELECT " MSO_ACCOUNT_COLUMNS " FROM msoauth_accounts WHERE id = :id", NULL
};
static const mso_stmt_t ST_ACCOUNT_FIND = {
    "look up an account by its mailbox", "company:text mailbox:text",
    "SELECT " MSO_ACCOUNT_COLUMNS " FROM msoauth_accounts "
    "WHERE company = :company AND mailbox = :mailbox", NULL
};
static const mso_stmt_t ST_ACCOUNTS = {
    "list the accounts", NULL,
    "SELECT " MSO_ACCOUNT_COLUMNS " FROM msoauth_accounts ORDER BY id", NULL
};

/* Connect, (a): this person's account; the one with the address asked for
 * first, should an old rename have left two. */
static const mso_stmt_t ST_FIND_OBJECT = {
    "look up the account of the person who signed in",
    "company:text tenant_id:text object_id:text mailbox:text",
    "SELECT id, mailbox FROM msoauth_accounts WHERE company = :company "
    "AND tenant_id = :tenant_id AND object_id = :object_id AND kind = 'delegated' "
    "AND shared = 0 "
    "ORDER BY CASE WHEN mailbox = :mailbox THEN 0 ELSE 1 END, updated_at DESC, id LIMIT 1",
    NULL
};
/* Connect, (b), and the read-back of (c). */
static const mso_stmt_t ST_FIND_MAILBOX = {
    "look up the account by its mailbox", "company:text mailbox:text",
    "SELECT id, object_id, tenant_id, kind, shared FROM msoauth_accounts "
    "WHERE company = :company AND mailbox = :mailbox", NULL
};
static const mso_stmt_t ST_ADDRESS_USED = {
    "look for another account with the new address", "company:text mailbox:text id:int",
    "SELECT id FROM msoauth_accounts WHERE company = :company AND mailbox = :mailbox "
    "AND id <> :id", NULL
};
static const mso_stmt_t ST_ACCOUNT_INSERT = {
    "insert the account",
    "company:text client_id:text mailbox:text display_name:text tenant_id:text "
    "object_id:text scopes:text authority:text expires:int connected_by:text now:int "
    "due:int shared:int",
    "INSERT INTO msoauth_accounts (company, client_id, mailbox, display_name, tenant_id, "
    "object_id, scopes, state, authority, access_expires_at, connected_by, created_at, "
    "updated_at, refresh_due_at, shared) VALUES (:company, :client_id, :mailbox, "
    ":display_name, :tenant_id, :object_id, :scopes, 'connected', :authority, :expires, "
    ":connected_by, :now, :now, :due, :shared)", NULL
};
/* A reconnect describes the account afresh, except that identity facts the
 * new sign-in did not supply are kept rather than blanked. */
static const mso_stmt_t ST_ACCOUNT_RECONNECT = {
    "update the account",
    "id:int client_id:text mailbox:text display_name:text tenant_id:text object_id:text "
    "scopes:text authority:text expires:int connected_by:text now:int due:int shared:int",
    "UPDATE msoauth_accounts SET client_id = :client_id, mailbox = :mailbox, shared = :shared, "
    "display_name = COALESCE(:display_name, display_name), "
    "tenant_id = COALESCE(:tenant_id, tenant_id), object_id = COALESCE(:object_id, object_id), "
    "scopes = :scopes, state = 'connected', authority = :authority, "
    "access_expires_at = :expires, last_error = NULL, connected_by = :connected_by, "
    "updated_at = :now, refresh_due_at = :due, retry_at = NULL, error_runs = 0, "
    "reason = NULL, aadsts = NULL, lease_owner = NULL, lease_until = NULL WHERE id = :id",
    NULL
};

static const mso_stmt_t ST_TOKENS_DELETE = {
    "remove the old tokens", "id:int",
    "DELETE FROM msoauth_tokens WHERE account_id = :id", NULL
};
static const mso_stmt_t ST_TOKEN_DELETE = {
    "remove the old token", "id:int kind:text",
    "DELETE FROM msoauth_tokens WHERE account_id = :id AND kind = :kind", NULL
};
static const mso_stmt_t ST_TOKEN_INSERT = {
    "store a token", "id:int kind:text sealed:text expires:int now:int",
    "INSERT INTO msoauth_tokens (account_id, kind, sealed, expires_at, updated_at, binding) "
    "VALUES (:id, :kind, :sealed, :expires, :now, 2)", NULL
};
static const mso_stmt_t ST_TOKEN_GET = {
    "read a token", "id:int kind:text",
    "SELECT sealed, expires_at, binding FROM msoauth_tokens "
    "WHERE account_id = :id AND kind = :kind", NULL
};

static const mso_stmt_t ST_UNBOUND_ACCOUNTS = {
    "list the accounts without a client ID", NULL,
    "SELECT id, company FROM msoauth_accounts WHERE client_id IS NULL ORDER BY id", NULL
};
static const mso_stmt_t ST_SET_CLIENT = {
    "record an account's client ID", "id:int client_id:text",
    "UPDATE msoauth_accounts SET client_id = :client_id WHERE id = :id AND client_id IS NULL",
    NULL
};
static const mso_stmt_t ST_LEGACY_TOKENS = {
    "list the tokens of binding 1", NULL,
    "SELECT t.account_id AS id, t.kind AS kind, t.sealed AS sealed, a.company AS company, "
    "a.mailbox AS mailbox, a.client_id AS client_id FROM msoauth_tokens t "
    "JOIN msoauth_accounts a "
    "ON a.id = t.account_id WHERE t.binding = 1 ORDER BY t.account_id, t.kind", NULL
};
/* Only the value that was read: another process may have rebound it. */
static const mso_stmt_t ST_REBIND = {
    "seal a token again", "id:int kind:text old:text sealed:text",
    "UPDATE msoauth_tokens SET sealed = :sealed, binding = 2 WHERE account_id = :id "
    "AND kind = :kind AND binding = 1 AND sealed = :old", NULL
};

static const mso_stmt_t ST_DUE_IDS = {
    "look for accounts due for a refresh", "now:int max:int",
    "SELECT id FROM msoauth_accounts WHERE state = 'connected' AND kind = 'delegated' "
    "AND COALESCE(refresh_due_at, 0) <= :now AND COALESCE(retry_at, 0) <= :now "
    "AND (lease_until IS NULL OR lease_until < :now) "
    "ORDER BY COALESCE(refresh_due_at, 0), id LIMIT :max", NULL
};
/* Repeats the due condition: between the select and this update another node
 * may have refreshed the account and released it. */
static const mso_stmt_t ST_CLAIM = {
    "take a refresh lease", "id:int owner:text until:int now:int",
    "UPDATE msoauth_accounts SET lease_owner = :owner, lease_until = :until WHERE id = :id "
    "AND state = 'connected' AND kind = 'delegated' AND COALESCE(refresh_due_at, 0) <= :now "
    "AND COALESCE(retry_at, 0) <= :now "
    "AND (lease_until IS NULL OR lease_until < :now OR lease_owner = :owner)", NULL
};
static const mso_stmt_t ST_LEASE = {
    "lease an account", "id:int owner:text until:int now:int",
    "UPDATE msoauth_accounts SET lease_owner = :owner, lease_until = :until WHERE id = :id "
    "AND (lease_until IS NULL OR lease_until < :now OR lease_owner = :owner)", NULL
};
static const mso_stmt_t ST_ACCOUNT_EXISTS = {
    "look for an account", "id:int",
    "SELECT 1 AS found FROM msoauth_accounts WHERE id = :id", NULL
};
static const mso_stmt_t ST_RELEASE = {
    "release the lease of an account", "id:int owner:text",
    "UPDATE msoauth_accounts SET lease_owner = NULL, lease_until = NULL "
    "WHERE id = :id AND lease_owner = :owner", NULL
};
/* Only while the lease is still ours: a reconnect or disconnect meanwhile
 * cleared it, and a lease that ran out may have been taken by another node. */
static const mso_stmt_t ST_REFRESHED = {
    "update the account", "id:int owner:text expires:int scopes:text due:int now:int",
    "UPDATE msoauth_accounts SET access_expires_at = COALESCE(:expires, access_expires_at), "
    "scopes = COALESCE(:scopes, scopes), refresh_due_at = :due, last_refresh_at = :now, "
    "last_error = NULL, reason = NULL, aadsts = NULL, error_runs = 0, retry_at = NULL, "
    "lease_owner = NULL, lease_until = NULL, updated_at = :now "
    "WHERE id = :id AND lease_owner = :owner", NULL
};
/* The same fence, and a disconnect meanwhile (which let go of the lease)
 * stays a disconnect. */
static const mso_stmt_t ST_REFRESH_FAILED = {
    "record a failed refresh",
    "id:int owner:text state:text reason:text aadsts:int last_error:text retry_at:int now:int",
    "UPDATE msoauth_accounts SET state = :state, reason = :reason, aadsts = :aadsts, "
    "last_error = :last_error, error_runs = error_runs + 1, retry_at = :retry_at, "
    "lease_owner = NULL, lease_until = NULL, updated_at = :now "
    "WHERE id = :id AND lease_owner = :owner AND state <> 'disconnected'", NULL
};
static const mso_stmt_t ST_DISCONNECT = {
    "mark a mailbox disconnected", "id:int now:int",
    "UPDATE msoauth_accounts SET state = 'disconnected', object_id = NULL, tenant_id = NULL, "
    "retry_at = NULL, lease_owner = NULL, lease_until = NULL, updated_at = :now WHERE id = :id",
    NULL
};
static const mso_stmt_t ST_LEASE_OWNERS = {
    "list the lease owners", NULL,
    "SELECT lease_owner AS owner FROM msoauth_accounts WHERE lease_owner IS NOT NULL UNION "
    "SELECT work_owner AS owner FROM msoauth_accounts WHERE work_owner IS NOT NULL", NULL
};
static const mso_stmt_t ST_DROP_LEASES = {
    "release a dead process's refresh leases", "owner:text",
    "UPDATE msoauth_accounts SET lease_owner = NULL, lease_until = NULL "
    "WHERE lease_owner = :owner", NULL
};
static const mso_stmt_t ST_DROP_WORK = {
    "release a dead process's Graph work leases", "owner:text",
    "UPDATE msoauth_accounts SET work_owner = NULL, work_until = NULL WHERE work_owner = :owner",
    NULL
};

/* App accounts: no object, no tokens, due for their first sync at once. A
 * row with that address already (another child or node made it, or a
 * delegated account) stays as it is. */
static const mso_stmt_t ST_APP_MAILBOXES = {
    "list the company's mailboxes", "company:text",
    "SELECT mailbox, kind FROM msoauth_accounts WHERE company = :company", NULL
};
static const mso_stmt_t ST_APP_INSERT = {
    "insert an app account",
    "company:text client_id:text mailbox:text tenant_id:text authority:text "
    "connected_by:text now:int",
    "INSERT INTO msoauth_accounts (company, kind, client_id, mailbox, tenant_id, state, "
    "authority, connected_by, created_at, updated_at, sync_due_at) VALUES (:company, 'app', "
    ":client_id, :mailbox, :tenant_id, 'connected', :authority, :connected_by, :now, :now, 0) "
    "ON CONFLICT (company, mailbox) DO NOTHING", NULL
};
static const mso_stmt_t ST_APP_RECONNECT = {
    "connect the app account again",
    "id:int client_id:text tenant_id:text authority:text connected_by:text now:int",
    "UPDATE msoauth_accounts SET state = 'connected', client_id = :client_id, "
    "tenant_id = :tenant_id, authority = :authority, connected_by = :connected_by, "
    "reason = NULL, aadsts = NULL, last_error = NULL, error_runs = 0, retry_at = NULL, "
    "sync_due_at = 0, sync_retry_at = NULL, sync_error = NULL, sync_error_runs = 0, "
    "updated_at = :now WHERE id = :id AND kind = 'app'", NULL
};
static const mso_stmt_t ST_MAILBOX_REASON = {
    "record the mailbox's problem", "id:int reason:text last_error:text now:int",
    "UPDATE msoauth_accounts SET reason = :reason, last_error = :last_error, "
    "updated_at = :now WHERE id = :id", NULL
};
static const mso_stmt_t ST_MAILBOX_REASON_CLEAR = {
    "clear the mailbox's problem", "id:int now:int",
    "UPDATE msoauth_accounts SET reason = NULL, last_error = NULL, updated_at = :now "
    "WHERE id = :id AND reason IN ('mailbox_not_found', 'access_denied_by_policy')", NULL
};

/* ASCII lower case: mailbox addresses and client IDs compare case-insensitively. */
static const char *lower_ascii(apr_pool_t *p, const char *s)
{
    char *r, *c;

    if (!s) {
        return NULL;
    }
    r = apr_pstrdup(p, s);
    for (c = r; *c; c++) {
        if (*c >= 'A' && *c <= 'Z') {
            *c = (char)(*c - 'A' + 'a');
        }
    }
    return r;
}

static void wipe(void *s, apr_size_t n)
{
    volatile unsigned char *v = s;

    while (v && n--) {
        *v++ = 0;
    }
}

mso_account_t *mso_account_from_row(mso_rows_t *r, apr_pool_t *p)
{
    mso_account_t *a = apr_pcalloc(p, sizeof(*a));

    a->id = mso_col_int(r, "id");
    a->company = mso_col_text(r, p, "company");
    a->kind = mso_col_text(r, p, "kind");
    a->client_id = mso_col_text(r, p, "client_id");
    a->mailbox = mso_col_text(r, p, "mailbox");
    a->display_name = mso_col_text(r, p, "display_name");
    a->tenant_id = mso_col_text(r, p, "tenant_id");
    a->object_id = mso_col_text(r, p, "object_id");
    a->scopes = mso_col_text(r, p, "scopes");
    a->state = mso_col_text(r, p, "state");
    a->authority = mso_col_text(r, p, "authority");
    a->access_expires_at = mso_col_int(r, "access_expires_at");
    a->last_sync_at = mso_col_int(r, "last_sync_at");
    a->last_error = mso_col_text(r, p, "last_error");
    a->connected_by = mso_col_text(r, p, "connected_by");
    a->created_at = mso_col_int(r, "created_at");
    a->updated_at = mso_col_int(r, "updated_at");
    a->refresh_due_at = mso_col_int(r, "refresh_due_at");
    a->retry_at = mso_col_int(r, "retry_at");
    a->error_runs = (int)mso_col_int(r, "error_runs");
    a->reason = mso_col_text(r, p, "reason");
    a->aadsts = (long)mso_col_int(r, "aadsts");
    a->last_refresh_at = mso_col_int(r, "last_refresh_at");
    a->lease_owner = mso_col_text(r, p, "lease_owner");
    a->lease_until = mso_col_int(r, "lease_until");
    a->shared = (int)mso_col_int(r, "shared");
    return a;
}

/* One account by a, in p: APR_NOTFOUND when there is none. */
static apr_status_t account_select(mso_args_t *a, apr_pool_t *p, mso_account_t **acct)
{
    mso_rows_t *rows = NULL;
    apr_status_t rv;

    *acct = NULL;
    if (!MSO_OK(mso_select(a, &rows, NULL))) {
        return rv;
    }
    if (!mso_rows_next(rows)) {
        return APR_NOTFOUND;
    }
    *acct = mso_account_from_row(rows, p);
    while (mso_rows_next(rows)) {
    }
    return APR_SUCCESS;
}

apr_status_t mso_account_get(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                             mso_account_t **acct)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_ACCOUNT_GET);
    mso_arg_int(a, "id", id);
    rv = account_select(a, p, acct);
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_account_find(mso_db_t *db, apr_pool_t *p, const char *company,
                              const char *mailbox, mso_account_t **acct)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    *acct = NULL;
    if (!company || !mailbox) {
        return APR_NOTFOUND;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_ACCOUNT_FIND);
    mso_arg_text(a, "company", company);
    mso_arg_text(a, "mailbox", lower_ascii(tmp, mailbox));
    rv = account_select(a, p, acct);
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_account_list(mso_db_t *db, apr_pool_t *p, apr_array_header_t **accounts)
{
    apr_pool_t *tmp;
    mso_rows_t *rows = NULL;
    apr_status_t rv;

    *accounts = apr_array_make(p, 8, sizeof(mso_account_t *));
    apr_pool_create(&tmp, p);
    if (MSO_OK(mso_select(mso_args(db, tmp, &ST_ACCOUNTS), &rows, NULL))) {
        while (mso_rows_next(rows)) {
            APR_ARRAY_PUSH(*accounts, mso_account_t *) = mso_account_from_row(rows, p);
        }
    }
    apr_pool_destroy(tmp);
    return rv;
}

/* ------------------------------------------------------------------------- */
/* Tokens */

const char *mso_token_aad(apr_pool_t *p, const char *client_id, apr_int64_t account_id,
                          const char *kind)
{
    return apr_psprintf(p, "token:v2:%s:%s:%" APR_INT64_T_FMT, kind,
                        lower_ascii(p, client_id ? client_id : ""), account_id);
}

/* Binding 1, before schema version 4: only mso_account_rebind opens it. */
static const char *legacy_aad(apr_pool_t *p, const char *company, const char *mailbox,
                              const char *kind)
{
    return apr_pstrcat(p, "token:", kind, ":", company, ":", lower_ascii(p, mailbox), NULL);
}

static apr_status_t seal_for(apr_pool_t *p, const mso_keyring_t *keyring,
                             const char *client_id, apr_int64_t id, const char *kind,
                             const char *plain, const char **sealed)
{
    *sealed = NULL;
    if (!client_id || !*client_id || !plain) {
        return APR_EINVAL;
    }
    return mso_seal(p, keyring, MSO_PURPOSE_TOKEN, mso_token_aad(p, client_id, id, kind),
                    plain, strlen(plain), sealed);
}

apr_status_t mso_account_token_seal(apr_pool_t *p, const mso_keyring_t *keyring,
                                    const mso_account_t *acct, const char *kind,
                                    const char *plain, const char **sealed)
{
    return seal_for(p, keyring, acct->client_id, acct->id, kind, plain, sealed);
}

apr_status_t mso_account_seal_tokens(void *baton, apr_int64_t account_id,
                                     const char **sealed_refresh, const char **sealed_access)
{
    mso_token_sealer_t *s = baton;
    apr_status_t rv;

    *sealed_refresh = *sealed_access = NULL;
    if (!s->refresh_token || !*s->refresh_token) {
        return APR_EINVAL;
    }
    rv = seal_for(s->p, s->keyring, s->client_id, account_id, "refresh", s->refresh_token,
                  sealed_refresh);
    if (rv == APR_SUCCESS && s->access_token && *s->access_token) {
        rv = seal_for(s->p, s->keyring, s->client_id, account_id, "graph", s->access_token,
                      sealed_access);
    }
    return rv;
}

/* The stored token: APR_NOTFOUND when none. */
static apr_status_t token_read(mso_db_t *db, apr_pool_t *p, apr_int64_t id, const char *kind,
                               const char **sealed, apr_int64_t *expires_at, int *binding)
{
    apr_pool_t *tmp;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;

    *sealed = NULL;
    if (expires_at) {
        *expires_at = 0;
    }
    if (!kind) {
        return APR_NOTFOUND;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_TOKEN_GET);
    mso_arg_int(a, "id", id);
    mso_arg_text(a, "kind", kind);
    if (MSO_OK(mso_select(a, &rows, NULL))) {
        if (mso_rows_next(rows)) {
            *sealed = mso_col_text(rows, p, "sealed");
            if (expires_at) {
                *expires_at = mso_col_int(rows, "expires_at");
            }
            *binding = (int)mso_col_int(rows, "binding");
            while (mso_rows_next(rows)) {
            }
        }
        rv = *sealed ? APR_SUCCESS : APR_NOTFOUND;
    }
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_account_token_get(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                   const char *kind, const char **sealed,
                                   apr_int64_t *expires_at)
{
    int binding = 0;

    return token_read(db, p, account_id, kind, sealed, expires_at, &binding);
}

apr_status_t mso_account_token_open(mso_db_t *db, apr_pool_t *p, const mso_keyring_t *keyring,
                                    const mso_account_t *acct, const char *kind,
                                    const char **plain, apr_int64_t *expires_at)
{
    const char *sealed = NULL;
    unsigned char *out = NULL;
    apr_size_t len = 0;
    apr_status_t rv;
    int binding = 0;

    *plain = NULL;
    rv = token_read(db, p, acct->id, kind, &sealed, expires_at, &binding);
    if (rv != APR_SUCCESS) {
        return rv;
    }
    if (binding != 2 || !acct->client_id || !*acct->client_id) {
        return MSO_ACCOUNT_UNBOUND;
    }
    rv = mso_open(p, keyring, MSO_PURPOSE_TOKEN, mso_token_aad(p, acct->client_id, acct->id,
                                                               kind), sealed, &out, &len);
    if (rv != APR_SUCCESS) {
        return APR_EINVAL;
    }
    *plain = (const char *)out;
    return APR_SUCCESS;
}

/* ------------------------------------------------------------------------- */
/* Connect */

typedef struct {
    const mso_connect_t *in;
    const char *mailbox;            /* lower case */
    const char *client_id;          /* lower case */
    mso_account_seal_fn *seal;
    void *baton;
    apr_int64_t now;
    mso_account_t *acct;            /* out, in tx->p */
} connect_t;

static void bind_account(mso_args_t *a, const connect_t *c)
{
    mso_arg_text(a, "client_id", c->client_id);
    mso_arg_text(a, "mailbox", c->mailbox);
    mso_arg_text(a, "display_name", c->in->display_name);
    mso_arg_text(a, "tenant_id", c->in->tenant_id);
    mso_arg_text(a, "object_id", c->in->object_id);
    mso_arg_text(a, "scopes", c->in->scopes);
    mso_arg_text(a, "authority", c->in->authority);
    mso_arg_opt(a, "expires", c->in->access_expires_at);
    mso_arg_text(a, "connected_by", c->in->connected_by);
    mso_arg_int(a, "now", c->now);
    mso_arg_opt(a, "due", c->in->refresh_due_at);
    mso_arg_int(a, "shared", c->in->shared ? 1 : 0);
}

/* The first row's id (0: none) and, when asked, one text column. */
static apr_status_t first_id(mso_tx_t *tx, mso_args_t *a, apr_int64_t *id, const char *col,
                             const char **text)
{
    mso_rows_t *rows = NULL;
    apr_status_t rv;

    *id = 0;
    if (MSO_OK(mso_tx_select(tx, a, &rows)) && mso_rows_next(rows)) {
        *id = mso_col_int(rows, "id");
        if (col) {
            *text = mso_col_text(rows, tx->ptemp, col);
        }
        while (mso_rows_next(rows)) {
        }
    }
    return rv;
}

/* A shared mailbox: found by its address only; *id 0 for a new one. */
static apr_status_t connect_which_shared(mso_tx_t *tx, connect_t *c, apr_int64_t *id)
{
    const mso_connect_t *in = c->in;
    const char *object = NULL, *tenant = NULL, *kind = NULL;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;
    int mine;

    if (!in->tenant_id || !*in->tenant_id || !in->object_id || !*in->object_id) {
        return mso_tx_fail(tx, APR_EINVAL, "a shared mailbox (%s) is connected for the person "
                           "who signed in, but the sign-in names no Microsoft object",
                           c->mailbox);
    }
    a = mso_tx_args(tx, &ST_FIND_MAILBOX);
    mso_arg_text(a, "company", in->company);
    mso_arg_text(a, "mailbox", c->mailbox);
    if (!MSO_OK(mso_tx_select(tx, a, &rows)) || !mso_rows_next(rows)) {
        return rv;
    }
    *id = mso_col_int(rows, "id");
    object = mso_col_text(rows, tx->ptemp, "object_id");
    tenant = mso_col_text(rows, tx->ptemp, "tenant_id");
    kind = mso_col_text(rows, tx->ptemp, "kind");
    mine = object && tenant && !strcmp(object, in->object_id)
           && !strcmp(tenant, in->tenant_id) && mso_col_int(rows, "shared");
    while (mso_rows_next(rows)) {
    }
    if ((object && !mine) || !kind || strcmp(kind, "delegated")) {
        rv = mso_tx_fail(tx, MSO_ACCOUNT_OTHER_OBJECT, "mailbox %s of company %s is "
                         "connected as account %" APR_INT64_T_FMT " for another Microsoft "
                         "account (%s), not for the one that signed in (%s): disconnect it "
                         "first to connect it for another person", c->mailbox, in->company,
                         *id, object ? object : kind ? kind : "?", in->object_id);
    }
    return rv;
}

/* Which row this sign-in is: (a), (b) or (c) of mso_account.h; *id 0 for a
 * new one. */
static apr_status_t connect_which(mso_tx_t *tx, connect_t *c, apr_int64_t *id)
{
    const mso_connect_t *in = c->in;
    const char *mailbox = NULL, *object = NULL, *kind = NULL;
    apr_int64_t other = 0;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv = APR_SUCCESS;

    *id = 0;
    if (in->shared) {
        rv = connect_which_shared(tx, c, id);
        goto leave;
    }
    if (in->tenant_id && *in->tenant_id && in->object_id && *in->object_id) {
        a = mso_tx_args(tx, &ST_FIND_OBJECT);
        mso_arg_text(a, "company", in->company);
        mso_arg_text(a, "tenant_id", in->tenant_id);
        mso_arg_text(a, "object_id", in->object_id);
        mso_arg_text(a, "mailbox", c->mailbox);
        if (!MSO_OK(first_id(tx, a, id, "mailbox", &mailbox))) {
            goto leave;
        }
    }
    if (*id) {
        if (mailbox && !strcmp(mailbox, c->mailbox)) {
            goto leave;
        }
        /* The person's address changed: keep the account, unless the new
         * address is another account's. */
        a = mso_tx_args(tx, &ST_ADDRESS_USED);
        mso_arg_text(a, "company", in->company);
        mso_arg_text(a, "mailbox", c->mailbox);
        mso_arg_int(a, "id", *id);
        if (MSO_OK(first_id(tx, a, &other, NULL, NULL)) && other) {
            rv = mso_tx_fail(tx, MSO_ACCOUNT_ADDRESS_TAKEN, "the Microsoft account %s of "
                             "company %s is connected as account %" APR_INT64_T_FMT " (%s); "
                             "its new address %s is connected as account %" APR_INT64_T_FMT
                             " already: disconnect one of them first", in->object_id,
                             in->company, *id, mailbox ? mailbox : "?", c->mailbox, other);
        }
        goto leave;
    }
    a = mso_tx_args(tx, &ST_FIND_MAILBOX);
    mso_arg_text(a, "company", in->company);
    mso_arg_text(a, "mailbox", c->mailbox);
    if (!MSO_OK(mso_tx_select(tx, a, &rows))) {
        goto leave;
    }
    if (mso_rows_next(rows)) {
        *id = mso_col_int(rows, "id");
        object = mso_col_text(rows, tx->ptemp, "object_id");
        kind = mso_col_text(rows, tx->ptemp, "kind");
        while (mso_rows_next(rows)) {
        }
        if (object || !kind || strcmp(kind, "delegated")) {
            rv = mso_tx_fail(tx, MSO_ACCOUNT_OTHER_OBJECT, "mailbox %s of company %s is "
                             "connected as account %" APR_INT64_T_FMT " for another Microsoft "
                             "account (%s), not for the one that signed in (%s): disconnect "
                             "it first to connect it for another person", c->mailbox,
                             in->company, *id, object ? object : kind ? kind : "?",
                             in->object_id ? in->object_id : "unknown");
        }
    }

leave:
    return rv;
}

static apr_status_t connect_tx(mso_tx_t *tx, void *baton)
{
    connect_t *c = baton;
    const char *sealed_refresh = NULL, *sealed_access = NULL;
    mso_rows_t *rows = NULL;
    apr_int64_t id = 0;
    mso_args_t *a;
    apr_status_t rv;

    if (!MSO_OK(connect_which(tx, c, &id))) {
        goto leave;
    }
    if (id) {
        a = mso_tx_args(tx, &ST_ACCOUNT_RECONNECT);
        mso_arg_int(a, "id", id);
    }
    else {
        a = mso_tx_args(tx, &ST_ACCOUNT_INSERT);
        mso_arg_text(a, "company", c->in->company);
    }
    bind_account(a, c);
    if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
        goto leave;
    }
    if (!id) {
        /* Portable way to learn the new id: read it back by its key. */
        a = mso_tx_args(tx, &ST_FIND_MAILBOX);
        mso_arg_text(a, "company", c->in->company);
        mso_arg_text(a, "mailbox", c->mailbox);
        if (!MSO_OK(first_id(tx, a, &id, NULL, NULL))) {
            goto leave;
        }
        if (!id) {
            rv = mso_tx_fail(tx, APR_EGENERAL, "cannot read back the account just stored "
                             "for mailbox %s in %s; check that nothing else changes "
                             "msoauth_accounts", c->mailbox, mso_db_name(tx->db));
            goto leave;
        }
    }

    /* Now that the id is known: the tokens, bound to it. */
    rv = c->seal(c->baton, id, &sealed_refresh, &sealed_access);
    if (rv == APR_EINVAL || (rv == APR_SUCCESS && (!sealed_refresh || !*sealed_refresh))) {
        rv = mso_tx_fail(tx, APR_EINVAL, "cannot store the account for mailbox %s: Microsoft "
                         "gave no refresh token to store (was the offline_access scope "
                         "granted?)", c->mailbox);
        goto leave;
    }
    if (rv != APR_SUCCESS) {
        rv = mso_tx_fail(tx, rv, "cannot store the account for mailbox %s: sealing its tokens "
                         "failed", c->mailbox);
        goto leave;
    }
    /* Replace every token: the ones from an earlier sign-in are obsolete. */
    a = mso_tx_args(tx, &ST_TOKENS_DELETE);
    mso_arg_int(a, "id", id);
    if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
        goto leave;
    }
    tx->step = "store the refresh token";
    a = mso_tx_args(tx, &ST_TOKEN_INSERT);
    mso_arg_int(a, "id", id);
    mso_arg_text(a, "kind", "refresh");
    mso_arg_text(a, "sealed", sealed_refresh);
    mso_arg_null(a, "expires");
    mso_arg_int(a, "now", c->now);
    if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
        goto leave;
    }
    if (sealed_access && *sealed_access) {
        tx->step = "store the access token";
        mso_arg_text(a, "kind", "graph");
        mso_arg_text(a, "sealed", sealed_access);
        mso_arg_opt(a, "expires", c->in->access_expires_at);
        if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
            goto leave;
        }
    }
    tx->step = NULL;

    a = mso_tx_args(tx, &ST_ACCOUNT_GET);
    mso_arg_int(a, "id", id);
    if (!MSO_OK(mso_tx_select(tx, a, &rows))) {
        goto leave;
    }
    if (mso_rows_next(rows)) {
        c->acct = mso_account_from_row(rows, tx->p);
        while (mso_rows_next(rows)) {
        }
    }

leave:
    return rv;
}

apr_status_t mso_account_connect(mso_db_t *db, apr_pool_t *p, const mso_connect_t *in,
                                 mso_account_seal_fn *seal, void *baton, apr_int64_t now,
                                 mso_account_t **acct, const char **err)
{
    connect_t c;
    apr_status_t rv;

    *acct = NULL;
    *err = NULL;
    /* Refuse before touching anything: old tokens stay as they are. */
    if (!in || !in->company || !*in->company || !in->mailbox || !*in->mailbox
        || !in->client_id || !*in->client_id || !seal) {
        *err = "cannot store the account: the company, its client ID or the mailbox is missing";
        return APR_EINVAL;
    }
    memset(&c, 0, sizeof(c));
    c.in = in;
    c.mailbox = lower_ascii(p, in->mailbox);
    c.client_id = lower_ascii(p, in->client_id);
    c.seal = seal;
    c.baton = baton;
    c.now = now;
    rv = mso_db_tx(db, p, apr_psprintf(p, "for mailbox %s", c.mailbox), connect_tx, &c, err);
    if (rv == APR_SUCCESS && !c.acct) {
        *err = "the account just stored cannot be read back";
        rv = APR_EGENERAL;
    }
    *acct = c.acct;
    return rv;
}

/* ------------------------------------------------------------------------- */
/* Binding 1 to binding 2 */

typedef struct {
    const mso_keyring_t *keyring;
    mso_client_id_fn *client_id_of;
    void *baton;
    mso_rebind_t *counts;
} rebind_t;

static apr_status_t rebind_tx(mso_tx_t *tx, void *baton)
{
    rebind_t *r = baton;
    apr_pool_t *p = tx->ptemp;
    mso_rows_t *rows = NULL, *acc = NULL;
    mso_args_t *a;
    apr_status_t rv;
    int n;

    /* Accounts from before the client ID was recorded get their company's. */
    if (!MSO_OK(mso_tx_select(tx, mso_tx_args(tx, &ST_UNBOUND_ACCOUNTS), &acc))) {
        goto leave;
    }
    while (mso_rows_next(acc)) {
        apr_int64_t id = mso_col_int(acc, "id");
        const char *company = mso_col_text(acc, p, "company");
        const char *cid = company ? r->client_id_of(r->baton, company) : NULL;

        if (!cid || !*cid) {
            r->counts->no_client++;
            continue;
        }
        a = mso_tx_args(tx, &ST_SET_CLIENT);
        mso_arg_int(a, "id", id);
        mso_arg_text(a, "client_id", lower_ascii(p, cid));
        if (!MSO_OK(mso_tx_exec(tx, a, &n))) {
            goto leave;
        }
        r->counts->accounts += n;
    }

    if (!MSO_OK(mso_tx_select(tx, mso_tx_args(tx, &ST_LEGACY_TOKENS), &rows))) {
        goto leave;
    }
    while (mso_rows_next(rows)) {
        apr_int64_t id = mso_col_int(rows, "id");
        const char *kind = mso_col_text(rows, p, "kind");
        const char *old = mso_col_text(rows, p, "sealed");
        const char *company = mso_col_text(rows, p, "company");
        const char *mailbox = mso_col_text(rows, p, "mailbox");
        const char *cid = mso_col_text(rows, p, "client_id");     /* set above */
        const char *sealed = NULL;
        unsigned char *plain = NULL;
        apr_size_t len = 0;

        if (!cid || !kind || !old || !company || !mailbox) {
            continue;
        }
        if (mso_open(p, r->keyring, MSO_PURPOSE_TOKEN, legacy_aad(p, company, mailbox, kind),
                     old, &plain, &len) != APR_SUCCESS) {
            r->counts->unopened++;
            continue;
        }
        rv = seal_for(p, r->keyring, cid, id, kind, (const char *)plain, &sealed);
        wipe(plain, len);
        if (rv != APR_SUCCESS) {
            rv = mso_tx_fail(tx, rv, "cannot seal the %s token of account %" APR_INT64_T_FMT
                             " again", kind, id);
            goto leave;
        }
        a = mso_tx_args(tx, &ST_REBIND);
        mso_arg_int(a, "id", id);
        mso_arg_text(a, "kind", kind);
        mso_arg_text(a, "old", old);
        mso_arg_text(a, "sealed", sealed);
        if (!MSO_OK(mso_tx_exec(tx, a, &n))) {
            goto leave;
        }
        r->counts->tokens += n;
    }

leave:
    return rv;
}

apr_status_t mso_account_rebind(mso_db_t *db, apr_pool_t *p, const mso_keyring_t *keyring,
                                mso_client_id_fn *client_id_of, void *baton,
                                mso_rebind_t *counts, const char **err)
{
    rebind_t r;
    apr_status_t rv;

    memset(counts, 0, sizeof(*counts));
    if (!keyring || !client_id_of) {
        *err = "cannot seal the tokens again: no key ring or no client IDs";
        return APR_EINVAL;
    }
    memset(&r, 0, sizeof(r));
    r.keyring = keyring;
    r.client_id_of = client_id_of;
    r.baton = baton;
    r.counts = counts;
    rv = mso_db_tx(db, p, "to bind the tokens to their accounts", rebind_tx, &r, err);
    if (rv != APR_SUCCESS) {
        memset(counts, 0, sizeof(*counts));
    }
    return rv;
}

/* ------------------------------------------------------------------------- */
/* The refresh lease */

apr_status_t mso_account_claim_due(mso_db_t *db, apr_pool_t *p, const char *owner,
                                   apr_int64_t now, int lease_seconds, int max,
                                   apr_array_header_t **accounts)
{
    apr_pool_t *tmp;
    apr_array_header_t *ids = NULL;
    mso_args_t *find, *take;
    apr_status_t rv;
    int i;

    *accounts = apr_array_make(p, max > 0 ? max : 1, sizeof(mso_account_t *));
    if (!owner || !*owner) {
        return APR_EINVAL;
    }
    if (max <= 0) {
        return APR_SUCCESS;
    }
    apr_pool_create(&tmp, p);
    find = mso_args(db, tmp, &ST_DUE_IDS);
    mso_arg_int(find, "now", now);
    mso_arg_int(find, "max", max);
    take = mso_args(db, tmp, &ST_CLAIM);
    mso_arg_text(take, "owner", owner);
    mso_arg_int(take, "until", now + lease_seconds);
    mso_arg_int(take, "now", now);
    if (MSO_OK(mso_db_claim(db, tmp, find, take, &ids, NULL))) {
        for (i = 0; i < ids->nelts; i++) {
            mso_account_t *a = NULL;

            if (mso_account_get(db, p, APR_ARRAY_IDX(ids, i, apr_int64_t), &a)
                == APR_SUCCESS) {
                APR_ARRAY_PUSH(*accounts, mso_account_t *) = a;
            }
        }
    }
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_account_lease(mso_db_t *db, apr_pool_t *p, apr_int64_t id, const char *owner,
                               apr_int64_t now, int lease_seconds)
{
    apr_pool_t *tmp;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    if (!owner || !*owner) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_LEASE);
    mso_arg_int(a, "id", id);
    mso_arg_text(a, "owner", owner);
    mso_arg_int(a, "until", now + lease_seconds);
    mso_arg_int(a, "now", now);
    if (MSO_OK(mso_exec(a, &n, NULL)) && n != 1) {
        a = mso_args(db, tmp, &ST_ACCOUNT_EXISTS);
        mso_arg_int(a, "id", id);
        if (MSO_OK(mso_select(a, &rows, NULL))) {
            rv = mso_rows_next(rows) ? APR_EBUSY : APR_NOTFOUND;
            while (mso_rows_next(rows)) {
            }
        }
    }
    apr_pool_destroy(tmp);
    return rv;
}

apr_status_t mso_account_release(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                 const char *owner)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    if (!owner || !*owner) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_RELEASE);
    mso_arg_int(a, "id", id);
    mso_arg_text(a, "owner", owner);
    rv = mso_exec(a, NULL, NULL);
    apr_pool_destroy(tmp);
    return rv;
}

/* Replaces the token of one kind: delete, then insert. */
static apr_status_t token_replace(mso_tx_t *tx, apr_int64_t id, const char *kind,
                                  const char *sealed, apr_int64_t expires, apr_int64_t now)
{
    mso_args_t *a;
    apr_status_t rv;

    a = mso_tx_args(tx, &ST_TOKEN_DELETE);
    mso_arg_int(a, "id", id);
    mso_arg_text(a, "kind", kind);
    if (MSO_OK(mso_tx_exec(tx, a, NULL))) {
        a = mso_tx_args(tx, &ST_TOKEN_INSERT);
        mso_arg_int(a, "id", id);
        mso_arg_text(a, "kind", kind);
        mso_arg_text(a, "sealed", sealed);
        mso_arg_opt(a, "expires", expires);
        mso_arg_int(a, "now", now);
        rv = mso_tx_exec(tx, a, NULL);
    }
    return rv;
}

typedef struct {
    apr_int64_t id;
    const char *owner;
    const mso_refreshed_t *r;
    apr_int64_t now;
} refreshed_t;

static apr_status_t refreshed_tx(mso_tx_t *tx, void *baton)
{
    refreshed_t *rf = baton;
    const mso_refreshed_t *r = rf->r;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    /* First, so that the lease check and the write are one step. */
    a = mso_tx_args(tx, &ST_REFRESHED);
    mso_arg_int(a, "id", rf->id);
    mso_arg_text(a, "owner", rf->owner);
    if (!strcmp(r->kind, "graph")) {
        mso_arg_opt(a, "expires", r->access_expires_at);
    }
    else {
        mso_arg_null(a, "expires");
    }
    mso_arg_text(a, "scopes", r->scopes);
    mso_arg_opt(a, "due", r->refresh_due_at);
    mso_arg_int(a, "now", rf->now);
    if (!MSO_OK(mso_tx_exec(tx, a, &n))) {
        goto leave;
    }
    if (n != 1) {
        rv = mso_tx_fail(tx, APR_EBUSY, "the refreshed tokens of account %" APR_INT64_T_FMT
                         " were not stored: this process (%s) no longer holds the account's "
                         "lease (it ran out and another process took it, or the mailbox was "
                         "reconnected or disconnected meanwhile)", rf->id, rf->owner);
        goto leave;
    }
    tx->step = apr_pstrcat(tx->ptemp, "store the ", r->kind, " access token", NULL);
    if (!MSO_OK(token_replace(tx, rf->id, r->kind, r->sealed_access, r->access_expires_at,
                              rf->now))) {
        goto leave;
    }
    if (r->sealed_refresh) {
        tx->step = "store the new refresh token";
        if (!MSO_OK(token_replace(tx, rf->id, "refresh", r->sealed_refresh, 0, rf->now))) {
            goto leave;
        }
    }
    tx->step = "commit the refreshed tokens";

leave:
    return rv;
}

apr_status_t mso_account_refreshed(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                   const char *owner, const mso_refreshed_t *r,
                                   apr_int64_t now, const char **err)
{
    refreshed_t rf;

    *err = NULL;
    if (!owner || !*owner || !r || !r->kind
        || (strcmp(r->kind, "graph") && strcmp(r->kind, "outlook"))
        || !r->sealed_access || !*r->sealed_access
        || (r->sealed_refresh && !*r->sealed_refresh)) {
        *err = "cannot store the refreshed tokens: the lease owner, the token kind (graph or "
               "outlook) or the access token is missing";
        return APR_EINVAL;
    }
    rf.id = id;
    rf.owner = owner;
    rf.r = r;
    rf.now = now;
    return mso_db_tx(db, p, apr_psprintf(p, "of account %" APR_INT64_T_FMT, id), refreshed_tx,
                     &rf, err);
}

typedef struct {
    apr_int64_t id;
    const char *owner, *state, *reason, *last_error;
    long aadsts;
    apr_int64_t retry_at, now;
    int written;
} failed_t;

/* The error on the account and in its history, in one transaction. */
static apr_status_t refresh_failed_tx(mso_tx_t *tx, void *baton)
{
    failed_t *f = baton;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    a = mso_tx_args(tx, &ST_REFRESH_FAILED);
    mso_arg_int(a, "id", f->id);
    mso_arg_text(a, "owner", f->owner);
    mso_arg_text(a, "state", f->state);
    mso_arg_text(a, "reason", f->reason);
    mso_arg_opt(a, "aadsts", f->aadsts);
    mso_arg_text(a, "last_error", f->last_error);
    mso_arg_opt(a, "retry_at", f->retry_at);
    mso_arg_int(a, "now", f->now);
    if (MSO_OK(mso_tx_exec(tx, a, &n)) && n == 1) {
        f->written = 1;
        rv = mso_events_add_tx(tx, f->id, f->reason, f->last_error, f->now);
    }
    return rv;
}

apr_status_t mso_account_refresh_failed(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                        const char *owner, const char *state,
                                        const char *reason, long aadsts,
                                        const char *last_error, apr_int64_t retry_at,
                                        apr_int64_t now)
{
    failed_t f;
    apr_status_t rv;

    if (!owner || !*owner || !state
        || (strcmp(state, "connected") && strcmp(state, "reconnect_required"))) {
        return APR_EINVAL;
    }
    memset(&f, 0, sizeof(f));
    f.id = id;
    f.owner = owner;
    f.state = state;
    f.reason = reason;
    f.aadsts = aadsts;
    f.last_error = last_error;
    f.retry_at = retry_at;
    f.now = now;
    rv = mso_db_tx(db, p, apr_psprintf(p, "of account %" APR_INT64_T_FMT, id),
                   refresh_failed_tx, &f, NULL);
    if (rv == APR_SUCCESS && !f.written) {
        /* another owner holds it now, it was disconnected, or there is no such account */
        rv = APR_EBUSY;
    }
    return rv;
}

typedef struct {
    apr_int64_t id, now;
} disconnect_t;

static apr_status_t disconnect_tx(mso_tx_t *tx, void *baton)
{
    disconnect_t *d = baton;
    mso_args_t *a;
    apr_status_t rv;
    int n = 0;

    a = mso_tx_args(tx, &ST_DISCONNECT);
    mso_arg_int(a, "id", d->id);
    mso_arg_int(a, "now", d->now);
    if (MSO_OK(mso_tx_exec(tx, a, &n))) {
        if (n != 1) {
            return APR_NOTFOUND;
        }
        a = mso_tx_args(tx, &ST_TOKENS_DELETE);
        mso_arg_int(a, "id", d->id);
        rv = mso_tx_exec(tx, a, NULL);
    }
    return rv;
}

apr_status_t mso_account_disconnect(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                    apr_int64_t now)
{
    disconnect_t d;

    d.id = id;
    d.now = now;
    return mso_db_tx(db, p, apr_psprintf(p, "of account %" APR_INT64_T_FMT, id), disconnect_tx,
                     &d, NULL);
}

apr_status_t mso_account_lease_owners(mso_db_t *db, apr_pool_t *p,
                                      apr_array_header_t **owners)
{
    mso_rows_t *rows = NULL;
    apr_status_t rv;

    *owners = apr_array_make(p, 4, sizeof(const char *));
    if (MSO_OK(mso_select(mso_args(db, p, &ST_LEASE_OWNERS), &rows, NULL))) {
        while (mso_rows_next(rows)) {
            const char *o = mso_col_text(rows, p, "owner");

            if (o) {
                APR_ARRAY_PUSH(*owners, const char *) = o;
            }
        }
    }
    return rv;
}

apr_status_t mso_account_drop_owner(mso_db_t *db, apr_pool_t *p, const char *owner)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_DROP_LEASES);
    mso_arg_text(a, "owner", owner);
    if (MSO_OK(mso_exec(a, NULL, NULL))) {
        a = mso_args(db, tmp, &ST_DROP_WORK);
        mso_arg_text(a, "owner", owner);
        rv = mso_exec(a, NULL, NULL);
    }
    apr_pool_destroy(tmp);
    return rv;
}

/* ------------------------------------------------------------------------- */
/* App accounts */

typedef struct {
    const mso_app_account_t *in;
    const apr_array_header_t *mailboxes;
    const char *one;                /* add_app: the mailbox */
    apr_int64_t now;
    int created, conflicts;
    mso_account_t *acct;            /* add_app: out, in tx->p */
} app_t;

static void bind_app(mso_args_t *a, const app_t *x, const char *mailbox)
{
    mso_arg_text(a, "company", x->in->company);
    mso_arg_text(a, "client_id", x->in->client_id);
    mso_arg_text(a, "mailbox", mailbox);
    mso_arg_text(a, "tenant_id", x->in->tenant_id);
    mso_arg_text(a, "authority", x->in->authority);
    mso_arg_text(a, "connected_by", x->in->connected_by);
    mso_arg_int(a, "now", x->now);
}

static apr_status_t ensure_app_tx(mso_tx_t *tx, void *baton)
{
    app_t *x = baton;
    apr_hash_t *have = apr_hash_make(tx->ptemp);
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;
    int i, n;

    a = mso_tx_args(tx, &ST_APP_MAILBOXES);
    mso_arg_text(a, "company", x->in->company);
    if (!MSO_OK(mso_tx_select(tx, a, &rows))) {
        goto leave;
    }
    while (mso_rows_next(rows)) {
        const char *m = mso_col_text(rows, tx->ptemp, "mailbox");
        const char *k = mso_col_text(rows, tx->ptemp, "kind");

        if (m) {
            apr_hash_set(have, m, APR_HASH_KEY_STRING, k ? k : "");
        }
    }
    for (i = 0; i < x->mailboxes->nelts; i++) {
        const char *m = lower_ascii(tx->ptemp, APR_ARRAY_IDX(x->mailboxes, i, const char *));
        const char *k = apr_hash_get(have, m, APR_HASH_KEY_STRING);

        if (k) {
            x->conflicts += strcmp(k, "app") != 0;
            continue;
        }
        a = mso_tx_args(tx, &ST_APP_INSERT);
        bind_app(a, x, m);
        if (!MSO_OK(mso_tx_exec(tx, a, &n))) {
            goto leave;
        }
        x->created += n;
    }

leave:
    return rv;
}

static int app_input_ok(const mso_app_account_t *in)
{
    return in && in->company && *in->company && in->client_id && *in->client_id;
}

apr_status_t mso_account_ensure_app(mso_db_t *db, apr_pool_t *p, const mso_app_account_t *in,
                                    const apr_array_header_t *mailboxes, apr_int64_t now,
                                    int *created, int *conflicts, const char **err)
{
    mso_app_account_t lc;
    app_t x;
    apr_status_t rv;

    *created = *conflicts = 0;
    *err = NULL;
    if (!app_input_ok(in) || !mailboxes) {
        *err = "cannot make the app accounts: the company or its client ID is missing";
        return APR_EINVAL;
    }
    lc = *in;
    lc.client_id = lower_ascii(p, in->client_id);
    memset(&x, 0, sizeof(x));
    x.in = &lc;
    x.mailboxes = mailboxes;
    x.now = now;
    rv = mso_db_tx(db, p, apr_psprintf(p, "for the mailboxes of company %s", in->company),
                   ensure_app_tx, &x, err);
    if (rv == APR_SUCCESS) {
        *created = x.created;
        *conflicts = x.conflicts;
    }
    return rv;
}

static apr_status_t add_app_tx(mso_tx_t *tx, void *baton)
{
    app_t *x = baton;
    mso_rows_t *rows = NULL;
    const char *kind = NULL, *state = NULL;
    apr_int64_t id = 0;
    mso_args_t *a;
    apr_status_t rv;

    a = mso_tx_args(tx, &ST_ACCOUNT_FIND);
    mso_arg_text(a, "company", x->in->company);
    mso_arg_text(a, "mailbox", x->one);
    if (!MSO_OK(mso_tx_select(tx, a, &rows))) {
        goto leave;
    }
    if (mso_rows_next(rows)) {
        id = mso_col_int(rows, "id");
        kind = mso_col_text(rows, tx->ptemp, "kind");
        state = mso_col_text(rows, tx->ptemp, "state");
        while (mso_rows_next(rows)) {
        }
    }
    if (id && (!kind || strcmp(kind, "app"))) {
        rv = mso_tx_fail(tx, MSO_ACCOUNT_OTHER_OBJECT, "mailbox %s of company %s is account %"
                         APR_INT64_T_FMT ", connected by a person's sign-in: disconnect it "
                         "first", x->one, x->in->company, id);
        goto leave;
    }
    if (id && state && strcmp(state, "connected")) {
        a = mso_tx_args(tx, &ST_APP_RECONNECT);
        mso_arg_int(a, "id", id);
        mso_arg_text(a, "client_id", x->in->client_id);
        mso_arg_text(a, "tenant_id", x->in->tenant_id);
        mso_arg_text(a, "authority", x->in->authority);
        mso_arg_text(a, "connected_by", x->in->connected_by);
        mso_arg_int(a, "now", x->now);
        if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
            goto leave;
        }
    }
    else if (!id) {
        a = mso_tx_args(tx, &ST_APP_INSERT);
        bind_app(a, x, x->one);
        if (!MSO_OK(mso_tx_exec(tx, a, &x->created))) {
            goto leave;
        }
    }
    a = mso_tx_args(tx, &ST_ACCOUNT_FIND);
    mso_arg_text(a, "company", x->in->company);
    mso_arg_text(a, "mailbox", x->one);
    if (MSO_OK(mso_tx_select(tx, a, &rows)) && mso_rows_next(rows)) {
        x->acct = mso_account_from_row(rows, tx->p);
        while (mso_rows_next(rows)) {
        }
    }

leave:
    return rv;
}

apr_status_t mso_account_add_app(mso_db_t *db, apr_pool_t *p, const mso_app_account_t *in,
                                 const char *mailbox, apr_int64_t now, mso_account_t **acct,
                                 int *created, const char **err)
{
    mso_app_account_t lc;
    app_t x;
    apr_status_t rv;

    *acct = NULL;
    *created = 0;
    *err = NULL;
    if (!app_input_ok(in) || !mailbox || !*mailbox) {
        *err = "cannot add the mailbox: the company, its client ID or the address is missing";
        return APR_EINVAL;
    }
    lc = *in;
    lc.client_id = lower_ascii(p, in->client_id);
    memset(&x, 0, sizeof(x));
    x.in = &lc;
    x.one = lower_ascii(p, mailbox);
    x.now = now;
    rv = mso_db_tx(db, p, apr_psprintf(p, "for mailbox %s", x.one), add_app_tx, &x, err);
    if (rv == APR_SUCCESS && !x.acct) {
        *err = "the account just stored cannot be read back";
        rv = APR_EGENERAL;
    }
    *acct = x.acct;
    *created = x.created > 0;
    return rv;
}

apr_status_t mso_account_mailbox_reason(mso_db_t *db, apr_pool_t *p, apr_int64_t id,
                                        const char *reason, const char *last_error,
                                        apr_int64_t now)
{
    apr_pool_t *tmp;
    mso_args_t *a;
    apr_status_t rv;

    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, reason ? &ST_MAILBOX_REASON : &ST_MAILBOX_REASON_CLEAR);
    mso_arg_int(a, "id", id);
    mso_arg_int(a, "now", now);
    if (reason) {
        mso_arg_text(a, "reason", reason);
        mso_arg_text(a, "last_error", last_error);
    }
    rv = mso_exec(a, NULL, NULL);
    apr_pool_destroy(tmp);
    return rv;
}
/* The tokens as stored, and sealing them again under the first key */

static const mso_stmt_t ST_TOKEN_KEYS = {
    "list the tokens", "id:int",
    "SELECT account_id, kind, binding, expires_at, updated_at FROM msoauth_tokens "
    "WHERE account_id = :id OR :id = 0 ORDER BY account_id, kind", NULL
};
static const mso_stmt_t ST_TOKEN_ROW = {
    "read a token and its account", "id:int kind:text",
    "SELECT t.sealed AS sealed, t.binding AS binding, a.company AS company, "
    "a.mailbox AS mailbox, a.client_id AS client_id FROM msoauth_tokens t "
    "JOIN msoauth_accounts a ON a.id = t.account_id "
    "WHERE t.account_id = :id AND t.kind = :kind", NULL
};
/* Only the value that was read: the job or the token handler may have
 * stored a fresh token meanwhile (sealed under httpd's first key). */
static const mso_stmt_t ST_RESEAL = {
    "seal a token under the first key", "id:int kind:text old:text sealed:text",
    "UPDATE msoauth_tokens SET sealed = :sealed WHERE account_id = :id AND kind = :kind "
    "AND sealed = :old", NULL
};

apr_status_t mso_account_tokens(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                                apr_array_header_t **tokens)
{
    apr_pool_t *tmp;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;

    *tokens = apr_array_make(p, 8, sizeof(mso_token_info_t));
    apr_pool_create(&tmp, p);
    a = mso_args(db, tmp, &ST_TOKEN_KEYS);
    mso_arg_int(a, "id", account_id);
    if (MSO_OK(mso_select(a, &rows, NULL))) {
        while (mso_rows_next(rows)) {
            mso_token_info_t *t = apr_array_push(*tokens);

            t->account_id = mso_col_int(rows, "account_id");
            t->kind = mso_col_text(rows, p, "kind");
            t->binding = (int)mso_col_int(rows, "binding");
            t->expires_at = mso_col_int(rows, "expires_at");
            t->updated_at = mso_col_int(rows, "updated_at");
        }
    }
    apr_pool_destroy(tmp);
    /* The key ids, token by token (the sealed values are not kept). */
    if (rv == APR_SUCCESS) {
        int i;

        for (i = 0; i < (*tokens)->nelts; i++) {
            mso_token_info_t *t = &APR_ARRAY_IDX(*tokens, i, mso_token_info_t);
            const char *sealed = NULL;

            if (mso_account_token_get(db, p, t->account_id, t->kind, &sealed, NULL)
                == APR_SUCCESS) {
                t->kid = mso_sealed_kid(p, sealed);
            }
        }
    }
    return rv;
}

/* One token: read, opened, sealed under the first key, written back only
 * if unchanged. */
static void rekey_one(mso_db_t *db, apr_pool_t *p, const mso_keyring_t *kr,
                      const mso_token_info_t *t, mso_rekey_t *n)
{
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    const char *old = NULL, *aad = NULL, *sealed = NULL, *kid;
    unsigned char *plain = NULL;
    apr_size_t len = 0;
    int binding = 0, changed = 0;

    a = mso_args(db, p, &ST_TOKEN_ROW);
    mso_arg_int(a, "id", t->account_id);
    mso_arg_text(a, "kind", t->kind);
    if (mso_select(a, &rows, NULL) != APR_SUCCESS) {
        n->failed++;
        return;
    }
    if (mso_rows_next(rows)) {
        const char *company = mso_col_text(rows, p, "company");
        const char *mailbox = mso_col_text(rows, p, "mailbox");
        const char *cid = mso_col_text(rows, p, "client_id");

        old = mso_col_text(rows, p, "sealed");
        binding = (int)mso_col_int(rows, "binding");
        aad = binding == 2 ? (cid ? mso_token_aad(p, cid, t->account_id, t->kind) : NULL)
              : (company && mailbox ? legacy_aad(p, company, mailbox, t->kind) : NULL);
        while (mso_rows_next(rows)) {
        }
    }
    if (!old) {
        n->gone++;              /* replaced by a disconnect or reconnect meanwhile */
        return;
    }
    n->tokens++;
    kid = mso_sealed_kid(p, old);
    if (kid && !strcmp(kid, mso_keyring_kid(kr, 0))) {
        n->current++;
        return;
    }
    if (!aad || mso_open(p, kr, MSO_PURPOSE_TOKEN, aad, old, &plain, &len) != APR_SUCCESS) {
        n->unopened++;
        return;
    }
    if (mso_seal(p, kr, MSO_PURPOSE_TOKEN, aad, plain, len, &sealed) != APR_SUCCESS) {
        wipe(plain, len);
        n->failed++;
        return;
    }
    wipe(plain, len);
    a = mso_args(db, p, &ST_RESEAL);
    mso_arg_int(a, "id", t->account_id);
    mso_arg_text(a, "kind", t->kind);
    mso_arg_text(a, "old", old);
    mso_arg_text(a, "sealed", sealed);
    if (mso_exec(a, &changed, NULL) != APR_SUCCESS) {
        n->failed++;
    }
    else if (changed == 1) {
        n->resealed++;
    }
    else {
        n->changed++;
    }
}

apr_status_t mso_account_rekey(mso_db_t *db, apr_pool_t *p, const mso_keyring_t *keyring,
                               mso_rekey_t *counts)
{
    apr_array_header_t *tokens = NULL;
    apr_pool_t *tmp;
    apr_status_t rv;
    int i;

    memset(counts, 0, sizeof(*counts));
    if (!keyring || mso_keyring_count(keyring) < 1) {
        return APR_EINVAL;
    }
    apr_pool_create(&tmp, p);
    if (MSO_OK(mso_account_tokens(db, tmp, 0, &tokens))) {
        for (i = 0; i < tokens->nelts; i++) {
            apr_pool_t *one;

            apr_pool_create(&one, tmp);
            rekey_one(db, one, keyring, &APR_ARRAY_IDX(tokens, i, mso_token_info_t), counts);
            apr_pool_destroy(one);
        }
    }
    apr_pool_destroy(tmp);
    return rv != APR_SUCCESS ? rv : counts->failed ? APR_EGENERAL : APR_SUCCESS;
}
