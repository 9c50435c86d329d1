/* Reason codes (the contract's machine-readable errors) and what to tell the
 * person who meets one: a message, the fix, and the HTTP status of its page. */
#ifndef MSO_REASON_H
#define MSO_REASON_H

typedef struct {
    const char *code;       /* e.g. "redirect_uri_mismatch" */
    int status;             /* HTTP status of the error page */
    const char *title;      /* one line */
    const char *message;    /* what happened */
    const char *fix;        /* what to do; "%R" stands for the redirect URI to register */
} mso_reason_t;

/* NULL for a code that is not one of ours. */
const mso_reason_t *mso_reason_get(const char *code);
/* The whole table, ending with a NULL code (for docs and tests). */
const mso_reason_t *mso_reason_all(void);

#endif
