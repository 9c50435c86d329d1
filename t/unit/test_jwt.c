/* ID token verification (lib/mso_jwt). The keys are generated at run time and
 * every token is really signed here (RS256), so each case exercises the same
 * path as a token from Microsoft. */
#include <check.h>

#include "unit.h"
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <apr_general.h>
#include <apr_strings.h>

#include <jansson.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>

#include "mso_jwt.h"
#include "mso_log.h"

#define TID     "6731de76-14a6-49ae-97bc-6eba6914391e"
#define TID2    "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a"
#define CLIENT  "11111111-2222-3333-4444-555555555555"
#define NONCE   "n0nce-AbC_123xyz"
#define LOGIN   "https://login.microsoftonline.com/"
#define ISS_TMPL LOGIN "{tenantid}/v2.0"
#define NOW     1700000000LL
#define SKEW    300

static apr_pool_t *pool;        /* one per test */
static EVP_PKEY *key_a;         /* kid k1, templated issuer */
static EVP_PKEY *key_b;         /* not in the JWKS: an impostor for kid k1 */
static EVP_PKEY *key_c;         /* kid k3, concrete issuer of tenant TID2 */
static EVP_PKEY *key_d;         /* kid k2, no issuer property */
static EVP_PKEY *key_weak;      /* 1024 bits */
static mso_jwks_t *jwks;        /* k1 (a), k3 (c), k2 (d); kw is dropped */

static mso_jwks_t *jwks_of(apr_pool_t *p, const char *keys);
static const char *jwk(apr_pool_t *p, EVP_PKEY *k, const char *kid, const char *issuer);

#define TID2_ISS "https://login.microsoftonline.com/" TID2 "/v2.0"

/* The JWKS lives in the test's pool so that each test leaves nothing behind
 * (the keys themselves are generated once, in main). */
static void setup(void)
{
    apr_pool_create(&pool, NULL);
    jwks = jwks_of(pool, apr_pstrcat(pool, jwk(pool, key_a, "k1", ISS_TMPL), ",",
                                     jwk(pool, key_c, "k3", TID2_ISS), ",",
                                     jwk(pool, key_d, "k2", NULL), ",",
                                     jwk(pool, key_weak, "kw", NULL), NULL));
    ck_assert_ptr_nonnull(jwks);
}

static void teardown(void)
{
    apr_pool_destroy(pool);
}

/* ---------------------------------------------------------------- helpers */

static const char *b64url(apr_pool_t *p, const unsigned char *d, size_t n)
{
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char *out = apr_palloc(p, n / 3 * 4 + 5), *o = out;
    size_t i;

    for (i = 0; i + 2 < n; i += 3) {
        unsigned long v = ((unsigned long)d[i] << 16) | ((unsigned long)d[i + 1] << 8) | d[i + 2];
        *o++ = tab[(v >> 18) & 63];
        *o++ = tab[(v >> 12) & 63];
        *o++ = tab[(v >> 6) & 63];
        *o++ = tab[v & 63];
    }
    if (n - i == 1) {
        unsigned long v = (unsigned long)d[i] << 16;
        *o++ = tab[(v >> 18) & 63];
        *o++ = tab[(v >> 12) & 63];
    }
    else if (n - i == 2) {
        unsigned long v = ((unsigned long)d[i] << 16) | ((unsigned long)d[i + 1] << 8);
        *o++ = tab[(v >> 18) & 63];
        *o++ = tab[(v >> 12) & 63];
        *o++ = tab[(v >> 6) & 63];
    }
    *o = '\0';
    return out;
}

static const char *b64s(const char *s)
{
    return b64url(pool, (const unsigned char *)s, strlen(s));
}

static EVP_PKEY *gen_key(unsigned int bits)
{
    EVP_PKEY *k = EVP_RSA_gen(bits);

    if (!k) {
        abort();
    }
    return k;
}

static const char *bn_param(apr_pool_t *p, EVP_PKEY *k, const char *name)
{
    BIGNUM *bn = NULL;
    unsigned char *buf;
    int n;
    const char *s;

    if (EVP_PKEY_get_bn_param(k, name, &bn) != 1) {
        abort();
    }
    n = BN_num_bytes(bn);
    buf = apr_palloc(p, (apr_size_t)n);
    BN_bn2bin(bn, buf);
    s = b64url(p, buf, (size_t)n);
    BN_free(bn);
    return s;
}

/* One JWK object; issuer NULL leaves the property out. */
static const char *jwk(apr_pool_t *p, EVP_PKEY *k, const char *kid, const char *issuer)
{
    return apr_psprintf(p, "{\"kty\":\"RSA\",\"use\":\"sig\",\"kid\":\"%s\",\"x5t\":\"%s\","
                        "\"n\":\"%s\",\"e\":\"%s\"%s%s%s}", kid, kid,
                        bn_param(p, k, OSSL_PKEY_PARAM_RSA_N),
                        bn_param(p, k, OSSL_PKEY_PARAM_RSA_E),
                        issuer ? ",\"issuer\":\"" : "", issuer ? issuer : "",
                        issuer ? "\"" : "");
}

