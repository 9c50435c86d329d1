/* Random values, base64url, PKCE, key files and the key ring that seals
 * tokens at rest and browser state with AES-256-GCM (OpenSSL 3 EVP). */
#include <limits.h>
#include <string.h>

#include <apr_file_info.h>
#include <apr_file_io.h>
#include <apr_strings.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

#include "mso_crypto.h"

#define BLOB_VERSION 1
#define KID_LEN 4
#define NONCE_LEN 12
#define TAG_LEN 16
#define HDR_LEN (1 + KID_LEN + NONCE_LEN)
#define BLOB_MIN (HDR_LEN + TAG_LEN)

/* A key file is a few dozen bytes; anything much larger is the wrong file. */
#define KEYFILE_MAX 4096

#define KEY_FIX "create one with: openssl rand -hex 32 > FILE && chmod 600 FILE"

/* Only what sealing and opening need: the master key itself is not kept. */
typedef struct {
    unsigned char kid[KID_LEN];
    char kid_hex[2 * KID_LEN + 1];
    unsigned char token_key[MSO_KEY_LEN];
    unsigned char state_key[MSO_KEY_LEN];
    unsigned char csrf_key[MSO_KEY_LEN];
} keyring_entry_t;

struct mso_keyring_t {
    int count;
    keyring_entry_t keys[MSO_KEYRING_MAX];
    /* Fetched once: an implicit fetch per call takes a lock that request
     * threads would contend on. */
    EVP_CIPHER *gcm;
};

static CRYPTO_ONCE sha256_once = CRYPTO_ONCE_STATIC_INIT;
static EVP_MD *sha256_md;

static void sha256_fetch(void)
{
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

/* SHA-256, fetched once per process and then shared read-only. */
static const EVP_MD *sha256(void)
{
    if (!CRYPTO_THREAD_run_once(&sha256_once, sha256_fetch) || !sha256_md) {
        return EVP_sha256();
    }
    return sha256_md;
}

/* ------------------------------------------------------------------------ */
/* Random values                                                             */

apr_status_t mso_random_bytes(unsigned char *buf, apr_size_t len)
{
    if (len == 0) {
        return APR_SUCCESS;
    }
    if (!buf || len > INT_MAX) {
        return APR_EINVAL;
    }
    return RAND_bytes(buf, (int)len) == 1 ? APR_SUCCESS : APR_EGENERAL;
}

void mso_crypto_thread_done(void)
{
    OPENSSL_thread_stop();
}

/* ------------------------------------------------------------------------ */
/* base64 / base64url                                                        */

static const char b64url_chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

#define B64_URL 1               /* '-' and '_' for 62 and 63 */
#define B64_STD 2               /* '+' and '/' for 62 and 63 */

static int b64_value(unsigned char c, int alphabets)
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
    if ((alphabets & B64_URL) && c == '-') {
        return 62;
    }
    if ((alphabets & B64_URL) && c == '_') {
        return 63;
    }
    if ((alphabets & B64_STD) && c == '+') {
        return 62;
    }
    if ((alphabets & B64_STD) && c == '/') {
        return 63;
    }
    return -1;
}

/* Validates s[0..n) and, when out is not NULL, decodes into it (the caller
 * sized it from a first call with out == NULL). Strict: padding only as the
 * last one or two characters of a multiple of 4, and unused bits must be zero,
 * so every blob has exactly one text form. */
