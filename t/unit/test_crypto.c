/* Checks of random values, base64url, PKCE, key files and sealing (lib/mso_crypto). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* memmem */
#endif
#include <check.h>

#include "unit.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <apr_general.h>
#include <apr_strings.h>
#include <apr_thread_proc.h>

#include <openssl/evp.h>

#include "mso_crypto.h"

static apr_pool_t *pool;

static void setup(void)
{
    apr_pool_create(&pool, NULL);
}

static void teardown(void)
{
    apr_pool_destroy(pool);
}

/* Standard padded base64 from OpenSSL: an implementation independent of ours. */
static char *std_b64(const unsigned char *data, size_t len)
{
    char *out = apr_palloc(pool, 4 * ((len + 2) / 3) + 1);

    EVP_EncodeBlock((unsigned char *)out, data, (int)len);
    return out;
}

/* std_b64 turned into base64url without padding. */
static char *url_b64(const unsigned char *data, size_t len)
{
    char *s = std_b64(data, len), *c;

    for (c = s; *c; c++) {
        if (*c == '+') {
            *c = '-';
        }
        else if (*c == '/') {
            *c = '_';
        }
        else if (*c == '=') {
            *c = '\0';
            break;
        }
    }
    return s;
}

static void fill_key(unsigned char key[MSO_KEY_LEN], unsigned char seed)
{
    int i;

    for (i = 0; i < MSO_KEY_LEN; i++) {
        key[i] = (unsigned char)(seed * 31 + i * 7 + 1);
    }
}

static mso_keyring_t *ring_of(unsigned char seed1, unsigned char seed2)
{
    mso_keyring_t *kr = mso_keyring_create(pool);
    unsigned char key[MSO_KEY_LEN];

    fill_key(key, seed1);
    ck_assert_int_eq(mso_keyring_add(kr, key), APR_SUCCESS);
    if (seed2) {
        fill_key(key, seed2);
        ck_assert_int_eq(mso_keyring_add(kr, key), APR_SUCCESS);
    }
    return kr;
}

/* ---- base64url -------------------------------------------------------- */

START_TEST(b64url_vectors)
{
    static const char *const in[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    static const char *const out[] = {"", "Zg", "Zm8", "Zm9v", "Zm9vYg", "Zm9vYmE",
                                      "Zm9vYmFy"};
    static const unsigned char hi[] = {0xfb, 0xff, 0xbf};
    unsigned char *dec;
    apr_size_t declen;
    size_t i;

    for (i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        ck_assert_str_eq(mso_b64url_encode(pool, (const unsigned char *)in[i], strlen(in[i])),
                         out[i]);
        ck_assert_int_eq(mso_b64url_decode(pool, out[i], &dec, &declen), APR_SUCCESS);
        ck_assert_uint_eq(declen, strlen(in[i]));
        ck_assert_str_eq((const char *)dec, in[i]);
    }
    ck_assert_str_eq(mso_b64url_encode(pool, hi, sizeof(hi)), "-_-_");
    /* Padding is optional on input. */
    ck_assert_int_eq(mso_b64url_decode(pool, "Zg==", &dec, &declen), APR_SUCCESS);
    ck_assert_uint_eq(declen, 1);
    ck_assert_int_eq(dec[0], 'f');
    ck_assert_int_eq(mso_b64url_decode(pool, "Zm8=", &dec, &declen), APR_SUCCESS);
    ck_assert_uint_eq(declen, 2);
    ck_assert_int_eq(memcmp(dec, "fo", 2), 0);
}
END_TEST

START_TEST(b64url_round_trip)
{
    unsigned char data[40], *dec;
    apr_size_t declen;
    size_t len;

    for (len = 0; len <= sizeof(data); len++) {
        char *enc, *padded;

        ck_assert_int_eq(mso_random_bytes(data, len), APR_SUCCESS);
        enc = mso_b64url_encode(pool, data, len);
        ck_assert_ptr_nonnull(enc);
        ck_assert_uint_eq(strlen(enc), (len * 4 + 2) / 3);
        ck_assert_msg(strspn(enc, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                  "0123456789-_") == strlen(enc),
                      "non-alphabet character in %s", enc);
        ck_assert_str_eq(enc, url_b64(data, len));
        ck_assert_int_eq(mso_b64url_decode(pool, enc, &dec, &declen), APR_SUCCESS);
        ck_assert_uint_eq(declen, len);
        ck_assert_int_eq(memcmp(dec, data, len), 0);
        ck_assert_int_eq(dec[len], 0);
        padded = apr_pstrcat(pool, enc, len % 3 == 1 ? "==" : len % 3 == 2 ? "=" : "", NULL);
        ck_assert_int_eq(mso_b64url_decode(pool, padded, &dec, &declen), APR_SUCCESS);
        ck_assert_uint_eq(declen, len);
        ck_assert_int_eq(memcmp(dec, data, len), 0);
    }
}
END_TEST

START_TEST(b64url_rejects)
{
    static const char *const bad[] = {
        "Z",            /* length % 4 == 1 */
        "Zm9vY",        /* length % 4 == 1 */
        "Zm9v+w",       /* standard alphabet */
        "Zm9/",
        "Zm 9v",        /* white space */
        "Zm9v\n",
        "Zg=",          /* padding that does not complete a quantum */
        "Zg===",
        "Z===",
        "Zm9v=",
        "Z=g=",         /* padding in the middle */
        "=Zm9",
        "Zh",           /* unused bits set: not the canonical form */
        "Zm9",
        "Zm9v\xff",
        "Zm.v",
        "Zm9v*A",
    };
    unsigned char *dec = (unsigned char *)"x";
    apr_size_t declen = 7;
    size_t i;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        ck_assert_msg(mso_b64url_decode(pool, bad[i], &dec, &declen) == APR_EINVAL,
                      "accepted \"%s\"", bad[i]);
        ck_assert_ptr_null(dec);
        ck_assert_uint_eq(declen, 0);
    }
    ck_assert_int_eq(mso_b64url_decode(pool, NULL, &dec, &declen), APR_EINVAL);
    /* "Zm8" is fine while "Zm9" has a stray bit: the check above is real. */
    ck_assert_int_eq(mso_b64url_decode(pool, "Zm8", &dec, &declen), APR_SUCCESS);
}
END_TEST

