/* Reference ceilings for bench/sync_bench.py: how fast one core can parse
 * Graph delta pages, and how fast the same rows go into the same database
 * when inserted plainly. Built and run by sync_bench.py (not by make):
 *
 *   cc -O2 -Ilib -Ibuild/release bench/ceiling.c build/release/.libs/libmso.a \
 *      $(pkg-config --cflags --libs apr-1 apr-util-1 libcurl jansson libcrypto)
 *
 *   ceiling parse  PAGEDIR SECONDS
 *       Loads every *.json page of PAGEDIR (delta pages saved from the
 *       simulator, exactly as the module receives them) and parses them again
 *       and again for at least SECONDS, each page in a fresh pool: once with
 *       lib's mso_graph_parse_page (jansson plus the field extraction the
 *       module does), once with jansson's json_loadb alone.
 *
 *   ceiling insert DRIVER PARAMS PAGEDIR ACCOUNT_IDS MODE
 *       Parses the pages once (not timed), then inserts their entries once
 *       per account id (comma separated), timed from the first row to the
 *       last:
 *         single  prepared one-row INSERT, BEGIN/COMMIT around every 100 rows
 *         multi   prepared 100-row INSERT, one statement (and transaction)
 *                 per 100 rows
 *         upsert50, upsert50-unnamed
 *                 for diagnosis: the module's statement shape, two 50-row
 *                 INSERT ... ON CONFLICT DO UPDATE per transaction, prepared
 *                 named (server-side) or unnamed (as the module prepares them:
 *                 apr_dbd_pgsql then sends the SQL text with every execution)
 *       both into msoauth_ceiling, a table of the same shape as
 *       msoauth_messages (same columns, UNIQUE (account_id, graph_id), the
 *       same two indexes and the same foreign key), created here and dropped
 *       at the end. PostgreSQL statements are named (server-side prepared),
 *       as a plain importer would prepare them.
 *         apply   the module's own storage path, lib's mso_mirror_apply_page
 *                 page after page (fence, 50-row upserts, cursor, commit),
 *                 into msoauth_messages for accounts the caller leased to
 *                 owner "ceiling".
 *
 * Each run prints one JSON object on stdout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>

#include <apr_general.h>
#include <apr_pools.h>
#include <apr_strings.h>
#include <apr_tables.h>
#include <apr_time.h>
#include <apr_dbd.h>
#include <jansson.h>

#include "mso_graph.h"
#include "mso_mirror.h"
#include "mso_db.h"

#define COLS 20
#define MULTI_ROWS 100
#define TX_ROWS 100

typedef struct {
    const char *body;
    apr_size_t len;
} page_file_t;

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static apr_array_header_t *load_pages(apr_pool_t *p, const char *dir)
{
    apr_array_header_t *names = apr_array_make(p, 256, sizeof(const char *));
    apr_array_header_t *pages = apr_array_make(p, 256, sizeof(page_file_t));
    struct dirent *de;
    DIR *d = opendir(dir);
    int i;

    if (!d) {
        fprintf(stderr, "ceiling: cannot open %s\n", dir);
        exit(2);
    }
    while ((de = readdir(d)) != NULL) {
        size_t n = strlen(de->d_name);

        if (n > 5 && !strcmp(de->d_name + n - 5, ".json")) {
            APR_ARRAY_PUSH(names, const char *) = apr_pstrdup(p, de->d_name);
        }
    }
    closedir(d);
    qsort(names->elts, names->nelts, sizeof(const char *), cmp_names);
    for (i = 0; i < names->nelts; i++) {
        const char *path = apr_pstrcat(p, dir, "/", APR_ARRAY_IDX(names, i, const char *), NULL);
        FILE *f = fopen(path, "rb");
        page_file_t *pf = apr_array_push(pages);
        long n;
        char *buf;

        if (!f || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0) {
            fprintf(stderr, "ceiling: cannot read %s\n", path);
            exit(2);
        }
        rewind(f);
        buf = apr_palloc(p, (apr_size_t)n + 1);
        if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
            fprintf(stderr, "ceiling: short read on %s\n", path);
            exit(2);
        }
        buf[n] = '\0';
        fclose(f);
        pf->body = buf;
        pf->len = (apr_size_t)n;
    }
    if (!pages->nelts) {
        fprintf(stderr, "ceiling: no *.json pages in %s\n", dir);
        exit(2);
    }
    return pages;
}

/* ------------------------------------------------------------------------- */

