/* jansson with pool lifetimes. Inputs come from the network (tokens, Graph
 * answers), so size and depth are capped and errors never quote the input. */
#include <string.h>

#include <apr_strings.h>

#include "mso_json.h"

#define MSO_JSON_MAX_DEPTH 64

static apr_status_t json_cleanup(void *data)
{
    json_decref(data);
    return APR_SUCCESS;
}

/* jansson already stops at JSON_PARSER_MAX_DEPTH, so this recursion is
 * bounded; it stops one level past our own limit anyway. */
static int too_deep(const json_t *j, int depth)
{
    const char *key;
    json_t *v;
    size_t i;

    if (!json_is_object(j) && !json_is_array(j)) {
        return 0;
    }
    if (depth > MSO_JSON_MAX_DEPTH) {
        return 1;
    }
    if (json_is_object(j)) {
        /* json_object_foreach wants a non-const object; it only reads. */
        json_object_foreach((json_t *)j, key, v) {
            if (too_deep(v, depth + 1)) {
                return 1;
            }
        }
    }
    else {
        json_array_foreach(j, i, v) {
            if (too_deep(v, depth + 1)) {
                return 1;
            }
        }
    }
    return 0;
}

/* Fixed phrases: jansson's own text can quote the offending input. */
static const char *error_phrase(const json_error_t *e)
{
    switch (json_error_code(e)) {
    case json_error_out_of_memory:
        return "out of memory";
    case json_error_stack_overflow:
        return "nested too deeply";
    case json_error_invalid_utf8:
        return "invalid UTF-8";
    case json_error_premature_end_of_input:
        return "unexpected end of input";
    case json_error_end_of_input_expected:
        return "trailing data after the document";
    case json_error_invalid_syntax:
        return "invalid syntax";
    case json_error_null_character:
    case json_error_null_byte_in_key:
        return "NUL character";
    case json_error_duplicate_key:
        return "duplicate object key";
    case json_error_numeric_overflow:
        return "number out of range";
    case json_error_wrong_type:
        return "not an object or array";
    default:
        return "invalid JSON";
    }
}

json_t *mso_json_parse(apr_pool_t *p, const char *buf, apr_size_t len, const char **err)
{
    return mso_json_parse_flags(p, buf, len, 0, err);
}

json_t *mso_json_parse_flags(apr_pool_t *p, const char *buf, apr_size_t len, size_t flags,
                             const char **err)
{
    json_error_t jerr;
    json_t *j;
    const char *dummy;

    if (!err) {
        err = &dummy;
    }
    *err = NULL;
    if (!buf) {
        *err = "JSON error: no input";
        return NULL;
    }
    if (len > MSO_JSON_MAX_SIZE) {
        *err = apr_psprintf(p, "JSON error: document larger than %d MiB",
                            MSO_JSON_MAX_SIZE / (1024 * 1024));
        return NULL;
    }
    j = json_loadb(buf, len, JSON_REJECT_DUPLICATES | flags, &jerr);
    if (!j) {
        *err = apr_psprintf(p, "JSON error at line %d, column %d: %s", jerr.line,
                            jerr.column, error_phrase(&jerr));
        return NULL;
    }
    if (too_deep(j, 1)) {
        json_decref(j);
        *err = apr_psprintf(p, "JSON error: nested deeper than %d levels",
                            MSO_JSON_MAX_DEPTH);
        return NULL;
    }
    apr_pool_cleanup_register(p, j, json_cleanup, apr_pool_cleanup_null);
    return j;
}

static const json_t *member(const json_t *obj, const char *key)
{
    if (!obj || !key || !json_is_object(obj)) {
        return NULL;
    }
    return json_object_get(obj, key);
}

const char *mso_json_str(const json_t *obj, const char *key)
{
    const json_t *v = member(obj, key);

    return json_is_string(v) ? json_string_value(v) : NULL;
}

int mso_json_int(const json_t *obj, const char *key, apr_int64_t *out)
{
    const json_t *v = member(obj, key);

    /* Integers only: a real like 3.0 or 1e3 is refused, not truncated. */
    if (!json_is_integer(v)) {
        return 0;
    }
    if (out) {
        *out = (apr_int64_t)json_integer_value(v);
    }
    return 1;
}