/* ---- random values and PKCE -------------------------------------------- */

START_TEST(random_tokens)
{
    unsigned char a[32], b[32], zero[32] = {0};
    char *t1 = mso_random_token(pool, 32), *t2 = mso_random_token(pool, 32);
    char *t3 = mso_random_token(pool, 16);

    ck_assert_ptr_nonnull(t1);
    ck_assert_ptr_nonnull(t2);
    ck_assert_ptr_nonnull(t3);
    ck_assert_uint_eq(strlen(t1), 43);
    ck_assert_uint_eq(strlen(t2), 43);
    ck_assert_uint_eq(strlen(t3), 22);
    ck_assert_str_ne(t1, t2);
    ck_assert_str_eq(mso_random_token(pool, 0), "");

    ck_assert_int_eq(mso_random_bytes(a, sizeof(a)), APR_SUCCESS);
    ck_assert_int_eq(mso_random_bytes(b, sizeof(b)), APR_SUCCESS);
    ck_assert_int_ne(memcmp(a, b, sizeof(a)), 0);
    ck_assert_int_ne(memcmp(a, zero, sizeof(a)), 0);
}
END_TEST

/* A thread that draws random bytes, lets OpenSSL's state of it go, and
 * draws again (the state is made anew); under ASan nothing is freed twice
 * or left behind when the thread then exits. */
static void *APR_THREAD_FUNC draw_twice(apr_thread_t *t, void *data)
{
    unsigned char *out = data;
    apr_status_t rv = mso_random_bytes(out, 16);

    mso_crypto_thread_done();
    if (rv == APR_SUCCESS) {
        rv = mso_random_bytes(out + 16, 16);
    }
    mso_crypto_thread_done();
    apr_thread_exit(t, rv);
    return NULL;
}

START_TEST(random_after_thread_done)
{
    unsigned char out[32], zero[16] = {0};
    apr_thread_t *t;
    apr_status_t rv = APR_EGENERAL;

    memset(out, 0, sizeof(out));
    ck_assert_int_eq(apr_thread_create(&t, NULL, draw_twice, out, pool), APR_SUCCESS);
    ck_assert_int_eq(apr_thread_join(&rv, t), APR_SUCCESS);
    ck_assert_int_eq(rv, APR_SUCCESS);
    ck_assert_int_ne(memcmp(out, zero, 16), 0);
    ck_assert_int_ne(memcmp(out + 16, zero, 16), 0);
    ck_assert_int_ne(memcmp(out, out + 16, 16), 0);
    /* And in this thread, after the other one's went. */
    ck_assert_int_eq(mso_random_bytes(out, 16), APR_SUCCESS);
}
END_TEST

