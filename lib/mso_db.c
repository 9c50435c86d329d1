/* The connection layer (see mso_db.h).
 *
 * How statements reach the drivers. Each statement is prepared once per
 * connection with apr_dbd_prepare and run with apr_dbd_pbquery/pbselect: %s
 * for text, %lld for 64-bit integers (passed as apr_int64_t*, so SQLite binds
 * a real integer and pgsql sends its decimal text), NULL pointers for SQL
 * NULL. The binder writes that form from the :name form when a statement is
 * first used on a connection, and lays the values out per run.
 *  - pgsql: prepared with an apr_dbd label, so the driver runs PREPARE once
 *    and every run is an EXECUTE of the server's plan (without a label it
 *    sends the SQL with every run, PQexecParams, and the server parses and
 *    plans it again: the storage path ran at two thirds of the speed). The
 *    label is "mso_<pid>_<wrapper>_<n>", n counting the wrapper's prepares:
 *    a session belongs to one process, wrappers are numbered per process, so
 *    wrapping the same connection again (another pool) never collides with
 *    a "prepared statement already exists". Parameters are typed by the
 *    driver from the binder's form: varchar for text, bigint for ints, bytea
 *    for blobs. A PREPARE survives a ROLLBACK. When a plan can no longer give
 *    the same columns after a schema change, the statement is prepared again
 *    under a new label. When the server has lost a statement, or has one of
 *    our names already, the session is not ours alone (a pooler in
 *    transaction mode) or saw DISCARD ALL: the connection goes back to
 *    unnamed statements for good. Either way the run is repeated at once
 *    outside a transaction; inside one, the failed statement has aborted it,
 *    so it rolls back as any failure and the next run prepares again.
 *  - sqlite3: the driver compiles with the legacy sqlite3_prepare(), whose
 *    statements do not recompile after a schema change. After DDL by any
 *    connection (even one between prepare and first run) a cached statement
 *    fails with SQLITE_ERROR (1) and "database schema has changed" -- or "not
 *    an error" when the DDL ran on this connection, and on every later run.
 *    Only then is the statement prepared again and run once more. Any other
 *    failure (a constraint) is final: the driver keeps every statement it
 *    prepared, in the connection's pool, until the connection closes, so
 *    preparing again on every failure grew the connection by one statement
 *    per failed run.
 *  - sqlite3, per connection: a short busy_timeout (see SQLITE_BUSY_MS), so
 *    a writer waits for another connection's write lock instead of failing
 *    at once without holding up the rest of the process, foreign_keys,
 *    which SQLite enforces (ON DELETE CASCADE) only when each connection
 *    asks, and a longer write-ahead log between checkpoints
 *    (SQLITE_CHECKPOINT_PAGES).
 *
 * Transactions. Raw BEGIN/COMMIT/ROLLBACK through apr_dbd_query rather than
 * apr_dbd_transaction_start/end: the sqlite3 driver's start issues a deferred
 * "BEGIN TRANSACTION", and two writers that each read first then deadlock on
 * the upgrade (SQLite answers SQLITE_BUSY at once instead of waiting); BEGIN
 * IMMEDIATE takes the write lock up front and waits for it (SQLITE_WRITE_WAIT).
 * In the drivers' transaction mode a failed statement also makes every later
 * one silently return the old error, which would hide the real message. Here
 * each statement is checked as it runs and the first failure rolls back.
 *
 * Memory. The connection's pool (mod_dbd's, alive as long as the connection)
 * holds the wrapper and one cache entry per statement used, nothing per run:
 * arguments, results and error sentences live in the caller's pools. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <unistd.h>

#include <apr_atomic.h>
#include <apr_hash.h>
#include <apr_lib.h>
#include <apr_buckets.h>
#include <apr_general.h>
#include <apr_strings.h>

#include "mso_db.h"
#include "mso_log.h"

/* How long (ms) one SQLite call waits inside SQLite for another
 * connection's write lock. Short on purpose: the sqlite3 driver runs every
 * call under one mutex for the whole process (apr_dbd_mutex_lock), so while
 * a call waits there, every other thread of the process waits for that
 * mutex -- the writer holding the lock included, which then cannot commit.
 * With 10 s here, two threads of one process writing at once stalled both
 * for the full 10 s. Past this wait the driver releases its mutex, sleeps
 * 100 ms and tries again (16 times); BEGIN IMMEDIATE, and a statement
 * outside a transaction, go on up to SQLITE_WRITE_WAIT. */
#define SQLITE_BUSY_MS "100"
#define SQLITE_WRITE_WAIT_S 10
#define SQLITE_WRITE_WAIT apr_time_from_sec(SQLITE_WRITE_WAIT_S)

/* SQLite gives its write lock to whichever writer asks at the right moment;
 * there is no queue. A connection that begins a transaction right after
 * its last one (the job storing attachments batch after batch, or pages)
 * could keep another process's writer out past SQLITE_WRITE_WAIT: that
 * writer tries at most every 125 ms or so (SQLite's busy handler, then the
 * driver's sleep). So such a run of transactions pauses for SQLITE_YIELD,
 * longer than that gap, every SQLITE_YIELD_EVERY: the waiter gets its turn
 * for about 5% of the run's speed. */
#define SQLITE_BACK_TO_BACK apr_time_from_msec(5)
#define SQLITE_YIELD apr_time_from_msec(150)
#define SQLITE_YIELD_EVERY apr_time_from_sec(3)

/* Write-ahead log pages between automatic checkpoints (SQLite's default is
 * 1,000, 4 MB). The mirror rewrites the same index pages page after page;
 * a checkpoint copies each changed page once, so a longer log copies less
 * and syncs less often: the job's storage path ran at 25,500 rows/s with
 * 1,000 and 41,100 with 8,192 (bench/README.md). The log file stays at
 * about 32 MB. */
#define SQLITE_CHECKPOINT_PAGES "8192"

