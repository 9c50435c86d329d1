/* Configuration values (lib/mso_config): every mso_check_* and the helpers
 * behind them. The first byte picks the check, the rest (up to a NUL) is the
 * value as a directive would pass it.
 * Invariants: a value is accepted only when it has the documented shape
 * (checked here independently of lib/); a refusal is a sentence; what a check
 * hands back (cloud, edition, date, seconds) agrees with the value; a URL that
 * is accepted names the same host for APR and for libcurl, which sends to it. */
#include <arpa/inet.h>
#include <ctype.h>
#include <time.h>

#include <apr_uri.h>
#include <curl/curl.h>

#include "fuzz_common.h"
#include "mso_config.h"
#include "mso_flow.h"
#include "mso_graph.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_init();
    curl_global_init(CURL_GLOBAL_DEFAULT);
    return 0;
}

static int is_domain_shape(const char *s)
{
    size_t n = strlen(s);
    const char *c;

    if (n == 0 || n > 253 || !strchr(s, '.') || s[0] == '.' || s[n - 1] == '.'
        || strstr(s, "..") || strstr(s, "-.") || strstr(s, ".-") || s[0] == '-'
        || s[n - 1] == '-') {
        return 0;
    }
    for (c = s; *c; c++) {
        if (!isalnum((unsigned char)*c) && *c != '-' && *c != '.') {
            return 0;
        }
    }
    return 1;
}

static int is_guid_shape(const char *s)
{
    int i;

    if (strlen(s) != 36) {
        return 0;
    }
    for (i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23 ? s[i] != '-'
                                                   : !isxdigit((unsigned char)s[i])) {
            return 0;
        }
    }
    return 1;
}

/* The host libcurl would connect to for url, lower case without brackets;
 * NULL when curl does not take the URL. */
static const char *curl_host(apr_pool_t *p, const char *url, int *has_user)
{
    CURLU *u = curl_url();
    char *host = NULL, *user = NULL, *pw = NULL;
    const char *out = NULL;

    *has_user = 0;
    if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK
        && curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK) {
        char *c;
        size_t n = strlen(host);

        if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
            out = apr_pstrndup(p, host + 1, n - 2);
        }
        else {
            out = apr_pstrdup(p, host);
        }
        for (c = (char *)out; *c; c++) {
            *c = (char)tolower((unsigned char)*c);
        }
        *has_user = curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK
                    || curl_url_get(u, CURLUPART_PASSWORD, &pw, 0) == CURLUE_OK;
    }
    curl_free(host);
    curl_free(user);
    curl_free(pw);
    curl_url_cleanup(u);
    return out;
}

static void check_url_value(apr_pool_t *p, const char *v, int allow_path)
{
    apr_uri_t u;
    const char *host;
    int has_user;
    char *lower;

    FUZZ_CHECK(apr_uri_parse(p, v, &u) == APR_SUCCESS && u.scheme && u.hostname && *u.hostname,
               "accepted URL does not parse: %s", v);
    FUZZ_CHECK(!strcasecmp(u.scheme, "https")
               || (!strcasecmp(u.scheme, "http") && mso_host_is_loopback(u.hostname)),
               "accepted URL is neither https nor loopback http: %s", v);
    FUZZ_CHECK(!strchr(v, '?') && !strchr(v, '#') && !u.user && !u.password,
               "accepted URL with query, fragment or user: %s", v);
    FUZZ_CHECK(allow_path || !u.path || !*u.path, "accepted base URL with a path: %s", v);
    FUZZ_CHECK(!*v || v[strlen(v) - 1] != '/' || !allow_path, "trailing slash: %s", v);
    /* The same host for the URL's two readers. */
    host = curl_host(p, v, &has_user);
    /* curl percent-decodes a host, APR does not: a percent sign in a host
     * (an administrator's typo, never a real name) is left out here. */
    if (host && !strchr(u.hostname, '%')) {
        lower = apr_pstrdup(p, u.hostname);
        for (char *c = lower; *c; c++) {
            *c = (char)tolower((unsigned char)*c);
        }
        struct in_addr a;
        struct in6_addr a6;
        char buf[INET6_ADDRSTRLEN];

        /* curl writes numeric hosts out in its own form ("127.1" is
         * 127.0.0.1, "::0" is "::"): compare addresses as addresses. */
        if (inet_aton(lower, &a)) {
            lower = apr_pstrdup(p, inet_ntoa(a));
        }
        else if (inet_pton(AF_INET6, lower, &a6) == 1
                 && inet_ntop(AF_INET6, &a6, buf, sizeof(buf))) {
            lower = apr_pstrdup(p, buf);
            if (inet_pton(AF_INET6, host, &a6) == 1
                && inet_ntop(AF_INET6, &a6, buf, sizeof(buf))) {
                host = apr_pstrdup(p, buf);
            }
        }
        FUZZ_CHECK(!strcmp(host, lower), "APR reads host \"%s\", curl \"%s\" in %s", lower,
                   host, v);
        FUZZ_CHECK(!has_user, "curl finds user info in %s", v);
    }
}

