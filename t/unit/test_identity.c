/* Microsoft identity platform helpers (lib/mso_identity) and reason texts. */
#include <check.h>

#include "unit.h"
#include <stdlib.h>
#include <string.h>

#include <apr_general.h>
#include <apr_strings.h>
#include <apr_tables.h>

#include "mso_identity.h"
#include "mso_reason.h"

static apr_pool_t *pool;

static void setup(void) { apr_pool_create(&pool, NULL); }
static void teardown(void) { apr_pool_destroy(pool); }

#define GRAPH "https://graph.microsoft.com"

START_TEST(scopes)
{
    apr_array_header_t *extra = apr_array_make(pool, 2, sizeof(const char *));
    const char *s;

    s = mso_signin_scopes(pool, GRAPH, 0, NULL);
    ck_assert_str_eq(s, "openid profile email offline_access https://graph.microsoft.com/Mail.Read");
    APR_ARRAY_PUSH(extra, const char *) = "Mail.Send";
    APR_ARRAY_PUSH(extra, const char *) = "https://outlook.office.com/IMAP.AccessAsUser.All";
    /* pro asks for Mail.Send itself: an MSOAuthScope Mail.Send is not doubled. */
    s = mso_signin_scopes(pool, GRAPH, 1, extra);
    ck_assert_str_eq(s, "openid profile email offline_access https://graph.microsoft.com/"
                     "Mail.ReadWrite https://graph.microsoft.com/Mail.Send "
                     "https://outlook.office.com/IMAP.AccessAsUser.All");
    ck_assert_str_eq(mso_signin_scopes(pool, GRAPH, 1, NULL),
                     "openid profile email offline_access https://graph.microsoft.com/"
                     "Mail.ReadWrite https://graph.microsoft.com/Mail.Send");
    /* basic keeps an extra Mail.Send (an administrator's choice), once. */
    ck_assert_str_eq(mso_signin_scopes(pool, GRAPH, 0, extra),
                     "openid profile email offline_access https://graph.microsoft.com/"
                     "Mail.Read Mail.Send https://outlook.office.com/IMAP.AccessAsUser.All");
    /* One resource per token request. */
    ck_assert_str_eq(mso_token_scopes(pool, s, GRAPH, "graph"),
                     "openid profile email offline_access https://graph.microsoft.com/"
                     "Mail.ReadWrite https://graph.microsoft.com/Mail.Send");
    ck_assert_str_eq(mso_token_scopes(pool, s, GRAPH, "https://outlook.office.com"),
                     "openid profile email offline_access "
                     "https://outlook.office.com/IMAP.AccessAsUser.All");
    ck_assert_str_eq(mso_authority(pool, "https://login.microsoftonline.com", "common"),
                     "https://login.microsoftonline.com/common");
}
END_TEST

START_TEST(authorize_url)
{
    mso_app_t app = {"https://login.microsoftonline.com/contoso.com",
                     "6731de76-14a6-49ae-97bc-6eba6914391e", "s3cr~et",
                     "https://erp.example.com/microsoft_outlook/confirm", NULL};
    mso_authorize_req_t req = {"st", "no", "ch", "a.b+c@example.com", "openid Mail.Read",
                               "login"};
    const char *url = mso_authorize_url(pool, &app, &req);

    ck_assert_str_eq(url, "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/authorize"
                     "?client_id=6731de76-14a6-49ae-97bc-6eba6914391e&response_type=code"
                     "&redirect_uri=https%3A%2F%2Ferp.example.com%2Fmicrosoft_outlook%2Fconfirm"
                     "&response_mode=query&scope=openid%20Mail.Read&state=st&nonce=no"
                     "&code_challenge=ch&code_challenge_method=S256"
                     "&prompt=login&login_hint=a.b%2Bc%40example.com");
    ck_assert_ptr_null(strstr(url, "s3cr"));    /* the secret never goes to the browser */
    req.login_hint = NULL;
    req.prompt = "select_account";
    url = mso_authorize_url(pool, &app, &req);
    ck_assert_ptr_null(strstr(url, "login_hint"));
    ck_assert_ptr_nonnull(strstr(url, "&prompt=select_account"));
}
END_TEST