static int run_parse(apr_pool_t *p, const char *dir, double min_seconds)
{
    apr_array_header_t *pages = load_pages(p, dir);
    apr_int64_t entries = 0, bytes = 0, jentries = 0;
    apr_time_t t0, t;
    double secs, jsecs;
    int i, passes = 0, jpasses = 0;

    /* lib's parser: what the module runs on every page. */
    t0 = apr_time_now();
    do {
        for (i = 0; i < pages->nelts; i++) {
            page_file_t *pf = &APR_ARRAY_IDX(pages, i, page_file_t);
            mso_graph_page_t page;
            const char *err = NULL;
            apr_pool_t *pp;

            apr_pool_create(&pp, p);
            if (mso_graph_parse_page(pp, pf->body, pf->len, &page, &err) != APR_SUCCESS) {
                fprintf(stderr, "ceiling: page %d: %s\n", i, err ? err : "?");
                return 1;
            }
            entries += page.items->nelts;
            bytes += (apr_int64_t)pf->len;
            apr_pool_destroy(pp);
        }
        passes++;
        t = apr_time_now();
    } while ((double)(t - t0) / APR_USEC_PER_SEC < min_seconds);
    secs = (double)(t - t0) / APR_USEC_PER_SEC;

    /* jansson alone: the floor under it. */
    t0 = apr_time_now();
    do {
        for (i = 0; i < pages->nelts; i++) {
            page_file_t *pf = &APR_ARRAY_IDX(pages, i, page_file_t);
            json_error_t jerr;
            json_t *j = json_loadb(pf->body, pf->len, 0, &jerr);

            if (!j) {
                fprintf(stderr, "ceiling: page %d: %s\n", i, jerr.text);
                return 1;
            }
            jentries += (apr_int64_t)json_array_size(json_object_get(j, "value"));
            json_decref(j);
        }
        jpasses++;
        t = apr_time_now();
    } while ((double)(t - t0) / APR_USEC_PER_SEC < min_seconds);
    jsecs = (double)(t - t0) / APR_USEC_PER_SEC;

    printf("{\"pages\": %d, \"passes\": %d, \"entries\": %" APR_INT64_T_FMT ", \"seconds\": %.3f, "
           "\"entries_per_s\": %.0f, \"mb_per_s\": %.1f, \"jansson_entries_per_s\": %.0f}\n",
           pages->nelts, passes, entries, secs, entries / secs, bytes / secs / 1e6,
           jentries / jsecs);
    (void)jpasses;
    return 0;
}

/* ------------------------------------------------------------------------- */

static const apr_dbd_driver_t *drv;
static apr_dbd_t *dbh;
static int is_pg;

static void die_db(const char *what, int rc)
{
    fprintf(stderr, "ceiling: %s: %s\n", what, apr_dbd_error(drv, dbh, rc));
    exit(1);
}

static void exec_sql(const char *sql)
{
    int n = 0, rc = apr_dbd_query(drv, dbh, &n, sql);

    if (rc != 0) {
        die_db(sql, rc);
    }
}

static void pragma(apr_pool_t *p, const char *sql)
{
    apr_dbd_results_t *res = NULL;
    apr_dbd_row_t *row = NULL;
    int rc = apr_dbd_select(drv, p, dbh, &res, sql, 1);

    if (rc != 0) {
        die_db(sql, rc);
    }
    while (apr_dbd_get_row(drv, p, res, &row, -1) == 0) {
    }
}

static const char *INSERT_HEAD =
    "INSERT INTO msoauth_ceiling (account_id, graph_id, folder, internet_message_id, "
    "conversation_id, subject, from_address, from_name, to_json, received_at, is_read, "
    "has_attachments, importance, body_preview, body_type, body, web_link, updated_at, "
    "sync_round, removed) VALUES ";
static const char *ROW_FMT =
    "(%lld, %s, %s, %s, %s, %s, %s, %s, %s, %lld, %d, %d, %s, %s, %s, %s, %s, %lld, %d, %d)";