static const char *const folder_names[] = {
    "archive", "clutter", "conflicts", "conversationhistory", "deleteditems", "drafts",
    "inbox", "junkemail", "localfailures", "msgfolderroot", "outbox",
    "recoverableitemsdeletions", "scheduled", "searchfolders", "sentitems",
    "serverfailures", "syncissues", NULL
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    unsigned which = fuzz_byte(&in);
    const char *v = fuzz_str(p, &in), *why = NULL;
    size_t n = strlen(v);
    int i;

    switch (which % 15) {
    case 0:
        why = mso_check_guid(p, v, "Application (client) ID");
        FUZZ_CHECK((!why) == is_guid_shape(v), "GUID check wrong for \"%s\"", v);
        FUZZ_CHECK(mso_is_guid(v) == !why && mso_secret_looks_like_id(v) == !why, "GUID");
        break;
    case 1:
        why = mso_check_company_name(p, v);
        if (!why) {
            FUZZ_CHECK(n >= 1 && n <= 64 && strspn(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklm"
                                                    "nopqrstuvwxyz0123456789_.-") == n,
                       "company name \"%s\" accepted", v);
        }
        break;
    case 2: {
        mso_cloud_e cloud = (mso_cloud_e)-1;

        why = mso_check_cloud(p, v, &cloud);
        if (!why) {
            FUZZ_CHECK(cloud >= MSO_CLOUD_GLOBAL && cloud <= MSO_CLOUD_CHINA
                       && !strcasecmp(v, mso_cloud_name(cloud)), "cloud \"%s\"", v);
            FUZZ_CHECK(!strncmp(mso_cloud_authority(cloud), "https://", 8)
                       && !strncmp(mso_cloud_graph(cloud), "https://", 8), "cloud hosts");
            FUZZ_CHECK(!mso_check_service_url(p, mso_cloud_graph(cloud), 1)
                       && !mso_check_service_url(p, mso_cloud_authority(cloud), 0),
                       "a cloud's own URLs fail the URL check");
        }
        break;
    }
    case 3: {
        mso_edition_e ed = (mso_edition_e)-1;

        why = mso_check_edition(p, v, &ed);
        FUZZ_CHECK(why || (ed == MSO_EDITION_BASIC && !strcasecmp(v, "basic"))
                   || (ed == MSO_EDITION_PRO && !strcasecmp(v, "pro")), "edition \"%s\"", v);
        break;
    }
    case 4:
        why = mso_check_tenant(p, v);
        if (!why) {
            int multi = !strcasecmp(v, "common") || !strcasecmp(v, "organizations")
                        || !strcasecmp(v, "consumers");
            FUZZ_CHECK(multi || is_guid_shape(v) || is_domain_shape(v), "tenant \"%s\"", v);
            FUZZ_CHECK(mso_tenant_is_single(v) == !multi, "single-tenant flag of \"%s\"", v);
        }
        break;
    case 5:
        why = mso_check_base_url(p, v);
        if (!why) {
            check_url_value(p, v, 0);
        }
        break;
    case 6:
    case 7:
        why = mso_check_service_url(p, v, which % 15 == 7);
        if (!why) {
            check_url_value(p, v, 1);
            if (which % 15 == 7) {
                /* The module adds /v1.0 itself; a root that passes yields links
                 * that pass the Graph link check. */
                const char *url = mso_graph_delta_url(p, mso_graph_mailbox(p, v, NULL),
                                                      "inbox");
                FUZZ_CHECK(mso_graph_link_ok(v, url) || strlen(url) >= 8192,
                           "the first delta URL of root %s is refused: %s", v, url);
            }
        }
        break;
    case 8:
        why = mso_check_redirect_path(p, v);
        if (!why) {
            FUZZ_CHECK(v[0] == '/' && v[1] != '/' && n <= 200 && !strstr(v, "/../")
                       && !strstr(v, "/./") && !(n >= 3 && !strcmp(v + n - 3, "/.."))
                       && strcspn(v, "?#!$'(),;\\\"<>% \t") == n && fuzz_printable(v),
                       "redirect path \"%s\" accepted", v);
        }
        break;
    case 9: {
        apr_time_t when = -1;
        struct tm tm;
        time_t t;
        char back[16];

        why = mso_check_date(p, v, &when);
        if (!why) {
            FUZZ_CHECK(when % APR_USEC_PER_SEC == 0 && when >= 0, "date \"%s\"", v);
            t = (time_t)apr_time_sec(when);
            gmtime_r(&t, &tm);
            strftime(back, sizeof(back), "%Y-%m-%d", &tm);
            FUZZ_CHECK(!strcmp(back, v), "date \"%s\" accepted as %s", v, back);
            FUZZ_CHECK(mso_days_until(when, apr_time_from_sec(FUZZ_NOW))
                       == (long)((t - FUZZ_NOW) >= 0 ? (t - FUZZ_NOW) / 86400
                                                     : -((FUZZ_NOW - t + 86399) / 86400)),
                       "days until %s", v);
        }
        break;
    }
    case 10:
        why = mso_check_folder(p, v);
        for (i = 0; folder_names[i] && strcmp(folder_names[i], v); i++) {
        }
        FUZZ_CHECK((!why) == (folder_names[i] != NULL), "folder \"%s\"", v);
        if (n <= 40) {
            const char *wk = mso_graph_well_known_folder(p, v);
            FUZZ_CHECK((wk != NULL) == !mso_check_folder(p, mso_lower(p, v))
                       && (!wk || !strcasecmp(wk, v)), "well-known folder of \"%s\"", v);
        }
        break;
    case 11:
        why = mso_check_scope(p, v);
        if (!why) {
            FUZZ_CHECK(n > 0 && fuzz_printable(v) && !strchr(v, ' ') && !strchr(v, '"')
                       && !strchr(v, '\\') && !strstr(v, ".default"), "scope \"%s\"", v);
        }
        break;
    case 12: {
        int secs = -1;
        char *end;
        long long want;

        why = mso_check_interval(p, v, &secs);
        if (!why) {
            want = strtoll(v, &end, 10);
            FUZZ_CHECK(secs >= 10 && secs <= 86400 && secs == want && !*end,
                       "interval \"%s\" read as %d", v, secs);
        }
        break;
    }
    case 13:
        if (mso_host_is_loopback(v)) {
            /* What the resolver makes of it must be loopback too. */
            struct in_addr a;

            FUZZ_CHECK(!strcasecmp(v, "localhost") || !strcmp(v, "::1") || !strcmp(v, "[::1]")
                       || (inet_aton(v, &a) && (ntohl(a.s_addr) >> 24) == 127),
                       "\"%s\" taken for a loopback address", v);
        }
        break;
    case 14: {
        char *copy = apr_pstrdup(p, v), *t = mso_trim(copy);
        size_t tn = strlen(t);

        FUZZ_CHECK(t >= copy && t + tn <= copy + n, "trim left the string");
        FUZZ_CHECK(tn == 0 || (!isspace((unsigned char)t[0]) && !isspace((unsigned char)t[tn - 1])),
                   "trim left white space");
        FUZZ_CHECK(!strncmp(t, v + (t - copy), tn), "trim changed the text");
        break;
    }
    }
    if (why) {
        FUZZ_CHECK(*why, "an empty refusal");
    }
    apr_pool_destroy(p);
    return 0;
}
