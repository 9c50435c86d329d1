/* Query strings (lib/mso_http, lib/mso_flow): mso_query_parse,
 * mso_url_decode, mso_check_return_to and mso_check_mailbox on the input, and
 * mso_url_encode on what they return. The whole input (up to a NUL) goes to
 * each of them, as a browser's query string or one parameter of it.
 * Invariants: what decodes re-encodes and decodes back to itself; a parsed
 * query has no empty and no repeated names, and rebuilt with mso_url_encode it
 * parses to the same table; a return_to that passes stays on this site (an
 * absolute URL made from it has our host); a mailbox that passes has one @ and
 * a dotted domain. */
#include <apr_uri.h>

#include "fuzz_common.h"
#include "mso_flow.h"
#include "mso_http.h"

typedef struct {
    apr_pool_t *p;
    apr_array_header_t *parts;
    int count;
} rebuild_t;

static int rebuild(void *baton, const char *key, const char *value)
{
    rebuild_t *r = baton;

    FUZZ_CHECK(*key, "a parameter without a name");
    APR_ARRAY_PUSH(r->parts, const char *) = apr_pstrcat(r->p, mso_url_encode(r->p, key), "=",
                                                         mso_url_encode(r->p, value), NULL);
    r->count++;
    return 1;
}

static int same(void *baton, const char *key, const char *value)
{
    apr_table_t *other = baton;

    FUZZ_CHECK(fuzz_streq(apr_table_get(other, key), value), "parameter %s changed", key);
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    const char *s = fuzz_str(p, &in), *why, *dec, *enc;
    apr_table_t *params = NULL, *again = NULL;
    size_t n = strlen(s);

    /* One component. */
    dec = mso_url_decode(p, s);
    if (dec) {
        FUZZ_CHECK(strlen(dec) <= n, "decoding made the text longer");
        enc = mso_url_encode(p, dec);
        FUZZ_CHECK(enc && fuzz_printable(enc) && !strpbrk(enc, " &=+#?/"),
                   "encoding left a reserved character: %s", enc);
        FUZZ_CHECK(fuzz_streq(mso_url_decode(p, enc), dec), "encode then decode differs");
    }
    else {
        FUZZ_CHECK(strchr(s, '%'), "refused a component without a %%-escape");
    }

    /* A whole query string. */
    why = mso_query_parse(p, s, &params);
    FUZZ_CHECK(params != NULL, "no table");
    if (!why) {
        rebuild_t r = { p, apr_array_make(p, 8, sizeof(const char *)), 0 };
        const apr_array_header_t *elts = apr_table_elts(params);
        const char *q;

        apr_table_do(rebuild, &r, params, NULL);
        q = apr_array_pstrcat(p, r.parts, '&');
        FUZZ_CHECK(!mso_query_parse(p, q, &again), "the rebuilt query is refused: %s", q);
        FUZZ_CHECK(apr_table_elts(again)->nelts == elts->nelts, "rebuilt query differs");
        apr_table_do(same, again, params, NULL);
        FUZZ_CHECK(apr_table_elts(params)->nelts <= (int)n / 2 + 1, "more parameters than text");
    }
    else {
        FUZZ_CHECK(*why, "an empty refusal");
    }

    /* Each parameter value that matters, checked on the (decoded) text. */
    {
        const char *vals[2] = { s, dec };
        int i;

        for (i = 0; i < 2; i++) {
            const char *v = vals[i];
            apr_uri_t u;

            if (!v) {
                continue;
            }
            if (!mso_check_return_to(v)) {
                const char *abs = apr_pstrcat(p, "https://erp.example.com", v, NULL);

                const unsigned char *c;

                for (c = (const unsigned char *)v; *c; c++) {
                    FUZZ_CHECK(*c > 0x20 && *c != 0x7f && *c != '\\', "return_to \"%s\" with "
                               "a space, control character or backslash accepted", v);
                }
                FUZZ_CHECK(v[0] == '/' && v[1] != '/' && v[1] != '\\' && strlen(v) <= 2048,
                           "return_to \"%s\" accepted", v);
                FUZZ_CHECK(apr_uri_parse(p, abs, &u) == APR_SUCCESS && u.hostname
                           && !strcmp(u.hostname, "erp.example.com") && !u.user,
                           "return_to \"%s\" leaves the site", v);
            }
            if (!mso_check_mailbox(v)) {
                const char *at = strchr(v, '@');

                FUZZ_CHECK(at && at > v && !strchr(at + 1, '@') && strchr(at + 1, '.')
                           && strlen(v) <= 254 && !strpbrk(v, " <>()[]\\,;:\"\r\n\t"),
                           "mailbox \"%s\" accepted", v);
            }
        }
    }
    apr_pool_destroy(p);
    return 0;
}
