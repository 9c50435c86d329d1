/* The schema: the ordered list of migrations, and running it. */
#ifndef MSO_SCHEMA_H
#define MSO_SCHEMA_H

#include <apr_pools.h>
#include <apr_errno.h>

#include "mso_db.h"

/* The schema version this build writes. */
int mso_schema_latest(void);

/* The version found in the database, 0 when no schema exists yet. *err: a
 * sentence in p on failure. */
apr_status_t mso_schema_version(mso_db_t *db, apr_pool_t *p, int *version, const char **err);

/* Brings the schema to the latest version: creates the tables on an empty
 * database, applies each missing migration in order, in one transaction,
 * serialized against other processes/nodes doing the same (PostgreSQL advisory
 * lock; SQLite BEGIN IMMEDIATE). Running it again is a no-op. A database newer
 * than this build is refused (APR_EGENERAL, *err says so). *err, when set, is a
 * sentence in p for the administrator with the database's own message. */
apr_status_t mso_schema_migrate(mso_db_t *db, apr_pool_t *p, int *from_version,
                                int *to_version, const char **err);

/* The same, up to version only (tests build older schemas with it). */
apr_status_t mso_schema_migrate_to(mso_db_t *db, apr_pool_t *p, int version,
                                   int *from_version, int *to_version, const char **err);

#endif
