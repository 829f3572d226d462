"""The review server: a JSON API over the store and the static page that reads it.

The store is opened per request and closed before the response goes out, read-only for every
read, exactly like the pipeline's open-per-batch writes (``cai.store``): a pipeline can keep
writing to the same file while someone reviews it, each side waiting briefly for the other's lock.
One request at a time touches the file: in one process DuckDB refuses a read-write connection
while a read-only one to the same file is open, and these queries take milliseconds.

Only verdicts are written (``POST /api/verdicts``); with ``read_only`` every write answers 403.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import duckdb
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from cai.review import queries
from cai.review.files import allowed_roots, plot_paths, servable
from cai.review.verdicts import VerdictError, check_reviewer, delete_verdict, upsert_verdict, verdict_row
from cai.store import Store, StoreLockedError, now

STATIC = Path(__file__).parent / "static"
READ_ONLY_MESSAGE = "this review server was started with --read-only: verdicts are not written"
# Defence in depth behind the page's textContent-only rendering: no inline script, nothing from
# another origin, so even a model-written "<script>" that slipped into markup could not run.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


class VerdictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comparison_id: str
    verdict: Literal["a", "b", "tie", "skip", "clear"]
    reviewer: str | None = None


class ReviewState:
    """What the endpoints share: the store, one lock around it, and this session's run row."""

    def __init__(self, store: Store, *, read_only: bool, reviewer: str):
        self.store = store
        self.read_only = read_only
        self.reviewer = reviewer
        self.lock = threading.Lock()
        self.run_id: str | None = None
        self.written = 0
        self.withdrawn = 0

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.lock, self.store.read() as con:
            yield con

    def ensure_run(self) -> str:
        """A ``runs`` row for this review session, made at its first verdict (a session that only
        reads leaves no trace)."""
        if self.run_id is None:
            self.run_id = self.store.start_run("review", {"reviewer": self.reviewer, "pid": os.getpid(),
                                                          "db": str(self.store.path)})
        return self.run_id

    def finish(self) -> None:
        if self.run_id is not None:
            self.store.finish_run(self.run_id, "ok", {"verdicts_written": self.written,
                                                      "verdicts_withdrawn": self.withdrawn})


