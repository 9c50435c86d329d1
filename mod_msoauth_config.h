/* The configuration: directives, per-server and per-company settings with
 * their inheritance, per-directory settings, and the start-up checks. */
#ifndef MOD_MSOAUTH_CONFIG_H
#define MOD_MSOAUTH_CONFIG_H

#include <httpd.h>
#include <http_config.h>

#include "mso_config.h"
#include "mso_crypto.h"
#include "mso_http.h"
#include "mso_settings.h"

#define MSOAUTH_DEFAULT_COMPANY "default"
#define MSOAUTH_DEFAULT_REDIRECT_PATH "/microsoft_outlook/confirm"
#define MSOAUTH_SECRET_WARN_DAYS 30

/* A company as used at run time: every setting resolved (given at some level
 * or defaulted). */
typedef struct {
    const char *name;
    const char *defined_at;         /* file:line of its section, or of the vhost */
    server_rec *s;
    mso_settings_t set;
    apr_array_header_t *mailboxes;  /* MSOAuthMailbox (const char *, lower case), or NULL */
} msoauth_company_t;

/* A <MSOAuthCompany> section as written. */
typedef struct {
    const char *name;
    const char *defined_at;
    mso_settings_t set;
    apr_array_header_t *mailboxes;  /* MSOAuthMailbox, only in a section */
    const char *mailboxes_at;
} msoauth_company_decl_t;

typedef struct {
    mso_settings_t level;           /* given outside any company section */
    apr_hash_t *decls;              /* name -> msoauth_company_decl_t*, this level only */
    msoauth_company_decl_t *current;/* while a section is being read */
    const char *base_url;           const char *base_url_at;
    const char *redirect_path;
    mso_keyring_t *keyring;         const char *keyring_at;
    apr_array_header_t *key_files;  /* const char *, for messages */
    const char *api_key;            /* MSOAuthAPIKeyFile's key, NULL when not set */
    const char *api_key_file;
    int retention_days;             /* -1: not given (30) */
    const char *http_proxy;         /* MSOAuthHTTPProxy: calls to Microsoft go through it */
    const char *ca_file;            /* MSOAuthCACertificateFile: trust for those calls */

    /* Filled by msoauth_config_finalize. */
    server_rec *s;
    int is_main;
    apr_hash_t *companies;          /* name -> msoauth_company_t* */
    int in_use;                     /* a company with a client ID */
    const char *effective_base_url;
    const char *redirect_uri;       /* base URL + redirect path: register it in Azure */
} msoauth_srv_conf_t;

/* Per directory (<Location>): only what a location decides. */
typedef struct {
    int trust_proxy;                /* -1: not given (off) */
} msoauth_dir_conf_t;

void *msoauth_create_srv_conf(apr_pool_t *p, server_rec *s);
void *msoauth_merge_srv_conf(apr_pool_t *p, void *basev, void *addv);
void *msoauth_create_dir_conf(apr_pool_t *p, char *dir);
void *msoauth_merge_dir_conf(apr_pool_t *p, void *basev, void *addv);
extern const command_rec msoauth_cmds[];

/* Resolves inheritance for every server and company and checks what can only
 * be checked as a whole. Logs each problem once; returns the number of
 * errors (startup must stop when > 0). expired_level is the log level for an
 * already expired secret: a warning in configtest, an error at a real start. */
int msoauth_config_finalize(apr_pool_t *p, server_rec *main_s, int log_warnings,
                            int expired_level);

msoauth_srv_conf_t *msoauth_srv_conf(server_rec *s);
msoauth_dir_conf_t *msoauth_dir_conf(request_rec *r);
/* The company of that name on s, or NULL. */
msoauth_company_t *msoauth_company(server_rec *s, const char *name);
/* The company an account belongs to on s: its name, and the client ID it was
 * connected with (several virtual hosts on one database may each have a
 * company of that name with other credentials). NULL when s has none. */
msoauth_company_t *msoauth_account_company(server_rec *s, const char *name,
                                           const char *client_id);
/* True when the server has a company with credentials (set at finalize). */
int msoauth_server_in_use(server_rec *s);
/* True when the company can authenticate: a client ID and a secret or a
 * certificate. */
int msoauth_company_has_credentials(const msoauth_company_t *c);

#define MSOAUTH_DEFAULT_RETENTION_DAYS 30

/* The days MSOAuthRetentionDays keeps done work (0: forever). */
int msoauth_retention_days(const msoauth_srv_conf_t *sc);

/* HTTP options for a call to Microsoft made for server sc: the defaults with
 * MSOAuthHTTPProxy and MSOAuthCACertificateFile. Every call to Microsoft
 * (sign-in, refreshes, Graph, the admin test) starts from here. */
void msoauth_http_opts(const msoauth_srv_conf_t *sc, mso_http_opts_t *o);
/* The same, for a request handler's calls: the thread keeps its connections. */
void msoauth_request_http_opts(const msoauth_srv_conf_t *sc, mso_http_opts_t *o);

#endif
