/* Shared between the httpd glue files: the per-server and per-company
 * configuration of mod_msoauth. */
#ifndef MOD_MSOAUTH_H
#define MOD_MSOAUTH_H

#include <httpd.h>
#include <http_config.h>
#include <apr_dbd.h>
#include <mod_dbd.h>

#include "mso_config.h"
#include "mso_crypto.h"
#include "mso_http.h"
#include "mso_refresh.h"

extern module AP_MODULE_DECLARE_DATA msoauth_module;

/* Our own log tags (not httpd's AH numbers): MSOLOGNO(012) -> "MSO012: ". */
#define MSOLOGNO(n) "MSO" #n ": "

#define MSOAUTH_DEFAULT_COMPANY "default"
#define MSOAUTH_DEFAULT_REDIRECT_PATH "/microsoft_outlook/confirm"
#define MSOAUTH_DEFAULT_INTERVAL 60
#define MSOAUTH_SECRET_WARN_DAYS 30
#define MSOAUTH_REFRESH_MARGIN 600      /* refresh 10 minutes before the access token expires */
#define MSOAUTH_KEEPALIVE (14 * 86400)  /* and every 14 days at least: 90-day inactivity limit */
#define MSOAUTH_LEASE_SECONDS 90        /* longer than a token call may take (30 s) */

/* What a company can set. NULL / -1 mean "not given here": the value is then
 * inherited (company <- virtual host <- main server). Each value remembers
 * where it was given (file:line) for messages. */
typedef struct {
    const char *client_id;          const char *client_id_at;
    const char *client_secret;      const char *client_secret_at;
    const char *secret_file;        /* path when the secret came from a file */
    apr_time_t secret_expires;      const char *secret_expires_at; /* 0 = not given */
    const char *secret_expires_text;
    const char *tenant;
    int cloud;                      /* mso_cloud_e or -1 */
    const char *authority_url;
    const char *graph_url;
    int edition;                    /* mso_edition_e or -1 */
    apr_array_header_t *scopes;     /* const char * */
    apr_array_header_t *folders;    /* const char * */
    int sync_interval;              /* seconds or -1 */
} msoauth_settings_t;

/* A company as used at run time: every value resolved. */
typedef struct {
    const char *name;
    const char *defined_at;         /* file:line of its section, or of the vhost */
    server_rec *s;
    const char *client_id;          /* NULL: no credentials anywhere */
    const char *client_secret;
    const char *secret_at;          /* where the secret was given */
    const char *secret_file;        /* its file, when read from one */
    apr_time_t secret_expires;      /* 0: unknown */
    const char *secret_expires_text;
    const char *secret_expires_at;
    const char *tenant;
    mso_cloud_e cloud;
    const char *authority_url;      /* without trailing slash */
    const char *graph_url;          /* root, without /v1.0 */
    mso_edition_e edition;
    apr_array_header_t *scopes;
    apr_array_header_t *folders;
    int sync_interval;
} msoauth_company_t;

/* A <MSOAuthCompany> section as written. */
typedef struct {
    const char *name;
    const char *defined_at;
    msoauth_settings_t set;
} msoauth_company_decl_t;

typedef struct {
    msoauth_settings_t level;       /* given outside any company section */
    apr_hash_t *decls;              /* name -> msoauth_company_decl_t*, this level only */
    msoauth_company_decl_t *current;/* while a section is being read */
    const char *base_url;           const char *base_url_at;
    const char *redirect_path;
    mso_keyring_t *keyring;         const char *keyring_at;
    apr_array_header_t *key_files;  /* const char *, for messages */

    /* Filled by msoauth_config_finalize. */
    server_rec *s;
    int is_main;
    apr_hash_t *companies;          /* name -> msoauth_company_t* */
    const char *effective_base_url;
    const char *redirect_uri;       /* base URL + redirect path: register it in Azure */
} msoauth_srv_conf_t;

void *msoauth_create_srv_conf(apr_pool_t *p, server_rec *s);
void *msoauth_merge_srv_conf(apr_pool_t *p, void *basev, void *addv);
extern const command_rec msoauth_cmds[];

/* Resolves inheritance for every server and company and checks what can only
 * be checked as a whole. Logs each problem once; returns the number of
 * errors (startup must stop when > 0). warn_level is the level for an already
 * expired secret: a warning in configtest, an error at a real start. */
int msoauth_config_finalize(apr_pool_t *p, server_rec *main_s, int log_warnings,
                            int expired_level);

msoauth_srv_conf_t *msoauth_srv_conf(server_rec *s);

/* True when the server has a company with credentials. */
int msoauth_server_in_use(server_rec *s);

/* The background job (mod_msoauth_job.c). */
apr_status_t msoauth_job_register(apr_pool_t *pconf, server_rec *main_s);
void msoauth_job_child_init(apr_pool_t *pchild);
const char *msoauth_lease_owner(apr_pool_t *p);
/* This child process's lease owner (request handlers). */
const char *msoauth_process_owner(void);
/* What a refresh of one of company c's accounts needs. */
void msoauth_refresh_ctx(apr_pool_t *p, msoauth_srv_conf_t *sc, msoauth_company_t *c,
                         const char *owner, mso_http_opts_t *http, mso_refresh_ctx_t *ctx);

/* Handlers (mod_msoauth_flow.c, mod_msoauth_admin.c). */
int msoauth_token_handler(request_rec *r);
int msoauth_admin_handler(request_rec *r);
int msoauth_connect_handler(request_rec *r);
int msoauth_confirm_handler(request_rec *r);

/* mod_dbd through its optional functions, so that a missing mod_dbd is our
 * clear start-up error rather than an unresolved symbol. NULL without mod_dbd. */
ap_dbd_t *msoauth_dbd_acquire(request_rec *r);

/* The process's cache of discovery documents and signing keys. */
struct mso_discovery_cache_t *msoauth_discovery_cache(void);
msoauth_company_t *msoauth_company(server_rec *s, const char *name);

#endif
