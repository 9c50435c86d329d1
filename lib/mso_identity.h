/* The Microsoft identity platform (v2.0): endpoints of an authority, the
 * authorize URL, the code and refresh grants, and Microsoft's error bodies
 * turned into our reason codes. */
#ifndef MSO_IDENTITY_H
#define MSO_IDENTITY_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_cert.h"
#include "mso_http.h"

/* One app as seen by Microsoft, with the authority it signs in through. It
 * authenticates with its certificate (a signed client assertion per request)
 * when cert is set, else with its client secret. */
typedef struct {
    const char *authority;      /* https://login.microsoftonline.com/{tenant}, no trailing / */
    const char *client_id;
    const char *client_secret;
    const char *redirect_uri;
    const mso_cert_t *cert;
} mso_app_t;

/* authority_base + "/" + tenant. */
const char *mso_authority(apr_pool_t *p, const char *authority_base, const char *tenant);

/* Scopes of the sign-in: OIDC scopes, offline_access, the edition's mail
 * scopes on the cloud's Graph resource (basic: Mail.Read; pro: Mail.ReadWrite
 * and Mail.Send), then the extras it does not hold already. Space
 * separated. */
const char *mso_signin_scopes(apr_pool_t *p, const char *graph_resource, int pro,
                              const apr_array_header_t *extra);
/* Scopes of a token request for one resource (Microsoft refuses two in one
 * request): the OIDC scopes plus the scopes of signin_scopes that belong to
 * resource ("graph": unprefixed or on graph_resource; otherwise a resource URL
 * such as https://outlook.office.com). */
const char *mso_token_scopes(apr_pool_t *p, const char *signin_scopes,
                             const char *graph_resource, const char *resource);

typedef struct {
    const char *state, *nonce, *code_challenge, *login_hint, *scope;
    const char *prompt;         /* select_account, login, ...; NULL: none */
} mso_authorize_req_t;

/* The longest access token life believed (seconds): Microsoft's own are at
 * most about a day (CAE tokens 28 h). */
#define MSO_TOKEN_MAX_LIFETIME (2 * 86400)

char *mso_authorize_url(apr_pool_t *p, const mso_app_t *app, const mso_authorize_req_t *req);

typedef struct {
    int ok;
    /* success */
    const char *access_token, *refresh_token, *id_token, *scope;
    long long expires_in;
    /* failure */
    const char *reason;         /* our reason code */
    const char *error;          /* OAuth error string */
    long aadsts;                /* first AADSTS code, 0 when none */
    const char *trace_id, *correlation_id;
    const char *detail;         /* short text for logs: never a token or secret */
    int http_status;
    long retry_after;
} mso_token_result_t;

/* grant_type=authorization_code with the PKCE verifier. */
apr_status_t mso_token_from_code(apr_pool_t *p, const mso_http_opts_t *o, const mso_app_t *app,
                                 const char *code, const char *verifier, const char *scope,
                                 mso_token_result_t **res);
/* grant_type=refresh_token for one resource's scopes. */
apr_status_t mso_token_from_refresh(apr_pool_t *p, const mso_http_opts_t *o,
                                    const mso_app_t *app, const char *refresh_token,
                                    const char *scope, mso_token_result_t **res);
/* grant_type=client_credentials: an application token for resource_url's
 * .default scope (https://graph.microsoft.com, https://outlook.office365.com). */
apr_status_t mso_token_for_app(apr_pool_t *p, const mso_http_opts_t *o, const mso_app_t *app,
                               const char *resource_url, mso_token_result_t **res);
/* "{resource_url}/.default". */
const char *mso_app_scope(apr_pool_t *p, const char *resource_url);

/* The pieces of a token call, for callers that send it themselves (the
 * job's concurrent requests): the token URL, the form body (NULL when the
 * client assertion could not be signed), and the result of the response
 * (resp->status 0 or rv != APR_SUCCESS: the call failed). */
const char *mso_token_url(apr_pool_t *p, const mso_app_t *app);
const char *mso_token_refresh_form(apr_pool_t *p, const mso_app_t *app,
                                   const char *refresh_token, const char *scope);
const char *mso_token_app_form(apr_pool_t *p, const mso_app_t *app, const char *resource_url);
mso_token_result_t *mso_token_result_from_response(apr_pool_t *p, apr_status_t rv,
                                                   mso_http_response_t *resp,
                                                   int during_refresh);

/* Reason for an OAuth error (token endpoint or authorize redirect).
 * during_refresh: invalid_grant means the refresh token is dead. */
const char *mso_reason_for_error(const char *error, long aadsts, int during_refresh);
/* The reason for the credential app used: invalid_client_secret becomes
 * certificate_invalid when the app authenticates with a certificate. */
const char *mso_reason_for_client(const mso_app_t *app, const char *reason);
/* The AADSTS number at the start of an error_description, 0 when none. */
long mso_aadsts_of(const char *description);

/* The trace and correlation IDs of an error_description, for the page and log. */
void mso_error_ids(apr_pool_t *p, const char *description, const char **trace_id,
                   const char **correlation_id);

#endif