int mso_json_bool(const json_t *obj, const char *key, int *out)
{
    const json_t *v = member(obj, key);

    if (!json_is_boolean(v)) {
        return 0;
    }
    if (out) {
        *out = json_is_true(v) ? 1 : 0;
    }
    return 1;
}

const json_t *mso_json_obj(const json_t *obj, const char *key)
{
    const json_t *v = member(obj, key);

    return json_is_object(v) ? v : NULL;
}

const json_t *mso_json_arr(const json_t *obj, const char *key)
{
    const json_t *v = member(obj, key);

    return json_is_array(v) ? v : NULL;
}

const char *mso_json_dump(apr_pool_t *p, const json_t *j)
{
    json_malloc_t malloc_fn;
    json_free_t free_fn;
    char *s;
    const char *copy;

    if (!j) {
        return NULL;
    }
    s = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!s) {
        return NULL;
    }
    copy = apr_pstrdup(p, s);
    /* Released with jansson's allocator, which the process may have replaced. */
    json_get_alloc_funcs(&malloc_fn, &free_fn);
    free_fn(s);
    return copy;
}

/* ---- the clip ------------------------------------------------------------ */

enum { CLIP_OUT, CLIP_STR, CLIP_ESC, CLIP_HEX, CLIP_UTF8 };

#define FFFD "\xef\xbf\xbd"

/* Bytes that end a plain run: outside strings the structure, inside them
 * quotes, escapes, controls and non-ASCII. */
static APR_INLINE int clip_out_stop(unsigned char b)
{
    return b == '"' || b == '{' || b == '}' || b == '[' || b == ']' || b == ',' || b == ':';
}

static APR_INLINE int clip_str_stop(unsigned char b)
{
    return b < 0x20 || b >= 0x80 || b == '"' || b == '\\';
}

void mso_json_clip_init(mso_json_clip_t *c, apr_size_t max_string)
{
    memset(c, 0, sizeof(*c));
    c->max_string = max_string;
}

static int clip_in_object(const mso_json_clip_t *c)
{
    int d = c->depth - 1;

    if (d < 0 || d >= (int)sizeof(c->objs) * 8) {
        return 0;
    }
    return (c->objs[d / 8] >> (d % 8)) & 1;
}

static void clip_push(mso_json_clip_t *c, int obj)
{
    int d = c->depth++;

    if (d < (int)sizeof(c->objs) * 8) {
        if (obj) {
            c->objs[d / 8] |= (unsigned char)(1 << (d % 8));
        }
        else {
            c->objs[d / 8] &= (unsigned char)~(1 << (d % 8));
        }
    }
}

static void clip_capture(mso_json_clip_t *c, const char *t, apr_size_t n)
{
    if (c->cap_bad || n > sizeof(c->cap_buf) - c->cap_len || memchr(t, '\\', n)) {
        c->cap_bad = 1;
        return;
    }
    memcpy(c->cap_buf + c->cap_len, t, n);
    c->cap_len += n;
}

/* A string starts: is it a top-level key, or the value of a wanted one? */
static void clip_capture_start(mso_json_clip_t *c)
{
    c->cap_state = 0;
    if (!c->capture || c->depth != 1 || !clip_in_object(c)) {
        return;
    }
    if (c->key) {
        c->cap_state = 1;
        c->cap_want = 0;
    }
    else if (c->cap_want) {
        c->cap_state = 2;
    }
    else {
        return;
    }
    c->cap_len = 0;
    c->cap_bad = 0;
}

static void clip_capture_end(mso_json_clip_t *c)
{
    int i;

    if (c->cap_state == 1 && !c->cap_bad) {
        for (i = 0; c->capture[i]; i++) {
            if (strlen(c->capture[i]) == c->cap_len
                && !memcmp(c->capture[i], c->cap_buf, c->cap_len)) {
                c->cap_want = i + 1;
            }
        }
    }
    else if (c->cap_state == 2) {
        if (!c->cap_bad && !c->cut && c->on_capture) {
            c->on_capture(c->capture_baton, c->cap_want - 1, c->cap_buf, c->cap_len);
        }
        c->cap_want = 0;
    }
    c->cap_state = 0;
}

