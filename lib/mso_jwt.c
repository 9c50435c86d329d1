/* ID tokens: RS256 verification against a JWKS and the claim checks of the
 * Microsoft identity platform. Everything here treats its input as hostile:
 * sizes are capped, every JSON value is type-checked, and nothing from the
 * payload is looked at before the signature has been verified. */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <apr_strings.h>

#include <jansson.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>

#include "mso_crypto.h"
#include "mso_json.h"
#include "mso_jwt.h"
#include "mso_log.h"

/* Real ID tokens are a few KB; the cap leaves room for a groups/roles claim
 * near the overage limit while keeping hostile input cheap to reject. */
#define JWT_MAX_LEN     32768
#define JWKS_MAX_LEN    (256 * 1024)
#define JWKS_MAX_KEYS   64
#define JWK_KID_MAX     256
#define RSA_MIN_BITS    2048
#define RSA_MAX_BITS    16384
#define SHOW_MAX        96          /* bytes of a claim value quoted in *why */

typedef struct {
    const char *kid;
    const char *issuer;             /* NULL when the key carries none */
    EVP_PKEY *pkey;
} mso_jwk_t;

struct mso_jwks_t {
    int count;
    mso_jwk_t keys[JWKS_MAX_KEYS];
};

/* ---------------------------------------------------------------- helpers */

/* Quotes an attacker-chosen value for *why (which ends up in logs): bounded
 * length, and every byte outside printable ASCII escaped. */
static const char *show(apr_pool_t *p, const char *s)
{
    apr_size_t len, n, i;
    char *buf, *o;

    if (!s) {
        return "(none)";
    }
    len = strlen(s);
    n = len > SHOW_MAX ? SHOW_MAX : len;
    buf = apr_palloc(p, n * 4 + 6);
    o = buf;
    *o++ = '"';
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\') {
            o += sprintf(o, "\\x%02x", c);
        }
        else {
            *o++ = (char)c;
        }
    }
    *o++ = '"';
    *o = '\0';
    return len > n ? apr_pstrcat(p, buf, "...", NULL) : buf;
}

static int is_guid(const char *s)
{
    int i;

    if (!s || strlen(s) != 36) {
        return 0;
    }
    for (i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-') {
                return 0;
            }
        }
        else if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')
                   || (s[i] >= 'A' && s[i] <= 'F'))) {
            return 0;
        }
    }
    return 1;
}

static int b64url_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') {
        return c - 'A';
    }
    if (c >= 'a' && c <= 'z') {
        return c - 'a' + 26;
    }
    if (c >= '0' && c <= '9') {
        return c - '0' + 52;
    }
    if (c == '-') {
        return 62;
    }
    return c == '_' ? 63 : -1;
}

/* base64url of a slice. The alphabet is checked here, without padding (JWS
 * forbids it), before the shared strict decoder sees it. The output is
 * NUL-terminated, so decoded JSON can go straight to the parser. */
static int b64url_slice(apr_pool_t *p, const char *s, apr_size_t len,
                        unsigned char **out, apr_size_t *outlen)
{
    apr_size_t i;

    for (i = 0; i < len; i++) {
        if (b64url_val((unsigned char)s[i]) < 0) {
            return 0;
        }
    }
    return mso_b64url_decode(p, apr_pstrmemdup(p, s, len), out, outlen) == APR_SUCCESS;
}

/* 1 = a string (copied into p), 0 = absent or null, -1 = another type. */
static int get_str(apr_pool_t *p, const json_t *o, const char *key, const char **out)
{
    const json_t *v = json_object_get(o, key);

    *out = NULL;
    if (!v || json_is_null(v)) {
        return 0;
    }
    if (!json_is_string(v)) {
        return -1;
    }
    *out = apr_pstrdup(p, json_string_value(v));
    return 1;
}

/* NumericDate: an integer, or a finite real within a sane range (RFC 7519
 * allows fractions). 1 = found, 0 = absent, -1 = unusable. */
static int get_time(const json_t *o, const char *key, long long *out)
{
    const json_t *v = json_object_get(o, key);

    *out = 0;
    if (!v || json_is_null(v)) {
        return 0;
    }
    if (json_is_integer(v)) {
        *out = (long long)json_integer_value(v);
        return 1;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (isfinite(d) && d > -1e15 && d < 1e15) {
            /* floor by hand: keeps libm out of the link */
            long long t = (long long)d;
            *out = ((double)t > d) ? t - 1 : t;
            return 1;
        }
    }
    return -1;
}

