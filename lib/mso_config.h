/* Checks of single configuration values and the per-cloud endpoints.
 * Every check returns NULL when the value is good, or a sentence for the
 * administrator that says what is wrong and how to fix it. */
#ifndef MSO_CONFIG_H
#define MSO_CONFIG_H

#include <apr_pools.h>
#include <apr_time.h>

typedef enum {
    MSO_CLOUD_GLOBAL = 0,
    MSO_CLOUD_USGOV,
    MSO_CLOUD_USGOV_DOD,
    MSO_CLOUD_CHINA
} mso_cloud_e;

typedef enum { MSO_EDITION_BASIC = 0, MSO_EDITION_PRO } mso_edition_e;

/* 8-4-4-4-12 hex digits, either case. */
int mso_is_guid(const char *s);
/* A client secret that is a GUID is almost always the Secret ID pasted in
 * place of the secret's Value. */
int mso_secret_looks_like_id(const char *secret);

const char *mso_check_guid(apr_pool_t *p, const char *value, const char *what);
const char *mso_check_company_name(apr_pool_t *p, const char *name);
const char *mso_check_cloud(apr_pool_t *p, const char *value, mso_cloud_e *cloud);
const char *mso_check_edition(apr_pool_t *p, const char *value, mso_edition_e *edition);
/* common | organizations | consumers | tenant GUID | verified domain name. */
const char *mso_check_tenant(apr_pool_t *p, const char *value);
/* Single-tenant when the tenant names one directory (GUID or domain). */
int mso_tenant_is_single(const char *tenant);
/* The public base URL: https, or http for a loopback host only; scheme and
 * authority only (no trailing slash, path, query, fragment, user info). */
const char *mso_check_base_url(apr_pool_t *p, const char *value);
/* Authority/Graph overrides: as the base URL, and also allowed a path prefix;
 * graph says whether the Graph form (no /v1.0 suffix) is checked. */
const char *mso_check_service_url(apr_pool_t *p, const char *value, int graph);
const char *mso_check_redirect_path(apr_pool_t *p, const char *value);
/* YYYY-MM-DD, a real calendar date; *when is 00:00 UTC of that day. */
const char *mso_check_date(apr_pool_t *p, const char *value, apr_time_t *when);
/* A well-known Outlook folder name (Graph section 6.3). */
const char *mso_check_folder(apr_pool_t *p, const char *value);
const char *mso_check_scope(apr_pool_t *p, const char *value);
/* 10 .. 86400 seconds. */
const char *mso_check_interval(apr_pool_t *p, const char *value, int *seconds);

/* True for localhost, 127.0.0.0/8 and [::1]. */
int mso_host_is_loopback(const char *host);

/* Hosts per cloud; the Graph root has no /v1.0. */
const char *mso_cloud_name(mso_cloud_e cloud);
const char *mso_cloud_authority(mso_cloud_e cloud);   /* https://login... */
const char *mso_cloud_graph(mso_cloud_e cloud);       /* https://graph... */
/* The Outlook resource of IMAP/SMTP tokens (https://outlook.office.com in the
 * global cloud; the national clouds' hosts are Microsoft's Exchange Online
 * endpoints there: override with MSOAuthOutlookURL if yours differs). */
const char *mso_cloud_outlook(mso_cloud_e cloud);
/* A byte count 0 .. 150 MiB (the largest message Exchange Online takes). */
const char *mso_check_bytes(apr_pool_t *p, const char *value, apr_int64_t *bytes);
/* Days 0 .. 3650. */
const char *mso_check_days(apr_pool_t *p, const char *value, int *days);
/* True for common, organizations and consumers: no single directory. */
int mso_tenant_is_multi(const char *tenant);

/* Days from now until when, rounded down (negative once passed). */
long mso_days_until(apr_time_t when, apr_time_t now);

/* Trims ASCII white space at both ends, in place. */
char *mso_trim(char *s);

#endif
