/* ID tokens: RS256 verification against a JWKS and the claim checks of the
 * Microsoft identity platform (issuer with the {tenantid} rule, audience,
 * nonce, times, tenant). */
#ifndef MSO_JWT_H
#define MSO_JWT_H

#include <apr_pools.h>
#include <apr_errno.h>

typedef struct mso_jwks_t mso_jwks_t;

/* Parses a JWKS document; keeps RSA signing keys (kty RSA, use sig or absent)
 * with their kid and optional issuer. APR_EINVAL with *err for bad input. */
apr_status_t mso_jwks_parse(apr_pool_t *p, const char *json, apr_size_t len,
                            mso_jwks_t **jwks, const char **err);
int mso_jwks_count(const mso_jwks_t *jwks);
int mso_jwks_has_kid(const mso_jwks_t *jwks, const char *kid);

/* The kid of a compact JWS without verifying anything (to decide whether the
 * JWKS must be fetched again). APR_EINVAL when it is not a JWS. */
apr_status_t mso_jwt_kid(apr_pool_t *p, const char *jwt, const char **kid);

typedef struct {
    const char *issuer;         /* from discovery; may hold {tenantid} */
    const char *client_id;      /* expected aud */
    const char *nonce;          /* expected nonce */
    const char *tenant_id;      /* required tid (single-tenant GUID), or NULL */
    long long now;              /* epoch seconds */
    int skew;                   /* allowed clock skew, seconds */
} mso_id_expect_t;

typedef struct {
    const char *iss, *aud, *tid, *oid, *sub, *nonce;
    const char *preferred_username, *email, *name;
    long long iat, nbf, exp;
} mso_id_claims_t;

typedef enum {
    MSO_JWT_OK = 0,
    MSO_JWT_MALFORMED,          /* not three base64url parts / not JSON */
    MSO_JWT_BAD_ALG,            /* alg other than RS256 */
    MSO_JWT_UNKNOWN_KID,        /* no key with that kid */
    MSO_JWT_BAD_SIGNATURE,
    MSO_JWT_BAD_ISSUER,
    MSO_JWT_BAD_AUDIENCE,
    MSO_JWT_BAD_NONCE,
    MSO_JWT_EXPIRED,
    MSO_JWT_NOT_YET_VALID,
    MSO_JWT_BAD_TENANT          /* tid not a GUID, or not the required tenant */
} mso_jwt_result_e;

/* Verifies signature and claims. On failure *why is a short sentence naming
 * the check and the values involved (claims are not secret; the token is
 * never included). */
mso_jwt_result_e mso_jwt_verify(apr_pool_t *p, const char *jwt, const mso_jwks_t *jwks,
                                const mso_id_expect_t *expect, mso_id_claims_t **claims,
                                const char **why);

#endif