/* ------------------------------------------------------------------- JWKS */

static EVP_PKEY *rsa_public_key(const unsigned char *n, apr_size_t nlen,
                                const unsigned char *e, apr_size_t elen)
{
    BIGNUM *bn_n = NULL, *bn_e = NULL;
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pkey = NULL;

    /* Bound sizes before any big-number work: a huge modulus is a cheap way
     * to make every verification expensive. */
    if (nlen == 0 || nlen > RSA_MAX_BITS / 8 || elen == 0 || elen > 8) {
        return NULL;
    }
    bn_n = BN_bin2bn(n, (int)nlen, NULL);
    bn_e = BN_bin2bn(e, (int)elen, NULL);
    if (!bn_n || !bn_e) {
        goto done;
    }
    /* e = 1 would make any "signature" verify; an even n or e is never RSA. */
    if (!BN_is_odd(bn_n) || !BN_is_odd(bn_e) || BN_is_one(bn_e)
        || BN_cmp(bn_e, bn_n) >= 0) {
        goto done;
    }
    bld = OSSL_PARAM_BLD_new();
    if (!bld || !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn_n)
        || !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, bn_e)) {
        goto done;
    }
    params = OSSL_PARAM_BLD_to_param(bld);
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    if (!params || !ctx || EVP_PKEY_fromdata_init(ctx) <= 0
        || EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0) {
        EVP_PKEY_free(pkey);
        pkey = NULL;
    }
done:
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn_n);
    BN_free(bn_e);
    ERR_clear_error();
    return pkey;
}

static apr_status_t pkey_release(void *data)
{
    EVP_PKEY_free((EVP_PKEY *)data);
    return APR_SUCCESS;
}

/* JWK strings are base64url; the shared decoder tolerates padding. */
static int jwk_b64(apr_pool_t *p, const char *s, unsigned char **out, apr_size_t *outlen)
{
    return mso_b64url_decode(p, s, out, outlen) == APR_SUCCESS;
}

apr_status_t mso_jwks_parse(apr_pool_t *p, const char *json, apr_size_t len,
                            mso_jwks_t **jwks, const char **err)
{
    const char *dummy;
    json_t *root, *keys, *k;
    mso_jwks_t *ks;
    size_t i;
    int weak = 0, invalid = 0;

    if (!err) {
        err = &dummy;
    }
    *err = NULL;
    if (jwks) {
        *jwks = NULL;
    }
    if (!jwks || !json || len == 0) {
        *err = "the JWKS document is empty";
        return APR_EINVAL;
    }
    if (len > JWKS_MAX_LEN) {
        *err = apr_psprintf(p, "the JWKS document is %" APR_SIZE_T_FMT
                            " bytes, more than the limit of %d", len, JWKS_MAX_LEN);
        return APR_EINVAL;
    }
    root = mso_json_parse(p, json, len, err);
    if (!root) {
        *err = apr_pstrcat(p, "the JWKS document is not JSON: ", *err, NULL);
        return APR_EINVAL;
    }
    keys = json_object_get(root, "keys");
    if (!json_is_object(root) || !json_is_array(keys)) {
        *err = "the JWKS document has no \"keys\" array";
        return APR_EINVAL;
    }

    ks = apr_pcalloc(p, sizeof(*ks));
    json_array_foreach(keys, i, k) {
        const char *kty, *use, *alg, *kid, *iss, *n64, *e64;
        unsigned char *n, *e;
        apr_size_t nlen, elen;
        EVP_PKEY *pkey;
        int bits;

        if (ks->count >= JWKS_MAX_KEYS) {
            mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, APR_SUCCESS,
                           "JWKS holds more than %d keys; the rest are ignored",
                           JWKS_MAX_KEYS);
            break;
        }
        if (!json_is_object(k)) {
            invalid++;
            continue;
        }
        /* Other key types and encryption keys are not an error: Microsoft
         * may publish them; they are simply not ours to use. */
        if (get_str(p, k, "kty", &kty) != 1 || strcmp(kty, "RSA") != 0) {
            continue;
        }
        if (get_str(p, k, "use", &use) < 0 || (use && strcmp(use, "sig") != 0)) {
            continue;
        }
        if (get_str(p, k, "alg", &alg) < 0 || (alg && strcmp(alg, "RS256") != 0)) {
            continue;
        }
        if (get_str(p, k, "kid", &kid) != 1 || !*kid || strlen(kid) > JWK_KID_MAX
            || get_str(p, k, "issuer", &iss) < 0
            || get_str(p, k, "n", &n64) != 1 || get_str(p, k, "e", &e64) != 1
            || !jwk_b64(p, n64, &n, &nlen) || !jwk_b64(p, e64, &e, &elen)) {
            invalid++;
            continue;
        }
        pkey = rsa_public_key(n, nlen, e, elen);
        if (!pkey) {
            invalid++;
            continue;
        }
        bits = EVP_PKEY_get_bits(pkey);
        if (bits < RSA_MIN_BITS) {
            mso_log_perror(MSO_LOG_MARK, MSO_LOG_WARNING, APR_SUCCESS,
                           "JWKS key %s ignored: %d-bit RSA is weaker than %d bits",
                           show(p, kid), bits, RSA_MIN_BITS);
            EVP_PKEY_free(pkey);
            weak++;
            continue;
        }
        apr_pool_cleanup_register(p, pkey, pkey_release, apr_pool_cleanup_null);
        ks->keys[ks->count].kid = kid;
        ks->keys[ks->count].issuer = (iss && *iss) ? iss : NULL;
        ks->keys[ks->count].pkey = pkey;
        ks->count++;
    }
    if (ks->count == 0) {
        *err = apr_psprintf(p, "the JWKS document holds no usable RSA signing key "
                            "(%d weaker than %d bits, %d invalid)", weak, RSA_MIN_BITS,
                            invalid);
        return APR_EINVAL;
    }
    *jwks = ks;
    return APR_SUCCESS;
}

