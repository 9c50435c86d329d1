/* The attachment handler (see mod_msoauth_attach.h). Stored content is
 * read from the table in parts; content not stored (above
 * MSOAuthAttachmentMaxBytes, not downloaded yet, refused before) is fetched
 * from Graph with the account's token and streamed through as it arrives,
 * and kept when within the limit. Everything from Graph and the table is
 * hostile here: the Content-Type is reduced to a plain type/subtype and the
 * file name is cleaned before it reaches a header (mso_attach). */
#include <stdlib.h>
#include <string.h>

#include <apr_strings.h>
#include <jansson.h>

#include <httpd.h>
#include <http_config.h>
#include <http_core.h>
#include <http_log.h>
#include <http_protocol.h>
#include <http_request.h>

#include "mod_msoauth.h"
#include "mod_msoauth_admin.h"
#include "mod_msoauth_attach.h"
#include "mod_msoauth_config.h"
#include "mod_msoauth_guard.h"
#include "mso_attach.h"
#include "mso_graph.h"
#include "mso_reason.h"

APLOG_USE_MODULE(msoauth);

/* Parts read from the table per statement: PostgreSQL reads parts of a
 * value; SQLite reads the whole value for any part of it, so larger parts. */
#define PART_PGSQL (1024 * 1024)
#define PART_SQLITE (16 * 1024 * 1024)
#define GRAPH_TIMEOUT_MS (10 * 60 * 1000)
#define GRAPH_MAX_DOWNLOAD ((apr_size_t)160 * 1024 * 1024)  /* above Exchange's 150 MB */

/* The headers of an attachment answer (before any byte of it). */
static void attachment_headers(request_rec *r, const mso_attach_t *t, const char *source)
{
    ap_set_content_type(r, mso_attach_safe_type(r->pool, t->kind, t->content_type));
    apr_table_setn(r->headers_out, "Content-Disposition",
                   mso_attach_disposition(r->pool, t->name));
    apr_table_setn(r->headers_out, "X-Content-Type-Options", "nosniff");
    apr_table_setn(r->headers_out, "Cache-Control", "private, no-store");
    /* Opened in a browser by mistake, it still runs nothing. */
    apr_table_setn(r->headers_out, "Content-Security-Policy", "default-src 'none'; sandbox");
    apr_table_setn(r->headers_out, "X-MSOAuth-Source", source);
}

static int serve_stored(request_rec *r, mso_db_t *db, const mso_attach_t *t)
{
    apr_size_t part = db->kind == MSO_DB_PGSQL ? PART_PGSQL : PART_SQLITE, got = 0;
    apr_int64_t off;
    apr_pool_t *tmp;

    attachment_headers(r, t, "stored");
    ap_set_content_length(r, (apr_off_t)t->length);
    if (r->header_only) {
        return OK;
    }
    apr_pool_create(&tmp, r->pool);
    for (off = 0; off < t->length; off += (apr_int64_t)got) {
        const unsigned char *data = NULL;

        apr_pool_clear(tmp);
        if (mso_attach_read(db, tmp, t->account_id, t->graph_id, t->attachment_id, off, part,
                            &data, &got) != APR_SUCCESS || got == 0) {
            /* Changed meanwhile (a new version in Outlook): the client sees a
             * short answer, never a mix. */
            ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(360) "attachment of "
                          "account %" APR_INT64_T_FMT " changed while it was being sent; "
                          "the answer is cut", t->account_id);
            r->connection->keepalive = AP_CONN_CLOSE;
            break;
        }
        if (ap_rwrite(data, (int)got, r) < 0) {
            break;              /* the client went away */
        }
    }
    apr_pool_destroy(tmp);
    return OK;
}

/* An answer from Graph for an attachment that is not stored. */
typedef struct {
    request_rec *r;
    const mso_attach_t *t;
    int started;                    /* headers sent, bytes flowing */
    int failed;                     /* the client went away */
    apr_size_t keep_max;            /* keep up to this to store it (0: do not) */
    char *kept;                     /* malloc'ed */
    apr_size_t kept_len, kept_cap;
} relay_t;

static apr_status_t relay_cleanup(void *data)
{
    relay_t *x = data;

    free(x->kept);
    x->kept = NULL;
    return APR_SUCCESS;
}

/* Keeps a copy while it stays within the limit (then it is stored). */
static void relay_keep(relay_t *x, const char *data, apr_size_t len)
{
    if (!x->keep_max) {
        return;
    }
    if (len > x->keep_max - x->kept_len) {
        free(x->kept);          /* more than the limit: served, not stored */
        x->kept = NULL;
        x->keep_max = 0;
        return;
    }
    if (x->kept_len + len > x->kept_cap) {
        apr_size_t cap = x->kept_cap ? x->kept_cap * 2 : 65536;
        char *n;

        while (cap < x->kept_len + len) {
            cap *= 2;
        }
        if (cap > x->keep_max) {
            cap = x->keep_max;
        }
        n = realloc(x->kept, cap);
        if (!n) {
            free(x->kept);
            x->kept = NULL;
            x->keep_max = 0;
            return;
        }
        x->kept = n;
        x->kept_cap = cap;
    }
    memcpy(x->kept + x->kept_len, data, len);
    x->kept_len += len;
}

