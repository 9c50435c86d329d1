/* The connect and confirm handlers: a request in, lib/ calls, a response out. */
#include <string.h>

#include <apr_strings.h>
#include <apr_lib.h>
#include <apr_dbd.h>

#include <httpd.h>
#include <http_config.h>
#include <http_core.h>
#include <http_log.h>
#include <http_protocol.h>
#include <http_request.h>
#include <mod_dbd.h>

#include "mod_msoauth.h"
#include "mod_msoauth_config.h"
#include "mod_msoauth_flow.h"
#include "mso_discovery.h"
#include "mso_flow.h"
#include "mso_graph.h"
#include "mso_identity.h"
#include "mso_reason.h"
#include "mso_account.h"
#include "mso_db.h"
#include "mso_flows_used.h"
#include "mso_sync.h"

APLOG_USE_MODULE(msoauth);

#define CLOCK_SKEW 300
#define TOKEN_TIMEOUT_MS 30000

/* What went wrong, with what Microsoft said about it. */
typedef struct {
    const char *reason;
    long aadsts;
    const char *trace_id, *correlation_id;
    const char *detail;         /* for the log only; never a secret or token */
    const char *title, *message;/* overrides of the reason's text, rarely */
} failure_t;

static int asks_shared(const msoauth_company_t *c);

static void no_store(request_rec *r)
{
    apr_table_setn(r->err_headers_out, "Cache-Control", "no-store");
    apr_table_setn(r->err_headers_out, "Pragma", "no-cache");
    /* The query of confirm holds the code: never let it leak as a Referer. */
    apr_table_setn(r->err_headers_out, "Referrer-Policy", "no-referrer");
    apr_table_setn(r->err_headers_out, "X-Content-Type-Options", "nosniff");
}

static int redirect(request_rec *r, const char *location)
{
    no_store(r);
    apr_table_setn(r->headers_out, "Location", location);
    r->status = HTTP_MOVED_TEMPORARILY;
    ap_set_content_length(r, 0);
    return OK;
}

/* return_to plus our parameters, after any it already has. */
static const char *back_to_app(request_rec *r, const char *return_to, const char *params)
{
    const char *hash = strchr(return_to, '#');
    const char *path = hash ? apr_pstrndup(r->pool, return_to, hash - return_to) : return_to;

    return apr_pstrcat(r->pool, path, strchr(path, '?') ? "&" : "?", params,
                       hash ? hash : "", NULL);
}

static const char *esc(request_rec *r, const char *s)
{
    return ap_escape_html2(r->pool, s ? s : "", 1);
}

static int page(request_rec *r, int status, const char *title, const char *html_body)
{
    no_store(r);
    apr_table_setn(r->err_headers_out, "Content-Security-Policy",
                   "default-src 'none'; style-src 'unsafe-inline'");
    r->status = status;
    ap_set_content_type(r, "text/html; charset=utf-8");
    ap_rprintf(r, "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
               "<title>%s</title><style>body{font-family:sans-serif;max-width:42em;"
               "margin:2em auto;line-height:1.5}code{background:#eee;padding:0 .2em}"
               "dt{font-weight:bold}</style></head><body>\n<h1>%s</h1>\n%s\n</body></html>\n",
               esc(r, title), esc(r, title), html_body);
    return OK;
}

