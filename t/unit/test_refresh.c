/* The refresh of one account (lib/mso_refresh) end to end: a scripted token
 * endpoint in a thread of the test process, a SQLite database in a temporary
 * file, and the real key ring. Each test gets its own server and database
 * from the checked fixture. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strcasestr */
#endif
#include <check.h>

#include "unit.h"
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <apr_dbd.h>
#include <apr_general.h>
#include <apr_strings.h>
#include <apr_tables.h>

#include "mso_identity.h"
#include "mso_log.h"
#include "mso_refresh.h"
#include "mso_schema.h"

#define GRAPH "https://graph.microsoft.com"
#define OUTLOOK "https://outlook.office.com"
#define SECRET "s3cr3t~value"
#define NOW 1700000000

/* ---- the token endpoint ---------------------------------------------------- */

/* What the next request gets, and what the last one sent. The test thread
 * writes the script before its call and reads the record after it; the
 * client waits for the answer in between, so no lock is needed beyond the
 * atomic request count. */
typedef struct {
    int lfd, wake[2], port;
    pthread_t thread;
    const char *answer;             /* whole HTTP response */
    struct {
        const char *needle;         /* in the request body: this answer instead */
        const char *answer;
    } routes[4];
    const char *sql_during;         /* run on db2 before answering (another node) */
    const apr_dbd_driver_t *driver;
    apr_dbd_t *db2;
    int requests;
    char path[256];
    char body[8192];
} server_t;

static server_t srv;
static apr_pool_t *pool;

static size_t read_request(int fd, char *buf, size_t size)
{
    struct pollfd pfd = {fd, POLLIN, 0};
    size_t len = 0, want = 0;
    const char *end, *cl;
    ssize_t n;

    while (len < size - 1) {
        if (poll(&pfd, 1, 2000) <= 0 || (n = recv(fd, buf + len, size - 1 - len, 0)) <= 0) {
            return 0;
        }
        len += (size_t)n;
        buf[len] = '\0';
        if (!(end = strstr(buf, "\r\n\r\n"))) {
            continue;
        }
        cl = strcasestr(buf, "\r\nContent-Length:");
        want = (size_t)(end + 4 - buf) + (cl && cl < end ? strtoul(cl + 17, NULL, 10) : 0);
        if (len >= want) {
            return len;
        }
    }
    return len;
}

static void *serve(void *arg)
{
    struct pollfd pfd[2] = {{srv.lfd, POLLIN, 0}, {srv.wake[0], POLLIN, 0}};
    static char req[16384];
    const char *body, *ans;
    int fd, n, i;

    while (poll(pfd, 2, -1) >= 0 || errno == EINTR) {
        if (pfd[1].revents) {
            break;
        }
        if (!(pfd[0].revents & POLLIN) || (fd = accept(srv.lfd, NULL, NULL)) < 0) {
            continue;
        }
        if (read_request(fd, req, sizeof(req))) {
            sscanf(req, "%*s %255s", srv.path);
            body = strstr(req, "\r\n\r\n");
            snprintf(srv.body, sizeof(srv.body), "%s", body ? body + 4 : "");
            if (srv.sql_during) {
                apr_dbd_query(srv.driver, srv.db2, &n, srv.sql_during);
            }
            __atomic_add_fetch(&srv.requests, 1, __ATOMIC_SEQ_CST);
            ans = srv.answer;
            for (i = 0; i < 4 && srv.routes[i].needle; i++) {
                if (strstr(srv.body, srv.routes[i].needle)) {
                    ans = srv.routes[i].answer;
                }
            }
            if (ans) {
                send(fd, ans, strlen(ans), MSG_NOSIGNAL);
            }
        }
        close(fd);
    }
    return NULL;
}

static int requests(void)
{
    return __atomic_load_n(&srv.requests, __ATOMIC_SEQ_CST);
}

/* An HTTP response with a JSON body. */
static const char *answer(int status, const char *extra_headers, const char *json)
{
    return apr_psprintf(pool, "HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%s"
                        "Content-Length: %lu\r\nConnection: close\r\n\r\n%s", status,
                        extra_headers, (unsigned long)strlen(json), json);
}

static const char *token_ok(const char *access, const char *refresh, const char *scope)
{
    return answer(200, "", apr_psprintf(pool, "{\"token_type\":\"Bearer\",\"access_token\":"
                                        "\"%s\",\"expires_in\":3600,\"ext_expires_in\":3600,"
                                        "\"scope\":\"%s\"%s%s%s}", access, scope,
                                        refresh ? ",\"refresh_token\":\"" : "",
                                        refresh ? refresh : "", refresh ? "\"" : ""));
}

static const char *token_error(int status, const char *error, long code)
{
    return answer(status, "", apr_psprintf(pool, "{\"error\":\"%s\",\"error_description\":"
                                           "\"AADSTS%ld: scripted.\\r\\nTrace ID: 0a0b\\r\\n\","
                                           "\"error_codes\":[%ld],\"trace_id\":\"0a0b-1\","
                                           "\"correlation_id\":\"c0c0-2\"}", error, code, code));
}

