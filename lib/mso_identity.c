#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <apr_strings.h>
#include <apr_lib.h>

#include "mso_identity.h"
#include "mso_json.h"
#include "mso_log.h"

#define OIDC_SCOPES "openid profile email offline_access"

const char *mso_authority(apr_pool_t *p, const char *authority_base, const char *tenant)
{
    return apr_pstrcat(p, authority_base, "/", tenant, NULL);
}

/* True when the edition's scopes already hold extra, short or with the
 * Graph prefix (an MSOAuthScope Mail.Send under pro). */
static int edition_has(const char *graph_resource, int pro, const char *extra)
{
    const char *name = extra;
    apr_size_t rlen = strlen(graph_resource);

    if (!strncasecmp(extra, graph_resource, rlen) && extra[rlen] == '/') {
        name = extra + rlen + 1;
    }
    else if (strchr(extra, '/')) {
        return 0;
    }
    return (pro && (!strcasecmp(name, "Mail.ReadWrite") || !strcasecmp(name, "Mail.Send")))
           || (!pro && !strcasecmp(name, "Mail.Read"));
}

const char *mso_signin_scopes(apr_pool_t *p, const char *graph_resource, int pro,
                              const apr_array_header_t *extra)
{
    /* pro sends mail too: drafts need Mail.ReadWrite, sending Mail.Send. */
    const char *s = pro ? apr_pstrcat(p, OIDC_SCOPES, " ", graph_resource, "/Mail.ReadWrite ",
                                      graph_resource, "/Mail.Send", NULL)
                        : apr_pstrcat(p, OIDC_SCOPES, " ", graph_resource, "/Mail.Read", NULL);
    int i;

    for (i = 0; extra && i < extra->nelts; i++) {
        const char *x = APR_ARRAY_IDX(extra, i, const char *);

        if (!edition_has(graph_resource, pro, x)) {
            s = apr_pstrcat(p, s, " ", x, NULL);
        }
    }
    return s;
}

/* The resource a scope belongs to: its URL prefix, or Graph when it has none. */
static int scope_is_of(const char *scope, const char *graph_resource, const char *resource)
{
    const char *slash = strrchr(scope, '/');
    apr_size_t rlen;

    if (!strcmp(resource, "graph")) {
        if (!slash) {
            return 1;
        }
        rlen = strlen(graph_resource);
        return (apr_size_t)(slash - scope) == rlen && !strncasecmp(scope, graph_resource, rlen);
    }
    rlen = strlen(resource);
    return slash && (apr_size_t)(slash - scope) == rlen && !strncasecmp(scope, resource, rlen);
}

const char *mso_token_scopes(apr_pool_t *p, const char *signin_scopes,
                             const char *graph_resource, const char *resource)
{
    char *copy = apr_pstrdup(p, signin_scopes), *last, *word;
    const char *out = OIDC_SCOPES;

    for (word = apr_strtok(copy, " ", &last); word; word = apr_strtok(NULL, " ", &last)) {
        if (strstr(OIDC_SCOPES, word) && !strchr(word, '/')) {
            continue;   /* already there */
        }
        if (scope_is_of(word, graph_resource, resource)) {
            out = apr_pstrcat(p, out, " ", word, NULL);
        }
    }
    return out;
}

static const char *urlenc(apr_pool_t *p, const char *v)
{
    return mso_url_encode(p, v);
}

char *mso_authorize_url(apr_pool_t *p, const mso_app_t *app, const mso_authorize_req_t *req)
{
    char *url = apr_pstrcat(p, app->authority, "/oauth2/v2.0/authorize"
                            "?client_id=", urlenc(p, app->client_id),
                            "&response_type=code"
                            "&redirect_uri=", urlenc(p, app->redirect_uri),
                            "&response_mode=query"
                            "&scope=", urlenc(p, req->scope),
                            "&state=", urlenc(p, req->state),
                            "&nonce=", urlenc(p, req->nonce),
                            "&code_challenge=", urlenc(p, req->code_challenge),
                            "&code_challenge_method=S256", NULL);
    if (req->prompt && *req->prompt) {
        url = apr_pstrcat(p, url, "&prompt=", urlenc(p, req->prompt), NULL);
    }
    if (req->login_hint && *req->login_hint) {
        url = apr_pstrcat(p, url, "&login_hint=", urlenc(p, req->login_hint), NULL);
    }
    return url;
}

