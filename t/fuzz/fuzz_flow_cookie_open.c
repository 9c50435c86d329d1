/* The sign-in state cookie (lib/mso_flow, lib/mso_crypto): mso_flow_open with
 * a fixed key ring (a sealing key and an older one), in three ways picked by
 * the first byte:
 *   0  open: state NUL cookie-value, both as a browser sends them;
 *   1  round trip: company NUL mailbox NUL return_to NUL user NUL state,
 *      then one byte of age: mso_flow_seal, then mso_flow_open;
 *   2  sealed payload: state NUL plaintext; the plaintext is sealed with the
 *      ring's key (what only we can do) and opened as a flow, so that the
 *      fields after decryption are fuzzed too.
 * Invariants: a flow that opens is the state's own and was made to last at
 * most 10 minutes; an expired one is said to be expired; seal then open gives
 * back the same fields whenever seal succeeds and the cookie fits in 4096
 * bytes; a cookie never opens for another state or as a token blob. */
#include "fuzz_common.h"
#include "fuzz_keys.h"
#include "mso_crypto.h"
#include "mso_flow.h"

static mso_keyring_t *kr;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_init();
    kr = mso_keyring_create(fuzz_root);
    if (mso_keyring_add(kr, (const unsigned char *)FUZZ_FLOW_KEY) != APR_SUCCESS
        || mso_keyring_add(kr, (const unsigned char *)FUZZ_FLOW_KEY_OLD) != APR_SUCCESS) {
        abort();
    }
    return 0;
}

static const char *opt(const char *s)
{
    return *s ? s : NULL;
}

static void check_opened(apr_pool_t *p, mso_flow_check_e r, const char *state,
                         const char *value, mso_flow_t *f)
{
    unsigned char *plain;
    apr_size_t plen;

    if (r == MSO_FLOW_INVALID) {
        return;
    }
    FUZZ_CHECK(r == MSO_FLOW_VALID || r == MSO_FLOW_EXPIRED, "result %d", r);
    FUZZ_CHECK(f && f->state && !strcmp(f->state, state), "a flow of another state");
    FUZZ_CHECK(f->nonce && f->verifier && f->company, "a flow without nonce, verifier or "
               "company");
    if (r == MSO_FLOW_VALID) {
        FUZZ_CHECK(FUZZ_NOW < f->expires && f->created <= FUZZ_NOW + 60
                   && f->expires - f->created <= MSO_FLOW_LIFETIME,
                   "valid flow with created %lld expires %lld", f->created, f->expires);
    }
    /* Never for another state, never as a token. */
    FUZZ_CHECK(mso_flow_open(p, kr, apr_pstrcat(p, state, "x", NULL), value, FUZZ_NOW, &f)
               == MSO_FLOW_INVALID, "opens for another state");
    FUZZ_CHECK(mso_open(p, kr, MSO_PURPOSE_TOKEN, apr_pstrcat(p, "flow:", state, NULL), value,
                        &plain, &plen) != APR_SUCCESS, "a flow cookie opens as a token blob");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    unsigned mode = fuzz_byte(&in) % 3;
    mso_flow_t *f = NULL, *g = NULL;
    mso_flow_check_e r;

    if (mode == 0) {
        const char *state = fuzz_str(p, &in), *value = fuzz_str(p, &in);

        r = mso_flow_open(p, kr, state, value, FUZZ_NOW, &f);
        if (fuzz_verbose()) {
            fprintf(stderr, "open: %s\n", r == MSO_FLOW_VALID ? "valid"
                    : r == MSO_FLOW_EXPIRED ? "expired" : "invalid");
        }
        check_opened(p, r, state, value, f);
    }
    else if (mode == 1) {
        const char *company = fuzz_str(p, &in), *mailbox = fuzz_str(p, &in);
        const char *return_to = fuzz_str(p, &in), *user = fuzz_str(p, &in);
        const char *state = fuzz_str(p, &in), *value = NULL;
        long long age = (long long)fuzz_byte(&in) * 4;      /* 0 .. 17 minutes */

        f = mso_flow_new(p, company, opt(mailbox), opt(return_to), opt(user), FUZZ_NOW - age);
        if (*state) {
            f->state = state;
        }
        if (mso_flow_seal(p, kr, f, &value) != APR_SUCCESS) {
            goto done;
        }
        FUZZ_CHECK(value && *value, "sealed to nothing");
        r = mso_flow_open(p, kr, f->state, value, FUZZ_NOW, &g);
        if (strlen(value) > 4096) {
            FUZZ_CHECK(r == MSO_FLOW_INVALID, "a cookie over 4096 bytes opened");
            goto done;
        }
        FUZZ_CHECK(r == (age < MSO_FLOW_LIFETIME ? MSO_FLOW_VALID : MSO_FLOW_EXPIRED),
                   "a fresh seal (age %llds) opens as %d", age, r);
        FUZZ_CHECK(g && fuzz_streq(g->state, f->state) && fuzz_streq(g->nonce, f->nonce)
                   && fuzz_streq(g->verifier, f->verifier) && fuzz_streq(g->company, f->company)
                   && fuzz_streq(g->mailbox, f->mailbox)
                   && fuzz_streq(g->return_to, f->return_to) && fuzz_streq(g->user, f->user)
                   && g->created == f->created && g->expires == f->expires,
                   "seal then open changed the flow (mailbox %s -> %s, return_to %s -> %s, "
                   "user %s -> %s)", f->mailbox ? f->mailbox : "(null)",
                   g && g->mailbox ? g->mailbox : "(null)", f->return_to ? f->return_to : "(null)",
                   g && g->return_to ? g->return_to : "(null)", f->user ? f->user : "(null)",
                   g && g->user ? g->user : "(null)");
        check_opened(p, r, f->state, value, g);
    }
    else {
        const char *state = fuzz_str(p, &in), *value = NULL;
        size_t len;
        const char *plain = fuzz_rest(p, &in, &len);

        if (mso_seal(p, kr, MSO_PURPOSE_STATE, apr_pstrcat(p, "flow:", state, NULL), plain, len,
                     &value) == APR_SUCCESS) {
            r = mso_flow_open(p, kr, state, value, FUZZ_NOW, &f);
            check_opened(p, r, state, value, f);
        }
    }
done:
    apr_pool_destroy(p);
    return 0;
}
