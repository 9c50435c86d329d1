/* JSON (lib/mso_json): mso_json_parse of the input and every getter on what
 * it returns.
 * Invariants: a document is accepted only within the size cap, as an object
 * or array, nested at most 64 deep; a failure says where in fixed words
 * (never quoting the input); what is accepted dumps and parses back to an
 * equal document; each getter returns a value only when the member has its
 * type. */
#include "fuzz_common.h"
#include "mso_json.h"

static int depth_of(const json_t *j)
{
    const char *k;
    json_t *v;
    size_t i;
    int d = 0, m;

    if (json_is_object(j)) {
        json_object_foreach((json_t *)j, k, v) {
            m = depth_of(v);
            d = m > d ? m : d;
        }
        return d + 1;
    }
    if (json_is_array(j)) {
        json_array_foreach(j, i, v) {
            m = depth_of(v);
            d = m > d ? m : d;
        }
        return d + 1;
    }
    return 0;
}

static void getters(apr_pool_t *p, const json_t *obj)
{
    const char *key;
    json_t *v;
    int count = 0;

    json_object_foreach((json_t *)obj, key, v) {
        apr_int64_t i = 0;
        int b = -1;
        const char *s = mso_json_str(obj, key);

        FUZZ_CHECK((s != NULL) == json_is_string(v), "mso_json_str and the type disagree");
        FUZZ_CHECK(!s || !strcmp(s, json_string_value(v)), "mso_json_str returned another value");
        FUZZ_CHECK(mso_json_int(obj, key, &i) == json_is_integer(v), "mso_json_int and the type");
        FUZZ_CHECK(!json_is_integer(v) || i == json_integer_value(v), "mso_json_int value");
        FUZZ_CHECK(mso_json_bool(obj, key, &b) == json_is_boolean(v), "mso_json_bool and type");
        FUZZ_CHECK(!json_is_boolean(v) || b == json_is_true(v), "mso_json_bool value");
        FUZZ_CHECK((mso_json_obj(obj, key) != NULL) == json_is_object(v), "mso_json_obj");
        FUZZ_CHECK((mso_json_arr(obj, key) != NULL) == json_is_array(v), "mso_json_arr");
        if (json_is_object(v) && count < 16) {
            getters(p, v);
        }
        if (++count > 64) {
            break;
        }
    }
    /* Absent members and wrong receivers. */
    FUZZ_CHECK(!mso_json_str(obj, "\x01no such key") && !mso_json_str(NULL, "a")
               && !mso_json_str(obj, NULL) && !mso_json_int(obj, "\x01no such key", NULL)
               && !mso_json_obj(NULL, "a"), "a getter found something that is not there");
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    static const char doc[] = "{}";
    const char *err = NULL;

    fuzz_init();
    /* The cap is checked before a byte is read. */
    FUZZ_CHECK(!mso_json_parse(fuzz_root, doc, (apr_size_t)MSO_JSON_MAX_SIZE + 1, &err) && err,
               "a document over the cap was accepted");
    FUZZ_CHECK(strstr(err, apr_psprintf(fuzz_root, "%d MiB", MSO_JSON_MAX_SIZE / (1024 * 1024))),
               "the size error does not name the cap: %s", err);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    apr_pool_t *p = fuzz_pool();
    fuzz_in_t in = fuzz_in(data, size);
    size_t len;
    const char *buf = fuzz_rest(p, &in, &len), *err = NULL, *dump, *err2 = NULL;
    json_t *j, *j2;

    j = mso_json_parse(p, buf, len, &err);
    if (!j) {
        FUZZ_CHECK(err && !strncmp(err, "JSON error", 10) && fuzz_printable(err),
                   "unexpected error text: %s", err ? err : "(none)");
        FUZZ_CHECK(!strstr(err, "line") || strlen(err) < 100, "error text too long: %s", err);
    }
    else {
        FUZZ_CHECK(!err, "an error with a document");
        FUZZ_CHECK(len <= MSO_JSON_MAX_SIZE, "document over the cap accepted");
        FUZZ_CHECK(json_is_object(j) || json_is_array(j), "a scalar document accepted");
        FUZZ_CHECK(depth_of(j) <= 64, "nested %d deep", depth_of(j));
        dump = mso_json_dump(p, j);
        FUZZ_CHECK(dump != NULL, "an accepted document does not dump");
        j2 = mso_json_parse(p, dump, strlen(dump), &err2);
        FUZZ_CHECK(j2 && json_equal(j, j2), "dump then parse differs: %s (%s)", dump,
                   err2 ? err2 : "");
        if (json_is_object(j)) {
            getters(p, j);
        }
    }
    apr_pool_destroy(p);
    return 0;
}