/* The sqlite3 driver returns sqlite3_step's code: SQLITE_ERROR, SQLITE_BUSY. */
#define SQLITE_ERROR_RC 1
#define SQLITE_BUSY_RC 5

enum { T_TEXT = 1, T_INT = 2, T_BLOB = 3 };

/* apr_dbd takes a blob as four values: bytes, length, table, column. */
#define BLOB_SLOTS 4

static const char *type_name(int type)
{
    return type == T_INT ? "int" : type == T_BLOB ? "blob" : "text";
}

/* A statement as prepared on one connection. Its arguments are numbered:
 * first the plain ones, then the repeated group row after row. */
typedef struct {
    const mso_stmt_t *st;
    int nplain, ngroup, rows;       /* arguments: nplain + rows * ngroup */
    const char **names;             /* plain ones, then the group's (without _#) */
    int *types;
    apr_hash_t *plain;              /* name -> int* (its number among the plain) */
    apr_hash_t *group;              /* name -> int* (its number in the group) */
    int nslots;                     /* placeholders in the SQL, in order */
    int nvalues;                    /* apr_dbd's values for them (a blob takes four) */
    int *slot_param;
    const char *sql;                /* apr_dbd's form */
    const char *bad;                /* declaration and SQL disagree: a bug */
    apr_dbd_prepared_t *prepared;   /* NULL until first run, or once stale */
} entry_t;

typedef struct {
    int set, null;
    const char *s;
    apr_int64_t i;
    apr_size_t len;                 /* a blob's */
} value_t;

struct mso_args_t {
    mso_db_t *db;
    apr_pool_t *p;
    entry_t *e;
    value_t *values;
    int row;
    const char *err;                /* the first binding bug */
};

struct mso_rows_t {
    mso_db_t *db;
    apr_pool_t *pool;
    const mso_stmt_t *st;
    apr_dbd_results_t *res;
    apr_dbd_row_t *row;
    int ncols;
    const char **names;
};

typedef struct {
    mso_db_t pub;           /* first, so a mso_db_t* from mso_db_wrap converts back */
    apr_hash_t *stmts;      /* const mso_stmt_t* -> entry_t* */
    int in_tx;
    apr_uint32_t number;    /* this wrapper's among the process's, for pgsql labels */
    apr_uint32_t prepares;  /* prepares so far, for pgsql labels */
    int unnamed;            /* pgsql: the server lost a named statement; no labels */
    char sync_level;        /* sqlite: PRAGMA synchronous as found ('0'-'3'); 0: not read */
    apr_time_t tx_ended;    /* sqlite: when its last transaction let the lock go */
    apr_time_t run_since;   /* ... and since when it has begun one right after another */
} db_priv_t;

/* Wrappers made by this process, for pgsql labels. */
static apr_uint32_t wrappers_made;

static db_priv_t *priv(mso_db_t *db)
{
    return (db_priv_t *)db;
}

const char *mso_db_name(const mso_db_t *db)
{
    return db->kind == MSO_DB_SQLITE ? "the SQLite database" : "the PostgreSQL database";
}

/* The driver's message for the last failure, on one line, in p. */
static const char *driver_error(mso_db_t *db, apr_pool_t *p, int rc)
{
    const char *msg = apr_dbd_error(db->driver, db->handle, rc);
    char *s, *c;
    apr_size_t n;

    if (!msg || !*msg || !strcmp(msg, "not an error")) {
        return apr_psprintf(p, "database error %d", rc);
    }
    s = apr_pstrdup(p, msg);
    for (c = s; *c; c++) {
        if (*c == '\n' || *c == '\r' || *c == '\t') {
            *c = ' ';
        }
    }
    n = strlen(s);
    while (n > 0 && s[n - 1] == ' ') {
        s[--n] = '\0';
    }
    return s;
}

/* What an administrator should look at when a statement fails. */
static const char *hint(const mso_db_t *db, int rc, int write)
{
    if (db->kind == MSO_DB_SQLITE && rc == SQLITE_BUSY_RC) {
        /* Not a permission problem: someone else had the lock all along. */
        return "another connection to the same file kept its write lock for longer than "
               "mod_msoauth waits (" APR_STRINGIFY(SQLITE_WRITE_WAIT_S) " s), so nothing of "
               "this was stored: look for a long transaction by another program (a large "
               "DELETE, a backup, an open sqlite3 shell)";
    }
    if (write) {
        return db->kind == MSO_DB_SQLITE
            ? "check that the httpd user can write the database file and its directory"
            : "check that the user in DBDParams owns the database or may create and change "
              "tables in its schema";
    }
    return db->kind == MSO_DB_SQLITE
        ? "check DBDParams and that the httpd user can read the database file"
        : "check DBDParams and that the PostgreSQL server is reachable";
}

/* "cannot WHAT [ABOUT] in the X database: MESSAGE; HINT" */
static const char *sentence(mso_db_t *db, apr_pool_t *p, int rc, const char *what,
                            const char *about, int write)
{
    return apr_psprintf(p, "cannot %s%s%s in %s: %s; %s", what, about ? " " : "",
                        about ? about : "", mso_db_name(db), driver_error(db, p, rc),
                        hint(db, rc, write));
}

/* A statement without values: transaction control, DDL. */
static int raw(mso_db_t *db, const char *sql)
{
    int n = 0;

    return apr_dbd_query(db->driver, db->handle, &n, sql);
}

/* Every statement of this pgsql connection is sent with its SQL from now on:
 * the server lost one of our named statements, or has one of our names
 * already, so the session is not ours alone (a pooler such as PgBouncer in
 * transaction mode hands each transaction another server connection, shared
 * with other clients) or it ran DISCARD ALL. */
