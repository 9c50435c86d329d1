/* The checks of the local API (see mod_msoauth_guard.h). `Require local`
 * alone is not enough: behind a reverse proxy on the same host every request
 * is local, and an SSRF in a co-hosted application or a DNS-rebound page
 * reaches 127.0.0.1 too. */
#include <string.h>

#include <apr_strings.h>
#include <apr_lib.h>
#include <jansson.h>

#include <httpd.h>
#include <http_config.h>
#include <http_core.h>
#include <http_log.h>
#include <http_protocol.h>

#include "mod_msoauth.h"
#include "mod_msoauth_config.h"
#include "mod_msoauth_guard.h"
#include "mso_config.h"
#include "mso_crypto.h"
#include "mso_reason.h"

APLOG_USE_MODULE(msoauth);

/* Headers a forwarding proxy adds. */
static const char *const proxy_headers[] = {
    "Forwarded", "X-Forwarded-For", "Via", "X-Forwarded-Host", "X-Real-IP", NULL
};

static int refuse(request_rec *r, int status, const char *detail)
{
    const mso_reason_t *rs = mso_reason_get("forbidden");
    json_t *j = json_pack("{s:b, s:s, s:s, s:s, s:s}", "ok", 0, "reason", "forbidden",
                          "message", rs->message, "fix", rs->fix, "detail", detail);
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;

    json_decref(j);
    ap_log_rerror(APLOG_MARK, APLOG_WARNING, 0, r, MSOLOGNO(310) "refused %s %s: %s",
                  r->method, ap_escape_logitem(r->pool, r->uri), detail);
    apr_table_setn(r->err_headers_out, "Cache-Control", "no-store");
    apr_table_setn(r->err_headers_out, "X-Content-Type-Options", "nosniff");
    if (status == HTTP_UNAUTHORIZED) {
        apr_table_setn(r->err_headers_out, "WWW-Authenticate", "Bearer realm=\"mod_msoauth\"");
    }
    r->status = status;
    ap_set_content_type(r, "application/json");
    if (text) {
        ap_rputs(text, r);
        ap_rputc('\n', r);
        free(text);
    }
    return OK;
}

static int name_matches(const char *host, const char *name)
{
    return name && !strcasecmp(host, name);
}

/* The host part of a base URL such as https://erp.example.com:8443. */
static const char *base_url_host(apr_pool_t *p, const char *url)
{
    const char *h = url ? strstr(url, "://") : NULL;
    const char *end;

    if (!h) {
        return NULL;
    }
    h += 3;
    if (*h == '[') {
        end = strchr(h, ']');
        return end ? apr_pstrndup(p, h + 1, end - h - 1) : NULL;
    }
    end = h + strcspn(h, ":/");
    return apr_pstrndup(p, h, end - h);
}

/* A Host that names this server (ServerName, ServerAlias, MSOAuthBaseURL) or
 * a loopback address: a DNS-rebound page carries the attacker's own name. */
static int host_ok(request_rec *r, msoauth_srv_conf_t *sc)
{
    server_rec *s = r->server;
    const char *host = r->hostname;
    int i;

    if (!host || !*host) {
        return 1;               /* HTTP/1.0 without Host: no browser sends that */
    }
    if (mso_host_is_loopback(host) || name_matches(host, s->server_hostname)
        || name_matches(host, base_url_host(r->pool, sc->effective_base_url))) {
        return 1;
    }
    for (i = 0; s->names && i < s->names->nelts; i++) {
        if (name_matches(host, APR_ARRAY_IDX(s->names, i, const char *))) {
            return 1;
        }
    }
    for (i = 0; s->wild_names && i < s->wild_names->nelts; i++) {
        if (!ap_strcasecmp_match(host, APR_ARRAY_IDX(s->wild_names, i, const char *))) {
            return 1;
        }
    }
    return 0;
}

/* True when the request carries "Authorization: Bearer KEY" with the key. */
static int has_api_key(request_rec *r, const char *key)
{
    const char *auth = apr_table_get(r->headers_in, "Authorization");

    if (!auth || strncasecmp(auth, "Bearer ", 7)) {
        return 0;
    }
    auth += 7;
    while (*auth == ' ') {
        auth++;
    }
    return mso_str_equal_ct(auth, key);
}

int msoauth_guard(request_rec *r, msoauth_guard_key_e key, int *has_key)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(r->server);
    msoauth_dir_conf_t *dc = msoauth_dir_conf(r);
    int i, keyed;

    if (has_key) {
        *has_key = 0;
    }
    if (!dc || dc->trust_proxy != 1) {
        for (i = 0; proxy_headers[i]; i++) {
            if (apr_table_get(r->headers_in, proxy_headers[i])) {
                return refuse(r, HTTP_FORBIDDEN, apr_psprintf(r->pool, "the request came "
                              "through a proxy (it carries %s); set MSOAuthTrustProxy on for "
                              "this location if that proxy is trusted", proxy_headers[i]));
            }
        }
    }
    if (!host_ok(r, sc)) {
        return refuse(r, HTTP_FORBIDDEN, apr_psprintf(r->pool, "Host '%s' does not name this "
                      "server: use its ServerName, a ServerAlias, the host of MSOAuthBaseURL "
                      "or a loopback address", ap_escape_logitem(r->pool, r->hostname)));
    }
    keyed = sc->api_key && has_api_key(r, sc->api_key);
    if (has_key) {
        *has_key = keyed;
    }
    if (sc->api_key && !keyed && key == MSOAUTH_GUARD_KEY_REQUIRED) {
        return refuse(r, HTTP_UNAUTHORIZED, "the API key is missing or wrong: send "
                      "'Authorization: Bearer KEY' with the key in MSOAuthAPIKeyFile");
    }
    return DECLINED;
}
