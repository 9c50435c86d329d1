/* The local API: the token handler and the admin handler (status page,
 * connection test, sync now, disconnect). */
#ifndef MOD_MSOAUTH_ADMIN_H
#define MOD_MSOAUTH_ADMIN_H

#include <httpd.h>

int msoauth_token_handler(request_rec *r);
int msoauth_admin_handler(request_rec *r);

#endif