def create_app(store: Store, *, read_only: bool = False, reviewer: str = "reviewer") -> FastAPI:
    state = ReviewState(store, read_only=read_only, reviewer=check_reviewer(reviewer))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        with state.lock:
            state.finish()

    app = FastAPI(title="cai review", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = state

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(StoreLockedError)
    async def locked(_: Request, e: StoreLockedError) -> JSONResponse:
        return JSONResponse({"detail": f"the store is busy (a pipeline stage is writing): {e}"}, status_code=503)

    # ---- page ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        with state.read() as con:
            facets = queries.facets(con)
        return {"db": str(store.path), "read_only": read_only, "reviewer": state.reviewer,
                "read_only_message": READ_ONLY_MESSAGE if read_only else None, **facets}

    # ---- pairs -----------------------------------------------------------------------------
    @app.get("/api/pairs")
    def pairs(principle: str | None = None, tag: str | None = None, pair_kind: str | None = None,
              judge: str | None = None, status: str | None = None,
              min_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
              max_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
              orderings_disagree: bool = False, people_disagree: bool = False,
              reviewed: Literal["any", "yes", "no"] = "any",
              sort: queries.Sort = "newest", offset: Annotated[int, Query(ge=0)] = 0,
              limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 50,
              reviewer: str | None = None) -> dict[str, Any]:
        f = queries.PairFilter(principle=principle or None, tag=tag or None, pair_kind=pair_kind or None,
                               judge=judge or None, status=status or None, min_confidence=min_confidence,
                               max_confidence=max_confidence, orderings_disagree=orderings_disagree,
                               people_disagree=people_disagree, reviewed=reviewed, sort=sort)
        who = _judge_name(reviewer or state.reviewer)
        with state.read() as con:
            return queries.list_pairs(con, f, offset=offset, limit=limit, reviewer=who)

    @app.get("/api/pairs/{comparison_id}")
    def pair(comparison_id: str) -> dict[str, Any]:
        with state.read() as con:
            found = queries.pair_detail(con, comparison_id)
        if found is None:
            raise HTTPException(404, f"no comparison {comparison_id!r} in {store.path}")
        return found

    @app.get("/api/agreement")
    def agreement() -> dict[str, Any]:
        with state.read() as con:
            return {"judges": queries.agreement(con)}

    # ---- verdicts --------------------------------------------------------------------------
    @app.post("/api/verdicts")
    def verdict(body: VerdictIn) -> dict[str, Any]:
        if read_only:
            raise HTTPException(403, READ_ONLY_MESSAGE)
        if body.verdict == "skip":
            return {"written": False, "verdict": "skip"}
        try:
            who = check_reviewer(body.reviewer or state.reviewer)
        except VerdictError as e:
            raise HTTPException(422, str(e)) from e
        with state.lock:
            with store.read() as con:
                reviewed = queries.reviewed_pair(con, body.comparison_id)
            if reviewed is None:
                raise HTTPException(404, f"no comparison {body.comparison_id!r} in {store.path}")
            if reviewed["method"] == "human":
                raise HTTPException(422, "that row is a person's verdict; review the AI's pair instead")
            if body.verdict == "clear":
                with store.write() as con:
                    n = delete_verdict(con, reviewed, who)
                state.withdrawn += n
                return {"written": False, "verdict": "clear", "withdrawn": n}
            run_id = state.ensure_run()
            row = verdict_row(reviewed, body.verdict, who, at=now(), run_id=run_id)
            with store.write() as con:
                upsert_verdict(con, row)
            state.written += 1
        return {"written": True, "verdict": body.verdict, "comparison_id": row["comparison_id"],
                "judge_name": row["judge_name"], "p_a": row["p_a"]}

    # ---- critique chains -------------------------------------------------------------------
    @app.get("/api/revisions")
    def revisions(principle: str | None = None, status: str | None = None,
                  offset: Annotated[int, Query(ge=0)] = 0,
                  limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 50) -> dict[str, Any]:
        with state.read() as con:
            return queries.list_chains(con, principle=principle or None, status=status or None,
                                       offset=offset, limit=limit)

    @app.get("/api/revisions/{revision_id}")
    def chain(revision_id: str) -> dict[str, Any]:
        with state.read() as con:
            found = queries.chain_detail(con, revision_id)
        if found is None:
            raise HTTPException(404, f"no revision {revision_id!r} in {store.path}")
        return found

    # ---- runs and their plots --------------------------------------------------------------
    @app.get("/api/runs")
    def runs(stage: str | None = None, offset: Annotated[int, Query(ge=0)] = 0,
             limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 50) -> dict[str, Any]:
        with state.read() as con:
            return queries.list_runs(con, stage=stage or None, offset=offset, limit=limit)

    def _plots(con: duckdb.DuckDBPyConnection, summary: Any) -> list[tuple[str, Path | None]]:
        roots = allowed_roots(store.path, queries.model_paths(con))
        bases = [Path.cwd(), store.path.resolve().parent, store.path.resolve().parent.parent]
        return [(p, servable(p, roots, bases)) for p in plot_paths(summary)]

    @app.get("/api/runs/{run_id}")
    def run(run_id: str) -> dict[str, Any]:
        with state.read() as con:
            found = queries.run_detail(con, run_id)
            if found is None:
                raise HTTPException(404, f"no run {run_id!r} in {store.path}")
            found["plots"] = [{"path": p, "index": i, "available": real is not None}
                              for i, (p, real) in enumerate(_plots(con, found["summary"]))]
        return found

    @app.get("/api/runs/{run_id}/plots/{index}")
    def run_plot(run_id: str, index: int) -> FileResponse:
        with state.read() as con:
            found = queries.run_detail(con, run_id)
            plots = _plots(con, found["summary"]) if found else []
        if not 0 <= index < len(plots) or plots[index][1] is None:
            raise HTTPException(404, "no such plot, or it is outside the data and model folders")
        return FileResponse(plots[index][1], media_type="image/png")

    return app


def _judge_name(reviewer: str) -> str:
    try:
        return "human:" + check_reviewer(reviewer)
    except VerdictError as e:
        raise HTTPException(422, str(e)) from e