static mso_jwks_t *jwks_of(apr_pool_t *p, const char *keys)
{
    const char *doc = apr_pstrcat(p, "{\"keys\":[", keys, "]}", NULL);
    const char *err = NULL;
    mso_jwks_t *ks = NULL;

    ck_assert_msg(mso_jwks_parse(p, doc, strlen(doc), &ks, &err) == APR_SUCCESS,
                  "JWKS: %s", err ? err : "-");
    return ks;
}

/* header and payload are JSON text, signed exactly as given. */
static const char *sign_jwt(EVP_PKEY *k, const char *hdr, const char *payload)
{
    const char *input = apr_pstrcat(pool, b64s(hdr), ".", b64s(payload), NULL);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned char *sig;
    size_t n = 0;

    ck_assert(md != NULL);
    ck_assert_int_eq(EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, k), 1);
    ck_assert_int_eq(EVP_DigestSign(md, NULL, &n, (const unsigned char *)input,
                                    strlen(input)), 1);
    sig = apr_palloc(pool, n);
    ck_assert_int_eq(EVP_DigestSign(md, sig, &n, (const unsigned char *)input,
                                    strlen(input)), 1);
    EVP_MD_CTX_free(md);
    return apr_pstrcat(pool, input, ".", b64url(pool, sig, n), NULL);
}

static const char *hdr_for(const char *kid)
{
    return apr_psprintf(pool, "{\"typ\":\"JWT\",\"alg\":\"RS256\",\"kid\":\"%s\"}", kid);
}

/* Claims as Microsoft sends them for a user of tenant tid. */
static json_t *claims_for(const char *tid)
{
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:I}",
                     "ver", "2.0",
                     "iss", apr_pstrcat(pool, LOGIN, tid, "/v2.0", NULL),
                     "aud", CLIENT,
                     "tid", tid,
                     "oid", "00000000-0000-0000-66f3-3332eca7ea81",
                     "sub", "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
                     "nonce", NONCE,
                     "preferred_username", "alice@contoso.example",
                     "email", "alice@contoso.example",
                     "name", "Alice Example",
                     "iat", (json_int_t)(NOW - 10),
                     "nbf", (json_int_t)(NOW - 10),
                     "exp", (json_int_t)(NOW + 3600));
}

/* Signs claims (and releases them). */
static const char *token(EVP_PKEY *k, const char *kid, json_t *claims)
{
    char *body = json_dumps(claims, JSON_COMPACT);
    const char *t = sign_jwt(k, hdr_for(kid), body);

    free(body);
    json_decref(claims);
    return t;
}

static char *body_of(json_t *claims)
{
    char *body = json_dumps(claims, JSON_COMPACT);

    json_decref(claims);
    return body;
}

static const char *valid_token(void)
{
    return token(key_a, "k1", claims_for(TID));
}

static mso_id_expect_t expect_common(void)
{
    mso_id_expect_t e;

    memset(&e, 0, sizeof(e));
    e.issuer = ISS_TMPL;
    e.client_id = CLIENT;
    e.nonce = NONCE;
    e.tenant_id = NULL;
    e.now = NOW;
    e.skew = SKEW;
    return e;
}

/* Verifies and checks the precise result; a failure must explain itself, give
 * no claims, and never quote the token. */
#define CHECK_KS(ks, jwt, e, want) do {                                              \
        const char *why_ = NULL, *t_ = (jwt);                                        \
        mso_id_claims_t *c_ = NULL;                                                  \
        mso_jwt_result_e r_ = mso_jwt_verify(pool, t_, (ks), (e), &c_, &why_);       \
        ck_assert_msg(r_ == (want), "result %d, expected %d (%s)", (int)r_,          \
                      (int)(want), why_ ? why_ : "-");                               \
        if ((want) == MSO_JWT_OK) {                                                  \
            ck_assert_ptr_nonnull(c_);                                               \
        }                                                                            \
        else {                                                                       \
            ck_assert_ptr_null(c_);                                                  \
            ck_assert(why_ != NULL && *why_ != '\0');                                \
            if (t_ && strlen(t_) > 16) {                                             \
                ck_assert_ptr_null(strstr(why_, t_));                                \
            }                                                                        \
        }                                                                            \
    } while (0)
#define CHECK(jwt, e, want) CHECK_KS(jwks, jwt, e, want)

/* Claims with one member set (value NULL removes it). */
static json_t *with(json_t *c, const char *key, json_t *value)
{
    if (value) {
        json_object_set_new(c, key, value);
    }
    else {
        json_object_del(c, key);
    }
    return c;
}

/* ------------------------------------------------------------------ valid */

START_TEST(valid_common_issuer)
{
    mso_id_expect_t e = expect_common();
    mso_id_claims_t *c = NULL;
    const char *why = NULL;

    ck_assert_int_eq(mso_jwt_verify(pool, valid_token(), jwks, &e, &c, &why), MSO_JWT_OK);
    ck_assert_ptr_null(why);
    ck_assert_ptr_nonnull(c);
    ck_assert_str_eq(c->iss, LOGIN TID "/v2.0");
    ck_assert_str_eq(c->aud, CLIENT);
    ck_assert_str_eq(c->tid, TID);
    ck_assert_str_eq(c->oid, "00000000-0000-0000-66f3-3332eca7ea81");
    ck_assert_str_eq(c->sub, "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ");
    ck_assert_str_eq(c->nonce, NONCE);
    ck_assert_str_eq(c->preferred_username, "alice@contoso.example");
    ck_assert_str_eq(c->email, "alice@contoso.example");
    ck_assert_str_eq(c->name, "Alice Example");
    ck_assert(c->iat == NOW - 10 && c->nbf == NOW - 10 && c->exp == NOW + 3600);

    /* the placeholder is matched whatever its case */
    e.issuer = LOGIN "{TenantID}/v2.0";
    CHECK(valid_token(), &e, MSO_JWT_OK);
    /* a key without an issuer property only needs the discovery issuer */
    CHECK(token(key_d, "k2", claims_for(TID2)), &e, MSO_JWT_OK);
    /* optional display claims may be absent or oddly typed */
    CHECK(token(key_a, "k1", with(with(with(claims_for(TID), "email", NULL), "name",
                                       json_integer(3)), "preferred_username", json_null())),
          &e, MSO_JWT_OK);
}
END_TEST

