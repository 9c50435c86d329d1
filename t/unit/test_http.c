/* Checks of the HTTP client (lib/mso_http) against a small HTTP/1.1 server
 * running in a thread of the test process itself. Each test gets its own
 * server from the checked fixture, so it works with and without CK_FORK. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strcasestr */
#endif
#include <check.h>

#include "unit.h"
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <apr_date.h>
#include <apr_general.h>
#include <apr_strings.h>
#include <apr_time.h>

#include "mso_http.h"
#include "mso_json.h"

/* ---- the server ---------------------------------------------------------- */

typedef struct {
    int lfd;
    int wake[2];
    int port;
    int conns;              /* accepted connections, read with __atomic */
    int open;               /* connections open now, and the most at once */
    int max_open;
    int threads;            /* connection threads still running */
    pthread_t thread;
} server_t;

static server_t srv;
/* The test thread's pool: the server thread never touches it. */
static apr_pool_t *pool;

/* MSG_NOSIGNAL: the client hangs up on purpose in the max_body tests. */
static void send_all(int fd, const char *buf, size_t len)
{
    ssize_t n;

    while (len) {
        n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n <= 0) {
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

static void send_str(int fd, const char *s)
{
    send_all(fd, s, strlen(s));
}

/* Holds the connection open, sending nothing, until the client gives up. */
static void wait_for_close(int fd)
{
    struct pollfd pfd = {fd, POLLIN, 0};
    char c;

    while (poll(&pfd, 1, 3000) > 0 && recv(fd, &c, 1, 0) > 0) {
    }
}

/* Reads one request: header block plus Content-Length bytes of body.
 * Returns its length, or 0 when the client sent nothing usable. */
static size_t read_request(int fd, char *buf, size_t size)
{
    struct pollfd pfd = {fd, POLLIN, 0};
    size_t len = 0, want = 0;
    const char *end, *cl;
    ssize_t n;

    while (len < size - 1) {
        if (poll(&pfd, 1, 2000) <= 0) {
            return 0;
        }
        n = recv(fd, buf + len, size - 1 - len, 0);
        if (n <= 0) {
            return 0;
        }
        len += (size_t)n;
        buf[len] = '\0';
        end = strstr(buf, "\r\n\r\n");
        if (!end) {
            continue;
        }
        if (!want) {
            cl = strcasestr(buf, "\r\nContent-Length:");
            want = (size_t)(end + 4 - buf) + (cl && cl < end ? strtoul(cl + 17, NULL, 10) : 0);
        }
        if (len >= want) {
            return len;
        }
    }
    return len;
}

/* Returns 1 when the connection stays open for another request, 0 when it
 * closes, -1 when it closes and is no longer counted as open. */
static int respond(int fd, const char *req, size_t req_len)
{
    char path[128] = "";
    char date[APR_RFC822_DATE_LEN];
    char big[5000];
    char head[256];
    const char *sp = strchr(req, ' ');

    if (sp) {
        sscanf(sp + 1, "%127s", path);
    }
    memset(big, 'x', sizeof(big));
    if (strncmp(path, "http://", 7) == 0) {
        /* The absolute form: a client that takes this server for its proxy. */
        snprintf(head, sizeof(head), "HTTP/1.1 200 OK\r\nContent-Length: %lu\r\n"
                 "Connection: close\r\n\r\nproxied %s", (unsigned long)(8 + strlen(path)),
                 path);
        send_str(fd, head);
    }
    else if (strcmp(path, "/ok") == 0) {
        send_str(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Test: yes\r\n"
                     "X-Multi: a\r\nX-Multi: b\r\nX-Spaces:   padded  \r\n"
                     "Content-Length: 5\r\nConnection: close\r\n\r\nhello");
    }
    else if (strcmp(path, "/empty") == 0) {
        send_str(fd, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    }
    else if (strcmp(path, "/continue") == 0) {
        send_str(fd, "HTTP/1.1 100 Continue\r\nX-Early: 1\r\n\r\n"
                     "HTTP/1.1 201 Created\r\nX-Late: 2\r\nContent-Length: 2\r\n"
                     "Connection: close\r\n\r\nok");
    }
    else if (strcmp(path, "/redirect") == 0) {
        send_str(fd, "HTTP/1.1 302 Found\r\nLocation: /ok\r\nContent-Length: 0\r\n"
                     "Connection: close\r\n\r\n");
    }
    else if (strncmp(path, "/retry/", 7) == 0) {
        const char *v = path + 7;

        /* Paths can't hold spaces: "date+N" / "date-N" stand for HTTP dates. */
        if (strncmp(v, "date", 4) == 0) {
            apr_rfc822_date(date, apr_time_now() + apr_time_from_sec(atol(v + 4)));
            v = date;
        }
        snprintf(head, sizeof(head), "HTTP/1.1 %s\r\nRetry-After: %s\r\n"
                 "Content-Length: 0\r\nConnection: close\r\n\r\n",
                 v == date ? "503 Service Unavailable" : "429 Too Many Requests", v);
        send_str(fd, head);
    }
    else if (strcmp(path, "/big") == 0 || strcmp(path, "/limit") == 0) {
        size_t n = strcmp(path, "/big") == 0 ? sizeof(big) : 1000;

        snprintf(head, sizeof(head), "HTTP/1.1 200 OK\r\nContent-Length: %lu\r\n"
                 "Connection: close\r\n\r\n", (unsigned long)n);
        send_str(fd, head);
        send_all(fd, big, n);
    }
    else if (strcmp(path, "/big-close") == 0) {
        /* No Content-Length: only the write callback can stop this one. */
        send_str(fd, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        send_all(fd, big, sizeof(big));
    }
    else if (strcmp(path, "/stall") == 0) {
        wait_for_close(fd);
    }
    else if (strcmp(path, "/stall-body") == 0) {
        send_str(fd, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"
                     "0123456789");
        wait_for_close(fd);
    }
    else if (strcmp(path, "/slow") == 0) {
        usleep(300 * 1000);
        /* No longer counted as open once the client can have the answer: it
         * may connect again before this thread gets to run after the send. */
        __atomic_sub_fetch(&srv.open, 1, __ATOMIC_SEQ_CST);
        send_str(fd, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nslow");
        return -1;
    }
    else if (strcmp(path, "/ka") == 0 || strcmp(path, "/ka-slow") == 0) {
        /* Keep-alive: the client may send its next request on this connection. */
        if (strcmp(path, "/ka-slow") == 0) {
            usleep(100 * 1000);
        }
        send_str(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nka");
        return 1;
    }
    else if (strncmp(path, "/json/", 6) == 0 || strncmp(path, "/bytes/", 7) == 0) {
        /* /json/N: {"a":"<N bytes or a little more of escapes and UTF-8>","b":"end"};
         * /bytes/N: N bytes. */
        static const char *const parts[] = {"\xc3\xa9", "\\n", "\xf0\x9f\x98\x80", "x",
                                            "\\ud83d\\ude00", "\xe2\x82\xac"};
        int json = path[1] == 'j';
        size_t n = strtoul(path + (json ? 6 : 7), NULL, 10), len = 0, i;
        char *body = malloc(n + 64);

        if (json) {
            memcpy(body, "{\"a\":\"", 6);
            len = 6;
            for (i = 0; len < n + 6; i++) {
                const char *pt = parts[i % (sizeof(parts) / sizeof(parts[0]))];

                memcpy(body + len, pt, strlen(pt));
                len += strlen(pt);
            }
            memcpy(body + len, "\",\"b\":\"end\"}", 12);
            len += 12;
        }
        else {
            memset(body, 'y', n);
            len = n;
        }
        snprintf(head, sizeof(head), "HTTP/1.1 200 OK\r\nContent-Length: %lu\r\n"
                 "Connection: close\r\n\r\n", (unsigned long)len);
        send_str(fd, head);
        send_all(fd, body, len);
        free(body);
    }
    else if (strncmp(path, "/half/", 6) == 0) {
        /* Announces N bytes, sends half of them, then stalls. */
        size_t n = strtoul(path + 6, NULL, 10);
        char *body = malloc(n / 2 + 1);

        memset(body, 'z', n / 2);
        snprintf(head, sizeof(head), "HTTP/1.1 200 OK\r\nContent-Length: %lu\r\n"
                 "Connection: close\r\n\r\n", (unsigned long)n);
        send_str(fd, head);
        send_all(fd, body, n / 2);
        free(body);
        wait_for_close(fd);
    }
    else if (strcmp(path, "/echo") == 0) {
        snprintf(head, sizeof(head), "HTTP/1.1 200 OK\r\nContent-Length: %lu\r\n"
                 "Connection: close\r\n\r\n", (unsigned long)req_len);
        send_str(fd, head);
        send_all(fd, req, req_len);
    }
    else {
        send_str(fd, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    return 0;
}

/* One connection, in its own thread, so concurrent clients are served at
 * once and the test can see how many connections were open together. */
static void *serve_conn(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char req[65536];
    size_t len;
    int open, max, more = 1;

    open = __atomic_add_fetch(&srv.open, 1, __ATOMIC_SEQ_CST);
    max = __atomic_load_n(&srv.max_open, __ATOMIC_SEQ_CST);
    while (open > max
           && !__atomic_compare_exchange_n(&srv.max_open, &max, open, 0, __ATOMIC_SEQ_CST,
                                           __ATOMIC_SEQ_CST)) {
    }
    while (more == 1 && (len = read_request(fd, req, sizeof(req))) != 0) {
        more = respond(fd, req, len);
    }
    if (more != -1) {           /* -1: respond already stopped counting it */
        __atomic_sub_fetch(&srv.open, 1, __ATOMIC_SEQ_CST);
    }
    close(fd);
    __atomic_sub_fetch(&srv.threads, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void *serve(void *arg)
{
    struct pollfd pfd[2] = {{srv.lfd, POLLIN, 0}, {srv.wake[0], POLLIN, 0}};
    pthread_attr_t attr;
    pthread_t t;
    int fd;

    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        if (pfd[1].revents) {
            break;
        }
        fd = accept(srv.lfd, NULL, NULL);
        if (fd < 0) {
            continue;
        }
        __atomic_add_fetch(&srv.conns, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&srv.threads, 1, __ATOMIC_SEQ_CST);
        if (pthread_create(&t, &attr, serve_conn, (void *)(intptr_t)fd) != 0) {
            __atomic_sub_fetch(&srv.threads, 1, __ATOMIC_SEQ_CST);
            close(fd);
        }
    }
    pthread_attr_destroy(&attr);
    return NULL;
}

static int bound_socket(int *port)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    ck_assert_int_ge(fd, 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
    *port = ntohs(sa.sin_port);
    return fd;
}

static void setup(void)
{
    apr_pool_create(&pool, NULL);
    memset(&srv, 0, sizeof(srv));
    srv.lfd = bound_socket(&srv.port);
    ck_assert_int_eq(listen(srv.lfd, 16), 0);
    ck_assert_int_eq(pipe(srv.wake), 0);
    ck_assert_int_eq(pthread_create(&srv.thread, NULL, serve, NULL), 0);
}

static void teardown(void)
{
    int i;

    /* First the connections: the thread's kept handle, and the pool's
     * (a multi handle keeps its own open). */
    mso_http_thread_done();
    apr_pool_destroy(pool);
    ck_assert_int_eq(write(srv.wake[1], "x", 1), 1);
    pthread_join(srv.thread, NULL);
    /* Connection threads end when their client hangs up or goes quiet. */
    for (i = 0; i < 100 && __atomic_load_n(&srv.threads, __ATOMIC_SEQ_CST); i++) {
        usleep(50 * 1000);
    }
    close(srv.lfd);
    close(srv.wake[0]);
    close(srv.wake[1]);
}

/* ---- helpers ------------------------------------------------------------- */

static int conns(void)
{
    return __atomic_load_n(&srv.conns, __ATOMIC_SEQ_CST);
}

static const char *url(const char *path)
{
    return apr_psprintf(pool, "http://127.0.0.1:%d%s", srv.port, path);
}

static mso_http_opts_t fast_opts(void)
{
    mso_http_opts_t o;

    mso_http_opts_default(&o);
    o.connect_timeout_ms = 1000;
    o.timeout_ms = 2000;
    o.stall_seconds = 2;
    o.max_body = 1000;
    return o;
}

static apr_array_header_t *hdrs(const char *h1, const char *h2)
{
    apr_array_header_t *a = apr_array_make(pool, 2, sizeof(const char *));

    if (h1) {
        APR_ARRAY_PUSH(a, const char *) = h1;
    }
    if (h2) {
        APR_ARRAY_PUSH(a, const char *) = h2;
    }
    return a;
}

static mso_http_response_t *get(const char *path, apr_status_t want)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;

    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url(path), NULL, NULL, 0, &r), want);
    ck_assert_ptr_nonnull(r);
    ck_assert_ptr_nonnull(r->body);
    ck_assert_ptr_nonnull(r->headers);
    return r;
}

/* A call on the thread's kept handle (keep_connection). */
static mso_http_response_t *get_kept(const char *path, apr_array_header_t *h)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;

    o.keep_connection = 1;
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url(path), h, NULL, 0, &r),
                     APR_SUCCESS);
    return r;
}

/* The request's header block as the server saw it (/echo). */
static const char *echoed_header_block(const mso_http_response_t *r)
{
    const char *end = strstr(r->body, "\r\n\r\n");

    ck_assert_ptr_nonnull(end);
    return apr_pstrndup(pool, r->body, (apr_size_t)(end - r->body));
}

/* The request body as the server saw it, after the header block. */
static const char *echoed_body(const mso_http_response_t *r)
{
    const char *b = strstr(r->body, "\r\n\r\n");

    ck_assert_ptr_nonnull(b);
    return b + 4;
}

static int count_header(const apr_table_t *t, const char *name)
{
    const apr_array_header_t *a = apr_table_elts(t);
    const apr_table_entry_t *e = (const apr_table_entry_t *)a->elts;
    int i, n = 0;

    for (i = 0; i < a->nelts; i++) {
        if (strcasecmp(e[i].key, name) == 0) {
            n++;
        }
        ck_assert(strncmp(e[i].key, "HTTP/", 5) != 0);
    }
    return n;
}

/* ---- tests --------------------------------------------------------------- */

START_TEST(ok_with_headers)
{
    mso_http_response_t *r = get("/ok", APR_SUCCESS);

    ck_assert_int_eq(r->status, 200);
    ck_assert_str_eq(r->body, "hello");
    ck_assert_uint_eq(r->body_len, 5);
    ck_assert_str_eq(apr_table_get(r->headers, "x-test"), "yes");
    ck_assert_str_eq(apr_table_get(r->headers, "X-Spaces"), "padded");
    ck_assert_str_eq(apr_table_get(r->headers, "Content-Type"), "text/plain");
    ck_assert_int_eq(count_header(r->headers, "X-Multi"), 2);
    ck_assert_int_eq(r->retry_after, -1);
    ck_assert_ptr_null(r->error);
    ck_assert(r->seconds >= 0 && r->seconds < 2);

    r = get("/empty", APR_SUCCESS);
    ck_assert_int_eq(r->status, 204);
    ck_assert_str_eq(r->body, "");
    ck_assert_uint_eq(r->body_len, 0);

    r = get("/nothing-here", APR_SUCCESS);
    ck_assert_int_eq(r->status, 404);
}
END_TEST

/* MSOAuthHTTPProxy: every call goes through the configured proxy, whatever
 * no_proxy says; without one, never through a proxy of the environment. */
START_TEST(proxy_from_the_configuration_only)
{
    static const char *const vars[] = {"http_proxy", "HTTP_PROXY", "https_proxy",
                                       "HTTPS_PROXY", "all_proxy", "ALL_PROXY", NULL};
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    int i;

    o.proxy = url("");
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", "http://login.example.invalid/tenant/x",
                                      NULL, NULL, 0, &r), APR_SUCCESS);
    ck_assert_int_eq(r->status, 200);
    ck_assert_str_eq(r->body, "proxied http://login.example.invalid/tenant/x");

    /* A dead proxy in every variable curl would read: not used. */
    for (i = 0; vars[i]; i++) {
        setenv(vars[i], "http://127.0.0.1:1", 1);
    }
    setenv("no_proxy", "*", 1);
    r = get("/ok", APR_SUCCESS);
    ck_assert_int_eq(r->status, 200);
    ck_assert_str_eq(r->body, "hello");
    /* and no_proxy exempts nothing from the configured one */
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/ok"), NULL, NULL, 0, &r),
                     APR_SUCCESS);
    ck_assert_str_eq(r->body, apr_pstrcat(pool, "proxied ", url("/ok"), NULL));
    for (i = 0; vars[i]; i++) {
        unsetenv(vars[i]);
    }
    unsetenv("no_proxy");
}
END_TEST

