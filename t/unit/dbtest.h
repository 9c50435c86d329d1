/* What the database tests share (test_db, test_schema, test_account,
 * test_mirror): every test runs once on SQLite (a temporary file) and once on
 * PostgreSQL (MSO_TEST_PGSQL, the apr_dbd params of a cluster started by
 * t/pgcluster.sh). */
#ifndef MSO_DBTEST_H
#define MSO_DBTEST_H

#include <check.h>

#include <apr_dbd.h>
#include <apr_pools.h>

#include "mso_account.h"
#include "mso_db.h"
#include "mso_schema.h"

#define BACKEND_SQLITE 0
#define BACKEND_PGSQL 1

extern apr_pool_t *pool;            /* the test's, destroyed by teardown */
extern char sqlite_path[128];       /* the test's SQLite file */

void dbtest_setup(void);
void dbtest_teardown(void);

/* A new connection of its own (each forked process needs one), closed with
 * p; the wrapper lives in a subpool of p. */
mso_db_t *connect_db(int backend, apr_pool_t *p);
/* A clean database for the test: the SQLite file is new; on PostgreSQL the
 * tables of an earlier test are dropped. */
mso_db_t *fresh_db(int backend);

void exec_ok(mso_db_t *db, const char *sql);
/* A select without values: 0 and the first column as a number, or the
 * driver's code. */
int select_num(mso_db_t *db, const char *sql, long long *value);
long long num(mso_db_t *db, const char *sql);
/* The first column of the first row as text (NULL for SQL NULL or no row). */
const char *text_of(mso_db_t *db, const char *sql);
/* A prepared statement with binary args (apr_dbd's %s/%lld), run once. */
int pexec(mso_db_t *db, const char *sql, const void **args);

void migrate_ok(mso_db_t *db);

/* A sign-in for company and mailbox: object oid of tenant T, client ID C. */
mso_connect_t sample(const char *company, const char *mailbox, const char *oid);

/* Connects with tokens stored as given (no sealing). */
mso_account_t *connect_ok(mso_db_t *db, const mso_connect_t *c, const char *refresh,
                          const char *access, apr_int64_t now);
apr_status_t connect_raw(mso_db_t *db, const mso_connect_t *c, const char *refresh,
                         const char *access, apr_int64_t now, mso_account_t **acct,
                         const char **err);
void token_is(mso_db_t *db, apr_int64_t id, const char *kind, const char *sealed,
              apr_int64_t expires);
mso_account_t *get_ok(mso_db_t *db, apr_int64_t id);

/* The process's size (/proc/self/statm: mapped memory, where APR's
 * allocator takes pool memory from) plus the heap in use (mallinfo2, where
 * SQLite keeps its statements). Only its growth means anything. */
long long memory_in_use(void);
/* Under AddressSanitizer freed memory is quarantined, not reused: growth
 * says nothing there. */
#if defined(__SANITIZE_ADDRESS__)
#define MEMORY_MEASURABLE 0
#else
#define MEMORY_MEASURABLE 1
#endif

/* Adds every backend's run of a test to tc (loop over _i). */
#define ADD_BOTH(tc, t, backend) tcase_add_loop_test(tc, t, backend, (backend) + 1)

/* The test programs' main: a "sqlite" and a "pgsql" case from add_tests. */
int dbtest_main(const char *suite, void (*add_tests)(TCase *tc, int backend));

#endif
