/* The token endpoint's answer (lib/mso_identity):
 * mso_token_result_from_response on a fuzzed status, headers and body (see
 * fuzz_http.h for the layout; the first byte says whether this is a refresh).
 * Invariants: the result is either a success with an access token, a positive
 * lifetime and HTTP 200, or a failure whose reason is one of our reason codes
 * and agrees with mso_reason_for_error; throttling and 5xx keep Retry-After;
 * the IDs and the OAuth error copied from hostile JSON are bounded. */
#include "fuzz_http.h"
#include "mso_identity.h"
#include "mso_reason.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    int refresh = fuzz_byte(&in) & 1;
    fuzz_answer_t a = fuzz_answer(p, &in);
    mso_http_response_t *resp = a.resp;
    mso_token_result_t *r = mso_token_result_from_response(p, a.rv, resp, refresh);

    FUZZ_CHECK(r != NULL, "no result");
    FUZZ_CHECK(r->detail || r->ok, "a failure without detail");
    if (r->ok) {
        FUZZ_CHECK(a.rv == APR_SUCCESS && resp->status == 200 && r->http_status == 200,
                   "success from HTTP %d", resp->status);
        FUZZ_CHECK(r->access_token && *r->access_token && r->expires_in > 0 && r->scope,
                   "a success without token, lifetime or scope");
        FUZZ_CHECK(!r->reason && !r->error, "a success with an error");
    }
    else {
        FUZZ_CHECK(r->reason && mso_reason_get(r->reason), "reason \"%s\" is not one of ours",
                   r->reason ? r->reason : "(null)");
        if (a.rv != APR_SUCCESS || resp->status == 0) {
            FUZZ_CHECK(!strcmp(r->reason, "token_endpoint_unreachable"), "transport failure "
                       "gives %s", r->reason);
        }
        else if (resp->status == 429 || resp->status >= 500) {
            FUZZ_CHECK(!strcmp(r->reason, "token_endpoint_unreachable")
                       && r->retry_after == resp->retry_after && r->http_status == resp->status,
                       "HTTP %d gives %s, Retry-After %ld of %ld", resp->status, r->reason,
                       r->retry_after, resp->retry_after);
        }
        if (r->error) {
            FUZZ_CHECK(strlen(r->error) <= 64, "error string of %zu bytes", strlen(r->error));
            FUZZ_CHECK(!strcmp(r->reason, mso_reason_for_error(*r->error ? r->error : "",
                                                               r->aadsts, refresh))
                       || !*r->error, "reason %s disagrees with error %s AADSTS%ld", r->reason,
                       r->error, r->aadsts);
        }
        FUZZ_CHECK(!r->trace_id || strlen(r->trace_id) <= 64, "trace id too long");
        FUZZ_CHECK(!r->correlation_id || strlen(r->correlation_id) <= 64, "correlation id");
    }
    /* The helpers on their own, on the body as a description. */
    {
        const char *t, *c;
        long code = mso_aadsts_of(resp->body);

        FUZZ_CHECK(code >= 0, "negative AADSTS %ld", code);
        FUZZ_CHECK(mso_reason_get(mso_reason_for_error(resp->body, code, refresh)) != NULL,
                   "mso_reason_for_error left our codes");
        mso_error_ids(p, resp->body, &t, &c);
        FUZZ_CHECK((!t || (strlen(t) <= 64 && *t)) && (!c || (strlen(c) <= 64 && *c)),
                   "trace or correlation id malformed");
    }
    apr_pool_destroy(p);
    return 0;
}
