"""One OpenAPI document for the gateway: both services' APIs, as a client of port 8080 sees them.

Each upstream's `/openapi.json` is fetched on demand and cached for `ttl_s`; a fetch that fails
is tried again on the next request, and meanwhile the last good copy (if any) is served, so
`/docs` works as soon as an upstream does and never waits long on one that is down. The merge
keeps each upstream's paths under its route prefix (the paths are the same through the
gateway), merges tags and components, and renames a component that two upstreams define
differently (`OrderRead` → `orders_OrderRead`, with every `$ref` to it rewritten). An upstream
whose document is missing is named in `info.description`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from gozon.core.problems import FAILURE_CONTRACT
from gozon.gateway.proxy import Upstream

log = structlog.get_logger(__name__)

Document = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Source:
    prefix: str
    upstream: Upstream


def _rewrite_refs(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            key: renames.get(value, value)
            if key == "$ref" and isinstance(value, str)
            else _rewrite_refs(value, renames)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite_refs(item, renames) for item in node]
    return node


def merge(
    *, title: str, version: str, documents: Sequence[tuple[str, str, Document | None]]
) -> Document:
    """Merges (upstream name, route prefix, its document or None) into one document."""
    paths: dict[str, Any] = {}
    components: dict[str, dict[str, Any]] = {}
    tags: dict[str, Any] = {}
    missing = []
    for name, prefix, document in documents:
        if document is None:
            missing.append(name)
            continue
        clashes = {
            (section, key)
            for section, entries in document.get("components", {}).items()
            for key, value in entries.items()
            if components.get(section, {}).get(key, value) != value
        }
        renames = {f"#/components/{s}/{k}": f"#/components/{s}/{name}_{k}" for s, k in clashes}
        document = _rewrite_refs(document, renames)
        for section, entries in document.get("components", {}).items():
            for key, value in entries.items():
                final = f"{name}_{key}" if (section, key) in clashes else key
                components.setdefault(section, {})[final] = value
        for path, item in document.get("paths", {}).items():
            if path == prefix or path.startswith(prefix + "/"):
                paths[path] = item
        for tag in document.get("tags", []):
            tags.setdefault(tag["name"], tag)
    description = f"Both Gozon services' APIs, as the gateway serves them. {FAILURE_CONTRACT}"
    if missing:
        description += f" Not available right now: {', '.join(missing)}."
    merged: Document = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": dict(sorted(paths.items())),
    }
    if components:
        merged["components"] = components
    if tags:
        merged["tags"] = list(tags.values())
    return merged


class OpenApiDocs:
    """The merged document, rebuilt from the cached upstream documents on each request."""

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        title: str,
        version: str,
        ttl_s: float = 300.0,
        fetch_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sources = sources
        self._title = title
        self._version = version
        self._ttl_s = ttl_s
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout_s)
        self._clock = clock
        self._cache: dict[str, tuple[float, Document]] = {}
        self._lock = asyncio.Lock()

    async def document(self) -> Document:
        async with self._lock:  # one fetch per upstream at a time, however many readers
            await asyncio.gather(*(self._refresh(source.upstream) for source in self._sources))
        return merge(
            title=self._title,
            version=self._version,
            documents=[
                (s.upstream.name, s.prefix, self._cache.get(s.upstream.name, (0.0, None))[1])
                for s in self._sources
            ],
        )

    async def _refresh(self, upstream: Upstream) -> None:
        cached = self._cache.get(upstream.name)
        if cached is not None and self._clock() - cached[0] < self._ttl_s:
            return
        try:
            async with upstream.session.get(
                f"{upstream.url}/openapi.json", timeout=self._timeout
            ) as response:
                response.raise_for_status()
                document = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("openapi fetch failed", upstream=upstream.name, error=repr(exc))
            return
        self._cache[upstream.name] = (self._clock(), document)
