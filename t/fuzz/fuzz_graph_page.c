/* Graph delta pages (lib/mso_graph): mso_graph_parse_page on the input (after
 * a first byte that picks the Graph root of a cloud or of the simulator),
 * mso_graph_link_ok on its links and mso_graph_time on its dates.
 * Invariants: every entry is kept or counted as skipped; a kept entry has a
 * Graph id of the documented shape, its recipients are a JSON array with one
 * entry per recipient, and "full" only for a complete new item; a page always
 * has a link; a link that mso_graph_link_ok accepts starts with the root +
 * "/v1.0/" and goes to the root's host, scheme and port for libcurl too;
 * mso_graph_time reads back every time it is given in its own format. */
#include <ctype.h>
#include <time.h>

#include <curl/curl.h>

#include "fuzz_common.h"
#include "mso_graph.h"
#include "mso_json.h"

static const struct { const char *root, *host, *scheme, *port; } roots[] = {
    { "https://graph.microsoft.com", "graph.microsoft.com", "https", "443" },
    { "https://graph.microsoft.us", "graph.microsoft.us", "https", "443" },
    { "https://dod-graph.microsoft.us", "dod-graph.microsoft.us", "https", "443" },
    { "https://microsoftgraph.chinacloudapi.cn", "microsoftgraph.chinacloudapi.cn", "https", "443" },
    { "http://127.0.0.1:8081/graph", "127.0.0.1", "http", "8081" },
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_init();
    curl_global_init(CURL_GLOBAL_DEFAULT);
    return 0;
}

static void link_check(apr_pool_t *p, int r, const char *url)
{
    const char *prefix = apr_pstrcat(p, roots[r].root, "/v1.0/", NULL);
    const char *c;
    CURLU *u;
    char *host = NULL, *scheme = NULL, *port = NULL, *user = NULL;

    if (!url || !mso_graph_link_ok(roots[r].root, url)) {
        return;
    }
    FUZZ_CHECK(!strncmp(url, prefix, strlen(prefix)) && strlen(url) < 8192,
               "link %s accepted for root %s", url, roots[r].root);
    for (c = url; *c; c++) {
        FUZZ_CHECK(*c > 0x20 && *c < 0x7f, "link with byte 0x%02x accepted", (unsigned char)*c);
    }
    u = curl_url();
    if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK) {
        FUZZ_CHECK(curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK
                   && !strcasecmp(host, roots[r].host), "link %s goes to host %s", url,
                   host ? host : "(none)");
        FUZZ_CHECK(curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK
                   && !strcasecmp(scheme, roots[r].scheme), "link %s scheme", url);
        FUZZ_CHECK(curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK
                   && !strcmp(port, roots[r].port), "link %s goes to port %s", url,
                   port ? port : "(none)");
        FUZZ_CHECK(curl_url_get(u, CURLUPART_USER, &user, 0) != CURLUE_OK,
                   "link %s carries user info", url);
    }
    curl_free(host);
    curl_free(scheme);
    curl_free(port);
    curl_free(user);
    curl_url_cleanup(u);
}

static int id_shape(const char *id)
{
    size_t n = id ? strlen(id) : 0;

    return n >= 1 && n <= 512
           && strspn(id, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-")
              == n;
}

/* Times in Graph's own format read back: whole seconds from the input's
 * first bytes, years 1970 to 9999, with a fraction or an offset. */
static void time_round_trip(apr_pool_t *p, const uint8_t *data, size_t size)
{
    uint64_t v = 0;
    time_t t;
    struct tm tm;
    char buf[64];
    size_t i;
    int off;

    for (i = 0; i < 8 && i < size; i++) {
        v = v << 8 | data[i];
    }
    t = (time_t)(v % 253402300800ULL);          /* before 10000-01-01 */
    gmtime_r(&t, &tm);
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
    FUZZ_CHECK(mso_graph_time(buf) == (apr_int64_t)t, "%s read as %" APR_INT64_T_FMT, buf,
               mso_graph_time(buf));
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S.1234567Z", &tm);
    FUZZ_CHECK(mso_graph_time(buf) == (apr_int64_t)t, "%s", buf);
    off = (int)(v % 1440) - 720;                /* minutes east of UTC */
    {
        time_t local = t + off * 60;

        gmtime_r(&local, &tm);
        if (tm.tm_year + 1900 <= 9999) {
            strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
            sprintf(buf + strlen(buf), "%c%02d:%02d", off < 0 ? '-' : '+', abs(off) / 60,
                    abs(off) % 60);
            FUZZ_CHECK(mso_graph_time(buf) == (apr_int64_t)t, "%s read as %" APR_INT64_T_FMT
                       " not %lld", buf, mso_graph_time(buf), (long long)t);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    int r = (int)(fuzz_byte(&in) % (sizeof(roots) / sizeof(roots[0])));
    size_t len;
    const char *body = fuzz_rest(p, &in, &len), *err = NULL;
    mso_graph_page_t page;
    apr_status_t rv;
    int i;

    rv = mso_graph_parse_page(p, body, len, &page, &err);
    if (rv == APR_SUCCESS) {
        json_t *j = mso_json_parse_flags(p, body, len, JSON_ALLOW_NUL, NULL);
        size_t total = json_array_size(mso_json_arr(j, "value"));

        FUZZ_CHECK(!err, "an error with a page");
        FUZZ_CHECK(page.items && (size_t)page.items->nelts + (size_t)page.skipped == total,
                   "%d kept + %d skipped of %zu entries", page.items->nelts, page.skipped,
                   total);
        FUZZ_CHECK(page.next_link || page.delta_link, "a page without a link");
        for (i = 0; i < page.items->nelts; i++) {
            const mso_graph_msg_t *m = &APR_ARRAY_IDX(page.items, i, mso_graph_msg_t);

            FUZZ_CHECK(id_shape(m->graph_id), "entry %d has id \"%s\"", i, m->graph_id);
            FUZZ_CHECK(m->is_read >= -1 && m->is_read <= 1 && m->has_attachments >= -1
                       && m->has_attachments <= 1 && (m->removed == 0 || m->removed == 1),
                       "flags out of range");
            FUZZ_CHECK(!m->full || (!m->removed && m->received_at >= 0 && m->is_read >= 0),
                       "a partial entry marked full");
            if (m->to_json) {
                json_t *to = mso_json_parse(p, m->to_json, strlen(m->to_json), NULL);

                FUZZ_CHECK(json_is_array(to), "toRecipients is not an array: %s", m->to_json);
            }
            if (m->received_at != -1) {
                FUZZ_CHECK(m->received_at >= -62167219200LL - 86400 - 24 * 3600
                           && m->received_at <= 253402300800LL + 24 * 3600,
                           "time %" APR_INT64_T_FMT " out of range", m->received_at);
            }
        }
        link_check(p, r, page.next_link);
        link_check(p, r, page.delta_link);
    }
    else {
        FUZZ_CHECK(err && *err, "a refusal without a reason");
    }
    /* The input as a link and as a time. */
    link_check(p, r, body);
    {
        apr_int64_t t = mso_graph_time(body);

        FUZZ_CHECK(t == -1 || (t >= -62167219200LL - 86400 && t <= 253402300800LL + 86400),
                   "time %" APR_INT64_T_FMT " out of range", t);
    }
    time_round_trip(p, data, size);
    apr_pool_destroy(p);
    return 0;
}
