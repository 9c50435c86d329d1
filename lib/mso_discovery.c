#include <string.h>

#include <apr_hash.h>
#include <apr_strings.h>
#include <apr_thread_mutex.h>
#include <apr_time.h>

#include "mso_discovery.h"
#include "mso_json.h"
#include "mso_log.h"

#define DOC_TTL apr_time_from_sec(86400)
/* An unknown kid fetches the keys again at once (Microsoft rolled them), but
 * the same unknown kid only once per 5 minutes. */
#define SAME_MISS_INTERVAL apr_time_from_sec(300)

typedef struct {
    apr_pool_t *pool;           /* owns everything below; replaced as a whole */
    const char *issuer;
    const char *jwks_uri;
    mso_jwks_t *jwks;
    apr_time_t fetched;
    const char *missed_kid;     /* last kid not found, and when */
    apr_time_t missed_at;
} entry_t;

struct mso_discovery_cache_t {
    apr_pool_t *pool;
    apr_thread_mutex_t *lock;
    apr_hash_t *entries;        /* authority -> entry_t* */
};

apr_status_t mso_discovery_cache_create(apr_pool_t *p, mso_discovery_cache_t **cache)
{
    mso_discovery_cache_t *c = apr_pcalloc(p, sizeof(*c));
    apr_status_t rv = apr_thread_mutex_create(&c->lock, APR_THREAD_MUTEX_DEFAULT, p);

    if (rv != APR_SUCCESS) {
        return rv;
    }
    c->pool = p;
    c->entries = apr_hash_make(p);
    *cache = c;
    return APR_SUCCESS;
}

/* The keys may live elsewhere than the authority, but never on plain http
 * unless the authority itself is plain http (a local simulator). */
static int acceptable_url(const char *authority, const char *url)
{
    if (!url) {
        return 0;
    }
    if (!strncasecmp(url, "https://", 8)) {
        return 1;
    }
    return !strncasecmp(url, "http://", 7) && !strncasecmp(authority, "http://", 7);
}

static apr_status_t get(apr_pool_t *p, const mso_http_opts_t *o, const char *url,
                        mso_http_response_t **resp, const char **why)
{
    apr_status_t rv = mso_http_request(p, o, "GET", url, NULL, NULL, 0, resp);

    if (rv != APR_SUCCESS) {
        *why = apr_psprintf(p, "GET %s failed: %s", url, *resp && (*resp)->error
                            ? (*resp)->error : "transport error");
        return rv;
    }
    if ((*resp)->status != 200) {
        *why = apr_psprintf(p, "GET %s answered HTTP %d", url, (*resp)->status);
        return APR_EGENERAL;
    }
    return APR_SUCCESS;
}

/* A new entry: the discovery document and the keys it points to. On failure
 * nothing is kept and *why is allocated from p. */
static apr_status_t fetch_entry(mso_discovery_cache_t *c, apr_pool_t *p,
                                const mso_http_opts_t *o, const char *authority,
                                entry_t **out, const char **why)
{
    apr_pool_t *ep;
    entry_t *e;
    json_t *j;
    mso_http_response_t *resp = NULL;
    const char *url, *err = NULL;
    apr_status_t rv;

    apr_pool_create(&ep, c->pool);
    e = apr_pcalloc(ep, sizeof(*e));
    e->pool = ep;
    url = apr_pstrcat(ep, authority, "/v2.0/.well-known/openid-configuration", NULL);
    rv = get(ep, o, url, &resp, &err);
    if (rv == APR_SUCCESS) {
        j = mso_json_parse(ep, resp->body, resp->body_len, &err);
        e->issuer = j ? mso_json_str(j, "issuer") : NULL;
        e->jwks_uri = j ? mso_json_str(j, "jwks_uri") : NULL;
        if (!e->issuer || !acceptable_url(authority, e->issuer)
            || !acceptable_url(authority, e->jwks_uri)) {
            err = apr_psprintf(ep, "the discovery document at %s lacks a usable issuer or "
                               "jwks_uri", url);
            rv = APR_EGENERAL;
        }
    }
    if (rv == APR_SUCCESS) {
        rv = get(ep, o, e->jwks_uri, &resp, &err);
    }
    if (rv == APR_SUCCESS) {
        rv = mso_jwks_parse(ep, resp->body, resp->body_len, &e->jwks, &err);
    }
    if (rv != APR_SUCCESS) {
        *why = apr_pstrdup(p, err ? err : "unknown error");
        apr_pool_destroy(ep);
        return rv;
    }
    e->fetched = apr_time_now();
    *out = e;
    return APR_SUCCESS;
}

static void replace(mso_discovery_cache_t *c, const char *authority, entry_t *old,
                    entry_t *fresh)
{
    if (old) {
        apr_hash_set(c->entries, authority, APR_HASH_KEY_STRING, NULL);
        apr_pool_destroy(old->pool);
    }
    apr_hash_set(c->entries, apr_pstrdup(fresh->pool, authority), APR_HASH_KEY_STRING, fresh);
}

apr_status_t mso_discovery_verify(mso_discovery_cache_t *c, apr_pool_t *p,
                                  const mso_http_opts_t *o, const char *authority,
                                  const char *id_token, mso_id_expect_t *expect,
                                  mso_jwt_result_e *result, mso_id_claims_t **claims,
                                  const char **why)
{
    entry_t *e, *fresh = NULL;
    const char *kid = NULL, *err = NULL;
    apr_status_t rv = APR_SUCCESS;

    /* Held across fetches: they are rare, and one fetch serves every waiter. */
    apr_thread_mutex_lock(c->lock);
    e = apr_hash_get(c->entries, authority, APR_HASH_KEY_STRING);
    if (!e || apr_time_now() - e->fetched > DOC_TTL) {
        rv = fetch_entry(c, p, o, authority, &fresh, &err);
        if (rv == APR_SUCCESS) {
            replace(c, authority, e, fresh);
            e = fresh;
        }
        else if (e) {
            /* Keep the last known good document and keys. */
            mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, rv, "refreshing the discovery "
                           "document of %s failed, using the cached one: %s", authority, err);
            rv = APR_SUCCESS;
        }
    }
    if (rv != APR_SUCCESS) {
        apr_thread_mutex_unlock(c->lock);
        *why = err;
        return rv;
    }
    if (mso_jwt_kid(p, id_token, &kid) == APR_SUCCESS && !mso_jwks_has_kid(e->jwks, kid)
        && (!e->missed_kid || strcmp(e->missed_kid, kid)
            || apr_time_now() - e->missed_at > SAME_MISS_INTERVAL)) {
        e->missed_kid = apr_pstrndup(e->pool, kid, 128);
        e->missed_at = apr_time_now();
        if (fetch_entry(c, p, o, authority, &fresh, &err) == APR_SUCCESS) {
            fresh->missed_kid = apr_pstrdup(fresh->pool, e->missed_kid);
            fresh->missed_at = e->missed_at;
            replace(c, authority, e, fresh);
            e = fresh;
        }
        else {
            mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, 0, "fetching the signing keys of "
                           "%s again failed: %s", authority, err);
        }
    }
    expect->issuer = apr_pstrdup(p, e->issuer);
    *result = mso_jwt_verify(p, id_token, e->jwks, expect, claims, why);
    apr_thread_mutex_unlock(c->lock);
    return APR_SUCCESS;
}
