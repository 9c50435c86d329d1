/* The background job: one instance per httpd on mod_watchdog, serving every
 * virtual host and company. Each tick it claims the accounts whose refresh is
 * due (a lease in the database, so several nodes share the work) and
 * refreshes them. It keeps nothing between ticks that the database does not
 * hold. */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <apr_atomic.h>
#include <apr_optional.h>
#include <apr_strings.h>
#include <apr_dbd.h>
#include <apr_thread_cond.h>
#include <apr_thread_mutex.h>
#include <apr_thread_proc.h>

#include <httpd.h>
#include <http_config.h>
#include <http_log.h>
#include <ap_mpm.h>
#include <mod_dbd.h>
#include <mod_watchdog.h>

#include "mod_msoauth.h"
#include "mod_msoauth_config.h"
#include "mod_msoauth_job.h"
#include "mso_graph.h"
#include "mso_identity.h"
#include "mso_reason.h"
#include "mso_log.h"
#include "mso_refresh.h"
#include "mso_account.h"
#include "mso_db.h"
#include "mso_job_runs.h"
#include "mso_counters.h"
#include "mso_crypto.h"
#include "mso_flows_used.h"
#include "mso_retention.h"
#include "mso_sync.h"

APLOG_USE_MODULE(msoauth);

#define JOB_NAME "msoauth-job"
#define JOB_TICK apr_time_from_sec(1)   /* queued actions start within about a second */
#define CLAIM_BATCH 200         /* accounts leased at once; their calls share the multi handle */
#define TICK_BUDGET apr_time_from_sec(20)
/* Token calls of a tick run concurrently: at most JOB_HTTP_IN_FLIGHT at a
 * time (a claim batch of 50 takes two rounds at worst, well inside the
 * budget), over at most JOB_HTTP_PER_HOST connections to one host (nearly
 * all go to login.microsoftonline.com): reused keep-alive or HTTP/2
 * connections, not a burst of new TLS handshakes Microsoft would throttle. */
#define JOB_HTTP_IN_FLIGHT 32
#define JOB_HTTP_PER_HOST 16
/* After the tick's budget, token calls in flight get this long to finish
 * (none starts): TICK_BUDGET plus this stays inside job_child_stop's wait. */
#define JOB_REFRESH_GRACE_MS 10000
/* Graph work: mailboxes leased at once, each with up to 4 requests in
 * flight. A pass starts new requests during GRAPH_SLICE, then releases its
 * mailboxes (a round in progress stays due); passes follow each other within
 * the tick for up to GRAPH_TICK while there is work, each claiming afresh, so
 * a long initial sync keeps going while new accounts and queued actions get
 * their turn within a pass. */
#define REBIND_EVERY apr_time_from_sec(600)
/* Retention: a sweep an hour per node, for at most 5 s of a tick. */
#define SWEEP_EVERY apr_time_from_sec(3600)
#define SWEEP_BUDGET apr_time_from_sec(5)
#define GRAPH_BATCH 100
#define GRAPH_SLICE apr_time_from_msec(1500)
#define GRAPH_TICK apr_time_from_sec(10)
#define GRAPH_IN_FLIGHT 128
#define GRAPH_PER_HOST 128
/* Hostile mail and memory. A Graph answer goes through the JSON clip as it
 * arrives: any string past MSO_GRAPH_MAX_STRING (4 MiB) is cut, so a body of
 * any size (Exchange takes 150 MB) is stored without its text, marked, and
 * the sync goes on. Per request at most GRAPH_MAX_BODY is kept and
 * MSO_GRAPH_MAX_DOWNLOAD (1 GiB) received. Each lane's multi handle lets its
 * running requests hold GRAPH_BUFFER_BUDGET of bodies, then pauses all but
 * one, so the bodies held at once stay below
 *     GRAPH_LANES x (GRAPH_BUFFER_BUDGET + GRAPH_MAX_BODY) = 2 x 64 MiB,
 * plus, per lane, the one page being parsed (at most GRAPH_MAX_BODY of text
 * and jansson's tree of it). Before, every doubling of every buffer stayed
 * until its request's end: 128 requests x ~64 MiB per lane, 16 GiB.
 * A page of a 150 MB message takes time: no total timeout worth the name
 * (GRAPH_TIMEOUT), a stall (< 1 byte/s for GRAPH_STALL) ends it, and a
 * request started before the tick's budget ran out may finish within
 * GRAPH_TIMEOUT after it (a longer tick then); a stopping child cuts it at
 * once (job->stopping). */
#define GRAPH_MAX_BODY (32 * 1024 * 1024)
#define GRAPH_BUFFER_BUDGET (32 * 1024 * 1024)
/* Attachments (MSOAuthAttachmentMaxBytes = C, at most 150 MiB): each body
 * is downloaded raw, up to C, against a budget of its own, so a big
 * download never pauses a delta page; at most MSO_SYNC_DOWNLOADS (8) are in
 * flight per lane. Bodies in flight stay below GRAPH_DOWNLOAD_BUDGET + C;
 * completed ones wait in a batch of less than 8 MiB + C (lib/mso_sync_attach.c)
 * stored in one transaction on the lane's writer thread while the next batch
 * fills (two batches), during which the database driver copies one of them
 * at a time (C). Per lane 48 MiB + 4 C on top of the pages' bound above
 * (88 MiB with the default 10 MiB; 648 MiB at 150 MiB), whatever the
 * mailboxes hold. Larger attachments are never downloaded by the job. */
#define GRAPH_DOWNLOAD_BUDGET (32 * 1024 * 1024)
#define GRAPH_TIMEOUT (10 * 60 * 1000)
#define GRAPH_STALL 30
/* On PostgreSQL under a threaded MPM, a pass's mailboxes are split over this
 * many threads, each with its own database connection (from mod_dbd's pool:
 * keep DBDMax above it) and HTTP client: one parses pages while another
 * writes; the job is otherwise CPU-bound on one core during big syncs.
 * SQLite has one writer at a time: there the job stays on its thread. */
#define GRAPH_LANES 2

static APR_OPTIONAL_FN_TYPE(ap_watchdog_get_instance) *wd_get_instance;
static APR_OPTIONAL_FN_TYPE(ap_watchdog_register_callback) *wd_register_callback;

