/* The local API: the token handler and the admin handler (status page,
 * connection test, sync now, disconnect). */
#ifndef MOD_MSOAUTH_ADMIN_H
#define MOD_MSOAUTH_ADMIN_H

#include <httpd.h>
#include <jansson.h>

#include "mso_account.h"
#include "mso_db.h"

int msoauth_token_handler(request_rec *r);
int msoauth_admin_handler(request_rec *r);

/* The local API's JSON answers, shared by its handlers: j (consumed) with
 * no-store and nosniff; an error {"ok":false, reason, message and fix of a
 * known reason, detail}. */
int msoauth_send_json(request_rec *r, int status, json_t *j);
int msoauth_json_error(request_rec *r, int status, const char *reason, const char *detail);

/* A positive decimal ID of at most 18 digits (*id), or 0. */
int msoauth_parse_id(const char *s, apr_int64_t *id);

/* An access token for account a, for other handlers that call Graph. */
typedef struct {
    const char *token;          /* NULL on failure */
    const char *scope;
    apr_int64_t expires_at;
    const char *reason;         /* set on failure: a reason code */
    const char *detail;
    long aadsts;
} msoauth_token_t;

/* A token of the account for resource ("graph", or an Outlook resource URL)
 * valid at least 5 more minutes: the stored one, or a fresh one under the
 * account's lease (waiting for the job when it refreshes the account). */
void msoauth_account_token(request_rec *r, mso_db_t *db, mso_account_t *a,
                           const char *resource, msoauth_token_t *t);

#endif