static int fail(request_rec *r, msoauth_srv_conf_t *sc, const failure_t *f,
                const char *return_to)
{
    const mso_reason_t *rs = mso_reason_get(f->reason);
    const char *fix, *body, *ids = "";

    if (!rs) {
        rs = mso_reason_get("bad_request");
    }
    ap_log_rerror(APLOG_MARK, rs->status >= 500 ? APLOG_ERR : APLOG_NOTICE, 0, r,
                  MSOLOGNO(100) "sign-in failed: %s%s%s%s%s%s%s%s%s", rs->code,
                  f->aadsts ? apr_psprintf(r->pool, " AADSTS%ld", f->aadsts) : "",
                  f->trace_id ? " trace_id=" : "", f->trace_id ? f->trace_id : "",
                  f->correlation_id ? " correlation_id=" : "",
                  f->correlation_id ? f->correlation_id : "",
                  f->detail ? " (" : "",
                  f->detail ? ap_escape_logitem(r->pool, f->detail) : "",
                  f->detail ? ")" : "");
    if (return_to) {
        const char *params = apr_pstrcat(r->pool, "msoauth=error&reason=", rs->code,
                                         f->aadsts ? apr_psprintf(r->pool, "&aadsts=%ld",
                                                                  f->aadsts) : "", NULL);
        return redirect(r, back_to_app(r, return_to, params));
    }
    fix = esc(r, rs->fix);
    if (strstr(fix, "%R")) {
        const char *uri = apr_pstrcat(r->pool, "<code>", esc(r, sc->redirect_uri), "</code>",
                                      NULL);
        char *at = strstr(fix, "%R");
        fix = apr_pstrcat(r->pool, apr_pstrndup(r->pool, fix, at - fix), uri, at + 2, NULL);
    }
    if (f->aadsts) {
        ids = apr_psprintf(r->pool, "<dt>Microsoft error</dt><dd>AADSTS%ld</dd>", f->aadsts);
    }
    if (f->trace_id) {
        ids = apr_pstrcat(r->pool, ids, "<dt>Trace ID</dt><dd>", esc(r, f->trace_id), "</dd>",
                          NULL);
    }
    if (f->correlation_id) {
        ids = apr_pstrcat(r->pool, ids, "<dt>Correlation ID</dt><dd>",
                          esc(r, f->correlation_id), "</dd>", NULL);
    }
    body = apr_pstrcat(r->pool, "<p>", esc(r, f->message ? f->message : rs->message), "</p>\n",
                       "<h2>What to do</h2>\n<p>", fix, "</p>\n<dl><dt>Reason</dt><dd><code>",
                       rs->code, "</code></dd>", ids, "<dt>Redirect URI of this server</dt>"
                       "<dd><code>", esc(r, sc->redirect_uri), "</code></dd></dl>\n", NULL);
    return page(r, rs->status, f->title ? f->title : rs->title, body);
}

static int fail_reason(request_rec *r, msoauth_srv_conf_t *sc, const char *reason,
                       const char *detail, const char *return_to)
{
    failure_t f;

    memset(&f, 0, sizeof(f));
    f.reason = reason;
    f.detail = detail;
    return fail(r, sc, &f, return_to);
}

/* Each parameter of the query once, as valid UTF-8 without control
 * characters: anything else is refused rather than passed on. Microsoft's
 * error_description (several lines) is only ever shown escaped. */
static int check_param(void *why, const char *key, const char *value)
{
    const char *w = mso_check_text_param(key);

    if (!w && strcmp(key, "error_description")) {
        w = mso_check_text_param(value);
    }
    if (w) {
        *(const char **)why = w;
        return 0;
    }
    return 1;
}

static const char *query(request_rec *r, apr_table_t **args)
{
    const char *why = mso_query_parse(r->pool, r->args, args);

    if (!why) {
        apr_table_do(check_param, &why, *args, NULL);
    }
    return why;
}

static msoauth_company_t *usable_company(request_rec *r, msoauth_srv_conf_t *sc,
                                         const char *name, const char **why)
{
    msoauth_company_t *c = msoauth_company(r->server, name);

    if (!c) {
        *why = apr_psprintf(r->pool, "no company '%s' on this server", name);
    }
    else if (!msoauth_company_has_credentials(c)) {
        *why = apr_psprintf(r->pool, "company '%s' has no client ID, secret or certificate",
                            name);
        c = NULL;
    }
    else if (!sc->keyring) {
        *why = "no MSOAuthTokenKeyFile";
        c = NULL;
    }
    return c;
}