START_TEST(pkce)
{
    /* RFC 7636 Appendix B. */
    ck_assert_str_eq(mso_pkce_s256(pool, "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
                     "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
    ck_assert_str_ne(mso_pkce_s256(pool, "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXl"),
                     "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
    /* SHA-256 of "": e3b0c442...b855. */
    ck_assert_str_eq(mso_pkce_s256(pool, ""), "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU");
    ck_assert_uint_eq(strlen(mso_pkce_s256(pool, "")), 43);
    ck_assert_ptr_null(mso_pkce_s256(pool, NULL));
}
END_TEST

START_TEST(str_equal_ct)
{
    ck_assert(mso_str_equal_ct("abc", "abc"));
    ck_assert(mso_str_equal_ct("", ""));
    ck_assert(!mso_str_equal_ct("abc", "abd"));
    ck_assert(!mso_str_equal_ct("abc", "ab"));
    ck_assert(!mso_str_equal_ct("ab", "abc"));
    ck_assert(!mso_str_equal_ct("", "a"));
    ck_assert(!mso_str_equal_ct(NULL, "a"));
    ck_assert(!mso_str_equal_ct("a", NULL));
    ck_assert(!mso_str_equal_ct(NULL, NULL));
}
END_TEST

/* ---- key parsing -------------------------------------------------------- */

/* True when why repeats any 8-byte run of the key file's content. */
static int leaks(const char *why, const unsigned char *data, size_t len)
{
    size_t i;

    for (i = 0; i + 8 <= len; i++) {
        if (memmem(why, strlen(why), data + i, 8)) {
            return 1;
        }
    }
    return 0;
}

static void expect_reject(const unsigned char *data, size_t len, const char *label)
{
    unsigned char key[MSO_KEY_LEN];
    const char *why = NULL;

    ck_assert_msg(mso_key_parse(data, len, key, &why) == APR_EINVAL, "accepted %s", label);
    ck_assert_msg(why && *why, "no reason for %s", label);
    ck_assert_msg(strstr(why, "openssl rand -hex 32") != NULL, "no fix in: %s", why);
    ck_assert_msg(!leaks(why, data, len), "key material in: %s", why);
}

START_TEST(key_parse_good)
{
    unsigned char want[MSO_KEY_LEN], key[MSO_KEY_LEN];
    const char *why = "unset";
    char hex[2 * MSO_KEY_LEN + 2], *s;
    int i;

    for (i = 0; i < MSO_KEY_LEN; i++) {
        want[i] = (unsigned char)(0xf0 + i * 13);
    }
    want[0] = 0xfb;             /* puts '+' and '/' into the standard form */
    want[1] = 0xff;
    want[2] = 0xbf;
    want[31] = '\n';            /* raw keys are not trimmed */

    memset(key, 0, sizeof(key));
    ck_assert_int_eq(mso_key_parse(want, MSO_KEY_LEN, key, &why), APR_SUCCESS);
    ck_assert_int_eq(memcmp(key, want, MSO_KEY_LEN), 0);

    for (i = 0; i < MSO_KEY_LEN; i++) {
        sprintf(hex + 2 * i, "%02x", want[i]);
    }
    strcat(hex, "\n");
    memset(key, 0, sizeof(key));
    ck_assert_int_eq(mso_key_parse((unsigned char *)hex, strlen(hex), key, &why), APR_SUCCESS);
    ck_assert_int_eq(memcmp(key, want, MSO_KEY_LEN), 0);

    s = apr_pstrdup(pool, hex);
    for (i = 0; s[i]; i++) {
        if (s[i] >= 'a' && s[i] <= 'f') {
            s[i] = (char)(s[i] - 'a' + 'A');
        }
    }
    s = apr_pstrcat(pool, " \t", s, "\r\n\n", NULL);
    memset(key, 0, sizeof(key));
    ck_assert_int_eq(mso_key_parse((unsigned char *)s, strlen(s), key, &why), APR_SUCCESS);
    ck_assert_int_eq(memcmp(key, want, MSO_KEY_LEN), 0);

    s = apr_pstrcat(pool, std_b64(want, MSO_KEY_LEN), "\n", NULL);
    ck_assert_ptr_nonnull(strchr(s, '+'));
    ck_assert_ptr_nonnull(strchr(s, '/'));
    ck_assert_ptr_nonnull(strchr(s, '='));
    memset(key, 0, sizeof(key));
    ck_assert_int_eq(mso_key_parse((unsigned char *)s, strlen(s), key, &why), APR_SUCCESS);
    ck_assert_int_eq(memcmp(key, want, MSO_KEY_LEN), 0);

    s = url_b64(want, MSO_KEY_LEN);
    ck_assert_uint_eq(strlen(s), 43);
    ck_assert_ptr_nonnull(strchr(s, '-'));
    memset(key, 0, sizeof(key));
    ck_assert_int_eq(mso_key_parse((unsigned char *)s, strlen(s), key, &why), APR_SUCCESS);
    ck_assert_int_eq(memcmp(key, want, MSO_KEY_LEN), 0);
}
END_TEST

START_TEST(key_parse_bad)
{
    unsigned char raw[40];
    char hex[80], *s;
    int i;

    for (i = 0; i < (int)sizeof(raw); i++) {
        raw[i] = (unsigned char)(0x80 + i * 3);
    }
    expect_reject(raw, 31, "31 raw bytes");
    expect_reject(raw, 33, "33 raw bytes");
    expect_reject(raw, 0, "nothing");
    expect_reject((const unsigned char *)"  \n\t ", 5, "white space");

    for (i = 0; i < 32; i++) {
        sprintf(hex + 2 * i, "%02x", raw[i]);
    }
    hex[63] = '\0';
    expect_reject((unsigned char *)hex, 63, "63 hex digits");
    s = apr_pstrcat(pool, hex, "a\n", NULL);
    ck_assert_uint_eq(strlen(s), 65);
    s[63] = 'g';                /* 64 characters, one of them not hex */
    expect_reject((unsigned char *)s, 65, "64 characters, not all hex");
    s = apr_pstrcat(pool, hex, "a0\n", NULL);
    expect_reject((unsigned char *)s, strlen(s), "65 hex digits");

    s = std_b64(raw, 31);
    expect_reject((unsigned char *)s, strlen(s), "base64 of 31 bytes");
    s = std_b64(raw, 33);
    expect_reject((unsigned char *)s, strlen(s), "base64 of 33 bytes");
    s = url_b64(raw, 32);
    s[10] = '*';
    expect_reject((unsigned char *)s, strlen(s), "base64 with a foreign character");
    s = apr_pstrcat(pool, "key = ", hex, "a", NULL);
    expect_reject((unsigned char *)s, strlen(s), "garbage");
    expect_reject((const unsigned char *)"correct horse battery staple, but not quite 32",
                  46, "a passphrase");
}
END_TEST

/* ---- key files ---------------------------------------------------------- */

static char *temp_dir(void)
{
    char *dir = apr_pstrdup(pool, "/tmp/mso_crypto_test.XXXXXX");

    ck_assert_ptr_nonnull(mkdtemp(dir));
    return dir;
}

static char *write_file(const char *dir, const char *name, const void *data, size_t len)
{
    char *path = apr_pstrcat(pool, dir, "/", name, NULL);
    FILE *f = fopen(path, "wb");

    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(data, 1, len, f), len);
    ck_assert_int_eq(fclose(f), 0);
    chmod(path, 0600);
    return path;
}

START_TEST(key_read_file)
{
    static const char good[] =
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n";
    char *dir = temp_dir(), *path, *big;
    unsigned char key[MSO_KEY_LEN];
    const char *why;
    int i;

    path = write_file(dir, "good.key", good, strlen(good));
    why = "unset";
    ck_assert_int_eq(mso_key_read_file(pool, path, key, &why), APR_SUCCESS);
    for (i = 0; i < MSO_KEY_LEN; i++) {
        ck_assert_int_eq(key[i], i);
    }

    /* Missing. */
    why = NULL;
    path = apr_pstrcat(pool, dir, "/missing.key", NULL);
    ck_assert_int_ne(mso_key_read_file(pool, path, key, &why), APR_SUCCESS);
    ck_assert_ptr_nonnull(why);
    ck_assert_ptr_nonnull(strstr(why, path));
    ck_assert_ptr_nonnull(strstr(why, "not found"));
    ck_assert_ptr_nonnull(strstr(why, "openssl rand -hex 32 >"));

    /* A directory fails for everyone, root included. */
    why = NULL;
    ck_assert_int_ne(mso_key_read_file(pool, dir, key, &why), APR_SUCCESS);
    ck_assert_ptr_nonnull(why);
    ck_assert_ptr_nonnull(strstr(why, dir));
    ck_assert_ptr_nonnull(strstr(why, "directory"));

    /* Unreadable: root reads it anyway, so only others can check this. */
    path = write_file(dir, "locked.key", good, strlen(good));
    chmod(path, 0);
    why = NULL;
    if (geteuid() != 0) {
        ck_assert_int_ne(mso_key_read_file(pool, path, key, &why), APR_SUCCESS);
        ck_assert_ptr_nonnull(why);
        ck_assert_ptr_nonnull(strstr(why, path));
        ck_assert_ptr_nonnull(strstr(why, "permission denied"));
    }
    unlink(path);

    /* Wrong size: the message names the path and what was found, not the key. */
    path = write_file(dir, "short.key", good, 63);
    why = NULL;
    ck_assert_int_eq(mso_key_read_file(pool, path, key, &why), APR_EINVAL);
    ck_assert_ptr_nonnull(why);
    ck_assert_ptr_nonnull(strstr(why, path));
    ck_assert_ptr_nonnull(strstr(why, "63 hex digits"));
    ck_assert_msg(!leaks(why, (const unsigned char *)good, 63), "key material in: %s", why);
    unlink(path);

    path = write_file(dir, "text.key", "not a key at all\n", 17);
    why = NULL;
    ck_assert_int_eq(mso_key_read_file(pool, path, key, &why), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "16 bytes of text"));
    ck_assert_ptr_null(strstr(why, "not a key at all"));
    unlink(path);

    path = write_file(dir, "empty.key", "", 0);
    why = NULL;
    ck_assert_int_eq(mso_key_read_file(pool, path, key, &why), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "empty"));
    unlink(path);

    big = apr_palloc(pool, 5000);
    memset(big, 'a', 5000);
    path = write_file(dir, "big.key", big, 5000);
    why = NULL;
    ck_assert_int_eq(mso_key_read_file(pool, path, key, &why), APR_EINVAL);
    ck_assert_ptr_nonnull(strstr(why, "too large"));
    ck_assert_ptr_nonnull(strstr(why, path));
    unlink(path);

    unlink(apr_pstrcat(pool, dir, "/good.key", NULL));
    ck_assert_int_eq(rmdir(dir), 0);
}
END_TEST

