/* HTTP client over libcurl. mso_http_request: one call at a time on the
 * calling thread, over an easy handle of its own or (keep_connection) one the
 * thread keeps, whose connections the thread's next call reuses (nothing is
 * shared between threads). mso_http_multi_*: the job's many token refreshes
 * at once over one multi handle, on one thread, with a bound on connections
 * and their reuse. Both set up their handles with the same code (call_setup,
 * call_end). */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>

#include <apr_date.h>
#include <apr_lib.h>
#include <apr_strings.h>
#include <apr_time.h>

#include "mso_http.h"
#include "mso_json.h"
#include "mso_log.h"

#if APR_HAS_THREADS
#include <pthread.h>
#endif

#ifndef MSO_VERSION
#define MSO_VERSION "0.2.0"
#endif

#define MSO_HTTP_UA "mod_msoauth/" MSO_VERSION
/* Headers are not counted in max_body; this keeps a hostile server from
 * growing the table without bound. */
#define MSO_HTTP_MAX_HEADER_BYTES (256 * 1024)
#define MSO_RETRY_AFTER_MAX 86400L

typedef struct {
    apr_pool_t *p;
    apr_size_t max_body;
    char *buf;                  /* malloc'ed, freed with p (ctx_free) */
    apr_size_t len;
    apr_size_t cap;
    apr_size_t received;        /* body bytes from the wire */
    apr_size_t max_download;
    mso_json_clip_t *clip;      /* NULL: the body is kept as received */
    int body_too_big;
    int no_memory;
    apr_table_t *headers;
    apr_size_t header_bytes;
    int headers_too_big;
} mso_http_ctx_t;

static int curl_ready;

/* The easy handle a thread keeps for its blocking calls. An easy handle holds
 * its connections, TLS sessions and (curl 7.87 and later) the parsed CA
 * bundle: a new handle per call meant a new TCP connection and TLS handshake
 * to Microsoft for every call. curl does not support sharing connections
 * between threads, so each thread has its own. */
typedef struct {
    CURL *h;
    pid_t pid;                  /* the process that made it */
    int busy;                   /* a call on this thread uses it now */
} thread_handle_t;

#if APR_HAS_THREADS
static pthread_key_t thread_key;
static int thread_key_ok;

static void thread_handle_free(void *data)
{
    thread_handle_t *t = data;

    if (t->h && t->pid == getpid()) {
        curl_easy_cleanup(t->h);
    }
    free(t);
}

static thread_handle_t *thread_handle_get(int make)
{
    thread_handle_t *t;

    if (!thread_key_ok) {
        return NULL;
    }
    t = pthread_getspecific(thread_key);
    if (!t && make && (t = calloc(1, sizeof(*t))) != NULL
        && pthread_setspecific(thread_key, t) != 0) {
        free(t);
        t = NULL;
    }
    return t;
}
#else
static thread_handle_t the_thread_handle;

static thread_handle_t *thread_handle_get(int make)
{
    (void)make;
    return &the_thread_handle;
}
#endif

/* An inherited handle is never used: its sockets are the parent's too, and a
 * request on them would mix two processes' answers. It is left alone (not
 * cleaned up: a TLS close would end the parent's session). */
static CURL *inherited;         /* keeps it reachable for leak checkers */

static void thread_handle_forked(thread_handle_t *t)
{
    if (t->h && t->pid != getpid()) {
        inherited = t->h;
        t->h = NULL;
        t->busy = 0;
    }
}

/* The thread's handle, or a new one when a call on this thread holds it
 * already (a sink that makes a call of its own). *kept_by: the thread's slot
 * when it is the thread's handle, else NULL. */
static CURL *thread_handle_take(thread_handle_t **kept_by)
{
    thread_handle_t *t = thread_handle_get(1);

    *kept_by = NULL;
    if (!t) {
        return curl_easy_init();
    }
    thread_handle_forked(t);
    if (t->busy) {
        return curl_easy_init();
    }
    if (!t->h) {
        if (!(t->h = curl_easy_init())) {
            return NULL;
        }
        t->pid = getpid();
    }
    t->busy = 1;
    *kept_by = t;
    return t->h;
}

void mso_http_thread_done(void)
{
    thread_handle_t *t = thread_handle_get(0);

    if (t && !t->busy) {
        thread_handle_forked(t);
        if (t->h) {
            curl_easy_cleanup(t->h);
            t->h = NULL;
        }
    }
}

