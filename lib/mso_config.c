#include <arpa/inet.h>
#include <ctype.h>
#include <string.h>

#include <apr_strings.h>
#include <apr_uri.h>
#include <apr_lib.h>

#include "mso_config.h"

int mso_is_guid(const char *s)
{
    static const int groups[] = {8, 4, 4, 4, 12};
    int g, i;

    if (!s) {
        return 0;
    }
    for (g = 0; g < 5; g++) {
        for (i = 0; i < groups[g]; i++, s++) {
            if (!apr_isxdigit(*s)) {
                return 0;
            }
        }
        if (g < 4 && *s++ != '-') {
            return 0;
        }
    }
    return *s == '\0';
}

int mso_secret_looks_like_id(const char *secret)
{
    return mso_is_guid(secret);
}

const char *mso_check_guid(apr_pool_t *p, const char *value, const char *what)
{
    if (mso_is_guid(value)) {
        return NULL;
    }
    return apr_psprintf(p, "'%s' is not a GUID. Copy the %s from the app's Overview page "
                        "in the Microsoft Entra admin center (App registrations); it looks like "
                        "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", value, what);
}

const char *mso_check_company_name(apr_pool_t *p, const char *name)
{
    const char *c;
    apr_size_t n = strlen(name);

    for (c = name; *c; c++) {
        if (!apr_isalnum(*c) && *c != '_' && *c != '.' && *c != '-') {
            break;
        }
    }
    if (n >= 1 && n <= 64 && !*c) {
        return NULL;
    }
    return apr_psprintf(p, "company name '%s' is not allowed: use 1 to 64 characters from "
                        "A-Z a-z 0-9 _ . - (for example <MSOAuthCompany acme>)", name);
}

static const char *const cloud_names[] = {"global", "usgov", "usgov-dod", "china"};
static const char *const cloud_authorities[] = {
    "https://login.microsoftonline.com",
    "https://login.microsoftonline.us",
    "https://login.microsoftonline.us",
    "https://login.chinacloudapi.cn",
};
static const char *const cloud_graphs[] = {
    "https://graph.microsoft.com",
    "https://graph.microsoft.us",
    "https://dod-graph.microsoft.us",
    "https://microsoftgraph.chinacloudapi.cn",
};

const char *mso_check_cloud(apr_pool_t *p, const char *value, mso_cloud_e *cloud)
{
    int i;

    for (i = 0; i < 4; i++) {
        if (!strcasecmp(value, cloud_names[i])) {
            *cloud = (mso_cloud_e)i;
            return NULL;
        }
    }
    return apr_psprintf(p, "unknown cloud '%s': use global (Microsoft 365 worldwide and GCC), "
                        "usgov (GCC High), usgov-dod (DoD) or china (21Vianet)", value);
}

const char *mso_cloud_name(mso_cloud_e cloud) { return cloud_names[cloud]; }
static const char *const cloud_outlooks[] = {
    "https://outlook.office.com",
    "https://outlook.office365.us",
    "https://outlook-dod.office365.us",
    "https://partner.outlook.cn",
};

const char *mso_cloud_outlook(mso_cloud_e cloud) { return cloud_outlooks[cloud]; }
const char *mso_cloud_authority(mso_cloud_e cloud) { return cloud_authorities[cloud]; }
const char *mso_cloud_graph(mso_cloud_e cloud) { return cloud_graphs[cloud]; }

const char *mso_check_edition(apr_pool_t *p, const char *value, mso_edition_e *edition)
{
    if (!strcasecmp(value, "basic")) {
        *edition = MSO_EDITION_BASIC;
        return NULL;
    }
    if (!strcasecmp(value, "pro")) {
        *edition = MSO_EDITION_PRO;
        return NULL;
    }
    return apr_psprintf(p, "unknown edition '%s': use basic (reads mail, Mail.Read) or pro "
                        "(also writes changes back to Outlook, Mail.ReadWrite)", value);
}

/* A DNS name with at least two labels: letters, digits and hyphens. */
static int is_domain(const char *s)
{
    int labels = 0, len = 0;
    const char *c;

    if (strlen(s) > 253) {
        return 0;
    }
    for (c = s;; c++) {
        if (*c == '.' || *c == '\0') {
            if (len == 0 || len > 63 || c[-1] == '-') {
                return 0;
            }
            labels++;
            len = 0;
            if (*c == '\0') {
                break;
            }
        }
        else if (apr_isalnum(*c) || (*c == '-' && len > 0)) {
            len++;
        }
        else {
            return 0;
        }
    }
    return labels >= 2;
}

const char *mso_check_tenant(apr_pool_t *p, const char *value)
{
    if (!strcasecmp(value, "common") || !strcasecmp(value, "organizations")
        || !strcasecmp(value, "consumers") || mso_is_guid(value) || is_domain(value)) {
        return NULL;
    }
    return apr_psprintf(p, "'%s' is not a tenant: use common, organizations, consumers, the "
                        "Directory (tenant) ID GUID from the app's Overview page, or a verified "
                        "domain such as contoso.onmicrosoft.com", value);
}

