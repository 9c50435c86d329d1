/* App-only companies and shared mailboxes in the database: the application
 * token cache and its fetch lease (lib/mso_apptoken), app accounts, the work
 * claim that takes them while their company's token is valid, and the
 * shared-mailbox connect (lib/mso_account), on SQLite and PostgreSQL. */
#include "dbtest.h"

#include <stdlib.h>
#include <string.h>

#include <apr_strings.h>

#include "mso_apptoken.h"
#include "mso_crypto.h"
#include "mso_mirror.h"

#define CID "6731DE76-14a6-49ae-97bc-6eba6914391e"
#define ALICE "11111111-2222-3333-4444-555555555555"
#define BOB "22222222-3333-4444-5555-666666666666"
#define NOW 1700000000

static mso_apptoken_key_t graph_key(const char *company)
{
    mso_apptoken_key_t k;

    k.company = company;
    k.client_id = CID;
    k.resource = "graph";
    k.resource_url = "https://graph.microsoft.com";
    return k;
}

static mso_keyring_t *ring(void)
{
    mso_keyring_t *kr = mso_keyring_create(pool);
    unsigned char key[MSO_KEY_LEN];

    memset(key, 7, sizeof(key));
    ck_assert_int_eq(mso_keyring_add(kr, key), APR_SUCCESS);
    return kr;
}

START_TEST(lease_store_and_fail)
{
    mso_db_t *db = fresh_db(_i);
    mso_apptoken_key_t k = graph_key("helpdesk");
    mso_apptoken_t *t = NULL;

    migrate_ok(db);
    ck_assert_int_eq(mso_apptoken_get(db, pool, &k, &t), APR_NOTFOUND);
    /* The first lease makes the row; a second owner waits. */
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-a", NOW, 90, 0), APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-b", NOW, 90, 0), APR_EBUSY);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-b", NOW, 90, 1), APR_EBUSY);
    ck_assert_int_eq(mso_apptoken_store(db, pool, &k, "node-b", "sealed-x", NOW + 3600,
                                        NOW + 3000, "Mail.Read", NOW), APR_EBUSY);
    ck_assert_int_eq(mso_apptoken_store(db, pool, &k, "node-a", "sealed-1", NOW + 3600,
                                        NOW + 3000, "Mail.ReadWrite Mail.Send", NOW),
                     APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_get(db, pool, &k, &t), APR_SUCCESS);
    ck_assert_str_eq(t->sealed, "sealed-1");
    ck_assert_str_eq(t->client_id, "6731de76-14a6-49ae-97bc-6eba6914391e");
    ck_assert_str_eq(t->roles, "Mail.ReadWrite Mail.Send");
    ck_assert_int_eq(t->expires_at, NOW + 3600);
    ck_assert_int_eq(t->refresh_due_at, NOW + 3000);
    ck_assert_int_eq(t->fetches, 1);
    ck_assert_ptr_null(t->lease_owner);
    /* Fresh: nobody fetches, unless forced (a 401, the token handler). */
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-b", NOW + 10, 90, 0), APR_EAGAIN);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-b", NOW + 10, 90, 1), APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_release(db, pool, &k, "node-b"), APR_SUCCESS);
    /* Due: one node at a time. */
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-b", NOW + 3000, 90, 0),
                     APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-a", NOW + 3001, 90, 0), APR_EBUSY);
    /* A failure keeps the token (still valid) and waits its backoff. */
    ck_assert_int_eq(mso_apptoken_failed(db, pool, &k, "node-b", "invalid_client_secret",
                                         7000215, "Microsoft answered invalid_client",
                                         NOW + 3060, NOW + 3000), APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_get(db, pool, &k, &t), APR_SUCCESS);
    ck_assert_str_eq(t->sealed, "sealed-1");
    ck_assert_str_eq(t->reason, "invalid_client_secret");
    ck_assert_int_eq(t->aadsts, 7000215);
    ck_assert_int_eq(t->error_runs, 1);
    ck_assert_int_eq(t->retry_at, NOW + 3060);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-a", NOW + 3030, 90, 0), APR_EAGAIN);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-a", NOW + 3061, 90, 0),
                     APR_SUCCESS);
    /* A lease that ran out is taken by another owner; the first one's store is refused. */
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-b", NOW + 3061 + 91, 90, 1),
                     APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_store(db, pool, &k, "node-a", "sealed-late", NOW + 7000,
                                        NOW + 6000, "", NOW + 3200), APR_EBUSY);
    ck_assert_int_eq(mso_apptoken_store(db, pool, &k, "node-b", "sealed-2", NOW + 7000,
                                        NOW + 6000, "Mail.Read", NOW + 3200), APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_get(db, pool, &k, &t), APR_SUCCESS);
    ck_assert_str_eq(t->sealed, "sealed-2");
    ck_assert_ptr_null(t->reason);
    ck_assert_int_eq(t->error_runs, 0);
    ck_assert_int_eq(t->fetches, 2);
    /* Another resource and another company have rows of their own. */
    k.resource = "outlook";
    ck_assert_int_eq(mso_apptoken_get(db, pool, &k, &t), APR_NOTFOUND);
    k = graph_key("other");
    ck_assert_int_eq(mso_apptoken_get(db, pool, &k, &t), APR_NOTFOUND);
    {
        apr_array_header_t *all = NULL;

        ck_assert_int_eq(mso_apptoken_list(db, pool, &all), APR_SUCCESS);
        ck_assert_int_eq(all->nelts, 1);
    }
    k.company = NULL;
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "node-a", NOW, 90, 0), APR_EINVAL);
}
END_TEST