/* The form fields of the last request. */
static apr_table_t *form(void)
{
    apr_table_t *t = NULL;

    ck_assert_ptr_null(mso_query_parse(pool, srv.body, &t));
    return t;
}

/* ---- fixture: server, database, keys, one connected account ------------- */

static char tmpdir[64], dbpath[128];
static mso_db_t *db;
static mso_keyring_t *keyring;
static mso_http_opts_t http;
static mso_refresh_ctx_t ctx;
static apr_int64_t account_id;
static char logbuf[16384];

static void capture_log(void *baton, const char *file, int line, mso_log_level_e level,
                        apr_status_t rv, const char *msg)
{
    size_t n = strlen(logbuf);

    snprintf(logbuf + n, sizeof(logbuf) - n, "[%d] %s\n", (int)level, msg);
}

static apr_status_t close_db(void *data)
{
    apr_dbd_close(srv.driver, data);
    return APR_SUCCESS;
}

static apr_dbd_t *open_db(void)
{
    apr_dbd_t *h = NULL;
    const char *error = NULL;

    ck_assert_int_eq(apr_dbd_open_ex(srv.driver, pool, dbpath, &h, &error), APR_SUCCESS);
    apr_pool_cleanup_register(pool, h, close_db, apr_pool_cleanup_null);
    return h;
}

/* Connects mailbox of acme with refresh token rt and Graph access token at. */
static mso_account_t *connect_acme(const char *mailbox, const char *rt, const char *at)
{
    mso_connect_t c;
    mso_token_sealer_t sealer;
    mso_account_t *a = NULL;
    const char *err = NULL;

    memset(&c, 0, sizeof(c));
    c.company = "acme";
    c.client_id = "client-1";
    c.tenant_id = "tenant-x";
    c.object_id = apr_pstrcat(pool, "oid-", mailbox, NULL);
    c.mailbox = mailbox;
    c.scopes = "openid profile email offline_access " GRAPH "/Mail.Read";
    c.authority = apr_psprintf(pool, "http://127.0.0.1:%d/tenant-x", srv.port);
    c.access_expires_at = NOW - 10;
    memset(&sealer, 0, sizeof(sealer));
    sealer.p = pool;
    sealer.keyring = keyring;
    sealer.client_id = c.client_id;
    sealer.refresh_token = rt;
    sealer.access_token = at;
    ck_assert_msg(mso_account_connect(db, pool, &c, mso_account_seal_tokens, &sealer,
                                      NOW - 3610, &a, &err) == APR_SUCCESS, "connect: %s",
                  err ? err : "");
    return a;
}

