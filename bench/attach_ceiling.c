/* Reference ceilings for bench/attach_bench.py: how fast attachment bytes go
 * into the same database when written plainly, and through the module's own
 * storage path without HTTP. Built and run by attach_bench.py (not by make):
 *
 *   cc -O2 -Ilib -Ibuild/release bench/attach_ceiling.c build/release/.libs/libmso.a \
 *      $(pkg-config --cflags --libs apr-1 apr-util-1 libcurl jansson libcrypto)
 *
 *   attach_ceiling DRIVER PARAMS COUNT SIZE MODE
 *       Writes COUNT contents of SIZE random bytes (each different), one
 *       transaction each, as the job stores them, timed from the first to the
 *       last:
 *         plain  a prepared INSERT into msoauth_attach_ceiling, a table of the
 *                shape of msoauth_attachments (same key, same storage),
 *                created here and dropped at the end
 *         store  lib's mso_attach_store_content (fence, UPDATE of a pending
 *                row, commit) into msoauth_attachments, for an account leased
 *                to owner "ceiling" created here (and deleted at the end)
 *
 * Prints one JSON object on stdout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <apr_general.h>
#include <apr_pools.h>
#include <apr_strings.h>
#include <apr_time.h>
#include <apr_dbd.h>

#include "mso_attach.h"
#include "mso_crypto.h"
#include "mso_db.h"
#include "mso_schema.h"

static void run_sql(mso_db_t *db, apr_pool_t *p, const char *sql)
{
    int n = 0, rc = apr_dbd_query(db->driver, db->handle, &n, sql);

    if (rc != 0) {
        fprintf(stderr, "attach_ceiling: %s: %s\n", sql, apr_dbd_error(db->driver, db->handle, rc));
        exit(2);
    }
    (void)p;
}

int main(int argc, char **argv)
{
    const apr_dbd_driver_t *drv = NULL;
    apr_dbd_t *handle = NULL;
    apr_pool_t *p, *it;
    mso_db_t *db = NULL;
    const char *mode;
    unsigned char *data;
    apr_size_t size;
    apr_time_t t0, t1;
    apr_int64_t id = 990001, now = apr_time_sec(apr_time_now());
    int count, i;

    if (argc != 6) {
        fprintf(stderr, "usage: attach_ceiling DRIVER PARAMS COUNT SIZE plain|store\n");
        return 2;
    }
    count = atoi(argv[3]);
    size = (apr_size_t)atol(argv[4]);
    mode = argv[5];
    apr_initialize();
    apr_pool_create(&p, NULL);
    apr_dbd_init(p);
    if (apr_dbd_get_driver(p, argv[1], &drv) != APR_SUCCESS
        || apr_dbd_open(drv, p, argv[2], &handle) != APR_SUCCESS
        || mso_db_wrap(p, drv, handle, &db) != APR_SUCCESS) {
        fprintf(stderr, "attach_ceiling: cannot open the database\n");
        return 2;
    }
    {
        int from = 0, to = 0;
        const char *err = NULL;

        /* The bench runs it on the module's database: nothing to do there. */
        if (mso_schema_migrate(db, p, &from, &to, &err) != APR_SUCCESS) {
            fprintf(stderr, "attach_ceiling: schema: %s\n", err ? err : "?");
            return 2;
        }
    }
    data = malloc(size + 8);
    mso_random_bytes(data, size + 8);
    if (!strcmp(mode, "plain")) {
        static const mso_stmt_t ins = {
            "insert", "account_id:int graph_id:text attachment_id:text content:blob now:int",
            "INSERT INTO msoauth_attach_ceiling (account_id, graph_id, attachment_id, kind, "
            "content, state, fetched_at, updated_at) VALUES (:account_id, :graph_id, "
            ":attachment_id, 'file', :content, 'stored', :now, :now)", NULL
        };

        run_sql(db, p, "CREATE TABLE msoauth_attach_ceiling (account_id BIGINT NOT NULL, "
                       "graph_id TEXT NOT NULL, attachment_id TEXT NOT NULL, kind TEXT NOT NULL, "
                       "content BYTEA, state TEXT NOT NULL, fetched_at BIGINT, "
                       "updated_at BIGINT NOT NULL, "
                       "PRIMARY KEY (account_id, graph_id, attachment_id))");
        if (db->kind == MSO_DB_PGSQL) {
            run_sql(db, p, "ALTER TABLE msoauth_attach_ceiling ALTER COLUMN content "
                           "SET STORAGE EXTERNAL");
        }
        t0 = apr_time_now();
        for (i = 0; i < count; i++) {
            mso_args_t *a;

            apr_pool_create(&it, p);
            data[i % 8] ^= (unsigned char)(i + 1);      /* each content differs */
            run_sql(db, it, db->kind == MSO_DB_SQLITE ? "BEGIN IMMEDIATE" : "BEGIN");
            a = mso_args(db, it, &ins);
            mso_arg_int(a, "account_id", id);
            mso_arg_text(a, "graph_id", apr_psprintf(it, "M%d", i));
            mso_arg_text(a, "attachment_id", "A");
            mso_arg_blob(a, "content", data + i % 8, size);
            mso_arg_int(a, "now", now);
            if (mso_exec(a, NULL, NULL) != APR_SUCCESS) {
                return 2;
            }
            run_sql(db, it, "COMMIT");
            apr_pool_destroy(it);
        }
        t1 = apr_time_now();
        run_sql(db, p, "DROP TABLE msoauth_attach_ceiling");
    }
    else {
        run_sql(db, p, apr_psprintf(p, "INSERT INTO msoauth_accounts (id, company, mailbox, "
                                    "state, created_at, updated_at, work_owner, work_until) "
                                    "VALUES (%" APR_INT64_T_FMT ", 'ceiling', "
                                    "'ceiling@example.com', 'disconnected', 1, 1, 'ceiling', "
                                    "%" APR_INT64_T_FMT ")", id, now + 86400));
        run_sql(db, p, "BEGIN");
        for (i = 0; i < count; i++) {
            run_sql(db, p, apr_psprintf(p, "INSERT INTO msoauth_messages (account_id, "
                                        "graph_id, folder, updated_at) VALUES (%"
                                        APR_INT64_T_FMT ", 'M%d', 'inbox', 1)", id, i));
            run_sql(db, p, apr_psprintf(p, "INSERT INTO msoauth_attachments (account_id, "
                                        "graph_id, attachment_id, kind, state, size, "
                                        "last_modified, updated_at) VALUES (%" APR_INT64_T_FMT
                                        ", 'M%d', 'A', 'file', 'pending', %lu, 't', 1)", id, i,
                                        (unsigned long)size));
        }
        run_sql(db, p, "COMMIT");
        t0 = apr_time_now();
        for (i = 0; i < count; i++) {
            const char *err = NULL;
            int stored = 0;

            apr_pool_create(&it, p);
            data[i % 8] ^= (unsigned char)(i + 1);
            if (mso_attach_store_content(db, it, "ceiling", id, apr_psprintf(it, "M%d", i), "A",
                                         "t", data + i % 8, size, now, &stored, &err)
                != APR_SUCCESS || !stored) {
                fprintf(stderr, "attach_ceiling: store: %s\n", err ? err : "not stored");
                return 2;
            }
            apr_pool_destroy(it);
        }
        t1 = apr_time_now();
        run_sql(db, p, apr_psprintf(p, "DELETE FROM msoauth_attachments WHERE account_id = %"
                                    APR_INT64_T_FMT, id));
        run_sql(db, p, apr_psprintf(p, "DELETE FROM msoauth_messages WHERE account_id = %"
                                    APR_INT64_T_FMT, id));
        run_sql(db, p, apr_psprintf(p, "DELETE FROM msoauth_accounts WHERE id = %"
                                    APR_INT64_T_FMT, id));
    }
    printf("{\"mode\": \"%s\", \"count\": %d, \"size\": %lu, \"seconds\": %.3f, "
           "\"bytes_per_s\": %.0f}\n", mode, count, (unsigned long)size,
           (double)(t1 - t0) / APR_USEC_PER_SEC,
           (double)count * (double)size / ((double)(t1 - t0) / APR_USEC_PER_SEC));
    free(data);
    apr_pool_destroy(p);
    apr_terminate();
    return 0;
}