static mso_app_t *app_of(request_rec *r, msoauth_srv_conf_t *sc, msoauth_company_t *c)
{
    mso_app_t *app = apr_pcalloc(r->pool, sizeof(*app));

    app->authority = mso_authority(r->pool, c->set.authority_url.value, c->set.tenant.value);
    app->client_id = c->set.client_id.value;
    app->client_secret = c->set.client_secret.value;
    app->cert = c->set.client_cert.cert;
    app->redirect_uri = sc->redirect_uri;
    return app;
}

static const char *signin_scopes(request_rec *r, msoauth_company_t *c)
{
    return mso_signin_scopes(r->pool, mso_cloud_graph((mso_cloud_e)c->set.cloud.value), c->set.edition.value == MSO_EDITION_PRO,
                             c->set.scopes.value);
}

static int is_https(msoauth_srv_conf_t *sc)
{
    return !strncasecmp(sc->effective_base_url, "https:", 6);
}

/* The folder of the redirect path (/microsoft_outlook/ for the default):
 * narrow, yet connect sees the flows in flight when mapped beside confirm. */
static const char *cookie_path(request_rec *r, msoauth_srv_conf_t *sc)
{
    const char *slash = strrchr(sc->redirect_path, '/');
    return apr_pstrndup(r->pool, sc->redirect_path, slash - sc->redirect_path + 1);
}

static void set_flow_cookie(request_rec *r, msoauth_srv_conf_t *sc, const char *name,
                            const char *value, int max_age)
{
    apr_table_addn(r->err_headers_out, "Set-Cookie",
                   apr_psprintf(r->pool, "%s=%s; Path=%s; Max-Age=%d; HttpOnly; SameSite=Lax%s",
                                name, value, cookie_path(r, sc), max_age,
                                is_https(sc) ? "; Secure" : ""));
}

static apr_array_header_t *flow_cookies(request_rec *r)
{
    return mso_flow_cookies(r->pool, apr_table_get(r->headers_in, "Cookie"));
}