START_TEST(sealed_for_company_app_and_resource)
{
    mso_keyring_t *kr = ring();
    mso_apptoken_key_t k = graph_key("helpdesk"), other;
    mso_apptoken_t row;
    const char *sealed = NULL, *plain = NULL;

    ck_assert_str_eq(mso_apptoken_aad(pool, &k), "apptoken:v1:helpdesk:"
                     "6731de76-14a6-49ae-97bc-6eba6914391e:https://graph.microsoft.com");
    ck_assert_int_eq(mso_seal(pool, kr, MSO_PURPOSE_TOKEN, mso_apptoken_aad(pool, &k),
                              "eyJ.app.token", 13, &sealed), APR_SUCCESS);
    memset(&row, 0, sizeof(row));
    row.sealed = sealed;
    row.expires_at = NOW + 3600;
    ck_assert_int_eq(mso_apptoken_open(pool, kr, &k, &row, NOW, 300, &plain), APR_SUCCESS);
    ck_assert_str_eq(plain, "eyJ.app.token");
    /* Not for a token that ends within the validity asked for. */
    ck_assert_int_eq(mso_apptoken_open(pool, kr, &k, &row, NOW + 3400, 300, &plain),
                     APR_NOTFOUND);
    /* Copied to another company, app or resource, it does not open. */
    other = k;
    other.company = "sales";
    ck_assert_int_eq(mso_apptoken_open(pool, kr, &other, &row, NOW, 300, &plain), APR_EINVAL);
    other = k;
    other.client_id = "11111111-14a6-49ae-97bc-6eba6914391e";
    ck_assert_int_eq(mso_apptoken_open(pool, kr, &other, &row, NOW, 300, &plain), APR_EINVAL);
    other = k;
    other.resource_url = "https://outlook.office365.com";
    ck_assert_int_eq(mso_apptoken_open(pool, kr, &other, &row, NOW, 300, &plain), APR_EINVAL);
    row.sealed = NULL;
    ck_assert_int_eq(mso_apptoken_open(pool, kr, &k, &row, NOW, 300, &plain), APR_NOTFOUND);
}
END_TEST

static const char *jwt_with(const char *payload)
{
    return apr_pstrcat(pool, mso_b64url_encode(pool, (const unsigned char *)"{\"alg\":\"RS256\"}",
                                               15), ".",
                       mso_b64url_encode(pool, (const unsigned char *)payload, strlen(payload)),
                       ".c2ln", NULL);
}

