/* An account's recent errors (see mso_events.h). */
#include "mso_events.h"

static const mso_stmt_t ST_ADD = {
    "record the account's error", "id:int now:int reason:text text:text",
    "INSERT INTO msoauth_account_events (account_id, created_at, reason, text) "
    "VALUES (:id, :now, :reason, :text)", NULL
};
/* Everything at or below the (KEEP + 1)th newest: NULL (nothing) while
 * fewer are kept. */
static const mso_stmt_t ST_PRUNE = {
    "drop the account's older errors", "id:int keep:int",
    "DELETE FROM msoauth_account_events WHERE account_id = :id AND id <= "
    "(SELECT id FROM msoauth_account_events WHERE account_id = :id "
    "ORDER BY id DESC LIMIT 1 OFFSET :keep)", NULL
};
static const mso_stmt_t ST_LIST_ONE = {
    "read the account's errors", "id:int",
    "SELECT id, account_id, created_at, reason, text FROM msoauth_account_events "
    "WHERE account_id = :id ORDER BY id DESC", NULL
};
static const mso_stmt_t ST_LIST_ALL = {
    "read the accounts' errors", NULL,
    "SELECT id, account_id, created_at, reason, text FROM msoauth_account_events "
    "ORDER BY account_id, id DESC", NULL
};

apr_status_t mso_events_add_tx(mso_tx_t *tx, apr_int64_t account_id, const char *reason,
                               const char *text, apr_int64_t now)
{
    mso_args_t *a;
    apr_status_t rv;

    a = mso_tx_args(tx, &ST_ADD);
    mso_arg_int(a, "id", account_id);
    mso_arg_int(a, "now", now);
    mso_arg_text(a, "reason", reason);
    mso_arg_text(a, "text", text ? text : "");
    if (MSO_OK(mso_tx_exec(tx, a, NULL))) {
        a = mso_tx_args(tx, &ST_PRUNE);
        mso_arg_int(a, "id", account_id);
        mso_arg_int(a, "keep", MSO_EVENTS_KEEP);
        rv = mso_tx_exec(tx, a, NULL);
    }
    return rv;
}

apr_status_t mso_events_list(mso_db_t *db, apr_pool_t *p, apr_int64_t account_id,
                             apr_array_header_t **events)
{
    apr_pool_t *tmp;
    mso_rows_t *rows = NULL;
    mso_args_t *a;
    apr_status_t rv;

    *events = apr_array_make(p, 8, sizeof(mso_event_t));
    apr_pool_create(&tmp, p);
    if (account_id > 0) {
        a = mso_args(db, tmp, &ST_LIST_ONE);
        mso_arg_int(a, "id", account_id);
    }
    else {
        a = mso_args(db, tmp, &ST_LIST_ALL);
    }
    if (MSO_OK(mso_select(a, &rows, NULL))) {
        while (mso_rows_next(rows)) {
            mso_event_t *e = apr_array_push(*events);

            e->id = mso_col_int(rows, "id");
            e->account_id = mso_col_int(rows, "account_id");
            e->at = mso_col_int(rows, "created_at");
            e->reason = mso_col_text(rows, p, "reason");
            e->text = mso_col_text(rows, p, "text");
        }
    }
    apr_pool_destroy(tmp);
    return rv;
}