long mso_aadsts_of(const char *description)
{
    const char *d = description ? strstr(description, "AADSTS") : NULL;

    if (!d || !apr_isdigit(d[6])) {
        return 0;
    }
    return strtol(d + 6, NULL, 10);
}

/* The GUID after "label" in an error_description, if any. */
static const char *id_after(apr_pool_t *p, const char *d, const char *label)
{
    const char *s = d ? strstr(d, label) : NULL;
    apr_size_t n = 0;

    if (!s) {
        return NULL;
    }
    s += strlen(label);
    while (*s == ' ') {
        s++;
    }
    while (n < 64 && (apr_isxdigit(s[n]) || s[n] == '-')) {
        n++;
    }
    return n ? apr_pstrndup(p, s, n) : NULL;
}

void mso_error_ids(apr_pool_t *p, const char *description, const char **trace_id,
                   const char **correlation_id)
{
    *trace_id = id_after(p, description, "Trace ID:");
    *correlation_id = id_after(p, description, "Correlation ID:");
}

const char *mso_reason_for_client(const mso_app_t *app, const char *reason)
{
    /* invalid_client means the credential: with a certificate it is the
     * certificate, not a secret. */
    if (app && app->cert && reason && !strcmp(reason, "invalid_client_secret")) {
        return "certificate_invalid";
    }
    return reason;
}

const char *mso_reason_for_error(const char *error, long aadsts, int during_refresh)
{
    switch (aadsts) {
    case 50011:
        return "redirect_uri_mismatch";
    case 7000215:
        return "invalid_client_secret";
    case 7000222:
        return "client_secret_expired";
    case 700027: case 700024: case 700021: case 700023:
        /* The client assertion: signature, unknown key, times, claims. */
        return "certificate_invalid";
    case 700016:
        return "app_not_found";
    case 50194: case 50020: case 90002: case 7000012: case 9001023:
        return "wrong_tenant";
    case 90094: case 90095: case 900941: case 7000229:
        return "admin_consent_required";
    case 65004:
        return "access_denied";
    case 65001:
        return during_refresh ? "reconnect_required" : "consent_required";
    case 54005: case 501481:
        return during_refresh ? "reconnect_required" : "state_invalid";
    case 70008:
        return during_refresh ? "reconnect_required" : "state_expired";
    default:
        break;
    }
    if (!error) {
        return during_refresh ? "token_endpoint_unreachable" : "bad_request";
    }
    if (!strcmp(error, "invalid_client")) {
        return "invalid_client_secret";
    }
    if (!strcmp(error, "unauthorized_client")) {
        return "app_not_found";
    }
    if (!strcmp(error, "access_denied")) {
        return "access_denied";
    }
    if (!strcmp(error, "consent_required")) {
        return during_refresh ? "reconnect_required" : "consent_required";
    }
    if (!strcmp(error, "invalid_grant") || !strcmp(error, "interaction_required")
        || !strcmp(error, "login_required")) {
        return during_refresh ? "reconnect_required" : "state_invalid";
    }
    if (!strcmp(error, "temporarily_unavailable") || !strcmp(error, "server_error")) {
        return "token_endpoint_unreachable";
    }
    if (!strcmp(error, "invalid_resource")) {
        return "admin_consent_required";
    }
    /* invalid_request, invalid_scope, unsupported_*: our request is wrong. */
    return "bad_request";
}

static const char *short_id(apr_pool_t *p, const char *id)
{
    return id && *id ? apr_pstrndup(p, id, 64) : NULL;
}

static mso_token_result_t *failure(apr_pool_t *p, const char *reason, const char *detail)
{
    mso_token_result_t *r = apr_pcalloc(p, sizeof(*r));

    r->reason = reason;
    r->detail = detail;
    r->retry_after = -1;
    return r;
}

/* expires_in as a number or (older Entra answers) a decimal string, clamped
 * to MSO_TOKEN_MAX_LIFETIME so that now + expires_in cannot overflow and a
 * hostile answer cannot park a token for years. 0 when absent or not
 * positive. */
static int expires_in_of(const json_t *j, apr_int64_t *n)
{
    const char *s = mso_json_str(j, "expires_in");

    if (!mso_json_int(j, "expires_in", n)) {
        char *end;

        if (!s || !*s || strlen(s) > 18) {
            return 0;
        }
        *n = apr_strtoi64(s, &end, 10);
        if (*end) {
            return 0;
        }
    }
    if (*n <= 0) {
        return 0;
    }
    if (*n > MSO_TOKEN_MAX_LIFETIME) {
        *n = MSO_TOKEN_MAX_LIFETIME;
    }
    return 1;
}

