#include <stdlib.h>
#include <string.h>

#include <apr_strings.h>
#include <apr_lib.h>
#include <jansson.h>

#include "mso_flow.h"
#include "mso_json.h"

#define FLOW_VERSION 1

mso_flow_t *mso_flow_new(apr_pool_t *p, const char *company, const char *mailbox,
                         const char *return_to, const char *user, long long now)
{
    mso_flow_t *f = apr_pcalloc(p, sizeof(*f));

    f->state = mso_random_token(p, 32);
    f->nonce = mso_random_token(p, 32);
    f->verifier = mso_random_token(p, 48);     /* 64 characters, RFC 7636 allows 43-128 */
    if (!f->state || !f->nonce || !f->verifier) {
        return NULL;            /* the RNG failed: no predictable sign-in state */
    }
    f->company = company;
    f->mailbox = mailbox;
    f->return_to = return_to;
    f->user = user;
    f->created = now;
    f->expires = now + MSO_FLOW_LIFETIME;
    return f;
}

static int is_state_char(char c)
{
    return apr_isalnum(c) || c == '-' || c == '_';
}

const char *mso_flow_cookie_name(apr_pool_t *p, const char *state, long long created)
{
    static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
    char when[16], *w = when + sizeof(when) - 1;
    apr_size_t i, n = state ? strlen(state) : 0;

    if (n < 16 || n > 128 || created < 0) {
        return NULL;
    }
    for (i = 0; i < n; i++) {
        if (!is_state_char(state[i])) {
            return NULL;
        }
    }
    *w = '\0';
    do {
        *--w = digits[created % 36];
        created /= 36;
    } while (created > 0 && w > when);
    return apr_pstrcat(p, MSO_FLOW_COOKIE_PREFIX, w, "_", apr_pstrndup(p, state, 16), NULL);
}

/* Parses "msoauth_flow_<base36>_<16 state chars>". */
static int parse_cookie_name(const char *name, apr_size_t len, long long *created,
                             const char **state_part)
{
    apr_size_t plen = strlen(MSO_FLOW_COOKIE_PREFIX), i;
    long long t = 0;

    if (len < plen + 2 + 16 || strncmp(name, MSO_FLOW_COOKIE_PREFIX, plen)) {
        return 0;
    }
    for (i = plen; i < len && name[i] != '_'; i++) {
        int d = apr_isdigit(name[i]) ? name[i] - '0'
                : (name[i] >= 'a' && name[i] <= 'z') ? name[i] - 'a' + 10 : -1;
        if (d < 0 || i - plen >= 12) {
            return 0;
        }
        t = t * 36 + d;
    }
    if (i == plen || i + 1 + 16 != len) {
        return 0;
    }
    for (i = i + 1; i < len; i++) {
        if (!is_state_char(name[i])) {
            return 0;
        }
    }
    *created = t;
    *state_part = name + len - 16;
    return 1;
}

static int by_created(const void *a, const void *b)
{
    const mso_flow_cookie_t *x = a, *y = b;
    return x->created < y->created ? -1 : x->created > y->created;
}

apr_array_header_t *mso_flow_cookies(apr_pool_t *p, const char *header)
{
    apr_array_header_t *out = apr_array_make(p, 4, sizeof(mso_flow_cookie_t));
    const char *c = header;

    while (c && *c) {
        const char *name, *eq, *end;
        mso_flow_cookie_t fc;

        while (*c == ' ' || *c == ';' || *c == ',') {
            c++;
        }
        name = c;
        end = c + strcspn(c, ";,");
        eq = memchr(name, '=', end - name);
        if (eq && parse_cookie_name(name, eq - name, &fc.created, &fc.state_part)) {
            fc.name = apr_pstrndup(p, name, eq - name);
            fc.state_part = apr_pstrndup(p, fc.state_part, 16);
            fc.value = apr_pstrndup(p, eq + 1, end - eq - 1);
            APR_ARRAY_PUSH(out, mso_flow_cookie_t) = fc;
        }
        c = end;
    }
    qsort(out->elts, out->nelts, sizeof(mso_flow_cookie_t), by_created);
    return out;
}

const mso_flow_cookie_t *mso_flow_cookie_for(const apr_array_header_t *cookies,
                                             const char *state)
{
    int i;

    if (!state || strlen(state) < 16) {
        return NULL;
    }
    for (i = cookies->nelts - 1; i >= 0; i--) {
        const mso_flow_cookie_t *fc = &APR_ARRAY_IDX(cookies, i, mso_flow_cookie_t);
        if (!strncmp(fc->state_part, state, 16)) {
            return fc;
        }
    }
    return NULL;
}

