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
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