apr_status_t mso_http_global_init(void)
{
    /* curl_global_init is not thread-safe; callers run this before threads. */
    if (curl_ready) {
        return APR_SUCCESS;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        return APR_EGENERAL;
    }
#if APR_HAS_THREADS
    /* Without the key every call makes its own handle, as before. */
    thread_key_ok = pthread_key_create(&thread_key, thread_handle_free) == 0;
#endif
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

/* One request's state, shared by mso_http_request and the multi handle. It
 * lives in the request's pool: curl writes into ctx and errbuf until the
 * easy handle is cleaned up in call_end. */
typedef struct mso_http_call_t mso_http_call_t;

typedef enum { CALL_QUEUED, CALL_RUNNING, CALL_DONE } call_state_e;

struct mso_http_call_t {
    apr_pool_t *p;
    const char *method;
    const char *url;
    apr_size_t max_body;
    mso_http_response_t *r;
    mso_http_ctx_t ctx;
    struct curl_slist *slist;
    CURL *h;
    int blocking;                   /* mso_http_request / get_stream */
    thread_handle_t *kept_by;       /* h is this thread's own (thread_handle_take) */
    char errbuf[CURL_ERROR_SIZE];
    apr_time_t start;
    /* multi only */
    mso_http_multi_t *m;
    mso_http_done_fn *done;
    void *baton;
    call_state_e state;
    int paused;                     /* waiting for the buffer budget */
    int cls;                        /* whose budget: 0 the handle's, 1 the downloads' */
    mso_http_call_t *prev, *next;
    /* mso_http_get_stream only */
    mso_http_sink_fn *sink;
    void *sink_baton;
    int streaming;                  /* 1: a 2xx body goes to sink; -1: kept; 0: not known yet */
    int sink_stopped;
};

struct mso_http_multi_t {
    apr_pool_t *p;
    CURLM *cm;
    mso_http_opts_t o;
    int max_in_flight;
    int running;                    /* handed to curl */
    int aborting;                   /* the budget ran out: refuse new requests */
    /* Per budget (0: buffer_budget, 1: download_budget): capacity of the
     * running requests' buffers, and the one that may grow past it. */
    apr_size_t buffered[2];
    apr_size_t peak;                /* of both together */
    mso_http_call_t *leader[2];
    int paused;                     /* requests paused now */
    int pauses;                     /* ... and ever */
    int freed;                      /* memory went back: wake the paused */
    mso_http_call_t *queue, *queue_tail;    /* waiting, in the order added */
    mso_http_call_t *active, *active_tail;  /* handed to curl */
    mso_http_counts_t counts;       /* outcomes since mso_http_multi_counts */
};

static apr_status_t ctx_free(void *data)
{
    mso_http_ctx_t *ctx = data;

    free(ctx->buf);
    ctx->buf = NULL;
    ctx->len = ctx->cap = 0;
    return APR_SUCCESS;
}

/* The request's buffer stops counting against its multi handle's budget. */
static void call_unbudget(mso_http_call_t *c)
{
    mso_http_multi_t *m = c->m;

    if (!m) {
        return;
    }
    m->buffered[c->cls] -= c->ctx.cap;
    if (m->leader[c->cls] == c) {
        m->leader[c->cls] = NULL;
    }
    if (c->paused) {
        c->paused = 0;
        m->paused--;
    }
    m->freed = 1;
    c->m = NULL;
}

/* Room for need bytes. APR_EAGAIN: the budget says wait (the transfer is
 * paused), APR_ENOMEM: malloc failed. */
static apr_status_t buf_grow(mso_http_call_t *c, apr_size_t need)
{
    mso_http_ctx_t *ctx = &c->ctx;
    mso_http_multi_t *m = c->m;
    apr_size_t cap = ctx->cap ? ctx->cap * 2 : 4096;
    apr_size_t most = ctx->max_body + MSO_HTTP_GROW_SLACK;
    apr_size_t budget = !m ? 0 : c->cls ? m->o.download_budget : m->o.buffer_budget;
    int k = c->cls;
    char *nbuf;

    /* Doubling, but never reserving much more than the cap allows. */
    if (cap > most) {
        cap = most;
    }
    if (cap < need) {
        cap = need;
    }
    if (budget && m->leader[k] != c && m->buffered[k] + (cap - ctx->cap) > budget) {
        if (m->leader[k]) {
            if (!c->paused) {
                c->paused = 1;
                m->paused++;
                m->pauses++;
            }
            return APR_EAGAIN;
        }
        m->leader[k] = c;
    }
    nbuf = realloc(ctx->buf, cap);
    if (!nbuf) {
        return APR_ENOMEM;
    }
    if (m) {
        m->buffered[k] += cap - ctx->cap;
        if (m->buffered[0] + m->buffered[1] > m->peak) {
            m->peak = m->buffered[0] + m->buffered[1];
        }
    }
    ctx->buf = nbuf;
    ctx->cap = cap;
    return APR_SUCCESS;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *baton)
{
    mso_http_call_t *c = baton;
    mso_http_ctx_t *ctx = &c->ctx;
    apr_size_t n = size * nmemb, room;
    apr_status_t rv;

    /* A short count makes curl abort with CURLE_WRITE_ERROR. */
    if (ctx->clip) {
        if (n > ctx->max_download || ctx->received > ctx->max_download - n) {
            ctx->body_too_big = 1;
            return 0;
        }
        room = MSO_JSON_CLIP_ROOM(n);
    }
    else {
        if (n > ctx->max_body || ctx->len > ctx->max_body - n) {
            ctx->body_too_big = 1;
            return 0;
        }
        room = n;
    }
    if (ctx->len + room + 1 > ctx->cap) {
        rv = buf_grow(c, ctx->len + room + 1);
        if (rv == APR_EAGAIN) {
            return CURL_WRITEFUNC_PAUSE;    /* curl keeps the data until unpaused */
        }
        if (rv != APR_SUCCESS) {
            ctx->no_memory = 1;
            return 0;
        }
    }
    ctx->received += n;
    if (ctx->clip) {
        ctx->len += mso_json_clip_feed(ctx->clip, data, n, ctx->buf + ctx->len);
        if (ctx->len > ctx->max_body) {
            ctx->body_too_big = 1;
            return 0;
        }
    }
    else {
        memcpy(ctx->buf + ctx->len, data, n);
        ctx->len += n;
    }
    ctx->buf[ctx->len] = '\0';
    return n;
}

/* mso_http_get_stream: a 2xx body goes to the sink as it arrives, anything
 * else is kept as write_cb keeps it (an error to read). */
static size_t stream_cb(char *data, size_t size, size_t nmemb, void *baton)
{
    mso_http_call_t *c = baton;
    mso_http_ctx_t *ctx = &c->ctx;
    apr_size_t n = size * nmemb;
    long code = 0;

    if (!c->streaming) {
        curl_easy_getinfo(c->h, CURLINFO_RESPONSE_CODE, &code);
        c->r->status = (int)code;
        c->streaming = code >= 200 && code < 300 ? 1 : -1;
    }
    if (c->streaming < 0) {
        return write_cb(data, size, nmemb, baton);
    }
    if (ctx->max_download && (n > ctx->max_download || ctx->received > ctx->max_download - n)) {
        ctx->body_too_big = 1;
        return 0;
    }
    ctx->received += n;
    if (c->sink(c->sink_baton, c->r, data, n) != APR_SUCCESS) {
        c->sink_stopped = 1;
        return 0;
    }
    return n;
}

static mso_http_call_t *call_make(apr_pool_t *p, const char *method, const char *url)
{
    mso_http_call_t *c = apr_pcalloc(p, sizeof(*c));

    c->p = p;
    c->method = method;
    c->url = url;
    c->r = apr_pcalloc(p, sizeof(*c->r));
    c->r->headers = apr_table_make(p, 16);
    c->r->body = "";
    c->r->retry_after = -1;
    c->start = apr_time_now();
    /* Registered first, so it runs after call_pool_gone has stopped curl. */
    apr_pool_cleanup_register(p, &c->ctx, ctx_free, apr_pool_cleanup_null);
    return c;
}

static void call_capture(void *baton, int which, const char *value, apr_size_t len)
{
    mso_http_call_t *c = baton;
    mso_http_response_t *r = c->r;

    if (!r->captured) {
        r->captured = apr_table_make(c->p, 2);
    }
    apr_table_setn(r->captured, c->ctx.clip->capture[which], apr_pstrmemdup(c->p, value, len));
}

/* Checks the request and builds its easy handle. Everything that can be
 * refused is refused before a handle exists; on failure nothing is left to
 * clean up and r->error says why. */
static apr_status_t call_setup(mso_http_call_t *c, const mso_http_opts_t *o,
                               const apr_array_header_t *headers, const char *body,
                               apr_size_t body_len)
{
    mso_http_opts_t defaults;
    mso_http_response_t *r = c->r;
    struct curl_slist *tmp;
    const char *method = c->method;
    CURL *h;
    int i, with_body = 0;

    mso_http_opts_default(&defaults);
    if (!o) {
        o = &defaults;
    }
    r->not_sent = 1;
    if (!method) {
        r->error = "no HTTP method";
        return APR_EINVAL;
    }
    if (bad_url(c->url)) {
        r->error = "URL is empty or contains spaces or control characters";
        return APR_EINVAL;
    }
    if (!body && body_len) {
        r->error = "body length without a body";
        return APR_EINVAL;
    }
    if (strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0) {
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

    c->ctx.p = c->p;
    c->ctx.max_body = c->max_body = o->max_body;
    c->ctx.headers = r->headers;
    if (o->max_string) {
        c->ctx.clip = apr_palloc(c->p, sizeof(*c->ctx.clip));
        mso_json_clip_init(c->ctx.clip, o->max_string);
        if (o->capture) {
            c->ctx.clip->capture = o->capture;
            c->ctx.clip->on_capture = call_capture;
            c->ctx.clip->capture_baton = c;
        }
        c->ctx.max_download = o->max_download ? o->max_download : o->max_body;
    }

    for (i = 0; headers && i < headers->nelts; i++) {
        tmp = curl_slist_append(c->slist, APR_ARRAY_IDX(headers, i, const char *));
        if (!tmp) {
            goto nomem;
        }
        c->slist = tmp;
    }
    /* curl would otherwise wait up to a second for 100-continue on large bodies. */
    tmp = curl_slist_append(c->slist, "Expect:");
    if (!tmp) {
        goto nomem;
    }
    c->slist = tmp;

    h = c->h = c->blocking && o->keep_connection ? thread_handle_take(&c->kept_by)
                                                 : curl_easy_init();
    if (!h) {
        curl_slist_free_all(c->slist);
        c->slist = NULL;
        r->error = "curl_easy_init failed";
        return APR_ENOMEM;
    }
    c->errbuf[0] = '\0';
    curl_easy_setopt(h, CURLOPT_PRIVATE, c);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, c->errbuf);
    curl_easy_setopt(h, CURLOPT_URL, c->url);
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
    /* "" turns off curl's look at the environment: a stray https_proxy in
     * httpd's environment must not receive the client secret. With a proxy,
     * no_proxy is ignored as well ("": every host through it). */
    if (o->proxy && *o->proxy) {
        curl_easy_setopt(h, CURLOPT_PROXY, o->proxy);
        curl_easy_setopt(h, CURLOPT_NOPROXY, "");
        if (o->ca_file && *o->ca_file) {
            curl_easy_setopt(h, CURLOPT_PROXY_CAINFO, o->ca_file);
        }
    }
    else {
        curl_easy_setopt(h, CURLOPT_PROXY, "");
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
    {
        apr_size_t most = c->ctx.clip ? c->ctx.max_download : o->max_body;

        if ((apr_uint64_t)most < ((apr_uint64_t)1 << 62)) {
            curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)most);
        }
    }
    curl_easy_setopt(h, CURLOPT_USERAGENT, o->user_agent ? o->user_agent : MSO_HTTP_UA);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, c->slist);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, c);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &c->ctx);

    if (with_body) {
        /* POSTFIELDS does not copy: body outlives the transfer. */
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, body ? body : "");
    }
    else {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    }
    if (strcmp(method, "PATCH") == 0 || strcmp(method, "DELETE") == 0
        || strcmp(method, "PUT") == 0) {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    }
    return APR_SUCCESS;