START_TEST(aadsts_and_ids)
{
    const char *d = "AADSTS50011: The redirect URI 'x' does not match.\r\n"
                    "Trace ID: 0b8a1d2c-aaaa-bbbb-cccc-0123456789ab\r\n"
                    "Correlation ID: 11111111-2222-3333-4444-555555555555\r\nTimestamp: x";
    const char *t = NULL, *c = NULL;

    ck_assert_int_eq(mso_aadsts_of(d), 50011);
    ck_assert_int_eq(mso_aadsts_of("no code here"), 0);
    ck_assert_int_eq(mso_aadsts_of("AADSTS"), 0);
    ck_assert_int_eq(mso_aadsts_of(NULL), 0);
    mso_error_ids(pool, d, &t, &c);
    ck_assert_str_eq(t, "0b8a1d2c-aaaa-bbbb-cccc-0123456789ab");
    ck_assert_str_eq(c, "11111111-2222-3333-4444-555555555555");
    mso_error_ids(pool, "Trace ID: <script>", &t, &c);
    ck_assert_ptr_null(t);
    ck_assert_ptr_null(c);
}
END_TEST

START_TEST(reasons_for_errors)
{
    ck_assert_str_eq(mso_reason_for_error("invalid_request", 50011, 0), "redirect_uri_mismatch");
    ck_assert_str_eq(mso_reason_for_error("invalid_client", 7000215, 0), "invalid_client_secret");
    ck_assert_str_eq(mso_reason_for_error("invalid_client", 7000222, 1), "client_secret_expired");
    ck_assert_str_eq(mso_reason_for_error("invalid_client", 0, 1), "invalid_client_secret");
    ck_assert_str_eq(mso_reason_for_error("unauthorized_client", 700016, 0), "app_not_found");
    /* Client credentials on /common or /organizations; no service principal (consent). */
    ck_assert_str_eq(mso_reason_for_error("invalid_request", 9001023, 0), "wrong_tenant");
    ck_assert_str_eq(mso_reason_for_error("unauthorized_client", 7000229, 0),
                     "admin_consent_required");
    ck_assert_str_eq(mso_reason_for_error("invalid_request", 50194, 0), "wrong_tenant");
    ck_assert_str_eq(mso_reason_for_error("consent_required", 65001, 0), "consent_required");
    ck_assert_str_eq(mso_reason_for_error("access_denied", 90094, 0), "admin_consent_required");
    ck_assert_str_eq(mso_reason_for_error("access_denied", 65004, 0), "access_denied");
    ck_assert_str_eq(mso_reason_for_error("access_denied", 0, 0), "access_denied");
    ck_assert_str_eq(mso_reason_for_error("invalid_grant", 54005, 0), "state_invalid");
    ck_assert_str_eq(mso_reason_for_error("invalid_grant", 70008, 0), "state_expired");
    ck_assert_str_eq(mso_reason_for_error("invalid_grant", 700082, 1), "reconnect_required");
    ck_assert_str_eq(mso_reason_for_error("interaction_required", 50076, 1),
                     "reconnect_required");
    ck_assert_str_eq(mso_reason_for_error("temporarily_unavailable", 0, 1),
                     "token_endpoint_unreachable");
    ck_assert_str_eq(mso_reason_for_error("invalid_scope", 70011, 0), "bad_request");
}
END_TEST

START_TEST(query_parsing)
{
    apr_table_t *t = NULL;

    ck_assert_ptr_null(mso_query_parse(pool, "a=1&b=x%20y+z&c=&d", &t));
    ck_assert_str_eq(apr_table_get(t, "a"), "1");
    ck_assert_str_eq(apr_table_get(t, "b"), "x y z");
    ck_assert_str_eq(apr_table_get(t, "c"), "");
    ck_assert_str_eq(apr_table_get(t, "d"), "");
    ck_assert_ptr_null(mso_query_parse(pool, NULL, &t));
    ck_assert_int_eq(apr_table_elts(t)->nelts, 0);
    ck_assert_ptr_nonnull(strstr(mso_query_parse(pool, "company=a&company=b", &t),
                                 "more than once"));
    ck_assert_ptr_nonnull(strstr(mso_query_parse(pool, "company=a&compan%79=b", &t),
                                 "more than once"));
    ck_assert_ptr_nonnull(mso_query_parse(pool, "a=%zz", &t));
    ck_assert_ptr_nonnull(mso_query_parse(pool, "a=x%00y", &t));
}
END_TEST