static void pgsql_go_unnamed(mso_db_t *db)
{
    db_priv_t *d = priv(db);
    apr_hash_index_t *hi;

    if (d->unnamed) {
        return;
    }
    d->unnamed = 1;
    for (hi = apr_hash_first(NULL, d->stmts); hi; hi = apr_hash_next(hi)) {
        ((entry_t *)apr_hash_this_val(hi))->prepared = NULL;
    }
    mso_log_perror(MSO_LOG_MARK, MSO_LOG_NOTICE, APR_SUCCESS,
                   "mod_msoauth: the PostgreSQL server lost a statement this connection "
                   "prepared, or has its name already (a connection pooler in transaction "
                   "mode, or DISCARD ALL); the connection sends each statement's SQL with "
                   "every run from now on");
}

/* True for a statement to prepare again (see the top); on pgsql, when the
 * server lost it or has its name, every statement is prepared again, unnamed. */
static int prepare_again(mso_db_t *db, int rc)
{
    const char *msg;

    if (rc == 0) {
        return 0;
    }
    msg = apr_dbd_error(db->driver, db->handle, rc);
    if (db->kind == MSO_DB_PGSQL) {
        /* SQLSTATE 26000 and 0A000; libpq's message starts "ERROR:  " */
        if (msg && strstr(msg, "prepared statement \"mso_")
            && (strstr(msg, "\" does not exist") || strstr(msg, "\" already exists"))) {
            pgsql_go_unnamed(db);
            return 1;
        }
        return msg && strstr(msg, "cached plan must not change result type") != NULL;
    }
    if (rc != SQLITE_ERROR_RC) {
        return 0;
    }
    return !msg || !strcmp(msg, "database schema has changed") || !strcmp(msg, "not an error");
}

/* Whether a run that failed for a statement to prepare again may be repeated
 * at once: not inside a pgsql transaction, which the failure has aborted. */
static int may_run_again(mso_db_t *db)
{
    return !(db->kind == MSO_DB_PGSQL && priv(db)->in_tx);
}

/* The apr_dbd label of a new prepare: NULL on SQLite (the driver has no use
 * for one), a name not used before on this session on pgsql. */
static const char *prepare_label(mso_db_t *db)
{
    db_priv_t *d = priv(db);

    if (db->kind != MSO_DB_PGSQL || d->unnamed) {
        return NULL;
    }
    return apr_psprintf(db->pool, "mso_%ld_%u_%u", (long)getpid(), d->number, ++d->prepares);
}

/* ------------------------------------------------------------------------- */
/* The statement cache and the binder */

static int name_char(char c)
{
    return apr_isalnum(c) || c == '_';
}

/* The number of argument name (row -1: a plain one), or -1. */
static int param_of(const entry_t *e, const char *name, apr_ssize_t len, int row)
{
    int *k;

    if (row < 0) {
        k = apr_hash_get(e->plain, name, len);
        return k ? *k : -1;
    }
    k = apr_hash_get(e->group, name, len);
    return k && row < e->rows ? e->nplain + row * e->ngroup + *k : -1;
}

static int param_type(const entry_t *e, int i)
{
    return i < e->nplain ? e->types[i] : e->types[e->nplain + (i - e->nplain) % e->ngroup];
}

/* ":name", or ":name_ROW" for the group, for messages. */
static const char *param_name(apr_pool_t *p, const entry_t *e, int i)
{
    if (i < e->nplain) {
        return apr_pstrcat(p, ":", e->names[i], NULL);
    }
    return apr_psprintf(p, ":%s_%d", e->names[e->nplain + (i - e->nplain) % e->ngroup],
                        (i - e->nplain) / e->ngroup);
}

/* Reads the declaration "a:text b:int g_#:text" into e (its rows come from
 * the SQL). */
static const char *declare(apr_pool_t *p, entry_t *e, const char *params)
{
    apr_array_header_t *names[2], *types[2];
    const char *c = params ? params : "", *start, *end, *colon;
    int *k, g, type;

    for (g = 0; g < 2; g++) {
        names[g] = apr_array_make(p, 8, sizeof(const char *));
        types[g] = apr_array_make(p, 8, sizeof(int));
    }
    e->plain = apr_hash_make(p);
    e->group = apr_hash_make(p);
    while (*c) {
        if (*c == ' ') {
            c++;
            continue;
        }
        for (start = c; name_char(*c) || *c == '#'; c++) {
        }
        colon = c;
        if (colon == start || *colon != ':') {
            return apr_psprintf(p, "its declaration \"%s\" is not \"name:type ...\"", params);
        }
        for (c = colon + 1; *c && *c != ' '; c++) {
        }
        if ((c - colon - 1) == 4 && !strncmp(colon + 1, "text", 4)) {
            type = T_TEXT;
        }
        else if ((c - colon - 1) == 3 && !strncmp(colon + 1, "int", 3)) {
            type = T_INT;
        }
        else if ((c - colon - 1) == 4 && !strncmp(colon + 1, "blob", 4)) {
            type = T_BLOB;
        }
        else {
            return apr_psprintf(p, "its argument %.*s has a type other than text, int or blob",
                                (int)(colon - start), start);
        }
        g = colon - start > 2 && colon[-2] == '_' && colon[-1] == '#';
        end = g ? colon - 2 : colon;
        if (memchr(start, '#', end - start)) {
            return apr_psprintf(p, "its argument %.*s is not a name",
                                (int)(colon - start), start);
        }
        if (apr_hash_get(g ? e->group : e->plain, start, end - start)) {
            return apr_psprintf(p, "its argument %.*s is declared twice",
                                (int)(colon - start), start);
        }
        k = apr_palloc(p, sizeof(*k));
        *k = names[g]->nelts;
        APR_ARRAY_PUSH(names[g], const char *) = apr_pstrmemdup(p, start, end - start);
        APR_ARRAY_PUSH(types[g], int) = type;
        apr_hash_set(g ? e->group : e->plain, APR_ARRAY_IDX(names[g], *k, const char *),
                     end - start, k);
    }
    e->nplain = names[0]->nelts;
    e->ngroup = names[1]->nelts;
    apr_array_cat(names[0], names[1]);
    apr_array_cat(types[0], types[1]);
    e->names = (const char **)names[0]->elts;
    e->types = (int *)types[0]->elts;
    return NULL;
}