/* ---- key ring ------------------------------------------------------------ */

START_TEST(keyring_basics)
{
    mso_keyring_t *kr = mso_keyring_create(pool), *other = mso_keyring_create(pool);
    unsigned char key[MSO_KEY_LEN];
    const char *kid0;
    int i;

    ck_assert_int_eq(mso_keyring_count(kr), 0);
    ck_assert_ptr_null(mso_keyring_kid(kr, 0));
    for (i = 0; i < MSO_KEYRING_MAX; i++) {
        fill_key(key, (unsigned char)(i + 1));
        ck_assert_int_eq(mso_keyring_add(kr, key), APR_SUCCESS);
        ck_assert_int_eq(mso_keyring_count(kr), i + 1);
    }
    fill_key(key, 3);
    ck_assert_int_eq(mso_keyring_add(kr, key), APR_EEXIST);
    fill_key(key, 100);
    ck_assert_int_eq(mso_keyring_add(kr, key), APR_ENOSPC);
    ck_assert_int_eq(mso_keyring_count(kr), MSO_KEYRING_MAX);

    kid0 = mso_keyring_kid(kr, 0);
    ck_assert_ptr_nonnull(kid0);
    ck_assert_uint_eq(strlen(kid0), 8);
    ck_assert_uint_eq(strspn(kid0, "0123456789abcdef"), 8);
    for (i = 1; i < MSO_KEYRING_MAX; i++) {
        ck_assert_str_ne(mso_keyring_kid(kr, i), kid0);
    }
    ck_assert_ptr_null(mso_keyring_kid(kr, MSO_KEYRING_MAX));
    ck_assert_ptr_null(mso_keyring_kid(kr, -1));

    /* The kid depends on the key alone, and does not show the key. */
    fill_key(key, 1);
    ck_assert_int_eq(mso_keyring_add(other, key), APR_SUCCESS);
    ck_assert_str_eq(mso_keyring_kid(other, 0), kid0);
    {
        char head[9];

        sprintf(head, "%02x%02x%02x%02x", key[0], key[1], key[2], key[3]);
        ck_assert_str_ne(kid0, head);
    }
}
END_TEST

