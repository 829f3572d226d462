"""Flows for the "edit a principle, see what changed, re-label, compare" loop (flows/prefect.yaml).

``relabel_changed``: diff the run file's constitution against the newest stored version of the
same name (a markdown artifact), then ``critique --changed`` and ``label --changed``: only what the
edit touched is redone, the rest is carried over (``cai.relabel``); each stage publishes its summary
as an artifact, plus one artifact that sums up the re-labelling.
``audit_constitution``: ``cai constitution audit`` against human-labelled pairs, report as an artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from cai.pipeline import load_pipeline
from cai.store import Store
from flows.pipeline import current_deployment_id, deployment_allows_untrusted_code, guard_run_file, run_stages


def relabel_markdown(diff_md: str | None, results: dict[str, Any]) -> str:
    lines = ["# Re-label what changed", ""]
    lines += [diff_md or "No other stored version of this constitution: nothing to compare with.", ""]
    for stage in ("critique", "label"):
        s = results.get(stage)
        if not isinstance(s, dict):
            continue
        ch = s.get("changed") or {}
        if stage == "label":
            lines.append(f"- **label**: {ch.get('rejudge', 0)} pairs judged again "
                         f"({', '.join(f'{k} {v}' for k, v in (ch.get('reasons') or {}).items()) or 'none'}), "
                         f"{s.get('carried', 0)} labels carried over, {ch.get('never_labelled', 0)} never labelled "
                         f"(left to a plain `cai label`), {s.get('already_done', 0)} already done.")
        else:
            lines.append(f"- **critique**: {ch.get('rounds_redone', 0)} rounds redone "
                         f"({', '.join(f'{k} {v}' for k, v in (ch.get('reasons') or {}).items()) or 'none'}), "
                         f"{s.get('carried', 0)} rounds carried over.")
    return "\n".join(lines) + "\n"


@flow(name="relabel_changed", log_prints=True)
def relabel_changed(run_file: str = "flows/demo.yaml", constitution: str | None = None,
                    critique: bool = True, allow_untrusted_code: bool = False) -> dict[str, Any]:
    """After editing the constitution: show the diff, redo only the revisions and labels it touched."""
    from cai.label import find_constitution
    from cai.versions import diff_versions, from_constitution, newest_stored

    cfg = load_pipeline(run_file)
    update = {"changed": True, **({"constitution": constitution} if constitution else {})}
    cfg.label = cfg.label.model_copy(update=update)
    cfg.critique = cfg.critique.model_copy(update=update)
    stages = (["critique"] if critique and "critique" in cfg.stages else []) + ["label"]
    guard_run_file(cfg, run_file, stages, allow_untrusted_code)  # deployed runs: no code from the run file
    store = Store(cfg.db) if cfg.db else Store()
    new = find_constitution(cfg.label.constitution)
    old = newest_stored(store, new.name, exclude=new.hash)
    diff_md = diff_versions(old, from_constitution(new)).markdown() if old else None
    if diff_md:
        create_markdown_artifact(key="cai-constitution-diff", markdown=diff_md,
                                 description=f"constitution {new.name}: what changed")
    results = run_stages(cfg, stages)
    md = relabel_markdown(diff_md, results)
    create_markdown_artifact(key="cai-relabel-changed", markdown=md, description="cai label --changed")
    get_run_logger().info(md)
    return results


@flow(name="audit_constitution", log_prints=True)
def audit_constitution(constitution: str = "constitutions/harmless.yaml",
                       against: str = "../shared/data/hh_harmless_dev.jsonl", judge: str = "multiple-choice",
                       limit: int | None = 200, db: str | None = None, batch_size: int = 16,
                       allow_untrusted_code: bool = False) -> dict[str, Any]:
    """Each principle against human-labelled pairs; the report as a markdown artifact."""
    from cai.audit import audit_against
    from cai.label import find_constitution, judge_engine, load_spec
    from cai.models import resolve_in_store
    from cai.trust import code_uses, untrusted_error

    spec = load_spec(judge)
    uses = code_uses({"engine_options": spec.engine_options}, f"judge spec {judge}")
    if uses and (dep := current_deployment_id()) and not (allow_untrusted_code and
                                                          deployment_allows_untrusted_code(dep)):
        raise untrusted_error(f"judge spec {judge}", uses, asked_per_run=allow_untrusted_code,
                              local=f"cai constitution audit --judge {judge}")
    store = Store(db) if db else Store()
    model_id, path = resolve_in_store(store, spec.model)
    report = audit_against(store, find_constitution(constitution), against, spec, judge_engine(spec, path),
                           model_id=model_id, limit=limit, batch_size=batch_size)
    create_markdown_artifact(key="cai-constitution-audit", markdown=report.markdown(),
                             description=f"principle audit of {report.constitution}")
    return {"report": report.markdown_file, "plot": report.plot, "rows": report.evaluation_rows,
            "flagged": [a.principle for a in report.principles if a.flag]}
