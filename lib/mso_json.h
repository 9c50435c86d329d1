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

/* Getters on an object: NULL / 0 when the key is absent or of another type. */
const char *mso_json_str(const json_t *obj, const char *key);
int mso_json_int(const json_t *obj, const char *key, apr_int64_t *out);
int mso_json_bool(const json_t *obj, const char *key, int *out);
const json_t *mso_json_obj(const json_t *obj, const char *key);
const json_t *mso_json_arr(const json_t *obj, const char *key);

/* Compact serialization into the pool. */
const char *mso_json_dump(apr_pool_t *p, const json_t *j);

#endif