START_TEST(roles_of_the_token)
{
    ck_assert_str_eq(mso_apptoken_roles(pool, jwt_with("{\"aud\":\"https://graph.microsoft.com\","
                                                       "\"roles\":[\"Mail.ReadWrite\","
                                                       "\"Mail.Send\"]}")),
                     "Mail.ReadWrite Mail.Send");
    ck_assert_str_eq(mso_apptoken_roles(pool, jwt_with("{\"aud\":\"x\"}")), "");
    /* Only role names are kept. */
    ck_assert_str_eq(mso_apptoken_roles(pool, jwt_with("{\"roles\":[\"a b\",1,\"Mail.Read\"]}")),
                     "Mail.Read");
    ck_assert_ptr_null(mso_apptoken_roles(pool, "opaque-token"));
    ck_assert_ptr_null(mso_apptoken_roles(pool, "a.!!!.c"));
    ck_assert_ptr_null(mso_apptoken_roles(pool, NULL));
    ck_assert(mso_roles_have("Mail.ReadWrite Mail.Send", "Mail.Send"));
    ck_assert(mso_roles_have("Mail.ReadWrite Mail.Send", "Mail.ReadWrite"));
    ck_assert(!mso_roles_have("Mail.ReadWrite", "Mail.Read"));
    ck_assert(!mso_roles_have("Mail.ReadBasic.All", "Mail.ReadBasic"));
    ck_assert(!mso_roles_have(NULL, "Mail.Read"));
    /* IMAP/SMTP: application permissions are Exchange Online's office365 resource. */
    ck_assert_str_eq(mso_apptoken_outlook_resource("https://outlook.office.com", 0),
                     "https://outlook.office365.com");
    ck_assert_str_eq(mso_apptoken_outlook_resource("https://outlook.office.com", 1),
                     "https://outlook.office.com");
    ck_assert_str_eq(mso_apptoken_outlook_resource("https://outlook.office365.us", 0),
                     "https://outlook.office365.us");
}
END_TEST

static mso_app_account_t app_in(const char *company)
{
    mso_app_account_t in;

    memset(&in, 0, sizeof(in));
    in.company = company;
    in.client_id = CID;
    in.tenant_id = "0f3b8a52-1c1e-4d1b-9a7e-2b9f6c1d4e5a";
    in.authority = "https://login.microsoftonline.com/contoso.com";
    in.connected_by = "MSOAuthMailbox";
    return in;
}

static int claimed(mso_db_t *db, apr_int64_t now)
{
    apr_array_header_t *works = NULL;
    int i, n;

    ck_assert_int_eq(mso_mirror_claim(db, pool, "job", now, 45, 100, &works), APR_SUCCESS);
    n = works->nelts;
    for (i = 0; i < works->nelts; i++) {
        mso_work_t *w = APR_ARRAY_IDX(works, i, mso_work_t *);
        mso_work_done_t d;

        memset(&d, 0, sizeof(d));
        d.sync_due_at = now + 3600;
        ck_assert_int_eq(mso_mirror_release(db, pool, w->acct->id, "job", &d, now),
                         APR_SUCCESS);
    }
    return n;
}

