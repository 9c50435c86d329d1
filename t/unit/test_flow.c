/* The sealed sign-in state and the checks of Connect parameters (lib/mso_flow). */
#include <check.h>

#include "unit.h"
#include <stdlib.h>
#include <string.h>

#include <apr_general.h>
#include <apr_strings.h>

#include "mso_flow.h"

static apr_pool_t *pool;
static mso_keyring_t *ring;

static void setup(void)
{
    unsigned char key[MSO_KEY_LEN];

    apr_pool_create(&pool, NULL);
    ring = mso_keyring_create(pool);
    mso_random_bytes(key, sizeof(key));
    ck_assert_int_eq(mso_keyring_add(ring, key), APR_SUCCESS);
}

static void teardown(void) { apr_pool_destroy(pool); }

START_TEST(round_trip)
{
    mso_flow_t *f = mso_flow_new(pool, "acme", "a@example.com", "/app?x=1", "admin", 1000);
    mso_flow_t *g = NULL;
    const char *v = NULL;

    ck_assert_int_ge(strlen(f->state), 43);
    ck_assert_int_ge(strlen(f->verifier), 43);
    ck_assert_int_le(strlen(f->verifier), 128);
    ck_assert_str_ne(f->state, f->nonce);
    ck_assert_int_eq(mso_flow_seal(pool, ring, f, &v), APR_SUCCESS);
    ck_assert_ptr_null(strstr(v, f->verifier));     /* sealed, not merely encoded */
    ck_assert_int_eq(mso_flow_open(pool, ring, f->state, v, 1001, &g), MSO_FLOW_VALID);
    ck_assert_str_eq(g->state, f->state);
    ck_assert_str_eq(g->nonce, f->nonce);
    ck_assert_str_eq(g->verifier, f->verifier);
    ck_assert_str_eq(g->company, "acme");
    ck_assert_str_eq(g->mailbox, "a@example.com");
    ck_assert_str_eq(g->return_to, "/app?x=1");
    ck_assert_str_eq(g->user, "admin");
    ck_assert_int_eq(g->expires, 1000 + MSO_FLOW_LIFETIME);
}
END_TEST

START_TEST(optional_fields)
{
    mso_flow_t *f = mso_flow_new(pool, "default", NULL, NULL, NULL, 50);
    mso_flow_t *g = NULL;
    const char *v = NULL;

    ck_assert_int_eq(mso_flow_seal(pool, ring, f, &v), APR_SUCCESS);
    ck_assert_int_eq(mso_flow_open(pool, ring, f->state, v, 60, &g), MSO_FLOW_VALID);
    ck_assert_ptr_null(g->mailbox);
    ck_assert_ptr_null(g->return_to);
    ck_assert_ptr_null(g->user);
}
END_TEST

/* A field JSON cannot carry is refused, never silently left out (the mailbox
 * asked for would no longer be enforced). */
START_TEST(not_utf8)
{
    const char *v = NULL;

    ck_assert_int_eq(mso_flow_seal(pool, ring, mso_flow_new(pool, "acme", "\xe9@example.com",
                                                             NULL, NULL, 50), &v), APR_EINVAL);
    ck_assert_int_eq(mso_flow_seal(pool, ring, mso_flow_new(pool, "acme", NULL, "/\xff", NULL,
                                                             50), &v), APR_EINVAL);
    ck_assert_int_eq(mso_flow_seal(pool, ring, mso_flow_new(pool, "acme", NULL, NULL,
                                                             "J\xfcrgen", 50), &v), APR_EINVAL);
    ck_assert_int_eq(mso_flow_seal(pool, ring, mso_flow_new(pool, "acme", "j\xc3\xbcrgen@ex.de",
                                                             NULL, NULL, 50), &v), APR_SUCCESS);
}
END_TEST

