/* Counters per node (see mso_counters.h). */
#include <apr_strings.h>

#include "mso_counters.h"

static const mso_stmt_t ST_ADD = {
    "add to a counter", "node:text metric:text label:text value:int now:int",
    "INSERT INTO msoauth_counters (node, metric, label, value, updated_at) "
    "VALUES (:node, :metric, :label, :value, :now) ON CONFLICT (node, metric, label) "
    "DO UPDATE SET value = msoauth_counters.value + excluded.value, "
    "updated_at = excluded.updated_at", NULL
};
static const mso_stmt_t ST_LIST = {
    "read the counters", NULL,
    "SELECT node, metric, label, value FROM msoauth_counters ORDER BY metric, label, node", NULL
};

typedef struct {
    const char *node;
    const mso_counter_t *c;
    int n;
    apr_int64_t now;
} add_t;

static apr_status_t add_tx(mso_tx_t *tx, void *baton)
{
    add_t *ad = baton;
    apr_status_t rv = APR_SUCCESS;
    int i;

    for (i = 0; i < ad->n; i++) {
        mso_args_t *a;

        if (ad->c[i].value <= 0) {
            continue;
        }
        a = mso_tx_args(tx, &ST_ADD);
        mso_arg_text(a, "node", ad->node);
        mso_arg_text(a, "metric", ad->c[i].metric);
        mso_arg_text(a, "label", ad->c[i].label ? ad->c[i].label : "");
        mso_arg_int(a, "value", ad->c[i].value);
        mso_arg_int(a, "now", ad->now);
        if (!MSO_OK(mso_tx_exec(tx, a, NULL))) {
            break;
        }
    }
    return rv;
}

apr_status_t mso_counters_add(mso_db_t *db, apr_pool_t *p, const char *node,
                              const mso_counter_t *c, int n, apr_int64_t now)
{
    add_t ad;
    int i, any = 0;

    if (!node || !*node || (n > 0 && !c)) {
        return APR_EINVAL;
    }
    for (i = 0; i < n; i++) {
        any |= c[i].value > 0;
    }
    if (!any) {
        return APR_SUCCESS;
    }
    ad.node = node;
    ad.c = c;
    ad.n = n;
    ad.now = now;
    return mso_db_tx(db, p, apr_pstrcat(p, "of node ", node, NULL), add_tx, &ad, NULL);
}

apr_status_t mso_counters_list(mso_db_t *db, apr_pool_t *p, apr_array_header_t **rows)
{
    apr_pool_t *tmp;
    mso_rows_t *r = NULL;
    apr_status_t rv;

    *rows = apr_array_make(p, 16, sizeof(mso_counter_row_t));
    apr_pool_create(&tmp, p);
    if (MSO_OK(mso_select(mso_args(db, tmp, &ST_LIST), &r, NULL))) {
        while (mso_rows_next(r)) {
            mso_counter_row_t *c = apr_array_push(*rows);

            c->node = mso_col_text(r, p, "node");
            c->metric = mso_col_text(r, p, "metric");
            c->label = mso_col_text(r, p, "label");
            c->value = mso_col_int(r, "value");
        }
    }
    apr_pool_destroy(tmp);
    return rv;
}