static apr_status_t relay_sink(void *baton, const mso_http_response_t *resp, const char *data,
                               apr_size_t len)
{
    relay_t *x = baton;
    request_rec *r = x->r;

    if (!x->started) {
        const char *cl = apr_table_get(resp->headers, "Content-Length");
        apr_off_t n = 0;
        char *end;

        x->started = 1;
        attachment_headers(r, x->t, "graph");
        if (cl && apr_strtoff(&n, cl, &end, 10) == APR_SUCCESS && !*end && n >= 0) {
            ap_set_content_length(r, n);
        }
    }
    relay_keep(x, data, len);
    if (ap_rwrite(data, (int)len, r) < 0) {
        x->failed = 1;
        return APR_ECONNABORTED;
    }
    return APR_SUCCESS;
}

/* What a refusal from Graph means for the client. */
static int graph_refused(request_rec *r, const mso_graph_result_t *g)
{
    const char *text = mso_graph_result_text(r->pool, g);

    switch (g->cls) {
    case MSO_GRAPH_NOT_FOUND:
        return msoauth_json_error(r, HTTP_NOT_FOUND, "attachment_not_found",
                          apr_pstrcat(r->pool, "Graph no longer has it (", text, ")", NULL));
    case MSO_GRAPH_THROTTLED:
        if (g->retry_after >= 0) {
            apr_table_setn(r->err_headers_out, "Retry-After",
                           apr_psprintf(r->pool, "%ld", g->retry_after));
        }
        return msoauth_json_error(r, HTTP_SERVICE_UNAVAILABLE, "throttled", text);
    default:
        return msoauth_json_error(r, HTTP_BAD_GATEWAY, "graph_error", text);
    }
}

static void store_fetched(request_rec *r, mso_db_t *db, const mso_attach_t *t,
                          const void *data, apr_size_t len)
{
    const char *err = NULL;
    int stored = 0;

    if (mso_attach_store_content(db, r->pool, NULL, t->account_id, t->graph_id,
                                 t->attachment_id, t->last_modified, data, len,
                                 apr_time_sec(apr_time_now()), &stored, &err) != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(361) "an attachment fetched "
                      "on demand could not be stored: %s", err ? err : "database error");
    }
}

static int serve_from_graph(request_rec *r, mso_db_t *db, mso_account_t *a,
                            const mso_attach_t *t)
{
    msoauth_company_t *c = msoauth_account_company(r->server, a->company, a->client_id);
    apr_int64_t cap = c->set.attachment_max_bytes.value;
    /* An app or shared account's mailbox is /users/{address}. */
    const char *mailbox = mso_graph_mailbox(r->pool, c->set.graph_url.value,
                                            (a->kind && !strcmp(a->kind, "app")) || a->shared
                                            ? a->mailbox : NULL);
    mso_http_response_t *resp = NULL;
    apr_array_header_t *h;
    mso_graph_result_t g;
    mso_http_opts_t o;
    msoauth_token_t f;
    relay_t *x;
    apr_status_t rv;
    int i;

    if (r->header_only) {
        attachment_headers(r, t, "graph");
        return OK;
    }
    msoauth_account_token(r, db, a, "graph", &f);
    if (!f.token) {
        return msoauth_json_error(r, !strcmp(f.reason, "not_configured") ? HTTP_NOT_FOUND
                          : HTTP_SERVICE_UNAVAILABLE, f.reason, f.detail);
    }
    h = mso_graph_headers(r->pool, f.token, 0);
    msoauth_request_http_opts(msoauth_srv_conf(r->server), &o);
    o.timeout_ms = GRAPH_TIMEOUT_MS;
    o.stall_seconds = 30;
    o.max_body = 1024 * 1024;       /* an error, or a reference's description */
    o.max_download = GRAPH_MAX_DOWNLOAD;
    if (!strcmp(t->kind, "reference")) {
        const char *url = NULL, *err = NULL;

        rv = mso_http_request(r->pool, &o, "GET", mso_graph_attachment_link_url(
                                  r->pool, mailbox, t->graph_id, t->attachment_id), h, NULL, 0,
                              &resp);
        mso_graph_classify(r->pool, rv, resp, &g);
        if (g.cls != MSO_GRAPH_OK) {
            return graph_refused(r, &g);
        }
        if (mso_graph_parse_link(r->pool, resp->body, resp->body_len, &url, &err)
            != APR_SUCCESS) {
            return msoauth_json_error(r, HTTP_BAD_GATEWAY, "graph_error", err);
        }
        if (cap > 0 && (apr_int64_t)strlen(url) <= cap) {
            store_fetched(r, db, t, url, strlen(url));
        }
        attachment_headers(r, t, "graph");
        ap_set_content_length(r, (apr_off_t)strlen(url));
        ap_rputs(url, r);
        return OK;
    }
    for (i = 0; i < h->nelts; i++) {
        if (!strcmp(APR_ARRAY_IDX(h, i, const char *), "Accept: application/json")) {
            APR_ARRAY_IDX(h, i, const char *) = "Accept: */*";
        }
    }
    x = apr_pcalloc(r->pool, sizeof(*x));
    x->r = r;
    x->t = t;
    /* Kept to be stored when it may be: within the limit. */
    x->keep_max = cap > 0 && (t->size < 0 || t->size <= cap) ? (apr_size_t)cap : 0;
    apr_pool_cleanup_register(r->pool, x, relay_cleanup, apr_pool_cleanup_null);
    rv = mso_http_get_stream(r->pool, &o, mso_graph_attachment_value_url(r->pool, mailbox,
                                                                          t->graph_id,
                                                                          t->attachment_id),
                             h, relay_sink, x, &resp);
    if (!x->started) {
        mso_graph_classify(r->pool, rv, resp, &g);
        if (g.cls != MSO_GRAPH_OK) {
            return graph_refused(r, &g);
        }
        /* An empty content: the headers still go out. */
        attachment_headers(r, t, "graph");
        ap_set_content_length(r, 0);
    }
    if (rv != APR_SUCCESS) {
        if (!x->failed) {
            ap_log_rerror(APLOG_MARK, APLOG_WARNING, rv, r, MSOLOGNO(362) "an attachment of "
                          "account %" APR_INT64_T_FMT " from Graph was cut off: %s",
                          t->account_id, resp && resp->error ? resp->error : "?");
        }
        r->connection->keepalive = AP_CONN_CLOSE;
        return OK;
    }
    if (x->keep_max) {
        store_fetched(r, db, t, x->kept, x->kept_len);
    }
    apr_pool_cleanup_run(r->pool, x, relay_cleanup);
    return OK;
}