START_TEST(rejections)
{
    mso_flow_t *f = mso_flow_new(pool, "acme", NULL, NULL, NULL, 1000);
    mso_flow_t *other = mso_flow_new(pool, "acme", NULL, NULL, NULL, 1000);
    mso_flow_t *g = NULL;
    const char *v = NULL, *w = NULL, *x = NULL;
    char *t;
    mso_keyring_t *ring2 = mso_keyring_create(pool);
    unsigned char key[MSO_KEY_LEN];

    ck_assert_int_eq(mso_flow_seal(pool, ring, f, &v), APR_SUCCESS);
    ck_assert_int_eq(mso_flow_seal(pool, ring, other, &w), APR_SUCCESS);
    /* Another flow's cookie for this state. */
    ck_assert_int_eq(mso_flow_open(pool, ring, f->state, w, 1001, &g), MSO_FLOW_INVALID);
    /* Tampered. */
    t = apr_pstrdup(pool, v);
    t[strlen(t) / 2] = t[strlen(t) / 2] == 'A' ? 'B' : 'A';
    ck_assert_int_eq(mso_flow_open(pool, ring, f->state, t, 1001, &g), MSO_FLOW_INVALID);
    /* Expired, and the clock far behind the cookie. */
    ck_assert_int_eq(mso_flow_open(pool, ring, f->state, v, 1000 + MSO_FLOW_LIFETIME, &g),
                     MSO_FLOW_EXPIRED);
    ck_assert_int_eq(mso_flow_open(pool, ring, f->state, v, 100, &g), MSO_FLOW_EXPIRED);
    /* Times at the ends of the range (no overflow: UBSan in the ASan pass). */
    f->created = -9223372036854775807LL;
    f->expires = 9223372036854775807LL;
    ck_assert_int_eq(mso_flow_seal(pool, ring, f, &x), APR_SUCCESS);
    ck_assert_int_eq(mso_flow_open(pool, ring, f->state, x, 1001, &g), MSO_FLOW_EXPIRED);
    /* Another server's key. */
    mso_random_bytes(key, sizeof(key));
    mso_keyring_add(ring2, key);
    ck_assert_int_eq(mso_flow_open(pool, ring2, f->state, v, 1001, &g), MSO_FLOW_INVALID);
    /* Garbage. */
    ck_assert_int_eq(mso_flow_open(pool, ring, f->state, "", 1001, &g), MSO_FLOW_INVALID);
    ck_assert_int_eq(mso_flow_open(pool, ring, f->state, "!!!", 1001, &g), MSO_FLOW_INVALID);
    ck_assert_int_eq(mso_flow_open(pool, ring, NULL, v, 1001, &g), MSO_FLOW_INVALID);
}
END_TEST

START_TEST(cookie_names)
{
    const char *st = "abcdefghijklmnopqrstuvwxyz_-0123456789ABCDEFG";
    const char *n = mso_flow_cookie_name(pool, st, 1700000000);
    apr_array_header_t *cs;
    const mso_flow_cookie_t *fc;

    ck_assert_str_eq(n, "msoauth_flow_s44we8_abcdefghijklmnop");
    ck_assert_ptr_null(mso_flow_cookie_name(pool, NULL, 1));
    ck_assert_ptr_null(mso_flow_cookie_name(pool, "short", 1));
    ck_assert_ptr_null(mso_flow_cookie_name(pool, "abcdefghijklmnop; Path=/; x=y", 1));
    ck_assert_ptr_null(mso_flow_cookie_name(pool, "abcdefghijklmnop\r\nSet-Cookie: a", 1));

    cs = mso_flow_cookies(pool, "other=1; msoauth_flow_s44we9_BBBBBBBBBBBBBBBB=v2; "
                          "msoauth_flow_s44we8_abcdefghijklmnop=v1;msoauth_flow_x_short=v; "
                          "msoauth_flow_zzzzzzzzzzzzz_abcdefghijklmnop=toolong; "
                          "msoauth_flow_s44wea_bad!chars!here!!=x");
    ck_assert_int_eq(cs->nelts, 2);
    ck_assert_str_eq(APR_ARRAY_IDX(cs, 0, mso_flow_cookie_t).value, "v1");   /* oldest first */
    ck_assert_int_eq(APR_ARRAY_IDX(cs, 0, mso_flow_cookie_t).created, 1700000000);
    fc = mso_flow_cookie_for(cs, st);
    ck_assert_ptr_nonnull(fc);
    ck_assert_str_eq(fc->value, "v1");
    ck_assert_ptr_null(mso_flow_cookie_for(cs, "CCCCCCCCCCCCCCCCCCCCCCCC"));
    ck_assert_int_eq(mso_flow_cookies(pool, NULL)->nelts, 0);

    ck_assert_str_ne(mso_flow_state_digest(pool, "a-state-value-000000"), "a-state-value-000000");
    ck_assert_str_eq(mso_flow_state_digest(pool, "s1-state-value-00000"),
                     mso_flow_state_digest(pool, "s1-state-value-00000"));
}
END_TEST

