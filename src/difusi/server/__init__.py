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
import errno
import socket
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
    from difusi.devices import add_device_flags

    add_device_flags(parser)  # --device (default auto), --precision, --offload, --compile: as `difusi generate`
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
    from difusi.devices import resolve_device

    try:  # a device this machine lacks refuses to start, rather than answering every job with a 500
        device = resolve_device(args.device)
    except DifusiError as error:
        print(f"difusi serve: --device: {error.message}", file=sys.stderr)
        return 2
    try:
        from difusi.budget import apply_budget_flags, current_budget

        apply_budget_flags(args)
        current_budget()  # a broken DIFUSI_MAX_* or config value fails now, not at the first request
        auth = parse_auth(args.api_auth)
        origins = [o.strip() for o in args.cors_allow_origins.split(",") if o.strip()] if args.cors_allow_origins else None
    except (ValueError, DifusiError) as error:
        print(f"difusi serve: {error}", file=sys.stderr)
        return 2
    host = bind_address(args)
    try:
        # Bind before loading anything (and before saying where we serve): a port in use or a bad --host is one line
        # naming the address and the cause, not an announcement followed by uvicorn's multi-line error and exit 3.
        # uvicorn is then handed these very sockets, so no other process can take the port in between.
        sockets = listen_sockets(host, args.port)
    except BindError as error:
        print(f"difusi serve: {error}", file=sys.stderr)
        return error.exit_code
    try:
        from difusi.server.engine import Engine

        engine = Engine(models_dir=args.models_dir, outputs_dir=args.outputs_dir, checkpoint=args.model,
                        device=str(device), precision=args.precision, offload=args.offload, compile=args.compile)
        app = create_app(engine, queue_size=args.queue_size, auth=auth, cors_origins=origins)
    except (ValueError, DifusiError) as error:
        _close(sockets)
        print(f"difusi serve: {error}", file=sys.stderr)
        return 2
    shown = _url_host("127.0.0.1" if host == "0.0.0.0" else "::1" if host == "::" else host)
    print(f"difusi: serving the web UI at http://{shown}:{args.port}/ and the API docs at http://{shown}:{args.port}/docs",
          file=sys.stderr)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="info")).run(sockets=sockets)
    finally:
        _close(sockets)
    return 0


class BindError(OSError):
    """The server cannot listen where it was asked to; the message names the address and the cause."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
        """2 for a --host that is no address of this machine (a usage error), 1 for the rest (port in use, ...)."""


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound TCP sockets for every address `host` resolves to (as asyncio's `create_server` binds), ready for
    `uvicorn.Server.run(sockets=...)`, which starts listening on them; raises BindError."""
    where = f"{_url_host(host)}:{port}"
    try:
        resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        cause = error.strerror if isinstance(error, socket.gaierror) else str(error)
        raise BindError(f"cannot listen on {where}: --host {host!r} is not a known address ({cause})", 2) from None
    sockets: list[socket.socket] = []
    for family, kind, protocol, _, address in dict.fromkeys(resolved):  # dict: drop duplicate entries, keep order
        sock = socket.socket(family, kind, protocol)
        sockets.append(sock)
        try:
            # As uvicorn and asyncio do: a port left in TIME_WAIT by a previous server can be reused at once (an
            # active listener still cannot be).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio's create_server (uvicorn's own bind): IPv6 only, no dual stack
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as error:
            _close(sockets)
            raise BindError(f"cannot listen on {where}: {_bind_cause(error)}",
                            2 if error.errno == errno.EADDRNOTAVAIL else 1) from None
    return sockets


def _bind_cause(error: OSError) -> str:
    """Why a bind failed, in words a user can act on."""
    if error.errno == errno.EADDRINUSE:
        return "the port is already in use (another server is listening on it); choose another with --port"
    if error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need administrator rights); choose another with --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return "that address does not belong to this machine; check --host"
    return error.strerror or str(error)


def _url_host(host: str) -> str:
    """An IPv6 address goes in brackets in a URL (http://[::1]:7860/)."""
    return f"[{host}]" if ":" in host else host


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
