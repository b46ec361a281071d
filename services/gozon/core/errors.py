"""Exceptions that say how a failure is to be treated, shared by every layer above `core`.

They live here, not in the messaging runner, so that a service's domain code can say "retry
later" without importing the machinery that retries.
"""

from __future__ import annotations


class RetryLater(Exception):
    """A passing condition (a contended row, say): the work is retried like a database outage,
    for as long as it lasts, and never dead-lettered. An API answers it with 503."""