int msoauth_attachment_handler(request_rec *r)
{
    const char *why, *graph_id, *attachment_id;
    apr_table_t *args;
    apr_int64_t id;
    mso_account_t *a;
    mso_attach_t *t = NULL;
    mso_db_t *db;
    apr_status_t rv;
    int rc, mirrored = 0, due = 0;

    if ((rc = msoauth_guard(r, MSOAUTH_GUARD_KEY_REQUIRED, NULL)) != DECLINED) {
        return rc;
    }
    if (r->method_number != M_GET) {
        r->allowed = AP_METHOD_BIT << M_GET;
        return HTTP_METHOD_NOT_ALLOWED;
    }
    if ((why = mso_query_parse(r->pool, r->args, &args)) != NULL) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", why);
    }
    graph_id = apr_table_get(args, "message");
    attachment_id = apr_table_get(args, "attachment");
    if (!msoauth_parse_id(apr_table_get(args, "account"), &id)) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", "account must be an account ID");
    }
    if (!mso_graph_id_ok(graph_id) || !mso_graph_id_ok(attachment_id)) {
        return msoauth_json_error(r, HTTP_BAD_REQUEST, "bad_request", "message and attachment must be "
                          "Graph ids (letters, digits and +/=_- only, at most 512)");
    }
    if (!(db = msoauth_request_db(r))) {
        return msoauth_json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database unavailable");
    }
    if (mso_account_get(db, r->pool, id, &a) != APR_SUCCESS
        || !msoauth_account_company(r->server, a->company, a->client_id)) {
        return msoauth_json_error(r, HTTP_NOT_FOUND, "account_not_found", "no such account on this "
                          "virtual host");
    }
    if (mso_attach_message(db, r->pool, id, graph_id, &mirrored, &due) != APR_SUCCESS) {
        return msoauth_json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database unavailable");
    }
    if (!mirrored) {
        return msoauth_json_error(r, HTTP_NOT_FOUND, "message_not_found", "the account has no such "
                          "message in the mirror (never mirrored, or removed)");
    }
    rv = mso_attach_get(db, r->pool, id, graph_id, attachment_id, &t);
    if (rv == APR_NOTFOUND) {
        return msoauth_json_error(r, HTTP_NOT_FOUND, "attachment_not_found", due
                          ? "the message's attachments are being listed: try again in a few "
                            "seconds" : "the message has no such attachment");
    }
    if (rv != APR_SUCCESS) {
        return msoauth_json_error(r, HTTP_SERVICE_UNAVAILABLE, "graph_error", "database unavailable");
    }
    if (t->length >= 0) {
        return serve_stored(r, db, t);
    }
    if (strcmp(a->state, "connected")) {
        return msoauth_json_error(r, HTTP_CONFLICT, a->reason ? a->reason : "reconnect_required",
                          "the attachment is not stored and the mailbox is not connected");
    }
    return serve_from_graph(r, db, a, t);
}