START_TEST(duplicate_key)
{
    mso_keyring_t *kr = mso_keyring_create(pool);
    unsigned char key[MSO_KEY_LEN];

    fill_key(key, 9);
    ck_assert_int_eq(mso_keyring_add(kr, key), APR_SUCCESS);
    ck_assert_int_eq(mso_keyring_add(kr, key), APR_EEXIST);
    ck_assert_int_eq(mso_keyring_count(kr), 1);
}
END_TEST

/* ---- seal and open -------------------------------------------------------- */

START_TEST(seal_round_trip)
{
    mso_keyring_t *kr = ring_of(1, 0);
    const char *sealed, *sealed2;
    unsigned char *plain, *big;
    apr_size_t len;

    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_TOKEN, "acct:42", "", 0, &sealed),
                     APR_SUCCESS);
    ck_assert_uint_eq(strlen(sealed), (33 * 4 + 2) / 3);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "acct:42", sealed, &plain, &len),
                     APR_SUCCESS);
    ck_assert_uint_eq(len, 0);
    ck_assert_int_eq(plain[0], '\0');

    big = apr_palloc(pool, 10240);
    ck_assert_int_eq(mso_random_bytes(big, 10240), APR_SUCCESS);
    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_STATE, "", big, 10240, &sealed),
                     APR_SUCCESS);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_STATE, "", sealed, &plain, &len),
                     APR_SUCCESS);
    ck_assert_uint_eq(len, 10240);
    ck_assert_int_eq(memcmp(plain, big, 10240), 0);
    ck_assert_int_eq(plain[10240], '\0');
    /* NULL aad and "" are the same context. */
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_STATE, NULL, sealed, &plain, &len),
                     APR_SUCCESS);

    /* The sealed text is base64url and hides the plaintext. */
    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_TOKEN, "a", "refresh-token-secret", 20,
                              &sealed), APR_SUCCESS);
    ck_assert_uint_eq(strspn(sealed, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                     "0123456789-_"), strlen(sealed));
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "a", sealed, &plain, &len),
                     APR_SUCCESS);
    ck_assert_str_eq((const char *)plain, "refresh-token-secret");

    /* Same plaintext twice: fresh nonce, different blobs, both open. */
    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_TOKEN, "a", "refresh-token-secret", 20,
                              &sealed2), APR_SUCCESS);
    ck_assert_str_ne(sealed, sealed2);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "a", sealed2, &plain, &len),
                     APR_SUCCESS);
    ck_assert_str_eq((const char *)plain, "refresh-token-secret");
}
END_TEST

