"""The orders HTTP API: routes translate HTTP to a service call and back."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, FastAPI, Query, Request, Response, status

from gozon.core.app import ApiLimits, create_app
from gozon.core.deps import DbDep
from gozon.core.headers import IdempotencyKeyDep, UserIdDep
from gozon.core.health import Readiness
from gozon.core.inputs import StrictRoute
from gozon.core.pg import Database, driver_dsn
from gozon.core.problems import Problem
from gozon.messaging.wakeup import OutboxNotifier
from gozon.orders import service
from gozon.orders.models import order_outbox
from gozon.orders.schemas import OrderCreate, OrderRead
from gozon.orders.settings import OrdersSettings

router = APIRouter(prefix="/api/orders", tags=["orders"], route_class=StrictRoute)
log = structlog.get_logger(__name__)

CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,200}$"


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=OrderRead,
    responses={
        201: {
            "description": "The order, status NEW; `Location` is its URL.",
            "links": {
                "GetOrder": {
                    "operationId": "get_order_api_orders__order_id__get",
                    "parameters": {
                        "order_id": "$response.body#/id",
                        "header.X-User-Id": "$request.header.X-User-Id",
                    },
                    "description": "The order, as its owner reads it.",
                }
            },
        },
        422: {"description": "Invalid body, or the Idempotency-Key was used for another order."},
    },
    summary="Create an order (status NEW); payment follows asynchronously",
)
async def create_order(
    body: OrderCreate,
    user_id: UserIdDep,
    db: DbDep,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKeyDep = None,
) -> Any:
    try:
        created = await service.create_order(
            db=db, user_id=user_id, data=body, idempotency_key=idempotency_key
        )
    except service.IdempotencyKeyReused as exc:
        raise Problem(
            422,
            "This Idempotency-Key was already used with a different request body.",
            title="Idempotency-Key reused",
        ) from exc
    order_id = created.order["id"]
    log.info("order created", order_id=str(order_id), user_id=user_id, replayed=created.replayed)
    if not created.replayed:
        request.state.outbox_notifier.notify()  # committed: wake the relay
    response.headers["Location"] = f"/api/orders/{order_id}"
    if created.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return created.order


@router.get(
    "",
    response_model=list[OrderRead],
    responses={400: {"description": "A bad header, or a cursor this service did not issue."}},
    summary="The user's orders, newest first; the next page is in the Link header",
)
async def list_orders(
    user_id: UserIdDep,
    db: DbDep,
    request: Request,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None,
        Query(
            pattern=CURSOR_PATTERN,
            description="Opaque: only the value from the previous page's `Link: rel=next` "
            "header; any other value is a 400.",
        ),
    ] = None,
) -> Any:
    try:
        orders, next_cursor = await service.list_orders(
            db=db, user_id=user_id, limit=limit, cursor=cursor
        )
    except service.InvalidCursor as exc:
        raise Problem(400, "The cursor is not one this service issued.") from exc
    if next_cursor:
        url = request.url.include_query_params(cursor=next_cursor, limit=limit)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return orders


@router.get(
    "/{order_id}",
    response_model=OrderRead,
    responses={404: {"description": "No such order for this user."}},
    summary="One of the user's orders, with its status",
)
async def get_order(order_id: uuid.UUID, user_id: UserIdDep, db: DbDep) -> Any:
    order = await service.get_order(db=db, user_id=user_id, order_id=order_id)
    if order is None:
        raise Problem(404, f"No order {order_id} for this user.")
    return order


def build_app(settings: OrdersSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        db = await Database.open(
            settings.orders_database_url,
            pool_size=settings.db_pool_size,
            application_name="orders-api",
            pool_timeout_s=settings.db_pool_timeout_s,
            statement_timeout_s=settings.db_statement_timeout_s,
        )
        readiness = Readiness()
        readiness.add("database", db.answers)
        notifier = OutboxNotifier(driver_dsn(settings.orders_database_url), order_outbox.name)
        try:
            async with notifier.running():
                yield {"db": db, "readiness": readiness, "outbox_notifier": notifier}
        finally:
            await db.close()

    return create_app(
        service="orders",
        title="Gozon orders",
        description="Create orders and follow them to FINISHED or CANCELLED.",
        lifespan=lifespan,
        routers=[router],
        limits=ApiLimits(
            max_in_flight=settings.api_max_in_flight,
            max_queued=settings.api_max_queued,
            timeout_s=settings.api_timeout_s,
        ),
    )