int mso_jwks_count(const mso_jwks_t *jwks)
{
    return jwks ? jwks->count : 0;
}

int mso_jwks_has_kid(const mso_jwks_t *jwks, const char *kid)
{
    int i;

    if (!jwks || !kid) {
        return 0;
    }
    for (i = 0; i < jwks->count; i++) {
        if (strcmp(jwks->keys[i].kid, kid) == 0) {
            return 1;
        }
    }
    return 0;
}

/* -------------------------------------------------------------------- JWS */

typedef struct {
    const char *part[3];
    apr_size_t len[3];
    apr_size_t signed_len;          /* bytes of "header.payload" */
} jws_t;

/* Exactly three non-empty parts of base64url characters. */
static int jws_split(apr_pool_t *p, const char *jwt, jws_t *jws, const char **why)
{
    apr_size_t len, i, start = 0;
    int k = 0;

    if (!jwt || !*jwt) {
        *why = "there is no ID token";
        return 0;
    }
    len = strnlen(jwt, JWT_MAX_LEN + 1);
    if (len > JWT_MAX_LEN) {
        *why = apr_psprintf(p, "the ID token is longer than %d bytes", JWT_MAX_LEN);
        return 0;
    }
    for (i = 0; i <= len; i++) {
        if (i == len || jwt[i] == '.') {
            if (k > 2) {
                *why = "the ID token has more than three parts";
                return 0;
            }
            jws->part[k] = jwt + start;
            jws->len[k] = i - start;
            if (jws->len[k] == 0) {
                *why = "the ID token has an empty part";
                return 0;
            }
            k++;
            start = i + 1;
        }
        else if (b64url_val((unsigned char)jwt[i]) < 0) {
            *why = "the ID token holds a character outside base64url";
            return 0;
        }
    }
    if (k != 3) {
        *why = "the ID token does not have three parts";
        return 0;
    }
    jws->signed_len = jws->len[0] + 1 + jws->len[1];
    return 1;
}

/* Decodes a part holding a JSON object. */
static json_t *jws_json(apr_pool_t *p, const jws_t *jws, int idx, const char **why)
{
    static const char *const names[] = { "header", "payload" };
    unsigned char *raw;
    apr_size_t rawlen;
    const char *err;
    json_t *j;

    if (!b64url_slice(p, jws->part[idx], jws->len[idx], &raw, &rawlen)) {
        *why = apr_psprintf(p, "the ID token %s is not valid base64url", names[idx]);
        return NULL;
    }
    j = mso_json_parse(p, (const char *)raw, rawlen, &err);
    if (!j) {
        *why = apr_psprintf(p, "the ID token %s is not JSON: %s", names[idx], err);
        return NULL;
    }
    if (!json_is_object(j)) {
        *why = apr_psprintf(p, "the ID token %s is not a JSON object", names[idx]);
        return NULL;
    }
    return j;
}