static void setup(void)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    unsigned char key[MSO_KEY_LEN];
    const char *err = NULL;
    int from, to;
    apr_pool_t *wp;

    apr_pool_create(&pool, NULL);
    memset(&srv, 0, sizeof(srv));
    logbuf[0] = '\0';
    mso_log_set(capture_log, NULL, MSO_LOG_DEBUG);

    /* The database with one connected account, due now. */
    strcpy(tmpdir, "/tmp/mso-refresh-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
    snprintf(dbpath, sizeof(dbpath), "%s/msoauth.db", tmpdir);
    ck_assert_int_eq(apr_dbd_get_driver(pool, "sqlite3", &srv.driver), APR_SUCCESS);
    apr_pool_create(&wp, pool);
    ck_assert_int_eq(mso_db_wrap(wp, srv.driver, open_db(), &db), APR_SUCCESS);
    ck_assert_int_eq(mso_schema_migrate(db, pool, &from, &to, &err), APR_SUCCESS);
    srv.db2 = open_db();

    keyring = mso_keyring_create(pool);
    ck_assert_int_eq(mso_random_bytes(key, sizeof(key)), APR_SUCCESS);
    ck_assert_int_eq(mso_keyring_add(keyring, key), APR_SUCCESS);

    /* The token endpoint. */
    srv.lfd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(srv.lfd, 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(srv.lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ck_assert_int_eq(getsockname(srv.lfd, (struct sockaddr *)&sa, &sl), 0);
    srv.port = ntohs(sa.sin_port);
    ck_assert_int_eq(listen(srv.lfd, 8), 0);
    ck_assert_int_eq(pipe(srv.wake), 0);
    ck_assert_int_eq(pthread_create(&srv.thread, NULL, serve, NULL), 0);

    account_id = connect_acme("Alice@Example.com", "RT-1", "AT-0")->id;

    mso_http_opts_default(&http);
    http.connect_timeout_ms = 2000;
    http.timeout_ms = 5000;
    memset(&ctx, 0, sizeof(ctx));
    ctx.keyring = keyring;
    ctx.http = &http;
    ctx.owner = "node-a";
    ctx.authority = apr_psprintf(pool, "http://127.0.0.1:%d/tenant-x", srv.port);
    ctx.client_id = "client-1";
    ctx.client_secret = SECRET;
    ctx.graph_resource = GRAPH;
    ctx.signin_scopes = mso_signin_scopes(pool, GRAPH, 0, NULL);
    ctx.margin = 600;
    ctx.keepalive = 14 * 86400;
}

static void teardown(void)
{
    static const char *const suffix[] = {"", "-wal", "-shm", "-journal"};
    char path[160];
    size_t i;

    ck_assert_int_eq(write(srv.wake[1], "x", 1), 1);
    pthread_join(srv.thread, NULL);
    close(srv.lfd);
    close(srv.wake[0]);
    close(srv.wake[1]);
    mso_log_set(NULL, NULL, MSO_LOG_WARNING);
    apr_pool_destroy(pool);
    for (i = 0; i < sizeof(suffix) / sizeof(suffix[0]); i++) {
        snprintf(path, sizeof(path), "%s%s", dbpath, suffix[i]);
        unlink(path);
    }
    rmdir(tmpdir);
}

/* ---- helpers ------------------------------------------------------------- */

static mso_account_t *account(void)
{
    mso_account_t *a = NULL;

    ck_assert_int_eq(mso_account_get(db, pool, account_id, &a), APR_SUCCESS);
    return a;
}

/* Leases the account for ctx.owner and refreshes it. */
static mso_refresh_outcome_t refresh(const char *resource, apr_int64_t now)
{
    mso_refresh_outcome_t out;

    ck_assert_int_eq(mso_account_lease(db, pool, account_id, ctx.owner, now, 90), APR_SUCCESS);
    ck_assert_int_eq(mso_refresh_account(db, pool, &ctx, account(), resource, now, &out),
                     APR_SUCCESS);
    return out;
}

/* The plaintext of a stored token, opened as the module would. */
static const char *opened(const char *kind, apr_int64_t *expires)
{
    const char *plain = NULL;

    ck_assert_int_eq(mso_account_token_open(db, pool, keyring, account(), kind, &plain,
                                            expires), APR_SUCCESS);
    return plain;
}

static void no_secrets_logged(void)
{
    ck_assert_msg(!strstr(logbuf, "RT-1") && !strstr(logbuf, "RT-2") && !strstr(logbuf, "AT-1")
                  && !strstr(logbuf, SECRET), "a secret reached the log:\n%s", logbuf);
}

/* The request the endpoint received: a refresh grant with our credentials. */
static void check_request(const char *want_scope, const char *not_scope)
{
    apr_table_t *f = form();
    const char *scope = apr_table_get(f, "scope");

    ck_assert_str_eq(srv.path, "/tenant-x/oauth2/v2.0/token");
    ck_assert_str_eq(apr_table_get(f, "grant_type"), "refresh_token");
    ck_assert_str_eq(apr_table_get(f, "refresh_token"), "RT-1");
    ck_assert_str_eq(apr_table_get(f, "client_id"), "client-1");
    ck_assert_str_eq(apr_table_get(f, "client_secret"), SECRET);
    ck_assert_ptr_nonnull(scope);
    ck_assert_msg(strstr(scope, "offline_access") && strstr(scope, want_scope),
                  "scope: %s", scope);
    if (not_scope) {
        ck_assert_msg(!strstr(scope, not_scope), "scope: %s", scope);
    }
}

/* ---- tests --------------------------------------------------------------- */

START_TEST(success_with_rotation)
{
    mso_refresh_outcome_t out;
    mso_account_t *a;
    apr_int64_t exp = 0, due_hi = NOW + 3600 - 600;

    srv.answer = token_ok("AT-1", "RT-2", "Mail.Read openid profile email");
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESHED);
    ck_assert_str_eq(out.access_token, "AT-1");
    ck_assert_int_eq(out.access_expires_at, NOW + 3600);
    ck_assert_str_eq(out.scope, "Mail.Read openid profile email");
    ck_assert_int_eq(requests(), 1);
    check_request(GRAPH "/Mail.Read", OUTLOOK);

    ck_assert_str_eq(opened("refresh", NULL), "RT-2");
    ck_assert_str_eq(opened("graph", &exp), "AT-1");
    ck_assert_int_eq(exp, NOW + 3600);
    a = account();
    ck_assert_str_eq(a->state, "connected");
    ck_assert_int_eq(a->access_expires_at, NOW + 3600);
    ck_assert_int_le(a->refresh_due_at, due_hi);
    ck_assert_int_ge(a->refresh_due_at, due_hi - 360);
    ck_assert_int_eq(a->last_refresh_at, NOW);
    ck_assert_str_eq(a->scopes, "Mail.Read openid profile email");
    ck_assert_ptr_null(a->lease_owner);
    ck_assert_int_eq(a->error_runs, 0);
    no_secrets_logged();

    /* The next refresh sends the rotated token. */
    srv.answer = token_ok("AT-9", NULL, "Mail.Read");
    out = refresh("graph", NOW + 3000);
    ck_assert_int_eq(out.result, MSO_REFRESHED);
    ck_assert_str_eq(apr_table_get(form(), "refresh_token"), "RT-2");
}
END_TEST

/* The token address comes from the configuration only: a database row
 * pointing the account's authority at another host (anyone who can write the
 * table) receives neither the client secret nor the refresh token. */
START_TEST(database_authority_not_followed)
{
    mso_refresh_outcome_t out;
    int trap = socket(AF_INET, SOCK_STREAM, 0), n = 0, got;
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);

    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(trap, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ck_assert_int_eq(getsockname(trap, (struct sockaddr *)&sa, &sl), 0);
    ck_assert_int_eq(listen(trap, 4), 0);
    ck_assert_int_eq(apr_dbd_query(db->driver, db->handle, &n, apr_psprintf(pool,
                     "UPDATE msoauth_accounts SET authority = 'http://127.0.0.1:%d/attacker'",
                     ntohs(sa.sin_port))), 0);

    srv.answer = token_ok("AT-1", "RT-2", "Mail.Read");
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESHED);
    check_request(GRAPH "/Mail.Read", NULL);
    /* Nobody knocked at the trap. */
    ck_assert_int_eq(fcntl(trap, F_SETFL, O_NONBLOCK), 0);
    got = accept(trap, NULL, NULL);
    ck_assert_int_lt(got, 0);
    close(trap);
}
END_TEST