typedef struct {
    server_rec *main_s;
    const char *owner;          /* lease owner: node, pid and a random part */
    int announced;              /* "job started" logged in this child */
    apr_time_t secrets_checked;
    apr_time_t owners_checked;
    apr_time_t rebound;         /* tokens of an older version sealed again */
    apr_pool_t *app_pool;       /* the job thread's own: app_tried */
    apr_hash_t *app_tried;      /* app tokens looked at by this generation's job */
    apr_time_t swept;           /* the last retention sweep */
    /* A child that goes away (graceful restart, stop) destroys mod_dbd's
     * connections: it must wait until a tick in progress has given its
     * connection back, and no new tick may start. */
    apr_thread_mutex_t *lock;
    apr_thread_cond_t *idle;
    int busy, stopping;
} job_t;

/* This generation's job (set at registration; each child has its own copy). */
static job_t *the_job;

void msoauth_refresh_ctx(apr_pool_t *p, msoauth_srv_conf_t *sc, msoauth_company_t *c,
                         const char *owner, mso_http_opts_t *http, mso_refresh_ctx_t *ctx)
{
    msoauth_http_opts(sc, http);
    http->timeout_ms = 30000;
    memset(ctx, 0, sizeof(*ctx));
    ctx->keyring = sc->keyring;
    ctx->http = http;
    ctx->owner = owner;
    ctx->authority = mso_authority(p, c->set.authority_url.value, c->set.tenant.value);
    ctx->client_id = c->set.client_id.value;
    ctx->client_secret = c->set.client_secret.value;
    ctx->cert = c->set.client_cert.cert;
    ctx->graph_resource = mso_cloud_graph((mso_cloud_e)c->set.cloud.value);
    ctx->signin_scopes = mso_signin_scopes(p, ctx->graph_resource,
                                           c->set.edition.value == MSO_EDITION_PRO, c->set.scopes.value);
    ctx->margin = MSOAUTH_REFRESH_MARGIN;
    ctx->keepalive = MSOAUTH_KEEPALIVE;
}

void msoauth_app_key(msoauth_company_t *c, const char *resource, mso_apptoken_key_t *k)
{
    k->company = c->name;
    k->client_id = c->set.client_id.value;
    k->resource = resource;
    k->resource_url = !strcmp(resource, "graph")
        ? mso_cloud_graph((mso_cloud_e)c->set.cloud.value)
        : mso_apptoken_outlook_resource(c->set.outlook_url.value, c->set.outlook_url.at != NULL);
}

void msoauth_app_ctx(apr_pool_t *p, msoauth_srv_conf_t *sc, msoauth_company_t *c,
                     const char *owner, mso_http_opts_t *http, mso_apptoken_ctx_t *ctx)
{
    msoauth_http_opts(sc, http);
    http->timeout_ms = 15000;
    memset(ctx, 0, sizeof(*ctx));
    ctx->keyring = sc->keyring;
    ctx->http = http;
    ctx->owner = owner;
    ctx->app.authority = mso_authority(p, c->set.authority_url.value, c->set.tenant.value);
    ctx->app.client_id = c->set.client_id.value;
    ctx->app.client_secret = c->set.client_secret.value;
    ctx->app.cert = c->set.client_cert.cert;
    ctx->margin = MSOAUTH_REFRESH_MARGIN;
}

/* The company of an account: this server's, else another virtual host's that
 * shares the database; by name and the client ID the account was connected
 * with, so that two virtual hosts with a company of the same name but other
 * credentials never refresh each other's accounts. */
static msoauth_company_t *company_of(job_t *job, server_rec *s, const mso_account_t *a,
                                     server_rec **found)
{
    msoauth_company_t *c = msoauth_account_company(s, a->company, a->client_id);
    server_rec *o;

    *found = s;
    for (o = job->main_s; !c && o; o = o->next) {
        c = msoauth_account_company(o, a->company, a->client_id);
        *found = o;
    }
    return c;
}

/* Why an account's company cannot be used here. */
static const char *not_configured_text(apr_pool_t *p, const mso_account_t *a)
{
    return apr_psprintf(p, "no company %s with the client ID %s the account was connected "
                        "with is configured on this server any more (or no longer has a "
                        "secret or certificate); connect the mailbox again under the "
                        "company's current app", a->company ? a->company : "?",
                        a->client_id ? a->client_id : "?");
}

typedef struct {
    int claimed, refreshed, failed;
    int outcomes[MSO_REFRESH_DEFERRED + 1];     /* by mso_refresh_result_e */
    mso_sync_stats_t sync;
    mso_http_counts_t graph;    /* Graph requests by outcome */
    apr_int64_t purged[MSO_RETENTION_MAX];  /* by mso_retention_list()'s entry */
} tick_stats_t;

/* Claims one batch of due accounts in a server's database and refreshes them;
 * returns how many it claimed. The token calls run concurrently over *m, the
 * tick's multi handle (created here on first use), so its connections serve
 * every server of the tick. */