START_TEST(valid_concrete_issuer)
{
    mso_id_expect_t e = expect_common();

    e.issuer = LOGIN TID "/v2.0";
    CHECK(valid_token(), &e, MSO_JWT_OK);
    e.tenant_id = "6731DE76-14A6-49AE-97BC-6EBA6914391E";
    CHECK(valid_token(), &e, MSO_JWT_OK);
    /* a key with a concrete issuer signs for exactly that issuer */
    e = expect_common();
    CHECK(token(key_c, "k3", claims_for(TID2)), &e, MSO_JWT_OK);
}
END_TEST

START_TEST(rollover_same_kid)
{
    mso_id_expect_t e = expect_common();
    mso_jwks_t *ks = jwks_of(pool, apr_pstrcat(pool, jwk(pool, key_a, "k1", ISS_TMPL), ",",
                                               jwk(pool, key_b, "k1", ISS_TMPL), NULL));

    ck_assert_int_eq(mso_jwks_count(ks), 2);
    CHECK_KS(ks, token(key_b, "k1", claims_for(TID)), &e, MSO_JWT_OK);
    CHECK_KS(ks, valid_token(), &e, MSO_JWT_OK);
}
END_TEST

/* ------------------------------------------------------------ kid and alg */

START_TEST(unknown_kid)
{
    mso_id_expect_t e = expect_common();

    CHECK(token(key_a, "nope", claims_for(TID)), &e, MSO_JWT_UNKNOWN_KID);
    CHECK(token(key_weak, "kw", claims_for(TID)), &e, MSO_JWT_UNKNOWN_KID);
    CHECK_KS(NULL, valid_token(), &e, MSO_JWT_UNKNOWN_KID);
}
END_TEST

START_TEST(bad_alg)
{
    mso_id_expect_t e = expect_common();
    char *body = body_of(claims_for(TID));
    const char *good = valid_token();
    const char *sig = strrchr(good, '.') + 1;
    const char *unsigned_tok;

    CHECK(sign_jwt(key_a, "{\"typ\":\"JWT\",\"alg\":\"none\",\"kid\":\"k1\"}", body), &e,
          MSO_JWT_BAD_ALG);
    CHECK(sign_jwt(key_a, "{\"typ\":\"JWT\",\"alg\":\"HS256\",\"kid\":\"k1\"}", body), &e,
          MSO_JWT_BAD_ALG);
    CHECK(sign_jwt(key_a, "{\"typ\":\"JWT\",\"alg\":\"RS512\",\"kid\":\"k1\"}", body), &e,
          MSO_JWT_BAD_ALG);
    CHECK(sign_jwt(key_a, "{\"typ\":\"JWT\",\"alg\":\"rs256\",\"kid\":\"k1\"}", body), &e,
          MSO_JWT_BAD_ALG);
    CHECK(sign_jwt(key_a, "{\"typ\":\"JWT\",\"kid\":\"k1\"}", body), &e, MSO_JWT_BAD_ALG);
    CHECK(sign_jwt(key_a, "{\"typ\":\"JWT\",\"alg\":256,\"kid\":\"k1\"}", body), &e,
          MSO_JWT_BAD_ALG);
    /* alg none with a copied valid signature, and the classic empty one */
    unsigned_tok = apr_pstrcat(pool, b64s("{\"alg\":\"none\",\"kid\":\"k1\"}"), ".",
                               b64s(body), ".", sig, NULL);
    CHECK(unsigned_tok, &e, MSO_JWT_BAD_ALG);
    unsigned_tok = apr_pstrcat(pool, b64s("{\"alg\":\"none\",\"kid\":\"k1\"}"), ".",
                               b64s(body), ".", NULL);
    CHECK(unsigned_tok, &e, MSO_JWT_MALFORMED);
    free(body);
}
END_TEST

/* -------------------------------------------------------------- signature */

