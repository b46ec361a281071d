"""The API gateway: the platform's one entry point (port 8080), a reverse proxy to its services.

`app` composes it; `proxy` forwards and maps failures; `breaker`, `ratelimit` and `headers` are
the pure rules it applies; `openapi` merges the services' documents for `/docs`.
"""
