/* HTTP client over libcurl's easy interface. One handle per call: calls are
 * rare (token redemption, Graph), so connection reuse is not worth the
 * shared state between httpd threads. */
#include <stdarg.h>
#include <string.h>

#include <curl/curl.h>

#include <apr_date.h>
#include <apr_lib.h>
#include <apr_strings.h>
#include <apr_time.h>

#include "mso_http.h"
#include "mso_log.h"

#ifndef MSO_VERSION
#define MSO_VERSION "0.1.0"
#endif

#define MSO_HTTP_UA "mod_msoauth/" MSO_VERSION
/* Headers are not counted in max_body; this keeps a hostile server from
 * growing the table without bound. */
#define MSO_HTTP_MAX_HEADER_BYTES (256 * 1024)
#define MSO_RETRY_AFTER_MAX 86400L

typedef struct {
    apr_pool_t *p;
    apr_size_t max_body;
    char *buf;
    apr_size_t len;
    apr_size_t cap;
    int body_too_big;
    apr_table_t *headers;
    apr_size_t header_bytes;
    int headers_too_big;
} mso_http_ctx_t;

static int curl_ready;

apr_status_t mso_http_global_init(void)
{
    /* curl_global_init is not thread-safe; callers run this before threads. */
    if (curl_ready) {
        return APR_SUCCESS;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        return APR_EGENERAL;
    }
    curl_ready = 1;
    return APR_SUCCESS;
}

void mso_http_opts_default(mso_http_opts_t *o)
{
    memset(o, 0, sizeof(*o));
    o->connect_timeout_ms = 10000;
    o->timeout_ms = 30000;
    o->stall_seconds = 15;
    o->max_body = 4 * 1024 * 1024;
    o->ca_file = NULL;
    o->user_agent = MSO_HTTP_UA;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *baton)
{
    mso_http_ctx_t *ctx = baton;
    apr_size_t n = size * nmemb;

    /* A short count makes curl abort with CURLE_WRITE_ERROR. */
    if (n > ctx->max_body || ctx->len > ctx->max_body - n) {
        ctx->body_too_big = 1;
        return 0;
    }
    if (ctx->len + n + 1 > ctx->cap) {
        apr_size_t cap = ctx->cap ? ctx->cap * 2 : 4096;
        char *nbuf;

        if (cap < ctx->len + n + 1) {
            cap = ctx->len + n + 1;
        }
        /* Never reserve more than the cap allows. */
        if (cap > ctx->max_body + 1) {
            cap = ctx->max_body + 1;
        }
        nbuf = apr_palloc(ctx->p, cap);
        if (ctx->len) {
            memcpy(nbuf, ctx->buf, ctx->len);
        }
        ctx->buf = nbuf;
        ctx->cap = cap;
    }
    memcpy(ctx->buf + ctx->len, data, n);
    ctx->len += n;
    ctx->buf[ctx->len] = '\0';
    return n;
}

static size_t header_cb(char *data, size_t size, size_t nmemb, void *baton)
{
    mso_http_ctx_t *ctx = baton;
    apr_size_t n = size * nmemb;
    const char *colon, *end, *v;
    char *name;

    ctx->header_bytes += n;
    if (ctx->header_bytes > MSO_HTTP_MAX_HEADER_BYTES) {
        ctx->headers_too_big = 1;
        return 0;
    }
    end = data + n;
    while (end > data && (end[-1] == '\n' || end[-1] == '\r')) {
        end--;
    }
    /* A status line starts a new block (100-continue, proxy CONNECT):
     * only the final response's headers count. */
    if (end - data >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        apr_table_clear(ctx->headers);
        return n;
    }
    /* Blank line ends a block; obsolete folded lines are dropped. */
    if (end == data || *data == ' ' || *data == '\t') {
        return n;
    }
    colon = memchr(data, ':', end - data);
    if (!colon || colon == data) {
        return n;
    }
    name = apr_pstrmemdup(ctx->p, data, colon - data);
    v = colon + 1;
    while (v < end && (*v == ' ' || *v == '\t')) {
        v++;
    }
    while (end > v && (end[-1] == ' ' || end[-1] == '\t')) {
        end--;
    }
    apr_table_addn(ctx->headers, name, apr_pstrmemdup(ctx->p, v, end - v));
    return n;
}