nomem:
    curl_slist_free_all(c->slist);
    c->slist = NULL;
    r->error = "out of memory";
    return APR_ENOMEM;
}

/* Frees the handle without looking at the outcome (cancelled requests). */
static void call_release(mso_http_call_t *c)
{
    if (c->h && c->kept_by) {
        /* Options back to defaults (they point into the call's pool);
         * connections and caches stay for the thread's next call. */
        curl_easy_reset(c->h);
        c->kept_by->busy = 0;
        c->kept_by = NULL;
        c->h = NULL;
    }
    else if (c->h) {
        curl_easy_cleanup(c->h);
        c->h = NULL;
    }
    curl_slist_free_all(c->slist);
    c->slist = NULL;
}

/* Turns curl's result into the response and frees the handle. why: the
 * request was stopped from outside (the batch's budget), rc is ignored. */
static apr_status_t call_end(mso_http_call_t *c, CURLcode rc, const char *why)
{
    mso_http_response_t *r = c->r;
    apr_pool_t *p = c->p;
    apr_status_t rv;
    long code = 0;

    if (c->h && !r->not_sent) {
        curl_easy_getinfo(c->h, CURLINFO_RESPONSE_CODE, &code);
    }
    r->status = (int)code;

    if (why) {
        rv = APR_TIMEUP;
        r->error = why;
    }
    else if (rc == CURLE_OK) {
        rv = APR_SUCCESS;
        if (c->ctx.buf) {
            /* Doubling may have left up to half unused: give it back. */
            if (c->ctx.cap - c->ctx.len > 65536) {
                char *nbuf = realloc(c->ctx.buf, c->ctx.len + 1);

                if (nbuf) {
                    c->ctx.buf = nbuf;
                    c->ctx.cap = c->ctx.len + 1;
                }
            }
            r->body = c->ctx.buf;
            r->body_len = c->ctx.len;
        }
        r->retry_after = parse_retry_after(apr_table_get(r->headers, "Retry-After"));
    }
    else if (c->sink_stopped) {
        rv = APR_ECONNABORTED;
        r->error = "the receiver of the body stopped it";
    }
    else if (c->ctx.no_memory) {
        rv = APR_ENOMEM;
        r->error = "out of memory for the response body";
    }
    else if (c->ctx.body_too_big || rc == CURLE_FILESIZE_EXCEEDED) {
        rv = APR_ENOSPC;
        if ((c->ctx.clip || c->streaming > 0)
            && (c->ctx.received + CURL_MAX_WRITE_SIZE > c->ctx.max_download
                || rc == CURLE_FILESIZE_EXCEEDED)) {
            r->error = apr_psprintf(p, "response body larger than %" APR_SIZE_T_FMT
                                    " bytes received", c->ctx.max_download);
        }
        else {
            r->error = apr_psprintf(p, "response body larger than %" APR_SIZE_T_FMT " bytes",
                                    c->max_body);
        }
    }
    else if (c->ctx.headers_too_big) {
        rv = APR_ENOSPC;
        r->error = "response headers too large";
    }
    else if (rc == CURLE_OPERATION_TIMEDOUT) {
        rv = APR_TIMEUP;
        r->error = curl_error(p, rc, c->errbuf);
    }
    else {
        rv = APR_EGENERAL;
        r->error = curl_error(p, rc, c->errbuf);
    }

    call_release(c);
    r->received = c->ctx.received;
    r->clipped = c->ctx.clip ? c->ctx.clip->clipped : 0;
    r->seconds = r->not_sent ? 0 : (double)(apr_time_now() - c->start) / APR_USEC_PER_SEC;
    if (rv != APR_SUCCESS && mso_log_is_level(MSO_LOG_DEBUG)) {
        mso_log_perror(MSO_LOG_MARK, MSO_LOG_DEBUG, rv, "HTTP %s %s failed after %.3fs: %s",
                       c->method, url_for_log(p, c->url), r->seconds, r->error);
    }
    return rv;
}

