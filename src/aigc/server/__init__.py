"""`aigc serve`: the API (aigc.server.app) on uvicorn, bound to loopback unless API keys exist.

uvicorn handles SIGTERM and Ctrl-C: it stops accepting, lets the requests in flight finish (at most
`SHUTDOWN_SECONDS`), and the process exits 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import sys
import threading
from pathlib import Path

import uvicorn

from aigc.db import Store
from aigc.errors import BadRequest, UserError
from aigc.server.app import create_app
from aigc.server.limits import BodyLimit
from aigc.store import valid_name

SHUTDOWN_SECONDS = 30


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_models(specs: list[str]) -> dict[str, Path]:
    """--model NAME=DIR (repeatable): local Hugging Face causal-LM folders served under NAME."""
    models = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not valid_name(name) or not folder:
            raise BadRequest(f"--model {spec!r}: give NAME=DIR (NAME: letters, digits, '.', '_', '-')")
        path = Path(folder).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise BadRequest(f"--model {name}={folder}: no config.json there (not a Hugging Face model folder)")
        if name in models:
            raise BadRequest(f"--model {name} is given twice")
        models[name] = path
    return models


def serve(config, host: str = "127.0.0.1", port: int = 8000, on_started=None) -> None:
    """Serve until SIGTERM or Ctrl-C. A host other than loopback needs an API key (aigc keys create).
    `on_started(url)` runs a second after the server starts (`aigc studio` opens the browser there)."""
    if not 1 <= port <= 65535:
        raise BadRequest(f"--port must be in 1..65535, got {port}")
    clash = sorted(name for name in config.models if (Path(config.runs) / name / "run.json").is_file())
    if clash:
        raise BadRequest(f"--model {clash[0]}: a run in {config.runs} has that name; choose another NAME")
    if not is_loopback(host) and not Store(config.database).has_keys():
        raise UserError(f"refusing to serve on {host} without an API key: anyone who can reach it could use it. "
                        f"Create one with `aigc keys create NAME` (clients send Authorization: Bearer <key>), "
                        f"or serve on 127.0.0.1")
    app = BodyLimit(create_app(config), config.max_body_bytes, streamed=("/v1/uploads",))
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {config.runs} on http://{shown}:{port}/v1 (API docs: http://{shown}:{port}/docs; "
          f"the studio: http://{shown}:{port}/; Ctrl-C stops)", file=sys.stderr, flush=True)
    if on_started is not None:
        threading.Timer(1.0, on_started, args=(f"http://{shown}:{port}/",)).start()
    _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                           timeout_graceful_shutdown=SHUTDOWN_SECONDS)).run()


class _Server(uvicorn.Server):
    """uvicorn's server, except that after its graceful shutdown on SIGTERM or Ctrl-C the process exits 0
    (uvicorn re-raises the signal, so the process would die of it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
