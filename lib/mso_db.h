/* The database connection over apr_dbd, the same on SQLite and PostgreSQL:
 * the wrapper around a connection, statements with named and typed
 * arguments, the per-connection statement cache, and the one helper that
 * runs a transaction.
 *
 * Each table has one file that owns its statements: mso_schema (the
 * migrations), mso_account (accounts, tokens, refresh leases), mso_mirror
 * (messages, folder cursors, the Graph work on the account row, actions),
 * mso_flows_used (spent sign-in states), mso_job_runs (the job's health).
 * A new table is a migration appended to the list in mso_schema.c and a
 * file of its own for its statements. A new statement is a static const
 * mso_stmt_t next to its siblings:
 *
 *     static const mso_stmt_t ST_RELEASE = {
 *         "release a refresh lease", "id:int owner:text",
 *         "UPDATE msoauth_accounts SET lease_owner = NULL, lease_until = NULL "
 *         "WHERE id = :id AND lease_owner = :owner", NULL
 *     };
 *
 *     a = mso_args(db, p, &ST_RELEASE);
 *     mso_arg_int(a, "id", id);
 *     mso_arg_text(a, "owner", owner);
 *     rv = mso_exec(a, &n, &err);
 *
 * and writes that belong together run inside mso_db_tx, in a function with
 * one exit:
 *
 *     static apr_status_t store_tx(mso_tx_t *tx, void *baton)
 *     {
 *         ...
 *         a = mso_tx_args(tx, &ST_ONE);
 *         mso_arg_int(a, "id", id);
 *         if (!MSO_OK(mso_tx_exec(tx, a, &n))) {
 *             goto leave;
 *         }
 *         ...
 *     leave:
 *         return rv;
 *     }
 *
 *     rv = mso_db_tx(db, p, "of account 42", store_tx, &baton, &err); */
#ifndef MSO_DB_H
#define MSO_DB_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>
#include <apr_dbd.h>

typedef enum { MSO_DB_SQLITE = 1, MSO_DB_PGSQL = 2 } mso_db_kind_e;

typedef struct {
    apr_pool_t *pool;                 /* the connection's: prepared statements only */
    const apr_dbd_driver_t *driver;
    apr_dbd_t *handle;
    mso_db_kind_e kind;
} mso_db_t;

/* Wraps a connection opened elsewhere (mod_dbd, or apr_dbd_open in tests);
 * p must not outlive it. The same handle and pool give back the same
 * wrapper, so wrapping mod_dbd's connection on every request does not grow
 * it. APR_ENOTIMPL for drivers other than sqlite3 and pgsql. */
apr_status_t mso_db_wrap(apr_pool_t *p, const apr_dbd_driver_t *driver, apr_dbd_t *handle,
                         mso_db_t **db);

/* "the SQLite database" / "the PostgreSQL database", for messages. */
const char *mso_db_name(const mso_db_t *db);

/* ---- statements ---------------------------------------------------------- */

/* A statement. The SQL names its arguments :name (a name used twice is one
 * argument); params declares each with its type, text or int (64 bits):
 * "owner:text until:int". Both are checked against each other when the
 * statement is first used on a connection. A '%' in the SQL is an ordinary
 * character. A statement with a repeated group (a multi-row INSERT)
 * declares the group's arguments once, as name_#:type, and its SQL names
 * them :name_0, :name_1 ... in every row. Statements must live as long as
 * the connections they run on (static const, or cached per connection): the
 * cache keys on the address. params and the SQL are read once per
 * connection, by the first mso_args. */
typedef struct {
    const char *what;       /* what it does, for messages: "take a refresh lease" */
    const char *params;     /* "name:text other:int", or NULL for none */
    const char *sql;
    const char *pgsql;      /* the PostgreSQL text where the dialects differ, or NULL */
} mso_stmt_t;

/* The arguments of one run of a statement, in p (where the run's results
 * land too). Binding a name the statement does not declare, with the wrong
 * type, or leaving one unbound makes the run fail with APR_EINVAL and a
 * sentence naming the argument: a bug, never a silent NULL. Binding a name
 * again replaces its value. */
typedef struct mso_args_t mso_args_t;

mso_args_t *mso_args(mso_db_t *db, apr_pool_t *p, const mso_stmt_t *st);
void mso_arg_text(mso_args_t *a, const char *name, const char *value);   /* NULL: SQL NULL */
void mso_arg_int(mso_args_t *a, const char *name, apr_int64_t value);
void mso_arg_opt(mso_args_t *a, const char *name, apr_int64_t value);    /* 0: SQL NULL */
void mso_arg_null(mso_args_t *a, const char *name);
/* Bytes (BLOB / bytea); data NULL: SQL NULL. data must live until the run. */
void mso_arg_blob(mso_args_t *a, const char *name, const void *data, apr_size_t len);
/* Statements with a repeated group: from here on, name means the group's
 * name_# of that row (":graph_id_3"); -1 goes back to the other arguments. */