int mso_tenant_is_single(const char *tenant)
{
    return tenant && strcasecmp(tenant, "common") && strcasecmp(tenant, "organizations")
           && strcasecmp(tenant, "consumers");
}

int mso_host_is_loopback(const char *host)
{
    if (!host) {
        return 0;
    }
    if (!strcasecmp(host, "localhost") || !strcmp(host, "::1") || !strcmp(host, "[::1]")) {
        return 1;
    }
    if (!strncmp(host, "127.", 4)) {
        /* Strict dotted decimal: sscanf's %d also took "-0", "+1" and " 1",
         * which the resolver does not read as an address. */
        struct in_addr a;
        return inet_pton(AF_INET, host, &a) == 1;
    }
    return 0;
}

/* The checks shared by the base URL and service URLs. */
static const char *check_url(apr_pool_t *p, const char *value, apr_uri_t *u, int allow_path)
{
    const unsigned char *c;

    /* apr_uri_parse takes any byte; links under a Graph root with one of
     * these would all be refused later (mso_graph_link_ok). */
    for (c = (const unsigned char *)value; *c; c++) {
        if (*c <= 0x20 || *c >= 0x7f) {
            return apr_psprintf(p, "'%s' holds a space, a control character or a non-ASCII "
                                "byte: write the host in ASCII (punycode for international "
                                "names)", value);
        }
    }
    if (apr_uri_parse(p, value, u) != APR_SUCCESS || !u->scheme || !u->hostname
        || !*u->hostname) {
        return apr_psprintf(p, "'%s' is not an absolute URL: write it as "
                            "https://host.example.com", value);
    }
    if (strcasecmp(u->scheme, "https") && strcasecmp(u->scheme, "http")) {
        return apr_psprintf(p, "'%s' must start with https://", value);
    }
    if (!strcasecmp(u->scheme, "http") && !mso_host_is_loopback(u->hostname)) {
        return apr_psprintf(p, "'%s' uses http:// for a host that is not loopback: Microsoft "
                            "only accepts https:// redirect URIs outside localhost. Use https:// "
                            "(behind a TLS-terminating proxy, give the public https:// URL)", value);
    }
    if (u->user || u->password) {
        return apr_psprintf(p, "'%s' must not carry a user name or password", value);
    }
    if (u->query || u->fragment || strchr(value, '?') || strchr(value, '#')) {
        return apr_psprintf(p, "'%s' must not have a query (?) or fragment (#)", value);
    }
    if (u->path && *u->path) {
        if (!allow_path) {
            return apr_psprintf(p, "'%s' must be scheme and host only (with an optional port), "
                                "without a trailing slash or path: write %s://%s", value,
                                u->scheme, u->hostinfo ? u->hostinfo : u->hostname);
        }
        if (u->path[strlen(u->path) - 1] == '/') {
            return apr_psprintf(p, "'%s' must not end with a slash: remove it", value);
        }
    }
    return NULL;
}

const char *mso_check_base_url(apr_pool_t *p, const char *value)
{
    apr_uri_t u;
    return check_url(p, value, &u, 0);
}

const char *mso_check_service_url(apr_pool_t *p, const char *value, int graph)
{
    apr_uri_t u;
    const char *err = check_url(p, value, &u, 1);
    apr_size_t n;

    if (err) {
        return err;
    }
    n = u.path ? strlen(u.path) : 0;
    if (graph && n >= 5 && (!strcasecmp(u.path + n - 5, "/v1.0") || !strcasecmp(u.path + n - 5, "/beta"))) {
        return apr_psprintf(p, "'%s' ends with a Graph version: give the Graph root only "
                            "(e.g. https://graph.microsoft.com); the module adds /v1.0", value);
    }
    return NULL;
}

const char *mso_check_redirect_path(apr_pool_t *p, const char *value)
{
    const char *c;

    if (value[0] != '/' || value[1] == '/') {
        return apr_psprintf(p, "'%s' must be an absolute path starting with a single /, "
                            "e.g. /microsoft_outlook/confirm", value);
    }
    if (strstr(value, "/../") || strstr(value, "/./")
        || (strlen(value) >= 3 && !strcmp(value + strlen(value) - 3, "/.."))) {
        return apr_psprintf(p, "'%s' must not contain . or .. segments", value);
    }
    for (c = value; *c; c++) {
        /* Characters Microsoft refuses in redirect URIs, plus what needs encoding. */
        if (!apr_isgraph(*c) || strchr("?#!$'(),;\\\"<>%", *c)) {
            return apr_psprintf(p, "'%s' contains '%c', which is not allowed in a redirect "
                                "URI path: use letters, digits and / - _ . ~", value, *c);
        }
    }
    if (strlen(value) > 200) {
        return apr_psprintf(p, "the redirect path is longer than 200 characters; Microsoft "
                            "accepts at most 256 for the whole redirect URI");
    }
    return NULL;
}