int msoauth_connect_handler(request_rec *r)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(r->server);
    apr_table_t *args;
    const char *company_name, *mailbox, *return_to, *why, *cookie_value, *fetch_site, *name;
    msoauth_company_t *c;
    mso_flow_t *flow;
    mso_authorize_req_t req;
    apr_array_header_t *drop;
    apr_status_t rv;
    int i;

    if (r->method_number != M_GET) {
        r->allowed = AP_METHOD_BIT << M_GET;
        return HTTP_METHOD_NOT_ALLOWED;
    }
    /* A page of another site must not start a sign-in in this person's
     * browser: it could end silently with their mailbox connected. */
    fetch_site = apr_table_get(r->headers_in, "Sec-Fetch-Site");
    if (fetch_site && !strcasecmp(fetch_site, "cross-site")) {
        return fail_reason(r, sc, "cross_site", "the Connect link was opened from another "
                           "site (Sec-Fetch-Site: cross-site)", NULL);
    }
    if ((why = query(r, &args)) != NULL) {
        return fail_reason(r, sc, "bad_request", why, NULL);
    }
    return_to = apr_table_get(args, "return_to");
    if (return_to && (why = mso_check_return_to(return_to)) != NULL) {
        return fail_reason(r, sc, "bad_request", why, NULL);
    }
    company_name = apr_table_get(args, "company");
    if (!company_name || !*company_name) {
        company_name = MSOAUTH_DEFAULT_COMPANY;
    }
    if ((why = mso_check_company_name(r->pool, company_name)) != NULL) {
        return fail_reason(r, sc, "bad_request", "company is not a valid name", NULL);
    }
    mailbox = apr_table_get(args, "mailbox");
    if (mailbox && *mailbox) {
        if ((why = mso_check_mailbox(mailbox)) != NULL) {
            return fail_reason(r, sc, "bad_request", why, return_to);
        }
        mailbox = mso_lower(r->pool, mailbox);
    }
    else {
        mailbox = NULL;
    }
    if (!(c = usable_company(r, sc, company_name, &why))) {
        return fail_reason(r, sc, "not_configured", why, return_to);
    }
    if (c->set.app_only.value) {
        return fail_reason(r, sc, "bad_request", apr_psprintf(r->pool, "company %s uses "
                           "application permissions: its mailboxes are listed with "
                           "MSOAuthMailbox or added on the admin page, nobody signs in", c->name),
                           return_to);
    }

    flow = mso_flow_new(r->pool, c->name, mailbox, return_to, r->user,
                        (long long)apr_time_sec(r->request_time));
    rv = flow ? mso_flow_seal(r->pool, sc->keyring, flow, &cookie_value) : APR_EGENERAL;
    if (rv != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, rv, r, MSOLOGNO(101) "%s",
                      flow ? "sealing the sign-in state failed"
                           : "no random bytes for the sign-in state (OpenSSL's RNG failed)");
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    name = mso_flow_cookie_name(r->pool, flow->state, flow->created);
    /* Abandoned sign-ins must not pile up until requests get too large. */
    drop = mso_flow_cookies_to_drop(r->pool, flow_cookies(r), flow->created,
                                    strlen(name) + strlen(cookie_value) + 2);
    for (i = 0; i < drop->nelts; i++) {
        set_flow_cookie(r, sc, APR_ARRAY_IDX(drop, i, const char *), "", 0);
    }
    set_flow_cookie(r, sc, name, cookie_value, MSO_FLOW_LIFETIME);
    memset(&req, 0, sizeof(req));
    req.state = flow->state;
    req.nonce = flow->nonce;
    req.code_challenge = mso_pkce_s256(r->pool, flow->verifier);
    /* The person always sees which account is connected: Microsoft's account
     * picker, or, when the application names the mailbox, a sign-in as it
     * (Microsoft refuses select_account together with a login_hint). */
    req.login_hint = mailbox;
    req.prompt = mailbox ? "login" : "select_account";
    if (mailbox && asks_shared(c)) {
        /* The mailbox may be a shared one, which nobody signs in as: the
         * person picks their own account. */
        req.login_hint = NULL;
        req.prompt = "select_account";
    }
    req.scope = signin_scopes(r, c);
    return redirect(r, mso_authorize_url(r->pool, app_of(r, sc, c), &req));
}

static void http_opts(request_rec *r, mso_http_opts_t *o)
{
    msoauth_request_http_opts(msoauth_srv_conf(r->server), o);
    o->timeout_ms = TOKEN_TIMEOUT_MS;
}

/* True when the company asks for Mail.Read.Shared or Mail.ReadWrite.Shared:
 * its people may connect shared mailboxes they have Full Access to. */
static int asks_shared(const msoauth_company_t *c)
{
    const apr_array_header_t *s = c->set.scopes.value;
    int i;

    for (i = 0; s && i < s->nelts; i++) {
        const char *v = APR_ARRAY_IDX(s, i, const char *);

        if (mso_sync_scope_has(v, "Mail.Read.Shared")
            || mso_sync_scope_has(v, "Mail.ReadWrite.Shared")) {
            return 1;
        }
    }
    return 0;
}

/* Whether the person's token opens the shared mailbox asked for: Graph's
 * answer to its inbox, the one check that needs no permission beyond what
 * mirroring needs. APR_SUCCESS, or *f filled. */
