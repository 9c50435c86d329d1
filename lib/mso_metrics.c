/* The metrics (see mso_metrics.h). */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <apr_hash.h>
#include <apr_strings.h>

#include "mso_counters.h"
#include "mso_job_runs.h"
#include "mso_metrics.h"

#define MAX_LABELS 4

typedef struct {
    const char *labels;             /* rendered: {a="x",b="y"} or "" */
    double value;
} sample_t;

struct mso_metric_family_t {
    apr_pool_t *p;
    const char *name;
    const char *help;
    mso_metric_type_e type;
    apr_array_header_t *samples;    /* sample_t *, in the order first set */
    apr_hash_t *by_labels;
};

struct mso_metrics_t {
    apr_pool_t *p;
    apr_array_header_t *families;   /* mso_metric_family_t * */
    apr_hash_t *by_name;
};

/* The job's counters (mso_counters.h): metric, the name of its label (NULL:
 * none) and its help. A counter not listed here is not shown. */
static const struct {
    const char *metric;
    const char *label;
    const char *help;
} counter_families[] = {
    {"refreshes", "outcome", "Token refreshes made by the background job, by outcome"},
    {"graph_requests", "outcome", "Graph requests made by the background job, by outcome"},
    {"graph_pages", NULL, "Graph delta pages applied to the mirror"},
    {"graph_messages", NULL, "Messages written to the mirror"},
    {"graph_throttled", NULL, "Passes of a mailbox's Graph work that Microsoft throttled"},
    {"graph_errors", NULL, "Passes of a mailbox's Graph work that ended in an error"},
    {"actions", "outcome", "Write-back actions applied (done) or failed for good"},
    {"sends", "outcome", "Outgoing mail sent or failed for good"},
    {"retention_deleted", "table", "Rows the retention sweep deleted"},
    {NULL, NULL, NULL}
};

static const char *const states[] = {"connected", "reconnect_required", "disconnected", NULL};

mso_metrics_t *mso_metrics_make(apr_pool_t *p)
{
    mso_metrics_t *m = apr_pcalloc(p, sizeof(*m));

    m->p = p;
    m->families = apr_array_make(p, 16, sizeof(mso_metric_family_t *));
    m->by_name = apr_hash_make(p);
    return m;
}

mso_metric_family_t *mso_metrics_family(mso_metrics_t *m, const char *name,
                                        mso_metric_type_e type, const char *help)
{
    mso_metric_family_t *f = apr_hash_get(m->by_name, name, APR_HASH_KEY_STRING);

    if (!f) {
        f = apr_pcalloc(m->p, sizeof(*f));
        f->p = m->p;
        f->name = apr_pstrdup(m->p, name);
        f->help = apr_pstrdup(m->p, help ? help : "");
        f->type = type;
        f->samples = apr_array_make(m->p, 4, sizeof(sample_t *));
        f->by_labels = apr_hash_make(m->p);
        apr_hash_set(m->by_name, f->name, APR_HASH_KEY_STRING, f);
        APR_ARRAY_PUSH(m->families, mso_metric_family_t *) = f;
    }
    return f;
}

/* A label value as the exposition format quotes it. */
static const char *escape_label(apr_pool_t *p, const char *v)
{
    apr_size_t n = 0;
    const char *s;
    char *out, *o;

    for (s = v; *s; s++) {
        n += (*s == '\\' || *s == '"' || *s == '\n') ? 2 : 1;
    }
    o = out = apr_palloc(p, n + 1);
    for (s = v; *s; s++) {
        if (*s == '\\' || *s == '"') {
            *o++ = '\\';
            *o++ = *s;
        }
        else if (*s == '\n') {
            *o++ = '\\';
            *o++ = 'n';
        }
        else {
            *o++ = *s;
        }
    }
    *o = '\0';
    return out;
}

static sample_t *sample_of(mso_metric_family_t *f, va_list ap)
{
    const char *parts[MAX_LABELS * 2];
    const char *name, *labels = "";
    sample_t *s;
    int i, n = 0;

    while (n < MAX_LABELS * 2 && (name = va_arg(ap, const char *)) != NULL) {
        parts[n++] = name;
        parts[n++] = va_arg(ap, const char *);
    }
    for (i = 0; i < n; i += 2) {
        labels = apr_pstrcat(f->p, labels, i ? "," : "{", parts[i], "=\"",
                             escape_label(f->p, parts[i + 1] ? parts[i + 1] : ""), "\"",
                             NULL);
    }
    if (n) {
        labels = apr_pstrcat(f->p, labels, "}", NULL);
    }
    s = apr_hash_get(f->by_labels, labels, APR_HASH_KEY_STRING);
    if (!s) {
        s = apr_pcalloc(f->p, sizeof(*s));
        s->labels = labels;
        apr_hash_set(f->by_labels, labels, APR_HASH_KEY_STRING, s);
        APR_ARRAY_PUSH(f->samples, sample_t *) = s;
    }
    return s;
}

