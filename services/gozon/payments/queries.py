"""The payments service's hand-written SQL, in one place: each statement named, with what it
guarantees. Every statement here is exercised against the real PostgreSQL by the integration
tests (tests/integration/test_payments_api.py, test_payments_consumer.py,
test_batched_consumers.py, test_consumer_round_trips.py).

The API's statements run on its asyncpg pool (`gozon.core.pg.Database`): opening an account is
one statement; a deposit is a transaction (`Database.transaction`, bounded by the request's
deadline) of OPEN_ACCOUNT, DEPOSIT_BY_KEY (with an Idempotency-Key), READ_BALANCE + CREDIT
(the compare-and-swap, again when it lost) and RECORD_DEPOSIT.

Statements take arrays (`CAST($n AS type[])` + `unnest`): one round trip handles a whole batch,
whatever its size, and the statement text — so its prepared plan — stays the same. They run on
the consumer's asyncpg pool (`gozon.core.pg.worker_pool`), which prepares each once per
connection; their parameters are positional (`$n`), documented with each statement.

The consumer's batch is four round trips on its common path (every order new, every
compare-and-swap won): BEGIN, CLAIM_AND_READ, SWAP_AND_RECORD, COMMIT. STORED_DECISIONS and
READ_ACCOUNTS are its slow paths: an order a concurrent transaction claimed while this one
waited, and accounts whose swap lost.
"""

from __future__ import annotations

from typing import Final

# --- API ---

ACCOUNT_COLUMNS: Final = "id, user_id, balance, version, created_at, updated_at"
LEDGER_COLUMNS: Final = (
    "id, account_id, user_id, kind, amount, balance_after, order_id, idempotency_key, created_at"
)

CREATE_ACCOUNT: Final = f"""
    INSERT INTO accounts (id, user_id) VALUES ($1, $2)
    ON CONFLICT (user_id) DO NOTHING
    RETURNING {ACCOUNT_COLUMNS}
"""
"""create_account($1 id, $2 user id): the new account, or no row when the user has one."""

GET_ACCOUNT: Final = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE user_id = $1"
"""get_account($1 user id): the user's account, or no row."""

OPEN_ACCOUNT: Final = """
    INSERT INTO accounts (id, user_id) VALUES ($1, $2)
    ON CONFLICT (user_id) DO NOTHING
"""
"""open_account($1 id, $2 user id): the user's account, opened with a zero balance unless it
exists (a deposit opens the account)."""

DEPOSIT_BY_KEY: Final = f"""
    SELECT {", ".join(f"ledger.{c}" for c in LEDGER_COLUMNS.split(", "))}
    FROM account_ledger AS ledger JOIN accounts AS account ON account.id = ledger.account_id
    WHERE account.user_id = $1 AND ledger.idempotency_key = $2
"""
"""deposit_by_key($1 user id, $2 Idempotency-Key): the deposit made before with this key, if
any (one per account and key: a unique index)."""

READ_BALANCE: Final = "SELECT id, balance, version FROM accounts WHERE user_id = $1"
"""read_balance($1 user id): the account's balance and the version CREDIT compares against
(READ COMMITTED: the latest commit)."""

CREDIT: Final = """
    UPDATE accounts
    SET balance = balance + $3, version = version + 1, updated_at = now()
    WHERE id = $1 AND version = $2 AND balance + $3 <= $4
    RETURNING balance
"""
"""credit($1 account id, $2 version read, $3 amount, $4 the balance cap): compare-and-swap of
a deposit: no row when the version moved on (a concurrent change: read again) or the cap
would be passed."""

RECORD_DEPOSIT: Final = f"""
    INSERT INTO account_ledger (account_id, user_id, kind, amount, balance_after,
                                idempotency_key)
    VALUES ($1, $2, 'DEPOSIT', $3, $4, $5)
    ON CONFLICT (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {LEDGER_COLUMNS}
"""
"""record_deposit($1 account id, $2 user id, $3 amount, $4 balance after, $5 Idempotency-Key
or NULL): the deposit's ledger row, or no row when a concurrent deposit with the same key
committed first (the caller rolls back its credit and replays that one)."""

