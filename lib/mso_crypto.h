/* Random values, base64url, PKCE, and the key ring that seals tokens at rest
 * and browser state (AES-256-GCM through OpenSSL EVP). */
#ifndef MSO_CRYPTO_H
#define MSO_CRYPTO_H

#include <apr_pools.h>
#include <apr_errno.h>

#define MSO_KEY_LEN 32          /* bytes of one master key */
#define MSO_KEYRING_MAX 8       /* keys one MSOAuthTokenKeyFile line may hold */

/* What a sealed blob is for. Each purpose uses its own key derived from the
 * master key (HKDF-SHA256), so a token blob can never be opened as browser
 * state and vice versa. */
typedef enum {
    MSO_PURPOSE_TOKEN = 1,      /* tokens at rest in the database */
    MSO_PURPOSE_STATE = 2       /* sign-in state carried by the browser */
} mso_purpose_e;

typedef struct mso_keyring_t mso_keyring_t;

/* Cryptographically secure random bytes (RAND_bytes). */
apr_status_t mso_random_bytes(unsigned char *buf, apr_size_t len);

/* Frees OpenSSL's state of the calling thread (its random generators); the
 * next call makes it again. For a long-lived thread that may still be alive
 * when exit() runs OpenSSL's clean-up, which its own exit would then free a
 * second time. */
void mso_crypto_thread_done(void);

/* base64url without padding; decode accepts input with or without padding and
 * rejects anything outside the alphabet. */
char *mso_b64url_encode(apr_pool_t *p, const unsigned char *data, apr_size_t len);
apr_status_t mso_b64url_decode(apr_pool_t *p, const char *s, unsigned char **out,
                               apr_size_t *outlen);

/* A random value of nbytes entropy, base64url encoded (state, nonce, verifier). */
char *mso_random_token(apr_pool_t *p, apr_size_t nbytes);

/* PKCE S256: BASE64URL(SHA256(verifier)). */
char *mso_pkce_s256(apr_pool_t *p, const char *verifier);

/* Parses the content of a key file: exactly 32 raw bytes, or 64 hex digits, or
 * standard/url-safe base64 of 32 bytes (surrounding white space ignored for the
 * text forms). On failure returns APR_EINVAL and sets *why to a sentence for
 * the administrator (never containing key material). */
apr_status_t mso_key_parse(const unsigned char *data, apr_size_t len,
                           unsigned char key[MSO_KEY_LEN], const char **why);

/* Reads and parses a key file; *why explains a failure (missing, unreadable,
 * wrong size) including the path. */
apr_status_t mso_key_read_file(apr_pool_t *p, const char *path,
                               unsigned char key[MSO_KEY_LEN], const char **why);

mso_keyring_t *mso_keyring_create(apr_pool_t *p);
/* The first key added seals; every key opens. Returns APR_EEXIST for a key
 * already in the ring, APR_ENOSPC past MSO_KEYRING_MAX. */
apr_status_t mso_keyring_add(mso_keyring_t *kr, const unsigned char key[MSO_KEY_LEN]);
int mso_keyring_count(const mso_keyring_t *kr);
/* Key id (8 hex chars) of key i: public, derived one-way, for logs/status. */
const char *mso_keyring_kid(const mso_keyring_t *kr, int i);

/* Seals plaintext. aad binds the blob to its context (e.g. "acct:42"): the same
 * aad must be given to open. Output is text (base64url), safe in a cookie or a
 * database column. Layout before encoding: version(1) kid(4) nonce(12) ct tag(16). */
apr_status_t mso_seal(apr_pool_t *p, const mso_keyring_t *kr, mso_purpose_e purpose,
                      const char *aad, const void *plain, apr_size_t plain_len,
                      const char **sealed);

/* Opens a sealed blob with the key named by its kid. APR_EINVAL for a blob
 * that is malformed, tampered, for another purpose/aad, or sealed by a key not
 * in the ring. The plaintext is NUL-terminated (not counted in *plain_len). */
apr_status_t mso_open(apr_pool_t *p, const mso_keyring_t *kr, mso_purpose_e purpose,
                      const char *aad, const char *sealed, unsigned char **plain,
                      apr_size_t *plain_len);

/* The form token of a browser session of the admin page (CSRF): base64url
 * of HMAC-SHA256 over the session id, under a key derived (HKDF) from the
 * ring's first key for this purpose alone. NULL without a key or session. */
const char *mso_csrf_token(apr_pool_t *p, const mso_keyring_t *kr, const char *session);
/* 1 when token is session's under any key of the ring (constant time). */
int mso_csrf_check(apr_pool_t *p, const mso_keyring_t *kr, const char *session,
                   const char *token);

/* The key id (8 hex chars, as mso_keyring_kid) of the key that sealed a
 * blob, read from its header; NULL when it is not a sealed blob. Public:
 * says which key a token needs, nothing about the token. */
const char *mso_sealed_kid(apr_pool_t *p, const char *sealed);

/* Constant-time comparison of two strings (both lengths are compared too). */
int mso_str_equal_ct(const char *a, const char *b);

#endif