/* The placeholder :name at c (c at the ':'): its length; *row >= 0 and
 * *len the name's when it is name_ROW of the group. */
static apr_size_t placeholder(const entry_t *e, const char *c, apr_size_t *len, int *row)
{
    const char *start = c + 1, *end, *u;

    for (end = start; name_char(*end); end++) {
    }
    *len = end - start;
    *row = -1;
    if (param_of(e, start, *len, -1) < 0) {
        for (u = end; u > start && apr_isdigit(u[-1]); u--) {
        }
        if (u < end && u - 1 > start && u[-1] == '_'
            && apr_hash_get(e->group, start, u - 1 - start)) {
            *len = u - 1 - start;
            *row = atoi(u);
        }
    }
    return end - c;
}

/* Writes apr_dbd's form of sql: each :name becomes %s or %lld, '%' becomes
 * "%%" (apr_dbd_prepare reads '%' everywhere, also in quotes), "::" (a
 * PostgreSQL cast) and quoted text stay as they are. The scratch goes to
 * tmp, only the result to p. */
static const char *translate(apr_pool_t *p, apr_pool_t *tmp, entry_t *e, const char *sql)
{
    char *out = apr_palloc(tmp, 2 * strlen(sql) + 1), *o = out;
    apr_array_header_t *slots;
    const char *c, *start;
    apr_size_t len, n;
    int quoted = 0, nparams, i, row;
    char *used;

    /* The group repeats as often as the SQL says. */
    e->rows = 0;
    for (c = sql; *c; c++) {
        quoted ^= *c == '\'';
        if (!quoted && c[0] == ':' && c[1] != ':' && (apr_isalpha(c[1]) || c[1] == '_')) {
            c += placeholder(e, c, &len, &row) - 1;
            if (row >= e->rows) {
                e->rows = row + 1;
            }
        }
        else if (!quoted && c[0] == ':' && c[1] == ':') {
            c++;
        }
    }
    nparams = e->nplain + e->rows * e->ngroup;
    slots = apr_array_make(tmp, nparams + 1, sizeof(int));
    used = apr_pcalloc(tmp, nparams + 1);
    quoted = 0;
    c = sql;
    while (*c) {
        if (*c == '\'') {
            quoted = !quoted;
            *o++ = *c++;
        }
        else if (*c == '%') {
            *o++ = '%';
            *o++ = '%';
            c++;
        }
        else if (!quoted && c[0] == ':' && c[1] == ':') {
            *o++ = *c++;
            *o++ = *c++;
        }
        else if (!quoted && c[0] == ':' && (apr_isalpha(c[1]) || c[1] == '_')) {
            start = c + 1;
            n = placeholder(e, c, &len, &row);
            i = param_of(e, start, len, row);
            if (i < 0) {
                return apr_psprintf(p, "its SQL uses :%.*s, which is not declared",
                                    (int)(n - 1), start);
            }
            c += n;
            used[i] = 1;
            APR_ARRAY_PUSH(slots, int) = i;
            {
                const char *spec = param_type(e, i) == T_INT ? "%lld"
                                   : param_type(e, i) == T_BLOB ? "%pDb" : "%s";

                memcpy(o, spec, strlen(spec));
                o += strlen(spec);
            }
        }
        else {
            *o++ = *c++;
        }
    }
    *o = '\0';
    for (i = 0; i < nparams; i++) {
        if (!used[i]) {
            return apr_psprintf(p, "its argument %s is declared but not used in its SQL",
                                param_name(p, e, i) + 1);
        }
    }
    e->nslots = slots->nelts;
    e->nvalues = 0;
    for (i = 0; i < slots->nelts; i++) {
        e->nvalues += param_type(e, APR_ARRAY_IDX(slots, i, int)) == T_BLOB ? BLOB_SLOTS : 1;
    }
    e->slot_param = apr_pcalloc(p, sizeof(int) * (slots->nelts + 1));
    memcpy(e->slot_param, slots->elts, sizeof(int) * slots->nelts);
    e->sql = apr_pstrmemdup(p, out, o - out);
    return NULL;
}

/* The connection's entry for st, made on first use. */
static entry_t *entry_of(mso_db_t *db, const mso_stmt_t *st)
{
    db_priv_t *d = priv(db);
    entry_t *e = apr_hash_get(d->stmts, &st, sizeof(st));
    const char *sql;

    if (e) {
        return e;
    }
    e = apr_pcalloc(db->pool, sizeof(*e));
    e->st = st;
    sql = (db->kind == MSO_DB_PGSQL && st->pgsql) ? st->pgsql : st->sql;
    e->bad = declare(db->pool, e, st->params);
    if (!e->bad) {
        apr_pool_t *tmp;

        apr_pool_create(&tmp, db->pool);
        e->bad = sql ? translate(db->pool, tmp, e, sql)
                     : apr_psprintf(db->pool, "it has no SQL for %s", mso_db_name(db));
        apr_pool_destroy(tmp);
    }
    apr_hash_set(d->stmts, apr_pmemdup(db->pool, &st, sizeof(st)), sizeof(st), e);
    return e;
}

mso_args_t *mso_args(mso_db_t *db, apr_pool_t *p, const mso_stmt_t *st)
{
    mso_args_t *a = apr_pcalloc(p, sizeof(*a));

    a->db = db;
    a->p = p;
    a->e = entry_of(db, st);
    a->values = apr_pcalloc(p, sizeof(*a->values)
                                 * (a->e->nplain + a->e->rows * a->e->ngroup + 1));
    a->row = -1;
    return a;
}

void mso_args_row(mso_args_t *a, int row)
{
    a->row = row;
}

/* The value of name, or NULL (a bug, recorded) when the statement does not
 * declare it with that type (0: any type). */