static apr_status_t shared_reachable(request_rec *r, msoauth_company_t *c,
                                     const char *access_token, const char *shared, failure_t *f)
{
    mso_http_opts_t o;
    mso_http_response_t *resp = NULL;
    mso_graph_result_t g;
    const char *mr;
    apr_status_t rv;

    http_opts(r, &o);
    rv = mso_http_request(r->pool, &o, "GET",
                          apr_pstrcat(r->pool, mso_graph_mailbox(r->pool,
                                                                 c->set.graph_url.value, shared),
                                      "/mailFolders/inbox?$select=id", NULL),
                          mso_graph_headers(r->pool, access_token, 0), NULL, 0, &resp);
    mso_graph_classify(r->pool, rv, resp, &g);
    if (g.cls == MSO_GRAPH_OK) {
        return APR_SUCCESS;
    }
    mr = mso_graph_mailbox_reason(&g);
    f->reason = mr && !strcmp(mr, "mailbox_not_found") ? mr
                : g.cls == MSO_GRAPH_FORBIDDEN || mr ? "shared_access_denied"
                : g.cls == MSO_GRAPH_THROTTLED ? "throttled" : "graph_error";
    f->detail = apr_pstrcat(r->pool, "Graph, asked whether the signed-in person can open ",
                            shared, ", answered: ", mso_graph_result_text(r->pool, &g), NULL);
    return APR_EGENERAL;
}

/* Who signed in, as Graph says: the address of the object the ID token names.
 * The ID token's email / preferred_username are claims a user of another
 * tenant may set to anyone's address; Graph's /me answers for the object
 * itself. NULL with *f filled when it cannot be told. */
static const char *graph_mailbox(request_rec *r, msoauth_company_t *c, const char *access_token,
                                 const mso_id_claims_t *cl, failure_t *f)
{
    mso_http_opts_t o;
    mso_http_response_t *resp = NULL;
    mso_graph_result_t g;
    mso_graph_me_t me;
    const char *err = NULL, *addr;
    apr_status_t rv;

    http_opts(r, &o);
    rv = mso_http_request(r->pool, &o, "GET", mso_graph_me_url(r->pool,
                          c->set.graph_url.value), mso_graph_headers(r->pool, access_token, 0),
                          NULL, 0, &resp);
    mso_graph_classify(r->pool, rv, resp, &g);
    if (g.cls != MSO_GRAPH_OK) {
        f->reason = g.cls == MSO_GRAPH_THROTTLED ? "throttled" : "graph_error";
        f->detail = apr_pstrcat(r->pool, "Graph /me, asked which mailbox signed in, failed: ",
                                mso_graph_result_text(r->pool, &g), NULL);
        return NULL;
    }
    if (mso_graph_parse_me(r->pool, resp->body, resp->body_len, &me, &err) != APR_SUCCESS) {
        f->reason = "graph_error";
        f->detail = apr_pstrcat(r->pool, "Graph /me: ", err, NULL);
        return NULL;
    }
    if (!mso_graph_me_is_object(&me, cl->tid, cl->oid)) {
        f->reason = "id_token_invalid";
        f->detail = apr_psprintf(r->pool, "Graph /me names object %s, the ID token object %s",
                                 me.id, cl->oid);
        return NULL;
    }
    addr = mso_graph_me_address(r->pool, &me);
    if (!addr || mso_check_mailbox(addr)) {
        f->reason = "mailbox_not_found";
        f->detail = "Graph gives the signed-in account no mailbox address (mail or "
                    "userPrincipalName)";
        return NULL;
    }
    return addr;
}

static const char *jwt_problem(mso_jwt_result_e res)
{
    switch (res) {
    case MSO_JWT_MALFORMED: return "malformed";
    case MSO_JWT_BAD_ALG: return "algorithm";
    case MSO_JWT_UNKNOWN_KID: return "unknown signing key";
    case MSO_JWT_BAD_SIGNATURE: return "signature";
    case MSO_JWT_BAD_ISSUER: return "issuer";
    case MSO_JWT_BAD_AUDIENCE: return "audience";
    case MSO_JWT_BAD_NONCE: return "nonce";
    case MSO_JWT_EXPIRED: return "expired";
    case MSO_JWT_NOT_YET_VALID: return "not yet valid";
    case MSO_JWT_BAD_TENANT: return "tenant";
    default: return "ok";
    }
}

