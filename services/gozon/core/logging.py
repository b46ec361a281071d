"""structlog JSON logging on stdout, configured once by the process entry point.

In JSON mode (the processes' default) structlog writes our own lines itself, rendered by
orjson, and a level below the threshold costs a no-op call; the standard library's loggers
(uvicorn, aiokafka, alembic) keep their handler with the same fields. Text mode (the tests)
sends everything through the standard library, so pytest captures it.

Libraries never call `configure_logging`; they only log. Every line carries the service name
and, inside a span, its trace_id and span_id; ids bound with `structlog.contextvars` (order_id,
user_id, event_id) ride along. The standard library's loggers (uvicorn, aiokafka, alembic) go
through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog
from opentelemetry import trace


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def _bind_service(service: str) -> structlog.types.Processor:
    def add(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("service", service)
        return event

    return add


class _NamedBytesLogger(structlog.BytesLogger):
    """structlog's own logger, writing bytes to stdout, with the name `add_logger_name` reads."""

    def __init__(self, name: str) -> None:
        super().__init__(sys.stdout.buffer)
        self.name = name


def _named_bytes_logger(*args: Any) -> _NamedBytesLogger:
    return _NamedBytesLogger(str(args[0]) if args else "")


def _dumps(value: Any, **_: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def configure_logging(service: str, *, level: str = "INFO", json: bool = True) -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
        _bind_service(service),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        # plain text, plain tracebacks: readable in a file or a CI log, not only a terminal
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    if json:
        # The fast path, for every line our code logs: a level below the threshold is a no-op
        # method (make_filtering_bound_logger), a line is rendered by orjson and written as
        # bytes, without the standard library's LogRecord, handler and formatter.
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                # OPT_NON_STR_KEYS: a field whose dict has int keys (partitions, say) is
                # written with string keys, where plain orjson would raise inside the log call
                structlog.processors.JSONRenderer(serializer=_dumps),
            ],
            logger_factory=_named_bytes_logger,
            wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
            cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=True,
        )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log duplicates our request metrics and costs a line per request.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(max(logging.INFO, logging.getLevelName(level)))
