/* The background job on mod_watchdog: token refreshes and Graph work. */
#ifndef MOD_MSOAUTH_JOB_H
#define MOD_MSOAUTH_JOB_H

#include <httpd.h>

#include "mod_msoauth_config.h"
#include "mso_apptoken.h"
#include "mso_http.h"
#include "mso_refresh.h"

#define MSOAUTH_REFRESH_MARGIN 600      /* refresh 10 minutes before the access token expires */
#define MSOAUTH_KEEPALIVE (14 * 86400)  /* and every 14 days at least: 90-day inactivity limit */
#define MSOAUTH_LEASE_SECONDS 90        /* longer than a token call may take (30 s) */

apr_status_t msoauth_job_register(apr_pool_t *pconf, server_rec *main_s);
void msoauth_job_child_init(apr_pool_t *pchild);

/* What a refresh of one of company c's accounts needs. */
void msoauth_refresh_ctx(apr_pool_t *p, msoauth_srv_conf_t *sc, msoauth_company_t *c,
                         const char *owner, mso_http_opts_t *http, mso_refresh_ctx_t *ctx);

/* App-only companies: which application token (resource "graph" or
 * "outlook"), and what fetching it needs. */
void msoauth_app_key(msoauth_company_t *c, const char *resource, mso_apptoken_key_t *k);
void msoauth_app_ctx(apr_pool_t *p, msoauth_srv_conf_t *sc, msoauth_company_t *c,
                     const char *owner, mso_http_opts_t *http, mso_apptoken_ctx_t *ctx);

#endif