START_TEST(success_without_refresh_token)
{
    mso_refresh_outcome_t out;
    apr_int64_t exp = 0;

    srv.answer = token_ok("AT-1", NULL, "Mail.Read");
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESHED);
    check_request(GRAPH "/Mail.Read", NULL);
    ck_assert_str_eq(opened("refresh", NULL), "RT-1");
    ck_assert_str_eq(opened("graph", &exp), "AT-1");
    ck_assert_int_eq(exp, NOW + 3600);
    ck_assert_ptr_null(account()->lease_owner);
    no_secrets_logged();
}
END_TEST

START_TEST(outlook_resource)
{
    mso_refresh_outcome_t out;
    mso_account_t *before = account(), *a;
    apr_int64_t exp = 0;

    /* Without Outlook scopes in the company's sign-in scopes: not attempted. */
    out = refresh(OUTLOOK, NOW);
    ck_assert_int_eq(out.result, MSO_REFRESH_FAILED);
    ck_assert_str_eq(out.reason, "bad_request");
    ck_assert_msg(strstr(out.detail, OUTLOOK) != NULL, "detail: %s", out.detail);
    ck_assert_int_eq(requests(), 0);
    a = account();
    ck_assert_ptr_null(a->lease_owner);
    ck_assert_int_eq(a->error_runs, 0);

    ctx.signin_scopes = apr_pstrcat(pool, ctx.signin_scopes, " " OUTLOOK
                                    "/IMAP.AccessAsUser.All", NULL);
    srv.answer = token_ok("AT-1", "RT-2", OUTLOOK "/IMAP.AccessAsUser.All");
    out = refresh(OUTLOOK, NOW);
    ck_assert_int_eq(out.result, MSO_REFRESHED);
    check_request(OUTLOOK "/IMAP.AccessAsUser.All", "Mail.Read");
    ck_assert_str_eq(opened("outlook", &exp), "AT-1");
    ck_assert_int_eq(exp, NOW + 3600);
    ck_assert_str_eq(opened("refresh", NULL), "RT-2");
    ck_assert_str_eq(opened("graph", NULL), "AT-0");
    a = account();
    /* The Graph schedule and expiry are not moved by an Outlook token. */
    ck_assert_int_eq(a->access_expires_at, before->access_expires_at);
    ck_assert_int_eq(a->refresh_due_at, before->refresh_due_at);
    ck_assert_str_eq(a->scopes, before->scopes);
    ck_assert_ptr_null(a->lease_owner);
    no_secrets_logged();
}
END_TEST

START_TEST(invalid_grant_needs_reconnect)
{
    mso_refresh_outcome_t out;
    mso_account_t *a;

    srv.answer = token_error(400, "invalid_grant", 700082);
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESH_RECONNECT);
    ck_assert_str_eq(out.reason, "reconnect_required");
    ck_assert_int_eq(out.aadsts, 700082);
    ck_assert_ptr_null(out.access_token);
    a = account();
    ck_assert_str_eq(a->state, "reconnect_required");
    ck_assert_str_eq(a->reason, "reconnect_required");
    ck_assert_int_eq(a->aadsts, 700082);
    ck_assert_int_eq(a->error_runs, 1);
    ck_assert_int_eq(a->retry_at, 0);
    ck_assert_ptr_null(a->lease_owner);
    ck_assert_msg(a->last_error && strstr(a->last_error, "AADSTS700082")
                  && strstr(a->last_error, "connected again"), "last_error: %s", a->last_error);
    ck_assert_str_eq(opened("refresh", NULL), "RT-1");
    ck_assert_msg(strstr(logbuf, "0a0b-1") && strstr(logbuf, "alice@example.com"),
                  "log:\n%s", logbuf);
    no_secrets_logged();
}
END_TEST