START_TEST(last_header_block)
{
    mso_http_response_t *r = get("/continue", APR_SUCCESS);

    ck_assert_int_eq(r->status, 201);
    ck_assert_str_eq(r->body, "ok");
    ck_assert_ptr_null(apr_table_get(r->headers, "X-Early"));
    ck_assert_str_eq(apr_table_get(r->headers, "X-Late"), "2");
}
END_TEST

START_TEST(no_redirects)
{
    mso_http_response_t *r = get("/redirect", APR_SUCCESS);

    ck_assert_int_eq(r->status, 302);
    ck_assert_str_eq(apr_table_get(r->headers, "Location"), "/ok");
    ck_assert_int_eq(conns(), 1);
}
END_TEST

START_TEST(retry_after)
{
    mso_http_response_t *r = get("/retry/7", APR_SUCCESS);

    ck_assert_int_eq(r->status, 429);
    ck_assert_int_eq(r->retry_after, 7);

    r = get("/retry/date+120", APR_SUCCESS);
    ck_assert_int_eq(r->status, 503);
    ck_assert_int_ge(r->retry_after, 115);
    ck_assert_int_le(r->retry_after, 120);

    ck_assert_int_eq(get("/retry/date-600", APR_SUCCESS)->retry_after, 0);
    ck_assert_int_eq(get("/retry/date+999999", APR_SUCCESS)->retry_after, 86400);
    ck_assert_int_eq(get("/retry/0", APR_SUCCESS)->retry_after, 0);
    ck_assert_int_eq(get("/retry/86401", APR_SUCCESS)->retry_after, 86400);
    ck_assert_int_eq(get("/retry/99999999999999999999999", APR_SUCCESS)->retry_after, 86400);
    ck_assert_int_eq(get("/retry/-5", APR_SUCCESS)->retry_after, -1);
    ck_assert_int_eq(get("/retry/soon", APR_SUCCESS)->retry_after, -1);
    ck_assert_int_eq(get("/retry/7x", APR_SUCCESS)->retry_after, -1);
}
END_TEST