static mso_token_result_t *answer(const char *body)
{
    mso_http_response_t resp;

    memset(&resp, 0, sizeof(resp));
    resp.status = 200;
    resp.body = body;
    resp.body_len = strlen(body);
    resp.retry_after = -1;
    return mso_token_result_from_response(pool, APR_SUCCESS, &resp, 1);
}

/* expires_in from Microsoft is hostile input: a string form is read, a value
 * beyond any real token life is clamped (now + expires_in cannot overflow),
 * zero, negative or garbage is refused. */
START_TEST(expires_in_clamped)
{
    mso_token_result_t *t;

    t = answer("{\"token_type\":\"Bearer\",\"access_token\":\"A\",\"expires_in\":3599}");
    ck_assert(t->ok);
    ck_assert_int_eq(t->expires_in, 3599);
    t = answer("{\"token_type\":\"Bearer\",\"access_token\":\"A\",\"expires_in\":\"3600\"}");
    ck_assert(t->ok);
    ck_assert_int_eq(t->expires_in, 3600);
    t = answer("{\"token_type\":\"Bearer\",\"access_token\":\"A\","
               "\"expires_in\":9223372036854775807}");
    ck_assert(t->ok);
    ck_assert_int_eq(t->expires_in, MSO_TOKEN_MAX_LIFETIME);
    t = answer("{\"token_type\":\"Bearer\",\"access_token\":\"A\","
               "\"expires_in\":\"99999999999999999999\"}");
    ck_assert(!t->ok);
    t = answer("{\"token_type\":\"Bearer\",\"access_token\":\"A\",\"expires_in\":0}");
    ck_assert(!t->ok);
    t = answer("{\"token_type\":\"Bearer\",\"access_token\":\"A\",\"expires_in\":-5}");
    ck_assert(!t->ok);
    t = answer("{\"token_type\":\"Bearer\",\"access_token\":\"A\",\"expires_in\":\"1h\"}");
    ck_assert(!t->ok);
}
END_TEST

START_TEST(every_reason_has_text)
{
    static const char *const contract[] = {
        "not_configured", "bad_request", "state_invalid", "state_expired", "access_denied",
        "consent_required", "admin_consent_required", "redirect_uri_mismatch",
        "invalid_client_secret", "client_secret_expired", "app_not_found", "wrong_tenant",
        "mailbox_mismatch", "id_token_invalid", "token_endpoint_unreachable",
        "reconnect_required", "read_only", "throttled", "graph_error",
        /* version 2 */
        "certificate_invalid", "certificate_expired", "mailbox_not_found",
        "access_denied_by_policy", "send_not_permitted", "not_found", "forbidden",
        "cross_site",
        /* shared mailboxes */
        "shared_access_denied",
        /* the attachment handler */
        "account_not_found", "message_not_found", "attachment_not_found", NULL
    };
    const mso_reason_t *r;
    int i, n = 0;

    for (i = 0; contract[i]; i++) {
        r = mso_reason_get(contract[i]);
        ck_assert_msg(r != NULL, "%s has no text", contract[i]);
        ck_assert_int_ge(r->status, 400);
        ck_assert_int_lt(r->status, 600);
        ck_assert_int_gt(strlen(r->title), 5);
        ck_assert_int_gt(strlen(r->message), 20);
        ck_assert_int_gt(strlen(r->fix), 20);
    }
    for (r = mso_reason_all(); r->code; r++) {
        n++;
    }
    ck_assert_int_eq(n, i);
    ck_assert_ptr_null(mso_reason_get("nope"));
    ck_assert_ptr_nonnull(strstr(mso_reason_get("redirect_uri_mismatch")->fix, "%R"));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("identity");
    TCase *tc = tcase_create("identity");
    int failed;

    apr_initialize();
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, scopes);
    tcase_add_test(tc, authorize_url);
    tcase_add_test(tc, aadsts_and_ids);
    tcase_add_test(tc, reasons_for_errors);
    tcase_add_test(tc, query_parsing);
    tcase_add_test(tc, every_reason_has_text);
    tcase_add_test(tc, expires_in_clamped);
    suite_add_tcase(s, tc);
    failed = mso_check_run(s);
    apr_terminate();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
