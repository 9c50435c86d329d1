/* The local API: the token handler and the admin handler (status page,
 * connection test, sync now, disconnect). */
#ifndef MOD_MSOAUTH_ADMIN_H
#define MOD_MSOAUTH_ADMIN_H

#include <httpd.h>

#include "mso_account.h"
#include "mso_db.h"

int msoauth_token_handler(request_rec *r);
int msoauth_admin_handler(request_rec *r);

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