static void create_table(void)
{
    const char *id = is_pg ? "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
                           : "id INTEGER PRIMARY KEY AUTOINCREMENT";
    char sql[2048];

    exec_sql("DROP TABLE IF EXISTS msoauth_ceiling");
    snprintf(sql, sizeof(sql),
             "CREATE TABLE msoauth_ceiling (%s, "
             "account_id BIGINT NOT NULL REFERENCES msoauth_accounts (id) ON DELETE CASCADE, "
             "graph_id TEXT NOT NULL, folder TEXT NOT NULL, internet_message_id TEXT, "
             "conversation_id TEXT, subject TEXT, from_address TEXT, from_name TEXT, "
             "to_json TEXT, received_at BIGINT, is_read INTEGER NOT NULL DEFAULT 0, "
             "has_attachments INTEGER NOT NULL DEFAULT 0, importance TEXT, body_preview TEXT, "
             "body_type TEXT, body TEXT, web_link TEXT, removed INTEGER NOT NULL DEFAULT 0, "
             "updated_at BIGINT NOT NULL, sync_round INTEGER NOT NULL DEFAULT 0, "
             "UNIQUE (account_id, graph_id))", id);
    exec_sql(sql);
    exec_sql("CREATE INDEX msoauth_ceiling_recent ON msoauth_ceiling "
             "(account_id, folder, received_at)");
    exec_sql("CREATE INDEX msoauth_ceiling_folder ON msoauth_ceiling "
             "(account_id, folder, removed, sync_round)");
}

typedef struct {
    apr_int64_t account_id, received_at, now;
    int is_read, has_att, round, removed;
    const mso_graph_msg_t *m;
} row_t;

static void row_args(const void **a, row_t *r)
{
    const mso_graph_msg_t *m = r->m;

    r->received_at = m->received_at;
    r->is_read = m->is_read > 0;
    r->has_att = m->has_attachments > 0;
    r->round = 1;
    r->removed = 0;
    a[0] = &r->account_id;
    a[1] = m->graph_id;
    a[2] = "inbox";
    a[3] = m->internet_message_id;
    a[4] = m->conversation_id;
    a[5] = m->subject;
    a[6] = m->from_address;
    a[7] = m->from_name;
    a[8] = m->to_json;
    a[9] = m->received_at >= 0 ? (const void *)&r->received_at : NULL;
    a[10] = &r->is_read;
    a[11] = &r->has_att;
    a[12] = m->importance;
    a[13] = m->body_preview;
    a[14] = m->body_type;
    a[15] = m->body;
    a[16] = m->web_link;
    a[17] = &r->now;
    a[18] = &r->round;
    a[19] = &r->removed;
}

/* The module's conflict clause (lib/mso_mirror.c), for the upsert modes. */
static const char *UPSERT_TAIL =
    " ON CONFLICT (account_id, graph_id) DO UPDATE SET folder = excluded.folder, "
    "internet_message_id = excluded.internet_message_id, "
    "conversation_id = excluded.conversation_id, subject = excluded.subject, "
    "from_address = excluded.from_address, from_name = excluded.from_name, "
    "to_json = excluded.to_json, received_at = excluded.received_at, "
    "is_read = excluded.is_read, has_attachments = excluded.has_attachments, "
    "importance = excluded.importance, body_preview = excluded.body_preview, "
    "body_type = excluded.body_type, body = excluded.body, web_link = excluded.web_link, "
    "removed = 0, updated_at = excluded.updated_at, sync_round = excluded.sync_round";

/* An n-row INSERT (upsert: with the module's ON CONFLICT clause). named: a
 * server-side prepared statement on PostgreSQL; unnamed, apr_dbd_pgsql sends
 * the text with every execution (PQexecParams), as the module's statements. */
static apr_dbd_prepared_t *prepare_rows(apr_pool_t *p, int n, int upsert, int named)
{
    apr_array_header_t *parts = apr_array_make(p, n + 2, sizeof(const char *));
    apr_dbd_prepared_t *st = NULL;
    const char *label = is_pg && named ? apr_psprintf(p, "ceiling_%d_%d", n, upsert) : NULL;
    int i, rc;

    APR_ARRAY_PUSH(parts, const char *) = INSERT_HEAD;
    for (i = 0; i < n; i++) {
        APR_ARRAY_PUSH(parts, const char *) = i ? apr_pstrcat(p, ", ", ROW_FMT, NULL) : ROW_FMT;
    }
    if (upsert) {
        APR_ARRAY_PUSH(parts, const char *) = UPSERT_TAIL;
    }
    rc = apr_dbd_prepare(drv, p, dbh, apr_array_pstrcat(p, parts, 0), label, &st);
    if (rc != 0) {
        die_db("prepare", rc);
    }
    return st;
}

