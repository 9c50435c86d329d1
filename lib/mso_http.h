/* HTTP calls to Microsoft through libcurl: timeouts on everything, a cap on
 * the response size, no CR/LF in header values, Retry-After handed back. */
#ifndef MSO_HTTP_H
#define MSO_HTTP_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

typedef struct {
    long connect_timeout_ms;    /* TCP + TLS connect; default 10000 */
    long timeout_ms;            /* whole call; default 30000 */
    long stall_seconds;         /* abort when < 1 byte/s for this long; default 15 */
    apr_size_t max_body;        /* response cap in bytes; default 4 MiB */
    const char *ca_file;        /* optional CA bundle (tests against a TLS simulator) */
    const char *user_agent;     /* default "mod_msoauth/VERSION" */
} mso_http_opts_t;

typedef struct {
    int status;                 /* HTTP status; 0 when there was no response */
    apr_table_t *headers;       /* response headers, names as received (apr_table is case-insensitive) */
    const char *body;           /* NUL-terminated; "" when empty */
    apr_size_t body_len;
    long retry_after;           /* seconds from Retry-After (delta or HTTP date), -1 if absent */
    const char *error;          /* transport failure in words (never contains the body) */
    double seconds;             /* time the call took */
} mso_http_response_t;

/* Global libcurl set-up; call once per process before threads (post_config / test main). */
apr_status_t mso_http_global_init(void);

void mso_http_opts_default(mso_http_opts_t *o);

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
