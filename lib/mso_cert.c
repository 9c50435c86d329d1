/* The certificate credential (see mso_cert.h). OpenSSL 3 only: PEM reading,
 * X509_check_private_key, EVP_DigestSign with PKCS#1 v1.5 or PSS. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <apr_strings.h>
#include <jansson.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "mso_cert.h"
#include "mso_crypto.h"

struct mso_cert_t {
    X509 *x509;
    EVP_PKEY *key;
    apr_time_t not_after;
    const char *x5t_s256;
    const char *sha1_hex;
    const char *subject;
};

static apr_status_t cert_cleanup(void *data)
{
    mso_cert_t *c = data;

    EVP_PKEY_free(c->key);
    X509_free(c->x509);
    c->key = NULL;
    c->x509 = NULL;
    return APR_SUCCESS;
}

/* The whole file into memory (certificates and keys are small). */
static apr_status_t read_pem(apr_pool_t *p, const char *path, BIO **bio, const char **why)
{
    *bio = BIO_new_file(path, "r");
    if (!*bio) {
        *why = apr_psprintf(p, "cannot read %s: check that the file exists and that root can "
                            "read it", path);
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    *(int *)u = 1;
    return -1;                  /* an encrypted key: refuse rather than prompt */
}

static const char *hex_upper(apr_pool_t *p, const unsigned char *d, apr_size_t n)
{
    static const char digits[] = "0123456789ABCDEF";
    char *out = apr_palloc(p, n * 2 + 1);
    apr_size_t i;

    for (i = 0; i < n; i++) {
        out[i * 2] = digits[d[i] >> 4];
        out[i * 2 + 1] = digits[d[i] & 15];
    }
    out[n * 2] = '\0';
    return out;
}

static apr_time_t asn1_time(const ASN1_TIME *t)
{
    struct tm tm;

    memset(&tm, 0, sizeof(tm));
    if (!t || ASN1_TIME_to_tm(t, &tm) != 1) {
        return 0;
    }
    return apr_time_from_sec((apr_time_t)timegm(&tm));
}

apr_status_t mso_cert_load(apr_pool_t *p, const char *cert_file, const char *key_file,
                           mso_cert_t **out, const char **why)
{
    mso_cert_t *c = apr_pcalloc(p, sizeof(*c));
    const char *kf = key_file ? key_file : cert_file;
    unsigned char sha256[32], sha1[20];
    unsigned int n;
    BIO *bio = NULL;
    int encrypted = 0;
    char subject[256];

    *out = NULL;
    apr_pool_cleanup_register(p, c, cert_cleanup, apr_pool_cleanup_null);
    if (read_pem(p, cert_file, &bio, why) != APR_SUCCESS) {
        return APR_EINVAL;
    }
    c->x509 = PEM_read_bio_X509(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (!c->x509) {
        *why = apr_psprintf(p, "%s holds no PEM certificate (-----BEGIN CERTIFICATE-----): make "
                            "one with 'openssl req -x509 -newkey rsa:3072 -nodes -days 730 "
                            "-subj /CN=mod_msoauth -keyout msoauth-cert.key -out "
                            "msoauth-cert.pem'", cert_file);
        return APR_EINVAL;
    }
    if (read_pem(p, kf, &bio, why) != APR_SUCCESS) {
        return APR_EINVAL;
    }
    c->key = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, &encrypted);
    BIO_free(bio);
    if (!c->key) {
        *why = encrypted
            ? apr_psprintf(p, "the private key in %s is encrypted with a passphrase, which "
                           "httpd cannot type: write it out without one ('openssl pkey -in %s "
                           "-out %s.plain') and keep that file readable by root only", kf, kf, kf)
            : apr_psprintf(p, "%s holds no PEM private key (-----BEGIN PRIVATE KEY-----): "
                           "give the key file as the second argument of "
                           "MSOAuthClientCertificateFile, or append the key to the "
                           "certificate file", kf);
        return APR_EINVAL;
    }
    if (EVP_PKEY_get_base_id(c->key) != EVP_PKEY_RSA) {
        *why = apr_psprintf(p, "the key in %s is not an RSA key: Microsoft's certificate "
                            "credentials are signed with RS256 or PS256; make an RSA key "
                            "(openssl req -x509 -newkey rsa:3072 ...)", kf);
        return APR_EINVAL;
    }
    if (EVP_PKEY_get_bits(c->key) < 2048) {
        *why = apr_psprintf(p, "the RSA key in %s has %d bits: Microsoft requires at least "
                            "2048; make a new certificate with rsa:3072", kf,
                            EVP_PKEY_get_bits(c->key));
        return APR_EINVAL;
    }
    if (X509_check_private_key(c->x509, c->key) != 1) {
        *why = apr_psprintf(p, "the private key in %s does not belong to the certificate in "
                            "%s: give the key the certificate was made with", kf, cert_file);
        return APR_EINVAL;
    }
    c->not_after = asn1_time(X509_get0_notAfter(c->x509));
    if (X509_digest(c->x509, EVP_sha256(), sha256, &n) != 1 || n != sizeof(sha256)
        || X509_digest(c->x509, EVP_sha1(), sha1, &n) != 1 || n != sizeof(sha1)) {
        *why = apr_psprintf(p, "cannot compute the thumbprint of the certificate in %s",
                            cert_file);
        return APR_EINVAL;
    }
    c->x5t_s256 = mso_b64url_encode(p, sha256, sizeof(sha256));
    c->sha1_hex = hex_upper(p, sha1, sizeof(sha1));
    X509_NAME_oneline(X509_get_subject_name(c->x509), subject, sizeof(subject));
    c->subject = apr_pstrdup(p, subject);
    *out = c;
    return APR_SUCCESS;
}

apr_time_t mso_cert_not_after(const mso_cert_t *cert)
{
    return cert->not_after;
}

const char *mso_cert_x5t_s256(const mso_cert_t *cert)
{
    return cert->x5t_s256;
}

const char *mso_cert_sha1_hex(const mso_cert_t *cert)
{
    return cert->sha1_hex;
}

const char *mso_cert_subject(const mso_cert_t *cert)
{
    return cert->subject;
}

/* base64url of a JSON object, compact. */
static const char *b64_json(apr_pool_t *p, json_t *j)
{
    char *text = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    const char *out;

    json_decref(j);
    if (!text) {
        return NULL;
    }
    out = mso_b64url_encode(p, (const unsigned char *)text, strlen(text));
    free(text);
    return out;
}

/* A random version 4 UUID for jti. */
static const char *random_uuid(apr_pool_t *p)
{
    unsigned char b[16];

    if (mso_random_bytes(b, sizeof(b)) != APR_SUCCESS) {
        return NULL;
    }
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    return apr_psprintf(p, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
                        b[12], b[13], b[14], b[15]);
}

apr_status_t mso_cert_assertion(apr_pool_t *p, const mso_cert_t *cert, mso_assertion_alg_e alg,
                                const char *client_id, const char *token_url, apr_int64_t now,
                                int lifetime, const char **jwt)
{
    const char *jti = random_uuid(p), *head, *body, *input;
    EVP_MD_CTX *md = NULL;
    EVP_PKEY_CTX *pctx = NULL;
    unsigned char *sig = NULL;
    size_t siglen = 0;
    apr_status_t rv = APR_EGENERAL;

    *jwt = NULL;
    if (!cert || !cert->key || !client_id || !token_url || !jti || lifetime <= 0) {
        return APR_EGENERAL;
    }
    head = b64_json(p, json_pack("{s:s, s:s, s:s}", "alg",
                                 alg == MSO_ASSERTION_RS256 ? "RS256" : "PS256", "typ", "JWT",
                                 "x5t#S256", cert->x5t_s256));
    body = b64_json(p, json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:I}", "aud", token_url,
                                 "iss", client_id, "sub", client_id, "jti", jti,
                                 "nbf", (json_int_t)now, "iat", (json_int_t)now,
                                 "exp", (json_int_t)(now + lifetime)));
    if (!head || !body) {
        return APR_EGENERAL;
    }
    input = apr_pstrcat(p, head, ".", body, NULL);
    md = EVP_MD_CTX_new();
    if (!md || EVP_DigestSignInit(md, &pctx, EVP_sha256(), NULL, cert->key) != 1) {
        goto leave;
    }
    if (alg == MSO_ASSERTION_PS256
        && (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) != 1
            || EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) != 1
            || EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha256()) != 1)) {
        goto leave;
    }
    if (EVP_DigestSign(md, NULL, &siglen, (const unsigned char *)input, strlen(input)) != 1) {
        goto leave;
    }
    sig = apr_palloc(p, siglen);
    if (EVP_DigestSign(md, sig, &siglen, (const unsigned char *)input, strlen(input)) != 1) {
        goto leave;
    }
    *jwt = apr_pstrcat(p, input, ".", mso_b64url_encode(p, sig, siglen), NULL);
    rv = APR_SUCCESS;

leave:
    EVP_MD_CTX_free(md);
    return rv;
}
