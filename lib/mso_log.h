/* Logging from lib/ without httpd: the glue installs a callback that forwards
 * to ap_log_error; without one, messages go to stderr (unit tests, tools). */
#ifndef MSO_LOG_H
#define MSO_LOG_H

#include <apr_errno.h>

typedef enum {
    MSO_LOG_ERR = 3,
    MSO_LOG_WARNING = 4,
    MSO_LOG_NOTICE = 5,
    MSO_LOG_INFO = 6,
    MSO_LOG_DEBUG = 7
} mso_log_level_e;

/* baton: whatever the glue needs (a server_rec). Never pass secrets to the log. */
typedef void mso_log_cb(void *baton, const char *file, int line, mso_log_level_e level,
                        apr_status_t rv, const char *msg);

void mso_log_set(mso_log_cb *cb, void *baton, mso_log_level_e max_level);
/* The baton for this thread's messages from now on (NULL: the one of
 * mso_log_set); returns the previous one, to restore it. */
void *mso_log_scope(void *baton);
int mso_log_is_level(mso_log_level_e level);
void mso_log_perror(const char *file, int line, mso_log_level_e level, apr_status_t rv,
                    const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Replaces control characters (CR, LF, ESC...) in place: every message goes
 * through it, so no value in a message can forge a line of the log. */
void mso_log_clean(char *s);

#define MSO_LOG_MARK __FILE__, __LINE__

#endif