apr_status_t mso_http_request(apr_pool_t *p, const mso_http_opts_t *o, const char *method,
                              const char *url, const apr_array_header_t *headers,
                              const char *body, apr_size_t body_len,
                              mso_http_response_t **resp)
{
    mso_http_call_t *c = call_make(p, method, url);
    apr_status_t rv;
    CURLcode rc;

    *resp = c->r;
    c->blocking = 1;
    rv = call_setup(c, o, headers, body, body_len);
    if (rv != APR_SUCCESS) {
        return rv;
    }
    c->r->not_sent = 0;
    rc = curl_easy_perform(c->h);
    return call_end(c, rc, NULL);
}

apr_status_t mso_http_get_stream(apr_pool_t *p, const mso_http_opts_t *o, const char *url,
                                 const apr_array_header_t *headers, mso_http_sink_fn *sink,
                                 void *baton, mso_http_response_t **resp)
{
    mso_http_call_t *c = call_make(p, "GET", url);
    mso_http_opts_t raw;
    apr_status_t rv;
    CURLcode rc;

    *resp = c->r;
    if (o) {
        raw = *o;
    }
    else {
        mso_http_opts_default(&raw);
    }
    raw.max_string = 0;             /* not JSON: bytes as they are */
    raw.capture = NULL;
    c->blocking = 1;
    rv = call_setup(c, &raw, headers, NULL, 0);
    if (rv != APR_SUCCESS) {
        return rv;
    }
    c->sink = sink;
    c->sink_baton = baton;
    c->ctx.max_download = raw.max_download;
    curl_easy_setopt(c->h, CURLOPT_WRITEFUNCTION, stream_cb);
    /* max_body is for an error's body; the streamed one has its own cap. */
    curl_easy_setopt(c->h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)raw.max_download);
    c->r->not_sent = 0;
    rc = curl_easy_perform(c->h);
    return call_end(c, rc, NULL);
}

