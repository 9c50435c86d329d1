/* The metrics (msoauth-metrics): a model of metric families and their
 * samples, filled from the database (and by the glue from the
 * configuration), rendered in Prometheus' text exposition format 0.0.4.
 *
 * A new gauge is a family and one mso_metrics_set per sample, next to its
 * siblings in mso_metrics_collect (or in the glue for configuration
 * values); a new counter of the job is one line of the table in
 * mso_metrics.c and an mso_counter_t the job adds (mso_counters.h). Labels
 * name companies, states, nodes and outcomes: never a mailbox. */
#ifndef MSO_METRICS_H
#define MSO_METRICS_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_tables.h>

#include "mso_db.h"

typedef enum { MSO_METRIC_GAUGE = 0, MSO_METRIC_COUNTER } mso_metric_type_e;

typedef struct mso_metrics_t mso_metrics_t;
typedef struct mso_metric_family_t mso_metric_family_t;

mso_metrics_t *mso_metrics_make(apr_pool_t *p);

/* The family of that name (made on first use, rendered in that order). A
 * counter's name ends in _total. */
mso_metric_family_t *mso_metrics_family(mso_metrics_t *m, const char *name,
                                        mso_metric_type_e type, const char *help);

/* The sample with these labels ("name", "value" pairs, then NULL; label
 * values may hold any text) is set to value / has value added to it. */
void mso_metrics_set(mso_metric_family_t *f, double value, ...);
void mso_metrics_add(mso_metric_family_t *f, double value, ...);

/* The text exposition: # HELP and # TYPE before each family's samples;
 * label values escape \ " and newline, HELP text \ and newline. */
char *mso_metrics_render(apr_pool_t *p, const mso_metrics_t *m);

/* Whether an account of company (connected with client_id) is shown here:
 * a database may be shared by virtual hosts whose companies have the same
 * name and other credentials. */
typedef int mso_metrics_mine_fn(void *baton, const char *company, const char *client_id);

/* Fills what the database says at now: accounts per company and state
 * (each of companies, const char *, shows every state, 0 included), queued
 * and failed actions and the age of the oldest queued one per company, the
 * sync lag per company (now - the oldest last sync of its connected
 * accounts; never synced: since connected), the job's counters per node,
 * and each node's last job cycle (its duration and age; a node is the lease
 * owner's node id, its newest process counts). mine NULL: every account. */
apr_status_t mso_metrics_collect(mso_db_t *db, apr_pool_t *p, apr_int64_t now,
                                 mso_metrics_mine_fn *mine, void *baton,
                                 const apr_array_header_t *companies, mso_metrics_t *m);

#endif