# --- consumer ---
# The batched `order.created.event` handler (gozon.payments.consumer,
# service.decide_order_payments). One transaction per partition's batch: CLAIM_AND_READ (the
# claims, the decisions made before, the accounts), then SWAP_AND_RECORD (the compare-and-swap
# of every debited account and, only when every swap won, everything the batch records); one
# COMMIT. An order claimed concurrently is read again with STORED_DECISIONS; the accounts
# whose swap lost are read again with READ_ACCOUNTS and retried with SWAP_AND_RECORD.

CLAIM_AND_READ: Final = """
    WITH claim AS (
        INSERT INTO payment_decisions (order_id, user_id, amount, event_id)
        SELECT order_id, user_id, amount, event_id
        FROM unnest(
            CAST($1 AS uuid[]), CAST($2 AS text[]), CAST($3 AS numeric[]), CAST($4 AS uuid[])
        ) AS claim(order_id, user_id, amount, event_id)
        ORDER BY order_id
        ON CONFLICT (order_id) DO NOTHING
        RETURNING order_id, decided_at
    )
    SELECT 'claimed' AS kind, order_id, NULL AS user_id, NULL::numeric AS amount,
           NULL AS status, NULL AS reason, decided_at,
           NULL::uuid AS account_id, NULL::numeric AS balance, NULL::bigint AS version
    FROM claim
    UNION ALL
    SELECT 'stored', order_id, user_id, amount, status, reason, decided_at, NULL, NULL, NULL
    FROM payment_decisions
    WHERE order_id = ANY(CAST($1 AS uuid[]))
    UNION ALL
    SELECT 'account', NULL, user_id, NULL, NULL, NULL, NULL, id, balance, version
    FROM accounts
    WHERE user_id = ANY(CAST($5 AS text[]))
"""
"""claim_and_read($1 order ids, $2 user ids, $3 amounts, $4 event ids: one entry per order, in
order-id order; $5 the orders' user ids, once each).

Claims each order's one decision and reads, in the same statement, what deciding needs.

Rows of three kinds:
- `claimed`: the orders this transaction claimed (their decision row is inserted, status NULL
  until SWAP_AND_RECORD sets it in this same transaction). Only they may be debited. An order
  claimed by a committed transaction is skipped; one claimed by a transaction still open
  waits for it (then is skipped, or claimed here if it rolled back). Rows go in order-id
  order, so two batches claiming overlapping orders lock them in the same order. Pass one row
  per order.
- `stored`: the decisions committed before this statement's snapshot (status never NULL: the
  deciding transaction set it before committing), to be sent again.
- `account`: the accounts' balance and version as of the snapshot, without locking them: the
  version is what SWAP_AND_RECORD compares against, so a stale one only loses its swap.

The snapshot is taken when the statement starts (READ COMMITTED). An order whose decision a
concurrent transaction committed after that (the claim waited for it, or found it committed)
is neither `claimed` nor `stored`: read it with STORED_DECISIONS, a new statement whose
snapshot holds it."""

STORED_DECISIONS: Final = """
    SELECT order_id, user_id, amount, status, reason, decided_at
    FROM payment_decisions
    WHERE order_id = ANY(CAST($1 AS uuid[]))
"""
"""stored_decisions($1 order ids): the committed decisions of these orders, to be sent
again: for the orders CLAIM_AND_READ neither claimed nor saw (a concurrent claimer committed
while it waited; this statement's snapshot, taken after, holds it). Their status is never NULL."""

READ_ACCOUNTS: Final = """
    SELECT id AS account_id, user_id, balance, version
    FROM accounts
    WHERE user_id = ANY(CAST($1 AS text[]))
"""
"""read_accounts($1 user ids): the accounts' latest committed balance and version (READ
COMMITTED), without locking them, for the accounts whose swap lost: the version is what
SWAP_AND_RECORD compares against."""