START_TEST(app_accounts_wait_for_their_company_token)
{
    mso_db_t *db = fresh_db(_i);
    mso_app_account_t in = app_in("helpdesk");
    mso_connect_t own = sample("helpdesk", "adele@contoso.com", ALICE);
    apr_array_header_t *boxes = apr_array_make(pool, 3, sizeof(const char *));
    apr_array_header_t *due = NULL;
    mso_apptoken_key_t k = graph_key("helpdesk");
    mso_account_t *a = NULL, *d;
    const char *err = NULL;
    int created = -1, conflicts = -1;

    migrate_ok(db);
    own.refresh_due_at = NOW + 3000;
    d = connect_ok(db, &own, "sealed-r", "sealed-a", NOW);
    APR_ARRAY_PUSH(boxes, const char *) = "Support@Contoso.com";
    APR_ARRAY_PUSH(boxes, const char *) = "info@contoso.com";
    APR_ARRAY_PUSH(boxes, const char *) = "adele@contoso.com";     /* a person's already */
    ck_assert_int_eq(mso_account_ensure_app(db, pool, &in, boxes, NOW, &created, &conflicts,
                                            &err), APR_SUCCESS);
    ck_assert_int_eq(created, 2);
    ck_assert_int_eq(conflicts, 1);
    /* Every child runs it: nothing more the second time. */
    ck_assert_int_eq(mso_account_ensure_app(db, pool, &in, boxes, NOW, &created, &conflicts,
                                            &err), APR_SUCCESS);
    ck_assert_int_eq(created, 0);
    ck_assert_int_eq(mso_account_find(db, pool, "helpdesk", "support@contoso.com", &a),
                     APR_SUCCESS);
    ck_assert_str_eq(a->kind, "app");
    ck_assert_str_eq(a->state, "connected");
    ck_assert_str_eq(a->client_id, "6731de76-14a6-49ae-97bc-6eba6914391e");
    ck_assert_ptr_null(a->object_id);
    ck_assert_str_eq(a->connected_by, "MSOAuthMailbox");
    ck_assert_str_eq(get_ok(db, d->id)->kind, "delegated");
    ck_assert_int_eq(num(db, "SELECT COUNT(*) FROM msoauth_tokens t JOIN msoauth_accounts a "
                             "ON a.id = t.account_id WHERE a.kind = 'app'"), 0);

    /* App accounts have no refresh of their own. */
    ck_assert_int_eq(mso_account_claim_due(db, pool, "job", NOW + 86400, 90, 100, &due),
                     APR_SUCCESS);
    ck_assert_int_eq(due->nelts, 1);
    ck_assert_int_eq(APR_ARRAY_IDX(due, 0, mso_account_t *)->id, d->id);
    mso_account_release(db, pool, d->id, "job");

    /* Graph work: the delegated one (its token is good), the app ones only
     * once their company's token is valid. */
    ck_assert_int_eq(claimed(db, NOW), 1);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "job", NOW, 90, 0), APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_failed(db, pool, &k, "job", "certificate_invalid", 700027,
                                         "refused", NOW + 60, NOW), APR_SUCCESS);
    ck_assert_int_eq(claimed(db, NOW), 0);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "job", NOW + 60, 90, 0), APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_store(db, pool, &k, "job", "sealed", NOW + 3600, NOW + 3000,
                                        "Mail.Read", NOW + 60), APR_SUCCESS);
    ck_assert_int_eq(claimed(db, NOW + 60), 2);
    /* Another company's token is not theirs. */
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "job", NOW + 60, 90, 1), APR_SUCCESS);
    exec_ok(db, "UPDATE msoauth_app_tokens SET company = 'sales', lease_owner = NULL");
    exec_ok(db, "UPDATE msoauth_accounts SET sync_due_at = 0 WHERE kind = 'app'");
    ck_assert_int_eq(claimed(db, NOW + 60), 0);
    exec_ok(db, "UPDATE msoauth_app_tokens SET company = 'helpdesk'");
    /* Nor one that ends within a minute. */
    ck_assert_int_eq(claimed(db, NOW + 3550), 0);
    ck_assert_int_eq(claimed(db, NOW + 100), 2);

    /* A 401 on an app account makes the company's token due now. */
    ck_assert_int_eq(mso_apptoken_due_now(db, pool, a->id, NOW + 200), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT refresh_due_at FROM msoauth_app_tokens"), NOW + 200);
    ck_assert_int_eq(mso_apptoken_due_now(db, pool, d->id, NOW + 300), APR_SUCCESS);
    ck_assert_int_eq(num(db, "SELECT refresh_due_at FROM msoauth_app_tokens"), NOW + 200);
    /* Graph refusing the token as such is the company's: its mailboxes wait
     * for the next fetch, the first report counts. */
    exec_ok(db, "UPDATE msoauth_accounts SET sync_due_at = 0 WHERE kind = 'app'");
    ck_assert_int_eq(mso_apptoken_refused(db, pool, a->id, "admin_consent_required", "no roles",
                                          NOW + 700, NOW + 400), APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_refused(db, pool, a->id, "admin_consent_required", "again",
                                          NOW + 900, NOW + 401), APR_SUCCESS);
    ck_assert_int_eq(claimed(db, NOW + 400), 0);
    ck_assert_str_eq(text_of(db, "SELECT last_error FROM msoauth_app_tokens"), "no roles");
    ck_assert_int_eq(num(db, "SELECT retry_at FROM msoauth_app_tokens"), NOW + 700);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "job", NOW + 600, 90, 0), APR_EAGAIN);
    ck_assert_int_eq(mso_apptoken_lease(db, pool, &k, "job", NOW + 700, 90, 0), APR_SUCCESS);
    ck_assert_int_eq(mso_apptoken_store(db, pool, &k, "job", "sealed2", NOW + 4300,
                                        NOW + 3700, NULL, NOW + 700), APR_SUCCESS);
    ck_assert_ptr_null(text_of(db, "SELECT roles FROM msoauth_app_tokens"));
    ck_assert_int_eq(claimed(db, NOW + 700), 2);

    /* What Graph says of the mailbox is kept, and cleared once it works. */
    ck_assert_int_eq(mso_account_mailbox_reason(db, pool, a->id, "access_denied_by_policy",
                                                "policy", NOW), APR_SUCCESS);
    ck_assert_str_eq(get_ok(db, a->id)->reason, "access_denied_by_policy");
    ck_assert_int_eq(mso_account_mailbox_reason(db, pool, a->id, NULL, NULL, NOW), APR_SUCCESS);
    ck_assert_ptr_null(get_ok(db, a->id)->reason);
    exec_ok(db, apr_psprintf(pool, "UPDATE msoauth_accounts SET reason = 'reconnect_required' "
                             "WHERE id = %" APR_INT64_T_FMT, d->id));
    ck_assert_int_eq(mso_account_mailbox_reason(db, pool, d->id, NULL, NULL, NOW), APR_SUCCESS);
    ck_assert_str_eq(get_ok(db, d->id)->reason, "reconnect_required");
}
END_TEST