static value_t *slot_of(mso_args_t *a, const char *name, int type)
{
    int i = param_of(a->e, name, APR_HASH_KEY_STRING, a->row);

    if (i < 0 || (type && param_type(a->e, i) != type)) {
        if (!a->err) {
            a->err = i < 0
                ? apr_psprintf(a->p, a->row < 0 ? "it has no argument :%s"
                                                : "it has no argument :%s_%d", name, a->row)
                : apr_psprintf(a->p, "its argument %s is %s, bound as %s",
                               param_name(a->p, a->e, i),
                               type_name(param_type(a->e, i)), type_name(type));
        }
        return NULL;
    }
    return &a->values[i];
}

void mso_arg_text(mso_args_t *a, const char *name, const char *value)
{
    value_t *v = slot_of(a, name, T_TEXT);

    if (v) {
        v->set = 1;
        v->null = value == NULL;
        v->s = value;
    }
}

void mso_arg_int(mso_args_t *a, const char *name, apr_int64_t value)
{
    value_t *v = slot_of(a, name, T_INT);

    if (v) {
        v->set = 1;
        v->null = 0;
        v->i = value;
    }
}

void mso_arg_opt(mso_args_t *a, const char *name, apr_int64_t value)
{
    value_t *v = slot_of(a, name, T_INT);

    if (v) {
        v->set = 1;
        v->null = value == 0;
        v->i = value;
    }
}

void mso_arg_blob(mso_args_t *a, const char *name, const void *data, apr_size_t len)
{
    value_t *v = slot_of(a, name, T_BLOB);

    if (v) {
        v->set = 1;
        v->null = data == NULL;
        v->s = data;
        v->len = len;
    }
}

void mso_arg_null(mso_args_t *a, const char *name)
{
    value_t *v = slot_of(a, name, 0);

    if (v) {
        v->set = 1;
        v->null = 1;
    }
}

/* ------------------------------------------------------------------------- */
/* Running statements */

/* What a failed run says. */
typedef struct {
    apr_status_t rv;
    int rc;                 /* the driver's code, 0 for a binding bug */
    const char *bug;
} failure_t;

/* Runs a's statement, the driver working in pool. With rows, a select. */
static apr_status_t run(mso_args_t *a, apr_pool_t *pool, int *nrows, mso_rows_t **rows,
                        failure_t *f)
{
    mso_db_t *db = a->db;
    entry_t *e = a->e;
    apr_dbd_results_t *res = NULL;
    const void **vals;
    int i, k, rc = 0, n = 0, attempt;
    int wait_lock = db->kind == MSO_DB_SQLITE && !priv(db)->in_tx;
    apr_time_t until = wait_lock ? apr_time_now() + SQLITE_WRITE_WAIT : 0;

    memset(f, 0, sizeof(*f));
    if (nrows) {
        *nrows = 0;
    }
    if (rows) {
        *rows = NULL;
    }
    f->bug = e->bad ? e->bad : a->err;
    vals = apr_palloc(pool, sizeof(*vals) * (e->nvalues + 1));
    for (i = 0, k = 0; !f->bug && i < e->nslots; i++) {
        value_t *v = &a->values[e->slot_param[i]];
        int type = param_type(e, e->slot_param[i]);

        if (!v->set) {
            f->bug = apr_psprintf(pool, "its argument %s is not bound",
                                  param_name(pool, e, e->slot_param[i]));
        }
        if (type == T_BLOB) {
            vals[k++] = v->null ? NULL : v->s;
            vals[k++] = &v->len;
            vals[k++] = "";                 /* table and column: neither driver uses them */
            vals[k++] = "";
        }
        else {
            vals[k++] = v->null ? NULL : type == T_INT ? (const void *)&v->i
                                                       : (const void *)v->s;
        }
    }
    if (f->bug) {
        return f->rv = APR_EINVAL;
    }
again:
    for (attempt = 0; attempt < 2; attempt++) {
        if (!e->prepared) {
            rc = apr_dbd_prepare(db->driver, db->pool, db->handle, e->sql,
                                 prepare_label(db), &e->prepared);
            if (rc != 0) {
                e->prepared = NULL;
                if (prepare_again(db, rc) && may_run_again(db)) {
                    continue;
                }
                break;
            }
        }
        if (rows) {
            res = NULL;
            rc = apr_dbd_pbselect(db->driver, pool, db->handle, &res, e->prepared, 1, vals);
        }
        else {
            rc = apr_dbd_pbquery(db->driver, pool, db->handle, &n, e->prepared, vals);
        }
        if (rc == 0 || !prepare_again(db, rc)) {
            break;
        }
        /* The driver keeps the dead one until the connection closes. */
        e->prepared = NULL;
        if (!may_run_again(db)) {
            break;
        }
    }
    if (rc == SQLITE_BUSY_RC && wait_lock && apr_time_now() < until) {
        /* Outside a transaction, the driver gives up on another
         * connection's write lock after its own retries (about 3 s); a
         * writer in a transaction waits SQLITE_WRITE_WAIT in BEGIN
         * IMMEDIATE, and so does this one: another process storing batch
         * after batch (attachments) leaves the lock free only for moments.
         * Nothing was changed, so running it again is safe. */
        apr_sleep(apr_time_from_msec(10));
        goto again;
    }
    if (rc != 0) {
        f->rc = rc;
        return f->rv = APR_EGENERAL;
    }
    if (nrows) {
        *nrows = n;
    }
    if (rows) {
        *rows = apr_pcalloc(pool, sizeof(**rows));
        (*rows)->db = db;
        (*rows)->pool = pool;
        (*rows)->st = e->st;
        (*rows)->res = res;
    }
    return APR_SUCCESS;
}

/* The sentence for a failed run, in p. */
static const char *failure_text(mso_args_t *a, apr_pool_t *p, const failure_t *f,
                                const char *step, const char *about, int write)
{
    const char *what = step ? step : a->e->st->what;

    if (f->bug) {
        return apr_psprintf(p, "cannot %s%s%s: the statement is wrong, %s (a bug in "
                            "mod_msoauth)", what, about ? " " : "", about ? about : "", f->bug);
    }
    return sentence(a->db, p, f->rc, what, about, write);
}