START_TEST(expired_secret_flags_admin)
{
    mso_refresh_outcome_t out;
    mso_account_t *a;

    srv.answer = token_error(401, "invalid_client", 7000222);
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESH_ADMIN);
    ck_assert_str_eq(out.reason, "client_secret_expired");
    ck_assert_int_eq(out.aadsts, 7000222);
    check_request(GRAPH "/Mail.Read", NULL);
    a = account();
    ck_assert_str_eq(a->state, "connected");
    ck_assert_str_eq(a->reason, "client_secret_expired");
    ck_assert_int_eq(a->aadsts, 7000222);
    ck_assert_int_eq(a->error_runs, 1);
    ck_assert_int_ge(a->retry_at, NOW + 15);
    ck_assert_int_le(a->retry_at, NOW + 45);
    ck_assert_ptr_null(a->lease_owner);
    ck_assert_msg(a->last_error && strstr(a->last_error, "expired"), "last_error: %s",
                  a->last_error);
    ck_assert_str_eq(opened("refresh", NULL), "RT-1");
    ck_assert_str_eq(opened("graph", NULL), "AT-0");
    no_secrets_logged();
}
END_TEST

START_TEST(unavailable_is_transient)
{
    mso_refresh_outcome_t out;
    mso_account_t *a;

    srv.answer = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 0\r\n"
                 "Connection: close\r\n\r\n";
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESH_TRANSIENT);
    ck_assert_str_eq(out.reason, "token_endpoint_unreachable");
    ck_assert_int_eq(out.retry_after, 7);
    a = account();
    ck_assert_str_eq(a->state, "connected");
    ck_assert_str_eq(a->reason, "token_endpoint_unreachable");
    ck_assert_int_eq(a->aadsts, 0);
    ck_assert_int_eq(a->error_runs, 1);
    ck_assert_int_ge(a->retry_at, NOW + 15);        /* backoff beats a shorter Retry-After */
    ck_assert_int_le(a->retry_at, NOW + 45);
    ck_assert_ptr_null(a->lease_owner);

    /* A longer Retry-After wins; the backoff grows with the failures. */
    srv.answer = "HTTP/1.1 429 Too Many\r\nRetry-After: 600\r\nContent-Length: 0\r\n"
                 "Connection: close\r\n\r\n";
    out = refresh("graph", NOW + 100);
    ck_assert_int_eq(out.result, MSO_REFRESH_TRANSIENT);
    a = account();
    ck_assert_int_eq(a->retry_at, NOW + 100 + 600);
    ck_assert_int_eq(a->error_runs, 2);

    /* Nothing listening: the same. */
    {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa;
        socklen_t sl = sizeof(sa);
        const void *args[2];
        apr_dbd_prepared_t *st = NULL;
        int n;

        memset(&sa, 0, sizeof(sa));
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
        ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
        const char *configured = ctx.authority;

        (void)args;
        (void)st;
        (void)n;
        ctx.authority = apr_psprintf(pool, "http://127.0.0.1:%d/tenant-x", ntohs(sa.sin_port));
        out = refresh("graph", NOW + 1000);
        ctx.authority = configured;
        close(fd);
        ck_assert_int_eq(out.result, MSO_REFRESH_TRANSIENT);
        ck_assert_str_eq(out.reason, "token_endpoint_unreachable");
        a = account();
        ck_assert_int_eq(a->error_runs, 3);
        ck_assert_int_ge(a->retry_at, NOW + 1000 + 60);
        ck_assert_int_le(a->retry_at, NOW + 1000 + 180);
    }
    ck_assert_str_eq(opened("refresh", NULL), "RT-1");
    no_secrets_logged();
}
END_TEST

START_TEST(unknown_error_then_reconnect)
{
    mso_refresh_outcome_t out;
    mso_account_t *a;
    int n = 0;

    srv.answer = token_error(400, "invalid_request", 900144);
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESH_TRANSIENT);
    ck_assert_str_eq(out.reason, "bad_request");
    a = account();
    ck_assert_str_eq(a->state, "connected");
    ck_assert_str_eq(a->reason, "bad_request");
    ck_assert_int_eq(a->aadsts, 900144);
    ck_assert_int_eq(a->error_runs, 1);
    ck_assert_int_gt(a->retry_at, NOW);
    ck_assert_msg(strstr(logbuf, "[3]") != NULL, "not logged as an error:\n%s", logbuf);

    /* The tenth failure in a row: a person must look. */
    ck_assert_int_eq(apr_dbd_query(db->driver, db->handle, &n,
                                   "UPDATE msoauth_accounts SET error_runs = 9"), 0);
    out = refresh("graph", NOW + 100);
    ck_assert_int_eq(out.result, MSO_REFRESH_RECONNECT);
    ck_assert_str_eq(out.reason, "reconnect_required");
    a = account();
    ck_assert_str_eq(a->state, "reconnect_required");
    ck_assert_int_eq(a->error_runs, 10);
    ck_assert_ptr_null(a->lease_owner);
    ck_assert_msg(a->last_error && strstr(a->last_error, "10 times"), "last_error: %s",
                  a->last_error);
}
END_TEST

