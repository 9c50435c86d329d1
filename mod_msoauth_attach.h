/* The attachment handler: an attachment's bytes from the mirror, or from
 * Graph on demand. */
#ifndef MOD_MSOAUTH_ATTACH_H
#define MOD_MSOAUTH_ATTACH_H

#include <httpd.h>

/* GET ?account=ID&message=GRAPH_ID&attachment=ID (SetHandler
 * msoauth-attachment), guarded like the token handler. */
int msoauth_attachment_handler(request_rec *r);

#endif
