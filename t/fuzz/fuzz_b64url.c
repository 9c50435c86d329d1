/* base64url (lib/mso_crypto): mso_b64url_decode of the input as text,
 * mso_b64url_encode of the input as bytes, PKCE S256 and the constant-time
 * comparison.
 * Invariants: a decode that succeeds re-encodes to the canonical input (the
 * input without its padding): one text form per blob; encode then decode
 * gives the bytes back; a PKCE challenge is 43 characters of the alphabet. */
#include "fuzz_common.h"
#include "mso_crypto.h"

static int in_alphabet(const char *s)
{
    for (; *s; s++) {
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9')
              || *s == '-' || *s == '_')) {
            return 0;
        }
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    size_t len, n;
    const char *text = fuzz_rest(p, &in, &len), *enc, *again, *ch;
    unsigned char *out, *bytes, *back;
    apr_size_t outlen, backlen;

    /* The input as text (up to its first NUL, as any C caller sees it). */
    if (mso_b64url_decode(p, text, &out, &outlen) == APR_SUCCESS) {
        n = strlen(text);
        while (n > 0 && text[n - 1] == '=') {
            n--;
        }
        FUZZ_CHECK(out != NULL && out[outlen] == '\0', "decoded data is not NUL-terminated");
        FUZZ_CHECK(outlen == n * 3 / 4, "%zu characters decoded to %zu bytes", n,
                   (size_t)outlen);
        again = mso_b64url_encode(p, out, outlen);
        FUZZ_CHECK(again && strlen(again) == n && !memcmp(again, text, n),
                   "decode accepted a non-canonical form: \"%s\" re-encodes as \"%s\"", text,
                   again);
    }
    else {
        FUZZ_CHECK(out == NULL && outlen == 0, "a failed decode left output behind");
    }

    /* The input as bytes (NULs included). */
    bytes = apr_pmemdup(p, data, size ? size : 1);
    enc = mso_b64url_encode(p, bytes, size);
    FUZZ_CHECK(enc && strlen(enc) == (size * 4 + 2) / 3 && in_alphabet(enc),
               "encoding of %zu bytes is malformed", size);
    FUZZ_CHECK(mso_b64url_decode(p, enc, &back, &backlen) == APR_SUCCESS && backlen == size
               && !memcmp(back, data, size), "encode then decode does not give the bytes back");

    ch = mso_pkce_s256(p, text);
    FUZZ_CHECK(ch && strlen(ch) == 43 && in_alphabet(ch), "PKCE challenge malformed");
    FUZZ_CHECK(mso_str_equal_ct(text, text), "a string differs from itself");
    FUZZ_CHECK(mso_str_equal_ct(text, enc) == !strcmp(text, enc),
               "constant-time comparison disagrees with strcmp");

    apr_pool_destroy(p);
    return 0;
}