void mso_metrics_set(mso_metric_family_t *f, double value, ...)
{
    va_list ap;

    va_start(ap, value);
    sample_of(f, ap)->value = value;
    va_end(ap);
}

void mso_metrics_add(mso_metric_family_t *f, double value, ...)
{
    va_list ap;

    va_start(ap, value);
    sample_of(f, ap)->value += value;
    va_end(ap);
}

static const char *number(apr_pool_t *p, double v)
{
    char buf[64];

    if (isnan(v)) {
        return "NaN";
    }
    if (isinf(v)) {
        return v > 0 ? "+Inf" : "-Inf";
    }
    /* libc's formatting: APR's writes 0.25 as .25, which Prometheus'
     * parsers take but a person reading the page does not expect. */
    if (v == floor(v) && fabs(v) < 9007199254740992.0) {
        snprintf(buf, sizeof(buf), "%.0f", v);
    }
    else {
        /* The shortest of the two that reads back as the same number. */
        snprintf(buf, sizeof(buf), "%.15g", v);
        if (strtod(buf, NULL) != v) {
            snprintf(buf, sizeof(buf), "%.17g", v);
        }
    }
    return apr_pstrdup(p, buf);
}

/* HELP text escapes backslash and newline only. */
static const char *escape_help(apr_pool_t *p, const char *h)
{
    const char *s;
    char *out = apr_palloc(p, strlen(h) * 2 + 1), *o = out;

    for (s = h; *s; s++) {
        if (*s == '\\') {
            *o++ = '\\';
            *o++ = '\\';
        }
        else if (*s == '\n') {
            *o++ = '\\';
            *o++ = 'n';
        }
        else {
            *o++ = *s;
        }
    }
    *o = '\0';
    return out;
}

char *mso_metrics_render(apr_pool_t *p, const mso_metrics_t *m)
{
    apr_array_header_t *parts = apr_array_make(p, 64, sizeof(const char *));
    int i, k;

    for (i = 0; i < m->families->nelts; i++) {
        mso_metric_family_t *f = APR_ARRAY_IDX(m->families, i, mso_metric_family_t *);

        APR_ARRAY_PUSH(parts, const char *) = apr_psprintf(
            p, "# HELP %s %s\n# TYPE %s %s\n", f->name, escape_help(p, f->help), f->name,
            f->type == MSO_METRIC_COUNTER ? "counter" : "gauge");
        for (k = 0; k < f->samples->nelts; k++) {
            sample_t *s = APR_ARRAY_IDX(f->samples, k, sample_t *);

            APR_ARRAY_PUSH(parts, const char *) = apr_pstrcat(p, f->name, s->labels, " ",
                                                              number(p, s->value), "\n",
                                                              NULL);
        }
    }
    return apr_array_pstrcat(p, parts, 0);
}

/* ------------------------------------------------------------------------- */
/* From the database */

static const mso_stmt_t ST_ACCOUNTS = {
    "count the accounts per company and state", NULL,
    "SELECT company, client_id, state, COUNT(*) AS n FROM msoauth_accounts "
    "GROUP BY company, client_id, state", NULL
};
static const mso_stmt_t ST_ACTIONS = {
    "count the waiting and failed actions per company", NULL,
    "SELECT a.company AS company, a.client_id AS client_id, q.state AS state, "
    "COUNT(*) AS n, MIN(q.created_at) AS oldest FROM msoauth_actions q "
    "JOIN msoauth_accounts a ON a.id = q.account_id WHERE q.state <> 'done' "
    "GROUP BY a.company, a.client_id, q.state", NULL
};
static const mso_stmt_t ST_OUTBOX = {
    "count the waiting and failed outgoing mail per company", NULL,
    "SELECT a.company AS company, a.client_id AS client_id, o.state AS state, "
    "COUNT(*) AS n, MIN(o.created_at) AS oldest FROM msoauth_outbox o "
    "JOIN msoauth_accounts a ON a.id = o.account_id WHERE o.state <> 'sent' "
    "GROUP BY a.company, a.client_id, o.state", NULL
};
static const mso_stmt_t ST_SYNC_LAG = {
    "read the oldest sync per company", NULL,
    "SELECT company, client_id, MIN(COALESCE(last_sync_at, created_at)) AS oldest "
    "FROM msoauth_accounts WHERE state = 'connected' GROUP BY company, client_id", NULL
};

static int is_mine(mso_metrics_mine_fn *mine, void *baton, const char *company,
                   const char *client_id)
{
    return company && (!mine || mine(baton, company, client_id));
}