START_TEST(max_body)
{
    mso_http_response_t *r;

    /* Content-Length announces too much; then no length at all. */
    r = get("/big", APR_ENOSPC);
    ck_assert_ptr_nonnull(r->error);
    ck_assert_str_eq(r->body, "");
    r = get("/big-close", APR_ENOSPC);
    ck_assert_ptr_nonnull(r->error);
    ck_assert_ptr_null(strstr(r->error, "xxxx"));
    ck_assert_str_eq(r->body, "");
    /* Exactly the cap is fine. */
    r = get("/limit", APR_SUCCESS);
    ck_assert_uint_eq(r->body_len, 1000);
    ck_assert_uint_eq(strlen(r->body), 1000);
}
END_TEST

START_TEST(timeout)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    apr_time_t start = apr_time_now();

    o.timeout_ms = 300;
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/stall"), NULL, NULL, 0, &r),
                     APR_TIMEUP);
    ck_assert_ptr_nonnull(r->error);
    ck_assert_int_eq(r->status, 0);
    ck_assert(apr_time_now() - start < apr_time_from_msec(1500));
    ck_assert(r->seconds >= 0.25 && r->seconds < 1.5);
}
END_TEST

START_TEST(stall)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;

    /* Nothing comes back: the low-speed limit trips long before the overall
     * timeout. (After some bytes arrived, curl averages speed over a few
     * seconds, so a mid-body stall is detected later than stall_seconds.) */
    o.timeout_ms = 4000;
    o.stall_seconds = 1;
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/stall"), NULL, NULL, 0, &r),
                     APR_TIMEUP);
    ck_assert_ptr_nonnull(strstr(r->error, "too slow"));
    ck_assert(r->seconds < 2.5);

    /* Timeout in the middle of a body: no partial body handed back. */
    o.timeout_ms = 300;
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/stall-body"), NULL, NULL, 0, &r),
                     APR_TIMEUP);
    ck_assert_ptr_nonnull(r->error);
    ck_assert_int_eq(r->status, 200);
    ck_assert_str_eq(r->body, "");
}
END_TEST

START_TEST(refused)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    int port;
    /* Bound but not listening: the port is ours, and connecting is refused. */
    int fd = bound_socket(&port);

    ck_assert_int_eq(mso_http_request(pool, &o, "GET",
                                      apr_psprintf(pool, "http://127.0.0.1:%d/", port),
                                      NULL, NULL, 0, &r),
                     APR_EGENERAL);
    close(fd);
    ck_assert_int_eq(r->status, 0);
    ck_assert_ptr_nonnull(r->error);
    ck_assert_int_gt(strlen(r->error), 0);
    ck_assert_str_eq(r->body, "");
}
END_TEST

START_TEST(refuse_bad_input)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;

    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/ok"),
                                      hdrs("Accept: text/plain", "X-Bad: a\r\nOrigin: evil"),
                                      NULL, 0, &r),
                     APR_EINVAL);
    ck_assert_ptr_nonnull(r->error);
    ck_assert_int_eq(r->status, 0);
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/ok"), hdrs("X-Bad: a\nb", NULL),
                                      NULL, 0, &r),
                     APR_EINVAL);
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/ok"), hdrs("X-Bad: a\rb", NULL),
                                      NULL, 0, &r),
                     APR_EINVAL);
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/ok x"), NULL, NULL, 0, &r),
                     APR_EINVAL);
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/ok\r\nX: y"), NULL, NULL, 0, &r),
                     APR_EINVAL);
    ck_assert_int_eq(mso_http_request(pool, &o, "TRACE", url("/ok"), NULL, "x", 1, &r),
                     APR_EINVAL);
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/ok"), NULL, "x", 1, &r),
                     APR_EINVAL);
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", "file:///etc/passwd", NULL, NULL, 0,
                                      &r),
                     APR_EGENERAL);
    /* None of this reached the server; the next good request is its first. */
    get("/ok", APR_SUCCESS);
    ck_assert_int_eq(conns(), 1);
}
END_TEST

START_TEST(echo_post_form)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    const char *form = mso_form_encode(pool, "grant_type", "authorization_code",
                                       "code", "a b&c=d/\xc3\xa9", NULL);

    ck_assert_int_eq(mso_http_request(pool, &o, "POST", url("/echo"),
                                      hdrs("Content-Type: application/x-www-form-urlencoded",
                                           "Accept: application/json"),
                                      form, strlen(form), &r),
                     APR_SUCCESS);
    ck_assert_int_eq(r->status, 200);
    ck_assert(strncmp(r->body, "POST /echo HTTP/1.1\r\n", 21) == 0);
    ck_assert_str_eq(echoed_body(r), "grant_type=authorization_code&code=a%20b%26c%3Dd%2F%C3%A9");
    ck_assert_ptr_nonnull(strstr(r->body, "\r\nContent-Type: application/x-www-form-urlencoded\r\n"));
    ck_assert_ptr_nonnull(strstr(r->body, "\r\nAccept: application/json\r\n"));
    ck_assert_ptr_nonnull(strstr(r->body, "\r\nUser-Agent: mod_msoauth/"));
    ck_assert_ptr_null(strcasestr(r->body, "\r\nOrigin:"));
    ck_assert_ptr_null(strcasestr(r->body, "\r\nExpect:"));
}
END_TEST