START_TEST(bad_signature)
{
    mso_id_expect_t e = expect_common();
    const char *good = valid_token();
    char *t = apr_pstrdup(pool, good);
    char *sig = strrchr(t, '.') + 1;
    char *other;
    size_t mid = strlen(sig) / 2;

    sig[mid] = sig[mid] == 'A' ? 'B' : 'A';
    CHECK(t, &e, MSO_JWT_BAD_SIGNATURE);

    /* a key that is not in the JWKS but claims its kid */
    CHECK(token(key_b, "k1", claims_for(TID)), &e, MSO_JWT_BAD_SIGNATURE);

    /* a valid signature moved onto other claims */
    other = apr_pstrdup(pool, token(key_a, "k1", with(claims_for(TID), "oid",
                                                      json_string("someone-else"))));
    *strrchr(other, '.') = '\0';
    CHECK(apr_pstrcat(pool, other, strrchr(good, '.'), NULL), &e, MSO_JWT_BAD_SIGNATURE);

    /* a truncated signature (342 chars for 256 bytes; 336 chars = 252 bytes) */
    t = apr_pstrdup(pool, good);
    t[strlen(t) - 6] = '\0';
    CHECK(t, &e, MSO_JWT_BAD_SIGNATURE);

    /* a key whose issuer is concrete signs under another kid: k3 is not k1 */
    CHECK(token(key_c, "k1", claims_for(TID)), &e, MSO_JWT_BAD_SIGNATURE);
}
END_TEST

/* ----------------------------------------------------------------- issuer */

START_TEST(issuer_mismatch)
{
    mso_id_expect_t e = expect_common();

    /* iss names another tenant than tid */
    CHECK(token(key_a, "k1", with(claims_for(TID), "iss", json_string(LOGIN TID2 "/v2.0"))),
          &e, MSO_JWT_BAD_ISSUER);
    /* wrong host */
    CHECK(token(key_a, "k1", with(claims_for(TID), "iss",
                                  json_string("https://login.evil.example/" TID "/v2.0"))),
          &e, MSO_JWT_BAD_ISSUER);
    /* v1.0 issuer and trailing slash are not the same string */
    CHECK(token(key_a, "k1", with(claims_for(TID), "iss",
                                  json_string("https://sts.windows.net/" TID "/"))),
          &e, MSO_JWT_BAD_ISSUER);
    CHECK(token(key_a, "k1", with(claims_for(TID), "iss", json_string(LOGIN TID "/v2.0/"))),
          &e, MSO_JWT_BAD_ISSUER);
    /* upper-case tid in iss is not the substituted issuer */
    CHECK(token(key_a, "k1", with(claims_for(TID), "iss",
                                  json_string(LOGIN "6731DE76-14A6-49AE-97BC-6EBA6914391E/v2.0"))),
          &e, MSO_JWT_BAD_ISSUER);
    /* a literal placeholder in iss matches nothing */
    CHECK(token(key_a, "k1", with(claims_for(TID), "iss", json_string(ISS_TMPL))),
          &e, MSO_JWT_BAD_ISSUER);
    CHECK(token(key_a, "k1", with(claims_for(TID), "iss", NULL)), &e, MSO_JWT_BAD_ISSUER);
    CHECK(token(key_a, "k1", with(claims_for(TID), "iss", json_integer(1))), &e,
          MSO_JWT_MALFORMED);

    /* concrete discovery issuer of another tenant */
    e.issuer = LOGIN TID2 "/v2.0";
    CHECK(valid_token(), &e, MSO_JWT_BAD_ISSUER);
    e.issuer = NULL;
    CHECK(valid_token(), &e, MSO_JWT_BAD_ISSUER);
}
END_TEST

START_TEST(key_issuer_mismatch)
{
    mso_id_expect_t e = expect_common();

    /* k3 may only sign for tenant TID2 (think: the MSA tenant key) */
    CHECK(token(key_c, "k3", claims_for(TID)), &e, MSO_JWT_BAD_ISSUER);
}
END_TEST

/* --------------------------------------------------------------- audience */

START_TEST(audience)
{
    mso_id_expect_t e = expect_common();

    CHECK(token(key_a, "k1", with(claims_for(TID), "aud", json_string("other-app"))), &e,
          MSO_JWT_BAD_AUDIENCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "aud", json_string(CLIENT " "))), &e,
          MSO_JWT_BAD_AUDIENCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "aud", NULL)), &e, MSO_JWT_BAD_AUDIENCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "aud", json_integer(7))), &e,
          MSO_JWT_BAD_AUDIENCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "aud", json_pack("[s]", CLIENT))), &e,
          MSO_JWT_OK);
    CHECK(token(key_a, "k1", with(claims_for(TID), "aud", json_pack("[s,s]", CLIENT, "x"))),
          &e, MSO_JWT_BAD_AUDIENCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "aud", json_pack("[s,s]", "x", CLIENT))),
          &e, MSO_JWT_BAD_AUDIENCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "aud", json_array())), &e,
          MSO_JWT_BAD_AUDIENCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "aud", json_pack("[i]", 1))), &e,
          MSO_JWT_BAD_AUDIENCE);
    e.client_id = "22222222-2222-3333-4444-555555555555";
    CHECK(valid_token(), &e, MSO_JWT_BAD_AUDIENCE);
}
END_TEST

/* ------------------------------------------------------------------ nonce */

START_TEST(nonce)
{
    mso_id_expect_t e = expect_common();

    CHECK(token(key_a, "k1", with(claims_for(TID), "nonce", json_string("other"))), &e,
          MSO_JWT_BAD_NONCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "nonce", json_string(NONCE "x"))), &e,
          MSO_JWT_BAD_NONCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "nonce", NULL)), &e, MSO_JWT_BAD_NONCE);
    CHECK(token(key_a, "k1", with(claims_for(TID), "nonce", json_string(""))), &e,
          MSO_JWT_BAD_NONCE);
    e.nonce = NULL;
    CHECK(valid_token(), &e, MSO_JWT_BAD_NONCE);
    e.nonce = "";
    CHECK(token(key_a, "k1", with(claims_for(TID), "nonce", json_string(""))), &e,
          MSO_JWT_BAD_NONCE);
}
END_TEST

