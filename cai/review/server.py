"""Start the review server (uvicorn) on 127.0.0.1 over a store that must already exist."""

from __future__ import annotations

import getpass
from collections.abc import Callable
from pathlib import Path

from cai.schema import SCHEMA_VERSION
from cai.store import Store

HOST = "127.0.0.1"  # the page has no login: it is served to this machine only


class ReviewSetupError(RuntimeError):
    pass


def default_reviewer() -> str:
    try:
        return getpass.getuser() or "reviewer"
    except (KeyError, OSError):
        return "reviewer"


def open_store(db: str | Path, *, read_only: bool, lock_timeout: float = 15.0) -> Store:
    """The store to review. A writable server migrates an older file once at start (like any cai
    command); a read-only one never writes, so it needs a file that is already up to date."""
    store = Store(db, lock_timeout=lock_timeout)
    if not store.path.exists():
        raise ReviewSetupError(f"no store at {store.path}: run the pipeline first (e.g. `make demo`), "
                               "or pass --db / set CAI_DB")
    if read_only:
        version = store._file_version()
        if version < SCHEMA_VERSION:
            raise ReviewSetupError(
                f"{store.path} is at schema version {version}, this cai needs {SCHEMA_VERSION}; a --read-only "
                "server does not migrate it: run `cai db info` (or any cai command) once without --read-only")
    else:
        store.init()
    return store


def serve(db: str | Path, *, port: int = 8765, read_only: bool = False, reviewer: str | None = None,
          announce: Callable[[str], None] = print) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    from cai.review.app import create_app
    from cai.review.verdicts import check_reviewer

    who = check_reviewer(reviewer or default_reviewer())  # before the store is touched
    store = open_store(db, read_only=read_only)
    app = create_app(store, read_only=read_only, reviewer=who)
    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5)
    line = (f"cai review: http://{HOST}:{port}/  (store {store.path}{', read-only' if read_only else ''}; "
            f"reviewer {app.state.review.reviewer}; Ctrl-C stops)")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # announced only once the port is bound: scripts wait for this line
                announce(line)

    Server(config).run()