/* ---- many requests at once ---------------------------------------------- */

static void list_push(mso_http_call_t **head, mso_http_call_t **tail, mso_http_call_t *c)
{
    c->next = NULL;
    c->prev = *tail;
    if (*tail) {
        (*tail)->next = c;
    }
    else {
        *head = c;
    }
    *tail = c;
}

static void list_unlink(mso_http_call_t **head, mso_http_call_t **tail, mso_http_call_t *c)
{
    if (c->prev) {
        c->prev->next = c->next;
    }
    else {
        *head = c->next;
    }
    if (c->next) {
        c->next->prev = c->prev;
    }
    else {
        *tail = c->prev;
    }
    c->prev = c->next = NULL;
}

/* Takes the call out of the multi handle's books (not its easy handle). */
static void call_detach(mso_http_call_t *c)
{
    mso_http_multi_t *m = c->m;

    if (c->state == CALL_QUEUED) {
        list_unlink(&m->queue, &m->queue_tail, c);
    }
    else if (c->state == CALL_RUNNING) {
        list_unlink(&m->active, &m->active_tail, c);
        curl_multi_remove_handle(m->cm, c->h);
        m->running--;
    }
    /* The body is the caller's from now on (or freed with its pool). */
    call_unbudget(c);
    c->state = CALL_DONE;
}