static mso_token_result_t *parse_answer(apr_pool_t *p, mso_http_response_t *resp,
                                        int during_refresh)
{
    const char *jerr = NULL;
    json_t *j;
    mso_token_result_t *r;
    apr_int64_t n;

    if (resp->status == 429 || resp->status >= 500) {
        r = failure(p, "token_endpoint_unreachable",
                    apr_psprintf(p, "the token endpoint answered HTTP %d", resp->status));
        r->http_status = resp->status;
        r->retry_after = resp->retry_after;
        return r;
    }
    j = mso_json_parse(p, resp->body, resp->body_len, &jerr);
    if (!j || !json_is_object(j)) {
        r = failure(p, resp->status == 200 ? "token_endpoint_unreachable" : "bad_request",
                    apr_psprintf(p, "the token endpoint answered HTTP %d with a body that is "
                                 "not a JSON object (%s)", resp->status, jerr ? jerr : "?"));
        r->http_status = resp->status;
        return r;
    }
    if (resp->status != 200) {
        const json_t *codes = mso_json_arr(j, "error_codes");
        const char *desc = mso_json_str(j, "error_description");

        r = failure(p, NULL, NULL);
        r->http_status = resp->status;
        r->error = apr_pstrndup(p, mso_json_str(j, "error") ? mso_json_str(j, "error") : "", 64);
        if (codes && json_array_size(codes) > 0 && json_is_integer(json_array_get(codes, 0))) {
            r->aadsts = (long)json_integer_value(json_array_get(codes, 0));
        }
        else {
            r->aadsts = mso_aadsts_of(desc);
        }
        /* Hostile input: keep IDs short; pages escape them anyway. */
        r->trace_id = short_id(p, mso_json_str(j, "trace_id"));
        r->correlation_id = short_id(p, mso_json_str(j, "correlation_id"));
        if (!r->trace_id || !r->correlation_id) {
            const char *t, *c;
            mso_error_ids(p, desc, &t, &c);
            r->trace_id = r->trace_id ? r->trace_id : t;
            r->correlation_id = r->correlation_id ? r->correlation_id : c;
        }
        r->reason = mso_reason_for_error(r->error, r->aadsts, during_refresh);
        r->detail = apr_psprintf(p, "Microsoft answered %s AADSTS%ld (HTTP %d)",
                                 *r->error ? r->error : "an error", r->aadsts, resp->status);
        return r;
    }
    r = apr_pcalloc(p, sizeof(*r));
    r->retry_after = -1;
    r->http_status = 200;
    r->access_token = mso_json_str(j, "access_token");
    r->refresh_token = mso_json_str(j, "refresh_token");
    r->id_token = mso_json_str(j, "id_token");
    r->scope = mso_json_str(j, "scope");
    if (!r->access_token || !*r->access_token || !expires_in_of(j, &n)
        || !mso_json_str(j, "token_type") || strcasecmp(mso_json_str(j, "token_type"), "Bearer")) {
        return failure(p, "token_endpoint_unreachable",
                       "the token endpoint's answer lacks access_token, token_type Bearer or "
                       "expires_in");
    }
    r->expires_in = n;
    r->access_token = apr_pstrdup(p, r->access_token);
    r->refresh_token = r->refresh_token ? apr_pstrdup(p, r->refresh_token) : NULL;
    r->id_token = r->id_token ? apr_pstrdup(p, r->id_token) : NULL;
    r->scope = apr_pstrdup(p, r->scope ? r->scope : "");
    r->ok = 1;
    return r;
}

const char *mso_token_url(apr_pool_t *p, const mso_app_t *app)
{
    return apr_pstrcat(p, app->authority, "/oauth2/v2.0/token", NULL);
}

mso_token_result_t *mso_token_result_from_response(apr_pool_t *p, apr_status_t rv,
                                                   mso_http_response_t *resp,
                                                   int during_refresh)
{
    if (rv != APR_SUCCESS || !resp || resp->status == 0) {
        return failure(p, "token_endpoint_unreachable",
                       apr_psprintf(p, "the token call failed: %s",
                                    resp && resp->error ? resp->error : "transport error"));
    }
    return parse_answer(p, resp, during_refresh);
}