SWAP_AND_RECORD: Final = """
    WITH swapped AS (
        UPDATE accounts AS account
        SET balance = swap.balance, version = account.version + 1, updated_at = now()
        FROM unnest(
            CAST($1 AS uuid[]), CAST($2 AS bigint[]), CAST($3 AS numeric[])
        ) AS swap(id, version, balance)
        WHERE account.id = swap.id
          AND account.version = swap.version
          AND swap.balance >= 0
        RETURNING account.id
    ),
    won AS (
        SELECT count(*) = cardinality(CAST($1 AS uuid[])) AS every_swap FROM swapped
    ),
    ledger AS (
        INSERT INTO account_ledger (account_id, user_id, kind, amount, balance_after, order_id)
        SELECT account_id, user_id, 'DEBIT', amount, balance_after, order_id
        FROM unnest(
            CAST($4 AS uuid[]), CAST($5 AS text[]),
            CAST($6 AS numeric[]), CAST($7 AS numeric[]),
            CAST($8 AS uuid[])
        ) WITH ORDINALITY AS debit(account_id, user_id, amount, balance_after, order_id, n)
        WHERE (SELECT every_swap FROM won)
        ORDER BY n
    ),
    decided AS (
        UPDATE payment_decisions AS decision
        SET status = outcome.status, reason = outcome.reason
        FROM unnest(
            CAST($9 AS uuid[]), CAST($10 AS text[]),
            CAST($11 AS text[])
        ) AS outcome(order_id, status, reason)
        WHERE decision.order_id = outcome.order_id AND (SELECT every_swap FROM won)
    ),
    inbox AS (
        INSERT INTO payment_inbox (idempotency_key, order_id, user_id, amount, status, reason)
        SELECT event_id, order_id, user_id, amount, status, reason
        FROM unnest(
            CAST($12 AS uuid[]), CAST($13 AS uuid[]),
            CAST($14 AS text[]), CAST($15 AS numeric[]),
            CAST($16 AS text[]), CAST($17 AS text[])
        ) AS event(event_id, order_id, user_id, amount, status, reason)
        WHERE (SELECT every_swap FROM won)
        ON CONFLICT (idempotency_key) DO NOTHING
    ),
    outbox AS (
        INSERT INTO payment_outbox (order_id, user_id, topic, message_key, payload, headers)
        SELECT order_id, user_id, CAST($18 AS text), user_id, CAST(payload AS jsonb),
               CAST(headers AS jsonb)
        FROM unnest(
            CAST($19 AS uuid[]), CAST($20 AS text[]),
            CAST($21 AS text[]), CAST($22 AS text[])
        ) WITH ORDINALITY AS answer(order_id, user_id, payload, headers, n)
        WHERE (SELECT every_swap FROM won)
        ORDER BY n
    )
    SELECT (SELECT every_swap FROM won) AS recorded, ARRAY(SELECT id FROM swapped) AS swapped
"""
"""swap_and_record($1 … $22: the fields of `decisions.BatchRecord`, in that order).

Compare-and-swap of many accounts at once, then — in the same statement, only when every
swap won — everything else the batch writes. One row: `recorded`, and the accounts `swapped`.

The swap: each account's new balance is written only if its version is still the one read (a
concurrent deposit or debit bumped it otherwise), and the version is bumped; never below zero
(here and by the table's CHECK). Pass each account once; none when no order is debited.

The records, written only when every swap of this call won (all the data-modifying CTEs wait
for the swap's outcome through `won`): the debits' ledger rows in offset order (with the
balance after each, so the ledger replays the balance; one DEBIT per order, by a unique
index), the claimed decisions' outcomes, one inbox row per event id (a redelivered event adds
none), and one `PaymentProcessed` outbox row per delivery in offset order (ids in that order,
so the relay publishes them in it), each with its own trace headers.

When a swap lost (`recorded` false), nothing is recorded, and the swaps that won stay in the
transaction: the caller reads the lost accounts again (READ_ACCOUNTS), decides their orders
again and calls this again with only their swaps and the whole batch's records, until it is
`recorded`, or rolls the transaction back."""
