/* Checks of single configuration values (lib/mso_config). */
#include <check.h>

#include "unit.h"
#include <stdlib.h>
#include <string.h>

#include <apr_general.h>
#include <apr_strings.h>

#include "mso_config.h"

static apr_pool_t *pool;

static void setup(void)
{
    apr_pool_create(&pool, NULL);
}

static void teardown(void)
{
    apr_pool_destroy(pool);
}

START_TEST(guid)
{
    ck_assert(mso_is_guid("6731de76-14a6-49ae-97bc-6eba6914391e"));
    ck_assert(mso_is_guid("6731DE76-14A6-49AE-97BC-6EBA6914391E"));
    ck_assert(!mso_is_guid("6731de76-14a6-49ae-97bc-6eba6914391"));
    ck_assert(!mso_is_guid("6731de76-14a6-49ae-97bc-6eba6914391ef"));
    ck_assert(!mso_is_guid("6731de7614a649ae97bc6eba6914391e"));
    ck_assert(!mso_is_guid("g731de76-14a6-49ae-97bc-6eba6914391e"));
    ck_assert(!mso_is_guid(""));
    ck_assert(!mso_is_guid(NULL));
    ck_assert_ptr_null(mso_check_guid(pool, "6731de76-14a6-49ae-97bc-6eba6914391e", "x"));
    ck_assert_ptr_nonnull(strstr(mso_check_guid(pool, "abc", "Application (client) ID"),
                                 "Application (client) ID"));
    ck_assert(mso_secret_looks_like_id("0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a"));
    ck_assert(!mso_secret_looks_like_id("Zq8~abc.def_ghi-jkl"));
}
END_TEST

START_TEST(company_name)
{
    char long_name[70];

    ck_assert_ptr_null(mso_check_company_name(pool, "acme"));
    ck_assert_ptr_null(mso_check_company_name(pool, "A-b_c.9"));
    memset(long_name, 'a', 64);
    long_name[64] = '\0';
    ck_assert_ptr_null(mso_check_company_name(pool, long_name));
    long_name[64] = 'a';
    long_name[65] = '\0';
    ck_assert_ptr_nonnull(mso_check_company_name(pool, long_name));
    ck_assert_ptr_nonnull(mso_check_company_name(pool, ""));
    ck_assert_ptr_nonnull(mso_check_company_name(pool, "a b"));
    ck_assert_ptr_nonnull(mso_check_company_name(pool, "a/b"));
    ck_assert_ptr_nonnull(mso_check_company_name(pool, "caf\xc3\xa9"));
}
END_TEST

START_TEST(cloud_and_edition)
{
    mso_cloud_e c = MSO_CLOUD_GLOBAL;
    mso_edition_e e = MSO_EDITION_BASIC;

    ck_assert_ptr_null(mso_check_cloud(pool, "usgov-dod", &c));
    ck_assert_int_eq(c, MSO_CLOUD_USGOV_DOD);
    ck_assert_str_eq(mso_cloud_graph(c), "https://dod-graph.microsoft.us");
    ck_assert_str_eq(mso_cloud_authority(c), "https://login.microsoftonline.us");
    ck_assert_ptr_null(mso_check_cloud(pool, "China", &c));
    ck_assert_int_eq(c, MSO_CLOUD_CHINA);
    ck_assert_ptr_null(mso_check_cloud(pool, "global", &c));
    ck_assert_str_eq(mso_cloud_graph(c), "https://graph.microsoft.com");
    ck_assert_ptr_nonnull(mso_check_cloud(pool, "germany", &c));
    ck_assert_ptr_null(mso_check_edition(pool, "pro", &e));
    ck_assert_int_eq(e, MSO_EDITION_PRO);
    ck_assert_ptr_nonnull(mso_check_edition(pool, "premium", &e));
}
END_TEST

