"""The payments API against the real PostgreSQL: accounts, deposits, balance, validation,
idempotency, and the ledger that every deposit writes."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import create_async_engine

from gozon.core.pg import driver_dsn
from gozon.payments.api import build_app
from gozon.payments.models import MAX_BALANCE, Account, LedgerEntry
from gozon.payments.settings import PaymentsSettings
from tests.conftest import serve
from tests.integration.conftest import frozen_when_it_waits_for_a_lock, read_only_switch

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(payments_db: str) -> AsyncIterator[httpx.AsyncClient]:
    # Room for the 40 concurrent deposits below: these tests are about the account's
    # compare-and-swap, not about shedding (tests/integration/test_deadlines.py).
    settings = PaymentsSettings(
        payments_database_url=payments_db, db_pool_size=20, api_max_queued=64
    )
    async with serve(build_app(settings)) as client:
        yield client


async def count_rows(url: str) -> tuple[int, int]:
    """(accounts, ledger entries)"""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            accounts = await conn.scalar(select(func.count()).select_from(Account))
            ledger = await conn.scalar(select(func.count()).select_from(LedgerEntry))
    finally:
        await engine.dispose()
    return int(accounts or 0), int(ledger or 0)


def user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


async def test_opening_an_account_answers_201_with_a_zero_balance(
    client: httpx.AsyncClient,
) -> None:
    uid = user()
    response = await client.post("/api/payments/accounts", headers={"X-User-Id": uid})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["user_id"] == uid
    assert body["balance"] == 0
    assert uuid.UUID(body["id"])
    assert response.headers["location"] == "/api/payments/balance"


async def test_a_second_account_for_the_same_user_is_a_409_problem(
    client: httpx.AsyncClient, payments_db: str
) -> None:
    headers = {"X-User-Id": user()}
    first = await client.post("/api/payments/accounts", headers=headers)
    second = await client.post("/api/payments/accounts", headers=headers)
    assert first.status_code == 201
    assert second.status_code == 409
    assert second.headers["content-type"] == "application/problem+json"
    assert second.json()["title"] == "Account exists"
    assert await count_rows(payments_db) == (1, 0)


async def test_the_first_deposit_opens_the_account_and_the_balance_shows_it(
    client: httpx.AsyncClient, payments_db: str
) -> None:
    uid = user()
    headers = {"X-User-Id": uid}
    response = await client.post("/api/payments/deposit?amount=5000", headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == uid
    assert body["amount"] == 5000
    assert body["balance"] == 5000
    assert "idempotent-replayed" not in response.headers

    balance = await client.get("/api/payments/balance", headers=headers)
    assert balance.status_code == 200
    assert balance.json()["balance"] == 5000
    assert balance.json()["id"] == body["account_id"]
    assert await count_rows(payments_db) == (1, 1)


async def test_deposits_add_up_exactly_and_travel_as_exact_json_numbers(
    client: httpx.AsyncClient,
) -> None:
    headers = {"X-User-Id": user()}
    await client.post("/api/payments/deposit?amount=0.1", headers=headers)
    second = await client.post("/api/payments/deposit?amount=0.2", headers=headers)
    assert '"balance":0.3' in second.text  # not 0.30000000000000004, not a string
    balance = await client.get("/api/payments/balance", headers=headers)
    assert balance.json()["balance"] == 0.3


async def test_a_deposit_into_an_opened_account_credits_it(client: httpx.AsyncClient) -> None:
    headers = {"X-User-Id": user()}
    await client.post("/api/payments/accounts", headers=headers)
    await client.post("/api/payments/deposit?amount=1500.99", headers=headers)
    balance = await client.get("/api/payments/balance", headers=headers)
    assert balance.json()["balance"] == 1500.99


async def test_the_balance_without_an_account_is_a_404_problem(
    client: httpx.AsyncClient, payments_db: str
) -> None:
    response = await client.get("/api/payments/balance", headers={"X-User-Id": user()})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"]
    assert await count_rows(payments_db) == (0, 0)


async def test_a_retry_with_the_same_idempotency_key_credits_once(
    client: httpx.AsyncClient, payments_db: str
) -> None:
    uid = user()
    headers = {"X-User-Id": uid, "Idempotency-Key": "top-up-7"}
    first = await client.post("/api/payments/deposit?amount=100", headers=headers)
    again = await client.post("/api/payments/deposit?amount=100.00", headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert await count_rows(payments_db) == (1, 1)

    other = await client.post("/api/payments/deposit?amount=101", headers=headers)
    assert other.status_code == 422
    assert other.json()["title"] == "Idempotency-Key reused"

    # A new key is a new deposit; the key belongs to the user's account.
    await client.post(
        "/api/payments/deposit?amount=1", headers={**headers, "Idempotency-Key": "top-up-8"}
    )
    theirs = await client.post(
        "/api/payments/deposit?amount=100", headers={**headers, "X-User-Id": user()}
    )
    assert theirs.status_code == 200
    assert "idempotent-replayed" not in theirs.headers
    balance = await client.get("/api/payments/balance", headers={"X-User-Id": uid})
    assert balance.json()["balance"] == 101
    assert await count_rows(payments_db) == (2, 3)


async def test_concurrent_retries_with_one_idempotency_key_credit_once(
    client: httpx.AsyncClient, payments_db: str
) -> None:
    uid = user()
    headers = {"X-User-Id": uid, "Idempotency-Key": "double-click"}
    responses = await asyncio.gather(
        *(client.post("/api/payments/deposit?amount=25.50", headers=headers) for _ in range(10))
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 9
    balance = await client.get("/api/payments/balance", headers={"X-User-Id": uid})
    assert balance.json()["balance"] == 25.5
    assert await count_rows(payments_db) == (1, 1)


async def test_concurrent_deposits_on_one_account_all_count(
    client: httpx.AsyncClient, payments_db: str
) -> None:
    headers = {"X-User-Id": user()}
    responses = await asyncio.gather(
        *(client.post(f"/api/payments/deposit?amount={n}.01", headers=headers) for n in range(40))
    )
    assert {r.status_code for r in responses} == {200}
    balance = await client.get("/api/payments/balance", headers=headers)
    assert Decimal(str(balance.json()["balance"])) == sum(Decimal(f"{n}.01") for n in range(40))
    assert await count_rows(payments_db) == (1, 40)


async def test_a_deposit_over_the_balance_limit_is_a_422_problem_and_writes_nothing(
    client: httpx.AsyncClient, payments_db: str
) -> None:
    uid = user()
    headers = {"X-User-Id": uid}
    await client.post("/api/payments/accounts", headers=headers)
    engine = create_async_engine(payments_db)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                update(Account).where(Account.user_id == uid).values(balance=MAX_BALANCE - 1)
            )
    finally:
        await engine.dispose()

    over = await client.post("/api/payments/deposit?amount=1.01", headers=headers)
    assert over.status_code == 422, over.text
    assert over.headers["content-type"] == "application/problem+json"
    assert over.json()["title"] == "Balance limit exceeded"
    assert await count_rows(payments_db) == (1, 0)

    up_to = await client.post("/api/payments/deposit?amount=1", headers=headers)
    assert up_to.status_code == 200
    assert up_to.json()["balance"] == float(MAX_BALANCE)
    assert '"balance":9999999999999.99' in up_to.text


BAD_DEPOSITS: list[tuple[str, dict[str, str | None], str, int]] = [
    ("no user", {"X-User-Id": None}, "amount=1", 400),
    ("empty user", {"X-User-Id": ""}, "amount=1", 400),
    ("user with a space", {"X-User-Id": "a b"}, "amount=1", 400),
    ("user too long", {"X-User-Id": "u" * 65}, "amount=1", 400),
    ("bad idempotency key", {"Idempotency-Key": "two words"}, "amount=1", 400),
    ("no amount", {}, "", 422),
    ("empty amount", {}, "amount=", 422),
    ("zero amount", {}, "amount=0", 422),
    ("zero with decimals", {}, "amount=0.00", 422),
    ("negative amount", {}, "amount=-5", 422),
    ("three decimals", {}, "amount=1.001", 422),
    ("text amount", {}, "amount=abc", 422),
    ("comma decimal", {}, "amount=1,5", 422),
    ("hex amount", {}, "amount=0x10", 422),
    ("NaN amount", {}, "amount=NaN", 422),
    ("infinite amount", {}, "amount=Infinity", 422),
    ("negative infinity", {}, "amount=-inf", 422),
    ("boolean amount", {}, "amount=true", 422),
    ("huge amount", {}, "amount=1000000000.01", 422),
    ("huge exponent", {}, "amount=1e10", 422),
    ("too many digits", {}, "amount=1234567890123456", 422),
    ("underscore separator", {}, "amount=1_000", 422),
    ("plus sign", {}, "amount=%2B5", 422),
    ("padded", {}, "amount=%205%20", 422),
    ("leading zero", {}, "amount=05", 422),
    ("exponent", {}, "amount=1e2", 422),
    ("trailing dot", {}, "amount=5.", 422),
    ("repeated amount", {}, "amount=1&amount=2", 400),
    ("NUL in amount", {}, "amount=1%00", 422),
    ("invalid UTF-8 in amount", {}, "amount=%FF", 422),
]


@pytest.mark.parametrize(
    ("headers", "query", "status"),
    [case[1:] for case in BAD_DEPOSITS],
    ids=[case[0] for case in BAD_DEPOSITS],
)
async def test_a_bad_deposit_gets_a_problem_and_writes_nothing(
    client: httpx.AsyncClient,
    payments_db: str,
    headers: dict[str, str | None],
    query: str,
    status: int,
) -> None:
    merged = {"X-User-Id": user(), **headers}
    sent = {name: value for name, value in merged.items() if value is not None}
    response = await client.post(f"/api/payments/deposit?{query}", headers=sent)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    assert await count_rows(payments_db) == (0, 0)


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/api/payments/accounts"), ("GET", "/api/payments/balance")]
)
@pytest.mark.parametrize("user_id", [None, "", "a/b", "u" * 65])
async def test_accounts_and_balance_refuse_a_missing_or_malformed_user(
    client: httpx.AsyncClient, payments_db: str, method: str, path: str, user_id: str | None
) -> None:
    headers = {} if user_id is None else {"X-User-Id": user_id}
    response = await client.request(method, path, headers=headers)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert await count_rows(payments_db) == (0, 0)


async def test_the_api_answers_health_and_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/api/payments/deposit?amount=1", headers={"X-User-Id": user()})
    assert (await client.get("/health/ready")).json()["checks"] == {"database": True}
    metrics = (await client.get("/metrics")).text
    assert 'route="/api/payments/deposit"' in metrics


async def test_a_connection_to_a_read_only_server_is_dropped_not_pooled_again(
    client: httpx.AsyncClient, payments_db: str
) -> None:
    """The deposit's SQLAlchemy pool: a session that reached a read-only server (a standby)
    is dropped like a lost one, so once the database is writable again the next deposit goes
    through instead of meeting that session in the pool."""
    headers = {"X-User-Id": user()}
    async with read_only_switch(payments_db) as switch:
        await switch.read_only(True)
        await switch.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            switch.database,
        )
        for _ in range(2):  # the first may meet a terminated session; the second a read-only one
            refused = await client.post("/api/payments/deposit?amount=10", headers=headers)
            assert refused.status_code == 503, refused.text
            assert refused.json()["outcome"] == "not_processed"

        await switch.read_only(False)
        again = await client.post("/api/payments/deposit?amount=10", headers=headers)
        assert again.status_code == 200, again.text
        assert await count_rows(payments_db) == (1, 1)


async def test_a_deposit_whose_server_freezes_mid_transaction_is_answered_within_its_budget(
    client: httpx.AsyncClient, payments_db: str
) -> None:
    """A server that stops answering in the middle of a deposit (a stalled disk, a paused
    machine) keeps the connection open and cancels nothing, so its own statement_timeout never
    fires: only the API's client-side bound keeps the request inside the caller's deadline
    (the gateway gives up one second after the API's budget). Frozen here: the deposit's own
    backend, stopped (SIGSTOP) while its UPDATE waits for the account's row lock, that is
    after the transaction's first statements."""
    budget_s = 1.0
    owner = user()
    headers = {"X-User-Id": owner}
    opened = await client.post("/api/payments/deposit?amount=10", headers=headers)
    assert opened.status_code == 200, opened.text
    admin = await asyncpg.connect(driver_dsn(payments_db))
    try:
        lock = admin.transaction()
        await lock.start()
        await admin.execute("SELECT 1 FROM accounts WHERE user_id = $1 FOR UPDATE", owner)
        started = time.monotonic()
        deposit = asyncio.create_task(
            client.post(
                "/api/payments/deposit?amount=5",
                headers={**headers, "X-Request-Timeout-Ms": str(int(budget_s * 1000))},
            )
        )
        async with frozen_when_it_waits_for_a_lock(admin, "payments-api"):
            response = await asyncio.wait_for(deposit, 30)
            took = time.monotonic() - started
        await lock.rollback()
    finally:
        await admin.close()
    assert response.status_code == 503, response.text
    assert response.json()["outcome"] == "not_processed"
    assert "deadline" in response.json()["detail"]
    # Well under the gateway's margin of one second past the budget, on a busy machine too.
    assert took < budget_s + 0.8, f"answered {took:.2f} s after it was sent"
    # Nothing was half-written, and the API's pool serves the next deposit.
    again = await client.post("/api/payments/deposit?amount=5", headers=headers)
    assert again.status_code == 200, again.text
    assert Decimal(str(again.json()["balance"])) == Decimal("15")
    assert await count_rows(payments_db) == (1, 2)


async def test_a_connection_to_a_server_that_never_answers_gives_up_within_the_budget() -> None:
    """A frozen server's kernel still completes the TCP handshake, and the server never
    answers the startup. A connection made for a request must not outlast the request's
    budget: the engine's connect timeout (5 s) is the gateway's whole timeout. The server here
    is a socket that listens and never answers."""
    budget_s = 1.0
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        url = f"postgresql+asyncpg://gozon:gozon@127.0.0.1:{port}/payments"
        async with serve(build_app(PaymentsSettings(payments_database_url=url))) as client:
            started = time.monotonic()
            response = await client.post(
                "/api/payments/deposit?amount=1",
                headers={"X-User-Id": user(), "X-Request-Timeout-Ms": str(int(budget_s * 1000))},
            )
            took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["outcome"] == "not_processed"
    assert took < budget_s + 0.8, f"answered {took:.2f} s after it was sent"