START_TEST(echo_methods)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    const char *json = "{\"displayName\":\"x\"}";

    o.user_agent = "tester/1";
    ck_assert_int_eq(mso_http_request(pool, &o, "PATCH", url("/echo"),
                                      hdrs("Content-Type: application/json", NULL),
                                      json, strlen(json), &r),
                     APR_SUCCESS);
    ck_assert(strncmp(r->body, "PATCH /echo HTTP/1.1\r\n", 22) == 0);
    ck_assert_str_eq(echoed_body(r), json);
    ck_assert_ptr_nonnull(strstr(r->body, "\r\nContent-Type: application/json\r\n"));
    ck_assert_ptr_nonnull(strstr(r->body, "\r\nUser-Agent: tester/1\r\n"));
    ck_assert_ptr_null(strcasestr(r->body, "\r\nOrigin:"));

    ck_assert_int_eq(mso_http_request(pool, &o, "DELETE", url("/echo"),
                                      hdrs("Authorization: Bearer t0k", NULL), NULL, 0, &r),
                     APR_SUCCESS);
    ck_assert(strncmp(r->body, "DELETE /echo HTTP/1.1\r\n", 23) == 0);
    ck_assert_ptr_nonnull(strstr(r->body, "\r\nAuthorization: Bearer t0k\r\n"));
    ck_assert_str_eq(echoed_body(r), "");

    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/echo"), NULL, NULL, 0, &r),
                     APR_SUCCESS);
    ck_assert(strncmp(r->body, "GET /echo HTTP/1.1\r\n", 20) == 0);
    ck_assert_ptr_null(strcasestr(r->body, "\r\nContent-Length:"));
    ck_assert_ptr_null(strcasestr(r->body, "\r\nOrigin:"));

    /* PUT (an upload fragment): bytes as given, NUL included. */
    ck_assert_int_eq(mso_http_request(pool, &o, "PUT", url("/echo"),
                                      hdrs("Content-Range: bytes 0-3/4", NULL), "a\0b\xff", 4,
                                      &r),
                     APR_SUCCESS);
    ck_assert(strncmp(r->body, "PUT /echo HTTP/1.1\r\n", 20) == 0);
    ck_assert_ptr_nonnull(strcasestr(r->body, "\r\nContent-Length: 4\r\n"));
    ck_assert_ptr_nonnull(strstr(r->body, "\r\nContent-Range: bytes 0-3/4\r\n"));
    ck_assert_int_eq(memcmp(r->body + r->body_len - 4, "a\0b\xff", 4), 0);

    /* POST with no body still sends Content-Length: 0. */
    ck_assert_int_eq(mso_http_request(pool, &o, "POST", url("/echo"), NULL, NULL, 0, &r),
                     APR_SUCCESS);
    ck_assert_ptr_nonnull(strcasestr(r->body, "\r\nContent-Length: 0\r\n"));
}
END_TEST

START_TEST(encoding)
{
    ck_assert_str_eq(mso_url_encode(pool, "a b&c=d/\xc3\xa9"), "a%20b%26c%3Dd%2F%C3%A9");
    ck_assert_str_eq(mso_url_encode(pool, "AZaz09-._~"), "AZaz09-._~");
    ck_assert_str_eq(mso_url_encode(pool, "\x01+%\x7f\xff"), "%01%2B%25%7F%FF");
    ck_assert_str_eq(mso_url_encode(pool, ""), "");

    ck_assert_str_eq(mso_form_encode(pool, "a", "1", "skip", NULL, "b c", "~x y", NULL),
                     "a=1&b%20c=~x%20y");
    ck_assert_str_eq(mso_form_encode(pool, "only", NULL, NULL), "");
    ck_assert_str_eq(mso_form_encode(pool, NULL), "");
    ck_assert_str_eq(mso_form_encode(pool, "e", "", NULL), "e=");

    ck_assert_str_eq(mso_url_decode(pool, "a+b%20c%2f%2F"), "a b c//");
    ck_assert_str_eq(mso_url_decode(pool, "a%20b%26c%3Dd%2F%C3%A9"), "a b&c=d/\xc3\xa9");
    ck_assert_str_eq(mso_url_decode(pool, "~"), "~");
    ck_assert_str_eq(mso_url_decode(pool, ""), "");
    ck_assert_str_eq(mso_url_decode(pool, mso_url_encode(pool, "x+y z~%")), "x+y z~%");
    ck_assert_ptr_null(mso_url_decode(pool, "%zz"));
    ck_assert_ptr_null(mso_url_decode(pool, "%0"));
    ck_assert_ptr_null(mso_url_decode(pool, "%00"));
    ck_assert_ptr_null(mso_url_decode(pool, "ab%"));
    ck_assert_ptr_null(mso_url_decode(pool, "%g1"));
    ck_assert_ptr_null(mso_url_decode(pool, "%1g"));
    ck_assert_ptr_null(mso_url_decode(pool, NULL));
}
END_TEST

START_TEST(defaults)
{
    mso_http_opts_t o;

    mso_http_opts_default(&o);
    ck_assert_int_eq(o.connect_timeout_ms, 10000);
    ck_assert_int_eq(o.timeout_ms, 30000);
    ck_assert_int_eq(o.stall_seconds, 15);
    ck_assert_uint_eq(o.max_body, 4 * 1024 * 1024);
    ck_assert_ptr_null(o.ca_file);
    ck_assert(strncmp(o.user_agent, "mod_msoauth/", 12) == 0);
    ck_assert_int_eq(mso_http_global_init(), APR_SUCCESS);
}
END_TEST


/* ---- many requests at once ------------------------------------------------ */

typedef struct {
    apr_status_t rv;
    mso_http_response_t *resp;
    int calls;
    apr_time_t at;
} result_t;

static void on_done(void *baton, apr_status_t rv, mso_http_response_t *resp)
{
    result_t *r = baton;

    r->rv = rv;
    r->resp = resp;
    r->calls++;
    r->at = apr_time_now();
}

static int max_open(void)
{
    return __atomic_load_n(&srv.max_open, __ATOMIC_SEQ_CST);
}

static mso_http_multi_t *multi(const mso_http_opts_t *o, int in_flight, int per_host)
{
    mso_http_multi_t *m = NULL;

    ck_assert_int_eq(mso_http_multi_create(pool, o, in_flight, per_host, &m), APR_SUCCESS);
    ck_assert_ptr_nonnull(m);
    return m;
}

/* Adds n GETs of path, runs them, and returns how long the run took. */
static apr_interval_time_t run_gets(mso_http_multi_t *m, const char *path, result_t *res,
                                    int n, apr_status_t want)
{
    apr_time_t start;
    int i;

    memset(res, 0, sizeof(*res) * n);
    for (i = 0; i < n; i++) {
        ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url(path), NULL, NULL, 0, on_done,
                                            &res[i]), APR_SUCCESS);
    }
    start = apr_time_now();
    ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_sec(10)), want);
    return apr_time_now() - start;
}

