"""The DuckDB store: one file, created and migrated by code, opened only while a batch is written.

Why open-per-batch: DuckDB lets one process write a file at a time and locks readers in
other processes out while a writer holds it. Holding the file only for the few milliseconds
a batch takes lets a person run ``cai sql`` in another terminal during a long run; both sides
wait and retry briefly when they meet the other's lock.

Every table's key is a deterministic content hash, and writes are ``INSERT ... ON CONFLICT DO
NOTHING``, so re-running a stage writes nothing twice and a crashed stage resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from cai import __version__
from cai.schema import MIGRATIONS, SCHEMA_VERSION

DEFAULT_DB = Path("data") / "cai.duckdb"
# Written so the duckdb 1.5 CLI (and Python duckdb 1.5) can still open our files.
STORAGE_COMPATIBILITY = "v1.5.0"


# One connection at a time per process: DuckDB refuses a read-only connection to a file this process
# already holds read-write, and the run heartbeat (cai.runs) writes from a thread of its own.
_IN_PROCESS = threading.RLock()


class StoreLockedError(RuntimeError):
    pass


def default_db_path() -> Path:
    """``$CAI_DB`` if set, else ``data/cai.duckdb`` under the current directory."""
    return Path(os.environ.get("CAI_DB") or DEFAULT_DB)


def content_hash(*parts: Any, length: int = 16) -> str:
    """A stable id for some content: sha256 over the canonical JSON of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _is_lock_error(e: Exception) -> bool:
    msg = str(e).lower()
    return "lock" in msg and ("conflicting" in msg or "could not set" in msg or "locked" in msg)


