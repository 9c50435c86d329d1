/* Signing-key documents (lib/mso_jwt): mso_jwks_parse on the input, then the
 * keys it keeps put to use: a token really signed with the fixed key (kid
 * FUZZ_KID), and forgeries of it, are verified against them.
 * Invariants: a JWKS is accepted with 1 to 64 keys and no error, refused with
 * an error and nothing kept; a forged signature (the PKCS#1 encoding itself,
 * 0, 1, a signature of other data) never verifies, whatever the keys (an
 * exponent of 1, a tiny or even modulus); the real token verifies only under a
 * kid the JWKS holds. */
#include "fuzz_jwt.h"

static const char *good, *forged[4];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    static const char hdr[] = "{\"typ\":\"JWT\",\"alg\":\"RS256\",\"kid\":\"" FUZZ_KID "\"}";
    static const char payload[] = "{\"aud\":\"" FUZZ_CLIENT "\",\"iss\":\"https://login."
        "microsoftonline.com/" FUZZ_TID "/v2.0\",\"iat\":1699999000,\"nbf\":1699999000,"
        "\"exp\":1700003600,\"nonce\":\"" FUZZ_NONCE "\",\"tid\":\"" FUZZ_TID "\","
        "\"oid\":\"00000000-0000-0000-66f3-3332eca7ea81\",\"preferred_username\":"
        "\"alice@contoso.com\"}";
    static const unsigned char digest_info[] = {
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
        0x01, 0x05, 0x00, 0x04, 0x20 };
    const char *input;
    unsigned char em[256], zero[256], one[256];
    unsigned int dlen = 0;

    fuzz_jwt_init();
    input = fuzz_jws_input(fuzz_root, hdr, strlen(hdr), payload, strlen(payload));
    good = apr_pstrcat(fuzz_root, input, ".", fuzz_rs256(fuzz_root, input), NULL);
    /* EM = 00 01 FF..FF 00 DigestInfo SHA-256(input): what e = 1 would accept. */
    memset(em, 0xff, sizeof(em));
    em[0] = 0;
    em[1] = 1;
    em[256 - 32 - sizeof(digest_info) - 1] = 0;
    memcpy(em + 256 - 32 - sizeof(digest_info), digest_info, sizeof(digest_info));
    EVP_Digest(input, strlen(input), em + 256 - 32, &dlen, EVP_sha256(), NULL);
    memset(zero, 0, sizeof(zero));
    memset(one, 0, sizeof(one));
    one[255] = 1;
    forged[0] = apr_pstrcat(fuzz_root, input, ".", mso_b64url_encode(fuzz_root, em, 256), NULL);
    forged[1] = apr_pstrcat(fuzz_root, input, ".", mso_b64url_encode(fuzz_root, zero, 256), NULL);
    forged[2] = apr_pstrcat(fuzz_root, input, ".", mso_b64url_encode(fuzz_root, one, 256), NULL);
    forged[3] = apr_pstrcat(fuzz_root, input, ".", fuzz_rs256(fuzz_root, "other data"), NULL);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    size_t len;
    const char *doc = fuzz_rest(p, &in, &len), *err = NULL, *why;
    mso_jwks_t *ks = (mso_jwks_t *)1;
    mso_id_expect_t ex;
    mso_jwt_result_e r;
    int i;

    if (mso_jwks_parse(p, doc, len, &ks, &err) != APR_SUCCESS) {
        FUZZ_CHECK(!ks && err && *err && fuzz_printable(err), "refused JWKS: kept %p, error %s",
                   (void *)ks, err ? err : "(null)");
        goto done;
    }
    FUZZ_CHECK(ks && !err, "accepted with an error");
    FUZZ_CHECK(mso_jwks_count(ks) >= 1 && mso_jwks_count(ks) <= 64, "%d keys",
               mso_jwks_count(ks));
    memset(&ex, 0, sizeof(ex));
    ex.issuer = FUZZ_ISSUER;
    ex.client_id = FUZZ_CLIENT;
    ex.nonce = FUZZ_NONCE;
    ex.now = FUZZ_NOW;
    ex.skew = 300;
    for (i = 0; i < 4; i++) {
        r = mso_jwt_verify(p, forged[i], ks, &ex, NULL, &why);
        FUZZ_CHECK(r == MSO_JWT_UNKNOWN_KID || r == MSO_JWT_BAD_SIGNATURE,
                   "forgery %d: %d %s", i, r, why ? why : "");
    }
    r = mso_jwt_verify(p, good, ks, &ex, NULL, &why);
    FUZZ_CHECK(r == MSO_JWT_OK || r == MSO_JWT_UNKNOWN_KID || r == MSO_JWT_BAD_SIGNATURE
               || r == MSO_JWT_BAD_ISSUER, "the real token: %d %s", r, why ? why : "");
    FUZZ_CHECK((r == MSO_JWT_UNKNOWN_KID) == !mso_jwks_has_kid(ks, FUZZ_KID), "kid lookup");
done:
    apr_pool_destroy(p);
    return 0;
}