static apr_status_t single(mso_args_t *a, int *nrows, mso_rows_t **rows, const char **err)
{
    failure_t f;
    const char *msg;

    if (err) {
        *err = NULL;
    }
    if (run(a, a->p, nrows, rows, &f) == APR_SUCCESS) {
        return APR_SUCCESS;
    }
    msg = failure_text(a, a->p, &f, NULL, NULL, rows == NULL);
    if (err) {
        *err = msg;
    }
    else {
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_ERR, f.rv, "mod_msoauth: %s", msg);
    }
    return f.rv;
}

apr_status_t mso_exec(mso_args_t *a, int *nrows, const char **err)
{
    return single(a, nrows, NULL, err);
}

apr_status_t mso_select(mso_args_t *a, mso_rows_t **rows, const char **err)
{
    return single(a, NULL, rows, err);
}

int mso_rows_next(mso_rows_t *r)
{
    if (!r || !r->res) {
        return 0;
    }
    /* pgsql reuses the row: hand it back each time. */
    if (apr_dbd_get_row(r->db->driver, r->pool, r->res, &r->row, -1) != 0) {
        r->res = NULL;
        r->row = NULL;
        return 0;
    }
    return 1;
}

static int column(mso_rows_t *r, const char *name)
{
    int i;

    if (!r->row) {
        return -1;
    }
    if (!r->names) {
        r->ncols = apr_dbd_num_cols(r->db->driver, r->res);
        r->names = apr_pcalloc(r->pool, sizeof(*r->names) * (r->ncols + 1));
        for (i = 0; i < r->ncols; i++) {
            r->names[i] = apr_dbd_get_name(r->db->driver, r->res, i);
        }
    }
    for (i = 0; i < r->ncols; i++) {
        if (r->names[i] && !strcmp(r->names[i], name)) {
            return i;
        }
    }
    mso_log_perror(MSO_LOG_MARK, MSO_LOG_ERR, APR_EINVAL, "mod_msoauth: the statement that "
                   "must %s has no column %s (a bug in mod_msoauth)", r->st->what, name);
    return -1;
}