START_TEST(admin_adds_app_accounts)
{
    mso_db_t *db = fresh_db(_i);
    mso_app_account_t in = app_in("helpdesk");
    mso_connect_t own = sample("helpdesk", "adele@contoso.com", ALICE);
    mso_account_t *a = NULL, *again = NULL;
    const char *err = NULL;
    int created = -1;

    migrate_ok(db);
    connect_ok(db, &own, "sealed-r", "sealed-a", NOW);
    in.connected_by = "admin";
    ck_assert_int_eq(mso_account_add_app(db, pool, &in, "Support@Contoso.com", NOW, &a,
                                         &created, &err), APR_SUCCESS);
    ck_assert_int_eq(created, 1);
    ck_assert_str_eq(a->mailbox, "support@contoso.com");
    ck_assert_str_eq(a->kind, "app");
    ck_assert_int_eq(mso_account_add_app(db, pool, &in, "support@contoso.com", NOW, &again,
                                         &created, &err), APR_SUCCESS);
    ck_assert_int_eq(created, 0);
    ck_assert_int_eq(again->id, a->id);
    /* A disconnected one comes back with its id. */
    ck_assert_int_eq(mso_account_disconnect(db, pool, a->id, NOW + 1), APR_SUCCESS);
    ck_assert_int_eq(mso_account_add_app(db, pool, &in, "support@contoso.com", NOW + 2, &again,
                                         &created, &err), APR_SUCCESS);
    ck_assert_int_eq(again->id, a->id);
    ck_assert_str_eq(again->state, "connected");
    ck_assert_int_eq(created, 0);
    /* A person's account is not turned into an app account. */
    ck_assert_int_eq(mso_account_add_app(db, pool, &in, "adele@contoso.com", NOW, &again,
                                         &created, &err), MSO_ACCOUNT_OTHER_OBJECT);
    ck_assert_ptr_nonnull(strstr(err, "disconnect it first"));
    /* Nor is an app account taken by a sign-in of that address. */
    own = sample("helpdesk", "support@contoso.com", BOB);
    ck_assert_int_eq(connect_raw(db, &own, "r", "a", NOW, &again, &err),
                     MSO_ACCOUNT_OTHER_OBJECT);
    in.company = NULL;
    ck_assert_int_eq(mso_account_add_app(db, pool, &in, "x@contoso.com", NOW, &again, &created,
                                         &err), APR_EINVAL);
}
END_TEST