/* The outcomes a multi handle counts for the metrics, and counts afresh. */
START_TEST(multi_counts_outcomes)
{
    static const char *const paths[] = {"/ok", "/empty", "/retry/5", "/retry/date+5",
                                        "/nothing-here", "/stall", NULL};
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m;
    mso_http_counts_t n;
    result_t res[8];
    int i;

    o.stall_seconds = 1;
    o.timeout_ms = 1500;
    m = multi(&o, 8, 8);
    memset(res, 0, sizeof(res));
    for (i = 0; paths[i]; i++) {
        ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url(paths[i]), NULL, NULL, 0,
                                            on_done, &res[i]), APR_SUCCESS);
    }
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", "http://127.0.0.1:1/", NULL, NULL, 0,
                                        on_done, &res[i]), APR_SUCCESS);
    mso_http_multi_run(m, apr_time_from_sec(10));
    memset(&n, 0, sizeof(n));
    mso_http_multi_counts(m, &n);
    ck_assert_int_eq(n.ok, 2);
    ck_assert_int_eq(n.throttled, 2);          /* 429 and 503 */
    ck_assert_int_eq(n.client_error, 1);       /* 404 */
    ck_assert_int_eq(n.server_error, 0);
    ck_assert_int_eq(n.failed, 2);             /* a stall and a refused connection */
    mso_http_multi_counts(m, &n);
    ck_assert_int_eq(n.ok + n.throttled + n.client_error + n.failed, 7);
    mso_http_multi_counts(NULL, &n);
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(multi_concurrent)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m = multi(&o, 6, 6);
    result_t res[6];
    apr_interval_time_t took;
    int i;

    /* Six requests of 300 ms each: together, not one after the other. */
    took = run_gets(m, "/slow", res, 6, APR_SUCCESS);
    for (i = 0; i < 6; i++) {
        ck_assert_int_eq(res[i].calls, 1);
        ck_assert_int_eq(res[i].rv, APR_SUCCESS);
        ck_assert_int_eq(res[i].resp->status, 200);
        ck_assert_str_eq(res[i].resp->body, "slow");
        ck_assert_int_eq(res[i].resp->not_sent, 0);
    }
    ck_assert_msg(took < apr_time_from_msec(1200), "took %ld ms", (long)(took / 1000));
    ck_assert_int_ge(max_open(), 3);
    ck_assert_int_eq(conns(), 6);
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(multi_max_in_flight)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m = multi(&o, 2, 8);
    result_t res[6];
    apr_interval_time_t took;
    int i;

    took = run_gets(m, "/slow", res, 6, APR_SUCCESS);
    for (i = 0; i < 6; i++) {
        ck_assert_int_eq(res[i].calls, 1);
        ck_assert_int_eq(res[i].rv, APR_SUCCESS);
        ck_assert_int_eq(res[i].resp->status, 200);
    }
    ck_assert_int_le(max_open(), 2);
    /* Three rounds of two. */
    ck_assert_msg(took >= apr_time_from_msec(850), "took %ld ms", (long)(took / 1000));
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(multi_max_host_connections)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m = multi(&o, 6, 2);
    result_t res[6];
    int i;

    run_gets(m, "/slow", res, 6, APR_SUCCESS);
    for (i = 0; i < 6; i++) {
        ck_assert_int_eq(res[i].rv, APR_SUCCESS);
        ck_assert_str_eq(res[i].resp->body, "slow");
    }
    ck_assert_int_le(max_open(), 2);
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(multi_stall_times_out_alone)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m;
    result_t res[4];
    apr_time_t start;
    int i;

    o.timeout_ms = 500;
    m = multi(&o, 4, 4);
    memset(res, 0, sizeof(res));
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/stall"), NULL, NULL, 0, on_done,
                                        &res[0]), APR_SUCCESS);
    for (i = 1; i < 4; i++) {
        ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok"), NULL, NULL, 0, on_done,
                                            &res[i]), APR_SUCCESS);
    }
    start = apr_time_now();
    ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_sec(10)), APR_SUCCESS);
    ck_assert(apr_time_now() - start < apr_time_from_msec(1500));
    ck_assert_int_eq(res[0].calls, 1);
    ck_assert_int_eq(res[0].rv, APR_TIMEUP);
    ck_assert_int_eq(res[0].resp->status, 0);
    ck_assert_ptr_nonnull(res[0].resp->error);
    ck_assert_int_eq(res[0].resp->not_sent, 0);
    ck_assert(res[0].resp->seconds >= 0.4 && res[0].resp->seconds < 1.5);
    for (i = 1; i < 4; i++) {
        ck_assert_int_eq(res[i].calls, 1);
        ck_assert_int_eq(res[i].rv, APR_SUCCESS);
        ck_assert_str_eq(res[i].resp->body, "hello");
        ck_assert_str_eq(apr_table_get(res[i].resp->headers, "X-Test"), "yes");
    }
}
END_TEST

