/* The Cookie header (lib/mso_flow): mso_flow_cookies on the header, then
 * mso_flow_cookie_for and mso_flow_cookies_to_drop, and mso_flow_cookie_name.
 * Input: header NUL state, then one byte of clock offset.
 * Invariants: only our cookies are returned, oldest first, each with a name
 * that reads back as its creation time and state part; the cookie for a state
 * is the newest with that state part, and none is returned when none has it;
 * after dropping, at most MSO_FLOW_MAX_COOKIES - 1 remain and none of them
 * expired; a name made by mso_flow_cookie_name is found again in a header. */
#include "fuzz_common.h"
#include "mso_flow.h"

static int is_state_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
           || c == '-' || c == '_';
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    const char *header = fuzz_str(p, &in), *state = fuzz_str(p, &in), *name;
    long long now = FUZZ_NOW + ((long long)fuzz_byte(&in) - 128) * 60;
    apr_array_header_t *cookies, *drop, *again;
    const mso_flow_cookie_t *fc;
    int i, j, kept;
    size_t plen = strlen(MSO_FLOW_COOKIE_PREFIX);

    cookies = mso_flow_cookies(p, header);
    for (i = 0; i < cookies->nelts; i++) {
        const mso_flow_cookie_t *c = &APR_ARRAY_IDX(cookies, i, mso_flow_cookie_t);

        FUZZ_CHECK(!strncmp(c->name, MSO_FLOW_COOKIE_PREFIX, plen), "not ours: %s", c->name);
        FUZZ_CHECK(strlen(c->state_part) == 16 && strspn(c->state_part, "ABCDEFGHIJKLMNOPQRSTU"
                   "VWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") == 16, "state part %s",
                   c->state_part);
        FUZZ_CHECK(!strcmp(c->name + strlen(c->name) - 16, c->state_part), "state part of %s",
                   c->name);
        FUZZ_CHECK(c->created >= 0, "created %lld", c->created);
        FUZZ_CHECK(!strpbrk(c->value, ";,"), "value %s runs into the next cookie", c->value);
        FUZZ_CHECK(i == 0 || APR_ARRAY_IDX(cookies, i - 1, mso_flow_cookie_t).created
                             <= c->created, "not oldest first");
        /* The canonical name of the same cookie reads back the same. */
        name = mso_flow_cookie_name(p, apr_pstrcat(p, c->state_part, "", NULL), c->created);
        FUZZ_CHECK(name, "no name for a parsed cookie");
        again = mso_flow_cookies(p, apr_pstrcat(p, name, "=v", NULL));
        FUZZ_CHECK(again->nelts == 1
                   && APR_ARRAY_IDX(again, 0, mso_flow_cookie_t).created == c->created
                   && !strcmp(APR_ARRAY_IDX(again, 0, mso_flow_cookie_t).state_part,
                              c->state_part), "name %s does not read back", name);
    }

    fc = mso_flow_cookie_for(cookies, state);
    for (j = cookies->nelts - 1; j >= 0; j--) {
        if (strlen(state) >= 16
            && !strncmp(APR_ARRAY_IDX(cookies, j, mso_flow_cookie_t).state_part, state, 16)) {
            break;
        }
    }
    FUZZ_CHECK(j < 0 ? !fc : fc == &APR_ARRAY_IDX(cookies, j, mso_flow_cookie_t),
               "mso_flow_cookie_for picked the wrong cookie");

    drop = mso_flow_cookies_to_drop(p, cookies, now, 300);
    kept = cookies->nelts - drop->nelts;
    FUZZ_CHECK(drop->nelts <= cookies->nelts && kept <= MSO_FLOW_MAX_COOKIES - 1,
               "%d kept of %d", kept, cookies->nelts);
    {
        apr_size_t bytes = 300;

        for (i = 0; i < cookies->nelts; i++) {
            const mso_flow_cookie_t *c = &APR_ARRAY_IDX(cookies, i, mso_flow_cookie_t);
            int dropped = 0;

            for (j = 0; j < drop->nelts; j++) {
                dropped |= APR_ARRAY_IDX(drop, j, const char *) == c->name;
            }
            FUZZ_CHECK(dropped || c->created + MSO_FLOW_LIFETIME > now, "expired cookie kept");
            if (!dropped) {
                bytes += strlen(c->name) + strlen(c->value) + 2;
            }
        }
        /* What stays, with the new cookie, fits the byte budget. */
        FUZZ_CHECK(bytes <= MSO_FLOW_MAX_BYTES, "%zu bytes kept", bytes);
    }

    /* A name made for the state is found in a header that holds it. */
    name = mso_flow_cookie_name(p, state, now);
    if (name) {
        size_t n = strlen(state);

        FUZZ_CHECK(n >= 16 && n <= 128, "a name for a state of %zu characters", n);
        for (i = 0; i < (int)n; i++) {
            FUZZ_CHECK(is_state_char(state[i]), "a name for a state with 0x%02x",
                       (unsigned char)state[i]);
        }
        again = mso_flow_cookies(p, apr_pstrcat(p, "a=b; ", name, "=sealed; c=d", NULL));
        fc = mso_flow_cookie_for(again, state);
        FUZZ_CHECK(again->nelts == 1 && fc && fc->created == now && !strcmp(fc->value, "sealed"),
                   "cookie %s not found again", name);
    }
    apr_pool_destroy(p);
    return 0;
}