/* ------------------------------------------------------------------ times */

START_TEST(times)
{
    mso_id_expect_t e = expect_common();

    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_integer(NOW - 200))), &e,
          MSO_JWT_OK);
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_integer(NOW - 300))), &e,
          MSO_JWT_EXPIRED);
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_integer(NOW - 400))), &e,
          MSO_JWT_EXPIRED);
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", NULL)), &e, MSO_JWT_EXPIRED);
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_integer(-1))), &e,
          MSO_JWT_EXPIRED);
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_real((double)NOW + 100.5))),
          &e, MSO_JWT_OK);
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_string("2099-01-01"))), &e,
          MSO_JWT_MALFORMED);
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_real(1e300))), &e,
          MSO_JWT_MALFORMED);
    /* no overflow on a far future expiry */
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_integer(LLONG_MAX))),
          &e, MSO_JWT_OK);

    CHECK(token(key_a, "k1", with(claims_for(TID), "nbf", json_integer(NOW + 400))), &e,
          MSO_JWT_NOT_YET_VALID);
    CHECK(token(key_a, "k1", with(claims_for(TID), "nbf", json_integer(NOW + 200))), &e,
          MSO_JWT_OK);
    CHECK(token(key_a, "k1", with(claims_for(TID), "nbf", NULL)), &e, MSO_JWT_OK);
    CHECK(token(key_a, "k1", with(claims_for(TID), "iat", json_integer(NOW + 400))), &e,
          MSO_JWT_NOT_YET_VALID);
    CHECK(token(key_a, "k1", with(claims_for(TID), "iat", json_true())), &e,
          MSO_JWT_MALFORMED);

    /* no skew at all */
    e.skew = 0;
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_integer(NOW))), &e,
          MSO_JWT_EXPIRED);
    CHECK(token(key_a, "k1", with(claims_for(TID), "exp", json_integer(NOW + 1))), &e,
          MSO_JWT_OK);
    CHECK(token(key_a, "k1", with(claims_for(TID), "nbf", json_integer(NOW + 1))), &e,
          MSO_JWT_NOT_YET_VALID);
}
END_TEST

/* ----------------------------------------------------------------- tenant */

START_TEST(tenant)
{
    mso_id_expect_t e = expect_common();

    CHECK(token(key_a, "k1", with(with(claims_for(TID), "tid", json_string("not-a-guid")),
                                  "iss", json_string(LOGIN "not-a-guid/v2.0"))),
          &e, MSO_JWT_BAD_TENANT);
    CHECK(token(key_a, "k1", with(with(claims_for(TID), "tid", json_string("common")),
                                  "iss", json_string(LOGIN "common/v2.0"))),
          &e, MSO_JWT_BAD_TENANT);
    CHECK(token(key_a, "k1", with(claims_for(TID), "tid", json_string(TID "0"))), &e,
          MSO_JWT_BAD_TENANT);
    CHECK(token(key_a, "k1", with(claims_for(TID), "tid", NULL)), &e, MSO_JWT_BAD_TENANT);
    CHECK(token(key_a, "k1", with(claims_for(TID), "tid", json_integer(5))), &e,
          MSO_JWT_MALFORMED);

    /* required tenant */
    e.tenant_id = TID2;
    CHECK(valid_token(), &e, MSO_JWT_BAD_TENANT);
    e.tenant_id = TID;
    CHECK(valid_token(), &e, MSO_JWT_OK);
}
END_TEST

/* -------------------------------------------------------------- malformed */