static long parse_retry_after(const char *v)
{
    apr_time_t when;
    long secs = 0;
    const char *s;

    if (!v) {
        return -1;
    }
    while (*v == ' ' || *v == '\t') {
        v++;
    }
    if (apr_isdigit(*v)) {
        for (s = v; apr_isdigit(*s); s++) {
            if (secs < MSO_RETRY_AFTER_MAX) {
                secs = secs * 10 + (*s - '0');
            }
        }
        while (*s == ' ' || *s == '\t') {
            s++;
        }
        if (*s) {
            return -1;
        }
        return secs > MSO_RETRY_AFTER_MAX ? MSO_RETRY_AFTER_MAX : secs;
    }
    when = apr_date_parse_http(v);
    if (when == APR_DATE_BAD) {
        return -1;
    }
    when -= apr_time_now();
    if (when <= 0) {
        return 0;
    }
    secs = (long)apr_time_sec(when);
    return secs > MSO_RETRY_AFTER_MAX ? MSO_RETRY_AFTER_MAX : secs;
}

static int has_crlf(const char *s)
{
    return strpbrk(s, "\r\n") != NULL;
}

/* Controls and spaces in a URL would be sent as-is by curl. */
static int bad_url(const char *url)
{
    const unsigned char *s;

    if (!url || !*url) {
        return 1;
    }
    for (s = (const unsigned char *)url; *s; s++) {
        if (*s <= 0x20 || *s == 0x7f) {
            return 1;
        }
    }
    return 0;
}

/* The URL without its query, for logs. */
static const char *url_for_log(apr_pool_t *p, const char *url)
{
    const char *q = strchr(url, '?');

    return q ? apr_pstrmemdup(p, url, q - url) : url;
}

static const char *curl_error(apr_pool_t *p, CURLcode rc, char *errbuf)
{
    apr_size_t n = strlen(errbuf);

    while (n && (errbuf[n - 1] == '\n' || errbuf[n - 1] == '\r')) {
        errbuf[--n] = '\0';
    }
    if (!n) {
        return apr_pstrdup(p, curl_easy_strerror(rc));
    }
    return apr_pstrcat(p, curl_easy_strerror(rc), ": ", errbuf, NULL);
}