START_TEST(multi_budget)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m;
    result_t res[2], again;
    apr_time_t start;

    /* One at a time: the stalled request holds the slot until the budget ends. */
    o.timeout_ms = 5000;
    o.stall_seconds = 5;
    m = multi(&o, 1, 1);
    memset(res, 0, sizeof(res));
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/stall"), NULL, NULL, 0, on_done,
                                        &res[0]), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok"), NULL, NULL, 0, on_done,
                                        &res[1]), APR_SUCCESS);
    start = apr_time_now();
    ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_msec(300)), APR_TIMEUP);
    ck_assert(apr_time_now() - start < apr_time_from_msec(1000));
    ck_assert_int_eq(res[0].calls, 1);
    ck_assert_int_eq(res[0].rv, APR_TIMEUP);
    ck_assert_int_eq(res[0].resp->not_sent, 0);
    ck_assert_ptr_nonnull(res[0].resp->error);
    ck_assert_int_eq(res[1].calls, 1);
    ck_assert_int_eq(res[1].rv, APR_TIMEUP);
    ck_assert_int_eq(res[1].resp->not_sent, 1);
    ck_assert_int_eq(res[1].resp->status, 0);
    ck_assert_int_eq(conns(), 1);

    /* A budget already spent: nothing is sent. */
    memset(&again, 0, sizeof(again));
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok"), NULL, NULL, 0, on_done,
                                        &again), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_run(m, 0), APR_TIMEUP);
    ck_assert_int_eq(again.rv, APR_TIMEUP);
    ck_assert_int_eq(again.resp->not_sent, 1);
    ck_assert_int_eq(conns(), 1);

    /* The handle still works afterwards. */
    memset(&again, 0, sizeof(again));
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok"), NULL, NULL, 0, on_done,
                                        &again), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_sec(5)), APR_SUCCESS);
    ck_assert_int_eq(again.rv, APR_SUCCESS);
    ck_assert_int_eq(again.resp->status, 200);
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(multi_reuses_connections)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m = multi(&o, 4, 2);
    result_t res[10];
    int i;

    run_gets(m, "/ka-slow", res, 10, APR_SUCCESS);
    for (i = 0; i < 10; i++) {
        ck_assert_int_eq(res[i].rv, APR_SUCCESS);
        ck_assert_str_eq(res[i].resp->body, "ka");
    }
    ck_assert_int_le(conns(), 2);
    ck_assert_int_le(max_open(), 2);
    /* A later run on the same handle still uses the open connections. */
    run_gets(m, "/ka", res, 5, APR_SUCCESS);
    for (i = 0; i < 5; i++) {
        ck_assert_int_eq(res[i].rv, APR_SUCCESS);
    }
    ck_assert_int_le(conns(), 2);
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(multi_refuse_bad_input)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m = multi(&o, 4, 4);
    mso_http_multi_t *none = NULL;
    result_t res;

    memset(&res, 0, sizeof(res));
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok"),
                                        hdrs("Accept: text/plain", "X-Bad: a\r\nOrigin: evil"),
                                        NULL, 0, on_done, &res), APR_EINVAL);
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok"), hdrs("X-Bad: a\nb", NULL),
                                        NULL, 0, on_done, &res), APR_EINVAL);
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok\r\nX: y"), NULL, NULL, 0,
                                        on_done, &res), APR_EINVAL);
    ck_assert_int_eq(mso_http_multi_add(m, pool, "TRACE", url("/ok"), NULL, "x", 1, on_done,
                                        &res), APR_EINVAL);
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok"), NULL, NULL, 0, NULL, NULL),
                     APR_EINVAL);
    ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_sec(5)), APR_SUCCESS);
    ck_assert_int_eq(res.calls, 0);
    ck_assert_int_eq(conns(), 0);
    ck_assert_int_eq(mso_http_multi_create(pool, &o, 0, 4, &none), APR_EINVAL);
    ck_assert_int_eq(mso_http_multi_create(pool, &o, 4, 0, &none), APR_EINVAL);

    /* POST through the multi handle sends the same request as the sync path. */
    {
        const char *form = mso_form_encode(pool, "grant_type", "refresh_token", "x", "a b",
                                           NULL);

        ck_assert_int_eq(mso_http_multi_add(m, pool, "POST", url("/echo"),
                                            hdrs("Content-Type: application/x-www-form-"
                                                 "urlencoded", NULL),
                                            form, strlen(form), on_done, &res), APR_SUCCESS);
        ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_sec(5)), APR_SUCCESS);
        ck_assert_int_eq(res.calls, 1);
        ck_assert_int_eq(res.rv, APR_SUCCESS);
        ck_assert(strncmp(res.resp->body, "POST /echo HTTP/1.1\r\n", 21) == 0);
        ck_assert_str_eq(echoed_body(res.resp), "grant_type=refresh_token&x=a%20b");
        ck_assert_ptr_nonnull(strstr(res.resp->body, "\r\nUser-Agent: mod_msoauth/"));
        ck_assert_ptr_null(strcasestr(res.resp->body, "\r\nExpect:"));
    }
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(multi_caps_and_cancel)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m = multi(&o, 4, 4);
    result_t res[3], gone;
    apr_pool_t *sub;

    /* The body cap and Retry-After behave as in the sync path. */
    memset(res, 0, sizeof(res));
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/big"), NULL, NULL, 0, on_done,
                                        &res[0]), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/retry/7"), NULL, NULL, 0,
                                        on_done, &res[1]), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/limit"), NULL, NULL, 0, on_done,
                                        &res[2]), APR_SUCCESS);
    /* A request whose pool goes away before the run is cancelled quietly. */
    memset(&gone, 0, sizeof(gone));
    apr_pool_create(&sub, pool);
    ck_assert_int_eq(mso_http_multi_add(m, sub, "GET", url("/ok"), NULL, NULL, 0, on_done,
                                        &gone), APR_SUCCESS);
    apr_pool_destroy(sub);
    ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_sec(5)), APR_SUCCESS);
    ck_assert_int_eq(res[0].rv, APR_ENOSPC);
    ck_assert_str_eq(res[0].resp->body, "");
    ck_assert_int_eq(res[1].rv, APR_SUCCESS);
    ck_assert_int_eq(res[1].resp->status, 429);
    ck_assert_int_eq(res[1].resp->retry_after, 7);
    ck_assert_int_eq(res[2].rv, APR_SUCCESS);
    ck_assert_uint_eq(res[2].resp->body_len, 1000);
    ck_assert_int_eq(gone.calls, 0);
    ck_assert_int_eq(conns(), 3);

    /* Destroying the handle drops what is queued without calling back. */
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok"), NULL, NULL, 0, on_done,
                                        &gone), APR_SUCCESS);
    mso_http_multi_destroy(m);
    ck_assert_int_eq(gone.calls, 0);
    ck_assert_int_eq(conns(), 3);
}
END_TEST

/* ---- the clip and the memory budget --------------------------------------- */

START_TEST(clip_json_strings)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    const char *err = NULL;
    json_t *j;
    const char *a;
    size_t alen;

    /* 300 KB in one string, past the 64 KB cap: refused whole without the clip. */
    o.max_body = 65536;
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/json/300000"), NULL, NULL, 0, &r),
                     APR_ENOSPC);
    /* With it, the string is cut (in curl's many writes, at any offset) and
     * the rest of the document kept. */
    o.max_string = 1000;
    o.max_download = 400000;
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/json/300000"), NULL, NULL, 0, &r),
                     APR_SUCCESS);
    ck_assert_uint_eq(r->clipped, 1);
    ck_assert_uint_ge(r->received, 300000);
    ck_assert_uint_lt(r->body_len, 1100);
    j = mso_json_parse_flags(pool, r->body, r->body_len, JSON_ALLOW_NUL, &err);
    ck_assert_msg(j != NULL, "%s", err);
    a = json_string_value(json_object_get(j, "a"));
    alen = json_string_length(json_object_get(j, "a"));
    ck_assert_uint_gt(alen, 500);
    ck_assert_int_eq(a[alen - 1], '\0');
    ck_assert(strncmp(a, "\xc3\xa9\n\xf0\x9f\x98\x80x\xf0\x9f\x98\x80\xe2\x82\xac", 15) == 0);
    ck_assert_str_eq(json_string_value(json_object_get(j, "b")), "end");
    /* What is received is capped too. */
    o.max_download = 200000;
    ck_assert_int_eq(mso_http_request(pool, &o, "GET", url("/json/300000"), NULL, NULL, 0, &r),
                     APR_ENOSPC);
    ck_assert_ptr_nonnull(strstr(r->error, "received"));
    ck_assert_str_eq(r->body, "");
}
END_TEST

