/* Key files (lib/mso_crypto): mso_key_parse of the input as the content of a
 * key file, and mso_key_read_file of the same bytes written to a file.
 * Invariants: a key is accepted only in one of the three documented forms and
 * is exactly what that form says (raw bytes as they are, hex digits, base64 of
 * 32 bytes); a refusal leaves no key material behind and gives a reason; the
 * file reader and the parser agree on every input the reader accepts in size. */
#include <unistd.h>

#include "fuzz_common.h"
#include "mso_crypto.h"

static char *dir, *path;

static void remove_dir(void)
{
    unlink(path);
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char tmpl[] = "/tmp/mso-fuzz-key.XXXXXX";

    fuzz_init();
    if (!mkdtemp(tmpl)) {
        perror("mkdtemp");
        abort();
    }
    dir = apr_pstrdup(fuzz_root, tmpl);
    path = apr_pstrcat(fuzz_root, dir, "/msoauth.key", NULL);
    atexit(remove_dir);
    return 0;
}

static int is_ws(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static int hexv(unsigned char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* The key a text form stands for, computed independently of lib/. */
static int expected_key(apr_pool_t *p, const uint8_t *d, size_t n, unsigned char key[32])
{
    size_t s = 0, e = n, i;
    char *t;
    unsigned char *dec;
    apr_size_t declen;

    if (n == 32) {
        memcpy(key, d, 32);
        return 1;
    }
    while (s < e && is_ws(d[s])) {
        s++;
    }
    while (e > s && is_ws(d[e - 1])) {
        e--;
    }
    if (e - s == 64) {
        for (i = 0; i < 64 && hexv(d[s + i]) >= 0; i++) {
        }
        if (i == 64) {
            for (i = 0; i < 32; i++) {
                key[i] = (unsigned char)(hexv(d[s + 2 * i]) << 4 | hexv(d[s + 2 * i + 1]));
            }
            return 1;
        }
    }
    /* base64, either alphabet: map to base64url and use the strict decoder,
     * which lib/ tests on its own (fuzz_b64url). */
    t = apr_pstrmemdup(p, (const char *)d + s, e - s);
    for (i = 0; t[i]; i++) {
        if (t[i] == '+') {
            t[i] = '-';
        }
        else if (t[i] == '/') {
            t[i] = '_';
        }
    }
    if (strlen(t) == e - s && mso_b64url_decode(p, t, &dec, &declen) == APR_SUCCESS
        && declen == 32) {
        memcpy(key, dec, 32);
        return 1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const unsigned char zero[32];
    apr_pool_t *p = fuzz_pool();
    unsigned char key[32], key2[32], want[32];
    const char *why = NULL, *why2 = NULL;
    apr_status_t rv, rv2;
    FILE *f;

    rv = mso_key_parse(data, size, key, &why);
    if (rv == APR_SUCCESS) {
        FUZZ_CHECK(!why, "a reason with an accepted key");
        FUZZ_CHECK(expected_key(p, data, size, want) && !memcmp(key, want, 32),
                   "accepted a key of no documented form, or read it wrong (%zu bytes)", size);
    }
    else {
        FUZZ_CHECK(why && *why && fuzz_printable(why), "a refusal without a reason");
        FUZZ_CHECK(!memcmp(key, zero, 32), "a refused key left material in the buffer");
        FUZZ_CHECK(size != 32, "32 raw bytes refused");
    }

    f = fopen(path, "wb");
    if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) {
        perror(path);
        abort();
    }
    rv2 = mso_key_read_file(p, path, key2, &why2);
    if (size <= 4096) {
        FUZZ_CHECK(rv2 == rv, "the file reader (%d) and the parser (%d) disagree", rv2, rv);
        FUZZ_CHECK(rv != APR_SUCCESS || !memcmp(key, key2, 32), "different keys from the same "
                   "bytes");
    }
    else {
        FUZZ_CHECK(rv2 != APR_SUCCESS, "a key file of %zu bytes accepted", size);
    }
    if (rv2 != APR_SUCCESS) {
        FUZZ_CHECK(why2 && strstr(why2, path), "the file reader's reason does not name the file");
        FUZZ_CHECK(!memcmp(key2, zero, 32), "a refused key file left material in the buffer");
    }
    unlink(path);
    apr_pool_destroy(p);
    return 0;
}