apr_status_t mso_jwt_kid(apr_pool_t *p, const char *jwt, const char **kid)
{
    const char *why;
    jws_t jws;
    json_t *hdr;

    if (!kid) {
        return APR_EINVAL;
    }
    *kid = NULL;
    if (!jws_split(p, jwt, &jws, &why) || !(hdr = jws_json(p, &jws, 0, &why))
        || get_str(p, hdr, "kid", kid) != 1 || !**kid) {
        *kid = NULL;
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

static int rs256_verify(EVP_PKEY *pkey, const unsigned char *data, apr_size_t dlen,
                        const unsigned char *sig, apr_size_t slen)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    int ok = 0;

    if (md && (int)slen == EVP_PKEY_get_size(pkey)
        && EVP_DigestVerifyInit(md, &pctx, EVP_sha256(), NULL, pkey) == 1
        && EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) > 0
        && EVP_DigestVerify(md, sig, slen, data, dlen) == 1) {
        ok = 1;
    }
    EVP_MD_CTX_free(md);
    /* A failed verification leaves errors queued; they must not surface in
     * an unrelated OpenSSL caller later. */
    ERR_clear_error();
    return ok;
}

/* The issuer a template stands for once {tenantid} (any case, every
 * occurrence) is replaced by tid. */
static const char *issuer_for(apr_pool_t *p, const char *tmpl, const char *tid)
{
    static const char ph[] = "{tenantid}";
    const apr_size_t phlen = sizeof(ph) - 1;
    const char *s = tmpl, *out = "";
    apr_size_t i;

    for (i = 0; s[i]; ) {
        if (strncasecmp(s + i, ph, phlen) == 0) {
            out = apr_pstrcat(p, out, apr_pstrmemdup(p, s, i), tid, NULL);
            s += i + phlen;
            i = 0;
        }
        else {
            i++;
        }
    }
    return apr_pstrcat(p, out, s, NULL);
}

static int issuer_ok(apr_pool_t *p, const char *tmpl, const char *tid, const char *iss)
{
    return tmpl && strcmp(issuer_for(p, tmpl, tid), iss) == 0;
}

#define FAIL(code, ...) do { *why = apr_psprintf(p, __VA_ARGS__); return (code); } while (0)

static const char *wrong_type(apr_pool_t *p, const char *claim)
{
    return apr_psprintf(p, "the ID token claim %s has the wrong JSON type", claim);
}