apr_status_t mso_http_request(apr_pool_t *p, const mso_http_opts_t *o, const char *method,
                              const char *url, const apr_array_header_t *headers,
                              const char *body, apr_size_t body_len,
                              mso_http_response_t **resp)
{
    mso_http_opts_t defaults;
    mso_http_response_t *r;
    mso_http_ctx_t ctx;
    struct curl_slist *slist = NULL, *tmp;
    char errbuf[CURL_ERROR_SIZE];
    CURL *h = NULL;
    CURLcode rc;
    apr_status_t rv;
    apr_time_t start = apr_time_now();
    long code = 0;
    int i, with_body = 0;

    r = apr_pcalloc(p, sizeof(*r));
    r->headers = apr_table_make(p, 16);
    r->body = "";
    r->retry_after = -1;
    *resp = r;

    mso_http_opts_default(&defaults);
    if (!o) {
        o = &defaults;
    }

    /* Everything that can be refused is refused before a handle exists. */
    if (!method) {
        r->error = "no HTTP method";
        return APR_EINVAL;
    }
    if (bad_url(url)) {
        r->error = "URL is empty or contains spaces or control characters";
        return APR_EINVAL;
    }
    if (!body && body_len) {
        r->error = "body length without a body";
        return APR_EINVAL;
    }
    if (strcmp(method, "POST") == 0) {
        with_body = 1;
    }
    else if (strcmp(method, "PATCH") == 0 || strcmp(method, "DELETE") == 0) {
        with_body = body != NULL || strcmp(method, "PATCH") == 0;
    }
    else if (strcmp(method, "GET") != 0) {
        r->error = "unsupported HTTP method";
        return APR_EINVAL;
    }
    else if (body) {
        r->error = "GET with a body";
        return APR_EINVAL;
    }
    for (i = 0; headers && i < headers->nelts; i++) {
        const char *hv = APR_ARRAY_IDX(headers, i, const char *);

        if (!hv || has_crlf(hv)) {
            r->error = "request header contains CR or LF";
            return APR_EINVAL;
        }
    }

    memset(&ctx, 0, sizeof(ctx));
    ctx.p = p;
    ctx.max_body = o->max_body;
    ctx.headers = r->headers;

    h = curl_easy_init();
    if (!h) {
        r->error = "curl_easy_init failed";
        return APR_ENOMEM;
    }

    for (i = 0; headers && i < headers->nelts; i++) {
        tmp = curl_slist_append(slist, APR_ARRAY_IDX(headers, i, const char *));
        if (!tmp) {
            rv = APR_ENOMEM;
            r->error = "out of memory";
            goto done;
        }
        slist = tmp;
    }
    /* curl would otherwise wait up to a second for 100-continue on large bodies. */
    tmp = curl_slist_append(slist, "Expect:");
    if (!tmp) {
        rv = APR_ENOMEM;
        r->error = "out of memory";
        goto done;
    }
    slist = tmp;

    errbuf[0] = '\0';
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#else
    curl_easy_setopt(h, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
    curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
    if (o->ca_file && *o->ca_file) {
        curl_easy_setopt(h, CURLOPT_CAINFO, o->ca_file);
    }
    /* Zero or negative would mean "no limit" to curl: fall back to defaults. */
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS,
                     o->connect_timeout_ms > 0 ? o->connect_timeout_ms
                                               : defaults.connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS,
                     o->timeout_ms > 0 ? o->timeout_ms : defaults.timeout_ms);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME,
                     o->stall_seconds > 0 ? o->stall_seconds : defaults.stall_seconds);
    /* Lets curl stop early when Content-Length already exceeds the cap. */
    if ((apr_uint64_t)o->max_body < ((apr_uint64_t)1 << 62)) {
        curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)o->max_body);
    }
    curl_easy_setopt(h, CURLOPT_USERAGENT, o->user_agent ? o->user_agent : MSO_HTTP_UA);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, slist);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &ctx);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &ctx);

    if (with_body) {
        /* POSTFIELDS does not copy: body outlives curl_easy_perform. */
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, body ? body : "");
    }
    else {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    }
    if (strcmp(method, "PATCH") == 0 || strcmp(method, "DELETE") == 0) {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    }

    rc = curl_easy_perform(h);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    r->status = (int)code;

    if (rc == CURLE_OK) {
        rv = APR_SUCCESS;
        if (ctx.buf) {
            r->body = ctx.buf;
            r->body_len = ctx.len;
        }
        r->retry_after = parse_retry_after(apr_table_get(r->headers, "Retry-After"));
    }
    else if (ctx.body_too_big || rc == CURLE_FILESIZE_EXCEEDED) {
        rv = APR_ENOSPC;
        r->error = apr_psprintf(p, "response body larger than %" APR_SIZE_T_FMT " bytes",
                                o->max_body);
    }
    else if (ctx.headers_too_big) {
        rv = APR_ENOSPC;
        r->error = "response headers too large";
    }
    else if (rc == CURLE_OPERATION_TIMEDOUT) {
        rv = APR_TIMEUP;
        r->error = curl_error(p, rc, errbuf);
    }
    else {
        rv = APR_EGENERAL;
        r->error = curl_error(p, rc, errbuf);
    }