START_TEST(malformed)
{
    mso_id_expect_t e = expect_common();
    const char *good = valid_token();
    const char *h = hdr_for("k1");
    char *body = body_of(claims_for(TID));
    const char *b = b64s(body);
    const char *sig = strrchr(good, '.');
    char *huge;
    size_t i;

    CHECK(NULL, &e, MSO_JWT_MALFORMED);
    CHECK("", &e, MSO_JWT_MALFORMED);
    CHECK("a.b", &e, MSO_JWT_MALFORMED);
    CHECK("abc", &e, MSO_JWT_MALFORMED);
    CHECK("..", &e, MSO_JWT_MALFORMED);
    CHECK("a..c", &e, MSO_JWT_MALFORMED);
    CHECK(".b.c", &e, MSO_JWT_MALFORMED);
    CHECK("a.b.", &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, good, ".x", NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, good, ".", NULL), &e, MSO_JWT_MALFORMED);
    /* characters outside base64url: standard alphabet, padding, space */
    CHECK(apr_pstrcat(pool, "e+J.", b, sig, NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, b64s(h), "==.", b, sig, NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, " ", good, NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, good, "\n", NULL), &e, MSO_JWT_MALFORMED);
    /* impossible base64 length (4n+1) and non-zero trailing bits */
    CHECK(apr_pstrcat(pool, "eyJhb.", b, sig, NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, "eB.", b, sig, NULL), &e, MSO_JWT_MALFORMED);
    /* headers that are not a JSON object */
    CHECK(apr_pstrcat(pool, b64s("hello"), ".", b, sig, NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, b64s("[\"RS256\"]"), ".", b, sig, NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, b64s("\"RS256\""), ".", b, sig, NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, b64s("{\"alg\":\"RS256\",\"kid\":\"k1\"} x"), ".", b, sig, NULL),
          &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, b64s("{\"alg\":\"RS256\",\"kid\":\"k\xff\xfe\"}"), ".", b, sig,
                      NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, b64s("{\"alg\":\"RS256\",\"alg\":\"none\",\"kid\":\"k1\"}"), ".",
                      b, sig, NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, b64url(pool, (const unsigned char *)"{\"alg\":\"RS256\"\0}", 17),
                      ".", b, sig, NULL), &e, MSO_JWT_MALFORMED);
    /* header members of the wrong kind */
    CHECK(sign_jwt(key_a, "{\"typ\":\"JWS\",\"alg\":\"RS256\",\"kid\":\"k1\"}", body), &e,
          MSO_JWT_MALFORMED);
    CHECK(sign_jwt(key_a, "{\"typ\":1,\"alg\":\"RS256\",\"kid\":\"k1\"}", body), &e,
          MSO_JWT_MALFORMED);
    CHECK(sign_jwt(key_a, "{\"alg\":\"RS256\",\"kid\":\"k1\"}", body), &e, MSO_JWT_OK);
    CHECK(sign_jwt(key_a, "{\"alg\":\"RS256\"}", body), &e, MSO_JWT_MALFORMED);
    CHECK(sign_jwt(key_a, "{\"alg\":\"RS256\",\"kid\":\"\"}", body), &e, MSO_JWT_MALFORMED);
    CHECK(sign_jwt(key_a, "{\"alg\":\"RS256\",\"kid\":[\"k1\"]}", body), &e,
          MSO_JWT_MALFORMED);
    CHECK(sign_jwt(key_a, "{\"alg\":\"RS256\",\"kid\":\"k1\",\"crit\":[\"exp\"]}", body), &e,
          MSO_JWT_MALFORMED);
    /* validly signed payloads that are not claims */
    CHECK(sign_jwt(key_a, h, "not json"), &e, MSO_JWT_MALFORMED);
    CHECK(sign_jwt(key_a, h, "[1,2,3]"), &e, MSO_JWT_MALFORMED);
    CHECK(sign_jwt(key_a, h, "{\"tid\":\"" TID "\",\"tid\":\"" TID2 "\"}"), &e,
          MSO_JWT_MALFORMED);
    CHECK(sign_jwt(key_a, h, "{\"name\":\"\xc3\x28\"}"), &e, MSO_JWT_MALFORMED);
    CHECK(sign_jwt(key_a, h, "{}"), &e, MSO_JWT_BAD_TENANT);
    /* a bad signature encoding */
    CHECK(apr_pstrcat(pool, b64s(h), ".", b, ".A", NULL), &e, MSO_JWT_MALFORMED);
    CHECK(apr_pstrcat(pool, b64s(h), ".", b, ".AA", NULL), &e, MSO_JWT_BAD_SIGNATURE);

    /* 100 KB of plausible base64url */
    huge = apr_palloc(pool, 100 * 1024 + 1);
    for (i = 0; i < 100 * 1024; i++) {
        huge[i] = "eyJhbGciOiJSUzI1NiJ9"[i % 20];
    }
    huge[100 * 1024] = '\0';
    huge[40000] = '.';
    huge[80000] = '.';
    CHECK(huge, &e, MSO_JWT_MALFORMED);
    /* a real token grown past the limit with a long claim */
    memset(huge, 'x', 40000);
    huge[40000] = '\0';
    CHECK(token(key_a, "k1", with(claims_for(TID), "name", json_string(huge))), &e,
          MSO_JWT_MALFORMED);
    free(body);
}
END_TEST

START_TEST(why_is_readable)
{
    mso_id_expect_t e = expect_common();
    const char *why = NULL;
    mso_id_claims_t *c = NULL;

    ck_assert_int_eq(mso_jwt_verify(pool, token(key_a, "k1", with(claims_for(TID), "iss",
                                                json_string(LOGIN TID2 "/v2.0"))),
                                    jwks, &e, &c, &why), MSO_JWT_BAD_ISSUER);
    ck_assert_ptr_nonnull(strstr(why, LOGIN TID2 "/v2.0"));
    ck_assert_ptr_nonnull(strstr(why, ISS_TMPL));
    ck_assert_ptr_nonnull(strstr(why, TID));

    /* attacker-chosen bytes are escaped, and the nonce is never echoed */
    ck_assert_int_eq(mso_jwt_verify(pool, token(key_a, "k1", with(claims_for(TID), "aud",
                                                json_string("a\nb\x1b[31m"))),
                                    jwks, &e, &c, &why), MSO_JWT_BAD_AUDIENCE);
    ck_assert_ptr_null(strchr(why, '\n'));
    ck_assert_ptr_null(strchr(why, '\x1b'));
    ck_assert_int_eq(mso_jwt_verify(pool, token(key_a, "k1", with(claims_for(TID), "nonce",
                                                json_string("attacker-nonce"))),
                                    jwks, &e, &c, &why), MSO_JWT_BAD_NONCE);
    ck_assert_ptr_null(strstr(why, "attacker-nonce"));
    ck_assert_ptr_null(strstr(why, NONCE));
    /* NULL out-parameters are tolerated */
    ck_assert_int_eq(mso_jwt_verify(pool, valid_token(), jwks, &e, NULL, NULL), MSO_JWT_OK);
    ck_assert_int_eq(mso_jwt_verify(pool, "x", jwks, &e, NULL, NULL), MSO_JWT_MALFORMED);
    ck_assert_int_eq(mso_jwt_verify(pool, valid_token(), jwks, NULL, &c, &why),
                     MSO_JWT_MALFORMED);
}
END_TEST