static apr_status_t b64_decode_into(const char *s, apr_size_t n, int alphabets,
                                    unsigned char *out, apr_size_t *outlen)
{
    apr_size_t pad = 0, m, i, o = 0;
    apr_uint32_t acc = 0;
    int bits = 0;

    while (pad < n && s[n - 1 - pad] == '=') {
        pad++;
    }
    if (pad > 2 || (pad > 0 && n % 4 != 0)) {
        return APR_EINVAL;
    }
    m = n - pad;
    if (m % 4 == 1) {
        return APR_EINVAL;
    }
    for (i = 0; i < m; i++) {
        int v = b64_value((unsigned char)s[i], alphabets);

        if (v < 0) {
            return APR_EINVAL;
        }
        acc = (acc << 6) | (apr_uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (out) {
                out[o] = (unsigned char)(acc >> bits);
            }
            o++;
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0) {
        return APR_EINVAL;      /* leftover bits set: not a canonical encoding */
    }
    *outlen = o;
    return APR_SUCCESS;
}

char *mso_b64url_encode(apr_pool_t *p, const unsigned char *data, apr_size_t len)
{
    char *out, *o;
    apr_size_t i;

    if (!data && len > 0) {
        return NULL;
    }
    out = o = apr_palloc(p, len / 3 * 4 + 4 + 1);
    for (i = 0; i + 2 < len; i += 3) {
        apr_uint32_t v = ((apr_uint32_t)data[i] << 16) | ((apr_uint32_t)data[i + 1] << 8)
                         | data[i + 2];

        *o++ = b64url_chars[(v >> 18) & 63];
        *o++ = b64url_chars[(v >> 12) & 63];
        *o++ = b64url_chars[(v >> 6) & 63];
        *o++ = b64url_chars[v & 63];
    }
    if (len - i == 1) {
        apr_uint32_t v = (apr_uint32_t)data[i] << 16;

        *o++ = b64url_chars[(v >> 18) & 63];
        *o++ = b64url_chars[(v >> 12) & 63];
    }
    else if (len - i == 2) {
        apr_uint32_t v = ((apr_uint32_t)data[i] << 16) | ((apr_uint32_t)data[i + 1] << 8);

        *o++ = b64url_chars[(v >> 18) & 63];
        *o++ = b64url_chars[(v >> 12) & 63];
        *o++ = b64url_chars[(v >> 6) & 63];
    }
    *o = '\0';
    return out;
}

apr_status_t mso_b64url_decode(apr_pool_t *p, const char *s, unsigned char **out,
                               apr_size_t *outlen)
{
    apr_size_t n, len;
    unsigned char *buf;

    if (!out || !outlen) {
        return APR_EINVAL;
    }
    *out = NULL;
    *outlen = 0;
    if (!s) {
        return APR_EINVAL;
    }
    n = strlen(s);
    if (b64_decode_into(s, n, B64_URL, NULL, &len) != APR_SUCCESS) {
        return APR_EINVAL;
    }
    /* +1: a NUL after the data lets callers treat text payloads as strings. */
    buf = apr_palloc(p, len + 1);
    b64_decode_into(s, n, B64_URL, buf, &len);
    buf[len] = '\0';
    *out = buf;
    *outlen = len;
    return APR_SUCCESS;
}

char *mso_random_token(apr_pool_t *p, apr_size_t nbytes)
{
    unsigned char *buf;
    char *token;

    if (nbytes == 0) {
        return apr_pstrdup(p, "");
    }
    buf = apr_palloc(p, nbytes);
    if (mso_random_bytes(buf, nbytes) != APR_SUCCESS) {
        return NULL;            /* never hand out a predictable value */
    }
    token = mso_b64url_encode(p, buf, nbytes);
    OPENSSL_cleanse(buf, nbytes);
    return token;
}

char *mso_pkce_s256(apr_pool_t *p, const char *verifier)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    if (!verifier) {
        return NULL;
    }
    if (EVP_Digest(verifier, strlen(verifier), md, &mdlen, sha256(), NULL) != 1) {
        return NULL;
    }
    return mso_b64url_encode(p, md, mdlen);
}

/* ------------------------------------------------------------------------ */
/* Key files                                                                 */

typedef enum {
    KEY_OK,
    KEY_EMPTY,                  /* zero bytes */
    KEY_BLANK,                  /* only white space */
    KEY_BINARY,                 /* not text, and not 32 bytes */
    KEY_HEX_COUNT,              /* hex digits only, but not 64 of them */
    KEY_B64_SIZE,               /* valid base64 of the wrong size */
    KEY_TEXT                    /* text of no known form */
} key_form_e;

static int is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/* Sorts the content into a form; on KEY_OK the key is filled in. *count is
 * what the message should name: bytes, hex digits, or decoded bytes. */
