/* jansson with pool lifetimes. Inputs come from the network (tokens, Graph
 * answers), so size and depth are capped and errors never quote the input. */
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
    j = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
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