/* A queue of work rows (write-back actions, outgoing mail): how many wait
 * and failed per company, and the age of the oldest waiting. st gives
 * company, client_id, state, n and oldest (created_at) per state. */
static apr_status_t collect_queue(mso_db_t *db, apr_pool_t *p, apr_int64_t now,
                                  mso_metrics_mine_fn *mine, void *baton,
                                  const apr_array_header_t *companies, mso_metrics_t *m,
                                  const mso_stmt_t *st, const char *name, const char *help,
                                  const char *age_help)
{
    mso_metric_family_t *n, *age;
    apr_hash_t *oldest = apr_hash_make(p);
    apr_hash_index_t *hi;
    mso_rows_t *rows = NULL;
    apr_status_t rv;
    int i;

    n = mso_metrics_family(m, name, MSO_METRIC_GAUGE, help);
    age = mso_metrics_family(m, apr_pstrcat(p, name, "_oldest_queued_seconds", NULL),
                             MSO_METRIC_GAUGE, age_help);
    for (i = 0; companies && i < companies->nelts; i++) {
        const char *c = APR_ARRAY_IDX(companies, i, const char *);

        mso_metrics_set(n, 0, "company", c, "state", "queued", NULL);
        mso_metrics_set(n, 0, "company", c, "state", "failed", NULL);
        mso_metrics_set(age, 0, "company", c, NULL);
    }
    if (!MSO_OK(mso_select(mso_args(db, p, st), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        const char *c = mso_col_text(rows, p, "company");
        const char *state = mso_col_text(rows, p, "state");

        if (!is_mine(mine, baton, c, mso_col_text(rows, p, "client_id")) || !state) {
            continue;
        }
        mso_metrics_add(n, (double)mso_col_int(rows, "n"), "company", c, "state", state, NULL);
        if (!strcmp(state, "queued")) {
            apr_int64_t t = mso_col_int(rows, "oldest");
            apr_int64_t *o = apr_hash_get(oldest, c, APR_HASH_KEY_STRING);

            if (!o) {
                o = apr_palloc(p, sizeof(*o));
                *o = t;
                apr_hash_set(oldest, c, APR_HASH_KEY_STRING, o);
            }
            *o = t < *o ? t : *o;
        }
    }
    for (hi = apr_hash_first(p, oldest); hi; hi = apr_hash_next(hi)) {
        apr_int64_t *o = apr_hash_this_val(hi);

        mso_metrics_set(age, (double)(now > *o ? now - *o : 0), "company",
                        (const char *)apr_hash_this_key(hi), NULL);
    }
    return APR_SUCCESS;
}

static apr_status_t collect_accounts(mso_db_t *db, apr_pool_t *p, apr_int64_t now,
                                     mso_metrics_mine_fn *mine, void *baton,
                                     const apr_array_header_t *companies, mso_metrics_t *m)
{
    mso_metric_family_t *acc, *lag;
    apr_hash_t *lags = apr_hash_make(p);
    apr_hash_index_t *hi;
    mso_rows_t *rows = NULL;
    apr_status_t rv;
    int i, k;

    acc = mso_metrics_family(m, "msoauth_accounts", MSO_METRIC_GAUGE,
                             "Mailbox accounts per company and state");
    lag = mso_metrics_family(m, "msoauth_sync_lag_seconds", MSO_METRIC_GAUGE,
                             "Seconds since the least recently synced connected mailbox of "
                             "the company was last synced");
    for (i = 0; companies && i < companies->nelts; i++) {
        const char *c = APR_ARRAY_IDX(companies, i, const char *);

        for (k = 0; states[k]; k++) {
            mso_metrics_set(acc, 0, "company", c, "state", states[k], NULL);
        }
    }
    if (!MSO_OK(mso_select(mso_args(db, p, &ST_ACCOUNTS), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        const char *c = mso_col_text(rows, p, "company");

        if (is_mine(mine, baton, c, mso_col_text(rows, p, "client_id"))) {
            mso_metrics_add(acc, (double)mso_col_int(rows, "n"), "company", c, "state",
                            mso_col_text(rows, p, "state"), NULL);
        }
    }
    rv = collect_queue(db, p, now, mine, baton, companies, m, &ST_ACTIONS, "msoauth_actions",
                       "Write-back actions waiting (queued) or failed, per company",
                       "Age of the oldest queued write-back action per company "
                       "(0: none queued)");
    if (rv == APR_SUCCESS) {
        rv = collect_queue(db, p, now, mine, baton, companies, m, &ST_OUTBOX, "msoauth_outbox",
                           "Outgoing mail waiting (queued) or failed, per company",
                           "Age of the oldest queued outgoing mail per company "
                           "(0: none queued)");
    }
    if (rv != APR_SUCCESS) {
        return rv;
    }
    if (!MSO_OK(mso_select(mso_args(db, p, &ST_SYNC_LAG), &rows, NULL))) {
        return rv;
    }
    while (mso_rows_next(rows)) {
        const char *c = mso_col_text(rows, p, "company");
        apr_int64_t t = mso_col_int(rows, "oldest");
        apr_int64_t *o;

        if (!is_mine(mine, baton, c, mso_col_text(rows, p, "client_id"))) {
            continue;
        }
        o = apr_hash_get(lags, c, APR_HASH_KEY_STRING);
        if (!o) {
            o = apr_palloc(p, sizeof(*o));
            *o = t;
            apr_hash_set(lags, c, APR_HASH_KEY_STRING, o);
        }
        *o = t < *o ? t : *o;
    }
    for (hi = apr_hash_first(p, lags); hi; hi = apr_hash_next(hi)) {
        apr_int64_t *o = apr_hash_this_val(hi);

        mso_metrics_set(lag, (double)(now > *o ? now - *o : 0), "company",
                        (const char *)apr_hash_this_key(hi), NULL);
    }
    return APR_SUCCESS;
}

static apr_status_t collect_counters(mso_db_t *db, apr_pool_t *p, mso_metrics_t *m)
{
    apr_array_header_t *rows = NULL;
    apr_status_t rv;
    int i, k;

    if (!MSO_OK(mso_counters_list(db, p, &rows))) {
        return rv;
    }
    for (k = 0; counter_families[k].metric; k++) {
        mso_metric_family_t *f = NULL;

        for (i = 0; i < rows->nelts; i++) {
            mso_counter_row_t *c = &APR_ARRAY_IDX(rows, i, mso_counter_row_t);

            if (!c->metric || strcmp(c->metric, counter_families[k].metric)) {
                continue;
            }
            if (!f) {
                f = mso_metrics_family(m, apr_pstrcat(p, "msoauth_", c->metric, "_total",
                                                      NULL), MSO_METRIC_COUNTER,
                                       counter_families[k].help);
            }
            if (counter_families[k].label) {
                mso_metrics_add(f, (double)c->value, "node", c->node,
                                counter_families[k].label, c->label ? c->label : "", NULL);
            }
            else {
                mso_metrics_add(f, (double)c->value, "node", c->node, NULL);
            }
        }
    }
    return APR_SUCCESS;
}

static apr_status_t collect_job(mso_db_t *db, apr_pool_t *p, apr_int64_t now, mso_metrics_t *m)
{
    apr_array_header_t *runs = NULL;
    apr_hash_t *seen = apr_hash_make(p);
    mso_metric_family_t *dur, *age;
    apr_status_t rv;
    int i;

    if (!MSO_OK(mso_job_runs_list(db, p, &runs))) {
        return rv;
    }
    dur = mso_metrics_family(m, "msoauth_job_cycle_seconds", MSO_METRIC_GAUGE,
                             "Duration of the node's last background job cycle");
    age = mso_metrics_family(m, "msoauth_job_last_cycle_age_seconds", MSO_METRIC_GAUGE,
                             "Seconds since the node's background job last finished a cycle");
    /* Newest first: the first row of a node is its current process's. */
    for (i = 0; i < runs->nelts; i++) {
        mso_job_run_t *r = &APR_ARRAY_IDX(runs, i, mso_job_run_t);
        const char *colon = r->node ? strchr(r->node, ':') : NULL;
        const char *node = colon ? apr_pstrmemdup(p, r->node, colon - r->node) : r->node;

        if (!node || apr_hash_get(seen, node, APR_HASH_KEY_STRING)) {
            continue;
        }
        apr_hash_set(seen, node, APR_HASH_KEY_STRING, "");
        mso_metrics_set(dur, (double)r->cycle_ms / 1000.0, "node", node, NULL);
        mso_metrics_set(age, (double)(now > r->last_cycle_at ? now - r->last_cycle_at : 0),
                        "node", node, NULL);
    }
    return APR_SUCCESS;
}

apr_status_t mso_metrics_collect(mso_db_t *db, apr_pool_t *p, apr_int64_t now,
                                 mso_metrics_mine_fn *mine, void *baton,
                                 const apr_array_header_t *companies, mso_metrics_t *m)
{
    apr_pool_t *tmp;
    apr_status_t rv;

    apr_pool_create(&tmp, p);
    if (MSO_OK(collect_accounts(db, tmp, now, mine, baton, companies, m))
        && MSO_OK(collect_counters(db, tmp, m))) {
        rv = collect_job(db, tmp, now, m);
    }
    apr_pool_destroy(tmp);
    return rv;
}
