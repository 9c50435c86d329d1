/* The fixed signing key of the ID-token harnesses: its JWKS (made here from
 * the key with OpenSSL, under kid FUZZ_KID with Microsoft's templated issuer,
 * and again under "fuzz-kid-2" without one) and RS256 signing of any header
 * and payload. */
#ifndef MSO_FUZZ_JWT_H
#define MSO_FUZZ_JWT_H

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "fuzz_common.h"
#include "fuzz_keys.h"
#include "mso_crypto.h"
#include "mso_jwt.h"

#define FUZZ_TID "6731de76-14a6-49ae-97bc-6eba6914391e"
#define FUZZ_CLIENT "11111111-2222-3333-4444-555555555555"
#define FUZZ_NONCE "n0nce-AbC_123xyz"
#define FUZZ_ISSUER "https://login.microsoftonline.com/{tenantid}/v2.0"

static EVP_PKEY *fuzz_rsa;
static const char *fuzz_jwks_text;
static mso_jwks_t *fuzz_jwks;

static inline const char *fuzz_bn_b64(apr_pool_t *p, const char *name)
{
    BIGNUM *bn = NULL;
    unsigned char *buf;
    int n;

    if (EVP_PKEY_get_bn_param(fuzz_rsa, name, &bn) != 1) {
        abort();
    }
    n = BN_num_bytes(bn);
    buf = apr_palloc(p, (apr_size_t)n);
    BN_bn2bin(bn, buf);
    BN_free(bn);
    return mso_b64url_encode(p, buf, (apr_size_t)n);
}

static inline void fuzz_jwt_init(void)
{
    BIO *bio;
    const char *n, *e, *err = NULL;

    fuzz_init();
    bio = BIO_new_mem_buf(fuzz_rsa_pem, -1);
    fuzz_rsa = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (!fuzz_rsa) {
        abort();
    }
    n = fuzz_bn_b64(fuzz_root, OSSL_PKEY_PARAM_RSA_N);
    e = fuzz_bn_b64(fuzz_root, OSSL_PKEY_PARAM_RSA_E);
    fuzz_jwks_text = apr_psprintf(fuzz_root,
        "{\"keys\":[{\"kty\":\"RSA\",\"use\":\"sig\",\"kid\":\"" FUZZ_KID "\",\"x5t\":\""
        FUZZ_KID "\",\"n\":\"%s\",\"e\":\"%s\",\"issuer\":\"" FUZZ_ISSUER "\"},"
        "{\"kty\":\"RSA\",\"use\":\"sig\",\"kid\":\"fuzz-kid-2\",\"n\":\"%s\",\"e\":\"%s\"}]}",
        n, e, n, e);
    if (mso_jwks_parse(fuzz_root, fuzz_jwks_text, strlen(fuzz_jwks_text), &fuzz_jwks, &err)
        != APR_SUCCESS || mso_jwks_count(fuzz_jwks) != 2) {
        fprintf(stderr, "fixed JWKS refused: %s\n", err ? err : "?");
        abort();
    }
}

/* "header.payload" with both parts base64url encoded as given. */
static inline const char *fuzz_jws_input(apr_pool_t *p, const char *hdr, size_t hlen,
                                         const char *payload, size_t plen)
{
    return apr_pstrcat(p, mso_b64url_encode(p, (const unsigned char *)hdr, hlen), ".",
                       mso_b64url_encode(p, (const unsigned char *)payload, plen), NULL);
}

/* The RS256 signature of signing_input, base64url. */
static inline const char *fuzz_rs256(apr_pool_t *p, const char *signing_input)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned char sig[512];
    size_t slen = sizeof(sig);

    if (!md || EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, fuzz_rsa) != 1
        || EVP_DigestSign(md, sig, &slen, (const unsigned char *)signing_input,
                          strlen(signing_input)) != 1) {
        abort();
    }
    EVP_MD_CTX_free(md);
    return mso_b64url_encode(p, sig, slen);
}

static inline const char *fuzz_sign(apr_pool_t *p, const char *hdr, size_t hlen,
                                    const char *payload, size_t plen)
{
    const char *in = fuzz_jws_input(p, hdr, hlen, payload, plen);

    return apr_pstrcat(p, in, ".", fuzz_rs256(p, in), NULL);
}

#endif
