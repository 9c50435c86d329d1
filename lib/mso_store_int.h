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

/* For messages: "the SQLite database", the driver's text on one line, and
 * what the administrator checks. */
const char *mso_db_name(const mso_db_t *db);
const char *mso_db_error(mso_db_t *db, apr_pool_t *p, int rc);
const char *mso_db_write_hint(const mso_db_t *db);
const char *mso_db_read_hint(const mso_db_t *db);

#endif