static key_form_e key_classify(const unsigned char *data, apr_size_t len,
                               unsigned char key[MSO_KEY_LEN], apr_size_t *count)
{
    apr_size_t start = 0, end = len, n, i, declen;
    const unsigned char *t;
    int all_hex = 1;

    *count = len;
    if (len == MSO_KEY_LEN) {
        memcpy(key, data, MSO_KEY_LEN);     /* raw bytes are used as they are */
        return KEY_OK;
    }
    if (len == 0) {
        return KEY_EMPTY;
    }
    while (start < end && is_space(data[start])) {
        start++;
    }
    while (end > start && is_space(data[end - 1])) {
        end--;
    }
    t = data + start;
    n = end - start;
    *count = n;
    if (n == 0) {
        return KEY_BLANK;
    }
    for (i = 0; i < n; i++) {
        if (t[i] < 0x20 && !is_space(t[i])) {
            *count = len;
            return KEY_BINARY;
        }
        if (t[i] >= 0x7f) {
            *count = len;
            return KEY_BINARY;
        }
        if (hex_value(t[i]) < 0) {
            all_hex = 0;
        }
    }
    if (all_hex && n == 2 * MSO_KEY_LEN) {
        for (i = 0; i < MSO_KEY_LEN; i++) {
            key[i] = (unsigned char)((hex_value(t[2 * i]) << 4) | hex_value(t[2 * i + 1]));
        }
        return KEY_OK;
    }
    if (b64_decode_into((const char *)t, n, B64_URL | B64_STD, NULL, &declen)
        == APR_SUCCESS) {
        if (declen == MSO_KEY_LEN) {
            b64_decode_into((const char *)t, n, B64_URL | B64_STD, key, &declen);
            return KEY_OK;
        }
        if (!all_hex) {
            *count = declen;
            return KEY_B64_SIZE;
        }
    }
    return all_hex ? KEY_HEX_COUNT : KEY_TEXT;
}

