/* Fixed secrets of the fuzz harnesses. They protect nothing: they exist so
 * that the seed corpus can hold a sealed cookie and a signed ID token that
 * open and verify, and the fuzzer mutates from there. Never use them anywhere
 * else. */
#ifndef MSO_FUZZ_KEYS_H
#define MSO_FUZZ_KEYS_H

/* The master key of the flow-cookie key ring (32 raw bytes). */
#define FUZZ_FLOW_KEY "fuzz-flow-master-key-0123456789a"
/* A second key in the ring: opens, never seals. */
#define FUZZ_FLOW_KEY_OLD "fuzz-flow-old-key-0123456789abcd"

/* The RSA key (2048 bits) that signs ID tokens; its public half is the
 * fixed JWKS under kid FUZZ_KID. */
#define FUZZ_KID "fuzz-kid-1"
static const char fuzz_rsa_pem[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDaUZu2OqMV+bxU\n"
    "UJJuSKdsGL5kj9aTzBaIdRMY8rmg/T1D9GB1DHEdCezYi6xpj8LnrD+ilaoGlYhV\n"
    "lyU6xyJRMI+iGhXJnFrJbhxIjIukjIOxtmcF42OFmyN1Xb6USOFVLG/hwGI8jGHc\n"
    "l24JGbSPyuxUJ/MWsCR5GR9VdUclRE0K6wOf0nJpwhOShCTbkVK0Bq+v8lQbVf41\n"
    "C/FIbIUARaHIUa8JInKbGHOBED5XJgeQaPvEstJtTp6B9fEKC+0GHqHcldPIOq+0\n"
    "1OcV3vVSkv5gdjxDRAhGwDNA6ljhBC581ZDfhuH+EReeodoOrGcPlNrX4X3joeHN\n"
    "YFQpBLERAgMBAAECggEAXFYw1BGX4ZcHIugTDsb23L7YZAL8H/WtQBi4M5CRl3gU\n"
    "HfYxh7/z5XLJtEra6KjPqBnPrk27pF5BU+YB7orDxnASB98dgPB664ABQWQEOdve\n"
    "ZV7+0tw6Pwt/I0g7b08l0tbhGSu7wN0lFN4NQZcYKcsLSoq9A0cLnhZUjNn19dnV\n"
    "+fzL2BlahGZkTErvIAnbOvrFm6AxRkq5cD/2x++k2iNaI3svmzzObqQ4EREXKhW9\n"
    "X06khDQ3Bt/RNINt9ra/sxkuEOORl7FA8GR7mkXOJLr93Gr0EP0WDrFfYTiIrHCv\n"
    "y0XuAhKwHrngPyHCuIXkRvc42BTBSCebOci5Y1b8SwKBgQDuFAX5NW6DODgx8ApF\n"
    "hURv1zqHg+dNl8FX+LEz6VzNGN+OosHOr/U04CjpjL1dhzS9zWQJRhAytU2yLjvH\n"
    "brdql1Myyj5+F9iTvODP3CFaq1jCM99nKs9IpaBVUvXHtE7OhV1u61tMarlsVqSU\n"
    "TAZL3M0yv2hU8V9bJR0ckjY3lwKBgQDqwM2hNT3dGmBT/n+fVXqA5EAs0rsiA3HH\n"
    "Hqc/gN6RYRA+qru7N4XJc//bQPJEEknDEoi1yi5j72j5/ivEPlfREld6YCHdYKvX\n"
    "YNNfjqjCiF6mjniQAPRSK3ivoUpfVsh2gb1Xqf3pc1AkaE9Eu4lMG3zKAsz/lJZ0\n"
    "5LXzZYoxlwKBgQDk4y1HBT6lO0SThiJp6hD8sWCc7oxPBeolCHxc2yuUJyiu+fz4\n"
    "GCTXW/cZamyYYaesHq3hWJG0Hqh++IISX3hJKwka2GOyWHyotLsyO4F5qShhNPvA\n"
    "NOEqB8oYnfSbtdbaKE/GltGkqypvZPE/fcPD5ZkGBA1rNM+nUgwl7s/fKwKBgQCk\n"
    "Oi2g0bZtr74kBK8TsKD6+rNKqEHyEabPPkqSynzqB5VtwdODrdwSiuw7Xrwdkw23\n"
    "QogRZVf+4cX23jGQIG0e/k3kdsw6Kx8MldhJyWuWbACLVLBTTdeehHrxo0x8ViH3\n"
    "hdwIMAxJ/Tnbvn12AByU+cXbLQps4m4/aKFBnY+IEQKBgDRD8UNJfwoOcAyybUAU\n"
    "vOhFy4XLLF28jPJj01JxOwp/otwrEPFvTi0qo5xUMUGMcsITgC+pXWUX18oIyPtt\n"
    "zyGAxwLuwK2wLjylRWBBmEeDcgrx8Z437jsZphLCGL920/JJ358xRu43KvDKAfqb\n"
    "/jHuc57mYJVHt1OQ60gH0tLf\n"
    "-----END PRIVATE KEY-----\n";

#endif
