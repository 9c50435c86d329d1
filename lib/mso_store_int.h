/* Inside the store: what lib/mso_store.c shares with the other files of the
 * database layer (lib/mso_mirror.c). Not for the glue. */
#ifndef MSO_STORE_INT_H
#define MSO_STORE_INT_H

#include "mso_store.h"

/* A statement: the cache label (unique per SQL text), its SQL, and a
 * PostgreSQL variant when the dialects differ. */
typedef struct {
    const char *label;
    const char *sql;
    const char *pgsql;
} mso_stmt_t;

/* Runs a prepared statement with binary args (%s: const char*, %lld:
 * apr_int64_t*, %d: int*, NULL: SQL NULL). With res, a select whose rows land
 * in p; nrows gets the rows a write changed. 0 or the driver's code. */
int mso_db_stmt_run(mso_db_t *db, apr_pool_t *p, const mso_stmt_t *s, const void **args,
                    int *nrows, apr_dbd_results_t **res);
apr_dbd_row_t *mso_db_first_row(mso_db_t *db, apr_pool_t *p, apr_dbd_results_t *res);
const char *mso_db_col_str(mso_db_t *db, apr_pool_t *p, apr_dbd_row_t *row, int col);
apr_int64_t mso_db_col_i64(mso_db_t *db, apr_dbd_row_t *row, int col);
int mso_db_exec_sql(mso_db_t *db, const char *sql);

/* BEGIN IMMEDIATE on SQLite (the write lock first), BEGIN on PostgreSQL. */
int mso_db_tx_begin(mso_db_t *db);
int mso_db_tx_commit(mso_db_t *db);
void mso_db_tx_rollback(mso_db_t *db, apr_pool_t *p);

/* The columns of an account row, in the order mso_db_account_from_row reads
 * them (0 .. MSO_ACCOUNT_NCOLS - 1); a select may add its own after them. */
#define MSO_ACCOUNT_COLUMNS \
    "id, company, mailbox, display_name, tenant_id, object_id, scopes, state, authority, " \
    "access_expires_at, last_sync_at, last_error, connected_by, created_at, updated_at, " \
    "refresh_due_at, retry_at, error_runs, reason, aadsts, last_refresh_at, lease_owner, " \
    "lease_until"
#define MSO_ACCOUNT_NCOLS 23
mso_account_t *mso_db_account_from_row(mso_db_t *db, apr_pool_t *p, apr_dbd_row_t *row);

/* Leases what find finds (ids in its column 0): then, in one transaction,
 * runs take once per id, its arguments filled by args_of (at most 16); a take
 * that changes no row lost the race to another process or node. *taken: the
 * ids won (apr_int64_t), in p. 0, or the driver's code with *step naming
 * what failed (and the transaction rolled back). */
typedef void mso_db_take_args_fn(const void **args, const apr_int64_t *id, void *baton);
int mso_db_take_each(mso_db_t *db, apr_pool_t *p, const mso_stmt_t *find,
                     const void **find_args, const mso_stmt_t *take,
                     mso_db_take_args_fn *args_of, void *baton, apr_array_header_t **taken,
                     const char **step);

/* For messages: "the SQLite database", the driver's text on one line, and
 * what the administrator checks. */
const char *mso_db_name(const mso_db_t *db);
const char *mso_db_error(mso_db_t *db, apr_pool_t *p, int rc);
const char *mso_db_write_hint(const mso_db_t *db);
const char *mso_db_read_hint(const mso_db_t *db);

#endif