static int run_insert(apr_pool_t *p, const char *driver, const char *params, const char *dir,
                      const char *accounts, const char *mode)
{
    apr_array_header_t *pages = load_pages(p, dir), *parsed, *ids;
    const mso_graph_msg_t **msgs;
    const char *err = NULL;
    apr_int64_t now = apr_time_sec(apr_time_now());
    apr_time_t t0, t1;
    char *acc, *last;
    int i, j, k, n = 0, total, rc, nrows;

    if (apr_dbd_init(p) != APR_SUCCESS || apr_dbd_get_driver(p, driver, &drv) != APR_SUCCESS
        || apr_dbd_open_ex(drv, p, params, &dbh, &err) != APR_SUCCESS) {
        fprintf(stderr, "ceiling: cannot open %s: %s\n", driver, err ? err : "?");
        return 1;
    }
    is_pg = !strcmp(driver, "pgsql");
    if (!is_pg) {
        /* As the module's connections: wait for locks, enforce the foreign key. */
        pragma(p, "PRAGMA busy_timeout = 10000");
        pragma(p, "PRAGMA foreign_keys = ON");
    }

    /* Parsed once, not timed: the rows of every page in order. */
    parsed = apr_array_make(p, pages->nelts, sizeof(mso_graph_page_t));
    for (i = 0; i < pages->nelts; i++) {
        page_file_t *pf = &APR_ARRAY_IDX(pages, i, page_file_t);
        mso_graph_page_t *pg = apr_array_push(parsed);

        if (mso_graph_parse_page(p, pf->body, pf->len, pg, &err) != APR_SUCCESS) {
            fprintf(stderr, "ceiling: page %d: %s\n", i, err);
            return 1;
        }
        n += pg->items->nelts;
    }
    msgs = apr_palloc(p, sizeof(*msgs) * (n ? n : 1));
    for (i = 0, k = 0; i < parsed->nelts; i++) {
        mso_graph_page_t *pg = &APR_ARRAY_IDX(parsed, i, mso_graph_page_t);

        for (j = 0; j < pg->items->nelts; j++) {
            msgs[k++] = &APR_ARRAY_IDX(pg->items, j, mso_graph_msg_t);
        }
    }
    ids = apr_array_make(p, 8, sizeof(apr_int64_t));
    for (acc = apr_strtok(apr_pstrdup(p, accounts), ",", &last); acc;
         acc = apr_strtok(NULL, ",", &last)) {
        APR_ARRAY_PUSH(ids, apr_int64_t) = apr_atoi64(acc);
    }
    total = n * ids->nelts;

    if (!strcmp(mode, "apply")) {
        mso_db_t *db;
        apr_array_header_t *folders = apr_array_make(p, 1, sizeof(const char *)), *fs = NULL;

        if (mso_db_wrap(p, drv, dbh, &db) != APR_SUCCESS) {
            fprintf(stderr, "ceiling: mso_db_wrap failed\n");
            return 1;
        }
        APR_ARRAY_PUSH(folders, const char *) = "inbox";
        t0 = apr_time_now();
        for (k = 0; k < ids->nelts; k++) {
            apr_int64_t id = APR_ARRAY_IDX(ids, k, apr_int64_t);
            mso_folder_t *f;

            if (mso_mirror_folders(db, p, id, folders, &fs) != APR_SUCCESS || !fs->nelts) {
                fprintf(stderr, "ceiling: no folder cursor for account %" APR_INT64_T_FMT "\n",
                        id);
                return 1;
            }
            f = APR_ARRAY_IDX(fs, 0, mso_folder_t *);
            for (i = 0; i < parsed->nelts; i++) {
                mso_graph_page_t *pg = &APR_ARRAY_IDX(parsed, i, mso_graph_page_t);
                apr_pool_t *pp;
                int applied = 0;

                apr_pool_create(&pp, p);
                if (mso_mirror_apply_page(db, pp, "ceiling", id, f, pg, now, &applied, &err)
                    != APR_SUCCESS) {
                    fprintf(stderr, "ceiling: apply_page: %s\n", err ? err : "?");
                    return 1;
                }
                /* The cursor strings live in pp. */
                f->next_link = f->next_link ? apr_pstrdup(p, f->next_link) : NULL;
                f->delta_link = f->delta_link ? apr_pstrdup(p, f->delta_link) : NULL;
                apr_pool_destroy(pp);
            }
        }
        t1 = apr_time_now();
    }
    else if (!strcmp(mode, "single") || !strcmp(mode, "multi") || !strcmp(mode, "upsert50")
             || !strcmp(mode, "upsert50-unnamed")) {
        int multi = !strcmp(mode, "multi"), upsert = !strncmp(mode, "upsert50", 8);
        int named = strcmp(mode, "upsert50-unnamed") != 0;
        apr_dbd_prepared_t *one = NULL, *many = NULL, *half = NULL;
        const void **args = apr_palloc(p, sizeof(*args) * COLS * MULTI_ROWS);
        row_t *rows = apr_palloc(p, sizeof(*rows) * MULTI_ROWS);

        create_table();
        if (multi) {
            many = prepare_rows(p, MULTI_ROWS, 0, 1);
        }
        if (upsert) {
            half = prepare_rows(p, MULTI_ROWS / 2, 1, named);
        }
        one = prepare_rows(p, 1, upsert, named);
        t0 = apr_time_now();
        for (k = 0; k < ids->nelts; k++) {
            apr_int64_t id = APR_ARRAY_IDX(ids, k, apr_int64_t);

            for (i = 0; i < n; i += TX_ROWS) {
                int m = n - i < TX_ROWS ? n - i : TX_ROWS;

                for (j = 0; j < m; j++) {
                    rows[j].account_id = id;
                    rows[j].now = now;
                    rows[j].m = msgs[i + j];
                    row_args(args + j * COLS, &rows[j]);
                }
                if (upsert && m == MULTI_ROWS) {
                    /* As the module: two 50-row upserts in one transaction. */
                    exec_sql(is_pg ? "BEGIN" : "BEGIN IMMEDIATE");
                    for (j = 0; j < 2; j++) {
                        rc = apr_dbd_pbquery(drv, p, dbh, &nrows, half,
                                             args + j * (MULTI_ROWS / 2) * COLS);
                        if (rc != 0) {
                            die_db("upsert", rc);
                        }
                    }
                    exec_sql("COMMIT");
                    continue;
                }
                if (multi && m == MULTI_ROWS) {
                    rc = apr_dbd_pbquery(drv, p, dbh, &nrows, many, args);
                    if (rc != 0) {
                        die_db("multi-row insert", rc);
                    }
                    continue;
                }
                exec_sql(is_pg ? "BEGIN" : "BEGIN IMMEDIATE");
                for (j = 0; j < m; j++) {
                    rc = apr_dbd_pbquery(drv, p, dbh, &nrows, one, args + j * COLS);
                    if (rc != 0) {
                        die_db("insert", rc);
                    }
                }
                exec_sql("COMMIT");
            }
        }
        t1 = apr_time_now();
        exec_sql("DROP TABLE msoauth_ceiling");
    }
    else {
        fprintf(stderr, "ceiling: unknown mode %s\n", mode);
        return 2;
    }
    printf("{\"mode\": \"%s\", \"driver\": \"%s\", \"rows\": %d, \"seconds\": %.3f, "
           "\"rows_per_s\": %.0f}\n", mode, driver, total,
           (double)(t1 - t0) / APR_USEC_PER_SEC,
           total / ((double)(t1 - t0) / APR_USEC_PER_SEC));
    apr_dbd_close(drv, dbh);
    return 0;
}

int main(int argc, char **argv)
{
    apr_pool_t *p;
    int rc;

    apr_initialize();
    apr_pool_create(&p, NULL);
    if (argc == 4 && !strcmp(argv[1], "parse")) {
        rc = run_parse(p, argv[2], atof(argv[3]));
    }
    else if (argc == 7 && !strcmp(argv[1], "insert")) {
        rc = run_insert(p, argv[2], argv[3], argv[4], argv[5], argv[6]);
    }
    else {
        fprintf(stderr, "usage: ceiling parse PAGEDIR SECONDS\n"
                        "       ceiling insert DRIVER PARAMS PAGEDIR ACCOUNT_IDS "
                        "single|multi|upsert50|upsert50-unnamed|apply\n");
        rc = 2;
    }
    apr_pool_destroy(p);
    apr_terminate();
    return rc;
}
