/* Makes APR pool memory visible to AddressSanitizer.
 *
 * apr_palloc carves allocations out of 8 KiB blocks, so reading or writing
 * past the end of a pool string stays inside the block and ASan sees nothing;
 * and nearly everything lib/ allocates comes from a pool. Linked into every
 * fuzz target, this apr_palloc takes the place of libapr's (the executable's
 * definition interposes on the shared library's, for lib/ and for libapr's
 * own apr_pstrdup, apr_pstrcat, apr_array_push, ...): each allocation is a
 * malloc of exactly the size asked for, freed when the pool is cleared or
 * destroyed. Bookkeeping goes to the real apr_palloc.
 *
 * apr_psprintf and apr_pvsprintf write into the pool's block directly and
 * stay invisible. MSO_FUZZ_REAL_POOLS=1 in the environment turns the shim off. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <apr_pools.h>

typedef void *(*palloc_fn)(apr_pool_t *, apr_size_t);

static palloc_fn real_palloc;
static int off = -1;            /* -1: not decided yet */
static int busy;                /* inside the shim: bookkeeping goes to APR */
static const char key[] = "mso_fuzz_pool_shim";

/* The chunks of one pool. Kept on a global list in malloc'd memory: pool
 * blocks may be mmap'd, where LeakSanitizer does not look for pointers. */
typedef struct chunks_t {
    void **v;
    size_t n, cap;
    struct chunks_t *prev, *next;
} chunks_t;

static chunks_t *all;

/* Registered at the pool's first allocation, so it runs after every cleanup
 * registered later (cleanups run last-in first-out). */
static apr_status_t chunks_free(void *data)
{
    chunks_t *c = data;
    size_t i;

    for (i = 0; i < c->n; i++) {
        free(c->v[i]);
    }
    free(c->v);
    if (c->prev) {
        c->prev->next = c->next;
    }
    else {
        all = c->next;
    }
    if (c->next) {
        c->next->prev = c->prev;
    }
    free(c);
    return APR_SUCCESS;
}

void *apr_palloc(apr_pool_t *p, apr_size_t size)
{
    chunks_t *c = NULL;
    void *mem;

    if (!real_palloc) {
        real_palloc = (palloc_fn)dlsym(RTLD_NEXT, "apr_palloc");
        if (!real_palloc) {
            fprintf(stderr, "fuzz pool shim: apr_palloc not found in libapr\n");
            abort();
        }
    }
    if (off < 0) {
        const char *e = getenv("MSO_FUZZ_REAL_POOLS");
        off = e && *e == '1';
    }
    if (off || busy) {
        return real_palloc(p, size);
    }
    busy = 1;
    apr_pool_userdata_get((void **)&c, key, p);
    if (!c) {
        c = calloc(1, sizeof(*c));
        if (!c) {
            abort();
        }
        c->next = all;
        if (all) {
            all->prev = c;
        }
        all = c;
        apr_pool_userdata_setn(c, key, chunks_free, p);
    }
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        void **v = realloc(c->v, cap * sizeof(*v));

        if (!v) {
            abort();
        }
        c->v = v;
        c->cap = cap;
    }
    mem = malloc(size ? size : 1);
    if (!mem) {
        abort();
    }
    c->v[c->n++] = mem;
    busy = 0;
    return mem;
}
