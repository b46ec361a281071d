"""Dependency aliases the APIs share: routes read as one line of wiring, tests override one.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in its threadpool (a
thread hop per request and dependency), an `async def` one inline on the event loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gozon.core.pg import Database


async def get_db(request: Request) -> Database:
    db: Database = request.state.db
    return db


DbDep = Annotated[Database, Depends(get_db)]