done:
    curl_easy_cleanup(h);
    curl_slist_free_all(slist);
    r->seconds = (double)(apr_time_now() - start) / APR_USEC_PER_SEC;
    if (rv != APR_SUCCESS && mso_log_is_level(MSO_LOG_DEBUG)) {
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_DEBUG, rv, "HTTP %s %s failed after %.3fs: %s",
                       method, url_for_log(p, url), r->seconds, r->error);
    }
    return rv;
}

char *mso_url_encode(apr_pool_t *p, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *in;
    char *out, *o;

    if (!s) {
        return NULL;
    }
    out = o = apr_palloc(p, strlen(s) * 3 + 1);
    for (in = (const unsigned char *)s; *in; in++) {
        /* apr_isalnum depends on the locale; RFC 3986 means ASCII only. */
        if ((*in >= 'A' && *in <= 'Z') || (*in >= 'a' && *in <= 'z')
            || (*in >= '0' && *in <= '9')
            || *in == '-' || *in == '.' || *in == '_' || *in == '~') {
            *o++ = (char)*in;
        }
        else {
            *o++ = '%';
            *o++ = hex[*in >> 4];
            *o++ = hex[*in & 0x0f];
        }
    }
    *o = '\0';
    return out;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

char *mso_url_decode(apr_pool_t *p, const char *s)
{
    char *out, *o;
    int hi, lo;

    if (!s) {
        return NULL;
    }
    out = o = apr_palloc(p, strlen(s) + 1);
    for (; *s; s++) {
        if (*s == '+') {
            *o++ = ' ';
        }
        else if (*s == '%') {
            hi = hexval(s[1]);
            lo = hi < 0 ? -1 : hexval(s[2]);
            /* %00 would silently truncate the value for C callers. */
            if (lo < 0 || (hi == 0 && lo == 0)) {
                return NULL;
            }
            *o++ = (char)(hi << 4 | lo);
            s += 2;
        }
        else {
            *o++ = *s;
        }
    }
    *o = '\0';
    return out;
}

char *mso_form_encode(apr_pool_t *p, ...)
{
    apr_array_header_t *parts = apr_array_make(p, 8, sizeof(const char *));
    const char *name, *value;
    va_list ap;

    va_start(ap, p);
    while ((name = va_arg(ap, const char *)) != NULL) {
        value = va_arg(ap, const char *);
        if (!value) {
            continue;
        }
        if (parts->nelts) {
            APR_ARRAY_PUSH(parts, const char *) = "&";
        }
        APR_ARRAY_PUSH(parts, const char *) = mso_url_encode(p, name);
        APR_ARRAY_PUSH(parts, const char *) = "=";
        APR_ARRAY_PUSH(parts, const char *) = mso_url_encode(p, value);
    }
    va_end(ap);
    return apr_array_pstrcat(p, parts, '\0');
}

const char *mso_query_parse(apr_pool_t *p, const char *query, apr_table_t **params)
{
    char *copy, *pair, *last, *eq;
    const char *name, *value;

    *params = apr_table_make(p, 8);
    if (!query || !*query) {
        return NULL;
    }
    if (strlen(query) > 16384) {
        return "the query string is longer than 16384 bytes";
    }
    copy = apr_pstrdup(p, query);
    for (pair = apr_strtok(copy, "&", &last); pair; pair = apr_strtok(NULL, "&", &last)) {
        eq = strchr(pair, '=');
        if (eq) {
            *eq = '\0';
        }
        name = mso_url_decode(p, pair);
        value = mso_url_decode(p, eq ? eq + 1 : "");
        if (!name || !value) {
            return "a query parameter has a bad %-escape";
        }
        if (!*name) {
            continue;
        }
        if (apr_table_get(*params, name)) {
            return apr_psprintf(p, "parameter %s is given more than once",
                                strlen(name) > 40 ? "(long name)" : name);
        }
        apr_table_setn(*params, name, value);
    }
    return NULL;
}