/* The request's pool goes away before the request completed: cancel it, so
 * curl never writes into freed memory. */
static apr_status_t call_pool_gone(void *data)
{
    mso_http_call_t *c = data;

    if (c->state != CALL_DONE) {
        call_detach(c);
        call_release(c);
    }
    return APR_SUCCESS;
}

/* Ends a request and tells its owner. Nothing of c is touched after done:
 * the callback may destroy c's pool. */
static void call_complete(mso_http_call_t *c, CURLcode rc, const char *why)
{
    mso_http_done_fn *done = c->done;
    void *baton = c->baton;
    mso_http_response_t *r = c->r;
    mso_http_multi_t *m = c->m;
    apr_status_t rv;

    call_detach(c);
    apr_pool_cleanup_kill(c->p, c, call_pool_gone);
    rv = call_end(c, rc, why);
    if (!m || r->not_sent) {
        /* never left: not a request that had an outcome */
    }
    else if (rv != APR_SUCCESS || !r->status) {
        m->counts.failed++;
    }
    else if (r->status == 429 || r->status == 503) {
        m->counts.throttled++;
    }
    else if (r->status >= 500) {
        m->counts.server_error++;
    }
    else if (r->status >= 400) {
        m->counts.client_error++;
    }
    else {
        m->counts.ok++;
    }
    done(baton, rv, r);
}

void mso_http_multi_counts(mso_http_multi_t *m, mso_http_counts_t *add)
{
    if (!m) {
        return;
    }
    add->ok += m->counts.ok;
    add->throttled += m->counts.throttled;
    add->client_error += m->counts.client_error;
    add->server_error += m->counts.server_error;
    add->failed += m->counts.failed;
    memset(&m->counts, 0, sizeof(m->counts));
}

static apr_status_t multi_cleanup(void *data)
{
    mso_http_multi_t *m = data;
    mso_http_call_t *c;

    while ((c = m->active) != NULL || (c = m->queue) != NULL) {
        call_detach(c);
        apr_pool_cleanup_kill(c->p, c, call_pool_gone);
        call_release(c);
    }
    if (m->cm) {
        curl_multi_cleanup(m->cm);
        m->cm = NULL;
    }
    return APR_SUCCESS;
}