START_TEST(seal_tamper)
{
    mso_keyring_t *kr = ring_of(1, 0);
    const char *sealed;
    unsigned char *blob, *plain, *copy;
    apr_size_t len, blob_len, i;
    int bit;

    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_TOKEN, "acct:7", "hello", 5, &sealed),
                     APR_SUCCESS);
    ck_assert_int_eq(mso_b64url_decode(pool, sealed, &blob, &blob_len), APR_SUCCESS);
    ck_assert_uint_eq(blob_len, 1 + 4 + 12 + 5 + 16);
    ck_assert_int_eq(blob[0], 1);
    copy = apr_palloc(pool, blob_len + 1);

    for (i = 0; i < blob_len; i++) {
        for (bit = 0; bit < 8; bit++) {
            memcpy(copy, blob, blob_len);
            copy[i] ^= (unsigned char)(1u << bit);
            plain = (unsigned char *)"x";
            ck_assert_msg(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "acct:7",
                                   mso_b64url_encode(pool, copy, blob_len), &plain, &len)
                          == APR_EINVAL, "byte %u bit %d flipped and still opened",
                          (unsigned)i, bit);
            ck_assert_ptr_null(plain);
            ck_assert_uint_eq(len, 0);
        }
    }
    /* Cut short or lengthened. */
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "acct:7",
                              mso_b64url_encode(pool, blob, blob_len - 1), &plain, &len),
                     APR_EINVAL);
    memcpy(copy, blob, blob_len);
    copy[blob_len] = 0;
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "acct:7",
                              mso_b64url_encode(pool, copy, blob_len + 1), &plain, &len),
                     APR_EINVAL);
    /* The untouched blob still opens: the failures above are the tampering. */
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "acct:7",
                              mso_b64url_encode(pool, blob, blob_len), &plain, &len),
                     APR_SUCCESS);
    ck_assert_str_eq((const char *)plain, "hello");
}
END_TEST

