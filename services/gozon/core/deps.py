"""Dependency aliases the APIs share: routes read as one line of wiring, tests override one."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


def get_sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    sessions: async_sessionmaker[AsyncSession] = request.state.sessions
    return sessions


SessionsDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessions)]