const char *mso_col_text(mso_rows_t *r, apr_pool_t *p, const char *name)
{
    int col = column(r, name);
    char *v = NULL;

    if (col < 0 || apr_dbd_datum_get(r->db->driver, r->row, col, APR_DBD_TYPE_STRING, &v)
                   != APR_SUCCESS || !v) {
        return NULL;
    }
    return apr_pstrdup(p, v);
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

const unsigned char *mso_col_blob(mso_rows_t *r, apr_pool_t *p, const char *name,
                                  apr_size_t *len)
{
    int col = column(r, name);
    unsigned char *out = NULL;

    *len = 0;
    if (col < 0) {
        return NULL;
    }
    if (r->db->kind == MSO_DB_PGSQL) {
        /* The pgsql driver reads results as text: bytea comes as \x and hex. */
        const char *v = apr_dbd_get_entry(r->db->driver, r->row, col);
        apr_size_t n, i;

        if (!v || strncmp(v, "\\x", 2) || (n = strlen(v + 2)) % 2) {
            return NULL;
        }
        out = apr_palloc(p, n / 2 + 1);
        for (i = 0; i < n / 2; i++) {
            int hi = hexval(v[2 + 2 * i]), lo = hexval(v[3 + 2 * i]);

            if (hi < 0 || lo < 0) {
                return NULL;
            }
            out[i] = (unsigned char)(hi * 16 + lo);
        }
        *len = n / 2;
    }
    else {
        apr_bucket_alloc_t *ba = apr_bucket_alloc_create(p);
        apr_bucket_brigade *bb = apr_brigade_create(p, ba);
        apr_off_t n = 0;
        char *flat = NULL;
        apr_size_t got;

        if (apr_dbd_datum_get(r->db->driver, r->row, col, APR_DBD_TYPE_BLOB, bb)
            != APR_SUCCESS || apr_brigade_length(bb, 1, &n) != APR_SUCCESS || n < 0) {
            apr_brigade_destroy(bb);
            return NULL;
        }
        got = (apr_size_t)n;
        if (apr_brigade_pflatten(bb, &flat, &got, p) != APR_SUCCESS) {
            apr_brigade_destroy(bb);
            return NULL;
        }
        apr_brigade_destroy(bb);
        out = (unsigned char *)flat;
        *len = got;
    }
    return out ? out : (unsigned char *)"";
}

apr_int64_t mso_col_int(mso_rows_t *r, const char *name)
{
    int col = column(r, name);
    apr_int64_t v = 0;

    if (col < 0 || apr_dbd_datum_get(r->db->driver, r->row, col, APR_DBD_TYPE_LONGLONG, &v)
                   != APR_SUCCESS) {
        return 0;
    }
    return v;
}

apr_status_t mso_db_pragma(mso_db_t *db, apr_pool_t *p, const char *sql, const char **value,
                           const char **err)
{
    apr_dbd_results_t *res = NULL;
    apr_dbd_row_t *row = NULL;
    char *v = NULL;
    int rc;

    if (value) {
        *value = NULL;
    }
    /* apr_dbd_query counts a statement that answers a row as a failure. */
    rc = apr_dbd_select(db->driver, p, db->handle, &res, sql, 1);
    if (rc != 0) {
        *err = sentence(db, p, rc, apr_pstrcat(p, "run \"", sql, "\"", NULL), NULL, 1);
        return APR_EGENERAL;
    }
    while (apr_dbd_get_row(db->driver, p, res, &row, -1) == 0) {
        if (value && !*value
            && apr_dbd_datum_get(db->driver, row, 0, APR_DBD_TYPE_STRING, &v) == APR_SUCCESS
            && v) {
            *value = apr_pstrdup(p, v);
        }
    }
    return APR_SUCCESS;
}

/* ------------------------------------------------------------------------- */
/* Transactions */

static apr_pool_t *text_pool(mso_tx_t *tx)
{
    return tx->log_only ? tx->ptemp : tx->p;
}

mso_args_t *mso_tx_args(mso_tx_t *tx, const mso_stmt_t *st)
{
    return mso_args(tx->db, tx->ptemp, st);
}

static apr_status_t tx_run(mso_tx_t *tx, mso_args_t *a, int *nrows, mso_rows_t **rows)
{
    failure_t f;

    if (run(a, tx->ptemp, nrows, rows, &f) == APR_SUCCESS) {
        return APR_SUCCESS;
    }
    if (!tx->err) {
        tx->err = failure_text(a, text_pool(tx), &f, tx->step, tx->about, 1);
    }
    return f.rv;
}

apr_status_t mso_tx_exec(mso_tx_t *tx, mso_args_t *a, int *nrows)
{
    return tx_run(tx, a, nrows, NULL);
}

apr_status_t mso_tx_select(mso_tx_t *tx, mso_args_t *a, mso_rows_t **rows)
{
    return tx_run(tx, a, NULL, rows);
}

apr_status_t mso_tx_exec_sql(mso_tx_t *tx, const char *sql)
{
    int rc = raw(tx->db, sql);

    if (rc == 0) {
        return APR_SUCCESS;
    }
    if (!tx->err) {
        tx->err = sentence(tx->db, text_pool(tx), rc, tx->step ? tx->step : "change the schema",
                           tx->about, 1);
    }
    return APR_EGENERAL;
}

apr_status_t mso_tx_fail(mso_tx_t *tx, apr_status_t rv, const char *fmt, ...)
{
    va_list ap;

    if (!tx->err) {
        va_start(ap, fmt);
        tx->err = apr_pvsprintf(text_pool(tx), fmt, ap);
        va_end(ap);
    }
    return rv;
}

/* A failure of transaction control itself. */
static apr_status_t tx_failed(mso_tx_t *tx, int rc, const char *what)
{
    if (!tx->err) {
        tx->err = sentence(tx->db, text_pool(tx), rc, what, tx->about, 1);
    }
    return APR_EGENERAL;
}

/* mso_db_tx_lazy on SQLite: the statement that puts the connection's
 * synchronous setting back after the transaction. "" when there is nothing
 * to change: it syncs no more than NORMAL already, the setting cannot be
 * read, or the journal is not WAL (where NORMAL may, rarely, corrupt the
 * file at a power cut instead of only losing the last commits). */
static const char *sqlite_sync_level(mso_db_t *db, apr_pool_t *p)
{
    db_priv_t *d = priv(db);
    const char *v = NULL, *mode = NULL, *err = NULL;

    if (!d->sync_level) {
        d->sync_level = '1';
        if (mso_db_pragma(db, p, "PRAGMA journal_mode", &mode, &err) == APR_SUCCESS && mode
            && !strcmp(mode, "wal")
            && mso_db_pragma(db, p, "PRAGMA synchronous", &v, &err) == APR_SUCCESS && v
            && v[0] >= '0' && v[0] <= '3' && !v[1]) {
            d->sync_level = v[0];
        }
    }
    return d->sync_level > '1' ? apr_psprintf(p, "PRAGMA synchronous = %c", d->sync_level)
                               : "";
}

static apr_status_t tx_do(mso_db_t *db, apr_pool_t *p, const char *about, int lazy,
                          mso_tx_fn *fn, void *baton, const char **err)
{
    db_priv_t *d = priv(db);
    const char *restore = "";
    mso_tx_t tx;
    apr_status_t rv;
    int rc;

    memset(&tx, 0, sizeof(tx));
    tx.db = db;
    tx.p = p;
    tx.about = about;
    tx.log_only = err == NULL;
    apr_pool_create(&tx.ptemp, p);
    if (err) {
        *err = NULL;
    }
    if (d->in_tx) {
        rv = mso_tx_fail(&tx, APR_EGENERAL, "cannot start a transaction in %s: one is open "
                         "on this connection already (a bug in mod_msoauth)", mso_db_name(db));
        goto leave;
    }
    if (lazy && db->kind == MSO_DB_SQLITE) {
        /* Outside the transaction: SQLite refuses the change inside one. */
        restore = sqlite_sync_level(db, tx.ptemp);
        if (*restore && raw(db, "PRAGMA synchronous = NORMAL") != 0) {
            restore = "";
        }
    }
    if (db->kind == MSO_DB_SQLITE) {
        apr_time_t now = apr_time_now();

        if (!d->tx_ended || now - d->tx_ended > SQLITE_BACK_TO_BACK) {
            d->run_since = now;
        }
        else if (now - d->run_since > SQLITE_YIELD_EVERY) {
            apr_sleep(SQLITE_YIELD);
            d->run_since = apr_time_now();
        }
    }
    rc = raw(db, db->kind == MSO_DB_SQLITE ? "BEGIN IMMEDIATE" : "BEGIN");
    if (rc == SQLITE_BUSY_RC && db->kind == MSO_DB_SQLITE) {
        apr_time_t until = apr_time_now() + SQLITE_WRITE_WAIT;

        while (rc == SQLITE_BUSY_RC && apr_time_now() < until) {
            apr_sleep(apr_time_from_msec(10));
            rc = raw(db, "BEGIN IMMEDIATE");
        }
    }
    if (rc != 0) {
        rv = tx_failed(&tx, rc, "start a transaction");
        goto leave;
    }
    d->in_tx = 1;
    if (lazy && db->kind == MSO_DB_PGSQL
        && (rc = raw(db, "SET LOCAL synchronous_commit = off")) != 0) {
        /* Ends with the transaction; a failure has aborted it. */
        rv = tx_failed(&tx, rc, "turn off synchronous_commit for a transaction");
    }
    else {
        rv = fn(&tx, baton);
    }
    if (rv == APR_SUCCESS) {
        rc = raw(db, "COMMIT");
        if (rc != 0) {
            rv = tx_failed(&tx, rc, "commit the changes");
        }
    }
    if (rv != APR_SUCCESS) {
        rc = raw(db, "ROLLBACK");
        if (rc != 0) {
            mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, APR_EGENERAL,
                           "mod_msoauth: rolling back a transaction in %s failed: %s",
                           mso_db_name(db), driver_error(db, tx.ptemp, rc));
        }
    }
    d->in_tx = 0;
    d->tx_ended = apr_time_now();

leave:
    if (*restore && raw(db, restore) != 0) {
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_ERR, APR_EGENERAL,
                       "mod_msoauth: \"%s\" failed on %s: this connection's commits no "
                       "longer wait for the disk", restore, mso_db_name(db));
    }
    if (err) {
        *err = tx.err;
    }
    else if (tx.err) {
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_ERR, rv, "mod_msoauth: %s", tx.err);
    }
    apr_pool_destroy(tx.ptemp);
    return rv;
}