START_TEST(lease_lost_before_commit)
{
    mso_refresh_outcome_t out;
    mso_account_t *a;

    /* While Microsoft answers, another node takes the lease. */
    srv.answer = token_ok("AT-1", "RT-2", "Mail.Read");
    srv.sql_during = apr_psprintf(pool, "UPDATE msoauth_accounts SET lease_owner = 'node-b', "
                                  "lease_until = %d", NOW + 500);
    out = refresh("graph", NOW);
    ck_assert_int_eq(requests(), 1);
    ck_assert_int_eq(out.result, MSO_REFRESH_BUSY);
    ck_assert_ptr_null(out.access_token);
    ck_assert_str_eq(opened("refresh", NULL), "RT-1");
    ck_assert_str_eq(opened("graph", NULL), "AT-0");
    a = account();
    ck_assert_str_eq(a->lease_owner, "node-b");     /* not released */
    ck_assert_int_eq(a->lease_until, NOW + 500);
    ck_assert_int_eq(a->last_refresh_at, 0);
    no_secrets_logged();
}
END_TEST

START_TEST(key_removed_from_ring)
{
    mso_refresh_outcome_t out;
    mso_account_t *a;
    unsigned char key[MSO_KEY_LEN];

    ctx.keyring = mso_keyring_create(pool);
    ck_assert_int_eq(mso_random_bytes(key, sizeof(key)), APR_SUCCESS);
    ck_assert_int_eq(mso_keyring_add((mso_keyring_t *)ctx.keyring, key), APR_SUCCESS);
    srv.answer = token_ok("AT-1", "RT-2", "Mail.Read");
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESH_FAILED);
    ck_assert_int_eq(requests(), 0);
    ck_assert_msg(strstr(out.detail, "MSOAuthTokenKeyFile") != NULL, "detail: %s", out.detail);
    a = account();
    ck_assert_str_eq(a->state, "reconnect_required");
    ck_assert_ptr_null(a->lease_owner);
    ck_assert_msg(a->last_error && strstr(a->last_error, "MSOAuthTokenKeyFile"),
                  "last_error: %s", a->last_error);
    ck_assert_str_eq(opened("refresh", NULL), "RT-1");
}
END_TEST

/* A token still bound as before schema version 4 (not rebound at start-up)
 * is not opened, and nothing is sent. */
START_TEST(unbound_token_is_not_used)
{
    mso_refresh_outcome_t out;
    mso_account_t *a;
    int n = 0;

    ck_assert_int_eq(apr_dbd_query(db->driver, db->handle, &n,
                                   "UPDATE msoauth_tokens SET binding = 1"), 0);
    srv.answer = token_ok("AT-1", "RT-2", "Mail.Read");
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESH_FAILED);
    ck_assert_int_eq(requests(), 0);
    ck_assert_msg(strstr(out.detail, "schema version 4") != NULL, "detail: %s", out.detail);
    a = account();
    ck_assert_str_eq(a->state, "reconnect_required");
    ck_assert_ptr_null(a->lease_owner);
}
END_TEST

START_TEST(no_refresh_token_stored)
{
    mso_refresh_outcome_t out;
    int n = 0;

    ck_assert_int_eq(apr_dbd_query(db->driver, db->handle, &n,
                                   "DELETE FROM msoauth_tokens WHERE kind = 'refresh'"), 0);
    out = refresh("graph", NOW);
    ck_assert_int_eq(out.result, MSO_REFRESH_RECONNECT);
    ck_assert_int_eq(requests(), 0);
    ck_assert_str_eq(account()->state, "reconnect_required");
    ck_assert_ptr_null(account()->lease_owner);
}
END_TEST

START_TEST(next_due_range)
{
    mso_refresh_ctx_t c;
    apr_int64_t now = NOW, exp = NOW + 3600, d, lo = exp, hi = 0;
    int i;

    memset(&c, 0, sizeof(c));
    c.margin = 600;
    c.keepalive = 14 * 86400;
    for (i = 0; i < 500; i++) {
        d = mso_refresh_next_due(&c, now, exp);
        ck_assert_int_le(d, exp - 600);
        ck_assert_int_ge(d, exp - 600 - 360);
        lo = d < lo ? d : lo;
        hi = d > hi ? d : hi;
    }
    ck_assert_int_gt(hi - lo, 100);     /* spread out, not one second */
    /* A token shorter-lived than the margin: refreshed at 3/4 of its life
     * (less up to 10% jitter), before it expires... */
    for (i = 0; i < 100; i++) {
        d = mso_refresh_next_due(&c, now, now + 100);
        ck_assert_int_le(d, now + 75);
        ck_assert_int_ge(d, now + 65);
    }
    /* ...and never in a tight loop, even for an expired one. */
    ck_assert_int_eq(mso_refresh_next_due(&c, now, now - 100), now + 5);
    ck_assert_int_eq(mso_refresh_next_due(&c, now, now + 4), now + 5);
    /* Long-lived: at least every keepalive. */
    c.keepalive = 1000;
    ck_assert_int_eq(mso_refresh_next_due(&c, now, now + 100000), now + 1000);
}
END_TEST