START_TEST(tenant)
{
    ck_assert_ptr_null(mso_check_tenant(pool, "common"));
    ck_assert_ptr_null(mso_check_tenant(pool, "organizations"));
    ck_assert_ptr_null(mso_check_tenant(pool, "consumers"));
    ck_assert_ptr_null(mso_check_tenant(pool, "8eaef023-2b34-4da1-9baa-8bc8c9d6a490"));
    ck_assert_ptr_null(mso_check_tenant(pool, "contoso.onmicrosoft.com"));
    ck_assert_ptr_nonnull(mso_check_tenant(pool, "contoso"));
    ck_assert_ptr_nonnull(mso_check_tenant(pool, "-bad.example.com"));
    ck_assert_ptr_nonnull(mso_check_tenant(pool, "bad..example.com"));
    ck_assert_ptr_nonnull(mso_check_tenant(pool, "a b.com"));
    ck_assert(!mso_tenant_is_single("common"));
    ck_assert(mso_tenant_is_single("contoso.com"));
}
END_TEST

START_TEST(base_url)
{
    ck_assert_ptr_null(mso_check_base_url(pool, "https://erp.example.com"));
    ck_assert_ptr_null(mso_check_base_url(pool, "https://erp.example.com:8443"));
    ck_assert_ptr_null(mso_check_base_url(pool, "http://localhost:8080"));
    ck_assert_ptr_null(mso_check_base_url(pool, "http://127.0.0.1:8080"));
    ck_assert_ptr_null(mso_check_base_url(pool, "http://[::1]:8080"));
    ck_assert_ptr_nonnull(strstr(mso_check_base_url(pool, "http://erp.example.com"),
                                 "https://"));
    ck_assert_ptr_nonnull(strstr(mso_check_base_url(pool, "https://erp.example.com/"),
                                 "trailing slash"));
    ck_assert_ptr_nonnull(mso_check_base_url(pool, "https://erp.example.com/app"));
    ck_assert_ptr_nonnull(mso_check_base_url(pool, "https://erp.example.com?a=b"));
    /* Bytes no link may hold (found by fuzzing: a Graph root whose links were all refused). */
    ck_assert_ptr_nonnull(mso_check_base_url(pool, "https://erp.ex ample.com"));
    ck_assert_ptr_nonnull(mso_check_service_url(pool, "https://gra\xff.microsoft.com", 1));
    ck_assert_ptr_nonnull(mso_check_service_url(pool, "https://graph.microsoft.com/\x01", 1));
    ck_assert_ptr_nonnull(mso_check_base_url(pool, "https://erp.example.com#x"));
    ck_assert_ptr_nonnull(mso_check_base_url(pool, "https://u:p@erp.example.com"));
    ck_assert_ptr_nonnull(mso_check_base_url(pool, "ftp://erp.example.com"));
    ck_assert_ptr_nonnull(mso_check_base_url(pool, "erp.example.com"));
    ck_assert_ptr_nonnull(mso_check_base_url(pool, "http://127.0.0.1.evil.com"));
    ck_assert_ptr_null(mso_check_service_url(pool, "http://127.0.0.1:9999/sim", 0));
    ck_assert_ptr_nonnull(mso_check_service_url(pool, "https://graph.microsoft.com/v1.0", 1));
    ck_assert_ptr_nonnull(mso_check_service_url(pool, "https://login.example.com/", 0));
}
END_TEST

START_TEST(loopback)
{
    ck_assert(mso_host_is_loopback("localhost"));
    ck_assert(mso_host_is_loopback("127.0.0.1"));
    ck_assert(mso_host_is_loopback("127.1.2.3"));
    ck_assert(mso_host_is_loopback("::1"));
    ck_assert(!mso_host_is_loopback("127.0.0.1.nip.io"));
    ck_assert(!mso_host_is_loopback("128.0.0.1"));
    ck_assert(mso_host_is_loopback("127.255.255.255"));
    /* Only what the resolver reads as an address (found by fuzzing). */
    ck_assert(!mso_host_is_loopback("127.-0.2.1"));
    ck_assert(!mso_host_is_loopback("127.+1.0.1"));
    ck_assert(!mso_host_is_loopback("127. 1.0.1"));
    ck_assert(!mso_host_is_loopback("127.0.0.256"));
    ck_assert(!mso_host_is_loopback("localhost.example.com"));
    ck_assert(!mso_host_is_loopback(NULL));
}
END_TEST