START_TEST(multi_memory_budget)
{
    enum { N = 24, SIZE = 512 * 1024 };
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m;
    result_t res[N];
    apr_size_t peak;
    int i, pauses = 0;
    const char *path = apr_psprintf(pool, "/bytes/%d", SIZE);

    /* Without a budget, 24 answers of 512 KiB at once are all held together.
     * (The server's listen queue holds 16: a SYN may need its retry.) */
    o.max_body = 2 * SIZE;
    o.timeout_ms = 20000;
    o.connect_timeout_ms = 5000;
    m = multi(&o, N, N);
    run_gets(m, path, res, N, APR_SUCCESS);
    for (i = 0; i < N; i++) {
        ck_assert_msg(res[i].rv == APR_SUCCESS, "%d: %s", i, res[i].resp->error);
        ck_assert_uint_eq(res[i].resp->body_len, SIZE);
    }
    ck_assert_uint_ge(mso_http_multi_peak(m, &pauses), (apr_size_t)N * SIZE / 2);
    ck_assert_int_eq(pauses, 0);
    mso_http_multi_destroy(m);

    /* With a budget of 4 answers: the same answers, never more than the
     * budget plus one body held, and no deadlock. */
    o.buffer_budget = 4 * SIZE;
    m = multi(&o, N, N);
    run_gets(m, path, res, N, APR_SUCCESS);
    for (i = 0; i < N; i++) {
        ck_assert_int_eq(res[i].calls, 1);
        ck_assert_msg(res[i].rv == APR_SUCCESS, "%d: %s", i, res[i].resp->error);
        ck_assert_uint_eq(res[i].resp->body_len, SIZE);
        ck_assert_uint_eq(strspn(res[i].resp->body, "y"), SIZE);
    }
    peak = mso_http_multi_peak(m, &pauses);
    ck_assert_msg(peak <= o.buffer_budget + o.max_body + MSO_HTTP_GROW_SLACK,
                  "peak %lu", (unsigned long)peak);
    ck_assert_int_gt(pauses, 0);
    /* Paused transfers keep their connections (how many overlap depends on
     * the machine's load: at least more than one). */
    ck_assert_int_ge(max_open(), 2);
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(multi_budget_with_clip)
{
    enum { N = 16 };
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m;
    result_t res[N];
    int i, pauses = 0;

    /* Clipped answers under a tight budget: every one completes and parses. */
    o.max_body = 256 * 1024;
    o.max_string = 200 * 1024;
    o.max_download = 4 << 20;
    o.buffer_budget = 512 * 1024;
    o.timeout_ms = 20000;
    o.connect_timeout_ms = 5000;
    m = multi(&o, N, N);
    run_gets(m, "/json/600000", res, N, APR_SUCCESS);
    for (i = 0; i < N; i++) {
        const char *err = NULL;
        json_t *j;

        ck_assert_int_eq(res[i].rv, APR_SUCCESS);
        ck_assert_uint_eq(res[i].resp->clipped, 1);
        j = mso_json_parse_flags(pool, res[i].resp->body, res[i].resp->body_len,
                                 JSON_ALLOW_NUL, &err);
        ck_assert_msg(j != NULL, "%s", err);
        ck_assert_str_eq(json_string_value(json_object_get(j, "b")), "end");
    }
    ck_assert_uint_le(mso_http_multi_peak(m, &pauses),
                      o.buffer_budget + o.max_body + MSO_HTTP_GROW_SLACK);
    ck_assert_int_gt(pauses, 0);
    mso_http_multi_destroy(m);
}
END_TEST

/* ---- raw downloads and streams ------------------------------------------- */

START_TEST(multi_raw_downloads)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m;
    result_t res[3];
    int i;

    /* A handle for JSON (clip, small bodies) downloads raw bytes as they are. */
    o.max_string = 1000;
    o.max_body = 4096;
    o.max_download = 1 << 20;
    m = multi(&o, 4, 4);
    memset(res, 0, sizeof(res));
    ck_assert_int_eq(mso_http_multi_add_raw(m, pool, url("/json/600000"), NULL, 700000,
                                            on_done, &res[0]), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_add_raw(m, pool, url("/bytes/5000"), NULL, 4999,
                                            on_done, &res[1]), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/json/600000"), NULL, NULL, 0,
                                        on_done, &res[2]), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_sec(10)), APR_SUCCESS);
    for (i = 0; i < 3; i++) {
        ck_assert_int_eq(res[i].calls, 1);
    }
    ck_assert_int_eq(res[0].rv, APR_SUCCESS);
    ck_assert_uint_ge(res[0].resp->body_len, 600000);
    ck_assert_uint_eq(res[0].resp->clipped, 0);
    ck_assert_ptr_nonnull(strstr(res[0].resp->body, "\"b\":\"end\"}"));
    /* One byte over its own cap. */
    ck_assert_int_eq(res[1].rv, APR_ENOSPC);
    /* The same answer through the handle's own options is clipped. */
    ck_assert_int_eq(res[2].rv, APR_SUCCESS);
    ck_assert_uint_eq(res[2].resp->clipped, 1);
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(multi_download_budget)
{
    enum { N = 4 };
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m;
    result_t res[N], dl;
    apr_time_t start;
    apr_size_t peak;
    int i, pauses = 0;

    /* A download that holds more than its budget and then stalls never
     * pauses the other requests: they have a budget of their own. */
    o.max_body = 512 * 1024;
    o.buffer_budget = 256 * 1024;
    o.download_budget = 256 * 1024;
    o.timeout_ms = 20000;
    o.stall_seconds = 2;
    m = multi(&o, N + 1, N + 1);
    memset(&dl, 0, sizeof(dl));
    memset(res, 0, sizeof(res));
    ck_assert_int_eq(mso_http_multi_add_raw(m, pool, url("/half/2000000"), NULL, 2000000,
                                            on_done, &dl), APR_SUCCESS);
    for (i = 0; i < N; i++) {
        ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/bytes/400000"), NULL, NULL,
                                            0, on_done, &res[i]), APR_SUCCESS);
    }
    start = apr_time_now();
    mso_http_multi_run(m, apr_time_from_sec(10));
    ck_assert_int_eq(dl.calls, 1);
    /* Cut by the stall check or by the server giving up first. */
    ck_assert_int_ne(dl.rv, APR_SUCCESS);
    ck_assert_int_ge(dl.at - start, apr_time_from_msec(1500));
    for (i = 0; i < N; i++) {
        ck_assert_int_eq(res[i].rv, APR_SUCCESS);
        ck_assert_uint_eq(res[i].resp->body_len, 400000);
        ck_assert_msg(res[i].at - start < apr_time_from_msec(1500), "request %d waited %ld ms",
                      i, (long)((res[i].at - start) / 1000));
    }
    peak = mso_http_multi_peak(m, &pauses);
    ck_assert_msg(peak <= o.buffer_budget + o.max_body + o.download_budget + 2000000
                         + 2 * MSO_HTTP_GROW_SLACK, "peak %lu", (unsigned long)peak);
    ck_assert_uint_ge(peak, 1000000);
    mso_http_multi_destroy(m);
}
END_TEST

typedef struct {
    apr_size_t got;
    int calls;
    int status;
    int stop_after;             /* > 0: refuse the call after this many */
    const char *type;
    int nested;                 /* 1: the first call makes a request of its own */
    int nested_status;
} sink_t;

static apr_status_t sink(void *baton, const mso_http_response_t *resp, const char *data,
                         apr_size_t len)
{
    sink_t *k = baton;
    apr_size_t i;

    k->calls++;
    k->status = resp->status;
    if (k->nested && k->calls == 1) {
        /* The thread's handle is busy with the stream: this one gets its own. */
        k->nested_status = get_kept("/ka", NULL)->status;
    }
    k->type = apr_table_get(resp->headers, "Content-Type");
    for (i = 0; i < len; i++) {
        if (data[i] != 'y' && data[i] != 'x') {
            ck_abort_msg("byte %lu is %d", (unsigned long)(k->got + i), data[i]);
        }
    }
    k->got += len;
    return k->stop_after && k->calls >= k->stop_after ? APR_EGENERAL : APR_SUCCESS;
}

START_TEST(stream_get)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    sink_t k;

    /* Far more than max_body: streamed, never held. */
    memset(&k, 0, sizeof(k));
    ck_assert_int_eq(mso_http_get_stream(pool, &o, url("/bytes/3000000"), NULL, sink, &k, &r),
                     APR_SUCCESS);
    ck_assert_uint_eq(k.got, 3000000);
    ck_assert_uint_eq(r->received, 3000000);
    ck_assert_int_eq(k.status, 200);
    ck_assert_int_eq(r->status, 200);
    ck_assert_str_eq(r->body, "");
    /* Not a 2xx: the answer is kept for reading, the sink sees nothing. */
    memset(&k, 0, sizeof(k));
    ck_assert_int_eq(mso_http_get_stream(pool, &o, url("/retry/7"), NULL, sink, &k, &r),
                     APR_SUCCESS);
    ck_assert_int_eq(k.calls, 0);
    ck_assert_int_eq(r->status, 429);
    ck_assert_int_eq(r->retry_after, 7);
    /* The receiver stops it. */
    memset(&k, 0, sizeof(k));
    k.stop_after = 1;
    ck_assert_int_eq(mso_http_get_stream(pool, &o, url("/bytes/3000000"), NULL, sink, &k, &r),
                     APR_ECONNABORTED);
    ck_assert_int_eq(k.calls, 1);
    /* max_download caps what is streamed. */
    memset(&k, 0, sizeof(k));
    o.max_download = 100000;
    ck_assert_int_eq(mso_http_get_stream(pool, &o, url("/bytes/3000000"), NULL, sink, &k, &r),
                     APR_ENOSPC);
    ck_assert_uint_le(k.got, 100000);
    /* A body without Content-Length hits the cap in the write callback. */
    memset(&k, 0, sizeof(k));
    o.max_download = 1000;
    ck_assert_int_eq(mso_http_get_stream(pool, &o, url("/big-close"), NULL, sink, &k, &r),
                     APR_ENOSPC);
    ck_assert_uint_le(k.got, 1000);
}
END_TEST

