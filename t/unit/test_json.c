/* Checks of the jansson helpers (lib/mso_json). */
#include <check.h>

#include "unit.h"
#include <stdlib.h>
#include <string.h>

#include <apr_general.h>
#include <apr_strings.h>

#include "mso_json.h"

static apr_pool_t *pool;

static void setup(void)
{
    apr_pool_create(&pool, NULL);
}

static void teardown(void)
{
    apr_pool_destroy(pool);
}

static json_t *parse(const char *s, const char **err)
{
    return mso_json_parse(pool, s, strlen(s), err);
}

/* "[" * n + "]" * n */
static char *nested(int n)
{
    char *s = apr_palloc(pool, 2 * n + 1);

    memset(s, '[', n);
    memset(s + n, ']', n);
    s[2 * n] = '\0';
    return s;
}

START_TEST(parse_ok)
{
    const char *err = "unset";
    const char *doc = "{\"s\":\"x\",\"i\":42,\"neg\":-7,\"big\":9007199254740993,"
                      "\"t\":true,\"f\":false,\"n\":null,\"r\":1.5,\"ri\":3.0,"
                      "\"o\":{\"k\":\"v\"},\"a\":[1,2,3]}";
    json_t *j = parse(doc, &err);
    apr_int64_t i = 0;
    int b = -1;

    ck_assert_ptr_nonnull(j);
    ck_assert_ptr_null(err);
    ck_assert_str_eq(mso_json_str(j, "s"), "x");
    ck_assert(mso_json_int(j, "i", &i));
    ck_assert_int_eq(i, 42);
    ck_assert(mso_json_int(j, "neg", &i));
    ck_assert_int_eq(i, -7);
    ck_assert(mso_json_int(j, "big", &i));
    ck_assert(i == APR_INT64_C(9007199254740993));
    ck_assert(mso_json_bool(j, "t", &b));
    ck_assert_int_eq(b, 1);
    ck_assert(mso_json_bool(j, "f", &b));
    ck_assert_int_eq(b, 0);
    ck_assert_str_eq(mso_json_str(mso_json_obj(j, "o"), "k"), "v");
    ck_assert_int_eq(json_array_size(mso_json_arr(j, "a")), 3);
    /* Arrays are also accepted at the top. */
    ck_assert_ptr_nonnull(parse("[1,2]", &err));
}
END_TEST

START_TEST(wrong_types)
{
    const char *err;
    json_t *j = parse("{\"s\":\"x\",\"i\":42,\"t\":true,\"n\":null,\"r\":1.5,\"ri\":3.0,"
                      "\"o\":{},\"a\":[],\"si\":\"5\",\"one\":1}", &err);
    apr_int64_t i = 99;
    int b = 99;

    ck_assert_ptr_nonnull(j);
    ck_assert_ptr_null(mso_json_str(j, "i"));
    ck_assert_ptr_null(mso_json_str(j, "n"));
    ck_assert_ptr_null(mso_json_str(j, "o"));
    ck_assert_ptr_null(mso_json_str(j, "missing"));
    ck_assert(!mso_json_int(j, "s", &i));
    ck_assert(!mso_json_int(j, "si", &i));
    ck_assert(!mso_json_int(j, "r", &i));
    ck_assert(!mso_json_int(j, "ri", &i));
    ck_assert(!mso_json_int(j, "t", &i));
    ck_assert(!mso_json_int(j, "missing", &i));
    ck_assert_int_eq(i, 99);
    ck_assert(!mso_json_bool(j, "one", &b));
    ck_assert(!mso_json_bool(j, "n", &b));
    ck_assert(!mso_json_bool(j, "s", &b));
    ck_assert_int_eq(b, 99);
    ck_assert_ptr_null(mso_json_obj(j, "a"));
    ck_assert_ptr_null(mso_json_obj(j, "s"));
    ck_assert_ptr_null(mso_json_arr(j, "o"));
    ck_assert_ptr_null(mso_json_arr(j, "n"));
    /* Getters on something that is not an object, or on nothing. */
    ck_assert_ptr_null(mso_json_str(mso_json_arr(j, "a"), "s"));
    ck_assert_ptr_null(mso_json_str(NULL, "s"));
    ck_assert(!mso_json_int(NULL, "i", &i));
    ck_assert(!mso_json_bool(NULL, "t", &b));
    ck_assert_ptr_null(mso_json_obj(NULL, "o"));
    ck_assert_ptr_null(mso_json_arr(NULL, "a"));
}
END_TEST