/* Everything after the state checks: code exchange, ID token, storage. */
static int complete(request_rec *r, msoauth_srv_conf_t *sc, mso_flow_t *flow, const char *code,
                    mso_db_t *db)
{
    const char *why = NULL, *mailbox, *err = NULL;
    msoauth_company_t *c;
    mso_app_t *app;
    mso_http_opts_t o;
    mso_token_result_t *tok;
    mso_id_expect_t expect;
    mso_id_claims_t *cl = NULL;
    mso_jwt_result_e jres;
    mso_connect_t in;
    mso_token_sealer_t sealer;
    mso_account_t *acct = NULL;
    failure_t f;
    apr_int64_t now = apr_time_sec(apr_time_now());
    apr_status_t rv;

    memset(&f, 0, sizeof(f));
    if (!(c = usable_company(r, sc, flow->company, &why))) {
        return fail_reason(r, sc, "not_configured", why, flow->return_to);
    }
    app = app_of(r, sc, c);
    http_opts(r, &o);
    mso_token_from_code(r->pool, &o, app, code, flow->verifier,
                        mso_token_scopes(r->pool, signin_scopes(r, c), mso_cloud_graph((mso_cloud_e)c->set.cloud.value),
                                         "graph"), &tok);
    if (!tok->ok) {
        f.reason = tok->reason;
        f.aadsts = tok->aadsts;
        f.trace_id = tok->trace_id;
        f.correlation_id = tok->correlation_id;
        f.detail = tok->detail;
        return fail(r, sc, &f, flow->return_to);
    }
    if (!tok->refresh_token || !tok->id_token) {
        return fail_reason(r, sc, "consent_required", "the token answer has no refresh token "
                           "or ID token: offline_access or openid was not granted",
                           flow->return_to);
    }

    memset(&expect, 0, sizeof(expect));
    expect.client_id = c->set.client_id.value;
    expect.nonce = flow->nonce;
    expect.tenant_id = mso_is_guid(c->set.tenant.value) ? c->set.tenant.value : NULL;
    expect.now = now;
    expect.skew = CLOCK_SKEW;
    rv = mso_discovery_verify(msoauth_discovery_cache(), r->pool, &o, app->authority,
                              tok->id_token, &expect, &jres, &cl, &why);
    if (rv != APR_SUCCESS) {
        return fail_reason(r, sc, "token_endpoint_unreachable", why, flow->return_to);
    }
    if (jres != MSO_JWT_OK) {
        f.reason = jres == MSO_JWT_BAD_TENANT && expect.tenant_id ? "wrong_tenant"
                   : "id_token_invalid";
        f.detail = apr_psprintf(r->pool, "ID token check failed (%s): %s", jwt_problem(jres),
                                why ? why : "");
        return fail(r, sc, &f, flow->return_to);
    }

    /* The Microsoft object is the account: an ID token without tid and oid
     * cannot name one. */
    if (!mso_is_guid(cl->tid) || !cl->oid || !*cl->oid) {
        return fail_reason(r, sc, "id_token_invalid", "the ID token has no tid or oid claim "
                           "(the profile scope is needed)", flow->return_to);
    }
    if (!(mailbox = graph_mailbox(r, c, tok->access_token, cl, &f))) {
        return fail(r, sc, &f, flow->return_to);
    }
    memset(&in, 0, sizeof(in));
    if (flow->mailbox && strcmp(flow->mailbox, mailbox) && asks_shared(c)) {
        /* A shared mailbox the person has Full Access to: their account,
         * that mailbox. */
        if (shared_reachable(r, c, tok->access_token, flow->mailbox, &f) != APR_SUCCESS) {
            return fail(r, sc, &f, flow->return_to);
        }
        ap_log_rerror(APLOG_MARK, APLOG_INFO, 0, r, MSOLOGNO(105) "%s connects shared mailbox "
                      "%s of company %s", ap_escape_logitem(r->pool, mailbox),
                      ap_escape_logitem(r->pool, flow->mailbox), c->name);
        in.shared = 1;
        mailbox = flow->mailbox;
    }
    else if (flow->mailbox && strcmp(flow->mailbox, mailbox)) {
        f.reason = "mailbox_mismatch";
        f.detail = apr_psprintf(r->pool, "asked for %s, signed in as %s", flow->mailbox,
                                mailbox);
        f.message = apr_psprintf(r->pool, "The application asked to connect %s, but %s signed "
                                 "in at Microsoft.", flow->mailbox, mailbox);
        return fail(r, sc, &f, flow->return_to);
    }
    /* The account is the person's (their Microsoft object): a mailbox bound
     * to another one is not taken over, and the tokens are sealed for the
     * account once its id is known. */
    in.company = c->name;
    in.client_id = c->set.client_id.value;
    in.tenant_id = cl->tid;
    in.object_id = cl->oid;
    in.mailbox = mailbox;
    in.display_name = in.shared ? NULL : cl->name;     /* a label only */
    in.scopes = tok->scope;
    in.authority = app->authority;
    in.access_expires_at = now + tok->expires_in;
    in.connected_by = flow->user;
    memset(&sealer, 0, sizeof(sealer));
    sealer.p = r->pool;
    sealer.keyring = sc->keyring;
    sealer.client_id = c->set.client_id.value;
    sealer.refresh_token = tok->refresh_token;
    sealer.access_token = tok->access_token;
    rv = mso_account_connect(db, r->pool, &in, mso_account_seal_tokens, &sealer, now, &acct,
                             &err);
    if (rv == MSO_ACCOUNT_OTHER_OBJECT || rv == MSO_ACCOUNT_ADDRESS_TAKEN) {
        f.reason = "mailbox_mismatch";
        f.detail = err;
        f.message = rv == MSO_ACCOUNT_OTHER_OBJECT
            ? apr_psprintf(r->pool, "%s is already connected for another Microsoft account. "
                           "Disconnect it first to connect a different one.", mailbox)
            : apr_psprintf(r->pool, "This Microsoft account is connected under another "
                           "address, and %s is connected as another account already. "
                           "Disconnect one of them first.", mailbox);
        return fail(r, sc, &f, flow->return_to);
    }
    if (rv != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, rv, r, MSOLOGNO(103) "storing the account %s of "
                      "company %s failed: %s", ap_escape_logitem(r->pool, mailbox), c->name,
                      err ? ap_escape_logitem(r->pool, err) : "");
        return HTTP_INTERNAL_SERVER_ERROR;
    }
    ap_log_rerror(APLOG_MARK, APLOG_NOTICE, 0, r, MSOLOGNO(104) "mailbox %s of company %s "
                  "%sconnected as account %" APR_INT64_T_FMT " (tenant %s, by %s)",
                  ap_escape_logitem(r->pool, mailbox), c->name,
                  acct->created_at != now ? "re" : "", acct->id,
                  ap_escape_logitem(r->pool, cl->tid),
                  flow->user ? ap_escape_logitem(r->pool, flow->user) : "anonymous");
    if (flow->return_to) {
        return redirect(r, back_to_app(r, flow->return_to,
                                       apr_psprintf(r->pool, "msoauth=connected&account=%"
                                                    APR_INT64_T_FMT, acct->id)));
    }
    return page(r, HTTP_OK, "Mailbox connected",
                apr_psprintf(r->pool, "<p>The mailbox <strong>%s</strong> is connected "
                             "(account %" APR_INT64_T_FMT "). You can close this window.</p>",
                             esc(r, mailbox), acct->id));
}