START_TEST(shared_mailboxes_of_a_person)
{
    mso_db_t *db = fresh_db(_i);
    mso_connect_t own = sample("team", "alice@contoso.com", ALICE);
    mso_connect_t sh = sample("team", "support@contoso.com", ALICE);
    mso_connect_t sh2 = sample("team", "info@contoso.com", ALICE);
    mso_connect_t bob = sample("team", "support@contoso.com", BOB);
    mso_account_t *mine, *s1, *s2, *again;
    const char *err = NULL;

    migrate_ok(db);
    sh.shared = sh2.shared = bob.shared = 1;
    mine = connect_ok(db, &own, "r-own", "a-own", NOW);
    s1 = connect_ok(db, &sh, "r-s1", "a-s1", NOW);
    s2 = connect_ok(db, &sh2, "r-s2", "a-s2", NOW);
    /* Three accounts of one person: their own, and each shared one. */
    ck_assert_int_ne(mine->id, s1->id);
    ck_assert_int_ne(s1->id, s2->id);
    ck_assert_int_eq(mine->shared, 0);
    ck_assert_int_eq(s1->shared, 1);
    ck_assert_str_eq(s1->kind, "delegated");
    ck_assert_str_eq(s1->mailbox, "support@contoso.com");
    ck_assert_str_eq(s1->object_id, ALICE);
    token_is(db, s1->id, "refresh", "r-s1", 0);
    /* Each reconnects in place; the own account is found by the object, not
     * taken for a shared one. */
    again = connect_ok(db, &sh, "r-s1b", "a-s1b", NOW + 10);
    ck_assert_int_eq(again->id, s1->id);
    token_is(db, s1->id, "refresh", "r-s1b", 0);
    again = connect_ok(db, &own, "r-own2", "a-own2", NOW + 10);
    ck_assert_int_eq(again->id, mine->id);
    ck_assert_str_eq(again->mailbox, "alice@contoso.com");
    token_is(db, s2->id, "refresh", "r-s2", 0);
    /* Another person with Full Access does not take it over... */
    ck_assert_int_eq(connect_raw(db, &bob, "r-bob", "a-bob", NOW + 20, &again, &err),
                     MSO_ACCOUNT_OTHER_OBJECT);
    token_is(db, s1->id, "refresh", "r-s1b", 0);
    /* ...until it is disconnected. */
    ck_assert_int_eq(mso_account_disconnect(db, pool, s1->id, NOW + 30), APR_SUCCESS);
    again = connect_ok(db, &bob, "r-bob", "a-bob", NOW + 40);
    ck_assert_int_eq(again->id, s1->id);
    ck_assert_str_eq(again->object_id, BOB);
    ck_assert_int_eq(again->shared, 1);
    /* A person's own mailbox bound to them is not connected as someone's shared one. */
    bob.mailbox = "alice@contoso.com";
    ck_assert_int_eq(connect_raw(db, &bob, "r", "a", NOW + 50, &again, &err),
                     MSO_ACCOUNT_OTHER_OBJECT);
    /* The shared row, when its owner signs in themselves, stays someone else's. */
    own = sample("team", "info@contoso.com", BOB);
    ck_assert_int_eq(connect_raw(db, &own, "r", "a", NOW + 60, &again, &err),
                     MSO_ACCOUNT_OTHER_OBJECT);
    /* A shared connect names a person. */
    sh.object_id = NULL;
    ck_assert_int_eq(connect_raw(db, &sh, "r", "a", NOW, &again, &err), APR_EINVAL);
}
END_TEST

static void add_tests(TCase *tc, int backend)
{
    ADD_BOTH(tc, lease_store_and_fail, backend);
    ADD_BOTH(tc, app_accounts_wait_for_their_company_token, backend);
    ADD_BOTH(tc, admin_adds_app_accounts, backend);
    ADD_BOTH(tc, shared_mailboxes_of_a_person, backend);
    if (backend == BACKEND_SQLITE) {
        tcase_add_test(tc, sealed_for_company_app_and_resource);
        tcase_add_test(tc, roles_of_the_token);
    }
}

int main(void)
{
    return dbtest_main("apptoken", add_tests);
}