static int refresh_batch(job_t *job, server_rec *s, mso_db_t *db, apr_pool_t *p,
                         apr_time_t deadline, mso_http_multi_t **m, tick_stats_t *st)
{
    apr_array_header_t *due = NULL;
    const mso_refresh_ctx_t **ctxs;
    const mso_account_t **accts;
    mso_refresh_outcome_t *outs;
    apr_pool_t *bp;
    apr_int64_t now;
    int i, n = 0;

    apr_pool_create(&bp, p);
    if (mso_account_claim_due(db, bp, job->owner, apr_time_sec(apr_time_now()),
                              MSOAUTH_LEASE_SECONDS, CLAIM_BATCH, &due) != APR_SUCCESS
        || !due->nelts) {
        apr_pool_destroy(bp);
        return 0;
    }
    st->claimed += due->nelts;
    ctxs = apr_pcalloc(bp, sizeof(*ctxs) * due->nelts);
    accts = apr_pcalloc(bp, sizeof(*accts) * due->nelts);
    outs = apr_pcalloc(bp, sizeof(*outs) * due->nelts);
    now = apr_time_sec(apr_time_now());
    for (i = 0; i < due->nelts; i++) {
        mso_account_t *a = APR_ARRAY_IDX(due, i, mso_account_t *);
        server_rec *cs;
        msoauth_company_t *c = company_of(job, s, a, &cs);
        mso_refresh_ctx_t *ctx;
        mso_http_opts_t *http;

        if (!msoauth_company_has_credentials(c)) {
            /* The company left the configuration: keep the account, say why. */
            mso_account_refresh_failed(db, bp, a->id, job->owner, "connected",
                                       "not_configured", 0, not_configured_text(bp, a),
                                       now + 3600, now);
            st->failed++;
            st->outcomes[MSO_REFRESH_ADMIN]++;
            continue;
        }
        if (apr_time_now() > deadline) {
            mso_account_release(db, bp, a->id, job->owner);     /* next tick */
            continue;
        }
        /* One context per account: each carries its company's credentials. */
        ctx = apr_palloc(bp, sizeof(*ctx));
        http = apr_palloc(bp, sizeof(*http));
        msoauth_refresh_ctx(bp, msoauth_srv_conf(cs), c, job->owner, http, ctx);
        ctxs[n] = ctx;
        accts[n] = a;
        n++;
    }
    if (n && !*m) {
        /* The server's proxy and CA file serve its whole database (job_tick
         * gives servers with other ones their own clients). */
        mso_http_opts_t http;
        apr_status_t rv;

        msoauth_http_opts(msoauth_srv_conf(s), &http);
        http.timeout_ms = ctxs[0]->http->timeout_ms;
        /* A token call already sent when the tick's budget runs out may
         * finish: cut, Microsoft has issued (and rotated) the tokens while
         * the answer is dropped and the account waits a transient backoff. */
        http.grace_ms = JOB_REFRESH_GRACE_MS;
        rv = mso_http_multi_create(p, &http, JOB_HTTP_IN_FLIGHT, JOB_HTTP_PER_HOST, m);

        if (rv != APR_SUCCESS) {
            ap_log_error(APLOG_MARK, APLOG_ERR, rv, s, MSOLOGNO(208) "job: cannot set up "
                         "the HTTP client; the accounts are left for the next tick");
            for (i = 0; i < n; i++) {
                mso_account_release(db, bp, accts[i]->id, job->owner);
            }
            n = 0;
        }
    }
    if (n) {
        mso_refresh_batch(db, bp, ctxs, accts, n, "graph", *m, deadline - apr_time_now(), now,
                          outs);
    }
    for (i = 0; i < n; i++) {
        const mso_account_t *a = accts[i];
        const mso_refresh_outcome_t *out = &outs[i];

        if (out->result >= 0 && out->result <= MSO_REFRESH_DEFERRED) {
            st->outcomes[out->result]++;
        }
        if (out->result == MSO_REFRESHED) {
            st->refreshed++;
            ap_log_error(APLOG_MARK, APLOG_DEBUG, 0, s, MSOLOGNO(201) "job: account %"
                         APR_INT64_T_FMT " (%s) refreshed", a->id,
                         ap_escape_logitem(bp, a->mailbox));
        }
        else if (out->result == MSO_REFRESH_DEFERRED) {
            ap_log_error(APLOG_MARK, APLOG_DEBUG, 0, s, MSOLOGNO(209) "job: account %"
                         APR_INT64_T_FMT " (%s) left for the next tick: the tick's time "
                         "budget ran out", a->id, ap_escape_logitem(bp, a->mailbox));
            continue;
        }
        else if (out->result != MSO_REFRESH_BUSY) {
            st->failed++;
            ap_log_error(APLOG_MARK, out->result == MSO_REFRESH_TRANSIENT ? APLOG_WARNING
                         : APLOG_ERR, 0, s, MSOLOGNO(202) "job: refreshing account %"
                         APR_INT64_T_FMT " (%s, company %s) failed: %s%s%s", a->id,
                         ap_escape_logitem(bp, a->mailbox), ap_escape_logitem(bp, a->company),
                         out->reason ? out->reason : "error",
                         out->aadsts ? apr_psprintf(bp, " AADSTS%ld", out->aadsts) : "",
                         out->detail ? apr_pstrcat(bp, " (", ap_escape_logitem(bp, out->detail),
                                                   ")", NULL) : "");
        }
    }
    apr_pool_destroy(bp);
    return due->nelts;
}

/* The Graph application tokens of the server's app-only companies, fetched
 * ahead of expiry, each under the lease of its row: one node fetches, the
 * others read the row. A failure waits its backoff (retry_at), except that
 * the first tick of a new generation (a reload, perhaps with the fix) tries
 * once at once. */
static void app_tokens(job_t *job, server_rec *s, mso_db_t *db, apr_pool_t *p,
                       apr_time_t deadline)
{
    msoauth_srv_conf_t *sc = msoauth_srv_conf(s);
    apr_hash_index_t *hi;
    apr_pool_t *tp;

    if (!sc->keyring) {
        return;
    }
    apr_pool_create(&tp, p);
    for (hi = apr_hash_first(tp, sc->companies); hi && apr_time_now() < deadline;
         hi = apr_hash_next(hi)) {
        msoauth_company_t *c = apr_hash_this_val(hi);
        apr_int64_t now = apr_time_sec(apr_time_now());
        mso_apptoken_outcome_t out;
        mso_apptoken_key_t k;
        mso_apptoken_ctx_t ctx;
        mso_http_opts_t http;
        mso_apptoken_t *row = NULL;
        const char *seen;
        int first, force;

        if (!c->set.app_only.value || !msoauth_company_has_credentials(c)) {
            continue;
        }
        msoauth_app_key(c, "graph", &k);
        seen = apr_pstrcat(tp, k.company, "\n", k.client_id, NULL);
        first = !apr_hash_get(job->app_tried, seen, APR_HASH_KEY_STRING);
        if (first) {
            apr_hash_set(job->app_tried, apr_pstrdup(job->app_pool, seen),
                         APR_HASH_KEY_STRING, "");
        }
        if (mso_apptoken_get(db, tp, &k, &row) != APR_SUCCESS) {
            row = NULL;
        }
        if (row && row->sealed && !row->reason && row->refresh_due_at > now) {
            continue;                   /* fresh: nothing to do */
        }
        force = first && row && row->reason;
        if (row && !force && row->retry_at > now) {
            continue;                   /* waiting after a failure */
        }
        if (mso_apptoken_lease(db, tp, &k, job->owner, now, MSOAUTH_LEASE_SECONDS, force)
            != APR_SUCCESS) {
            continue;                   /* another node fetches it, or nothing is due */
        }
        msoauth_app_ctx(tp, sc, c, job->owner, &http, &ctx);
        mso_apptoken_fetch(db, tp, &ctx, &k, now, &out);
        if (out.result == MSO_APPTOKEN_OK) {
            ap_log_error(APLOG_MARK, APLOG_DEBUG, 0, s, MSOLOGNO(216) "job: application token "
                         "of company %s fetched (%s), valid until %" APR_INT64_T_FMT ", roles %s",
                         c->name, c->set.client_cert.cert ? "certificate" : "secret",
                         out.expires_at, out.roles ? (*out.roles ? out.roles : "(none)") : "(not in the token)");
        }
        else if (out.result != MSO_APPTOKEN_BUSY) {
            const mso_reason_t *rs = mso_reason_get(out.reason);

            ap_log_error(APLOG_MARK, out.result == MSO_APPTOKEN_TRANSIENT ? APLOG_WARNING
                         : APLOG_ERR, 0, s, MSOLOGNO(217) "job: the application token of "
                         "company %s cannot be fetched: %s%s%s; its mailboxes wait.%s%s",
                         c->name, out.reason ? out.reason : "error",
                         out.aadsts ? apr_psprintf(tp, " AADSTS%ld", out.aadsts) : "",
                         out.detail ? apr_pstrcat(tp, " (", ap_escape_logitem(tp, out.detail),
                                                  ")", NULL) : "",
                         rs && out.result == MSO_APPTOKEN_ADMIN ? " Fix: " : "",
                         rs && out.result == MSO_APPTOKEN_ADMIN ? rs->fix : "");
        }
    }
    apr_pool_destroy(tp);
}

