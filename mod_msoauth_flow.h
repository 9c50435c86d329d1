/* Connecting a mailbox: the connect and confirm handlers. */
#ifndef MOD_MSOAUTH_FLOW_H
#define MOD_MSOAUTH_FLOW_H

#include <httpd.h>

int msoauth_connect_handler(request_rec *r);
int msoauth_confirm_handler(request_rec *r);

#endif
