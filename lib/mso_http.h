/* HTTP calls to Microsoft through libcurl: timeouts on everything, a cap on
 * the response size, no CR/LF in header values, Retry-After handed back.
 * A body is held in one malloc'ed buffer that grows by realloc and is freed
 * with the request's pool: a request holds about its body, no more. */
#ifndef MSO_HTTP_H
#define MSO_HTTP_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

typedef struct {
    long connect_timeout_ms;    /* TCP + TLS connect; default 10000 */
    long timeout_ms;            /* whole call; default 30000 */
    long stall_seconds;         /* abort when < 1 byte/s for this long; default 15 */
    apr_size_t max_body;        /* response cap in bytes (what is kept); default 4 MiB */
    const char *ca_file;        /* optional CA bundle instead of the system's (also for
                                 * an https:// proxy) */
    /* A proxy URL (http://, https://, socks5h://) every call goes through;
     * NULL or "": none. A proxy from the environment (http_proxy,
     * https_proxy, all_proxy, no_proxy) is never used: only the
     * configuration says where secrets and tokens are sent. */
    const char *proxy;
    const char *user_agent;     /* default "mod_msoauth/VERSION" */
    /* > 0: the answer is JSON and goes through mso_json's clip as it arrives
     * (mso_json.h): a string longer than this is cut and marked, so one huge
     * value never makes the whole answer too big. max_body then caps what is
     * kept, and max_download what is received (0: max_body). */
    apr_size_t max_string;
    apr_size_t max_download;
    /* With max_string: keys of top-level members whose string values are
     * handed back in the response's captured table, even when the answer
     * is refused (too big, not JSON). NULL-terminated, static storage. */
    const char *const *capture;
    /* Multi handle only. buffer_budget > 0: bytes that the bodies of its
     * running requests may hold together. A request whose buffer would grow
     * past it is paused until memory is freed, except one (the first to
     * reach the budget, until it completes), so there is no deadlock and
     * the bodies held at any time stay below
     *     buffer_budget + max_body + MSO_HTTP_GROW_SLACK
     * (max_body being what one request may keep). A body is no longer
     * counted once handed to done. grace_ms > 0: requests already started
     * when the run's budget ends may go on this long (their own timeouts
     * still apply); queued ones are cut. stop: when another thread sets
     * *stop, the run cuts everything within about a second. */
    apr_size_t buffer_budget;
    long grace_ms;
    const volatile int *stop;
    /* Multi handle only. download_budget > 0: the raw downloads
     * (mso_http_multi_add_raw) have a budget of their own, kept as above
     * but apart from buffer_budget, so a large download never pauses the
     * other requests, nor they it. Bodies held at once then stay below
     *     buffer_budget + max_body + download_budget + the largest raw
     *     download's max_body + 2 x MSO_HTTP_GROW_SLACK.
     * 0: raw downloads count against buffer_budget with the rest. */
    apr_size_t download_budget;
    /* mso_http_request and mso_http_get_stream only. 1: the call runs on
     * the curl handle its thread keeps, and its connection stays open for
     * the thread's next call (request threads). 0: a handle of its own,
     * closed at the end. A thread that may still run while the process
     * exits (the job's) must not keep one: freeing it at the thread's end
     * would come after OpenSSL's clean-up at exit. */
    int keep_connection;
} mso_http_opts_t;

/* What one write of curl may add to a buffer beyond max_body before the cap
 * is seen (the clip's worst case for one 16 KiB write of curl, and the
 * terminating NUL). */
#define MSO_HTTP_GROW_SLACK (6 * 16384 + 64)

typedef struct {
    int status;                 /* HTTP status; 0 when there was no response */
    apr_table_t *headers;       /* response headers, names as received (apr_table is case-insensitive) */
    const char *body;           /* NUL-terminated; "" when empty */
    apr_size_t body_len;
    long retry_after;           /* seconds from Retry-After (delta or HTTP date), -1 if absent */
    const char *error;          /* transport failure in words (never contains the body) */
    double seconds;             /* time the call took */
    int not_sent;               /* 1: the request never left this process (refused,
                                 * or a batch's budget ran out before it started) */
    apr_size_t received;        /* body bytes received (before the clip) */
    apr_size_t clipped;         /* strings the clip cut */
    apr_table_t *captured;      /* see mso_http_opts_t.capture; NULL when none */
} mso_http_response_t;

/* Global libcurl set-up; call once per process before threads (post_config / test main). */
apr_status_t mso_http_global_init(void);

void mso_http_opts_default(mso_http_opts_t *o);

/* With keep_connection, mso_http_request and mso_http_get_stream keep one
 * curl handle per thread, with its open connections, for the thread's next
 * call; a thread's exit frees it. This frees the calling thread's now. */
void mso_http_thread_done(void);

/* One request. headers: "Name: value" strings (may be NULL). Returns
 * APR_SUCCESS whenever a response arrived (whatever its status), APR_TIMEUP
 * on a timeout or stall, APR_ENOSPC when the body exceeded max_body,
 * APR_EINVAL for a header value holding CR or LF (nothing is sent), and
 * APR_EGENERAL for other transport errors (DNS, refused, TLS); *resp is set
 * in every case with error filled in. */