/* The Graph application token of an app account's company in clear (cached
 * in tokens for the batch), or NULL; *roles its roles (NULL: unknown). */
static const char *app_access_token(apr_pool_t *p, msoauth_srv_conf_t *sc, mso_db_t *db,
                                    msoauth_company_t *c, apr_hash_t *tokens,
                                    const char **roles)
{
    const char *name = apr_pstrcat(p, c->name, "\n", c->set.client_id.value, NULL);
    const char **got = apr_hash_get(tokens, name, APR_HASH_KEY_STRING);
    mso_apptoken_key_t k;
    mso_apptoken_t *row = NULL;
    const char *plain = NULL;

    if (!got) {
        got = apr_pcalloc(p, 2 * sizeof(*got));
        msoauth_app_key(c, "graph", &k);
        if (sc->keyring && mso_apptoken_get(db, p, &k, &row) == APR_SUCCESS
            && mso_apptoken_open(p, sc->keyring, &k, row, apr_time_sec(apr_time_now()), 60,
                                 &plain) == APR_SUCCESS) {
            got[0] = plain;
            got[1] = row->roles;
        }
        apr_hash_set(tokens, name, APR_HASH_KEY_STRING, got);
    }
    *roles = got[1];
    return got[0];
}

/* The account's Graph access token in clear, or NULL. */
static const char *access_token(apr_pool_t *p, msoauth_srv_conf_t *sc, mso_db_t *db,
                                const mso_account_t *a)
{
    const char *plain = NULL;

    if (!sc->keyring
        || mso_account_token_open(db, p, sc->keyring, a, "graph", &plain, NULL)
           != APR_SUCCESS) {
        return NULL;
    }
    return plain;
}

/* One thread's share of a pass. Lane 0 is the job's own thread (its pool,
 * connection and HTTP client); the others have a pool with its own
 * allocator, their own connection from mod_dbd and their own HTTP client,
 * set up and torn down by the job's thread, used by their thread only. */
typedef struct {
    apr_pool_t *pool;
    server_rec *s;              /* the server whose accounts it works on, for the log */
    ap_dbd_t *dbd;
    mso_db_t *db;
    mso_http_multi_t *m;
    const char *owner;
    mso_sync_box_t *boxes;
    int n;
    apr_time_t slice_end, deadline;
    mso_sync_stats_t st;
} lane_t;

typedef struct {
    lane_t lane[GRAPH_LANES];
    int extra;                  /* lanes beyond the first that are set up */
    int tried;
} lanes_t;

static apr_status_t graph_http(apr_pool_t *p, msoauth_srv_conf_t *sc, mso_http_multi_t **m)
{
    mso_http_opts_t http;

    msoauth_http_opts(sc, &http);
    http.timeout_ms = GRAPH_TIMEOUT;
    http.stall_seconds = GRAPH_STALL;
    http.max_body = GRAPH_MAX_BODY;
    http.max_string = MSO_GRAPH_MAX_STRING;
    http.max_download = MSO_GRAPH_MAX_DOWNLOAD;
    http.capture = mso_graph_link_keys;
    http.buffer_budget = GRAPH_BUFFER_BUDGET;
    http.download_budget = GRAPH_DOWNLOAD_BUDGET;
    http.grace_ms = GRAPH_TIMEOUT;
    http.stop = the_job ? &the_job->stopping : NULL;
    return mso_http_multi_create(p, &http, GRAPH_IN_FLIGHT, GRAPH_PER_HOST, m);
}

/* The extra lanes, once per tick and server; on any failure the pass runs
 * on fewer. */
static void lanes_setup(job_t *job, server_rec *s, mso_db_t *db, lanes_t *ls)
{
    int k, threaded = 0;

    ls->tried = 1;
    if (db->kind != MSO_DB_PGSQL || ap_mpm_query(AP_MPMQ_IS_THREADED, &threaded) != APR_SUCCESS
        || threaded == AP_MPMQ_NOT_SUPPORTED) {
        return;
    }
    for (k = 1; k < GRAPH_LANES; k++) {
        lane_t *l = &ls->lane[k];

        if (apr_pool_create_unmanaged_ex(&l->pool, NULL, NULL) != APR_SUCCESS) {
            break;
        }
        l->dbd = msoauth_dbd_open(l->pool, s);
        /* Never the job's own connection (a non-pooling mod_dbd hands it out). */
        if (!l->dbd || l->dbd->handle == db->handle
            || mso_db_wrap(l->dbd->pool, l->dbd->driver, l->dbd->handle, &l->db)
               != APR_SUCCESS
            || graph_http(l->pool, msoauth_srv_conf(s), &l->m) != APR_SUCCESS) {
            if (l->dbd) {
                msoauth_dbd_close(s, l->dbd);
            }
            apr_pool_destroy(l->pool);
            memset(l, 0, sizeof(*l));
            break;
        }
        l->owner = job->owner;
        l->s = s;
        ls->extra++;
    }
}

static void lanes_teardown(server_rec *s, lanes_t *ls, mso_http_counts_t *counts)
{
    int k;

    for (k = 1; k <= ls->extra; k++) {
        lane_t *l = &ls->lane[k];

        mso_http_multi_counts(l->m, counts);
        mso_http_multi_destroy(l->m);
        msoauth_dbd_close(s, l->dbd);
        apr_pool_destroy(l->pool);
    }
    ls->extra = 0;
}

static void *APR_THREAD_FUNC lane_main(apr_thread_t *t, void *data)
{
    lane_t *l = data;

    mso_log_scope(l->s);
    mso_sync_run(l->db, l->pool, l->owner, l->boxes, l->n, l->m, l->slice_end, l->deadline,
                 &l->st);
    apr_thread_exit(t, APR_SUCCESS);
    return NULL;
}