apr_status_t mso_db_tx(mso_db_t *db, apr_pool_t *p, const char *about, mso_tx_fn *fn,
                       void *baton, const char **err)
{
    return tx_do(db, p, about, 0, fn, baton, err);
}

apr_status_t mso_db_tx_lazy(mso_db_t *db, apr_pool_t *p, const char *about, mso_tx_fn *fn,
                            void *baton, const char **err)
{
    return tx_do(db, p, about, 1, fn, baton, err);
}

/* ------------------------------------------------------------------------- */
/* Leases */

typedef struct {
    apr_array_header_t *candidates;
    mso_args_t *take;
    apr_array_header_t *won;
} claim_t;

static apr_status_t take_each(mso_tx_t *tx, void *baton)
{
    claim_t *c = baton;
    apr_status_t rv = APR_SUCCESS;
    int i, n;

    for (i = 0; i < c->candidates->nelts; i++) {
        apr_int64_t id = APR_ARRAY_IDX(c->candidates, i, apr_int64_t);

        mso_arg_int(c->take, "id", id);
        if (!MSO_OK(mso_tx_exec(tx, c->take, &n))) {
            break;
        }
        if (n == 1) {
            APR_ARRAY_PUSH(c->won, apr_int64_t) = id;
        }
        /* n == 0: another process or node was faster */
    }
    return rv;
}

apr_status_t mso_db_claim(mso_db_t *db, apr_pool_t *p, mso_args_t *find, mso_args_t *take,
                          apr_array_header_t **ids, const char **err)
{
    mso_rows_t *rows = NULL;
    claim_t c;
    apr_status_t rv;

    *ids = apr_array_make(p, 16, sizeof(apr_int64_t));
    if (!MSO_OK(mso_select(find, &rows, err))) {
        return rv;
    }
    c.candidates = apr_array_make(find->p, 16, sizeof(apr_int64_t));
    while (mso_rows_next(rows)) {
        APR_ARRAY_PUSH(c.candidates, apr_int64_t) = mso_col_int(rows, "id");
    }
    if (!c.candidates->nelts) {
        return APR_SUCCESS;
    }
    /* One transaction for the whole batch: one disk sync (and on SQLite one
     * wait for the write lock) instead of one per row; the conditions of
     * each take still decide who gets the row. */
    c.take = take;
    c.won = *ids;
    rv = mso_db_tx(db, p, NULL, take_each, &c, err);
    if (rv != APR_SUCCESS) {
        (*ids)->nelts = 0;
    }
    return rv;
}

/* ------------------------------------------------------------------------- */

apr_status_t mso_db_wrap(apr_pool_t *p, const apr_dbd_driver_t *driver, apr_dbd_t *handle,
                         mso_db_t **db)
{
    db_priv_t *d;
    const char *name, *err = NULL;
    char key[64];
    void *found = NULL;
    mso_db_kind_e kind;

    *db = NULL;
    name = apr_dbd_name(driver);
    if (name && !strcmp(name, "sqlite3")) {
        kind = MSO_DB_SQLITE;
    }
    else if (name && !strcmp(name, "pgsql")) {
        kind = MSO_DB_PGSQL;
    }
    else {
        return APR_ENOTIMPL;
    }

    /* p does not outlive handle (it is the wrapper's lifetime), so a wrapper
     * found here for this handle is for this very connection: reuse it and
     * its prepared statements. */
    apr_snprintf(key, sizeof(key), "mso_db:%pp", (void *)handle);
    apr_pool_userdata_get(&found, key, p);
    if (found) {
        d = found;
        if (d->pub.driver == driver) {
            *db = &d->pub;
            return APR_SUCCESS;
        }
    }

    d = apr_pcalloc(p, sizeof(*d));
    d->pub.pool = p;
    d->pub.driver = driver;
    d->pub.handle = handle;
    d->pub.kind = kind;
    d->stmts = apr_hash_make(p);
    d->number = apr_atomic_inc32(&wrappers_made) + 1;
    apr_pool_userdata_set(d, apr_pstrdup(p, key), NULL, p);

    if (kind == MSO_DB_SQLITE) {
        apr_pool_t *tmp;

        apr_pool_create(&tmp, p);
        if (mso_db_pragma(&d->pub, tmp, "PRAGMA busy_timeout = " SQLITE_BUSY_MS, NULL, &err)
            != APR_SUCCESS
            || mso_db_pragma(&d->pub, tmp, "PRAGMA foreign_keys = ON", NULL, &err)
               != APR_SUCCESS
            || mso_db_pragma(&d->pub, tmp, "PRAGMA wal_autocheckpoint = "
                             SQLITE_CHECKPOINT_PAGES, NULL, &err) != APR_SUCCESS) {
            mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, APR_EGENERAL,
                           "mod_msoauth: cannot set up the SQLite connection: %s", err);
        }
        apr_pool_destroy(tmp);
    }
    *db = &d->pub;
    return APR_SUCCESS;
}
