/* The state of one sign-in in flight, carried by the browser in a sealed
 * cookie (nothing is kept in server memory), and the checks of the values a
 * Connect link brings. */
#ifndef MSO_FLOW_H
#define MSO_FLOW_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_crypto.h"

#define MSO_FLOW_LIFETIME 600       /* seconds: a sign-in must finish in 10 minutes */
#define MSO_FLOW_COOKIE_PREFIX "msoauth_flow_"
#define MSO_FLOW_MAX_COOKIES 5      /* sign-ins in flight per browser; older ones are dropped */
/* Bytes our flow cookies may take in one Cookie header, with the new one:
 * well inside httpd's LimitRequestFieldSize (8190) next to the site's own
 * cookies, so a few long return_to values cannot lock sign-ins out. */
#define MSO_FLOW_MAX_BYTES 4096

typedef struct {
    const char *state;          /* random, echoed by Microsoft */
    const char *nonce;          /* random, echoed in the ID token */
    const char *verifier;       /* PKCE code verifier */
    const char *company;
    const char *mailbox;        /* requested, lower case; NULL when not given */
    const char *return_to;      /* same-origin path; NULL when not given */
    const char *user;           /* r->user at connect; NULL when anonymous */
    long long created;          /* epoch seconds */
    long long expires;
} mso_flow_t;

/* A new flow with fresh random state, nonce and verifier; NULL when the
 * random generator failed. */
mso_flow_t *mso_flow_new(apr_pool_t *p, const char *company, const char *mailbox,
                         const char *return_to, const char *user, long long now);

/* Cookie name for a flow: prefix, creation time (base 36) and a part of the
 * state, so several sign-ins can run in one browser at once and the oldest can
 * be found without opening any. NULL for a state that cannot be ours. */
const char *mso_flow_cookie_name(apr_pool_t *p, const char *state, long long created);

typedef struct {
    const char *name, *value;
    long long created;
    const char *state_part;     /* the first 16 characters of its state */
} mso_flow_cookie_t;

/* Our flow cookies in a Cookie header (mso_flow_cookie_t), oldest first;
 * anything else in the header is ignored. */
apr_array_header_t *mso_flow_cookies(apr_pool_t *p, const char *cookie_header);
/* The cookie of state among them, or NULL. */
const mso_flow_cookie_t *mso_flow_cookie_for(const apr_array_header_t *cookies,
                                             const char *state);
/* Names of the cookies to drop before one more of new_bytes (name, value and
 * separators) is added: the expired ones, and the oldest while more than
 * MSO_FLOW_MAX_COOKIES or MSO_FLOW_MAX_BYTES would remain (too many or too
 * large make the browser's requests too large for the server). */
apr_array_header_t *mso_flow_cookies_to_drop(apr_pool_t *p, const apr_array_header_t *cookies,
                                             long long now, apr_size_t new_bytes);

/* A one-way digest of a state, recorded to make each state single-use
 * without storing the state itself. */
const char *mso_flow_state_digest(apr_pool_t *p, const char *state);

/* Seals the flow into a cookie value; the state is bound as associated data.
 * APR_EINVAL when a field is not valid UTF-8 (JSON cannot carry it). */
apr_status_t mso_flow_seal(apr_pool_t *p, const mso_keyring_t *kr, const mso_flow_t *flow,
                           const char **value);

typedef enum {
    MSO_FLOW_VALID = 0,
    MSO_FLOW_INVALID,           /* tampered, foreign, another state, unknown key */
    MSO_FLOW_EXPIRED
} mso_flow_check_e;

/* Opens a cookie value for the state Microsoft sent back. */
mso_flow_check_e mso_flow_open(apr_pool_t *p, const mso_keyring_t *kr, const char *state,
                               const char *value, long long now, mso_flow_t **flow);

/* NULL when acceptable, else why not. A return_to must be a relative path on
 * this origin: starts with one '/', no scheme, no "//" or "/\", no control
 * characters, at most 2048 bytes. */
const char *mso_check_return_to(const char *return_to);
/* An e-mail address of sane shape (local@domain, at most 254 bytes). */
const char *mso_check_mailbox(const char *mailbox);
/* NULL when a request parameter is acceptable text: valid UTF-8 (shortest
 * form, no surrogates), no C0/C1 control characters, at most 4096 bytes;
 * else why not. NULL value: nothing to check. */
const char *mso_check_text_param(const char *value);
/* ASCII lower case copy. */
char *mso_lower(apr_pool_t *p, const char *s);

#endif