/* Runs one pass over boxes, split over the lanes. */
static void graph_pass(job_t *job, server_rec *s, mso_db_t *db, apr_pool_t *bp, lanes_t *ls,
                       mso_http_multi_t *m, mso_sync_box_t *boxes, int n, apr_time_t slice_end,
                       apr_time_t deadline, tick_stats_t *st)
{
    apr_thread_t *th[GRAPH_LANES];
    int k, lanes, from, started[GRAPH_LANES];

    if (n > 1 && !ls->tried) {
        lanes_setup(job, s, db, ls);
    }
    lanes = 1 + (n > 1 ? ls->extra : 0);
    if (lanes > n) {
        lanes = n;
    }
    for (k = 0, from = 0; k < lanes; k++) {
        lane_t *l = &ls->lane[k];
        int to = (int)((apr_int64_t)n * (k + 1) / lanes);

        l->boxes = boxes + from;
        l->n = to - from;
        l->slice_end = slice_end;
        l->deadline = deadline;
        memset(&l->st, 0, sizeof(l->st));
        from = to;
        started[k] = 0;
        if (k > 0) {
            started[k] = apr_thread_create(&th[k], NULL, lane_main, l, bp) == APR_SUCCESS;
            if (!started[k]) {
                /* No thread: this share runs here after lane 0. */
                ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(215) "job: cannot "
                             "start a Graph thread; running its mailboxes on the job's thread");
            }
        }
    }
    mso_sync_run(db, bp, job->owner, ls->lane[0].boxes, ls->lane[0].n, m, slice_end,
                 deadline, &ls->lane[0].st);
    for (k = 1; k < lanes; k++) {
        apr_status_t trv;

        if (started[k]) {
            apr_thread_join(&trv, th[k]);
        }
        else {
            mso_sync_run(db, bp, job->owner, ls->lane[k].boxes, ls->lane[k].n, m, slice_end,
                         deadline, &ls->lane[k].st);
        }
    }
    for (k = 0; k < lanes; k++) {
        mso_sync_stats_t *a = &st->sync, *b = &ls->lane[k].st;

        a->mailboxes += b->mailboxes;
        a->pages += b->pages;
        a->messages += b->messages;
        a->resyncs += b->resyncs;
        a->actions_done += b->actions_done;
        a->actions_failed += b->actions_failed;
        a->actions_waiting += b->actions_waiting;
        a->sends_done += b->sends_done;
        a->sends_failed += b->sends_failed;
        a->sends_waiting += b->sends_waiting;
        a->throttled += b->throttled;
        a->errors += b->errors;
        a->attach_lists += b->attach_lists;
        a->attach_stored += b->attach_stored;
        a->attach_bytes += b->attach_bytes;
    }
}

/* Leases one batch of mailboxes with Graph work and runs one pass over them;
 * returns how many it leased. */
static int graph_batch(job_t *job, server_rec *s, mso_db_t *db, apr_pool_t *p,
                       apr_time_t slice_end, apr_time_t deadline, mso_http_multi_t **gm,
                       lanes_t *ls, tick_stats_t *st)
{
    apr_array_header_t *works = NULL;
    mso_sync_box_t *boxes;
    apr_pool_t *bp;
    apr_hash_t *app_tokens_of;
    apr_int64_t now = apr_time_sec(apr_time_now());
    int i, n = 0, claimed;

    apr_pool_create(&bp, p);
    app_tokens_of = apr_hash_make(bp);
    if (mso_mirror_claim(db, bp, job->owner, now, MSO_MIRROR_LEASE, GRAPH_BATCH, &works)
        != APR_SUCCESS || !works->nelts) {
        apr_pool_destroy(bp);
        return 0;
    }
    claimed = works->nelts;
    boxes = apr_pcalloc(bp, sizeof(*boxes) * works->nelts);
    for (i = 0; i < works->nelts; i++) {
        mso_work_t *w = APR_ARRAY_IDX(works, i, mso_work_t *);
        server_rec *cs;
        msoauth_company_t *c = company_of(job, s, w->acct, &cs);
        mso_work_done_t keep;

        int app = w->acct->kind && !strcmp(w->acct->kind, "app");

        if (!c || !c->set.client_id.value || app != (c->set.app_only.value != 0)) {
            /* Its company left the configuration: leave it as it is. */
            memset(&keep, 0, sizeof(keep));
            keep.sync_due_at = now + 3600;
            keep.sync_phase = w->sync_phase;
            keep.sync_error = not_configured_text(bp, w->acct);
            keep.sync_error_runs = w->sync_error_runs;
            mso_mirror_release(db, bp, w->acct->id, job->owner, &keep, now);
            continue;
        }
        boxes[n].work = w;
        boxes[n].graph_root = c->set.graph_url.value;
        boxes[n].folders = c->set.folders.value;
        boxes[n].interval = c->set.sync_interval.value;
        if (app) {
            /* The company's token, on /users/{address}; what it may do are its roles. */
            const char *roles = NULL;

            boxes[n].app_only = 1;
            boxes[n].access_token = app_access_token(bp, msoauth_srv_conf(cs), db, c,
                                                     app_tokens_of, &roles);
            boxes[n].mailbox_url = mso_graph_mailbox(bp, c->set.graph_url.value,
                                                     w->acct->mailbox);
            if (roles) {
                boxes[n].can_write = mso_roles_have(roles, "Mail.ReadWrite");
                boxes[n].can_send = mso_roles_have(roles, "Mail.Send");
            }
            else {
                /* An opaque token: what the edition expects; Graph enforces it. */
                boxes[n].can_write = boxes[n].can_send
                    = c->set.edition.value == MSO_EDITION_PRO;
            }
        }
        else if (w->acct->shared) {
            /* A person's token on the shared mailbox they have Full Access to. */
            boxes[n].access_token = access_token(bp, msoauth_srv_conf(cs), db, w->acct);
            boxes[n].mailbox_url = mso_graph_mailbox(bp, c->set.graph_url.value,
                                                     w->acct->mailbox);
            boxes[n].can_write = mso_sync_scope_has(w->acct->scopes, "Mail.ReadWrite.Shared");
            boxes[n].can_send = mso_sync_scope_has(w->acct->scopes, "Mail.Send.Shared");
        }
        else {
            boxes[n].access_token = access_token(bp, msoauth_srv_conf(cs), db, w->acct);
            boxes[n].mailbox_url = mso_graph_mailbox(bp, c->set.graph_url.value, NULL);
            boxes[n].can_write = mso_sync_scopes_can_write(w->acct->scopes);
            boxes[n].can_send = mso_sync_scopes_can_send(w->acct->scopes);
        }
        boxes[n].attach_max_bytes = c->set.attachment_max_bytes.value;
        n++;
    }
    if (n && !*gm) {
        apr_status_t rv = graph_http(p, msoauth_srv_conf(s), gm);

        if (rv != APR_SUCCESS) {
            ap_log_error(APLOG_MARK, APLOG_ERR, rv, s, MSOLOGNO(212) "job: cannot set up the "
                         "HTTP client for Graph; the mailboxes are left for the next tick");
            *gm = NULL;
            n = 0;
            for (i = 0; i < works->nelts; i++) {
                mso_work_t *w = APR_ARRAY_IDX(works, i, mso_work_t *);
                mso_work_done_t keep;

                memset(&keep, 0, sizeof(keep));
                keep.sync_due_at = w->sync_due_at;
                keep.sync_phase = w->sync_phase;
                keep.sync_error = w->sync_error;
                keep.sync_error_runs = w->sync_error_runs;
                keep.auth_retry = w->auth_retry;
                mso_mirror_release(db, bp, w->acct->id, job->owner, &keep, now);
            }
        }
    }
    if (n) {
        graph_pass(job, s, db, bp, ls, *gm, boxes, n, slice_end, deadline, st);
    }
    apr_pool_destroy(bp);
    return claimed;
}