/* -------------------------------------------------------------------- kid */

START_TEST(kid_only)
{
    const char *kid = "x";

    ck_assert_int_eq(mso_jwt_kid(pool, valid_token(), &kid), APR_SUCCESS);
    ck_assert_str_eq(kid, "k1");
    /* no verification: any kid is reported */
    ck_assert_int_eq(mso_jwt_kid(pool, token(key_b, "rolled", claims_for(TID)), &kid),
                     APR_SUCCESS);
    ck_assert_str_eq(kid, "rolled");
    ck_assert_int_eq(mso_jwt_kid(pool, "garbage", &kid), APR_EINVAL);
    ck_assert_ptr_null(kid);
    ck_assert_int_eq(mso_jwt_kid(pool, NULL, &kid), APR_EINVAL);
    ck_assert_int_eq(mso_jwt_kid(pool, apr_pstrcat(pool, b64s("{\"alg\":\"RS256\"}"),
                                                   ".e30.AAAA", NULL), &kid), APR_EINVAL);
    ck_assert_int_eq(mso_jwt_kid(pool, apr_pstrcat(pool, b64s("{\"kid\":7}"),
                                                   ".e30.AAAA", NULL), &kid), APR_EINVAL);
    ck_assert_int_eq(mso_jwt_kid(pool, apr_pstrcat(pool, b64s("nope"), ".e30.AAAA", NULL),
                                 &kid), APR_EINVAL);
}
END_TEST

/* ------------------------------------------------------------------- JWKS */

static apr_status_t parse_doc(const char *doc, apr_size_t len, mso_jwks_t **ks,
                              const char **err)
{
    *err = NULL;
    return mso_jwks_parse(pool, doc, len, ks, err);
}

START_TEST(jwks_main)
{
    ck_assert_int_eq(mso_jwks_count(jwks), 3);
    ck_assert(mso_jwks_has_kid(jwks, "k1"));
    ck_assert(mso_jwks_has_kid(jwks, "k2"));
    ck_assert(mso_jwks_has_kid(jwks, "k3"));
    ck_assert(!mso_jwks_has_kid(jwks, "kw"));
    ck_assert(!mso_jwks_has_kid(jwks, "K1"));
    ck_assert(!mso_jwks_has_kid(jwks, NULL));
    ck_assert_int_eq(mso_jwks_count(NULL), 0);
    ck_assert(!mso_jwks_has_kid(NULL, "k1"));
}
END_TEST

START_TEST(jwks_weak_key)
{
    mso_jwks_t *ks = NULL;
    const char *err = NULL;
    const char *doc = apr_pstrcat(pool, "{\"keys\":[", jwk(pool, key_weak, "kw", NULL), "]}",
                                  NULL);
    mso_id_expect_t e = expect_common();

    /* alone: nothing usable */
    ck_assert_int_eq(parse_doc(doc, strlen(doc), &ks, &err), APR_EINVAL);
    ck_assert_ptr_null(ks);
    ck_assert_ptr_nonnull(strstr(err, "2048"));
    /* beside a good key: skipped */
    ks = jwks_of(pool, apr_pstrcat(pool, jwk(pool, key_weak, "kw", NULL), ",",
                                   jwk(pool, key_a, "k1", ISS_TMPL), NULL));
    ck_assert_int_eq(mso_jwks_count(ks), 1);
    ck_assert(!mso_jwks_has_kid(ks, "kw"));
    CHECK_KS(ks, token(key_weak, "kw", claims_for(TID)), &e, MSO_JWT_UNKNOWN_KID);
    CHECK_KS(ks, valid_token(), &e, MSO_JWT_OK);
}
END_TEST