/* One character of string content: kept whole, or the cut happens before it. */
static char *clip_tok(mso_json_clip_t *c, char *o, const char *t, apr_size_t n)
{
    if (c->cut) {
        return o;
    }
    if (c->cap_state) {
        clip_capture(c, t, n);
    }
    if (c->max_string && c->str_len + n > c->max_string) {
        c->cut = 1;
        c->clipped++;
        if (!c->key) {
            memcpy(o, "\\u0000", 6);
            o += 6;
        }
        return o;
    }
    memcpy(o, t, n);
    c->str_len += n;
    return o + n;
}

/* A high surrogate not followed by its low half. */
static char *clip_flush_hi(mso_json_clip_t *c, char *o)
{
    if (c->hi) {
        c->hi = 0;
        o = clip_tok(c, o, FFFD, 3);
    }
    return o;
}

static void clip_hex4(char *t, unsigned v)
{
    static const char hex[] = "0123456789abcdef";
    int i;

    t[0] = '\\';
    t[1] = 'u';
    for (i = 0; i < 4; i++) {
        t[2 + i] = hex[(v >> (12 - 4 * i)) & 0xf];
    }
}

/* A complete \uXXXX: a surrogate pair goes out as one character. */
static char *clip_escape(mso_json_clip_t *c, char *o, unsigned cp)
{
    char t[12];

    if (c->hi && cp >= 0xdc00 && cp <= 0xdfff) {
        clip_hex4(t, c->hi);
        clip_hex4(t + 6, cp);
        c->hi = 0;
        return clip_tok(c, o, t, 12);
    }
    o = clip_flush_hi(c, o);
    if (cp >= 0xd800 && cp <= 0xdbff) {
        c->hi = cp;
        return o;
    }
    if (cp >= 0xdc00 && cp <= 0xdfff) {
        return clip_tok(c, o, FFFD, 3);
    }
    if (cp == 0) {
        return clip_tok(c, o, " ", 1);
    }
    clip_hex4(t, cp);
    return clip_tok(c, o, t, 6);
}

static int hex_digit(unsigned char b)
{
    if (b >= '0' && b <= '9') {
        return b - '0';
    }
    if (b >= 'a' && b <= 'f') {
        return b - 'a' + 10;
    }
    if (b >= 'A' && b <= 'F') {
        return b - 'A' + 10;
    }
    return -1;
}

/* The first byte of a UTF-8 sequence: how many follow and the range of the
 * next one (RFC 3629: no overlong forms, no surrogates, nothing past
 * U+10FFFF). 0 when it cannot start a character. */
static int utf8_lead(unsigned char b, unsigned char *lo, unsigned char *hi)
{
    *lo = 0x80;
    *hi = 0xbf;
    if (b >= 0xc2 && b <= 0xdf) {
        return 1;
    }
    if (b >= 0xe0 && b <= 0xef) {
        if (b == 0xe0) {
            *lo = 0xa0;
        }
        else if (b == 0xed) {
            *hi = 0x9f;
        }
        return 2;
    }
    if (b >= 0xf0 && b <= 0xf4) {
        if (b == 0xf0) {
            *lo = 0x90;
        }
        else if (b == 0xf4) {
            *hi = 0x8f;
        }
        return 3;
    }
    return 0;
}

