/* Graph's error answers (lib/mso_graph): mso_graph_classify and
 * mso_graph_result_text on a fuzzed status, headers (Retry-After, Location,
 * request-id) and body (see fuzz_http.h for the layout).
 * Invariants: 2xx is OK and nothing else is; a failed transfer is transient;
 * 410 asks for a resync, 429 and 503 for waiting (or a resync); Retry-After is
 * handed on as parsed; texts copied from Graph are at most 300 bytes without
 * control characters; a Location that passes mso_graph_link_ok is on the
 * Graph host for libcurl too. */
#include <ctype.h>

#include "fuzz_http.h"
#include "mso_graph.h"

#define ROOT "https://graph.microsoft.com"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_init();
    curl_global_init(CURL_GLOBAL_DEFAULT);
    return 0;
}

static void clean(const char *what, const char *s)
{
    const unsigned char *c;

    if (!s) {
        return;
    }
    FUZZ_CHECK(strlen(s) <= 300, "%s of %zu bytes", what, strlen(s));
    for (c = (const unsigned char *)s; *c; c++) {
        FUZZ_CHECK(*c >= 0x20 && *c != 0x7f, "%s holds control character 0x%02x", what, *c);
    }
}

/* The host, scheme, port and user curl would use for url. */
static void on_graph_host(const char *url)
{
    CURLU *u = curl_url();
    char *host = NULL, *scheme = NULL, *port = NULL, *user = NULL;

    if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK) {
        FUZZ_CHECK(curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK
                   && !strcasecmp(host, "graph.microsoft.com"), "link %s goes to host %s", url,
                   host ? host : "(none)");
        FUZZ_CHECK(curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK
                   && !strcasecmp(scheme, "https"), "link %s is not https", url);
        FUZZ_CHECK(curl_url_get(u, CURLUPART_PORT, &port, 0) != CURLUE_OK || !strcmp(port, "443"),
                   "link %s goes to port %s", url, port);
        FUZZ_CHECK(curl_url_get(u, CURLUPART_USER, &user, 0) != CURLUE_OK,
                   "link %s carries user info", url);
    }
    curl_free(host);
    curl_free(scheme);
    curl_free(port);
    curl_free(user);
    curl_url_cleanup(u);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    fuzz_answer_t a = fuzz_answer(p, &in);
    mso_http_response_t *resp = a.resp;
    mso_graph_result_t g;
    const char *text, *loc;
    int s = resp->status;

    mso_graph_classify(p, a.rv, resp, &g);
    if (a.rv != APR_SUCCESS || s == 0) {
        FUZZ_CHECK(g.cls == MSO_GRAPH_TRANSIENT && g.status == 0, "a failed call is not "
                   "transient");
    }
    else {
        FUZZ_CHECK(g.status == s && g.retry_after == resp->retry_after, "status or Retry-After "
                   "not handed on");
        FUZZ_CHECK((g.cls == MSO_GRAPH_OK) == (s >= 200 && s < 300), "HTTP %d classed %d", s,
                   g.cls);
        FUZZ_CHECK(s != 410 || g.cls == MSO_GRAPH_RESYNC, "410 is not a resync");
        FUZZ_CHECK((s != 429 && s != 503) || g.cls == MSO_GRAPH_THROTTLED
                   || g.cls == MSO_GRAPH_RESYNC, "HTTP %d classed %d", s, g.cls);
        FUZZ_CHECK(s < 500 || g.cls != MSO_GRAPH_FAILED, "HTTP %d is final", s);
        FUZZ_CHECK(g.cls != MSO_GRAPH_OK || !g.maybe_applied, "OK but maybe applied");
        loc = apr_table_get(resp->headers, "Location");
        FUZZ_CHECK(fuzz_streq(loc, g.location), "Location not handed on");
    }
    clean("code", g.code);
    clean("message", g.message);
    clean("request id", g.request_id);
    if (g.location && mso_graph_link_ok(ROOT, g.location)) {
        FUZZ_CHECK(!strncmp(g.location, ROOT "/v1.0/", strlen(ROOT "/v1.0/")), "prefix");
        on_graph_host(g.location);
    }
    text = mso_graph_result_text(p, &g);
    FUZZ_CHECK(text && *text, "no text");
    {
        const unsigned char *c;

        for (c = (const unsigned char *)text; *c; c++) {
            FUZZ_CHECK(*c >= 0x20 && *c != 0x7f, "result text holds control character 0x%02x",
                       *c);
        }
    }
    apr_pool_destroy(p);
    return 0;
}