apr_status_t mso_key_parse(const unsigned char *data, apr_size_t len,
                           unsigned char key[MSO_KEY_LEN], const char **why)
{
    static const char *const msgs[] = {
        [KEY_EMPTY] = "the key is empty: " KEY_FIX,
        [KEY_BLANK] = "the key holds only white space: " KEY_FIX,
        [KEY_BINARY] = "the key holds binary data that is not exactly 32 bytes: " KEY_FIX,
        [KEY_HEX_COUNT] = "the key holds hex digits, but a hex key needs exactly 64 of "
                          "them: " KEY_FIX,
        [KEY_B64_SIZE] = "the key holds base64 that does not decode to exactly 32 bytes: "
                         KEY_FIX,
        [KEY_TEXT] = "the key holds text that is neither 64 hex digits nor base64 of "
                     "32 bytes: " KEY_FIX,
    };
    const char *dummy;
    apr_size_t count;
    key_form_e form;

    if (!why) {
        why = &dummy;
    }
    *why = NULL;
    if (!key || (!data && len > 0)) {
        *why = "no key data given";
        return APR_EINVAL;
    }
    form = key_classify(data, len, key, &count);
    if (form != KEY_OK) {
        /* No pool here to format the sizes into: mso_key_read_file does. */
        OPENSSL_cleanse(key, MSO_KEY_LEN);
        *why = msgs[form];
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

static const char *describe_form(apr_pool_t *p, key_form_e form, apr_size_t count)
{
    switch (form) {
    case KEY_EMPTY:
        return "is empty";
    case KEY_BLANK:
        return apr_psprintf(p, "holds only white space (%" APR_SIZE_T_FMT " bytes)", count);
    case KEY_BINARY:
        return apr_psprintf(p, "holds %" APR_SIZE_T_FMT " bytes of binary data, but a raw "
                            "key must be exactly 32 bytes", count);
    case KEY_HEX_COUNT:
        return apr_psprintf(p, "holds %" APR_SIZE_T_FMT " hex digits, but a hex key needs "
                            "exactly 64", count);
    case KEY_B64_SIZE:
        return apr_psprintf(p, "holds base64 that decodes to %" APR_SIZE_T_FMT " bytes, "
                            "but a key needs exactly 32", count);
    case KEY_TEXT:
    default:
        return apr_psprintf(p, "holds %" APR_SIZE_T_FMT " bytes of text that is neither "
                            "64 hex digits nor base64 of 32 bytes", count);
    }
}

static const char *key_file_fix(apr_pool_t *p, const char *path)
{
    return apr_psprintf(p, "create one with: openssl rand -hex 32 > %s && chmod 600 %s",
                        path, path);
}

apr_status_t mso_key_read_file(apr_pool_t *p, const char *path,
                               unsigned char key[MSO_KEY_LEN], const char **why)
{
    unsigned char buf[KEYFILE_MAX + 1];
    char err[256];
    apr_file_t *f;
    apr_finfo_t finfo;
    apr_size_t n = 0, count;
    apr_status_t rv;
    key_form_e form;
    const char *dummy;

    if (!why) {
        why = &dummy;
    }
    *why = NULL;
    if (!path || !*path || !key) {
        *why = "no key file named";
        return APR_EINVAL;
    }
    rv = apr_file_open(&f, path, APR_FOPEN_READ | APR_FOPEN_BINARY, APR_OS_DEFAULT, p);
    if (rv != APR_SUCCESS) {
        apr_strerror(rv, err, sizeof(err));
        if (APR_STATUS_IS_ENOENT(rv) || APR_STATUS_IS_ENOTDIR(rv)) {
            *why = apr_psprintf(p, "key file %s not found (%s): %s", path, err,
                                key_file_fix(p, path));
        }
        else if (APR_STATUS_IS_EACCES(rv)) {
            *why = apr_psprintf(p, "key file %s cannot be read: permission denied (%s): "
                                "let the user that starts httpd read it, e.g. "
                                "chown root %s && chmod 600 %s", path, err, path, path);
        }
        else {
            *why = apr_psprintf(p, "key file %s cannot be opened (%s)", path, err);
        }
        return rv;
    }
    rv = apr_file_info_get(&finfo, APR_FINFO_TYPE, f);
    if (rv == APR_SUCCESS && finfo.filetype != APR_REG) {
        apr_file_close(f);
        *why = apr_psprintf(p, "key file %s is %s, not a regular file: name the file "
                            "that holds the key (create one with: openssl rand -hex 32 > "
                            "FILE && chmod 600 FILE)", path,
                            finfo.filetype == APR_DIR ? "a directory" : "a special file");
        return APR_EINVAL;
    }
    /* One byte more than allowed tells "too large" from "exactly at the cap". */
    rv = apr_file_read_full(f, buf, sizeof(buf), &n);
    apr_file_close(f);
    if (rv != APR_SUCCESS && !APR_STATUS_IS_EOF(rv)) {
        OPENSSL_cleanse(buf, sizeof(buf));
        apr_strerror(rv, err, sizeof(err));
        *why = apr_psprintf(p, "key file %s cannot be read (%s)", path, err);
        return rv;
    }
    if (n > KEYFILE_MAX) {
        OPENSSL_cleanse(buf, sizeof(buf));
        *why = apr_psprintf(p, "key file %s is too large (more than %d bytes) to hold a "
                            "key: name the right file, or %s", path, KEYFILE_MAX,
                            key_file_fix(p, path));
        return APR_EINVAL;
    }
    form = key_classify(buf, n, key, &count);
    OPENSSL_cleanse(buf, sizeof(buf));
    if (form != KEY_OK) {
        OPENSSL_cleanse(key, MSO_KEY_LEN);
        *why = apr_psprintf(p, "key file %s %s: %s", path, describe_form(p, form, count),
                            key_file_fix(p, path));
        return APR_EINVAL;
    }
    return APR_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Key ring                                                                  */

static apr_status_t keyring_cleanup(void *data)
{
    mso_keyring_t *kr = data;

    OPENSSL_cleanse(kr->keys, sizeof(kr->keys));
    kr->count = 0;
    EVP_CIPHER_free(kr->gcm);
    kr->gcm = NULL;
    return APR_SUCCESS;
}

static apr_status_t hkdf_sha256(const unsigned char *ikm, apr_size_t ikm_len,
                                const char *info, unsigned char *out, apr_size_t out_len)
{
    EVP_KDF *kdf;
    EVP_KDF_CTX *kctx;
    OSSL_PARAM params[4];
    int ok;

    kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    if (!kdf) {
        return APR_EGENERAL;
    }
    kctx = EVP_KDF_CTX_new(kdf);
    EVP_KDF_free(kdf);
    if (!kctx) {
        return APR_EGENERAL;
    }
    /* No salt: the master key is already uniformly random. */
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)ikm, ikm_len);
    params[2] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info,
                                                  strlen(info));
    params[3] = OSSL_PARAM_construct_end();
    ok = EVP_KDF_derive(kctx, out, out_len, params);
    EVP_KDF_CTX_free(kctx);
    if (ok != 1) {
        OPENSSL_cleanse(out, out_len);
        return APR_EGENERAL;
    }
    return APR_SUCCESS;
}

