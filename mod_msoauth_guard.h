/* The checks every handler of the local API (token, admin, metrics) makes
 * before anything else, on top of Apache's own Require: no request that came
 * through a proxy (unless MSOAuthTrustProxy on), the API key when
 * MSOAuthAPIKeyFile is set, and a Host that names this server. */
#ifndef MOD_MSOAUTH_GUARD_H
#define MOD_MSOAUTH_GUARD_H

#include <httpd.h>

typedef enum {
    MSOAUTH_GUARD_KEY_REQUIRED = 0, /* the API key is needed when one is configured */
    MSOAUTH_GUARD_KEY_OPTIONAL      /* a browser page with its own CSRF defence */
} msoauth_guard_key_e;

/* DECLINED when the request may go on; otherwise the answer was sent (a JSON
 * error naming the reason) and the handler returns what this returns (OK).
 * *has_key (optional) says whether the request carried the right API key. */
int msoauth_guard(request_rec *r, msoauth_guard_key_e key, int *has_key);

#endif
