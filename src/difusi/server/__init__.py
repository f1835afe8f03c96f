"""`difusi serve`: the AUTOMATIC1111-compatible HTTP API, job queue and web UI.

    difusi serve                          # http://127.0.0.1:7860  (UI at /, API docs at /docs)
    difusi serve --listen --port 7861     # all interfaces
    difusi serve --api-auth alice:secret,bob:hunter2 --queue-size 8

Modules: `app` (`create_app`: error handlers, auth, CORS), `routes_a1111` (/sdapi/v1), `routes_difusi`
(/difusi/v1), `routes_ui` (the web UI and /docs), `a1111` (request/response shapes), `queue` (job queue + worker thread),
`engine` (model cache, pipeline, output store), `preview` (latent -> RGB live previews), `static/` (UI).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# Nothing here imports `difusi.cli`: the CLI forwards `difusi serve` to this package, never the other way round
# (tests/server/test_routers_or_cycles.py checks it).

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `serve` options; pass a subparser to add them to a bigger CLI."""
    parser = parser or argparse.ArgumentParser(prog="difusi serve", description="Serve the A1111-compatible API and web UI.")
    parser.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (all interfaces) instead of 127.0.0.1")
    parser.add_argument("--host", default=None, help="bind this address (overrides --listen)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                        help="require HTTP basic auth on the API and the UI")
    parser.add_argument("--models-dir", default=None, help="folder of checkpoints (default: settings)")
    parser.add_argument("--outputs-dir", default=None, help="folder for images and history (default: settings)")
    parser.add_argument("--model", default=None, help="checkpoint to start with (default: difusi-mini)")
    parser.add_argument("--queue-size", type=int, default=32, help="jobs allowed to wait before 503 (default 32)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu; e.g. cuda)")
    parser.add_argument("--cors-allow-origins", default=None, metavar="ORIGIN[,ORIGIN2]",
                        help="allow browser pages from these origins to call the API (default: no CORS headers)")
    from difusi.budget import add_budget_flags

    add_budget_flags(parser)
    return parser


def bind_address(args: argparse.Namespace) -> str:
    """--host wins, then --listen (0.0.0.0, all interfaces), else loopback only."""
    return args.host or ("0.0.0.0" if args.listen else DEFAULT_HOST)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until Ctrl-C. Returns a process exit code."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    """Start uvicorn with the parsed `serve` options."""
    import uvicorn

    from difusi.errors import DifusiError
    from difusi.server.app import create_app, parse_auth

    if not 1 <= args.port <= 65535:
        print(f"difusi serve: --port must be in [1, 65535], got {args.port}", file=sys.stderr)
        return 2
    if args.queue_size < 1:
        print(f"difusi serve: --queue-size must be at least 1, got {args.queue_size}", file=sys.stderr)
        return 2
    try:
        from difusi.budget import apply_budget_flags, current_budget

        apply_budget_flags(args)
        current_budget()  # a broken DIFUSI_MAX_* or config value fails now, not at the first request
        auth = parse_auth(args.api_auth)
        origins = [o.strip() for o in args.cors_allow_origins.split(",") if o.strip()] if args.cors_allow_origins else None
        app = create_app(models_dir=args.models_dir, outputs_dir=args.outputs_dir, checkpoint=args.model,
                         queue_size=args.queue_size, auth=auth, device=args.device, cors_origins=origins)
    except (ValueError, DifusiError) as error:
        print(f"difusi serve: {error}", file=sys.stderr)
        return 2
    host = bind_address(args)
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    print(f"difusi: serving the web UI at http://{shown}:{args.port}/ and the API docs at http://{shown}:{args.port}/docs",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=args.port, log_level="info")
    return 0