mso_jwt_result_e mso_jwt_verify(apr_pool_t *p, const char *jwt, const mso_jwks_t *jwks,
                                const mso_id_expect_t *expect, mso_id_claims_t **claims,
                                const char **why)
{
    const char *dummy, *alg, *typ, *kid, *expected_iss;
    const mso_jwk_t *key = NULL;
    unsigned char *sig;
    apr_size_t siglen;
    json_t *hdr, *body, *aud;
    mso_id_claims_t *c;
    long long skew, now;
    int i, rc, has_exp, has_nbf, has_iat;

    if (!why) {
        why = &dummy;
    }
    *why = NULL;
    if (claims) {
        *claims = NULL;
    }
    if (!expect) {
        FAIL(MSO_JWT_MALFORMED, "no expectations were given for the ID token");
    }

    /* (1) structure and header */
    {
        jws_t jws;
        if (!jws_split(p, jwt, &jws, why) || !(hdr = jws_json(p, &jws, 0, why))) {
            return MSO_JWT_MALFORMED;
        }
        rc = get_str(p, hdr, "alg", &alg);
        if (rc != 1 || strcmp(alg, "RS256") != 0) {
            FAIL(MSO_JWT_BAD_ALG, "the ID token algorithm %s is not RS256",
                 rc < 0 ? "(not a string)" : show(p, alg));
        }
        if (get_str(p, hdr, "typ", &typ) < 0 || (typ && strcasecmp(typ, "JWT") != 0)) {
            FAIL(MSO_JWT_MALFORMED, "the ID token type %s is not JWT",
                 typ ? show(p, typ) : "(not a string)");
        }
        /* Extensions we would not understand must make the token invalid
         * (RFC 7515 section 4.1.11). */
        if (json_object_get(hdr, "crit")) {
            FAIL(MSO_JWT_MALFORMED, "the ID token header has critical extensions");
        }
        if (get_str(p, hdr, "kid", &kid) != 1 || !*kid) {
            FAIL(MSO_JWT_MALFORMED, "the ID token header has no key id (kid)");
        }

        /* (2) key and (3) signature; several keys may share a kid during a
         * rollover, so any of them may have signed. */
        if (!mso_jwks_has_kid(jwks, kid)) {
            FAIL(MSO_JWT_UNKNOWN_KID, "the ID token is signed with key %s, "
                 "which is not in the JWKS", show(p, kid));
        }
        if (!b64url_slice(p, jws.part[2], jws.len[2], &sig, &siglen)) {
            FAIL(MSO_JWT_MALFORMED, "the ID token signature is not valid base64url");
        }
        for (i = 0; i < jwks->count && !key; i++) {
            if (strcmp(jwks->keys[i].kid, kid) == 0
                && rs256_verify(jwks->keys[i].pkey, (const unsigned char *)jwt,
                                jws.signed_len, sig, siglen)) {
                key = &jwks->keys[i];
            }
        }
        if (!key) {
            FAIL(MSO_JWT_BAD_SIGNATURE, "the ID token signature does not verify "
                 "with key %s", show(p, kid));
        }
        if (!(body = jws_json(p, &jws, 1, why))) {
            return MSO_JWT_MALFORMED;
        }
    }

    /* (4) claims: all of them authentic from here on */
    c = apr_pcalloc(p, sizeof(*c));
    {
        static const struct { const char *name; apr_size_t off; } strs[] = {
            { "iss", APR_OFFSETOF(mso_id_claims_t, iss) },
            { "tid", APR_OFFSETOF(mso_id_claims_t, tid) },
            { "oid", APR_OFFSETOF(mso_id_claims_t, oid) },
            { "sub", APR_OFFSETOF(mso_id_claims_t, sub) },
            { "nonce", APR_OFFSETOF(mso_id_claims_t, nonce) },
        };
        static const struct { const char *name; apr_size_t off; } display[] = {
            { "preferred_username", APR_OFFSETOF(mso_id_claims_t, preferred_username) },
            { "email", APR_OFFSETOF(mso_id_claims_t, email) },
            { "name", APR_OFFSETOF(mso_id_claims_t, name) },
        };
        apr_size_t k;

        for (k = 0; k < sizeof(strs) / sizeof(strs[0]); k++) {
            const char **dst = (const char **)((char *)c + strs[k].off);
            if (get_str(p, body, strs[k].name, dst) < 0) {
                *why = wrong_type(p, strs[k].name);
                return MSO_JWT_MALFORMED;
            }
        }
        /* Display-only claims: an odd type is treated as absent rather than
         * failing a sign-in over a name. */
        for (k = 0; k < sizeof(display) / sizeof(display[0]); k++) {
            const char **dst = (const char **)((char *)c + display[k].off);
            if (get_str(p, body, display[k].name, dst) < 0) {
                *dst = NULL;
            }
        }
        if ((has_exp = get_time(body, "exp", &c->exp)) < 0) {
            *why = wrong_type(p, "exp");
            return MSO_JWT_MALFORMED;
        }
        if ((has_nbf = get_time(body, "nbf", &c->nbf)) < 0) {
            *why = wrong_type(p, "nbf");
            return MSO_JWT_MALFORMED;
        }
        if ((has_iat = get_time(body, "iat", &c->iat)) < 0) {
            *why = wrong_type(p, "iat");
            return MSO_JWT_MALFORMED;
        }
    }
    aud = json_object_get(body, "aud");

    /* (5) tenant id: it selects the issuer, so it must be a GUID first */
    if (!is_guid(c->tid)) {
        FAIL(MSO_JWT_BAD_TENANT, "the ID token tenant id (tid) %s is not a GUID",
             show(p, c->tid));
    }

    /* (6) issuer, per discovery and per signing key */
    if (!c->iss) {
        FAIL(MSO_JWT_BAD_ISSUER, "the ID token has no issuer (iss)");
    }
    expected_iss = expect->issuer;
    if (!expected_iss || !*expected_iss) {
        FAIL(MSO_JWT_BAD_ISSUER, "no issuer is known from discovery to check %s against",
             show(p, c->iss));
    }
    if (!issuer_ok(p, expected_iss, c->tid, c->iss)) {
        FAIL(MSO_JWT_BAD_ISSUER, "the ID token issuer %s is not the expected %s "
             "with tid %s", show(p, c->iss), show(p, expected_iss), c->tid);
    }
    if (key->issuer && !issuer_ok(p, key->issuer, c->tid, c->iss)) {
        FAIL(MSO_JWT_BAD_ISSUER, "the ID token issuer %s does not match the issuer %s "
             "of its signing key %s with tid %s", show(p, c->iss), show(p, key->issuer),
             show(p, kid), c->tid);
    }

    /* (7) audience: Microsoft sends a string; an array is accepted only when
     * it names us and nobody else */
    if (!expect->client_id || !*expect->client_id) {
        FAIL(MSO_JWT_BAD_AUDIENCE, "no client id is configured to check the audience");
    }
    if (json_is_array(aud)) {
        const json_t *only = json_array_get(aud, 0);
        if (json_array_size(aud) != 1 || !json_is_string(only)
            || strcmp(json_string_value(only), expect->client_id) != 0) {
            FAIL(MSO_JWT_BAD_AUDIENCE, "the ID token audience is a list (%" APR_SIZE_T_FMT
                 " entries) that is not exactly the client id %s",
                 (apr_size_t)json_array_size(aud), show(p, expect->client_id));
        }
        c->aud = apr_pstrdup(p, expect->client_id);
    }
    else if (json_is_string(aud)) {
        c->aud = apr_pstrdup(p, json_string_value(aud));
        if (strcmp(c->aud, expect->client_id) != 0) {
            FAIL(MSO_JWT_BAD_AUDIENCE, "the ID token audience %s is not the client id %s",
                 show(p, c->aud), show(p, expect->client_id));
        }
    }
    else {
        FAIL(MSO_JWT_BAD_AUDIENCE, "the ID token has no audience (aud) string");
    }

    /* (8) nonce: the values themselves are not logged */
    if (!expect->nonce || !*expect->nonce) {
        FAIL(MSO_JWT_BAD_NONCE, "no nonce was sent with the sign-in request");
    }
    if (!c->nonce) {
        FAIL(MSO_JWT_BAD_NONCE, "the ID token has no nonce");
    }
    if (!mso_str_equal_ct(c->nonce, expect->nonce)) {
        FAIL(MSO_JWT_BAD_NONCE, "the ID token nonce is not the one sent with the "
             "sign-in request");
    }

    /* (9) times; written as now - skew < exp so that no sum can overflow */
    now = expect->now;
    skew = expect->skew > 0 ? expect->skew : 0;
    if (!has_exp) {
        FAIL(MSO_JWT_EXPIRED, "the ID token has no expiry (exp)");
    }
    if (!(now - skew < c->exp)) {
        FAIL(MSO_JWT_EXPIRED, "the ID token expired at %" APR_INT64_T_FMT ", now is %"
             APR_INT64_T_FMT " (allowed skew %" APR_INT64_T_FMT "s)", (apr_int64_t)c->exp,
             (apr_int64_t)now, (apr_int64_t)skew);
    }
    if (has_nbf && c->nbf > now + skew) {
        FAIL(MSO_JWT_NOT_YET_VALID, "the ID token is not valid before %" APR_INT64_T_FMT
             ", now is %" APR_INT64_T_FMT " (allowed skew %" APR_INT64_T_FMT "s)",
             (apr_int64_t)c->nbf, (apr_int64_t)now, (apr_int64_t)skew);
    }
    if (has_iat && c->iat > now + skew) {
        FAIL(MSO_JWT_NOT_YET_VALID, "the ID token was issued at %" APR_INT64_T_FMT
             ", after now %" APR_INT64_T_FMT " (allowed skew %" APR_INT64_T_FMT "s)",
             (apr_int64_t)c->iat, (apr_int64_t)now, (apr_int64_t)skew);
    }

    /* (10) the tenant the site is restricted to */
    if (expect->tenant_id && strcasecmp(c->tid, expect->tenant_id) != 0) {
        FAIL(MSO_JWT_BAD_TENANT, "the ID token tenant %s is not the required tenant %s",
             c->tid, show(p, expect->tenant_id));
    }

    if (claims) {
        *claims = c;
    }
    return MSO_JWT_OK;
}
