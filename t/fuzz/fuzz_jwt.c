/* ID tokens (lib/mso_jwt): mso_jwt_kid and mso_jwt_verify against a fixed
 * JWKS (fuzz_jwt.h). The first byte picks the way in and the expectations:
 *   bit 0 = 0  the rest is a compact token as Microsoft would send it;
 *   bit 0 = 1  the rest is header JSON NUL payload JSON, which the harness
 *              signs with the fixed key, so that the claim checks behind the
 *              signature are fuzzed too;
 *   bit 1      a single-tenant site (tid must be FUZZ_TID);
 *   bit 2      no clock skew allowed (else 300 s).
 * Invariants: a token that verifies has exactly the expected audience, nonce,
 * a GUID tenant, the issuer of that tenant, and is within its times; a failure
 * has a reason in printable text that never quotes the signature; a token
 * signed with the fixed key never fails its signature check; what passes the
 * kid check names a key of the JWKS. */
#include "fuzz_jwt.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_jwt_init();
    return 0;
}

static int is_guid(const char *s)
{
    int i;

    if (!s || strlen(s) != 36) {
        return 0;
    }
    for (i = 0; i < 36; i++) {
        if ((i == 8 || i == 13 || i == 18 || i == 23) ? s[i] != '-'
            : !strchr("0123456789abcdefABCDEF", s[i])) {
            return 0;
        }
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    unsigned flags = fuzz_byte(&in);
    const char *token, *why = NULL, *kid = NULL, *sig;
    mso_id_expect_t ex;
    mso_id_claims_t *c = NULL;
    mso_jwt_result_e r;

    if (flags & 1) {
        const char *hdr = fuzz_str(p, &in);
        size_t plen;
        const char *payload = fuzz_rest(p, &in, &plen);

        token = fuzz_sign(p, hdr, strlen(hdr), payload, plen);
    }
    else {
        token = fuzz_str(p, &in);
    }
    memset(&ex, 0, sizeof(ex));
    ex.issuer = FUZZ_ISSUER;
    ex.client_id = FUZZ_CLIENT;
    ex.nonce = FUZZ_NONCE;
    ex.tenant_id = flags & 2 ? FUZZ_TID : NULL;
    ex.now = FUZZ_NOW;
    ex.skew = flags & 4 ? 0 : 300;

    r = mso_jwt_verify(p, token, fuzz_jwks, &ex, &c, &why);
    if (fuzz_verbose()) {
        fprintf(stderr, "verify: %d %s\n", r, why ? why : "OK");
    }
    if (r == MSO_JWT_OK) {
        FUZZ_CHECK(c && !why, "OK without claims, or with a reason");
        FUZZ_CHECK(c->aud && !strcmp(c->aud, FUZZ_CLIENT), "audience %s", c->aud);
        FUZZ_CHECK(c->nonce && !strcmp(c->nonce, FUZZ_NONCE), "nonce");
        FUZZ_CHECK(is_guid(c->tid), "tenant %s", c->tid);
        FUZZ_CHECK(!ex.tenant_id || !strcasecmp(c->tid, FUZZ_TID), "another tenant %s", c->tid);
        FUZZ_CHECK(c->iss && !strcmp(c->iss, apr_pstrcat(p, "https://login.microsoftonline.com/",
                                                          c->tid, "/v2.0", NULL)),
                   "issuer %s for tenant %s", c->iss, c->tid);
        FUZZ_CHECK(FUZZ_NOW - ex.skew < c->exp, "expired at %lld", c->exp);
        FUZZ_CHECK(c->nbf <= FUZZ_NOW + ex.skew && c->iat <= FUZZ_NOW + ex.skew,
                   "not yet valid");
    }
    else {
        FUZZ_CHECK(!c, "claims with a failure");
        FUZZ_CHECK(why && *why && fuzz_printable(why), "reason \"%s\"", why ? why : "(null)");
        sig = strrchr(token, '.');
        FUZZ_CHECK(!sig || strlen(sig + 1) < 12 || !strstr(why, sig + 1),
                   "the reason quotes the signature: %s", why);
    }
    if (flags & 1) {
        FUZZ_CHECK(r != MSO_JWT_BAD_SIGNATURE, "a token signed with the right key fails its "
                   "signature check: %s", why);
    }
    if (r != MSO_JWT_MALFORMED && r != MSO_JWT_BAD_ALG && r != MSO_JWT_UNKNOWN_KID) {
        FUZZ_CHECK(mso_jwt_kid(p, token, &kid) == APR_SUCCESS && kid
                   && mso_jwks_has_kid(fuzz_jwks, kid), "verified past the kid, but kid %s",
                   kid ? kid : "(none)");
    }
    else if (mso_jwt_kid(p, token, &kid) == APR_SUCCESS) {
        FUZZ_CHECK(kid && *kid, "an empty kid");
    }
    apr_pool_destroy(p);
    return 0;
}
