/* The settings a company inherits (company <- virtual host <- main server):
 * one field table drives their initialisation, the merge of two levels and
 * the defaults applied to what no level gave, so a new setting cannot be
 * forgotten in one of the three. */
#ifndef MSO_SETTINGS_H
#define MSO_SETTINGS_H

#include <apr_pools.h>
#include <apr_tables.h>
#include <apr_time.h>

#include "mso_cert.h"

/* Each setting is its value and where it was given ("file:line"), moved as a
 * whole by the merge. A zeroed setting is "not given". Every variant is a
 * multiple of 8 bytes without padding, so the field table can be checked
 * against sizeof(mso_settings_t). */
typedef struct {
    const char *value;
    const char *at;
} mso_setting_str_t;

typedef struct {
    int value;
    int given;
    const char *at;
} mso_setting_int_t;

typedef struct {
    apr_int64_t value;
    int given;
    int unused;
    const char *at;
} mso_setting_i64_t;

typedef struct {
    apr_array_header_t *value;      /* const char *, never empty when given */
    const char *at;
} mso_setting_list_t;

typedef struct {
    apr_time_t value;               /* 00:00 UTC of the day; 0 = not given */
    const char *text;               /* as written, YYYY-MM-DD */
    const char *at;
} mso_setting_date_t;

/* The client secret travels with the file it came from (for messages). */
typedef struct {
    const char *value;
    const char *file;               /* NULL when given inline */
    const char *at;
} mso_setting_secret_t;

/* The certificate credential, loaded when the directive is read. */
typedef struct {
    const char *cert_file;
    const char *key_file;           /* NULL: the key is in cert_file */
    const char *at;
    mso_cert_t *cert;               /* NULL = not given */
} mso_setting_cert_t;

typedef struct {
    mso_setting_str_t client_id;
    mso_setting_secret_t client_secret;
    mso_setting_date_t secret_expires;
    mso_setting_str_t tenant;       /* default common */
    mso_setting_int_t cloud;        /* mso_cloud_e; default global */
    mso_setting_str_t authority_url;/* default: the cloud's sign-in host */
    mso_setting_str_t graph_url;    /* default: the cloud's Graph root */
    mso_setting_int_t edition;      /* mso_edition_e; default basic */
    mso_setting_list_t scopes;      /* default: none (an empty list) */
    mso_setting_list_t folders;     /* default: inbox */
    mso_setting_int_t sync_interval;/* seconds; default 60 */
    mso_setting_cert_t client_cert; /* used instead of the secret when given */
    mso_setting_int_t app_only;     /* application permissions; default off */
    mso_setting_str_t outlook_url;  /* IMAP/SMTP resource; default: the cloud's */
    mso_setting_i64_t attachment_max_bytes; /* default 10 MiB */
} mso_settings_t;

#define MSO_DEFAULT_TENANT "common"
#define MSO_DEFAULT_FOLDER "inbox"
#define MSO_DEFAULT_SYNC_INTERVAL 60
#define MSO_DEFAULT_ATTACHMENT_MAX (10 * 1024 * 1024)

typedef enum {
    MSO_SETTING_STR, MSO_SETTING_INT, MSO_SETTING_I64, MSO_SETTING_LIST, MSO_SETTING_DATE,
    MSO_SETTING_SECRET, MSO_SETTING_CERT
} mso_setting_kind_e;

typedef struct {
    const char *directive;          /* the directive that sets it, for messages and docs */
    apr_size_t offset;              /* in mso_settings_t */
    mso_setting_kind_e kind;
} mso_setting_field_t;

/* The table, ending with a NULL directive. */
const mso_setting_field_t *mso_settings_fields(void);

/* Size in bytes of one setting of kind (what the merge moves). */
apr_size_t mso_setting_size(mso_setting_kind_e kind);
/* True when the setting at field was given at its level. */
int mso_setting_given(const mso_settings_t *s, const mso_setting_field_t *field);

/* Nothing given. */
void mso_settings_init(mso_settings_t *s);
/* add over base: each setting add gives wins as a whole, the rest comes from base. */
void mso_settings_merge(mso_settings_t *out, const mso_settings_t *base,
                        const mso_settings_t *add);
/* Fills what no level gave with its default (the cloud's hosts, common, basic,
 * inbox, 60 s, app-only off, 10 MiB); values given keep their "at", defaults
 * have at NULL. */
void mso_settings_resolve(apr_pool_t *p, mso_settings_t *s);

#endif