/* Leases of a process of this node that died (kill -9, a crash) are dropped
 * at once instead of blocking its accounts until they run out. The owner is
 * "node:pid:random", the node id being this httpd's (see msoauth_node_id): a
 * pid of another node, even one with the same host name, is never looked at
 * here. A pid that exists (or belongs to another user) counts as alive. */
static void drop_dead_owners(job_t *job, server_rec *s, mso_db_t *db, apr_pool_t *p)
{
    apr_array_header_t *owners = NULL;
    const char *colon = strchr(job->owner, ':');
    apr_size_t node_len = colon ? (apr_size_t)(colon - job->owner) + 1 : 0;
    int i;

    if (!node_len || mso_account_lease_owners(db, p, &owners) != APR_SUCCESS) {
        return;
    }
    for (i = 0; i < owners->nelts; i++) {
        const char *o = APR_ARRAY_IDX(owners, i, const char *);
        char *end = NULL;
        long pid;

        if (strncmp(o, job->owner, node_len) != 0 || !strcmp(o, job->owner)) {
            continue;
        }
        pid = strtol(o + node_len, &end, 10);
        if (pid <= 1 || !end || *end != ':' || pid == (long)getpid()) {
            continue;
        }
        if (kill((pid_t)pid, 0) == -1 && errno == ESRCH) {
            ap_log_error(APLOG_MARK, APLOG_NOTICE, 0, s, MSOLOGNO(214) "job: process %ld of "
                         "this node died holding leases; they are released", pid);
            mso_account_drop_owner(db, p, o);
        }
    }
}

/* Retention: what MSOAuthRetentionDays lets go, in small batches, for at
 * most SWEEP_BUDGET of the tick; what is left waits for the next sweep.
 * Spent sign-in states go once expired, whatever the retention. */
static void sweep(server_rec *s, mso_db_t *db, apr_pool_t *p, apr_time_t deadline,
                  tick_stats_t *st)
{
    const mso_purge_t *list = mso_retention_list();
    int days = msoauth_retention_days(msoauth_srv_conf(s)), i, finished = 1, states = 0;
    apr_time_t until = apr_time_now() + SWEEP_BUDGET;
    const char *err = NULL;
    apr_pool_t *sp;

    apr_pool_create(&sp, p);
    if (mso_flows_used_purge(db, sp, apr_time_sec(apr_time_now()), &states, &err)
        != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_ERR, 0, s, MSOLOGNO(220) "job: purging the expired "
                     "sign-in states: %s", err ? err : "failed");
    }
    else if (states) {
        ap_log_error(APLOG_MARK, APLOG_DEBUG, 0, s, MSOLOGNO(221) "job: %d expired sign-in "
                     "states deleted", states);
    }
    if (days == 0) {
        apr_pool_destroy(sp);
        return;
    }
    if (mso_retention_sweep(db, sp, days, apr_time_sec(apr_time_now()),
                            until < deadline ? until : deadline, st->purged, &finished, &err)
        != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_ERR, 0, s, MSOLOGNO(216) "job: retention sweep: %s",
                     err ? err : "failed");
    }
    for (i = 0; list[i].what; i++) {
        if (st->purged[i]) {
            ap_log_error(APLOG_MARK, APLOG_INFO, 0, s, MSOLOGNO(217) "job: retention: %"
                         APR_INT64_T_FMT " %s older than %d days deleted%s", st->purged[i],
                         list[i].what, days, finished ? "" : " (more next time)");
        }
    }
    apr_pool_destroy(sp);
}

/* What this tick did, added to the node's counters for the metrics. */
static void add_counters(mso_db_t *db, apr_pool_t *p, const tick_stats_t *st)
{
    const mso_purge_t *list = mso_retention_list();
    mso_counter_t c[32];
    int n = 0, i;

#define COUNT(m_, l_, v_) \
    do { c[n].metric = (m_); c[n].label = (l_); c[n].value = (v_); n++; } while (0)
    COUNT("refreshes", "refreshed", st->outcomes[MSO_REFRESHED]);
    COUNT("refreshes", "transient", st->outcomes[MSO_REFRESH_TRANSIENT]);
    COUNT("refreshes", "reconnect", st->outcomes[MSO_REFRESH_RECONNECT]);
    COUNT("refreshes", "admin", st->outcomes[MSO_REFRESH_ADMIN]);
    COUNT("refreshes", "failed", st->outcomes[MSO_REFRESH_FAILED]);
    COUNT("graph_requests", "ok", st->graph.ok);
    COUNT("graph_requests", "throttled", st->graph.throttled);
    COUNT("graph_requests", "client_error", st->graph.client_error);
    COUNT("graph_requests", "server_error", st->graph.server_error);
    COUNT("graph_requests", "failed", st->graph.failed);
    COUNT("graph_pages", NULL, st->sync.pages);
    COUNT("graph_messages", NULL, st->sync.messages);
    COUNT("graph_throttled", NULL, st->sync.throttled);
    COUNT("graph_errors", NULL, st->sync.errors);
    COUNT("actions", "done", st->sync.actions_done);
    COUNT("actions", "failed", st->sync.actions_failed);
    COUNT("sends", "sent", st->sync.sends_done);
    COUNT("sends", "failed", st->sync.sends_failed);
    for (i = 0; list[i].what && n < (int)(sizeof(c) / sizeof(c[0])); i++) {
        COUNT("retention_deleted", list[i].name, st->purged[i]);
    }
#undef COUNT
    mso_counters_add(db, p, msoauth_node_id() ? msoauth_node_id() : "node", c, n,
                     apr_time_sec(apr_time_now()));
}

