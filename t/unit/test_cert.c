/* The certificate credential (lib/mso_cert): loading and its checks, and the
 * client assertions verified with the certificate's public key. */
#include <check.h>

#include "unit.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <apr_general.h>
#include <apr_strings.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "mso_cert.h"
#include "mso_crypto.h"

static apr_pool_t *pool;
static char dir[64];

static void setup(void)
{
    apr_pool_create(&pool, NULL);
    strcpy(dir, "/tmp/mso-cert-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void teardown(void)
{
    char cmd[128];

    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
    apr_pool_destroy(pool);
}

static const char *path(const char *name)
{
    return apr_psprintf(pool, "%s/%s", dir, name);
}

/* A self-signed certificate for key, valid from now for days. */
static X509 *self_signed(EVP_PKEY *key, long days)
{
    X509 *x = X509_new();
    X509_NAME *name;

    ck_assert_ptr_nonnull(x);
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 42);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), days * 86400);
    X509_set_pubkey(x, key);
    name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"mod_msoauth",
                               -1, -1, 0);
    X509_set_issuer_name(x, name);
    ck_assert_int_gt(X509_sign(x, key, EVP_sha256()), 0);
    return x;
}

static void write_cert(const char *file, X509 *x)
{
    FILE *f = fopen(path(file), "w");

    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(PEM_write_X509(f, x), 1);
    fclose(f);
}

static void write_key(const char *file, EVP_PKEY *k, const char *pass, const char *mode)
{
    FILE *f = fopen(path(file), mode);

    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(PEM_write_PrivateKey(f, k, pass ? EVP_aes_256_cbc() : NULL,
                                          (unsigned char *)pass, pass ? (int)strlen(pass) : 0,
                                          NULL, NULL), 1);
    fclose(f);
}

static json_t *part(const char *jwt, int which)
{
    char **parts = apr_palloc(pool, 3 * sizeof(char *));
    char *copy = apr_pstrdup(pool, jwt), *last;
    unsigned char *raw;
    apr_size_t n;
    int i;

    for (i = 0; i < 3; i++) {
        parts[i] = apr_strtok(i ? NULL : copy, ".", &last);
        ck_assert_ptr_nonnull(parts[i]);
    }
    ck_assert_int_eq(mso_b64url_decode(pool, parts[which], &raw, &n), APR_SUCCESS);
    return json_loadb((const char *)raw, n, 0, NULL);
}

/* Verifies the JWT's signature with key's public half, as Microsoft would. */
static int signature_ok(const char *jwt, EVP_PKEY *key, int pss)
{
    const char *dot = strrchr(jwt, '.');
    unsigned char *sig;
    apr_size_t n;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    int ok;

    ck_assert_int_eq(mso_b64url_decode(pool, dot + 1, &sig, &n), APR_SUCCESS);
    ck_assert_int_eq(EVP_DigestVerifyInit(md, &pctx, EVP_sha256(), NULL, key), 1);
    if (pss) {
        EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING);
        EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 32);
    }
    ok = EVP_DigestVerify(md, sig, n, (const unsigned char *)jwt, dot - jwt) == 1;
    EVP_MD_CTX_free(md);
    return ok;
}

