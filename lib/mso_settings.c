/* The inheritable company settings (see mso_settings.h). */
#include <stddef.h>
#include <string.h>

#include "mso_config.h"
#include "mso_settings.h"

#define FIELD(directive, member, kind) \
    {directive, offsetof(mso_settings_t, member), MSO_SETTING_##kind}

static const mso_setting_field_t fields[] = {
    FIELD("MSOAuthClientID", client_id, STR),
    FIELD("MSOAuthClientSecret", client_secret, SECRET),
    FIELD("MSOAuthSecretExpires", secret_expires, DATE),
    FIELD("MSOAuthTenant", tenant, STR),
    FIELD("MSOAuthCloud", cloud, INT),
    FIELD("MSOAuthAuthorityURL", authority_url, STR),
    FIELD("MSOAuthGraphURL", graph_url, STR),
    FIELD("MSOAuthEdition", edition, INT),
    FIELD("MSOAuthScope", scopes, LIST),
    FIELD("MSOAuthSyncFolders", folders, LIST),
    FIELD("MSOAuthSyncInterval", sync_interval, INT),
    FIELD("MSOAuthClientCertificateFile", client_cert, CERT),
    FIELD("MSOAuthAppOnly", app_only, INT),
    FIELD("MSOAuthOutlookURL", outlook_url, STR),
    FIELD("MSOAuthAttachmentMaxBytes", attachment_max_bytes, I64),
    {NULL, 0, MSO_SETTING_STR}
};

const mso_setting_field_t *mso_settings_fields(void)
{
    return fields;
}

apr_size_t mso_setting_size(mso_setting_kind_e kind)
{
    switch (kind) {
    case MSO_SETTING_STR: return sizeof(mso_setting_str_t);
    case MSO_SETTING_INT: return sizeof(mso_setting_int_t);
    case MSO_SETTING_I64: return sizeof(mso_setting_i64_t);
    case MSO_SETTING_LIST: return sizeof(mso_setting_list_t);
    case MSO_SETTING_DATE: return sizeof(mso_setting_date_t);
    case MSO_SETTING_SECRET: return sizeof(mso_setting_secret_t);
    case MSO_SETTING_CERT: return sizeof(mso_setting_cert_t);
    }
    return 0;
}

int mso_setting_given(const mso_settings_t *s, const mso_setting_field_t *f)
{
    const char *at = (const char *)s + f->offset;

    switch (f->kind) {
    case MSO_SETTING_STR: return ((const mso_setting_str_t *)at)->value != NULL;
    case MSO_SETTING_INT: return ((const mso_setting_int_t *)at)->given;
    case MSO_SETTING_I64: return ((const mso_setting_i64_t *)at)->given;
    case MSO_SETTING_LIST: return ((const mso_setting_list_t *)at)->value != NULL;
    case MSO_SETTING_DATE: return ((const mso_setting_date_t *)at)->value != 0;
    case MSO_SETTING_SECRET: return ((const mso_setting_secret_t *)at)->value != NULL;
    case MSO_SETTING_CERT: return ((const mso_setting_cert_t *)at)->cert != NULL;
    }
    return 0;
}

void mso_settings_init(mso_settings_t *s)
{
    memset(s, 0, sizeof(*s));
}

void mso_settings_merge(mso_settings_t *out, const mso_settings_t *base,
                        const mso_settings_t *add)
{
    const mso_setting_field_t *f;

    for (f = fields; f->directive; f++) {
        const mso_settings_t *from = mso_setting_given(add, f) ? add : base;

        memcpy((char *)out + f->offset, (const char *)from + f->offset,
               mso_setting_size(f->kind));
    }
}

static apr_array_header_t *one(apr_pool_t *p, const char *v)
{
    apr_array_header_t *a = apr_array_make(p, 1, sizeof(const char *));

    APR_ARRAY_PUSH(a, const char *) = v;
    return a;
}

void mso_settings_resolve(apr_pool_t *p, mso_settings_t *s)
{
    /* The cloud first: the hosts' defaults depend on it. */
    if (!s->cloud.given) {
        s->cloud.value = MSO_CLOUD_GLOBAL;
        s->cloud.given = 1;
    }
    if (!s->tenant.value) {
        s->tenant.value = MSO_DEFAULT_TENANT;
    }
    if (!s->authority_url.value) {
        s->authority_url.value = mso_cloud_authority((mso_cloud_e)s->cloud.value);
    }
    if (!s->graph_url.value) {
        s->graph_url.value = mso_cloud_graph((mso_cloud_e)s->cloud.value);
    }
    if (!s->edition.given) {
        s->edition.value = MSO_EDITION_BASIC;
        s->edition.given = 1;
    }
    if (!s->scopes.value) {
        s->scopes.value = apr_array_make(p, 1, sizeof(const char *));
    }
    if (!s->folders.value) {
        s->folders.value = one(p, MSO_DEFAULT_FOLDER);
    }
    if (!s->sync_interval.given) {
        s->sync_interval.value = MSO_DEFAULT_SYNC_INTERVAL;
        s->sync_interval.given = 1;
    }
    if (!s->app_only.given) {
        s->app_only.value = 0;
        s->app_only.given = 1;
    }
    if (!s->outlook_url.value) {
        s->outlook_url.value = mso_cloud_outlook((mso_cloud_e)s->cloud.value);
    }
    if (!s->attachment_max_bytes.given) {
        s->attachment_max_bytes.value = MSO_DEFAULT_ATTACHMENT_MAX;
        s->attachment_max_bytes.given = 1;
    }
}
