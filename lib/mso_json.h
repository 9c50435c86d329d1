/* The few jansson helpers everyone needs: parsing into a pool's lifetime and
 * typed getters that tolerate hostile input. */
#ifndef MSO_JSON_H
#define MSO_JSON_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <jansson.h>

/* The largest document parsed: a Graph delta page of 100 messages with
 * their bodies (responses are capped before that, see mso_http). */
#define MSO_JSON_MAX_SIZE (32 * 1024 * 1024)

/* Parses buf; the result is released with the pool. On failure *err says
 * where (line and column), never echoing the input. Depth and size limited. */
json_t *mso_json_parse(apr_pool_t *p, const char *buf, apr_size_t len, const char **err);

/* The same with more jansson decoding flags (JSON_ALLOW_NUL for text that went
 * through the clip below: strings may then hold NUL, see json_string_length). */
json_t *mso_json_parse_flags(apr_pool_t *p, const char *buf, apr_size_t len, size_t flags,
                             const char **err);

/* A streaming filter for JSON from the network, fed chunk by chunk (as they
 * arrive) and writing a document jansson accepts whenever the input was
 * well-formed JSON apart from what it repairs inside strings:
 *  - a string value whose JSON text is longer than max_string bytes is cut
 *    there and ends with the escape \u0000, the "clipped" marker (a key is
 *    cut without it: jansson refuses NUL in keys). The cut falls between
 *    characters, never inside an escape, a surrogate pair or a UTF-8
 *    sequence, so the kept text stays valid;
 *  - so the marker means only that, a \u0000 or a raw NUL in the input
 *    becomes a space;
 *  - invalid UTF-8 becomes U+FFFD (each maximal invalid part), and so do
 *    lone surrogate escapes and unknown escapes; raw control characters,
 *    which jansson refuses, are escaped (\t \n \r) or become spaces.
 * Outside strings bytes pass unchanged: what is not JSON stays not JSON.
 * It can also hand over the string values of some members of the top-level
 * object as they pass (capture, on_capture), e.g. the link to a page's
 * successor, known even when the document as a whole is refused.
 * Memory: the state is this struct; nothing is allocated. */
#define MSO_JSON_CLIP_CAPTURE_MAX 8192

typedef void mso_json_capture_fn(void *baton, int which, const char *value, apr_size_t len);

typedef struct {
    apr_size_t max_string;          /* 0: no cut */
    apr_size_t str_len;             /* output bytes of the current string */
    apr_size_t clipped;             /* strings cut so far */
    int state;
    int key;                        /* the current string is an object key */
    int cut;                        /* the current string is past its cut */
    int expect_key;
    unsigned hi;                    /* a high surrogate escape waiting for its pair */
    unsigned cp;                    /* \u digits / UTF-8 code point so far */
    int need;                       /* hex digits or continuation bytes still due */
    int have;                       /* bytes of the UTF-8 sequence so far */
    unsigned char lo_min, lo_max;   /* allowed range of the next continuation byte */
    unsigned char seq[4];           /* the UTF-8 sequence so far */
    int depth;
    unsigned char objs[64];         /* bit per level: an object (1) or an array */
    /* Capture: keys (NULL-terminated) of top-level members whose string
     * value (at most MSO_JSON_CLIP_CAPTURE_MAX bytes, without escapes, as
     * sent) goes to on_capture with the key's index. */
    const char *const *capture;
    mso_json_capture_fn *on_capture;
    void *capture_baton;
    int cap_state;                  /* 1: a top-level key, 2: a wanted value */
    int cap_want;                   /* index + 1 of the key just read */
    int cap_bad;
    apr_size_t cap_len;
    char cap_buf[MSO_JSON_CLIP_CAPTURE_MAX];
} mso_json_clip_t;

/* Output bytes one chunk of n input bytes can produce at most. */
#define MSO_JSON_CLIP_ROOM(n) (6 * (n) + 32)

void mso_json_clip_init(mso_json_clip_t *c, apr_size_t max_string);

/* Filters n bytes of input into out, which has MSO_JSON_CLIP_ROOM(n) bytes of
 * room; returns the number of bytes written. */
apr_size_t mso_json_clip_feed(mso_json_clip_t *c, const char *in, apr_size_t n, char *out);

/* Getters on an object: NULL / 0 when the key is absent or of another type. */
const char *mso_json_str(const json_t *obj, const char *key);
int mso_json_int(const json_t *obj, const char *key, apr_int64_t *out);
int mso_json_bool(const json_t *obj, const char *key, int *out);
const json_t *mso_json_obj(const json_t *obj, const char *key);
const json_t *mso_json_arr(const json_t *obj, const char *key);

/* Compact serialization into the pool. */
const char *mso_json_dump(apr_pool_t *p, const json_t *j);

#endif