START_TEST(seal_context)
{
    mso_keyring_t *kr = ring_of(1, 0);
    const char *sealed;
    unsigned char *plain;
    apr_size_t len;

    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_TOKEN, "acct:42", "tok", 3, &sealed),
                     APR_SUCCESS);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "acct:43", sealed, &plain, &len),
                     APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "acct:4", sealed, &plain, &len),
                     APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", sealed, &plain, &len),
                     APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_STATE, "acct:42", sealed, &plain, &len),
                     APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, kr, (mso_purpose_e)3, "acct:42", sealed, &plain, &len),
                     APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "acct:42", sealed, &plain, &len),
                     APR_SUCCESS);
    ck_assert_str_eq((const char *)plain, "tok");

    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_STATE, "", "st", 2, &sealed), APR_SUCCESS);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", sealed, &plain, &len),
                     APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_STATE, "", sealed, &plain, &len),
                     APR_SUCCESS);

    /* Sealing needs a key and a known purpose. */
    ck_assert_int_eq(mso_seal(pool, mso_keyring_create(pool), MSO_PURPOSE_TOKEN, "", "x", 1,
                              &sealed), APR_EINVAL);
    ck_assert_ptr_null(sealed);
    ck_assert_int_eq(mso_seal(pool, kr, (mso_purpose_e)0, "", "x", 1, &sealed), APR_EINVAL);
}
END_TEST

START_TEST(key_rotation)
{
    mso_keyring_t *a = ring_of(1, 0), *b = ring_of(2, 1), *c = ring_of(1, 0);
    const char *by_k1, *by_k2;
    unsigned char *plain;
    apr_size_t len;

    ck_assert_str_eq(mso_keyring_kid(b, 1), mso_keyring_kid(a, 0));
    ck_assert_int_eq(mso_seal(pool, a, MSO_PURPOSE_TOKEN, "acct:1", "old", 3, &by_k1),
                     APR_SUCCESS);
    ck_assert_int_eq(mso_open(pool, b, MSO_PURPOSE_TOKEN, "acct:1", by_k1, &plain, &len),
                     APR_SUCCESS);
    ck_assert_str_eq((const char *)plain, "old");

    ck_assert_int_eq(mso_seal(pool, b, MSO_PURPOSE_TOKEN, "acct:1", "new", 3, &by_k2),
                     APR_SUCCESS);
    ck_assert_int_eq(mso_open(pool, b, MSO_PURPOSE_TOKEN, "acct:1", by_k2, &plain, &len),
                     APR_SUCCESS);
    ck_assert_str_eq((const char *)plain, "new");
    ck_assert_int_eq(mso_open(pool, c, MSO_PURPOSE_TOKEN, "acct:1", by_k2, &plain, &len),
                     APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, c, MSO_PURPOSE_TOKEN, "acct:1", by_k1, &plain, &len),
                     APR_SUCCESS);
}
END_TEST

START_TEST(open_hostile)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    mso_keyring_t *kr = ring_of(1, 0);
    unsigned char rnd[2000], blob[64], *plain;
    char junk[2001];
    const char *sealed;
    apr_size_t len, n;
    int round, i;

    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", "", &plain, &len), APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", "a", &plain, &len), APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", "AAAA", &plain, &len),
                     APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", NULL, &plain, &len), APR_EINVAL);
    ck_assert_int_eq(mso_open(pool, NULL, MSO_PURPOSE_TOKEN, "", "AAAA", &plain, &len),
                     APR_EINVAL);

    for (round = 0; round < 50; round++) {
        ck_assert_int_eq(mso_random_bytes(rnd, sizeof(rnd)), APR_SUCCESS);
        /* Any bytes but NUL, then only base64url characters (these decode). */
        for (i = 0; i < 2000; i++) {
            junk[i] = (char)(rnd[i] ? rnd[i] : 1);
        }
        junk[2000] = '\0';
        ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", junk, &plain, &len),
                         APR_EINVAL);
        for (i = 0; i < 2000; i++) {
            junk[i] = alphabet[rnd[i] & 63];
        }
        ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", junk, &plain, &len),
                         APR_EINVAL);
        junk[1 + round] = '\0';
        ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", junk, &plain, &len),
                         APR_EINVAL);
    }

    /* Right version and kid but forged contents: the tag check is what stops it. */
    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_TOKEN, "", "x", 1, &sealed), APR_SUCCESS);
    ck_assert_int_eq(mso_b64url_decode(pool, sealed, &plain, &len), APR_SUCCESS);
    memcpy(blob, plain, 5);
    for (n = 5; n <= sizeof(blob); n++) {
        ck_assert_int_eq(mso_random_bytes(blob + 5, n - 5), APR_SUCCESS);
        ck_assert_msg(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", mso_b64url_encode(pool, blob, n),
                               &plain, &len) == APR_EINVAL, "forged blob of %u bytes opened",
                      (unsigned)n);
    }
    /* Wrong version byte on an otherwise valid blob. */
    ck_assert_int_eq(mso_b64url_decode(pool, sealed, &plain, &len), APR_SUCCESS);
    plain[0] = 2;
    ck_assert_int_eq(mso_open(pool, kr, MSO_PURPOSE_TOKEN, "", mso_b64url_encode(pool, plain, len),
                              &plain, &len), APR_EINVAL);
}
END_TEST