START_TEST(load_and_sign)
{
    EVP_PKEY *key = EVP_RSA_gen(2048);
    X509 *x = self_signed(key, 365);
    mso_cert_t *c = NULL;
    const char *why = NULL, *jwt = NULL, *jwt2 = NULL;
    unsigned char digest[32];
    unsigned int dn;
    json_t *h, *b;

    write_cert("c.pem", x);
    write_key("k.pem", key, NULL, "w");
    ck_assert_int_eq(mso_cert_load(pool, path("c.pem"), path("k.pem"), &c, &why), APR_SUCCESS);
    X509_digest(x, EVP_sha256(), digest, &dn);
    ck_assert_str_eq(mso_cert_x5t_s256(c), mso_b64url_encode(pool, digest, dn));
    ck_assert_int_eq(strlen(mso_cert_sha1_hex(c)), 40);
    ck_assert_ptr_nonnull(strstr(mso_cert_subject(c), "CN=mod_msoauth"));
    ck_assert_int_gt(mso_cert_not_after(c), apr_time_now() + apr_time_from_sec(364 * 86400));

    ck_assert_int_eq(mso_cert_assertion(pool, c, MSO_ASSERTION_PS256, "client-1",
                                        "https://login.example/t/oauth2/v2.0/token", 1000, 300,
                                        &jwt), APR_SUCCESS);
    h = part(jwt, 0);
    b = part(jwt, 1);
    ck_assert_str_eq(json_string_value(json_object_get(h, "alg")), "PS256");
    ck_assert_str_eq(json_string_value(json_object_get(h, "typ")), "JWT");
    ck_assert_str_eq(json_string_value(json_object_get(h, "x5t#S256")), mso_cert_x5t_s256(c));
    ck_assert_str_eq(json_string_value(json_object_get(b, "aud")),
                     "https://login.example/t/oauth2/v2.0/token");
    ck_assert_str_eq(json_string_value(json_object_get(b, "iss")), "client-1");
    ck_assert_str_eq(json_string_value(json_object_get(b, "sub")), "client-1");
    ck_assert_int_eq(json_integer_value(json_object_get(b, "nbf")), 1000);
    ck_assert_int_eq(json_integer_value(json_object_get(b, "exp")), 1300);
    ck_assert_int_eq(strlen(json_string_value(json_object_get(b, "jti"))), 36);
    ck_assert(signature_ok(jwt, key, 1));
    ck_assert(!signature_ok(jwt, key, 0));
    /* Every assertion has its own jti. */
    ck_assert_int_eq(mso_cert_assertion(pool, c, MSO_ASSERTION_RS256, "client-1",
                                        "https://login.example/t/oauth2/v2.0/token", 1000, 300,
                                        &jwt2), APR_SUCCESS);
    json_decref(h);
    h = part(jwt2, 1);
    ck_assert_str_ne(json_string_value(json_object_get(h, "jti")),
                     json_string_value(json_object_get(b, "jti")));
    json_decref(h);
    h = part(jwt2, 0);
    ck_assert_str_eq(json_string_value(json_object_get(h, "alg")), "RS256");
    ck_assert(signature_ok(jwt2, key, 0));
    json_decref(h);
    json_decref(b);

    /* Key appended to the certificate file: one argument is enough. */
    write_key("c.pem", key, NULL, "a");
    ck_assert_int_eq(mso_cert_load(pool, path("c.pem"), NULL, &c, &why), APR_SUCCESS);
    X509_free(x);
    EVP_PKEY_free(key);
}
END_TEST

START_TEST(refused_with_reasons)
{
    EVP_PKEY *key = EVP_RSA_gen(2048), *other = EVP_RSA_gen(2048), *small = EVP_RSA_gen(1024);
    EVP_PKEY *ec = EVP_EC_gen("P-256");
    X509 *x = self_signed(key, 30);
    mso_cert_t *c = NULL;
    const char *why = NULL;

    write_cert("c.pem", x);
    write_key("other.pem", other, NULL, "w");
    ck_assert_int_eq(mso_cert_load(pool, path("c.pem"), path("other.pem"), &c, &why),
                     APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "does not belong to the certificate"));
    ck_assert_ptr_null(c);

    write_key("enc.pem", key, "passphrase", "w");
    ck_assert_int_eq(mso_cert_load(pool, path("c.pem"), path("enc.pem"), &c, &why),
                     APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "encrypted"));

    ck_assert_int_eq(mso_cert_load(pool, path("c.pem"), NULL, &c, &why), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "no PEM private key"));
    ck_assert_int_eq(mso_cert_load(pool, path("missing.pem"), NULL, &c, &why), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "cannot read"));
    write_key("k.pem", key, NULL, "w");
    ck_assert_int_eq(mso_cert_load(pool, path("k.pem"), path("k.pem"), &c, &why), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "no PEM certificate"));

    X509_free(x);
    x = self_signed(small, 30);
    write_cert("s.pem", x);
    write_key("s.key", small, NULL, "w");
    ck_assert_int_eq(mso_cert_load(pool, path("s.pem"), path("s.key"), &c, &why), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "2048"));
    X509_free(x);
    x = self_signed(ec, 30);
    write_cert("e.pem", x);
    write_key("e.key", ec, NULL, "w");
    ck_assert_int_eq(mso_cert_load(pool, path("e.pem"), path("e.key"), &c, &why), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "not an RSA key"));
    ck_assert_ptr_null(strstr(why, "BEGIN PRIVATE KEY-----\n"));   /* no key material */
    X509_free(x);
    EVP_PKEY_free(key);
    EVP_PKEY_free(other);
    EVP_PKEY_free(small);
    EVP_PKEY_free(ec);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("cert");
    TCase *tc = tcase_create("cert");
    int failed;

    apr_initialize();
    tcase_set_timeout(tc, 60);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, load_and_sign);
    tcase_add_test(tc, refused_with_reasons);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