apr_array_header_t *mso_flow_cookies_to_drop(apr_pool_t *p, const apr_array_header_t *cookies,
                                             long long now, apr_size_t new_bytes)
{
    apr_array_header_t *drop = apr_array_make(p, 2, sizeof(const char *));
    apr_size_t bytes = new_bytes;
    int i, kept = 1;

    /* Newest first: keep while both the count and the bytes fit with the new
     * cookie; drop the older rest and every expired one. */
    for (i = cookies->nelts - 1; i >= 0; i--) {
        const mso_flow_cookie_t *fc = &APR_ARRAY_IDX(cookies, i, mso_flow_cookie_t);
        apr_size_t size = strlen(fc->name) + strlen(fc->value) + 2;

        if (kept < MSO_FLOW_MAX_COOKIES && bytes + size <= MSO_FLOW_MAX_BYTES
            && fc->created + MSO_FLOW_LIFETIME > now) {
            kept++;
            bytes += size;
        }
        else {
            APR_ARRAY_PUSH(drop, const char *) = fc->name;
        }
    }
    for (i = 0; i < drop->nelts / 2; i++) {     /* oldest first, as the cookies came */
        const char *t = APR_ARRAY_IDX(drop, i, const char *);

        APR_ARRAY_IDX(drop, i, const char *) = APR_ARRAY_IDX(drop, drop->nelts - 1 - i,
                                                             const char *);
        APR_ARRAY_IDX(drop, drop->nelts - 1 - i, const char *) = t;
    }
    return drop;
}

const char *mso_flow_state_digest(apr_pool_t *p, const char *state)
{
    return mso_pkce_s256(p, state);     /* base64url(SHA-256(state)) */
}

static const char *aad_of(apr_pool_t *p, const char *state)
{
    return apr_pstrcat(p, "flow:", state, NULL);
}

apr_status_t mso_flow_seal(apr_pool_t *p, const mso_keyring_t *kr, const mso_flow_t *f,
                           const char **value)
{
    json_t *j = json_object();
    char *text;
    apr_status_t rv;
    int bad = 0;                /* a field jansson refused (not UTF-8): never seal without it */

    bad |= json_object_set_new(j, "v", json_integer(FLOW_VERSION));
    bad |= json_object_set_new(j, "s", json_string(f->state));
    bad |= json_object_set_new(j, "n", json_string(f->nonce));
    bad |= json_object_set_new(j, "pv", json_string(f->verifier));
    bad |= json_object_set_new(j, "c", json_string(f->company));
    if (f->mailbox) {
        bad |= json_object_set_new(j, "m", json_string(f->mailbox));
    }
    if (f->return_to) {
        bad |= json_object_set_new(j, "rt", json_string(f->return_to));
    }
    if (f->user) {
        bad |= json_object_set_new(j, "u", json_string(f->user));
    }
    bad |= json_object_set_new(j, "iat", json_integer(f->created));
    bad |= json_object_set_new(j, "exp", json_integer(f->expires));
    text = bad ? NULL : json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (bad) {
        return APR_EINVAL;
    }
    if (!text) {
        return APR_ENOMEM;
    }
    rv = mso_seal(p, kr, MSO_PURPOSE_STATE, aad_of(p, f->state), text, strlen(text), value);
    free(text);
    return rv;
}

static const char *dup_str(apr_pool_t *p, const json_t *j, const char *key)
{
    const char *v = mso_json_str(j, key);
    return v ? apr_pstrdup(p, v) : NULL;
}