START_TEST(redirect_path)
{
    ck_assert_ptr_null(mso_check_redirect_path(pool, "/microsoft_outlook/confirm"));
    ck_assert_ptr_nonnull(mso_check_redirect_path(pool, "microsoft_outlook/confirm"));
    ck_assert_ptr_nonnull(mso_check_redirect_path(pool, "//evil.com/x"));
    ck_assert_ptr_nonnull(mso_check_redirect_path(pool, "/a/../b"));
    ck_assert_ptr_nonnull(mso_check_redirect_path(pool, "/a?b=c"));
    ck_assert_ptr_nonnull(mso_check_redirect_path(pool, "/a(b)"));
    ck_assert_ptr_nonnull(mso_check_redirect_path(pool, "/a b"));
}
END_TEST

START_TEST(dates)
{
    apr_time_t t = 0;

    ck_assert_ptr_null(mso_check_date(pool, "1970-01-02", &t));
    ck_assert_int_eq(apr_time_sec(t), 86400);
    ck_assert_ptr_null(mso_check_date(pool, "2000-03-01", &t));
    ck_assert_int_eq(apr_time_sec(t), 951868800);
    ck_assert_ptr_null(mso_check_date(pool, "2028-02-29", &t));
    ck_assert_ptr_nonnull(mso_check_date(pool, "2027-02-29", &t));
    ck_assert_ptr_nonnull(mso_check_date(pool, "2027-13-01", &t));
    /* Only digits between the dashes (found by fuzzing). */
    ck_assert_ptr_nonnull(mso_check_date(pool, "2027-02-\t9", &t));
    ck_assert_ptr_nonnull(mso_check_date(pool, "2027-+2-09", &t));
    ck_assert_ptr_nonnull(mso_check_date(pool, " 2027-2-09", &t));
    ck_assert_ptr_nonnull(mso_check_date(pool, "2027-1-01", &t));
    ck_assert_ptr_nonnull(mso_check_date(pool, "2027-01-01x", &t));
    ck_assert_ptr_nonnull(mso_check_date(pool, "31.12.2027", &t));
    ck_assert_int_eq(mso_days_until(apr_time_from_sec(86400 * 10), apr_time_from_sec(0)), 10);
    ck_assert_int_eq(mso_days_until(apr_time_from_sec(86400 * 10 - 1), apr_time_from_sec(0)),
                     9);
    ck_assert_int_eq(mso_days_until(apr_time_from_sec(0), apr_time_from_sec(3600)), -1);
}
END_TEST

START_TEST(folders_scopes_interval)
{
    int secs = 0;

    ck_assert_ptr_null(mso_check_folder(pool, "inbox"));
    ck_assert_ptr_null(mso_check_folder(pool, "sentitems"));
    ck_assert_ptr_nonnull(mso_check_folder(pool, "Inbox"));
    ck_assert_ptr_nonnull(mso_check_folder(pool, "my folder"));
    ck_assert_ptr_null(mso_check_scope(pool, "Mail.Send"));
    ck_assert_ptr_null(mso_check_scope(pool, "https://outlook.office.com/IMAP.AccessAsUser.All"));
    ck_assert_ptr_nonnull(mso_check_scope(pool, "https://graph.microsoft.com/.default"));
    ck_assert_ptr_nonnull(mso_check_scope(pool, "Mail\"Send"));
    ck_assert_ptr_null(mso_check_interval(pool, "60", &secs));
    ck_assert_int_eq(secs, 60);
    ck_assert_ptr_nonnull(mso_check_interval(pool, "9", &secs));
    ck_assert_ptr_nonnull(mso_check_interval(pool, "86401", &secs));
    ck_assert_ptr_nonnull(mso_check_interval(pool, "60s", &secs));
    ck_assert_ptr_nonnull(mso_check_interval(pool, "", &secs));
}
END_TEST

START_TEST(trim)
{
    char a[] = "  \t secret \r\n";
    char b[] = "   ";

    ck_assert_str_eq(mso_trim(a), "secret");
    ck_assert_str_eq(mso_trim(b), "");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("values");
    int failed;

    apr_initialize();
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, guid);
    tcase_add_test(tc, company_name);
    tcase_add_test(tc, cloud_and_edition);
    tcase_add_test(tc, tenant);
    tcase_add_test(tc, base_url);
    tcase_add_test(tc, loopback);
    tcase_add_test(tc, redirect_path);
    tcase_add_test(tc, dates);
    tcase_add_test(tc, folders_scopes_interval);
    tcase_add_test(tc, trim);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