START_TEST(backoff_range)
{
    apr_int64_t now = NOW, b, lo = now + 100000, hi = 0;
    int i, runs;

    for (i = 0; i < 500; i++) {
        b = mso_refresh_backoff(0, -1, now);
        ck_assert_int_ge(b, now + 15);
        ck_assert_int_le(b, now + 45);
        lo = b < lo ? b : lo;
        hi = b > hi ? b : hi;
        b = mso_refresh_backoff(3, -1, now);       /* 240 s */
        ck_assert_int_ge(b, now + 120);
        ck_assert_int_le(b, now + 360);
        b = mso_refresh_backoff(50, -1, now);      /* capped */
        ck_assert_int_ge(b, now + 1800);
        ck_assert_int_le(b, now + 3600);
    }
    ck_assert_int_gt(hi - lo, 10);
    for (runs = -1; runs < 20; runs++) {
        b = mso_refresh_backoff(runs, -1, now);
        ck_assert_int_ge(b, now + 15);
        ck_assert_int_le(b, now + 3600);
    }
    ck_assert_int_eq(mso_refresh_backoff(0, 500, now), now + 500);
    ck_assert_int_ge(mso_refresh_backoff(0, 7, now), now + 15);
    ck_assert_int_eq(mso_refresh_backoff(0, 1000000000L, now), now + 86400);
}
END_TEST


/* ---- many accounts at once ------------------------------------------------ */

/* Another connected account of acme, due now, with refresh token rt (NULL:
 * none stored), leased for ctx.owner. */
static mso_account_t *other_account(const char *mailbox, const char *rt)
{
    mso_account_t *a, *got = NULL;
    int n = 0;

    a = connect_acme(mailbox, rt ? rt : "unused", "AT-0");
    if (!rt) {
        ck_assert_int_eq(apr_dbd_query(db->driver, db->handle, &n, apr_psprintf(pool,
                         "DELETE FROM msoauth_tokens WHERE kind = 'refresh' AND account_id = "
                         "%" APR_INT64_T_FMT, a->id)), 0);
    }
    ck_assert_int_eq(mso_account_lease(db, pool, a->id, ctx.owner, NOW, 90), APR_SUCCESS);
    ck_assert_int_eq(mso_account_get(db, pool, a->id, &got), APR_SUCCESS);
    return got;
}

static mso_account_t *account_by_id(apr_int64_t id)
{
    mso_account_t *a = NULL;

    ck_assert_int_eq(mso_account_get(db, pool, id, &a), APR_SUCCESS);
    return a;
}

static const char *opened_for(const mso_account_t *a, const char *kind)
{
    const char *plain = NULL;

    ck_assert_int_eq(mso_account_token_open(db, pool, keyring, a, kind, &plain, NULL),
                     APR_SUCCESS);
    return plain;
}

START_TEST(batch_mixed_outcomes)
{
    const mso_refresh_ctx_t *ctxs[5];
    const mso_account_t *accts[5];
    mso_refresh_outcome_t outs[5];
    mso_http_multi_t *m = NULL;
    mso_account_t *a;
    int i;

    ck_assert_int_eq(mso_account_lease(db, pool, account_id, ctx.owner, NOW, 90), APR_SUCCESS);
    accts[0] = account();                                   /* RT-1: refreshed */
    accts[1] = other_account("bob@example.com", "RT-b503"); /* 503: transient */
    accts[2] = other_account("carol@example.com", "RT-cdead"); /* invalid_grant */
    accts[3] = other_account("dave@example.com", NULL);     /* nothing to send */
    accts[4] = other_account("erin@example.com", "RT-e1");  /* refreshed, no rotation */
    for (i = 0; i < 5; i++) {
        ctxs[i] = &ctx;
    }
    srv.answer = token_ok("AT-1", "RT-2", "Mail.Read");
    srv.routes[0].needle = "refresh_token=RT-b503";
    srv.routes[0].answer = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\n"
                           "Content-Length: 0\r\nConnection: close\r\n\r\n";
    srv.routes[1].needle = "refresh_token=RT-cdead";
    srv.routes[1].answer = token_error(400, "invalid_grant", 700082);
    srv.routes[2].needle = "refresh_token=RT-e1";
    srv.routes[2].answer = token_ok("AT-e2", NULL, "Mail.Read");

    /* Two at a time, so some wait for a free slot. */
    ck_assert_int_eq(mso_http_multi_create(pool, &http, 2, 2, &m), APR_SUCCESS);
    ck_assert_int_eq(mso_refresh_batch(db, pool, ctxs, accts, 5, "graph", m,
                                       apr_time_from_sec(20), NOW, outs), APR_SUCCESS);
    ck_assert_int_eq(requests(), 4);

    ck_assert_int_eq(outs[0].result, MSO_REFRESHED);
    ck_assert_str_eq(outs[0].access_token, "AT-1");
    ck_assert_int_eq(outs[0].access_expires_at, NOW + 3600);
    ck_assert_str_eq(opened("refresh", NULL), "RT-2");
    ck_assert_str_eq(opened("graph", NULL), "AT-1");
    a = account();
    ck_assert_str_eq(a->state, "connected");
    ck_assert_int_eq(a->last_refresh_at, NOW);
    ck_assert_ptr_null(a->lease_owner);

    ck_assert_int_eq(outs[1].result, MSO_REFRESH_TRANSIENT);
    ck_assert_str_eq(outs[1].reason, "token_endpoint_unreachable");
    ck_assert_int_eq(outs[1].retry_after, 7);
    a = account_by_id(accts[1]->id);
    ck_assert_str_eq(a->state, "connected");
    ck_assert_str_eq(a->reason, "token_endpoint_unreachable");
    ck_assert_int_eq(a->error_runs, 1);
    ck_assert_int_ge(a->retry_at, NOW + 15);
    ck_assert_int_le(a->retry_at, NOW + 45);
    ck_assert_ptr_null(a->lease_owner);
    ck_assert_str_eq(opened_for(a, "refresh"), "RT-b503");

    ck_assert_int_eq(outs[2].result, MSO_REFRESH_RECONNECT);
    ck_assert_str_eq(outs[2].reason, "reconnect_required");
    ck_assert_int_eq(outs[2].aadsts, 700082);
    a = account_by_id(accts[2]->id);
    ck_assert_str_eq(a->state, "reconnect_required");
    ck_assert_int_eq(a->aadsts, 700082);
    ck_assert_ptr_null(a->lease_owner);

    ck_assert_int_eq(outs[3].result, MSO_REFRESH_RECONNECT);
    a = account_by_id(accts[3]->id);
    ck_assert_str_eq(a->state, "reconnect_required");
    ck_assert_ptr_null(a->lease_owner);

    ck_assert_int_eq(outs[4].result, MSO_REFRESHED);
    ck_assert_str_eq(outs[4].access_token, "AT-e2");
    a = account_by_id(accts[4]->id);
    ck_assert_str_eq(opened_for(a, "graph"), "AT-e2");
    ck_assert_str_eq(opened_for(a, "refresh"), "RT-e1");
    ck_assert_int_eq(a->error_runs, 0);
    ck_assert_ptr_null(a->lease_owner);

    no_secrets_logged();
    ck_assert_msg(!strstr(logbuf, "RT-") && !strstr(logbuf, "AT-e2"),
                  "a token reached the log:\n%s", logbuf);
    mso_http_multi_destroy(m);
}
END_TEST

