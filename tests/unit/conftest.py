"""Unit tests do no I/O: the suite's session-wide tracing set-up (a provider and the database
drivers' instrumentation, ~0.7 s) is replaced by a bare in-memory exporter here."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@pytest.fixture(scope="session")
def tracing() -> InMemorySpanExporter:
    return InMemorySpanExporter()