START_TEST(jwks_skips_foreign_keys)
{
    const char *n = bn_param(pool, key_a, OSSL_PKEY_PARAM_RSA_N);
    mso_jwks_t *ks;

    ks = jwks_of(pool, apr_pstrcat(pool,
        "{\"kty\":\"EC\",\"kid\":\"ec\",\"crv\":\"P-256\",\"x\":\"AA\",\"y\":\"AA\"},",
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"use\":\"enc\",\"kid\":\"enc\",\"n\":\"%s\","
                     "\"e\":\"AQAB\"},", n),
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"alg\":\"RS384\",\"kid\":\"384\",\"n\":\"%s\","
                     "\"e\":\"AQAB\"},", n),
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"kid\":\"e1\",\"n\":\"%s\",\"e\":\"AQ\"},", n),
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"kid\":\"e2\",\"n\":\"%s\",\"e\":\"Ag\"},", n),
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"kid\":\"badn\",\"n\":\"%s!\",\"e\":\"AQAB\"},",
                     n),
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"kid\":\"nonum\",\"n\":5,\"e\":\"AQAB\"},"),
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"n\":\"%s\",\"e\":\"AQAB\"},", n),
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"kid\":\"iss\",\"issuer\":1,\"n\":\"%s\","
                     "\"e\":\"AQAB\"},", n),
        "17, \"x\", null, [],",
        /* no "use": allowed; padded base64url: tolerated */
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"kid\":\"ok\",\"n\":\"%s\",\"e\":\"AQAB\"},", n),
        apr_psprintf(pool, "{\"kty\":\"RSA\",\"kid\":\"pad\",\"n\":\"%s==\",\"e\":\"AQAB\","
                     "\"use\":\"sig\",\"alg\":\"RS256\"}", n),
        NULL));
    ck_assert_int_eq(mso_jwks_count(ks), 2);
    ck_assert(mso_jwks_has_kid(ks, "ok"));
    ck_assert(mso_jwks_has_kid(ks, "pad"));
    ck_assert(!mso_jwks_has_kid(ks, "enc"));
    ck_assert(!mso_jwks_has_kid(ks, "e1"));
    ck_assert(!mso_jwks_has_kid(ks, "384"));
}
END_TEST

START_TEST(jwks_key_cap)
{
    const char *one = jwk(pool, key_a, "k", NULL);
    const char *keys = one;
    mso_jwks_t *ks;
    int i;

    for (i = 1; i < 100; i++) {
        keys = apr_pstrcat(pool, keys, ",", one, NULL);
    }
    ks = jwks_of(pool, keys);
    ck_assert_int_eq(mso_jwks_count(ks), 64);
}
END_TEST

START_TEST(jwks_garbage)
{
    static const char *const docs[] = {
        "not json", "{}", "[]", "{\"keys\":5}", "{\"keys\":{}}", "{\"keys\":[]}",
        "{\"keys\":[1,2,3]}", "{\"keys\":[{\"kty\":\"RSA\"}]}", "{\"keys\":[]} trailing",
        "{\"keys\":[{\"kty\":\"RSA\",\"kid\":\"\xff\"}]}", "null", "\"keys\"",
    };
    mso_jwks_t *ks = NULL;
    const char *err = NULL;
    char *big;
    size_t i;

    for (i = 0; i < sizeof(docs) / sizeof(docs[0]); i++) {
        ks = NULL;
        ck_assert_msg(parse_doc(docs[i], strlen(docs[i]), &ks, &err) == APR_EINVAL,
                      "doc %u", (unsigned)i);
        ck_assert_ptr_null(ks);
        ck_assert(err != NULL && *err != '\0');
    }
    ck_assert_int_eq(parse_doc("", 0, &ks, &err), APR_EINVAL);
    ck_assert_int_eq(parse_doc(NULL, 10, &ks, &err), APR_EINVAL);
    /* deep nesting */
    big = apr_palloc(pool, 200001);
    memset(big, '[', 100000);
    memset(big + 100000, ']', 100000);
    big[200000] = '\0';
    ck_assert_int_eq(parse_doc(big, 200000, &ks, &err), APR_EINVAL);
    /* over the size cap, even if valid */
    big = apr_palloc(pool, 400001);
    memset(big, ' ', 400000);
    memcpy(big, "{\"keys\":[]}", 11);
    big[400000] = '\0';
    ck_assert_int_eq(parse_doc(big, 400000, &ks, &err), APR_EINVAL);
    ck_assert_ptr_null(ks);
}
END_TEST

static Suite *jwt_suite(void)
{
    Suite *s = suite_create("jwt");
    TCase *tc = tcase_create("jwt");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, valid_common_issuer);
    tcase_add_test(tc, valid_concrete_issuer);
    tcase_add_test(tc, rollover_same_kid);
    tcase_add_test(tc, unknown_kid);
    tcase_add_test(tc, bad_alg);
    tcase_add_test(tc, bad_signature);
    tcase_add_test(tc, issuer_mismatch);
    tcase_add_test(tc, key_issuer_mismatch);
    tcase_add_test(tc, audience);
    tcase_add_test(tc, nonce);
    tcase_add_test(tc, times);
    tcase_add_test(tc, tenant);
    tcase_add_test(tc, malformed);
    tcase_add_test(tc, why_is_readable);
    tcase_add_test(tc, kid_only);
    tcase_add_test(tc, jwks_main);
    tcase_add_test(tc, jwks_weak_key);
    tcase_add_test(tc, jwks_skips_foreign_keys);
    tcase_add_test(tc, jwks_key_cap);
    tcase_add_test(tc, jwks_garbage);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    int failed;

    apr_initialize();
    /* the skipped 1024-bit key would warn in every test */
    mso_log_set(NULL, NULL, MSO_LOG_ERR);
    /* Keys are made once: RSA generation dominates the run time. */
    key_a = gen_key(2048);
    key_b = gen_key(2048);
    key_c = gen_key(2048);
    key_d = gen_key(2048);
    key_weak = gen_key(1024);

    failed = mso_check_run(jwt_suite());

    EVP_PKEY_free(key_a);
    EVP_PKEY_free(key_b);
    EVP_PKEY_free(key_c);
    EVP_PKEY_free(key_d);
    EVP_PKEY_free(key_weak);
    apr_terminate();
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
