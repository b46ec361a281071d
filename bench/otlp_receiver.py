"""A small OTLP/HTTP trace receiver that counts what the processes export (docs/observability.md).

    python -m bench.otlp_receiver PORT spans.jsonl     # then point the processes at it:
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT OTEL_BSP_SCHEDULE_DELAY=500 make up
    python -m bench.otlp_receiver --summary spans.jsonl [TRACE_ID]

Each received span becomes one JSON line (service, name, kind, trace, span, parent, attribute
keys); `--summary` prints the spans per trace, the orphan parents, and (given an order's trace
id, the gateway's `X-Trace-Id`) what was exported for that trace and for every other.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path
from typing import IO

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def receiver(out: IO[str]) -> web.Application:
    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource.scope_spans:
                for span in scope.spans:
                    line = {
                        "service": service,
                        "name": span.name,
                        "kind": span.kind,
                        "trace": span.trace_id.hex(),
                        "span": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(),
                        "attributes": sorted(a.key for a in span.attributes),
                    }
                    out.write(json.dumps(line) + "\n")
        out.flush()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    return app


def summary(path: Path, trace_id: str | None) -> None:
    spans = [json.loads(line) for line in path.read_text().splitlines() if line]
    by_trace = collections.Counter(span["trace"] for span in spans)
    ids = {span["span"] for span in spans}
    orphans = [s["name"] for s in spans if s["parent"] and s["parent"] not in ids]
    print(f"spans: {len(spans)}, traces: {len(by_trace)}, orphan parents: {len(orphans)}")
    print(f"single-span traces: {sum(1 for n in by_trace.values() if n == 1)}")
    if trace_id:
        mine = [s for s in spans if s["trace"] == trace_id]
        print(f"trace {trace_id}: {len(mine)} spans")
        for (service, name), n in sorted(
            collections.Counter((s["service"], s["name"]) for s in mine).items()
        ):
            print(f"  {service:26} {name:40} {n}")
        others = collections.Counter(
            (s["service"], s["name"]) for s in spans if s["trace"] != trace_id
        )
        print(f"other traces' spans: {sum(others.values())} {dict(others)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("first")
    parser.add_argument("second", nargs="?")
    args = parser.parse_args()
    if args.summary:
        summary(Path(args.first), args.second)
        return
    with Path(args.second).open("a") as out:
        web.run_app(receiver(out), host="127.0.0.1", port=int(args.first), print=None)


if __name__ == "__main__":
    main()
