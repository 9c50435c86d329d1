/* An HTTP answer as lib/mso_http makes it from what curl hands over: this
 * includes lib/mso_http.c to use its own header callback (one header line per
 * call, CRLF included), body callback (with the size cap) and Retry-After
 * parser, so fuzzed headers take the production path into
 * mso_http_response_t. The archive's mso_http.o is then not linked.
 *
 * Input layout, after whatever the harness reads first:
 *   2 bytes  status (big endian; taken modulo 600)
 *   1 byte   flags: bit 0 = the transfer failed (rv != APR_SUCCESS)
 *   header lines up to a NUL ("Retry-After: 120\r\nLocation: ...\r\n")
 *   the body: the rest, NULs included */
#ifndef MSO_FUZZ_HTTP_H
#define MSO_FUZZ_HTTP_H

#include "mso_http.c"

#include "fuzz_common.h"

typedef struct {
    apr_status_t rv;
    mso_http_response_t *resp;
    const char *retry_after_header;     /* as received, or NULL */
} fuzz_answer_t;

static inline fuzz_answer_t fuzz_answer(apr_pool_t *p, fuzz_in_t *in)
{
    fuzz_answer_t a;
    mso_http_call_t *call = apr_pcalloc(p, sizeof(*call));
    mso_http_ctx_t *ctx = &call->ctx;
    mso_http_response_t *r = apr_pcalloc(p, sizeof(*r));
    unsigned hi = fuzz_byte(in), lo = fuzz_byte(in), flags = fuzz_byte(in);
    const char *head = fuzz_str(p, in), *body, *line;
    size_t body_len, n;

    /* The body callback takes the whole call (single request: no multi). */
    call->p = p;
    ctx->p = p;
    apr_pool_cleanup_register(p, ctx, ctx_free, apr_pool_cleanup_null);
    ctx->max_body = 4 * 1024 * 1024;
    ctx->headers = apr_table_make(p, 8);
    r->headers = ctx->headers;
    r->body = "";
    r->retry_after = -1;
    a.rv = APR_SUCCESS;

    /* Line by line, each in a buffer of its own size (no NUL after it, as
     * curl's buffer need not have one). */
    for (line = head; *line; line += n) {
        const char *nl = strchr(line, '\n');
        char *copy;

        n = nl ? (size_t)(nl - line) + 1 : strlen(line);
        copy = apr_pmemdup(p, line, n);
        if (header_cb(copy, 1, n, ctx) != n) {
            a.rv = APR_ENOSPC;
            r->error = "response headers too large";
            break;
        }
    }
    body = fuzz_rest(p, in, &body_len);
    if (body_len) {
        char *copy = apr_pmemdup(p, body, body_len);

        if (write_cb(copy, 1, body_len, call) != body_len) {
            a.rv = APR_ENOSPC;
        }
    }
    if (ctx->buf) {
        r->body = ctx->buf;
        r->body_len = ctx->len;
    }
    FUZZ_CHECK(r->body[r->body_len] == '\0', "body not NUL-terminated");
    a.retry_after_header = apr_table_get(r->headers, "Retry-After");
    r->retry_after = parse_retry_after(a.retry_after_header);
    FUZZ_CHECK(r->retry_after >= -1 && r->retry_after <= MSO_RETRY_AFTER_MAX,
               "Retry-After %ld out of range", r->retry_after);
    FUZZ_CHECK(a.retry_after_header || r->retry_after == -1, "a Retry-After from nowhere");
    if (a.retry_after_header) {
        /* Plain seconds read as themselves, capped at a day. */
        const char *v = a.retry_after_header;
        char *end;
        long long secs;

        if (*v >= '0' && *v <= '9' && strlen(v) < 18) {
            secs = strtoll(v, &end, 10);
            if (!*end) {
                FUZZ_CHECK(r->retry_after == (secs > MSO_RETRY_AFTER_MAX ? MSO_RETRY_AFTER_MAX
                                                                          : secs),
                           "Retry-After \"%s\" read as %ld", v, r->retry_after);
            }
        }
    }
    if (flags & 1) {
        a.rv = APR_TIMEUP;
        r->error = "operation timed out";
    }
    else {
        r->status = (int)((hi << 8 | lo) % 600);
    }
    a.resp = r;
    return a;
}

#endif
