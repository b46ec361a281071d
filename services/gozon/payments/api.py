"""The payments HTTP API: routes translate HTTP to a service call and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, FastAPI, Query, Response, status

from gozon.core.app import ApiLimits, create_app
from gozon.core.deps import DbDep
from gozon.core.headers import IdempotencyKeyDep, UserIdDep
from gozon.core.health import Readiness
from gozon.core.inputs import AMOUNT_PATTERN, StrictRoute
from gozon.core.pg import Database
from gozon.core.problems import Problem
from gozon.payments import service
from gozon.payments.metrics import start_api_series
from gozon.payments.models import MAX_BALANCE
from gozon.payments.schemas import AccountRead, DepositRead
from gozon.payments.settings import PaymentsSettings

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/api/payments", tags=["payments"], route_class=StrictRoute)


@router.post(
    "/accounts",
    status_code=status.HTTP_201_CREATED,
    response_model=AccountRead,
    responses={409: {"description": "This user already has an account."}},
    summary="Open the user's account (one per user), with a zero balance",
)
async def create_account(user_id: UserIdDep, db: DbDep, response: Response) -> Any:
    try:
        account = await service.create_account(db=db, user_id=user_id)
    except service.AccountExists as exc:
        raise Problem(409, "This user already has an account.", title="Account exists") from exc
    response.headers["Location"] = "/api/payments/balance"
    return account


@router.post(
    "/deposit",
    response_model=DepositRead,
    responses={
        422: {
            "description": "Invalid amount, an Idempotency-Key used for another amount, or a "
            "balance that would pass its limit."
        },
        503: {"description": "The account is changing too fast; nothing was written, retry."},
    },
    summary="Credit the user's account; the first deposit opens it",
)
async def deposit(
    amount_text: Annotated[
        str,
        Query(
            alias="amount",
            pattern=AMOUNT_PATTERN,
            description="0.01 to 1000000000, at most two decimal places, plain digits: no sign, "
            "exponent, spaces, separators or leading zeros.",
            examples=["100.50"],
        ),
    ],
    user_id: UserIdDep,
    db: DbDep,
    response: Response,
    idempotency_key: IdempotencyKeyDep = None,
) -> Any:
    amount = Decimal(amount_text)  # exact: the pattern admits only plain decimals in range
    try:
        deposited = await service.deposit(
            db=db, user_id=user_id, amount=amount, idempotency_key=idempotency_key
        )
    except service.IdempotencyKeyReused as exc:
        raise Problem(
            422,
            "This Idempotency-Key was already used for a deposit of another amount.",
            title="Idempotency-Key reused",
        ) from exc
    except service.BalanceLimitExceeded as exc:
        raise Problem(
            422,
            f"The deposit would take the balance over {MAX_BALANCE}.",
            title="Balance limit exceeded",
        ) from exc
    except service.AccountBusy as exc:
        raise Problem(
            503,
            "The account is changing too fast to credit now; nothing was written, retry.",
            title="Account busy",
            headers={"Retry-After": "1"},
        ) from exc
    if deposited.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    entry = deposited.entry
    log.info(
        "deposit",
        user_id=user_id,
        amount=str(amount),
        balance=str(entry["balance_after"]),
        replayed=deposited.replayed,
    )
    return DepositRead(
        account_id=entry["account_id"],
        user_id=entry["user_id"],
        amount=entry["amount"],
        balance=entry["balance_after"],
        created_at=entry["created_at"],
    )


@router.get(
    "/balance",
    response_model=AccountRead,
    responses={404: {"description": "This user has no account; a first deposit opens one."}},
    summary="The user's account and its balance",
)
async def get_balance(user_id: UserIdDep, db: DbDep) -> Any:
    account = await service.get_account(db=db, user_id=user_id)
    if account is None:
        raise Problem(404, "This user has no account; a first deposit opens one.")
    return account


def build_app(settings: PaymentsSettings) -> FastAPI:
    start_api_series()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        db = await Database.open(
            settings.payments_database_url,
            pool_size=settings.db_pool_size,
            application_name="payments-api",
            pool_timeout_s=settings.db_pool_timeout_s,
            statement_timeout_s=settings.db_statement_timeout_s,
        )
        readiness = Readiness()
        readiness.add("database", db.answers)
        try:
            yield {"db": db, "readiness": readiness}
        finally:
            await db.close()

    return create_app(
        service="payments",
        title="Gozon payments",
        description="Open an account, deposit money, read the balance.",
        lifespan=lifespan,
        routers=[router],
        limits=ApiLimits(
            max_in_flight=settings.api_max_in_flight,
            max_queued=settings.api_max_queued,
            timeout_s=settings.api_timeout_s,
        ),
    )