class Store:
    """Handle to a DuckDB file. Cheap to create; connections are opened per operation."""

    def __init__(self, path: str | Path | None = None, *, lock_timeout: float = 60.0):
        self.path = Path(path) if path is not None else default_db_path()
        self.lock_timeout = lock_timeout
        self._migrated = False

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ---- connections -----------------------------------------------------------------------
    def _connect(self, read_only: bool, timeout: float) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                if read_only:
                    return duckdb.connect(str(self.path), read_only=True)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                return duckdb.connect(
                    str(self.path), config={"storage_compatibility_version": STORAGE_COMPATIBILITY}
                )
            except duckdb.Error as e:
                if not _is_lock_error(e) or time.monotonic() > deadline:
                    if _is_lock_error(e):
                        raise StoreLockedError(
                            f"{self.path} stayed locked by another process for {timeout:.0f}s: {e}"
                        ) from e
                    raise
                # Jitter so two waiting processes don't retry in lock-step.
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    @contextmanager
    def write(self, timeout: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction; committed on success, closed after."""
        with _IN_PROCESS, self._write(timeout) as con:
            yield con

    @contextmanager
    def _write(self, timeout: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._connect(read_only=False, timeout=self.lock_timeout if timeout is None else timeout)
        try:
            if not self._migrated:
                migrate(con)
                self._migrated = True
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        finally:
            con.close()

    @contextmanager
    def read(self, timeout: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection (waits briefly for a writer to let go). Never takes the write lock,
        except once to create or migrate a file that is missing or older than this code."""
        with _IN_PROCESS:
            if not self._migrated and (not self.path.exists() or self._file_version() < SCHEMA_VERSION):
                self.init()
            self._migrated = True
            con = self._connect(read_only=True, timeout=self.lock_timeout if timeout is None else timeout)
            try:
                yield con
            finally:
                con.close()

    def _file_version(self) -> int:
        con = self._connect(read_only=True, timeout=self.lock_timeout)
        try:
            return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0]
        except duckdb.CatalogException:
            return 0
        finally:
            con.close()

    def init(self) -> None:
        """Create or migrate the file."""
        with self.write():
            pass

    # ---- generic helpers -------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        with self.read() as con:
            cur = con.execute(sql, params or [])
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def scalar(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        with self.read() as con:
            row = con.execute(sql, params or []).fetchall()
            return row[0][0] if row else None

    def insert(self, table: str, rows: Sequence[dict[str, Any]],
               con: duckdb.DuckDBPyConnection | None = None) -> int:
        """Insert rows, skipping any whose key already exists. Returns how many were new."""
        if not rows:
            return 0
        if con is None:
            with self.write() as c:
                n = insert_rows(c, table, rows)
            _fault_point(table)
            return n
        return insert_rows(con, table, rows)

    def existing_ids(self, table: str, key: str, ids: Sequence[str]) -> set[str]:
        if not ids or not self.path.exists():
            return set()
        import pyarrow as pa

        with self.read() as con:
            con.register("_ids", pa.table({"id": list(ids)}))
            rows = con.execute(f"SELECT {key} FROM {table} WHERE {key} IN (SELECT id FROM _ids)").fetchall()
        return {r[0] for r in rows}

    # ---- runs (one row per stage invocation) -----------------------------------------------
    def start_run(self, stage: str, params: dict[str, Any]) -> str:
        """Open a ``running`` row owned by this process (host, pid, heartbeat; see ``cai.runs``).
        Call it only once everything the stage needs is validated, so a bad input writes nothing."""
        from cai import runs

        runs.reap_stale(self)
        run_id = f"{stage}-{now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        stamp = now()
        self.insert("runs", [{
            "run_id": run_id, "stage": stage, "status": "running", "started_at": stamp,
            "params": json.dumps(redact(params), default=str), "cai_version": __version__,
            "host": runs.host(), "pid": os.getpid(), "heartbeat_at": stamp,
        }])
        runs.attach(self, run_id)
        return run_id

    def finish_run(self, run_id: str, status: str = "ok", summary: dict[str, Any] | None = None,
                   error: str | None = None) -> None:
        from cai import runs

        runs.detach(run_id)
        with self.write() as con:
            con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, summary = ?, error = ? WHERE run_id = ?",
                [status, now(), json.dumps(summary or {}, default=str), error, run_id],
            )

    @contextmanager
    def run(self, stage: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """``with store.run(stage, params) as r:`` opens a run and closes it ``ok`` (summary =
        ``r["summary"]``), ``interrupted`` (Ctrl-C, SIGTERM) or ``failed`` (any other error)."""
        r: dict[str, Any] = {"run_id": self.start_run(stage, params), "summary": {}}
        try:
            yield r
        except BaseException as e:
            self.finish_run(r["run_id"], "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                            r["summary"], error=repr(e))
            raise
        self.finish_run(r["run_id"], "ok", r["summary"])

    # ---- registries ------------------------------------------------------------------------
    def register_constitution(self, constitution: Any, con: duckdb.DuckDBPyConnection | None = None) -> str:
        """Store a constitution's text and principles under its content hash (idempotent)."""
        h = constitution.hash
        c_row = {"constitution_hash": h, "name": constitution.name, "version": constitution.version,
                 "path": constitution.path, "yaml_text": constitution.text, "created_at": now()}
        p_rows = [{"constitution_hash": h, "principle_id": p.id, "critique": p.critique,
                   "revision": p.revision, "judge": p.judge, "weight": p.weight, "tags": list(p.tags)}
                  for p in constitution.principles]
        if con is None:
            with self.write() as c:
                insert_rows(c, "constitutions", [c_row])
                insert_rows(c, "principles", p_rows)
        else:
            insert_rows(con, "constitutions", [c_row])
            insert_rows(con, "principles", p_rows)
        return h

    def register_model(self, model_id: str, kind: str, path: str | None = None, *,
                       base_model_id: str | None = None, parent_ids: Sequence[str] = (),
                       params: dict[str, Any] | None = None, data_snapshot: dict[str, Any] | None = None,
                       run_id: str | None = None, con: duckdb.DuckDBPyConnection | None = None) -> str:
        row = {"model_id": model_id, "kind": kind, "path": path, "base_model_id": base_model_id,
               "parent_ids": list(parent_ids), "params": json.dumps(params or {}, default=str),
               "data_snapshot": json.dumps(data_snapshot or {}, default=str), "run_id": run_id,
               "created_at": now()}
        self.insert("models", [row], con=con)
        return model_id

    # ---- overview --------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        with self.read() as con:
            version = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
            objects = con.execute(
                "SELECT table_name, table_type FROM information_schema.tables "
                "WHERE table_schema = 'main' ORDER BY table_type, table_name"
            ).fetchall()
            tables = []
            for name, kind in objects:
                count = con.execute(f'SELECT count(*) FROM "{name}"').fetchall()[0][0]
                tables.append({"name": name, "type": "view" if kind == "VIEW" else "table", "rows": count})
        size = self.path.stat().st_size if self.path.exists() else 0
        return {"path": str(self.path), "schema_version": version, "bytes": size, "tables": tables}


_FAULT_COUNTS: dict[str, int] = {}


def _fault_point(table: str) -> None:
    """Test hook: ``CAI_FAULT=TABLE:N[:SIGNAL]`` kills this process (SIGKILL by default, or SIGTERM,
    SIGINT) right after its N-th committed batch into TABLE, so fault tests kill at a known point
    instead of racing a timer. Unset in normal use; never set it in production."""
    spec = os.environ.get("CAI_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != table:
        return
    _FAULT_COUNTS[table] = _FAULT_COUNTS.get(table, 0) + 1
    if _FAULT_COUNTS[table] == int(parts[1]):
        import signal

        os.kill(os.getpid(), getattr(signal, parts[2] if len(parts) > 2 else "SIGKILL"))


_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|authorization|credentials?|(^|_)token)$", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact(value: Any, key: str = "") -> Any:
    """``value`` with secrets replaced by ``***``: values of keys that name a secret (api_key, token,
    password, ...) and the user:password part of URLs, so ``runs.params`` never stores a credential."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if key and _SECRET_KEY.search(key) and value not in (None, ""):
        return "***"
    if isinstance(value, str):
        return _URL_USERINFO.sub(r"\g<scheme>***@", value)
    return value


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[dict[str, Any]]) -> int:
    """Bulk insert via an Arrow table; rows whose primary key exists are skipped."""
    if not rows:
        return 0
    import pyarrow as pa

    cols = list(rows[0].keys())
    table_cols = {r[0]: r[1] for r in con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?", [table]
    ).fetchall()}
    unknown = [c for c in cols if c not in table_cols]
    if unknown:
        raise KeyError(f"table {table} has no columns {unknown}")
    arrow = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])
    before = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    con.register("_incoming", arrow)
    try:
        col_list = ", ".join(f'"{c}"' for c in cols)
        select = ", ".join(f'CAST("{c}" AS {table_cols[c]})' for c in cols)
        con.execute(f"INSERT INTO {table} ({col_list}) SELECT {select} FROM _incoming ON CONFLICT DO NOTHING")
    finally:
        con.unregister("_incoming")
    return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0] - before


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Bring the schema up to date; returns the version now in the file."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP)")
    current = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0]
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"this database is at schema version {current}, newer than this cai ({SCHEMA_VERSION}); upgrade cai"
        )
    for version, statements in MIGRATIONS:
        if version <= current:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for stmt in statements:
                con.execute(stmt)
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, now()])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        current = version
    return current