mso_keyring_t *mso_keyring_create(apr_pool_t *p)
{
    mso_keyring_t *kr = apr_pcalloc(p, sizeof(*kr));

    kr->gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    apr_pool_cleanup_register(p, kr, keyring_cleanup, apr_pool_cleanup_null);
    return kr;
}

apr_status_t mso_keyring_add(mso_keyring_t *kr, const unsigned char key[MSO_KEY_LEN])
{
    static const char hex[] = "0123456789abcdef";
    keyring_entry_t e;
    apr_status_t rv;
    int i;

    if (!kr || !key) {
        return APR_EINVAL;
    }
    memset(&e, 0, sizeof(e));
    if ((rv = hkdf_sha256(key, MSO_KEY_LEN, "mso-kid-v1", e.kid, KID_LEN)) != APR_SUCCESS
        || (rv = hkdf_sha256(key, MSO_KEY_LEN, "mso-token-v1", e.token_key, MSO_KEY_LEN))
           != APR_SUCCESS
        || (rv = hkdf_sha256(key, MSO_KEY_LEN, "mso-state-v1", e.state_key, MSO_KEY_LEN))
           != APR_SUCCESS
        || (rv = hkdf_sha256(key, MSO_KEY_LEN, "mso-csrf-v1", e.csrf_key, MSO_KEY_LEN))
           != APR_SUCCESS) {
        OPENSSL_cleanse(&e, sizeof(e));
        return rv;
    }
    for (i = 0; i < KID_LEN; i++) {
        e.kid_hex[2 * i] = hex[e.kid[i] >> 4];
        e.kid_hex[2 * i + 1] = hex[e.kid[i] & 15];
    }
    e.kid_hex[2 * KID_LEN] = '\0';
    /* A blob names its key by kid alone, so kids must be unique in a ring. */
    for (i = 0; i < kr->count; i++) {
        if (memcmp(kr->keys[i].kid, e.kid, KID_LEN) == 0) {
            OPENSSL_cleanse(&e, sizeof(e));
            return APR_EEXIST;
        }
    }
    if (kr->count >= MSO_KEYRING_MAX) {
        OPENSSL_cleanse(&e, sizeof(e));
        return APR_ENOSPC;
    }
    kr->keys[kr->count++] = e;
    OPENSSL_cleanse(&e, sizeof(e));
    return APR_SUCCESS;
}

int mso_keyring_count(const mso_keyring_t *kr)
{
    return kr ? kr->count : 0;
}

const char *mso_keyring_kid(const mso_keyring_t *kr, int i)
{
    if (!kr || i < 0 || i >= kr->count) {
        return NULL;
    }
    return kr->keys[i].kid_hex;
}

/* ------------------------------------------------------------------------ */
/* Seal and open                                                             */

static const unsigned char *purpose_key(const keyring_entry_t *e, mso_purpose_e purpose)
{
    switch (purpose) {
    case MSO_PURPOSE_TOKEN:
        return e->token_key;
    case MSO_PURPOSE_STATE:
        return e->state_key;
    default:
        return NULL;
    }
}

/* AAD = version | kid | purpose | caller's aad. The header fields are fixed
 * length, so the concatenation is unambiguous. */
