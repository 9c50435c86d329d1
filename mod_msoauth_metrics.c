/* The metrics handler: what the database says (lib/mso_metrics) and what the
 * configuration says (secret and certificate expiry, the version), in
 * Prometheus' text format. Guarded like the token handler: the API key when
 * one is configured, no proxies, a Host of this server. */
#include <string.h>

#include <apr_strings.h>

#include <httpd.h>
#include <http_config.h>
#include <http_log.h>
#include <http_protocol.h>

#include "mod_msoauth.h"
#include "mod_msoauth_config.h"
#include "mod_msoauth_guard.h"
#include "mod_msoauth_metrics.h"
#include "mso_cert.h"
#include "mso_config.h"
#include "mso_metrics.h"

APLOG_USE_MODULE(msoauth);

/* An account belongs here when this server has its company with the client
 * ID it was connected with (another virtual host may share the database). */
static int mine(void *baton, const char *company, const char *client_id)
{
    return msoauth_account_company((server_rec *)baton, company, client_id) != NULL;
}

static void config_metrics(request_rec *r, msoauth_srv_conf_t *sc, mso_metrics_t *m)
{
    mso_metric_family_t *secret = NULL, *cert = NULL;
    apr_hash_index_t *hi;
    apr_time_t now = apr_time_now();

    mso_metrics_set(mso_metrics_family(m, "msoauth_info", MSO_METRIC_GAUGE,
                                       "The module's version"), 1, "version", MSO_VERSION,
                    NULL);
    for (hi = apr_hash_first(r->pool, sc->companies); hi; hi = apr_hash_next(hi)) {
        msoauth_company_t *c = apr_hash_this_val(hi);

        if (c->set.secret_expires.value) {
            if (!secret) {
                secret = mso_metrics_family(m, "msoauth_secret_expiry_days", MSO_METRIC_GAUGE,
                                            "Days until the company's client secret expires "
                                            "(MSOAuthSecretExpires; negative: expired)");
            }
            mso_metrics_set(secret, (double)mso_days_until(c->set.secret_expires.value, now),
                            "company", c->name, NULL);
        }
        if (c->set.client_cert.cert) {
            if (!cert) {
                cert = mso_metrics_family(m, "msoauth_certificate_expiry_days",
                                          MSO_METRIC_GAUGE, "Days until the company's "
                                          "certificate expires (negative: expired)");
            }
            mso_metrics_set(cert, (double)mso_days_until(
                                mso_cert_not_after(c->set.client_cert.cert), now),
                            "company", c->name, NULL);
        }
    }
}

int msoauth_metrics_handler(request_rec *r)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(r->server);
    apr_array_header_t *companies;
    apr_hash_index_t *hi;
    mso_metrics_t *m;
    mso_db_t *db;
    int rc;

    if ((rc = msoauth_guard(r, MSOAUTH_GUARD_KEY_REQUIRED, NULL)) != DECLINED) {
        return rc;
    }
    if (r->method_number != M_GET) {
        r->allowed = AP_METHOD_BIT << M_GET;
        return HTTP_METHOD_NOT_ALLOWED;
    }
    apr_table_setn(r->err_headers_out, "Cache-Control", "no-store");
    apr_table_setn(r->err_headers_out, "X-Content-Type-Options", "nosniff");
    ap_set_content_type(r, "text/plain; version=0.0.4; charset=utf-8");
    m = mso_metrics_make(r->pool);
    companies = apr_array_make(r->pool, 4, sizeof(const char *));
    for (hi = apr_hash_first(r->pool, sc->companies); hi; hi = apr_hash_next(hi)) {
        APR_ARRAY_PUSH(companies, const char *) = apr_hash_this_key(hi);
    }
    db = msoauth_request_db(r);
    if (!db || mso_metrics_collect(db, r->pool, apr_time_sec(apr_time_now()), mine, r->server,
                                   companies, m) != APR_SUCCESS) {
        /* Never a page of zeros that looks like "nothing connected". */
        r->status = HTTP_SERVICE_UNAVAILABLE;
        ap_rprintf(r, "# mod_msoauth: %s is unavailable: see the error log "
                   "(DBDriver/DBDParams)\n", db ? mso_db_name(db) : "the database");
        return OK;
    }
    config_metrics(r, sc, m);
    ap_rputs(mso_metrics_render(r->pool, m), r);
    return OK;
}