START_TEST(duplicates)
{
    const char *err = NULL;

    ck_assert_ptr_null(parse("{\"sub\":\"a\",\"sub\":\"b\"}", &err));
    ck_assert_ptr_nonnull(err);
    ck_assert_ptr_nonnull(strstr(err, "line"));
    ck_assert_ptr_null(strstr(err, "sub"));
}
END_TEST

START_TEST(depth)
{
    const char *err = NULL;

    ck_assert_ptr_null(parse(nested(10000), &err));
    ck_assert_ptr_nonnull(err);
    /* Deep objects too, under jansson's own limit but over ours. */
    err = NULL;
    ck_assert_ptr_null(parse(apr_pstrcat(pool, "{\"a\":", nested(100), "}", NULL), &err));
    ck_assert_ptr_nonnull(err);
    /* The limit itself: 64 levels pass, 65 do not. */
    err = "unset";
    ck_assert_ptr_nonnull(parse(nested(64), &err));
    ck_assert_ptr_null(err);
    ck_assert_ptr_null(parse(nested(65), &err));
    ck_assert_ptr_nonnull(err);
}
END_TEST

START_TEST(errors_do_not_echo)
{
    static const char *bad[] = {
        "{\"client_secret\": Zq8SECRETVALUExyz}",
        "{\"a\":1,\n \"Zq8SECRETVALUExyz\"}",
        "{\"a\":\"Zq8SECRETVALUExyz\"} Zq8SECRETVALUExyz",
        "{\"Zq8SECRETVALUExyz\":1,\"Zq8SECRETVALUExyz\":2}",
        "{\"a\":\"Zq8SECRETVALUExyz",
        "\"Zq8SECRETVALUExyz\"",
        "Zq8SECRETVALUExyz",
    };
    const char *err;
    apr_size_t i;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err = NULL;
        ck_assert_ptr_null(parse(bad[i], &err));
        ck_assert_ptr_nonnull(err);
        ck_assert_ptr_nonnull(strstr(err, "line"));
        ck_assert_ptr_null(strstr(err, "SECRET"));
    }
    err = NULL;
    ck_assert_ptr_null(parse("{\"a\":1,\n\"b\":x}", &err));
    ck_assert_ptr_nonnull(strstr(err, "line 2"));
    /* Invalid UTF-8 and an embedded NUL. */
    ck_assert_ptr_null(parse("{\"a\":\"\xff\"}", &err));
    ck_assert_ptr_null(parse("{\"a\":\"\\u0000\"}", &err));
    ck_assert_ptr_null(mso_json_parse(pool, "{\"a\":1}\0", 8, &err));
    ck_assert_ptr_null(mso_json_parse(pool, NULL, 0, &err));
    ck_assert_ptr_null(mso_json_parse(pool, "", 0, &err));
    ck_assert_ptr_nonnull(err);
}
END_TEST

START_TEST(too_large)
{
    apr_size_t n = MSO_JSON_MAX_SIZE + 2;
    char *buf = apr_palloc(pool, n);
    const char *err = NULL;

    /* A valid document, refused on size alone. */
    memset(buf, ' ', n);
    buf[0] = '[';
    buf[n - 1] = ']';
    ck_assert_ptr_null(mso_json_parse(pool, buf, n, &err));
    ck_assert_ptr_nonnull(err);
    /* The message names the cap that applies. */
    ck_assert_ptr_nonnull(strstr(err, apr_psprintf(pool, "larger than %d MiB",
                                                   MSO_JSON_MAX_SIZE / (1024 * 1024))));
    /* Exactly the limit is still allowed. */
    buf[n - 3] = ']';
    ck_assert_ptr_nonnull(mso_json_parse(pool, buf, n - 2, &err));
}
END_TEST

