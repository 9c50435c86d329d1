/* Discovery documents and signing keys of each authority, fetched when first
 * needed and cached per process (24 h; keys fetched again on an unknown kid,
 * at most every 5 minutes), and ID token verification against them. */
#ifndef MSO_DISCOVERY_H
#define MSO_DISCOVERY_H

#include <apr_pools.h>
#include <apr_errno.h>

#include "mso_http.h"
#include "mso_jwt.h"

typedef struct mso_discovery_cache_t mso_discovery_cache_t;

/* p must live as long as the process (the cache keeps documents in it). */
apr_status_t mso_discovery_cache_create(apr_pool_t *p, mso_discovery_cache_t **cache);

/* Verifies id_token for authority (e.g. https://login.microsoftonline.com/common).
 * expect->issuer is taken from the discovery document. Returns APR_SUCCESS
 * when the token could be checked (see *result), or an error with *why when
 * discovery or keys could not be fetched (Microsoft unreachable). */
apr_status_t mso_discovery_verify(mso_discovery_cache_t *cache, apr_pool_t *p,
                                  const mso_http_opts_t *o, const char *authority,
                                  const char *id_token, mso_id_expect_t *expect,
                                  mso_jwt_result_e *result, mso_id_claims_t **claims,
                                  const char **why);

#endif