START_TEST(batch_out_of_time)
{
    const mso_refresh_ctx_t *ctxs[2] = {&ctx, &ctx};
    const mso_account_t *accts[2];
    mso_refresh_outcome_t outs[2];
    mso_http_multi_t *m = NULL;
    mso_account_t *a;
    int i;

    ck_assert_int_eq(mso_account_lease(db, pool, account_id, ctx.owner, NOW, 90), APR_SUCCESS);
    accts[0] = account();
    accts[1] = other_account("bob@example.com", "RT-b1");
    srv.answer = token_ok("AT-1", "RT-2", "Mail.Read");
    ck_assert_int_eq(mso_http_multi_create(pool, &http, 4, 4, &m), APR_SUCCESS);
    /* The budget is spent before anything is sent: nothing recorded, leases back. */
    ck_assert_int_eq(mso_refresh_batch(db, pool, ctxs, accts, 2, "graph", m, 0, NOW, outs),
                     APR_SUCCESS);
    ck_assert_int_eq(requests(), 0);
    for (i = 0; i < 2; i++) {
        ck_assert_int_eq(outs[i].result, MSO_REFRESH_DEFERRED);
        a = account_by_id(accts[i]->id);
        ck_assert_str_eq(a->state, "connected");
        ck_assert_int_eq(a->error_runs, 0);
        ck_assert_int_eq(a->retry_at, 0);
        ck_assert_ptr_null(a->lease_owner);
    }
    ck_assert_str_eq(opened("refresh", NULL), "RT-1");

    /* Missing arguments: nothing done. */
    ck_assert_int_eq(mso_refresh_batch(db, pool, ctxs, accts, 2, "graph", NULL,
                                       apr_time_from_sec(5), NOW, outs), APR_EINVAL);
    mso_http_multi_destroy(m);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("refresh");
    TCase *tc = tcase_create("refresh");
    TCase *sched = tcase_create("schedule");
    apr_pool_t *p;
    int failed;

    apr_initialize();
    apr_pool_create(&p, NULL);
    apr_dbd_init(p);
    if (mso_http_global_init() != APR_SUCCESS) {
        return EXIT_FAILURE;
    }
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, success_with_rotation);
    tcase_add_test(tc, success_without_refresh_token);
    tcase_add_test(tc, database_authority_not_followed);
    tcase_add_test(tc, outlook_resource);
    tcase_add_test(tc, invalid_grant_needs_reconnect);
    tcase_add_test(tc, expired_secret_flags_admin);
    tcase_add_test(tc, unavailable_is_transient);
    tcase_add_test(tc, unknown_error_then_reconnect);
    tcase_add_test(tc, lease_lost_before_commit);
    tcase_add_test(tc, key_removed_from_ring);
    tcase_add_test(tc, unbound_token_is_not_used);
    tcase_add_test(tc, no_refresh_token_stored);
    tcase_add_test(tc, batch_mixed_outcomes);
    tcase_add_test(tc, batch_out_of_time);
    tcase_add_test(sched, next_due_range);
    tcase_add_test(sched, backoff_range);
    suite_add_tcase(s, tc);
    suite_add_tcase(s, sched);
    failed = mso_check_run(s);
    apr_pool_destroy(p);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