START_TEST(dump_round_trip)
{
    const char *doc = "{\"b\":[1,\"two\",{\"x\":null}],\"a\":true,\"u\":\"caf\xc3\xa9\"}";
    const char *err;
    const char *out, *again;
    json_t *j = parse(doc, &err);

    ck_assert_ptr_nonnull(j);
    out = mso_json_dump(pool, j);
    ck_assert_ptr_nonnull(out);
    /* Compact, order kept. */
    ck_assert_str_eq(out, "{\"b\":[1,\"two\",{\"x\":null}],\"a\":true,\"u\":\"caf\xc3\xa9\"}");
    again = mso_json_dump(pool, parse(out, &err));
    ck_assert_str_eq(out, again);
    ck_assert(json_equal(j, parse(again, &err)));
    ck_assert_ptr_null(mso_json_dump(pool, NULL));
}
END_TEST

START_TEST(pool_owns_result)
{
    apr_pool_t *sub;
    const char *err;
    json_t *j;

    /* Released with the subpool; ASan/LSan reports a leak otherwise. */
    apr_pool_create(&sub, pool);
    j = mso_json_parse(sub, "{\"a\":[1,2,3]}", 13, &err);
    ck_assert_ptr_nonnull(j);
    ck_assert_int_eq(j->refcount, 1);
    apr_pool_destroy(sub);
}
END_TEST

/* ---- the clip ------------------------------------------------------------ */

/* in through the clip, in two chunks split at split (or byte by byte when
 * split is (size_t)-1). */
static const char *clip(const char *in, size_t n, size_t max, size_t split, size_t *out_len)
{
    mso_json_clip_t c;
    char *out = apr_palloc(pool, MSO_JSON_CLIP_ROOM(n) + n * 32 + 1);
    size_t len = 0, i;

    mso_json_clip_init(&c, max);
    if (split == (size_t)-1) {
        for (i = 0; i < n; i++) {
            len += mso_json_clip_feed(&c, in + i, 1, out + len);
        }
    }
    else {
        len = mso_json_clip_feed(&c, in, split, out);
        len += mso_json_clip_feed(&c, in + split, n - split, out + len);
    }
    out[len] = '\0';
    if (out_len) {
        *out_len = len;
    }
    return out;
}

/* Parses clipped JSON (NUL allowed) and returns the string at key in the
 * first object found at the top level or in "n"'s array. */
static json_t *parse_nul(const char *s, size_t n)
{
    const char *err = NULL;
    json_t *j = mso_json_parse_flags(pool, s, n, JSON_ALLOW_NUL, &err);

    ck_assert_msg(j != NULL, "%s: %s", err, s);
    return j;
}

START_TEST(clip_unchanged_below_the_limit)
{
    /* Escapes, a surrogate pair, 2-, 3- and 4-byte UTF-8, nested containers. */
    const char *doc = "{\"k\":\"a\\n\\\"\\\\\\/\\u00e9\\ud83d\\ude00\xc3\xa9\xe2\x82\xac"
                      "\xf0\x9f\x98\x80 z\",\"n\":[1,-2.5e3,true,null,{\"x\":[]}],"
                      "\"e\":\"\",\"o\":{}}";
    size_t n = strlen(doc), split, len;

    for (split = 0; split <= n; split++) {
        ck_assert_str_eq(clip(doc, n, 0, split, &len), doc);
        ck_assert_str_eq(clip(doc, n, 1000, split, &len), doc);
        ck_assert_uint_eq(len, n);
    }
    ck_assert_str_eq(clip(doc, n, 1000, (size_t)-1, NULL), doc);
}
END_TEST

START_TEST(clip_cuts_between_characters)
{
    /* The same content twice: as an object member and inside an array's object. */
    const char *content = "ab\\n\\\"\\u00e9\\ud83d\\ude00\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"
                          "\\\\cd\\t\xc3\xa9";
    const char *doc = apr_psprintf(pool, "{\"k\":\"%s\",\"n\":[1,{\"x\":\"%s\"}],\"z\":7}",
                                   content, content);
    size_t cl = strlen(content), n = strlen(doc), fixed = n - 2 * cl, max, split, len;
    json_t *full = parse_nul(doc, n);
    const char *want = json_string_value(json_object_get(full, "k"));
    size_t want_len = json_string_length(json_object_get(full, "k"));

    for (max = 1; max <= cl + 2; max++) {
        for (split = 0; split <= n + 1; split++) {
            const char *out = clip(doc, n, max, split > n ? (size_t)-1 : split, &len);
            json_t *j = parse_nul(out, len);
            const json_t *k = json_object_get(j, "k");
            const json_t *x = json_object_get(json_array_get(json_object_get(j, "n"), 1), "x");
            size_t kl = json_string_length(k), kept;
            int cut = cl > max;

            ck_assert_int_eq(json_integer_value(json_object_get(j, "z")), 7);
            ck_assert_uint_eq(kl, json_string_length(x));
            ck_assert(memcmp(json_string_value(k), json_string_value(x), kl) == 0);
            if (!cut) {
                ck_assert_str_eq(out, doc);
                continue;
            }
            /* Marked, and a prefix of the real text. */
            ck_assert_msg(kl >= 1 && json_string_value(k)[kl - 1] == '\0', "max %lu",
                          (unsigned long)max);
            ck_assert_uint_lt(kl - 1, want_len);
            ck_assert(memcmp(json_string_value(k), want, kl - 1) == 0);
            /* At most max bytes of JSON text kept, and only less by what
             * the next character (at most a 12-byte pair) needs. */
            kept = (len - fixed - 2 * 6) / 2;
            ck_assert_uint_le(kept, max);
            ck_assert_uint_gt(kept + 12, max);
        }
    }
}
END_TEST

