"""Sharded stages on a real local Ray cluster (`ray start --head`, 2 CPUs) through Prefect's
RayTaskRunner: the rows equal an unsharded run's, and a shard whose worker process dies mid-shard
is retried with nothing lost or written twice. One cluster for the session."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cai.distributed import FAULT_ENV
from cai.generate import GenerateConfig, run_generate
from cai.ingest import ingest_file
from cai.label import LabelConfig, run_label
from cai.store import Store

pytest.importorskip("ray")
pytest.importorskip("prefect_ray")

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray head on this machine in a temporary directory; ``--block`` keeps it our child, so ending
    its process group ends the cluster (never `ray stop`, which would stop others' clusters too)."""
    tmp = Path(tempfile.mkdtemp(prefix="cairay", dir="/tmp"))  # short: Ray's socket paths have a limit
    port = free_port()
    fault = tmp / "fault"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           FAULT_ENV: str(fault), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    log = open(tmp / "ray.log", "w")  # noqa: SIM115 - open for the cluster's life
    # Ray rewrites a 127.0.0.1 address to the host's own address when a driver connects, so the head
    # binds to that address (it is this machine: nothing leaves it).
    from ray._private.services import get_node_ip_address

    host = get_node_ip_address()
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address", host,
                             "--port", str(port), "--num-cpus", "2", "--temp-dir", str(tmp / "r"),
                             "--include-dashboard", "false", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"{host}:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited: {(tmp / 'ray.log').read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                break
        time.sleep(1)
    else:
        pytest.fail("ray head did not come up in 120 s")
    yield {"address": address, "fault": fault}
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def judge_file(tmp: Path, tiny: Path) -> Path:
    text = (REPO / "judges" / "multiple-choice.yaml").read_text()
    text = text.replace("model: smollm2-135m-instruct", f"model: {tiny}").replace(
        "min_option_prob: 0.01", "min_option_prob: 0")
    out = tmp / "mc-tiny.yaml"
    out.write_text(text)
    return out


def rows(store: Store, table: str, key: str) -> dict[str, dict]:
    out = {}
    for r in store.query(f"SELECT * FROM {table}"):
        for k in ("run_id", "created_at"):
            r.pop(k)
        if "raw_output" in r:
            r["raw_output"] = json.loads(r["raw_output"])
        out[r[key]] = r
    return out


def same(a: dict, b: dict) -> bool:
    from test_sharding import close  # floats within 1e-3, everything else exactly

    return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)


def test_sharded_generate_and_label_on_ray_equal_unsharded(tmp_path, ray_cluster, tiny_policy_dir,
                                                           demo_prompt_files):
    from flows.pipeline import cai_pipeline

    judge = judge_file(tmp_path, tiny_policy_dir)
    gen = {"model": str(tiny_policy_dir), "n": 2, "max_tokens": 4, "temperature": 1.0, "limit": 6, "batch_size": 2}
    lab = {"judge": str(judge), "pairs": ["two_samples"], "batch_size": 2}
    whole = Store(tmp_path / "whole.duckdb")
    ingest_file(whole, demo_prompt_files[0], test_fraction=0.1)
    run_generate(whole, GenerateConfig(**gen), progress=False)
    run_label(whole, LabelConfig(**lab), progress=False)

    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({
        "db": str(tmp_path / "ray.duckdb"), "stages": ["ingest", "generate", "label"],
        "ingest": {"files": [str(demo_prompt_files[0])]}, "generate": gen, "label": lab,
        "runner": {"kind": "ray", "address": ray_cluster["address"], "shards": 2,
                   "resources_per_shard": {"CPU": 1}}}))
    # The first shard process to reach the end of a chunk dies (os._exit) once; it is retried.
    ray_cluster["fault"].write_text("armed")
    results = cai_pipeline(run_file=str(run_file))
    assert not ray_cluster["fault"].exists(), "the fault hook never fired: no worker was killed"
    assert results["generate"]["shards"] == 2 and results["label"]["shards"] == 2
    sharded = Store(tmp_path / "ray.duckdb")
    for table, key in (("generations", "generation_id"), ("comparisons", "comparison_id")):
        a, b = rows(whole, table, key), rows(sharded, table, key)
        assert a and same(a, b), table
    assert results["generate"]["generated"] == 12 and results["label"]["labelled"] == len(rows(whole, "comparisons",
                                                                                              "comparison_id"))
    # one ok run per stage, written by the driver; a re-run finds nothing to do
    runs = sharded.query("SELECT stage, status FROM runs WHERE stage IN ('generate', 'label')")
    assert sorted((r["stage"], r["status"]) for r in runs) == [("generate", "ok"), ("label", "ok")]
    again = cai_pipeline(run_file=str(run_file), stages=["generate"])
    assert again["generate"]["written"] == 0