/* The client's credentials in a token form: the secret, or a client
 * assertion signed for this token URL. NULL when the assertion could not be
 * made (the form must then not be sent). */
static const char *with_client_auth(apr_pool_t *p, const mso_app_t *app, const char *form)
{
    const char *jwt = NULL;

    if (!form) {
        return NULL;
    }
    if (!app->cert) {
        return apr_pstrcat(p, form, "&", mso_form_encode(p, "client_secret",
                                                         app->client_secret, NULL), NULL);
    }
    if (mso_cert_assertion(p, app->cert, MSO_ASSERTION_PS256, app->client_id,
                           mso_token_url(p, app), apr_time_sec(apr_time_now()),
                           MSO_ASSERTION_LIFETIME, &jwt) != APR_SUCCESS) {
        return NULL;
    }
    return apr_pstrcat(p, form, "&", mso_form_encode(p, "client_assertion_type",
                                                     MSO_ASSERTION_TYPE, "client_assertion",
                                                     jwt, NULL), NULL);
}

static apr_status_t token_call(apr_pool_t *p, const mso_http_opts_t *o, const mso_app_t *app,
                               const char *form, int during_refresh, mso_token_result_t **res)
{
    apr_array_header_t *hdrs = apr_array_make(p, 2, sizeof(const char *));
    mso_http_response_t *resp = NULL;
    apr_status_t rv;

    if (app->cert && mso_cert_not_after(app->cert) <= apr_time_now()) {
        *res = failure(p, "certificate_expired", "the certificate in "
                       "MSOAuthClientCertificateFile has expired; nothing was sent");
        return APR_SUCCESS;
    }
    if (!form) {
        *res = failure(p, "certificate_invalid", "the client assertion could not be signed "
                       "with the certificate's key");
        return APR_SUCCESS;
    }
    APR_ARRAY_PUSH(hdrs, const char *) = "Content-Type: application/x-www-form-urlencoded";
    APR_ARRAY_PUSH(hdrs, const char *) = "Accept: application/json";
    rv = mso_http_request(p, o, "POST", mso_token_url(p, app), hdrs, form, strlen(form), &resp);
    *res = mso_token_result_from_response(p, rv, resp, during_refresh);
    (*res)->reason = mso_reason_for_client(app, (*res)->reason);
    return APR_SUCCESS;
}

apr_status_t mso_token_from_code(apr_pool_t *p, const mso_http_opts_t *o, const mso_app_t *app,
                                 const char *code, const char *verifier, const char *scope,
                                 mso_token_result_t **res)
{
    const char *form = mso_form_encode(p, "client_id", app->client_id,
                                       "grant_type", "authorization_code",
                                       "code", code,
                                       "redirect_uri", app->redirect_uri,
                                       "code_verifier", verifier,
                                       "scope", scope, NULL);
    return token_call(p, o, app, with_client_auth(p, app, form), 0, res);
}

const char *mso_token_refresh_form(apr_pool_t *p, const mso_app_t *app,
                                   const char *refresh_token, const char *scope)
{
    return with_client_auth(p, app, mso_form_encode(p, "client_id", app->client_id,
                                                    "grant_type", "refresh_token",
                                                    "refresh_token", refresh_token,
                                                    "scope", scope, NULL));
}

const char *mso_app_scope(apr_pool_t *p, const char *resource_url)
{
    return apr_pstrcat(p, resource_url, "/.default", NULL);
}

const char *mso_token_app_form(apr_pool_t *p, const mso_app_t *app, const char *resource_url)
{
    return with_client_auth(p, app, mso_form_encode(p, "client_id", app->client_id,
                                                    "grant_type", "client_credentials",
                                                    "scope", mso_app_scope(p, resource_url),
                                                    NULL));
}

apr_status_t mso_token_for_app(apr_pool_t *p, const mso_http_opts_t *o, const mso_app_t *app,
                               const char *resource_url, mso_token_result_t **res)
{
    return token_call(p, o, app, mso_token_app_form(p, app, resource_url), 0, res);
}

apr_status_t mso_token_from_refresh(apr_pool_t *p, const mso_http_opts_t *o,
                                    const mso_app_t *app, const char *refresh_token,
                                    const char *scope, mso_token_result_t **res)
{
    return token_call(p, o, app, mso_token_refresh_form(p, app, refresh_token, scope), 1, res);
}
