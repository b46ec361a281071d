"""The 422 answer's size does not grow with the number of problems in the request."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from gozon.core.problems import MAX_LISTED_ERRORS, install_problem_handlers


class Numbers(BaseModel):
    values: list[int]


async def test_a_validation_error_lists_the_first_problems_and_counts_the_rest() -> None:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/numbers")
    async def numbers(body: Numbers) -> int:
        return len(body.values)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/numbers", json={"values": ["x"] * 5000})
    assert response.status_code == 422
    problem = response.json()
    assert len(problem["errors"]) == MAX_LISTED_ERRORS
    assert "(and 4997 more; 20 listed in errors)" in problem["detail"]
    assert len(response.content) < 8 * 1024