START_TEST(stream_with_a_call_inside)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    sink_t k;

    int n;

    memset(&k, 0, sizeof(k));
    k.nested = 1;
    o.keep_connection = 1;
    ck_assert_int_eq(mso_http_get_stream(pool, &o, url("/bytes/300000"), NULL, sink, &k, &r),
                     APR_SUCCESS);
    ck_assert_uint_eq(k.got, 300000);
    ck_assert_int_eq(k.nested_status, 200);
    /* The nested call's handle was closed; the thread's own is free again,
     * and the next two calls share its connection. */
    n = conns();
    ck_assert_str_eq(get_kept("/ka", NULL)->body, "ka");
    ck_assert_str_eq(get_kept("/ka", NULL)->body, "ka");
    ck_assert_int_eq(conns() - n, 1);
}
END_TEST

static void *get_ka_elsewhere(void *arg)
{
    apr_pool_t *p;
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    int *status = arg;

    o.keep_connection = 1;
    apr_pool_create(&p, NULL);
    if (mso_http_request(p, &o, "GET", apr_psprintf(p, "http://127.0.0.1:%d/ka", srv.port),
                         NULL, NULL, 0, &r) == APR_SUCCESS) {
        *status = r->status;
    }
    apr_pool_destroy(p);
    return NULL;
}

START_TEST(blocking_calls_keep_their_connection)
{
    mso_http_opts_t o = fast_opts();
    mso_http_response_t *r = NULL;
    pthread_t t;
    pid_t child;
    int n, status = 0, wstatus = 0;
    const char *echo;

    /* Without keep_connection each call has its own connection. */
    n = conns();
    ck_assert_str_eq(get("/ka", APR_SUCCESS)->body, "ka");
    ck_assert_str_eq(get("/ka", APR_SUCCESS)->body, "ka");
    ck_assert_int_eq(conns() - n, 2);

    /* With it, one thread's calls one after another share one. */
    n = conns();
    ck_assert_str_eq(get_kept("/ka", NULL)->body, "ka");
    ck_assert_str_eq(get_kept("/ka", NULL)->body, "ka");
    ck_assert_str_eq(get_kept("/ka", NULL)->body, "ka");
    ck_assert_int_eq(conns() - n, 1);

    /* Another thread has its own handle, so its own connection. */
    ck_assert_int_eq(pthread_create(&t, NULL, get_ka_elsewhere, &status), 0);
    pthread_join(t, NULL);
    ck_assert_int_eq(status, 200);
    ck_assert_int_eq(conns() - n, 2);

    /* A child process never sends on the parent's socket: it connects anew,
     * and the parent's connection still works for the parent. */
    child = fork();
    ck_assert_int_ge(child, 0);
    if (child == 0) {
        r = get_kept("/ka", NULL);
        _exit(r->status == 200 && strcmp(r->body, "ka") == 0 ? 0 : 1);
    }
    ck_assert_int_eq(waitpid(child, &wstatus, 0), child);
    ck_assert(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
    ck_assert_int_eq(conns() - n, 3);
    ck_assert_str_eq(get_kept("/ka", NULL)->body, "ka");
    ck_assert_int_eq(conns() - n, 3);

    /* Nothing of one call's options stays for the next: a header or a body
     * sent once is not sent again. */
    o.keep_connection = 1;
    ck_assert_int_eq(mso_http_request(pool, &o, "POST", url("/echo"), hdrs("X-Once: 1", NULL),
                                      "a=1", 3, &r), APR_SUCCESS);
    echo = echoed_header_block(r);
    ck_assert_ptr_nonnull(strstr(echo, "POST /echo "));
    ck_assert_ptr_nonnull(strstr(echo, "X-Once: 1"));
    ck_assert_str_eq(echoed_body(r), "a=1");
    echo = echoed_header_block(get_kept("/echo", NULL));
    ck_assert_ptr_nonnull(strstr(echo, "GET /echo "));
    ck_assert_ptr_null(strstr(echo, "X-Once"));
    ck_assert_ptr_null(strstr(echo, "Content-Length"));

    /* Done: the connection is closed, the next call connects again. */
    n = conns();
    ck_assert_str_eq(get_kept("/ka", NULL)->body, "ka");
    ck_assert_str_eq(get_kept("/ka", NULL)->body, "ka");
    ck_assert_int_eq(conns() - n, 1);
    mso_http_thread_done();
    ck_assert_str_eq(get_kept("/ka", NULL)->body, "ka");
    ck_assert_int_eq(conns() - n, 2);
}
END_TEST

START_TEST(multi_grace_and_stop)
{
    mso_http_opts_t o = fast_opts();
    mso_http_multi_t *m;
    result_t res[3];
    apr_time_t start;
    volatile int stop = 0;

    /* A started request may finish in the grace period; a queued one is cut. */
    o.grace_ms = 2000;
    m = multi(&o, 1, 1);
    memset(res, 0, sizeof(res));
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/slow"), NULL, NULL, 0, on_done,
                                        &res[0]), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/ok"), NULL, NULL, 0, on_done,
                                        &res[1]), APR_SUCCESS);
    ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_msec(100)), APR_TIMEUP);
    ck_assert_int_eq(res[0].rv, APR_SUCCESS);
    ck_assert_str_eq(res[0].resp->body, "slow");
    ck_assert_int_eq(res[1].rv, APR_TIMEUP);
    ck_assert_int_eq(res[1].resp->not_sent, 1);
    mso_http_multi_destroy(m);

    /* The stop flag ends a run at once. */
    o.timeout_ms = 10000;
    o.stall_seconds = 10;
    o.stop = &stop;
    m = multi(&o, 2, 2);
    memset(res, 0, sizeof(res));
    ck_assert_int_eq(mso_http_multi_add(m, pool, "GET", url("/stall"), NULL, NULL, 0, on_done,
                                        &res[2]), APR_SUCCESS);
    stop = 1;
    start = apr_time_now();
    ck_assert_int_eq(mso_http_multi_run(m, apr_time_from_sec(10)), APR_TIMEUP);
    ck_assert(apr_time_now() - start < apr_time_from_msec(1500));
    ck_assert_int_eq(res[2].rv, APR_TIMEUP);
    mso_http_multi_destroy(m);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("http");
    TCase *tc = tcase_create("client");
    int failed;

    apr_initialize();
    if (mso_http_global_init() != APR_SUCCESS) {
        return EXIT_FAILURE;
    }
    tcase_add_checked_fixture(tc, setup, teardown);
    /* Many large answers at once take a while under AddressSanitizer. */
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, ok_with_headers);
    tcase_add_test(tc, last_header_block);
    tcase_add_test(tc, proxy_from_the_configuration_only);
    tcase_add_test(tc, no_redirects);
    tcase_add_test(tc, retry_after);
    tcase_add_test(tc, max_body);
    tcase_add_test(tc, timeout);
    tcase_add_test(tc, stall);
    tcase_add_test(tc, refused);
    tcase_add_test(tc, refuse_bad_input);
    tcase_add_test(tc, echo_post_form);
    tcase_add_test(tc, echo_methods);
    tcase_add_test(tc, encoding);
    tcase_add_test(tc, defaults);
    tcase_add_test(tc, multi_concurrent);
    tcase_add_test(tc, multi_counts_outcomes);
    tcase_add_test(tc, multi_max_in_flight);
    tcase_add_test(tc, multi_max_host_connections);
    tcase_add_test(tc, multi_stall_times_out_alone);
    tcase_add_test(tc, multi_budget);
    tcase_add_test(tc, multi_reuses_connections);
    tcase_add_test(tc, multi_refuse_bad_input);
    tcase_add_test(tc, multi_caps_and_cancel);
    tcase_add_test(tc, clip_json_strings);
    tcase_add_test(tc, multi_memory_budget);
    tcase_add_test(tc, multi_budget_with_clip);
    tcase_add_test(tc, multi_grace_and_stop);
    tcase_add_test(tc, multi_raw_downloads);
    tcase_add_test(tc, multi_download_budget);
    tcase_add_test(tc, stream_get);
    tcase_add_test(tc, stream_with_a_call_inside);
    tcase_add_test(tc, blocking_calls_keep_their_connection);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
