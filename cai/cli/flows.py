"""Pipeline and Prefect: `cai run`, `cai serve`, `cai deploy`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cai.cli.common import app, console, fail


@app.command("run")
def run(run_file: Annotated[Path, typer.Argument(help="Pipeline run file (YAML), e.g. flows/demo.yaml.")],
        stages: Annotated[str | None, typer.Option(help="Comma-separated subset of the file's stages.")] = None,
        check: Annotated[bool, typer.Option("--check", help="Only validate the run file and what it needs (specs, models, engines, writable folders).")] = False) -> None:
    """Run the pipeline a run file describes, as the Prefect flow `cai_pipeline` (ephemeral mode
    unless PREFECT_API_URL points at a server)."""
    from cai.pipeline import load_pipeline
    from cai.yamlio import SpecError

    try:
        cfg = load_pipeline(run_file)
    except SpecError as e:
        fail(str(e))
    only = [s.strip() for s in stages.split(",") if s.strip()] if stages is not None else None
    if only is not None:
        unknown = [s for s in only if s not in cfg.stages]
        if unknown or not only:
            fail(f"--stages {stages!r}: {', '.join(map(repr, unknown)) or 'no stage'} is not among "
                 f"{run_file}'s stages ({', '.join(cfg.ordered_stages())})")
    from cai.pipeline import check_pipeline

    problems = check_pipeline(cfg, only)
    if problems:
        fail(f"{run_file}: {len(problems)} problem(s) before any stage starts: " + "; ".join(problems))
    if check:
        todo = [o for o in cfg.ordered_stages() if not only or o in only]
        console.print(f"{run_file}: ok; stages: {', '.join(todo)}")
        from cai.trust import ALLOW_PARAMETER, find_untrusted_code, load_judge_specs

        uses = find_untrusted_code(cfg, todo, load_judge_specs(cfg, todo))
        if uses:  # allowed here; say so before someone deploys it
            console.print(f"note: it runs code that is not cai's ({'; '.join(map(str, uses))}): fine with `cai run`, "
                          f"refused in a Prefect deployment unless the deployment sets `{ALLOW_PARAMETER}: true` "
                          "(flows/prefect.yaml)", soft_wrap=True)
        return
    from cai.pipeline import StageFailed
    from flows.pipeline import run_pipeline

    _quiet_stage_tracebacks()
    try:
        result = run_pipeline(run_file, only)
    except StageFailed as e:
        fail(f"{e} (`cai runs` shows the run; Prefect's UI or logs have the traceback)")
    except Exception as e:  # noqa: BLE001 - one line for the user; Prefect has logged the details
        fail(f"the pipeline failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
             "(`cai runs` shows which stage and why)")
    console.print_json(json.dumps(result, default=str))


def _quiet_stage_tracebacks() -> None:
    """A failed stage is reported in one line (StageFailed names the stage and the cause): keep its
    traceback out of the terminal. Prefect's API log handler (the UI) runs first and keeps it."""
    import logging

    from cai.pipeline import StageFailed

    def drop_traceback(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StageFailed):
            record.exc_info, record.exc_text = None, None
        return True

    for handler in logging.getLogger("prefect").handlers + logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and drop_traceback not in handler.filters:
            handler.addFilter(drop_traceback)


@app.command("serve")
def serve(flow: Annotated[str, typer.Argument(help="cai_pipeline | label_new_prompts | retrain_reward_model | evaluate_policy")],
          run_file: Annotated[str, typer.Option(help="Run file passed to the flow.")] = "flows/demo.yaml",
          cron: Annotated[str | None, typer.Option(help="Cron schedule, e.g. '0 2 * * *'.")] = None,
          interval: Annotated[float | None, typer.Option(help="Seconds between runs.")] = None,
          name: Annotated[str | None, typer.Option(help="Deployment name.")] = None) -> None:
    """Serve a flow on a schedule from this process (needs a Prefect server: PREFECT_API_URL)."""
    from flows import serve as serving

    try:
        serving.serve(flow, deployment=name, cron=cron, interval=interval, parameters={"run_file": run_file})
    except (KeyError, ValueError, RuntimeError) as e:
        fail(str(e))


@app.command("deploy")
def deploy(names: Annotated[list[str] | None, typer.Argument(help="Deployment names (default: all).")] = None
           ) -> None:
    """Register the scheduled deployments of flows/prefect.yaml on a process work pool."""
    from flows import serve as serving

    try:
        code = serving.deploy(names=names or None)
    except RuntimeError as e:
        fail(str(e))
    if code:
        raise typer.Exit(code)
    console.print(f"deployed; start workers with: prefect worker start --pool {serving.WORK_POOL} "
                  f"(and on a GPU machine: --pool {serving.GPU_WORK_POOL})")
