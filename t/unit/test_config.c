/* Checks of single configuration values (lib/mso_config). */
#include <check.h>

#include "unit.h"
#include <stdlib.h>
#include <string.h>

#include <apr_general.h>
#include <apr_strings.h>

#include "mso_config.h"
#include "mso_settings.h"
#include "mso_log.h"

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

/* --- the inheritable settings (lib/mso_settings) --- */

/* The table covers mso_settings_t member by member, in order, without gaps:
 * a member added to the struct but not to the table fails here. */
START_TEST(settings_table_covers_struct)
{
    const mso_setting_field_t *f = mso_settings_fields();
    apr_size_t next = 0;

    for (; f->directive; f++) {
        ck_assert_msg(f->offset == next, "%s is not where the table expects it", f->directive);
        ck_assert_uint_gt(mso_setting_size(f->kind), 0);
        next = f->offset + mso_setting_size(f->kind);
    }
    ck_assert_uint_eq(next, sizeof(mso_settings_t));
}
END_TEST

/* Marks one setting given, its bytes filled with a pattern. */
static void give(mso_settings_t *s, const mso_setting_field_t *f, unsigned char pattern)
{
    char *at = (char *)s + f->offset;

    memset(at, pattern, mso_setting_size(f->kind));
    if (f->kind == MSO_SETTING_INT) {
        ((mso_setting_int_t *)at)->given = 1;
    }
    else if (f->kind == MSO_SETTING_I64) {
        ((mso_setting_i64_t *)at)->given = 1;
    }
    ck_assert(mso_setting_given(s, f));
}

/* Every setting: given at the adding level it wins as a whole; not given
 * there, the base's comes through; the other settings are untouched. */
START_TEST(settings_merge_every_field)
{
    const mso_setting_field_t *f, *g;
    mso_settings_t base, add, out;

    for (f = mso_settings_fields(); f->directive; f++) {
        mso_settings_init(&base);
        for (g = mso_settings_fields(); g->directive; g++) {
            give(&base, g, 0x11);
        }
        mso_settings_init(&add);
        ck_assert(!mso_setting_given(&add, f));
        give(&add, f, 0x22);
        memset(&out, 0x33, sizeof(out));
        mso_settings_merge(&out, &base, &add);
        for (g = mso_settings_fields(); g->directive; g++) {
            const mso_settings_t *want = g == f ? &add : &base;

            ck_assert_msg(!memcmp((char *)&out + g->offset, (const char *)want + g->offset,
                                  mso_setting_size(g->kind)),
                          "merge of %s: %s came from the wrong level", f->directive,
                          g->directive);
        }
        /* Not given at the adding level: inherited. */
        mso_settings_init(&add);
        mso_settings_merge(&out, &base, &add);
        ck_assert(!memcmp((char *)&out + f->offset, (char *)&base + f->offset,
                          mso_setting_size(f->kind)));
    }
}
END_TEST

START_TEST(settings_resolve_defaults)
{
    mso_settings_t s;
    const mso_setting_field_t *f;

    mso_settings_init(&s);
    mso_settings_resolve(pool, &s);
    for (f = mso_settings_fields(); f->directive; f++) {
        int optional = !strcmp(f->directive, "MSOAuthClientID")
                       || !strcmp(f->directive, "MSOAuthClientSecret")
                       || !strcmp(f->directive, "MSOAuthSecretExpires")
                       || !strcmp(f->directive, "MSOAuthClientCertificateFile");

        ck_assert_msg(optional || mso_setting_given(&s, f), "%s has no default", f->directive);
    }
    ck_assert_str_eq(s.tenant.value, "common");
    ck_assert_int_eq(s.cloud.value, MSO_CLOUD_GLOBAL);
    ck_assert_str_eq(s.authority_url.value, "https://login.microsoftonline.com");
    ck_assert_str_eq(s.graph_url.value, "https://graph.microsoft.com");
    ck_assert_int_eq(s.edition.value, MSO_EDITION_BASIC);
    ck_assert_int_eq(s.scopes.value->nelts, 0);
    ck_assert_str_eq(APR_ARRAY_IDX(s.folders.value, 0, const char *), "inbox");
    ck_assert_int_eq(s.sync_interval.value, 60);
    ck_assert_int_eq(s.app_only.value, 0);
    ck_assert_str_eq(s.outlook_url.value, "https://outlook.office.com");
    ck_assert_int_eq(s.attachment_max_bytes.value, 10 * 1024 * 1024);

    /* The hosts follow the cloud; given values stay. */
    mso_settings_init(&s);
    s.cloud.value = MSO_CLOUD_USGOV_DOD;
    s.cloud.given = 1;
    s.tenant.value = "contoso.com";
    mso_settings_resolve(pool, &s);
    ck_assert_str_eq(s.graph_url.value, "https://dod-graph.microsoft.us");
    ck_assert_str_eq(s.authority_url.value, "https://login.microsoftonline.us");
    ck_assert_str_eq(s.tenant.value, "contoso.com");
}
END_TEST

/* Values in log messages come from requests, Microsoft and the database. */
START_TEST(log_lines_cannot_be_forged)
{
    char m[] = "mailbox evil@x.com\r\n[error] forged\x1b[31m\x7f";

    mso_log_clean(m);
    ck_assert_str_eq(m, "mailbox evil@x.com??[error] forged?[31m?");
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
    tcase_add_test(tc, log_lines_cannot_be_forged);
    suite_add_tcase(s, tc);
    tc = tcase_create("settings");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, settings_table_covers_struct);
    tcase_add_test(tc, settings_merge_every_field);
    tcase_add_test(tc, settings_resolve_defaults);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