static int feed_aad(EVP_CIPHER_CTX *ctx, const unsigned char *blob, mso_purpose_e purpose,
                    const char *aad)
{
    unsigned char pb = (unsigned char)purpose;
    apr_size_t aad_len = aad ? strlen(aad) : 0;
    int outl;

    if (EVP_CipherUpdate(ctx, NULL, &outl, blob, 1 + KID_LEN) != 1
        || EVP_CipherUpdate(ctx, NULL, &outl, &pb, 1) != 1) {
        return 0;
    }
    if (aad_len > INT_MAX) {
        return 0;
    }
    if (aad_len > 0
        && EVP_CipherUpdate(ctx, NULL, &outl, (const unsigned char *)aad, (int)aad_len) != 1) {
        return 0;
    }
    return 1;
}

apr_status_t mso_seal(apr_pool_t *p, const mso_keyring_t *kr, mso_purpose_e purpose,
                      const char *aad, const void *plain, apr_size_t plain_len,
                      const char **sealed)
{
    const keyring_entry_t *e;
    const unsigned char *key;
    unsigned char *blob, *ct;
    EVP_CIPHER_CTX *ctx;
    apr_size_t blob_len;
    int outl = 0, finl = 0, ok;

    if (!sealed) {
        return APR_EINVAL;
    }
    *sealed = NULL;
    if (!kr || kr->count == 0 || (!plain && plain_len > 0)
        || plain_len > (apr_size_t)INT_MAX - BLOB_MIN) {
        return APR_EINVAL;
    }
    e = &kr->keys[0];           /* the first key seals */
    if (!(key = purpose_key(e, purpose))) {
        return APR_EINVAL;
    }
    blob_len = BLOB_MIN + plain_len;
    blob = apr_palloc(p, blob_len);
    blob[0] = BLOB_VERSION;
    memcpy(blob + 1, e->kid, KID_LEN);
    /* A fresh random nonce per seal: 2^96 space, far from GCM's limits here. */
    if (mso_random_bytes(blob + 1 + KID_LEN, NONCE_LEN) != APR_SUCCESS) {
        return APR_EGENERAL;
    }
    ct = blob + HDR_LEN;

    if (!(ctx = EVP_CIPHER_CTX_new())) {
        return APR_ENOMEM;
    }
    ok = EVP_EncryptInit_ex(ctx, kr->gcm ? kr->gcm : EVP_aes_256_gcm(), NULL, NULL, NULL) == 1
         && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) == 1
         && EVP_EncryptInit_ex(ctx, NULL, NULL, key, blob + 1 + KID_LEN) == 1
         && feed_aad(ctx, blob, purpose, aad)
         && (plain_len == 0
             || EVP_EncryptUpdate(ctx, ct, &outl, plain, (int)plain_len) == 1)
         && EVP_EncryptFinal_ex(ctx, ct + outl, &finl) == 1
         && (apr_size_t)(outl + finl) == plain_len
         && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, ct + plain_len) == 1;
    EVP_CIPHER_CTX_free(ctx);
    if (!ok) {
        return APR_EGENERAL;
    }
    *sealed = mso_b64url_encode(p, blob, blob_len);
    return APR_SUCCESS;
}

