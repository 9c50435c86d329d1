/* The certificate credential of an app registration: a PEM certificate and
 * its RSA key, checked at start-up, and the signed client assertions
 * (private_key_jwt) that replace the client secret in token requests. */
#ifndef MSO_CERT_H
#define MSO_CERT_H

#include <apr_pools.h>
#include <apr_errno.h>
#include <apr_time.h>

typedef struct mso_cert_t mso_cert_t;

/* Reads the certificate from cert_file and the private key from key_file, or
 * from cert_file when key_file is NULL (both PEM). Checks that the key is an
 * unencrypted RSA key of at least 2048 bits that matches the certificate. On
 * failure APR_EINVAL and *why, a sentence for the administrator naming the
 * file and the fix (never key material). The key lives until p is destroyed. */
apr_status_t mso_cert_load(apr_pool_t *p, const char *cert_file, const char *key_file,
                           mso_cert_t **cert, const char **why);

/* When the certificate stops being valid (its notAfter). */
apr_time_t mso_cert_not_after(const mso_cert_t *cert);
/* The certificate's SHA-256 thumbprint as base64url (the x5t#S256 header),
 * and as hex upper case (as the Entra admin center shows thumbprints: SHA-1
 * there; this one is for messages). */
const char *mso_cert_x5t_s256(const mso_cert_t *cert);
const char *mso_cert_sha1_hex(const mso_cert_t *cert);
/* The certificate's subject, one line, for messages. */
const char *mso_cert_subject(const mso_cert_t *cert);

typedef enum { MSO_ASSERTION_PS256 = 0, MSO_ASSERTION_RS256 } mso_assertion_alg_e;

/* A client assertion for one token request: a JWT with header alg, typ JWT,
 * x5t#S256, and claims aud = token_url, iss = sub = client_id, a unique jti,
 * nbf/iat = now and exp = now + lifetime (seconds). APR_EGENERAL when OpenSSL
 * fails (the RNG or the signature). */
apr_status_t mso_cert_assertion(apr_pool_t *p, const mso_cert_t *cert, mso_assertion_alg_e alg,
                                const char *client_id, const char *token_url, apr_int64_t now,
                                int lifetime, const char **jwt);

#define MSO_ASSERTION_TYPE "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#define MSO_ASSERTION_LIFETIME 300

#endif