void mso_args_row(mso_args_t *a, int row);

/* The rows of a select, read in order; columns by name (an expression needs
 * an alias). */
typedef struct mso_rows_t mso_rows_t;

/* Moves to the next row: 0 when there is none left. */
int mso_rows_next(mso_rows_t *r);
/* A copy in p, NULL for SQL NULL. */
const char *mso_col_text(mso_rows_t *r, apr_pool_t *p, const char *name);
/* 0 for SQL NULL. */
apr_int64_t mso_col_int(mso_rows_t *r, const char *name);
/* A BLOB / bytea column's bytes, copied into p; NULL (and *len 0) for SQL
 * NULL. The whole value is in memory: select large ones one at a time. */
const unsigned char *mso_col_blob(mso_rows_t *r, apr_pool_t *p, const char *name,
                                  apr_size_t *len);

/* A statement on its own (outside a transaction). *nrows: the rows a write
 * changed (may be NULL). On failure *err is a sentence in the arguments'
 * pool (what failed, the database's message, what to check); with err NULL
 * it is logged instead. */
apr_status_t mso_exec(mso_args_t *a, int *nrows, const char **err);
apr_status_t mso_select(mso_args_t *a, mso_rows_t **rows, const char **err);

/* A statement without values on its own: a PRAGMA answers a row, *value
 * gets its first column (value may be NULL). */
apr_status_t mso_db_pragma(mso_db_t *db, apr_pool_t *p, const char *sql, const char **value,
                           const char **err);

/* ---- transactions -------------------------------------------------------- */

typedef struct {
    mso_db_t *db;
    apr_pool_t *p;          /* the caller's: what must outlive the transaction */
    apr_pool_t *ptemp;      /* the transaction's own, destroyed when it ends */
    const char *about;      /* for sentences: "of account 42", or NULL */
    const char *step;       /* what is being done, for sentences; NULL: the statement's what */
    const char *err;        /* the first failure, a sentence */
    int log_only;           /* the caller gave no err: sentences are logged */
} mso_tx_t;

typedef apr_status_t mso_tx_fn(mso_tx_t *tx, void *baton);

/* Runs fn in one transaction: BEGIN (BEGIN IMMEDIATE on SQLite), fn, COMMIT;
 * ROLLBACK when fn returns anything but APR_SUCCESS or the commit fails. The
 * temporary pool and the error sentence live here: *err is the first
 * failure's sentence, in p (NULL when fn refused without one); with err NULL
 * it is logged. Returns what fn returned, or APR_EGENERAL when the database
 * failed. Not nestable. */
apr_status_t mso_db_tx(mso_db_t *db, apr_pool_t *p, const char *about, mso_tx_fn *fn,
                       void *baton, const char **err);

/* The same, but the commit does not wait for the disk (SQLite: synchronous
 * NORMAL for this transaction; PostgreSQL: synchronous_commit off). A crash
 * or power cut may undo it, and nothing else: the database stays whole, and
 * the next durable commit on the database makes it durable too. Only for
 * writes whose loss is harmless (a spent sign-in state) or that are made
 * again (mirrored mail with its cursor, attachments); never for tokens or
 * an application's queued work. */
apr_status_t mso_db_tx_lazy(mso_db_t *db, apr_pool_t *p, const char *about, mso_tx_fn *fn,
                            void *baton, const char **err);

/* Inside fn: the arguments live in ptemp; a failure sets tx->err (and
 * returns APR_EGENERAL, or APR_EINVAL for a binding bug). Rows are read in
 * ptemp: copy what must outlive the transaction into tx->p. */
mso_args_t *mso_tx_args(mso_tx_t *tx, const mso_stmt_t *st);
apr_status_t mso_tx_exec(mso_tx_t *tx, mso_args_t *a, int *nrows);
apr_status_t mso_tx_select(mso_tx_t *tx, mso_args_t *a, mso_rows_t **rows);
/* A statement without values (schema changes). */
apr_status_t mso_tx_exec_sql(mso_tx_t *tx, const char *sql);
/* A refusal that is not the database's: rv with a sentence (printf style),
 * kept unless an earlier failure was. Returns rv. */
apr_status_t mso_tx_fail(mso_tx_t *tx, apr_status_t rv, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* True when rv is APR_SUCCESS, keeping it: `if (!MSO_OK(step())) goto leave;`. */
#define MSO_OK(expr) (APR_SUCCESS == (rv = (expr)))

/* ---- leases -------------------------------------------------------------- */

/* The one claim mechanism: find selects candidate ids (column "id"); then,
 * in one transaction, take runs once per id with :id bound to it (its other
 * arguments bound by the caller). Take is a conditional UPDATE that repeats
 * find's conditions: a take that changes no row lost the race to another
 * process or node. *ids: the ids won (apr_int64_t), in p. */
apr_status_t mso_db_claim(mso_db_t *db, apr_pool_t *p, mso_args_t *find, mso_args_t *take,
                          apr_array_header_t **ids, const char **err);

#endif