apr_status_t mso_open(apr_pool_t *p, const mso_keyring_t *kr, mso_purpose_e purpose,
                      const char *aad, const char *sealed, unsigned char **plain,
                      apr_size_t *plain_len)
{
    const keyring_entry_t *e = NULL;
    const unsigned char *key;
    unsigned char *blob, *out, tag[TAG_LEN];
    EVP_CIPHER_CTX *ctx;
    apr_size_t blob_len, ct_len;
    int i, outl = 0, finl = 0, ok;

    if (!plain || !plain_len) {
        return APR_EINVAL;
    }
    *plain = NULL;
    *plain_len = 0;
    if (!kr || !sealed || !purpose_key(&kr->keys[0], purpose)) {
        return APR_EINVAL;
    }
    if (mso_b64url_decode(p, sealed, &blob, &blob_len) != APR_SUCCESS
        || blob_len < BLOB_MIN || blob_len - BLOB_MIN > (apr_size_t)INT_MAX
        || blob[0] != BLOB_VERSION) {
        return APR_EINVAL;
    }
    for (i = 0; i < kr->count; i++) {
        if (memcmp(kr->keys[i].kid, blob + 1, KID_LEN) == 0) {
            e = &kr->keys[i];
            break;
        }
    }
    if (!e) {
        return APR_EINVAL;      /* sealed by a key no longer (or never) in the ring */
    }
    key = purpose_key(e, purpose);
    ct_len = blob_len - BLOB_MIN;
    memcpy(tag, blob + HDR_LEN + ct_len, TAG_LEN);
    out = apr_palloc(p, ct_len + 1);

    if (!(ctx = EVP_CIPHER_CTX_new())) {
        return APR_ENOMEM;
    }
    ok = EVP_DecryptInit_ex(ctx, kr->gcm ? kr->gcm : EVP_aes_256_gcm(), NULL, NULL, NULL) == 1
         && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) == 1
         && EVP_DecryptInit_ex(ctx, NULL, NULL, key, blob + 1 + KID_LEN) == 1
         && feed_aad(ctx, blob, purpose, aad)
         && (ct_len == 0
             || EVP_DecryptUpdate(ctx, out, &outl, blob + HDR_LEN, (int)ct_len) == 1)
         && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag) == 1
         && EVP_DecryptFinal_ex(ctx, out + outl, &finl) == 1
         && (apr_size_t)(outl + finl) == ct_len;
    EVP_CIPHER_CTX_free(ctx);
    if (!ok) {
        /* Unauthenticated plaintext must not linger in the pool. */
        OPENSSL_cleanse(out, ct_len + 1);
        return APR_EINVAL;
    }
    out[ct_len] = '\0';
    *plain = out;
    *plain_len = ct_len;
    return APR_SUCCESS;
}

/* ------------------------------------------------------------------------ */

int mso_str_equal_ct(const char *a, const char *b)
{
    apr_size_t la, lb;

    if (!a || !b) {
        return 0;
    }
    la = strlen(a);
    lb = strlen(b);
    if (la != lb) {
        return 0;               /* lengths are not secret; contents are */
    }
    return CRYPTO_memcmp(a, b, la) == 0;
}

/* ------------------------------------------------------------------------ */
/* Form tokens and key ids of sealed blobs                                   */

static const char *csrf_mac(apr_pool_t *p, const keyring_entry_t *e, const char *session)
{
    unsigned char mac[32];
    size_t len = 0;

    const char *msg = apr_pstrcat(p, "admin-form:", session, NULL);

    if (!EVP_Q_mac(NULL, "HMAC", NULL, "SHA256", NULL, e->csrf_key, MSO_KEY_LEN,
                   (const unsigned char *)msg, strlen(msg), mac, sizeof(mac), &len)
        || len != sizeof(mac)) {
        return NULL;
    }
    return mso_b64url_encode(p, mac, sizeof(mac));
}

const char *mso_csrf_token(apr_pool_t *p, const mso_keyring_t *kr, const char *session)
{
    if (!kr || kr->count < 1 || !session || !*session) {
        return NULL;
    }
    return csrf_mac(p, &kr->keys[0], session);
}

int mso_csrf_check(apr_pool_t *p, const mso_keyring_t *kr, const char *session,
                   const char *token)
{
    int i, ok = 0;

    if (!kr || !session || !*session || !token || !*token) {
        return 0;
    }
    /* Every key: a page opened before the ring was rotated still works. */
    for (i = 0; i < kr->count; i++) {
        const char *want = csrf_mac(p, &kr->keys[i], session);

        ok |= want && mso_str_equal_ct(want, token);
    }
    return ok;
}

const char *mso_sealed_kid(apr_pool_t *p, const char *sealed)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char *blob;
    apr_size_t len;
    char *out;
    int i;

    if (!sealed || mso_b64url_decode(p, sealed, &blob, &len) != APR_SUCCESS
        || len < BLOB_MIN || blob[0] != BLOB_VERSION) {
        return NULL;
    }
    out = apr_palloc(p, 2 * KID_LEN + 1);
    for (i = 0; i < KID_LEN; i++) {
        out[2 * i] = hex[blob[1 + i] >> 4];
        out[2 * i + 1] = hex[blob[1 + i] & 15];
    }
    out[2 * KID_LEN] = '\0';
    return out;
}