const char *mso_check_date(apr_pool_t *p, const char *value, apr_time_t *when)
{
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int y, m, d, i, leap;
    long days;
    char tail;

    /* Digits where digits belong: %d also skips white space and takes a sign. */
    for (i = 0; i < 10 && value[i]; i++) {
        if (i != 4 && i != 7 && !apr_isdigit(value[i])) {
            goto bad;
        }
    }
    if (strlen(value) != 10 || sscanf(value, "%4d-%2d-%2d%c", &y, &m, &d, &tail) != 3
        || value[4] != '-' || value[7] != '-' || y < 1970 || y > 2199 || m < 1 || m > 12) {
        goto bad;
    }
    leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d < 1 || d > mdays[m - 1] + (m == 2 && leap)) {
        goto bad;
    }
    /* Days since 1970-01-01 without relying on the local time zone. */
    days = 0;
    for (i = 1970; i < y; i++) {
        days += 365 + ((i % 4 == 0 && i % 100 != 0) || i % 400 == 0);
    }
    for (i = 1; i < m; i++) {
        days += mdays[i - 1] + (i == 2 && leap);
    }
    days += d - 1;
    *when = apr_time_from_sec((apr_time_t)days * 86400);
    return NULL;
bad:
    return apr_psprintf(p, "'%s' is not a date: write the secret's expiry as YYYY-MM-DD, as "
                        "shown under Certificates & secrets (e.g. 2027-05-31)", value);
}

static const char *const folders[] = {
    "archive", "clutter", "conflicts", "conversationhistory", "deleteditems", "drafts",
    "inbox", "junkemail", "localfailures", "msgfolderroot", "outbox",
    "recoverableitemsdeletions", "scheduled", "searchfolders", "sentitems",
    "serverfailures", "syncissues", NULL
};

const char *mso_check_folder(apr_pool_t *p, const char *value)
{
    int i;

    for (i = 0; folders[i]; i++) {
        if (!strcmp(value, folders[i])) {
            return NULL;
        }
    }
    return apr_psprintf(p, "'%s' is not a well-known Outlook folder name: use lower-case names "
                        "such as inbox, sentitems, drafts, deleteditems, archive, junkemail",
                        value);
}

const char *mso_check_scope(apr_pool_t *p, const char *value)
{
    const char *c;

    if (!*value) {
        return "an empty scope is not allowed";
    }
    for (c = value; *c; c++) {
        if (!apr_isgraph(*c) || *c == '"' || *c == '\\') {
            return apr_psprintf(p, "scope '%s' contains a character that is not allowed; "
                                "give each scope as a separate word, e.g. Mail.Send", value);
        }
    }
    if (strstr(value, ".default")) {
        return apr_psprintf(p, "scope '%s' cannot be combined with the edition's delegated "
                            "scopes (Microsoft refuses .default mixed with named scopes): "
                            "name the delegated permission instead, e.g. Mail.Send", value);
    }
    return NULL;
}

const char *mso_check_interval(apr_pool_t *p, const char *value, int *seconds)
{
    char *end;
    apr_int64_t v = apr_strtoi64(value, &end, 10);

    if (end == value || *end || v < 10 || v > 86400) {
        return apr_psprintf(p, "'%s' is not a number of seconds between 10 and 86400", value);
    }
    *seconds = (int)v;
    return NULL;
}

long mso_days_until(apr_time_t when, apr_time_t now)
{
    apr_time_t diff = when - now;
    long secs = (long)apr_time_sec(diff);

    /* Round toward minus infinity so "expired 1 hour ago" is -1, not 0. */
    return secs >= 0 ? secs / 86400 : -((-secs + 86399) / 86400);
}

char *mso_trim(char *s)
{
    char *e;

    while (*s && apr_isspace(*s)) {
        s++;
    }
    e = s + strlen(s);
    while (e > s && apr_isspace(e[-1])) {
        *--e = '\0';
    }
    return s;
}

const char *mso_check_bytes(apr_pool_t *p, const char *value, apr_int64_t *bytes)
{
    char *end;
    apr_int64_t v = apr_strtoi64(value, &end, 10);

    if (end == value || *end || v < 0 || v > 150 * 1024 * 1024) {
        return apr_psprintf(p, "'%s' is not a number of bytes between 0 and 157286400 "
                            "(150 MiB)", value);
    }
    *bytes = v;
    return NULL;
}

const char *mso_check_days(apr_pool_t *p, const char *value, int *days)
{
    char *end;
    apr_int64_t v = apr_strtoi64(value, &end, 10);

    if (end == value || *end || v < 0 || v > 3650) {
        return apr_psprintf(p, "'%s' is not a number of days between 0 (keep everything) and "
                            "3650", value);
    }
    *days = (int)v;
    return NULL;
}

int mso_tenant_is_multi(const char *tenant)
{
    return tenant && (!strcasecmp(tenant, "common") || !strcasecmp(tenant, "organizations")
                      || !strcasecmp(tenant, "consumers"));
}