apr_status_t mso_http_multi_create(apr_pool_t *p, const mso_http_opts_t *o, int max_in_flight,
                                   int max_host_connections, mso_http_multi_t **mp)
{
    mso_http_multi_t *m;

    *mp = NULL;
    if (max_in_flight < 1 || max_host_connections < 1) {
        return APR_EINVAL;
    }
    m = apr_pcalloc(p, sizeof(*m));
    m->p = p;
    if (o) {
        m->o = *o;
        m->o.ca_file = o->ca_file ? apr_pstrdup(p, o->ca_file) : NULL;
        m->o.user_agent = o->user_agent ? apr_pstrdup(p, o->user_agent) : NULL;
    }
    else {
        mso_http_opts_default(&m->o);
    }
    m->max_in_flight = max_in_flight;
    m->cm = curl_multi_init();
    if (!m->cm) {
        return APR_ENOMEM;
    }
    /* The bound on connections: total and per host (Microsoft's endpoints
     * are few hosts); the cache keeps as many idle ones for reuse. */
    curl_multi_setopt(m->cm, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)max_in_flight);
    curl_multi_setopt(m->cm, CURLMOPT_MAX_HOST_CONNECTIONS, (long)max_host_connections);
    curl_multi_setopt(m->cm, CURLMOPT_MAXCONNECTS, (long)max_in_flight);
    curl_multi_setopt(m->cm, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    apr_pool_cleanup_register(p, m, multi_cleanup, apr_pool_cleanup_null);
    *mp = m;
    return APR_SUCCESS;
}

void mso_http_multi_destroy(mso_http_multi_t *m)
{
    if (m) {
        apr_pool_cleanup_run(m->p, m, multi_cleanup);
    }
}

static apr_status_t multi_add(mso_http_multi_t *m, apr_pool_t *p, const mso_http_opts_t *o,
                              int cls, const char *method, const char *url,
                              const apr_array_header_t *headers, const char *body,
                              apr_size_t body_len, mso_http_done_fn *done, void *baton)
{
    mso_http_call_t *c;
    apr_status_t rv;

    if (!m || !m->cm || !p || !done) {
        return APR_EINVAL;
    }
    if (m->aborting) {
        return APR_TIMEUP;
    }
    c = call_make(p, method, url);
    c->cls = cls;
    rv = call_setup(c, o, headers, body, body_len);
    if (rv != APR_SUCCESS) {
        if (mso_log_is_level(MSO_LOG_DEBUG)) {
            mso_log_perror(MSO_LOG_MARK, MSO_LOG_DEBUG, rv, "HTTP %s refused: %s",
                           method ? method : "?", c->r->error);
        }
        return rv;
    }
    c->m = m;
    c->done = done;
    c->baton = baton;
    c->state = CALL_QUEUED;
    list_push(&m->queue, &m->queue_tail, c);
    apr_pool_cleanup_register(p, c, call_pool_gone, apr_pool_cleanup_null);
    return APR_SUCCESS;
}

apr_status_t mso_http_multi_add(mso_http_multi_t *m, apr_pool_t *p, const char *method,
                                const char *url, const apr_array_header_t *headers,
                                const char *body, apr_size_t body_len,
                                mso_http_done_fn *done, void *baton)
{
    return multi_add(m, p, m ? &m->o : NULL, 0, method, url, headers, body, body_len, done,
                     baton);
}

apr_status_t mso_http_multi_add_raw(mso_http_multi_t *m, apr_pool_t *p, const char *url,
                                    const apr_array_header_t *headers, apr_size_t max_body,
                                    mso_http_done_fn *done, void *baton)
{
    mso_http_opts_t raw;

    if (!m) {
        return APR_EINVAL;
    }
    raw = m->o;
    raw.max_string = 0;
    raw.capture = NULL;
    raw.max_body = max_body;
    return multi_add(m, p, &raw, m->o.download_budget ? 1 : 0, "GET", url, headers, NULL, 0,
                     done, baton);
}

/* Hands waiting requests to curl while there is room. */
static void multi_start(mso_http_multi_t *m)
{
    mso_http_call_t *c;

    while (m->running < m->max_in_flight && (c = m->queue) != NULL) {
        list_unlink(&m->queue, &m->queue_tail, c);
        c->start = apr_time_now();
        c->r->not_sent = 0;
        if (curl_multi_add_handle(m->cm, c->h) != CURLM_OK) {
            c->state = CALL_DONE;
            c->r->not_sent = 1;
            apr_pool_cleanup_kill(c->p, c, call_pool_gone);
            c->done(c->baton, call_end(c, CURLE_OUT_OF_MEMORY, NULL), c->r);
            continue;
        }
        c->state = CALL_RUNNING;
        list_push(&m->active, &m->active_tail, c);
        m->running++;
    }
}

