"""The payments service: accounts, the inbox of order events, debits and their outbox."""