START_TEST(cookie_cap)
{
    char header[4096] = "";
    apr_array_header_t *drop;
    int i;

    /* Seven in flight, one expired: the expired one and the two oldest go. */
    for (i = 0; i < 7; i++) {
        const char *name = mso_flow_cookie_name(pool, apr_psprintf(pool, "%c%s", 'a' + i,
                                                "123456789012345678"), 1000 + i * 60);
        strcat(header, apr_psprintf(pool, "%s=x; ", name));
    }
    drop = mso_flow_cookies_to_drop(pool, mso_flow_cookies(pool, header), 1000 + 601, 300);
    ck_assert_int_eq(drop->nelts, 3);
    ck_assert_ptr_nonnull(strstr(APR_ARRAY_IDX(drop, 0, const char *), "_a1234"));
    ck_assert_ptr_nonnull(strstr(APR_ARRAY_IDX(drop, 2, const char *), "_c1234"));
    drop = mso_flow_cookies_to_drop(pool, mso_flow_cookies(pool, "a=b"), 5000, 300);
    ck_assert_int_eq(drop->nelts, 0);
}
END_TEST

/* Bytes count, not only cookies: three sign-ins with long return_to values
 * must not add up to a Cookie header httpd refuses (LimitRequestFieldSize),
 * which would lock connect and confirm out until they expire. */
START_TEST(cookie_byte_budget)
{
    char *header = "";
    char *big = apr_palloc(pool, 1701);
    apr_array_header_t *drop, *cs;
    apr_size_t total = 0;
    int i;

    memset(big, 'v', 1700);
    big[1700] = '\0';
    for (i = 0; i < 3; i++) {
        const char *name = mso_flow_cookie_name(pool, apr_psprintf(pool, "%c%s", 'a' + i,
                                                "123456789012345678"), 1000 + i);
        header = apr_psprintf(pool, "%s%s=%s; ", header, name, big);
    }
    cs = mso_flow_cookies(pool, header);
    ck_assert_int_eq(cs->nelts, 3);
    /* A fourth of the same size: only the newest one fits beside it. */
    drop = mso_flow_cookies_to_drop(pool, cs, 1010, 1730);
    ck_assert_int_eq(drop->nelts, 2);
    ck_assert_ptr_nonnull(strstr(APR_ARRAY_IDX(drop, 0, const char *), "_a1234"));
    ck_assert_ptr_nonnull(strstr(APR_ARRAY_IDX(drop, 1, const char *), "_b1234"));
    for (i = 0; i < cs->nelts; i++) {
        const mso_flow_cookie_t *fc = &APR_ARRAY_IDX(cs, i, mso_flow_cookie_t);
        int dropped = 0, k;

        for (k = 0; k < drop->nelts; k++) {
            dropped |= !strcmp(APR_ARRAY_IDX(drop, k, const char *), fc->name);
        }
        if (!dropped) {
            total += strlen(fc->name) + strlen(fc->value) + 2;
        }
    }
    ck_assert_uint_le(total + 1730, MSO_FLOW_MAX_BYTES);
}
END_TEST