START_TEST(clip_keys_arrays_and_counts)
{
    mso_json_clip_t c;
    const char *doc = "{\"a_very_long_key\":[\"0123456789\",{\"b\":\"short\"}],\"c\":\"x\"}";
    char out[512];
    size_t len;
    json_t *j;

    mso_json_clip_init(&c, 6);
    len = mso_json_clip_feed(&c, doc, strlen(doc), out);
    out[len] = '\0';
    /* The key is cut without a marker (jansson refuses NUL in keys). */
    ck_assert_str_eq(out, "{\"a_very\":[\"012345\\u0000\",{\"b\":\"short\"}],\"c\":\"x\"}");
    ck_assert_uint_eq(c.clipped, 2);
    j = parse_nul(out, len);
    ck_assert_uint_eq(json_string_length(json_array_get(json_object_get(j, "a_very"), 0)), 7);
    /* A top-level array's strings are values. */
    ck_assert_str_eq(clip("[\"abcdefgh\"]", 12, 3, 5, NULL), "[\"abc\\u0000\"]");
}
END_TEST

START_TEST(clip_repairs_strings)
{
    static const struct {
        const char *in;
        size_t in_len;
        const char *want;
    } cases[] = {
        {"\xff", 1, "\xef\xbf\xbd"},
        {"a\xc3", 2, "a\xef\xbf\xbd"},                      /* cut short by the quote */
        {"\xc0\x80", 2, "\xef\xbf\xbd\xef\xbf\xbd"},        /* overlong */
        {"\xed\xa0\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},    /* a surrogate */
        {"\xf4\x90\x80\x80", 4, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
        {"\xe2\x82\xac\xe2\x82x", 6, "\xe2\x82\xac\xef\xbf\xbdx"},
        {"\\ud800", 6, "\xef\xbf\xbd"},                     /* lone high surrogate */
        {"\\ud800x", 7, "\xef\xbf\xbdx"},
        {"\\ud800\\n", 8, "\xef\xbf\xbd\n"},
        {"\\udc00", 6, "\xef\xbf\xbd"},                     /* lone low surrogate */
        {"\\ud800\\ud83d\\ude00", 18, "\xef\xbf\xbd\xf0\x9f\x98\x80"},
        {"\\u0000", 6, " "},                                /* NUL: only the marker is NUL */
        {"a\0b", 3, "a b"},
        {"\x01\t\n\r\x1f", 5, " \t\n\r "},                   /* raw controls */
        {"\\x", 2, "\xef\xbf\xbdx"},                        /* unknown escape */
        {"\\u12g4", 6, "\xef\xbf\xbdg4"},
        {"\\", 1, "\xef\xbf\xbd"},                          /* \" would be an escape */
    };
    size_t i, split;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *doc = apr_palloc(pool, cases[i].in_len + 16);
        size_t n, len;

        memcpy(doc, "{\"v\":\"", 6);
        memcpy(doc + 6, cases[i].in, cases[i].in_len);
        /* A lone backslash needs a character to escape the quote with. */
        n = 6 + cases[i].in_len;
        if (cases[i].in[cases[i].in_len - 1] == '\\') {
            doc[n++] = 'q';
        }
        memcpy(doc + n, "\"}", 2);
        n += 2;
        for (split = 0; split <= n + 1; split++) {
            const char *out = clip(doc, n, 0, split > n ? (size_t)-1 : split, &len);
            const char *err = NULL;
            /* Not even NUL needs allowing: the output is what jansson takes. */
            json_t *j = mso_json_parse(pool, out, len, &err);
            const char *v;

            ck_assert_msg(j != NULL, "case %lu split %lu: %s", (unsigned long)i,
                          (unsigned long)split, err);
            v = json_string_value(json_object_get(j, "v"));
            if (cases[i].in[cases[i].in_len - 1] == '\\') {
                ck_assert_str_eq(v, "\xef\xbf\xbdq");
            }
            else {
                ck_assert_msg(!strcmp(v, cases[i].want), "case %lu split %lu", (unsigned long)i,
                              (unsigned long)split);
            }
        }
    }
}
END_TEST

START_TEST(clip_leaves_the_rest_alone)
{
    /* Outside strings nothing is repaired: what is not JSON stays refused. */
    const char *bad[] = {"{\"a\":tru}", "{\"a\" 1}", "[1,]", "{\"a\":\xff}", "{\"a\":\"x\"",
                         NULL};
    const char *err;
    size_t len;
    int i;

    for (i = 0; bad[i]; i++) {
        const char *out = clip(bad[i], strlen(bad[i]), 4, 3, &len);

        ck_assert_str_eq(out, bad[i]);
        ck_assert_ptr_null(mso_json_parse_flags(pool, out, len, JSON_ALLOW_NUL, &err));
    }
}
END_TEST

typedef struct {
    const char *got[3];
    int calls;
} captured_t;

static void on_capture(void *baton, int which, const char *value, apr_size_t len)
{
    captured_t *cap = baton;

    cap->got[which] = apr_pstrmemdup(pool, value, len);
    cap->calls++;
}

START_TEST(clip_captures_top_level_members)
{
    static const char *const keys[] = {"@odata.nextLink", "z", "long", NULL};
    /* Not JSON after all (the bare word), yet the link is known. */
    const char *doc = "{\"@odata.context\":\"x\",\"value\":[{\"@odata.nextLink\":\"inner\","
                      "\"subject\": broken},{\"z\":\"deep\"}],\"@odata.nextLink\":"
                      "\"https://g/v1.0/n?a=1\",\"z\":\"\\/esc\",\"long\":"
                      "\"0123456789abcdef0123456789\",\"q\":\"https://other\"}";
    size_t n = strlen(doc), i, split;
    char *out = apr_palloc(pool, MSO_JSON_CLIP_ROOM(n));

    for (split = 0; split <= n + 1; split++) {
        mso_json_clip_t c;
        captured_t cap;

        memset(&cap, 0, sizeof(cap));
        mso_json_clip_init(&c, 20);
        c.capture = keys;
        c.on_capture = on_capture;
        c.capture_baton = &cap;
        if (split > n) {
            for (i = 0; i < n; i++) {
                mso_json_clip_feed(&c, doc + i, 1, out);
            }
        }
        else {
            mso_json_clip_feed(&c, doc, split, out);
            mso_json_clip_feed(&c, doc + split, n - split, out);
        }
        /* Only the top level's; not one with an escape, nor one cut short. */
        ck_assert_int_eq(cap.calls, 1);
        ck_assert_str_eq(cap.got[0], "https://g/v1.0/n?a=1");
        ck_assert_ptr_null(cap.got[1]);
        ck_assert_ptr_null(cap.got[2]);
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("json");
    TCase *tc = tcase_create("parse");
    int failed;

    apr_initialize();
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, parse_ok);
    tcase_add_test(tc, wrong_types);
    tcase_add_test(tc, duplicates);
    tcase_add_test(tc, depth);
    tcase_add_test(tc, errors_do_not_echo);
    tcase_add_test(tc, too_large);
    tcase_add_test(tc, dump_round_trip);
    tcase_add_test(tc, pool_owns_result);
    tcase_add_test(tc, clip_unchanged_below_the_limit);
    tcase_add_test(tc, clip_cuts_between_characters);
    tcase_add_test(tc, clip_keys_arrays_and_counts);
    tcase_add_test(tc, clip_repairs_strings);
    tcase_add_test(tc, clip_leaves_the_rest_alone);
    tcase_add_test(tc, clip_captures_top_level_members);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