/* Everything due in one server's database, batch after batch, until none is
 * left or the tick's time is up; then the node's health row. */
static void refresh_due(job_t *job, server_rec *s, apr_pool_t *p, apr_time_t deadline,
                        mso_http_multi_t **m, mso_http_multi_t **gm)
{
    ap_dbd_t *dbd = msoauth_dbd_open(p, s);
    apr_time_t started = apr_time_now(), graph_end;
    lanes_t lanes;
    tick_stats_t st;
    mso_job_run_t run;
    mso_db_t *db;
    void *before;

    memset(&st, 0, sizeof(st));
    memset(&lanes, 0, sizeof(lanes));
    if (!dbd) {
        ap_log_error(APLOG_MARK, APLOG_ERR, 0, s, MSOLOGNO(200) "job: no database connection "
                     "from mod_dbd for this server; check DBDriver/DBDParams");
        return;
    }
    before = mso_log_scope(s);
    if (mso_db_wrap(dbd->pool, dbd->driver, dbd->handle, &db) == APR_SUCCESS) {
        if (apr_time_now() - job->owners_checked > apr_time_from_sec(10)) {
            job->owners_checked = apr_time_now();
            drop_dead_owners(job, s, db, p);
        }
        if (apr_time_now() - job->rebound > REBIND_EVERY) {
            msoauth_rebind_tokens(p, job->main_s, s, db);
        }
        while (refresh_batch(job, s, db, p, deadline, m, &st) == CLAIM_BATCH
               && apr_time_now() < deadline) {
        }
        app_tokens(job, s, db, p, deadline);
        /* Then the mail: actions and delta pages, with fresh tokens. */
        graph_end = apr_time_now() + GRAPH_TICK;
        if (graph_end > deadline - apr_time_from_sec(5)) {
            graph_end = deadline - apr_time_from_sec(5);
        }
        while (apr_time_now() < graph_end) {
            apr_time_t slice_end = apr_time_now() + GRAPH_SLICE;

            if (slice_end > graph_end) {
                slice_end = graph_end;
            }
            if (!graph_batch(job, s, db, p, slice_end, deadline, gm, &lanes, &st)) {
                break;          /* nothing left to do */
            }
        }
        lanes_teardown(s, &lanes, &st.graph);
        mso_http_multi_counts(*gm, &st.graph);
        if (apr_time_now() - job->swept > SWEEP_EVERY) {
            sweep(s, db, p, deadline, &st);
        }
        if (st.sync.mailboxes) {
            ap_log_error(APLOG_MARK, APLOG_DEBUG, 0, s, MSOLOGNO(213) "job: Graph work on %d "
                         "mailboxes: %d pages, %d messages, %d resyncs, %d actions done, %d "
                         "failed, %d waiting, %d mails sent, %d failed, %d waiting, %d "
                         "throttled, %d errors, %d attachment lists, %d attachments stored "
                         "(%" APR_INT64_T_FMT " bytes)",
                         st.sync.mailboxes, st.sync.pages, st.sync.messages, st.sync.resyncs,
                         st.sync.actions_done, st.sync.actions_failed,
                         st.sync.actions_waiting, st.sync.sends_done, st.sync.sends_failed,
                         st.sync.sends_waiting, st.sync.throttled, st.sync.errors,
                         st.sync.attach_lists, st.sync.attach_stored, st.sync.attach_bytes);
        }
        run.node = job->owner;
        run.last_cycle_at = apr_time_sec(apr_time_now());
        run.cycle_ms = apr_time_as_msec(apr_time_now() - started);
        run.claimed = st.claimed;
        run.refreshed = st.refreshed;
        run.failed = st.failed;
        mso_job_runs_record(db, p, &run);
        add_counters(db, p, &st);
    }
    msoauth_dbd_close(s, dbd);
    mso_log_scope(before);
}

/* Secret and certificate expiry: a warning once a day from 30 days before,
 * an error after. */
static void check_secrets(job_t *job, apr_pool_t *p)
{
    server_rec *s;
    apr_hash_index_t *hi;
    apr_time_t now = apr_time_now();

    for (s = job->main_s; s; s = s->next) {
        for (hi = apr_hash_first(p, msoauth_srv_conf(s)->companies); hi; hi = apr_hash_next(hi)) {
            msoauth_company_t *c = apr_hash_this_val(hi);
            long days;

            if (c->set.client_cert.cert && c->set.client_id.value) {
                /* The certificate, like the secret: the job says it every day. */
                days = mso_days_until(mso_cert_not_after(c->set.client_cert.cert), now);
                if (days < 0) {
                    ap_log_error(APLOG_MARK, APLOG_ERR, 0, s, MSOLOGNO(218) "the certificate "
                                 "of company %s (SHA-1 thumbprint %s) has expired: token "
                                 "requests fail with certificate_expired. Make a new one, "
                                 "upload it and point MSOAuthClientCertificateFile at it (%s)",
                                 c->name, mso_cert_sha1_hex(c->set.client_cert.cert),
                                 c->set.client_cert.at);
                }
                else if (days < MSOAUTH_SECRET_WARN_DAYS) {
                    ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(219) "the "
                                 "certificate of company %s (SHA-1 thumbprint %s) expires in "
                                 "%ld day%s: upload a new one now", c->name,
                                 mso_cert_sha1_hex(c->set.client_cert.cert), days,
                                 days == 1 ? "" : "s");
                }
            }
            if (!c->set.secret_expires.value || !c->set.client_id.value
                || c->set.client_cert.cert) {
                continue;
            }
            days = mso_days_until(c->set.secret_expires.value, now);
            if (days < 0) {
                ap_log_error(APLOG_MARK, APLOG_ERR, 0, s, MSOLOGNO(210) "the client secret of "
                             "company %s expired on %s: refreshes fail with "
                             "client_secret_expired. Create a new secret, deploy its Value and "
                             "update MSOAuthSecretExpires (%s)", c->name,
                             c->set.secret_expires.text, c->set.secret_expires.at);
            }
            else if (days < MSOAUTH_SECRET_WARN_DAYS) {
                ap_log_error(APLOG_MARK, APLOG_WARNING, 0, s, MSOLOGNO(211) "the client secret "
                             "of company %s expires in %ld day%s (%s): create a new one now",
                             c->name, days, days == 1 ? "" : "s", c->set.secret_expires.text);
            }
        }
    }
}

static int same_text(const char *a, const char *b)
{
    return a == b || (a && b && !strcmp(a, b));
}