/* Completes every finished transfer curl reports. */
static void multi_reap(mso_http_multi_t *m)
{
    CURLMsg *msg;
    int left;

    while ((msg = curl_multi_info_read(m->cm, &left)) != NULL) {
        mso_http_call_t *c;
        char *priv = NULL;

        if (msg->msg != CURLMSG_DONE) {
            continue;
        }
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
        c = (mso_http_call_t *)(void *)priv;
        if (c && c->state == CALL_RUNNING) {
            call_complete(c, msg->data.result, NULL);
        }
    }
}

/* Completes whatever is left, started or not. */
static void multi_abort(mso_http_multi_t *m, CURLcode rc, const char *started_why,
                        const char *queued_why)
{
    mso_http_call_t *c;

    m->aborting = 1;
    while ((c = m->active) != NULL) {
        call_complete(c, rc, started_why);
    }
    while ((c = m->queue) != NULL) {
        call_complete(c, rc, queued_why);
    }
    m->aborting = 0;
}

/* Memory went back (a request completed or was cut): the paused requests
 * try again, and one of them may become the new leader. */
static void multi_wake(mso_http_multi_t *m)
{
    mso_http_call_t *c;

    m->freed = 0;
    for (c = m->active; c && m->paused; c = c->next) {
        if (c->paused) {
            c->paused = 0;
            m->paused--;
            /* curl may call write_cb from here, which may pause it again. */
            curl_easy_pause(c->h, CURLPAUSE_CONT);
        }
    }
}

/* Completes what was never started, when the run's budget is spent. */
static void multi_cut_queued(mso_http_multi_t *m)
{
    mso_http_call_t *c;

    m->aborting = 1;
    while ((c = m->queue) != NULL) {
        call_complete(c, CURLE_OK, "the batch's time budget ran out before the request "
                                   "was sent");
    }
    m->aborting = 0;
}

apr_status_t mso_http_multi_run(mso_http_multi_t *m, apr_interval_time_t budget)
{
    apr_time_t deadline = apr_time_now() + budget, hard, left;
    apr_status_t result = APR_SUCCESS;
    CURLMcode mc;
    int still = 0;

    if (!m || !m->cm) {
        return APR_EINVAL;
    }
    hard = deadline + (m->o.grace_ms > 0 ? apr_time_from_msec(m->o.grace_ms) : 0);
    for (;;) {
        if (!m->queue && !m->active) {
            return result;
        }
        if (m->o.stop && *m->o.stop) {
            multi_abort(m, CURLE_OK, "stopped: the server is shutting down",
                        "stopped before the request was sent: the server is shutting down");
            return APR_TIMEUP;
        }
        left = hard - apr_time_now();
        if (left <= 0) {
            multi_abort(m, CURLE_OK, "the batch's time budget ran out during the request",
                        "the batch's time budget ran out before the request was sent");
            return APR_TIMEUP;
        }
        if (m->queue && apr_time_now() >= deadline) {
            /* In the grace period: what started may finish, nothing new starts. */
            multi_cut_queued(m);
            result = APR_TIMEUP;
            continue;
        }
        multi_start(m);
        mc = curl_multi_perform(m->cm, &still);
        if (mc != CURLM_OK) {
            const char *why = apr_pstrcat(m->p, "curl multi: ", curl_multi_strerror(mc), NULL);

            mso_log_perror(MSO_LOG_MARK, MSO_LOG_ERR, APR_EGENERAL, "HTTP batch failed: %s",
                           why);
            /* CURLE_FAILED_INIT: reported as a transport error, not a timeout. */
            multi_abort(m, CURLE_FAILED_INIT, NULL, NULL);
            return APR_EGENERAL;
        }
        multi_reap(m);
        if (m->freed && m->paused) {
            multi_wake(m);
            continue;
        }
        if (!m->active || (m->queue && m->running < m->max_in_flight)) {
            continue;   /* start the next ones before waiting */
        }
        left = (m->queue ? deadline : hard) - apr_time_now();
        if (left > 0) {
            int ms = left > apr_time_from_sec(1) ? 1000 : (int)((left + 999) / 1000);

            /* curl shortens the wait to its own next timeout. */
            curl_multi_poll(m->cm, NULL, 0, ms, NULL);
        }
    }
}

apr_size_t mso_http_multi_peak(const mso_http_multi_t *m, int *pauses)
{
    if (pauses) {
        *pauses = m ? m->pauses : 0;
    }
    return m ? m->peak : 0;
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
