/* What mod_msoauth.c (the module record and its hooks) provides to the other
 * glue files: the module, our log tags, mod_dbd, and the per-process state. */
#ifndef MOD_MSOAUTH_H
#define MOD_MSOAUTH_H

#include <httpd.h>
#include <http_config.h>
#include <apr_dbd.h>
#include <mod_dbd.h>

#include "mso_db.h"

extern module AP_MODULE_DECLARE_DATA msoauth_module;

/* Our own log tags (not httpd's AH numbers): MSOLOGNO(012) -> "MSO012: ". */
#define MSOLOGNO(n) "MSO" #n ": "

/* mod_dbd through its optional functions (fetched once, at post_config), so
 * that a missing mod_dbd is our clear start-up error rather than an
 * unresolved symbol. NULL / 0 without mod_dbd. */
int msoauth_have_dbd(void);
ap_dbd_t *msoauth_dbd_open(apr_pool_t *p, server_rec *s);
void msoauth_dbd_close(server_rec *s, ap_dbd_t *dbd);

/* The request's database connection, wrapped; NULL (and logged) when mod_dbd
 * has none. */
mso_db_t *msoauth_request_db(request_rec *r);

/* This httpd's node id: random, kept in DefaultRuntimeDir, so it is the same
 * for every child and generation until the machine (or the runtime
 * directory) is reset. Lease owners of this node start with it. */
const char *msoauth_node_id(void);

/* A lease owner unique to this process: node id, pid and a random part. */
const char *msoauth_lease_owner(apr_pool_t *p);

/* This child process's lease owner (request handlers). */
const char *msoauth_process_owner(void);

/* Seals tokens stored before schema version 4 again for their account
 * (cheap when there are none). */
void msoauth_rebind_tokens(apr_pool_t *p, server_rec *main_s, server_rec *s, mso_db_t *db);

/* The process's cache of discovery documents and signing keys. */
struct mso_discovery_cache_t *msoauth_discovery_cache(void);

#endif