mso_flow_check_e mso_flow_open(apr_pool_t *p, const mso_keyring_t *kr, const char *state,
                               const char *value, long long now, mso_flow_t **flow)
{
    unsigned char *plain;
    apr_size_t len;
    json_t *j;
    apr_int64_t v, iat, exp;
    mso_flow_t *f;

    if (!state || !value || strlen(value) > 4096
        || mso_open(p, kr, MSO_PURPOSE_STATE, aad_of(p, state), value, &plain, &len)
           != APR_SUCCESS) {
        return MSO_FLOW_INVALID;
    }
    j = mso_json_parse(p, (const char *)plain, len, NULL);
    if (!j || !mso_json_int(j, "v", &v) || v != FLOW_VERSION || !mso_json_int(j, "iat", &iat)
        || !mso_json_int(j, "exp", &exp)) {
        return MSO_FLOW_INVALID;
    }
    f = apr_pcalloc(p, sizeof(*f));
    f->state = dup_str(p, j, "s");
    f->nonce = dup_str(p, j, "n");
    f->verifier = dup_str(p, j, "pv");
    f->company = dup_str(p, j, "c");
    f->mailbox = dup_str(p, j, "m");
    f->return_to = dup_str(p, j, "rt");
    f->user = dup_str(p, j, "u");
    f->created = iat;
    f->expires = exp;
    /* The state is bound as associated data already; compare anyway so a
     * flow can never be used for a state it was not made for. */
    if (!f->state || !f->nonce || !f->verifier || !f->company
        || !mso_str_equal_ct(f->state, state)) {
        return MSO_FLOW_INVALID;
    }
    *flow = f;
    /* exp > now once the first test fails, so exp - LIFETIME cannot overflow
     * (exp - iat could, for a hostile iat). */
    if (now >= exp || exp - MSO_FLOW_LIFETIME > iat || iat > now + 60) {
        return MSO_FLOW_EXPIRED;
    }
    return MSO_FLOW_VALID;
}

const char *mso_check_return_to(const char *rt)
{
    const unsigned char *c;

    if (!rt || rt[0] != '/') {
        return "return_to must be a path on this site starting with /, such as /mail/settings";
    }
    if (rt[1] == '/' || rt[1] == '\\') {
        return "return_to must not start with // or /\\ (that would leave this site)";
    }
    if (strlen(rt) > 2048) {
        return "return_to is longer than 2048 characters";
    }
    for (c = (const unsigned char *)rt; *c; c++) {
        if (*c < 0x21 || *c == 0x7f || *c == '\\') {
            return "return_to must not contain spaces, control characters or backslashes";
        }
    }
    return NULL;
}

const char *mso_check_mailbox(const char *m)
{
    const char *at = m ? strchr(m, '@') : NULL;
    const unsigned char *c;

    if (!at || at == m || !at[1] || strchr(at + 1, '@') || strlen(m) > 254
        || !strchr(at + 1, '.')) {
        return "mailbox must be an e-mail address such as someone@example.com";
    }
    for (c = (const unsigned char *)m; *c; c++) {
        if (*c < 0x21 || *c == 0x7f || strchr("<>()[]\\,;:\"", *c)) {
            return "mailbox must be a plain e-mail address without spaces or quotes";
        }
    }
    return NULL;
}

const char *mso_check_text_param(const char *value)
{
    const unsigned char *c = (const unsigned char *)value;

    if (!value) {
        return NULL;
    }
    if (strlen(value) > 4096) {
        return "a parameter is longer than 4096 bytes";
    }
    while (*c) {
        apr_size_t n, i;
        apr_uint32_t cp;

        if (*c < 0x20 || *c == 0x7f) {
            return "control characters are not allowed in a parameter";
        }
        if (*c < 0x80) {
            c++;
            continue;
        }
        /* UTF-8, shortest form, no surrogates, at most U+10FFFF. */
        if (*c >= 0xc2 && *c <= 0xdf) {
            n = 1, cp = *c & 0x1f;
        }
        else if (*c >= 0xe0 && *c <= 0xef) {
            n = 2, cp = *c & 0x0f;
        }
        else if (*c >= 0xf0 && *c <= 0xf4) {
            n = 3, cp = *c & 0x07;
        }
        else {
            return "a parameter is not valid UTF-8";
        }
        for (i = 1; i <= n; i++) {
            if ((c[i] & 0xc0) != 0x80) {
                return "a parameter is not valid UTF-8";
            }
            cp = (cp << 6) | (c[i] & 0x3f);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff
            || (cp >= 0xd800 && cp <= 0xdfff)) {
            return "a parameter is not valid UTF-8";
        }
        if (cp >= 0x80 && cp < 0xa0) {
            return "control characters are not allowed in a parameter";
        }
        c += n + 1;
    }
    return NULL;
}

char *mso_lower(apr_pool_t *p, const char *s)
{
    char *out = apr_pstrdup(p, s), *c;

    for (c = out; *c; c++) {
        *c = (char)apr_tolower(*c);
    }
    return out;
}