static apr_status_t job_tick(int state, void *data, apr_pool_t *pool)
{
    job_t *job = data;
    server_rec *s;
    apr_time_t deadline;
    mso_http_multi_t *m = NULL, *gm = NULL;
    msoauth_srv_conf_t *http_of = NULL;

    switch (state) {
    case AP_WATCHDOG_STATE_STARTING:
        /* Nothing here: a singleton's thread may start in a child that is
         * already exiting (the holder before it went away), and OpenSSL or
         * the process pool touched then race with exit()'s clean-up. */
        break;
    case AP_WATCHDOG_STATE_RUNNING:
        if (!apr_atomic_casptr((volatile void **)&job->lock, NULL, NULL)) {
            break;              /* child_init has not run in this process */
        }
        apr_thread_mutex_lock(job->lock);
        if (job->stopping) {
            apr_thread_mutex_unlock(job->lock);
            break;
        }
        if (!job->announced) {
            /* The first tick only says so: work starts with the next. */
            job->announced = 1;
            apr_thread_mutex_unlock(job->lock);
            ap_log_error(APLOG_MARK, APLOG_INFO, 0, job->main_s, MSOLOGNO(203) "job started "
                         "in pid %" APR_PID_T_FMT " (lease owner %s)", getpid(), job->owner);
            break;
        }
        job->busy = 1;
        apr_thread_mutex_unlock(job->lock);
        deadline = apr_time_now() + TICK_BUDGET;
        for (s = job->main_s; s; s = s->next) {
            if (msoauth_server_in_use(s)) {
                msoauth_srv_conf_t *sc = msoauth_srv_conf(s);

                /* Connections go through one proxy: a server with another
                 * proxy or CA file than the last one gets clients of its own. */
                if (!http_of || !same_text(sc->http_proxy, http_of->http_proxy)
                    || !same_text(sc->ca_file, http_of->ca_file)) {
                    mso_http_multi_destroy(m);
                    mso_http_multi_destroy(gm);
                    m = gm = NULL;
                    http_of = sc;
                }
                refresh_due(job, s, pool, deadline, &m, &gm);
            }
        }
        /* The connections close with the tick: nothing is kept between ticks. */
        mso_http_multi_destroy(m);
        mso_http_multi_destroy(gm);
        if (apr_time_now() - job->rebound > REBIND_EVERY) {
            job->rebound = apr_time_now();
        }
        if (apr_time_now() - job->swept > SWEEP_EVERY) {
            job->swept = apr_time_now();
        }
        if (apr_time_now() - job->secrets_checked > apr_time_from_sec(86400)) {
            job->secrets_checked = apr_time_now();
            check_secrets(job, pool);
        }
        /* This thread lives on into exit() (only pchild's clean-up waits for
         * the tick): nothing of OpenSSL's may stay with it for its own exit
         * to free after OpenSSL's atexit clean-up did. */
        mso_crypto_thread_done();
        apr_thread_mutex_lock(job->lock);
        job->busy = 0;
        apr_thread_cond_broadcast(job->idle);
        apr_thread_mutex_unlock(job->lock);
        break;
    case AP_WATCHDOG_STATE_STOPPING:
        ap_log_error(APLOG_MARK, APLOG_INFO, 0, job->main_s, MSOLOGNO(204) "job stopping");
        break;
    }
    return APR_SUCCESS;
}

apr_status_t msoauth_job_register(apr_pool_t *pconf, server_rec *main_s)
{
    ap_watchdog_t *wd;
    job_t *job;
    apr_status_t rv;

    wd_get_instance = APR_RETRIEVE_OPTIONAL_FN(ap_watchdog_get_instance);
    wd_register_callback = APR_RETRIEVE_OPTIONAL_FN(ap_watchdog_register_callback);
    if (!wd_get_instance || !wd_register_callback) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, 0, main_s, MSOLOGNO(205) "mod_watchdog is not "
                     "loaded: tokens would not be refreshed. Load it (Debian has it built in; "
                     "elsewhere: LoadModule watchdog_module modules/mod_watchdog.so)");
        return APR_EGENERAL;
    }
    /* parent 0, singleton 1: one child of this httpd runs it, whatever the MPM. */
    rv = wd_get_instance(&wd, JOB_NAME, 0, 1, pconf);
    if (rv != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, rv, main_s, MSOLOGNO(206) "cannot create the "
                     "watchdog instance for the job");
        return rv;
    }
    job = apr_pcalloc(pconf, sizeof(*job));
    job->main_s = main_s;
    apr_pool_create(&job->app_pool, pconf);
    job->app_tried = apr_hash_make(job->app_pool);
    the_job = job;
    rv = wd_register_callback(wd, JOB_TICK, job, job_tick);
    if (rv != APR_SUCCESS) {
        ap_log_error(APLOG_MARK, APLOG_CRIT, rv, main_s, MSOLOGNO(207) "cannot register the "
                     "job with mod_watchdog");
    }
    return rv;
}

/* Runs first when the child's pool goes: lets a tick in progress finish (its
 * token calls time out within 30 s) before mod_dbd's connections are closed,
 * so no refresh is cut off half-written and no connection is freed in use. */
static apr_status_t job_child_stop(void *data)
{
    job_t *job = data;
    apr_time_t give_up = apr_time_now() + TICK_BUDGET + apr_time_from_sec(15);

    apr_thread_mutex_lock(job->lock);
    job->stopping = 1;
    while (job->busy && apr_time_now() < give_up) {
        apr_thread_cond_timedwait(job->idle, job->lock, apr_time_from_msec(200));
    }
    apr_thread_mutex_unlock(job->lock);
    return APR_SUCCESS;
}

void msoauth_job_child_init(apr_pool_t *pchild)
{
    job_t *job = the_job;
    apr_thread_mutex_t *lock;

    if (!job || apr_thread_mutex_create(&lock, APR_THREAD_MUTEX_DEFAULT, pchild) != APR_SUCCESS
        || apr_thread_cond_create(&job->idle, pchild) != APR_SUCCESS) {
        return;                     /* job->lock stays NULL: no tick runs here */
    }
    job->busy = job->stopping = job->announced = 0;
    /* Made here, on the main thread: RAND_bytes and pchild are not for the
     * job's thread, which may run while exit() cleans OpenSSL up. */
    job->owner = msoauth_lease_owner(pchild);
    apr_pool_pre_cleanup_register(pchild, job, job_child_stop);
    /* Last: a tick runs once it sees the lock, and then needs the owner. */
    apr_atomic_xchgptr((volatile void **)&job->lock, lock);
}