apr_status_t mso_http_request(apr_pool_t *p, const mso_http_opts_t *o, const char *method,
                              const char *url, const apr_array_header_t *headers,
                              const char *body, apr_size_t body_len,
                              mso_http_response_t **resp);

/* Many requests at once over libcurl's multi interface, on one thread: at
 * most max_in_flight requests are handed to curl at a time (the rest wait,
 * in the order added), at most max_host_connections connections go to one
 * host, and connections stay open between requests and between runs, so
 * later requests to the same host reuse them. Every request gets the same
 * options, timeouts and caps as mso_http_request. */
typedef struct mso_http_multi_t mso_http_multi_t;

/* Called once per request that mso_http_multi_add accepted, from inside
 * mso_http_multi_run, with what mso_http_request would have returned. It may
 * add requests, and may destroy its own request's pool, but must not run or
 * destroy the multi handle. */
typedef void mso_http_done_fn(void *baton, apr_status_t rv, mso_http_response_t *resp);

/* o: NULL for the defaults (copied). The handle and its connections live
 * until mso_http_multi_destroy or p's cleanup. APR_EINVAL when a bound < 1. */
apr_status_t mso_http_multi_create(apr_pool_t *p, const mso_http_opts_t *o, int max_in_flight,
                                   int max_host_connections, mso_http_multi_t **m);

/* Queues one request, checked like mso_http_request: refused input returns
 * APR_EINVAL (APR_ENOMEM, APR_TIMEUP while the budget is being enforced) and
 * done is NOT called; otherwise APR_SUCCESS and done is called exactly once.
 * p holds the response and must outlive the request, or be destroyed (which
 * cancels it without calling done); body and headers must stay valid until
 * done is called. */
apr_status_t mso_http_multi_add(mso_http_multi_t *m, apr_pool_t *p, const char *method,
                                const char *url, const apr_array_header_t *headers,
                                const char *body, apr_size_t body_len,
                                mso_http_done_fn *done, void *baton);

/* A GET whose answer is kept as received (no JSON clip, whatever the
 * handle's options say), up to max_body bytes (more: APR_ENOSPC): file
 * contents. Otherwise as mso_http_multi_add. */
apr_status_t mso_http_multi_add_raw(mso_http_multi_t *m, apr_pool_t *p, const char *url,
                                    const apr_array_header_t *headers, apr_size_t max_body,
                                    mso_http_done_fn *done, void *baton);

/* Runs until every queued request has completed, calling done for each as
 * it completes. When budget runs out (budget <= 0: already out), what is
 * left completes with APR_TIMEUP (resp->not_sent for those never started)
 * and APR_TIMEUP is returned; APR_EGENERAL when curl itself failed (every
 * request left completes with it); APR_SUCCESS otherwise. */
apr_status_t mso_http_multi_run(mso_http_multi_t *m, apr_interval_time_t budget);

/* Cancels what is queued (without calling done), closes the connections. */
void mso_http_multi_destroy(mso_http_multi_t *m);

/* The most body bytes its running requests held at once since it was
 * created (allocated, not only used), and how often one was paused for the
 * budget. */
apr_size_t mso_http_multi_peak(const mso_http_multi_t *m, int *pauses);

/* A GET whose 2xx body is handed to sink piece by piece as it arrives,
 * never held: resp->status and resp->headers are known at the first call.
 * Other answers are kept in resp->body (up to max_body) as with
 * mso_http_request; the clip does not apply. The streamed body is capped
 * by max_download (0: no cap beyond the timeouts). A sink that returns
 * anything but APR_SUCCESS stops the transfer: APR_ECONNABORTED. Otherwise
 * returns what mso_http_request would (resp->received: bytes streamed). */
typedef apr_status_t mso_http_sink_fn(void *baton, const mso_http_response_t *resp,
                                      const char *data, apr_size_t len);

apr_status_t mso_http_get_stream(apr_pool_t *p, const mso_http_opts_t *o, const char *url,
                                 const apr_array_header_t *headers, mso_http_sink_fn *sink,
                                 void *baton, mso_http_response_t **resp);
/* What the requests of a multi handle ended in (those that were sent): a
 * 2xx/3xx answer, 429 or 503 (Microsoft asks to wait), another 4xx or 5xx,
 * or no answer (connection, TLS, timeout, a body over the cap). */
typedef struct {
    apr_int64_t ok, throttled, client_error, server_error, failed;
} mso_http_counts_t;

/* Adds the handle's outcomes since the last call to *add, and counts afresh. */
void mso_http_multi_counts(mso_http_multi_t *m, mso_http_counts_t *add);

/* application/x-www-form-urlencoded from NULL-terminated name, value pairs;
 * a pair whose value is NULL is left out. */
char *mso_form_encode(apr_pool_t *p, ...);
/* Percent-encodes everything but unreserved characters (RFC 3986). */
char *mso_url_encode(apr_pool_t *p, const char *s);
/* Decodes one query/form component (+ is space). NULL on bad escapes or NUL bytes. */
char *mso_url_decode(apr_pool_t *p, const char *s);

/* Parses a query string (a=1&b=2) into params. Returns NULL, or why it is
 * refused: a bad escape, or a parameter given twice (no guessing which one). */
const char *mso_query_parse(apr_pool_t *p, const char *query, apr_table_t **params);

#endif
