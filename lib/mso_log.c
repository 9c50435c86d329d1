#include <stdarg.h>
#include <stdio.h>

#include <apr_strings.h>

#include "mso_log.h"

static mso_log_cb *log_cb;
static void *log_baton;
static mso_log_level_e log_max = MSO_LOG_WARNING;
/* The server a thread works for (a request's, or the job's current one):
 * its messages are logged against it, not against the main server. */
static __thread void *scope_baton;

void mso_log_set(mso_log_cb *cb, void *baton, mso_log_level_e max_level)
{
    log_cb = cb;
    log_baton = baton;
    log_max = max_level;
}

void *mso_log_scope(void *baton)
{
    void *before = scope_baton;

    scope_baton = baton;
    return before;
}

int mso_log_is_level(mso_log_level_e level)
{
    return level <= log_max;
}

void mso_log_clean(char *s)
{
    /* Messages carry values from requests, Microsoft and the database: a
     * CR/LF or escape sequence in one must not forge a log line. */
    for (; *s; s++) {
        if ((unsigned char)*s < 0x20 || *s == 0x7f) {
            *s = '?';
        }
    }
}

void mso_log_perror(const char *file, int line, mso_log_level_e level, apr_status_t rv,
                    const char *fmt, ...)
{
    char buf[2048];
    va_list ap;

    if (!mso_log_is_level(level)) {
        return;
    }
    va_start(ap, fmt);
    apr_vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    mso_log_clean(buf);
    if (log_cb) {
        log_cb(scope_baton ? scope_baton : log_baton, file, line, level, rv, buf);
    }
    else {
        fprintf(stderr, "mso[%d] %s:%d: %s\n", (int)level, file, line, buf);
    }
}