apr_size_t mso_json_clip_feed(mso_json_clip_t *c, const char *in, apr_size_t n, char *out)
{
    const unsigned char *s = (const unsigned char *)in, *end = s + n, *run;
    char *o = out;
    unsigned char b;
    int v;

    while (s < end) {
        b = *s;
        switch (c->state) {
        case CLIP_OUT:
            if (!clip_out_stop(b)) {
                for (run = s; s < end && !clip_out_stop(*s); s++) {
                }
                memcpy(o, run, (apr_size_t)(s - run));
                o += s - run;
                break;
            }
            *o++ = (char)b;
            s++;
            switch (b) {
            case '"':
                c->state = CLIP_STR;
                c->key = c->expect_key && clip_in_object(c);
                c->cut = 0;
                c->str_len = 0;
                c->hi = 0;
                if (c->capture) {
                    clip_capture_start(c);
                }
                break;
            case '{':
                clip_push(c, 1);
                c->expect_key = 1;
                break;
            case '[':
                clip_push(c, 0);
                c->expect_key = 0;
                break;
            case '}':
            case ']':
                if (c->depth > 0) {
                    c->depth--;
                }
                c->expect_key = 0;
                break;
            case ',':
                c->expect_key = clip_in_object(c);
                c->cap_want = 0;
                break;
            default:        /* ':' */
                c->expect_key = 0;
                break;
            }
            break;
        case CLIP_STR:
            if (!clip_str_stop(b) && !c->hi) {
                apr_size_t len, keep;

                for (run = s; s < end && !clip_str_stop(*s); s++) {
                }
                len = keep = (apr_size_t)(s - run);
                if (c->cut) {
                    break;
                }
                if (c->max_string && c->str_len + len > c->max_string) {
                    keep = c->max_string - c->str_len;
                }
                memcpy(o, run, keep);
                o += keep;
                c->str_len += keep;
                if (c->cap_state) {
                    clip_capture(c, (const char *)run, keep);
                }
                if (keep < len) {
                    o = clip_tok(c, o, (const char *)run + keep, 1);
                }
                break;
            }
            s++;
            if (b == '"') {
                o = clip_flush_hi(c, o);
                *o++ = '"';
                c->state = CLIP_OUT;
                if (c->cap_state) {
                    clip_capture_end(c);
                }
            }
            else if (b == '\\') {
                c->state = CLIP_ESC;
            }
            else if (b < 0x20) {
                o = clip_flush_hi(c, o);
                o = clip_tok(c, o, b == '\t' ? "\\t" : b == '\n' ? "\\n" : b == '\r' ? "\\r"
                                   : " ", b == '\t' || b == '\n' || b == '\r' ? 2 : 1);
            }
            else if (b < 0x80) {
                o = clip_flush_hi(c, o);
                o = clip_tok(c, o, (const char *)s - 1, 1);
            }
            else {
                o = clip_flush_hi(c, o);
                c->need = utf8_lead(b, &c->lo_min, &c->lo_max);
                if (!c->need) {
                    o = clip_tok(c, o, FFFD, 3);
                }
                else {
                    c->seq[0] = b;
                    c->have = 1;
                    c->state = CLIP_UTF8;
                }
            }
            break;
        case CLIP_UTF8:
            if (b < c->lo_min || b > c->lo_max) {
                /* Not consumed: it starts whatever comes next. */
                o = clip_tok(c, o, FFFD, 3);
                c->state = CLIP_STR;
                break;
            }
            s++;
            c->seq[c->have++] = b;
            c->lo_min = 0x80;
            c->lo_max = 0xbf;
            if (--c->need == 0) {
                o = clip_tok(c, o, (const char *)c->seq, (apr_size_t)c->have);
                c->state = CLIP_STR;
            }
            break;
        case CLIP_ESC:
            if (b == 'u') {
                s++;
                c->cp = 0;
                c->need = 4;
                c->state = CLIP_HEX;
                break;
            }
            o = clip_flush_hi(c, o);
            c->state = CLIP_STR;
            if (strchr("\"\\/bfnrt", b) && b) {
                char t[2];

                s++;
                t[0] = '\\';
                t[1] = (char)b;
                o = clip_tok(c, o, t, 2);
            }
            else {
                /* Not consumed: an unknown escape loses only its backslash. */
                o = clip_tok(c, o, FFFD, 3);
            }
            break;
        default:            /* CLIP_HEX */
            v = hex_digit(b);
            if (v < 0) {
                o = clip_flush_hi(c, o);
                o = clip_tok(c, o, FFFD, 3);
                c->state = CLIP_STR;
                break;
            }
            s++;
            c->cp = c->cp << 4 | (unsigned)v;
            if (--c->need == 0) {
                o = clip_escape(c, o, c->cp);
                c->state = CLIP_STR;
            }
            break;
        }
    }
    return (apr_size_t)(o - out);
}