/* ---- form tokens and key ids --------------------------------------------- */

START_TEST(csrf_tokens)
{
    mso_keyring_t *old = ring_of(1, 0), *rotated = ring_of(2, 1), *other = ring_of(3, 0);
    const char *t = mso_csrf_token(pool, old, "session-a");

    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(strlen(t), 43);                   /* 32 bytes, base64url */
    ck_assert_str_eq(t, mso_csrf_token(pool, old, "session-a"));
    ck_assert_str_ne(t, mso_csrf_token(pool, old, "session-b"));
    ck_assert(mso_csrf_check(pool, old, "session-a", t));
    ck_assert(!mso_csrf_check(pool, old, "session-b", t));
    ck_assert(!mso_csrf_check(pool, other, "session-a", t));
    /* A page opened before the new key was put first still posts. */
    ck_assert(mso_csrf_check(pool, rotated, "session-a", t));
    ck_assert_str_ne(mso_csrf_token(pool, rotated, "session-a"), t);
    /* Not the token key's MAC, nor anything without a session or token. */
    ck_assert(!mso_csrf_check(pool, old, "session-a", ""));
    ck_assert(!mso_csrf_check(pool, old, "", t));
    ck_assert(!mso_csrf_check(pool, old, NULL, t));
    ck_assert(!mso_csrf_check(pool, old, "session-a", NULL));
    ck_assert_ptr_null(mso_csrf_token(pool, old, ""));
    ck_assert_ptr_null(mso_csrf_token(pool, mso_keyring_create(pool), "session-a"));
    {
        char *bad = apr_pstrdup(pool, t);

        bad[5] = bad[5] == 'A' ? 'B' : 'A';
        ck_assert(!mso_csrf_check(pool, old, "session-a", bad));
    }
}
END_TEST

START_TEST(sealed_kid)
{
    mso_keyring_t *kr = ring_of(2, 1);
    const char *sealed = NULL;

    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_TOKEN, "aad", "x", 1, &sealed),
                     APR_SUCCESS);
    ck_assert_str_eq(mso_sealed_kid(pool, sealed), mso_keyring_kid(kr, 0));
    ck_assert_str_eq(mso_sealed_kid(pool, sealed), mso_keyring_kid(ring_of(2, 0), 0));
    ck_assert_ptr_null(mso_sealed_kid(pool, "not a blob"));
    ck_assert_ptr_null(mso_sealed_kid(pool, "AAAA"));
    ck_assert_ptr_null(mso_sealed_kid(pool, NULL));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("crypto");
    TCase *tc_b64 = tcase_create("base64url");
    TCase *tc_rand = tcase_create("random");
    TCase *tc_key = tcase_create("keys");
    TCase *tc_seal = tcase_create("seal");
    int failed;

    apr_initialize();

    tcase_add_checked_fixture(tc_b64, setup, teardown);
    tcase_add_test(tc_b64, b64url_vectors);
    tcase_add_test(tc_b64, b64url_round_trip);
    tcase_add_test(tc_b64, b64url_rejects);
    suite_add_tcase(s, tc_b64);

    tcase_add_checked_fixture(tc_rand, setup, teardown);
    tcase_add_test(tc_rand, random_tokens);
    tcase_add_test(tc_rand, random_after_thread_done);
    tcase_add_test(tc_rand, pkce);
    tcase_add_test(tc_rand, str_equal_ct);
    suite_add_tcase(s, tc_rand);

    tcase_add_checked_fixture(tc_key, setup, teardown);
    tcase_add_test(tc_key, key_parse_good);
    tcase_add_test(tc_key, key_parse_bad);
    tcase_add_test(tc_key, key_read_file);
    tcase_add_test(tc_key, keyring_basics);
    tcase_add_test(tc_key, duplicate_key);
    suite_add_tcase(s, tc_key);

    tcase_add_checked_fixture(tc_seal, setup, teardown);
    tcase_add_test(tc_seal, seal_round_trip);
    tcase_add_test(tc_seal, seal_tamper);
    tcase_add_test(tc_seal, seal_context);
    tcase_add_test(tc_seal, key_rotation);
    tcase_add_test(tc_seal, open_hostile);
    tcase_add_test(tc_seal, csrf_tokens);
    tcase_add_test(tc_seal, sealed_kid);
    suite_add_tcase(s, tc_seal);

    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
