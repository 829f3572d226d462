"""Runs that say the truth: every ``runs`` row ends ``ok``, ``failed``, ``interrupted`` or ``stale``.

``Store.start_run`` calls :func:`attach` and ``Store.finish_run`` calls :func:`detach`, so every stage
gets, without code of its own:

- a heartbeat: a thread stamps ``runs.heartbeat_at`` every ``HEARTBEAT_SECONDS``;
- SIGTERM handling: in the main thread a SIGTERM raises ``KeyboardInterrupt``, which every stage's
  ``except BaseException`` turns into ``interrupted`` (SIGINT already raises it);
- an exit guard: a process that exits with a run still open marks it ``failed`` (an uncaught error
  outside a stage's ``try``).

What no process can do for itself (SIGKILL, power loss) the next command that opens the store does:
:func:`reap_stale` marks ``stale`` every ``running`` row whose process no longer exists on this host,
or whose heartbeat is older than ``STALE_AFTER_SECONDS`` (any host).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cai.store import Store

HEARTBEAT_SECONDS = float(os.environ.get("CAI_HEARTBEAT_SECONDS", "30"))
# A live run stamps every 30 s; ten missed beats means its process is gone (or its host is).
STALE_AFTER_SECONDS = float(os.environ.get("CAI_STALE_AFTER_SECONDS", "600"))

_lock = threading.Lock()
_open: dict[str, Store] = {}
_stop = threading.Event()
_thread: threading.Thread | None = None
_previous_sigterm = None


def host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def _beat() -> None:
    while not _stop.wait(HEARTBEAT_SECONDS):
        with _lock:
            items = list(_open.items())
        for run_id, store in items:
            try:
                with store.write(timeout=5) as con:
                    con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ? AND status = 'running'",
                                [_now(), run_id])
            except Exception:  # noqa: BLE001 - a missed beat is harmless; the next one retries
                pass


def _now():
    from cai.store import now

    return now()


def attach(store: Store, run_id: str) -> None:
    """Track an open run: heartbeat, SIGTERM → KeyboardInterrupt, failed-on-exit."""
    global _thread, _previous_sigterm
    with _lock:
        _open[run_id] = store
        if _thread is None or not _thread.is_alive():
            _stop.clear()
            _thread = threading.Thread(target=_beat, name="cai-heartbeat", daemon=True)
            _thread.start()
    # signal.signal only works in the main thread (Prefect may run tasks in workers); a stage run
    # there is stopped by its flow run's own cancellation instead.
    if threading.current_thread() is threading.main_thread() and _previous_sigterm is None:
        current = signal.getsignal(signal.SIGTERM)
        if current in (signal.SIG_DFL, None):
            _previous_sigterm = current
            signal.signal(signal.SIGTERM, _sigterm)


def detach(run_id: str) -> None:
    global _previous_sigterm
    with _lock:
        _open.pop(run_id, None)
        empty = not _open
    if empty:
        _stop.set()
        if _previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _previous_sigterm)
            _previous_sigterm = None


@atexit.register
def _close_open_runs() -> None:
    with _lock:
        items = list(_open.items())
    for run_id, store in items:
        # Best effort at exit; reap_stale catches whatever this misses.
        with contextlib.suppress(Exception):
            store.finish_run(run_id, "failed", error="process exited with the run still open")


def reap_stale(store: Store) -> int:
    """Mark ``stale`` the ``running`` rows whose process is gone. Returns how many were marked."""
    if not store.path.exists():
        return 0
    me = host()
    rows = store.query("SELECT run_id, host, pid, coalesce(heartbeat_at, started_at) AS beat FROM runs "
                       "WHERE status = 'running'")
    if not rows:
        return 0
    cutoff = _now() - timedelta(seconds=STALE_AFTER_SECONDS)
    with _lock:
        mine = set(_open)
    gone = []
    for r in rows:
        if r["run_id"] in mine:
            continue
        dead_here = r["host"] == me and r["pid"] is not None and not pid_alive(int(r["pid"]))
        silent = r["beat"] is not None and r["beat"] < cutoff
        if dead_here or silent:
            why = (f"process {r['pid']} on {r['host']} is gone" if dead_here
                   else f"no heartbeat since {r['beat']:%Y-%m-%d %H:%M:%S} UTC")
            gone.append((r["run_id"], why))
    if gone:
        with store.write() as con:
            for run_id, why in gone:
                con.execute("UPDATE runs SET status = 'stale', finished_at = ?, error = ? "
                            "WHERE run_id = ? AND status = 'running'", [_now(), f"stale: {why}", run_id])
    return len(gone)