int msoauth_confirm_handler(request_rec *r)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(r->server);
    apr_table_t *args;
    const char *state, *code, *error, *cookie_value = NULL, *why;
    const mso_flow_cookie_t *fc;
    mso_flow_t *flow = NULL;
    mso_flow_check_e check;
    mso_db_t *db;
    apr_status_t rv;
    failure_t f;

    if (r->method_number != M_GET) {
        r->allowed = AP_METHOD_BIT << M_GET;
        return HTTP_METHOD_NOT_ALLOWED;
    }
    if (strcmp(r->uri, sc->redirect_path)) {
        return fail_reason(r, sc, "not_configured", apr_psprintf(r->pool, "msoauth-confirm "
                           "is mapped at %s but MSOAuthRedirectPath is %s: map it at exactly "
                           "MSOAuthRedirectPath", r->uri, sc->redirect_path), NULL);
    }
    if ((why = query(r, &args)) != NULL) {
        return fail_reason(r, sc, "bad_request", why, NULL);
    }
    state = apr_table_get(args, "state");
    if (!mso_flow_cookie_name(r->pool, state, 0)) {
        return fail_reason(r, sc, "state_invalid", "no or malformed state parameter", NULL);
    }
    fc = mso_flow_cookie_for(flow_cookies(r), state);
    if (fc) {
        cookie_value = fc->value;
        /* The cookie is spent whatever happens next. */
        set_flow_cookie(r, sc, fc->name, "", 0);
    }
    if (!cookie_value || !*cookie_value) {
        return fail_reason(r, sc, "state_invalid", "no sign-in cookie for this state (used "
                           "already, expired, another browser, or cookies blocked)", NULL);
    }
    check = mso_flow_open(r->pool, sc->keyring, state, cookie_value,
                          (long long)apr_time_sec(r->request_time), &flow);
    if (check == MSO_FLOW_INVALID) {
        return fail_reason(r, sc, "state_invalid", "the sign-in cookie does not open or does "
                           "not match the state", NULL);
    }
    if (check == MSO_FLOW_EXPIRED) {
        return fail_reason(r, sc, "state_expired", "the sign-in started more than 10 minutes "
                           "ago", flow->return_to);
    }

    if (!(db = msoauth_request_db(r))) {
        return HTTP_SERVICE_UNAVAILABLE;
    }
    /* Single use across every node: the first hit records the state. */
    rv = mso_flows_used_spend(db, r->pool, mso_flow_state_digest(r->pool, flow->state),
                              flow->expires, (apr_int64_t)apr_time_sec(r->request_time));
    if (rv == APR_EEXIST) {
        memset(&f, 0, sizeof(f));
        f.reason = "state_invalid";
        f.detail = "the callback was hit again for a sign-in already handled (reload or "
                   "double click)";
        f.title = "This sign-in was already handled";
        f.message = "The page was reloaded or the link opened twice; the first request "
                    "already completed this sign-in. Check the mailbox's status in the "
                    "application; if it is not connected, start again from the Connect link.";
        return fail(r, sc, &f, NULL);
    }
    if (rv != APR_SUCCESS) {
        ap_log_rerror(APLOG_MARK, APLOG_ERR, rv, r, MSOLOGNO(106) "recording the sign-in "
                      "state failed");
        return HTTP_SERVICE_UNAVAILABLE;
    }

    error = apr_table_get(args, "error");
    if (error) {
        const char *desc = apr_table_get(args, "error_description");
        memset(&f, 0, sizeof(f));
        f.aadsts = mso_aadsts_of(desc);
        f.reason = mso_reason_for_error(error, f.aadsts, 0);
        mso_error_ids(r->pool, desc, &f.trace_id, &f.correlation_id);
        f.detail = apr_psprintf(r->pool, "Microsoft redirected back with error=%s",
                                apr_pstrndup(r->pool, error, 64));
        return fail(r, sc, &f, flow->return_to);
    }
    code = apr_table_get(args, "code");
    if (!code || !*code || strlen(code) > 4096) {
        return fail_reason(r, sc, "bad_request", "no code parameter", flow->return_to);
    }
    return complete(r, sc, flow, code, db);
}