START_TEST(text_params)
{
    ck_assert_ptr_null(mso_check_text_param("acme"));
    ck_assert_ptr_null(mso_check_text_param("J\xc3\xbcrgen@m\xc3\xbcller.example"));
    ck_assert_ptr_null(mso_check_text_param("\xf0\x9f\x93\xa7 mail"));
    ck_assert_ptr_null(mso_check_text_param(NULL));
    ck_assert_ptr_nonnull(mso_check_text_param("a\x01b"));
    ck_assert_ptr_nonnull(mso_check_text_param("a\nb"));
    ck_assert_ptr_nonnull(mso_check_text_param("a\x7f"));
    ck_assert_ptr_nonnull(mso_check_text_param("\xc2\x85"));          /* C1 NEL */
    ck_assert_ptr_nonnull(mso_check_text_param("\xff"));
    ck_assert_ptr_nonnull(mso_check_text_param("\xc0\xaf"));          /* overlong / */
    ck_assert_ptr_nonnull(mso_check_text_param("\xe0\x80\xaf"));      /* overlong */
    ck_assert_ptr_nonnull(mso_check_text_param("\xed\xa0\x80"));      /* surrogate */
    ck_assert_ptr_nonnull(mso_check_text_param("\xf4\x90\x80\x80"));  /* > U+10FFFF */
    ck_assert_ptr_nonnull(mso_check_text_param("abc\xe2\x82"));        /* cut short */
}
END_TEST

START_TEST(return_to_checks)
{
    ck_assert_ptr_null(mso_check_return_to("/"));
    ck_assert_ptr_null(mso_check_return_to("/mail/settings?tab=outlook#top"));
    ck_assert_ptr_nonnull(mso_check_return_to("https://evil.example/"));
    ck_assert_ptr_nonnull(mso_check_return_to("//evil.example/"));
    ck_assert_ptr_nonnull(mso_check_return_to("/\\evil.example/"));
    ck_assert_ptr_nonnull(mso_check_return_to("/a\\b"));
    ck_assert_ptr_nonnull(mso_check_return_to("javascript:alert(1)"));
    ck_assert_ptr_nonnull(mso_check_return_to("mail/settings"));
    ck_assert_ptr_nonnull(mso_check_return_to("/a\r\nLocation: x"));
    ck_assert_ptr_nonnull(mso_check_return_to("/a b"));
    ck_assert_ptr_nonnull(mso_check_return_to(""));
    ck_assert_ptr_nonnull(mso_check_return_to(NULL));
}
END_TEST

START_TEST(mailbox_checks)
{
    ck_assert_ptr_null(mso_check_mailbox("someone@example.com"));
    ck_assert_ptr_null(mso_check_mailbox("first.last+tag@sub.example.co.uk"));
    ck_assert_ptr_nonnull(mso_check_mailbox("someone"));
    ck_assert_ptr_nonnull(mso_check_mailbox("@example.com"));
    ck_assert_ptr_nonnull(mso_check_mailbox("a@b@example.com"));
    ck_assert_ptr_nonnull(mso_check_mailbox("a@localhost"));
    ck_assert_ptr_nonnull(mso_check_mailbox("a b@example.com"));
    ck_assert_ptr_nonnull(mso_check_mailbox("\"a\"@example.com"));
    ck_assert_ptr_nonnull(mso_check_mailbox(NULL));
    ck_assert_str_eq(mso_lower(pool, "Some.One@Example.COM"), "some.one@example.com");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("flow");
    TCase *tc = tcase_create("flow");
    int failed;

    apr_initialize();
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, round_trip);
    tcase_add_test(tc, optional_fields);
    tcase_add_test(tc, not_utf8);
    tcase_add_test(tc, rejections);
    tcase_add_test(tc, cookie_names);
    tcase_add_test(tc, cookie_cap);
    tcase_add_test(tc, cookie_byte_budget);
    tcase_add_test(tc, text_params);
    tcase_add_test(tc, return_to_checks);
    tcase_add_test(tc, mailbox_checks);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
