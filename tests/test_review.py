"""`cai review`: the API over a store the tiny-model pipeline filled (in-process), and the real server
process driven in a real headless Chromium: filters, keyboard verdicts written as `comparisons`
rows, escaping of model-written text, --read-only.

The browser tests need Debian's ``chromium`` and ``chromium-driver`` (``make browser``, which
``make test`` runs first). Without them they skip, except in CI (``CI=true``) or under ``make test``
(``CAI_REQUIRE_BROWSER=1``), where they fail.

Screenshots of the pair view go to ``tests/artifacts/`` (ignored by git; ``CAI_TEST_ARTIFACTS``
moves them); the test prints the paths.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_pipeline import tiny_run_file

from cai.pipeline import load_pipeline, run_stage
from cai.store import Store

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ARTIFACTS = Path(os.environ.get("CAI_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"><b>bold?</b>'


# ---- a store the pipeline filled ---------------------------------------------------------------
@pytest.fixture(scope="module")
def review_store(tmp_path_factory, brief_policy_dir) -> Store:
    """ingest -> generate (2 samples) -> critique -> sft -> label on the tiny policy that stops, plus one
    run whose summary names a PNG drawn from the SFT run's metrics and one naming a file outside."""
    tmp = tmp_path_factory.mktemp("review")
    stages = ["ingest", "generate", "critique", "sft", "label"]
    cfg = load_pipeline(tiny_run_file(
        tmp, brief_policy_dir, stages,
        generate={"split": "train", "limit": 6, "n": 2, "max_tokens": 12, "temperature": 1.0},
        critique={"rounds": 2, "critique_max_tokens": 10, "revision_max_tokens": 14, "max_growth": None,
                  "temperature": 1.0}))
    store = Store(cfg.db)
    produced: dict[str, str] = {}
    for s in stages:
        run_stage(s, cfg, store, produced)
    from cai.plots import plot_training_curves

    sft_run = store.scalar("SELECT run_id FROM runs WHERE stage = 'sft' AND status = 'ok'")
    inside = plot_training_curves(store, sft_run, store.path.parent / "plots" / "sft.png")
    outside = Path(tempfile.mkdtemp(prefix="cai-review-outside-")) / "secret.png"
    shutil.copy(inside, outside)
    link = store.path.parent / "plots" / "link.png"  # inside by name, outside in fact
    link.symlink_to(outside)
    run_id = store.start_run("evaluate", {"what": "plots for the review page"})
    store.finish_run(run_id, "ok", {"plots": [str(inside), str(outside), str(link), "/etc/passwd"],
                                    "report": "x.md"})
    # A pair whose texts carry markup, as a model could write them.
    with store.write() as con:
        con.execute("""
            INSERT INTO comparisons
            SELECT * REPLACE ('xss-pair' AS comparison_id, ? AS response_a, ? AS response_b,
                              'xss-a' AS response_a_id, 'xss-b' AS response_b_id,
                              TIMESTAMP '2000-01-01' AS created_at)
            FROM comparisons WHERE method <> 'human' ORDER BY comparison_id LIMIT 1""",
                    [XSS, "<i>plain</i> & </div>"])
    return store


@pytest.fixture(scope="module")
def client(review_store):
    from fastapi.testclient import TestClient

    from cai.review.app import create_app

    with TestClient(create_app(review_store, reviewer="tester")) as c:
        yield c


# ---- the API, in-process ------------------------------------------------------------------------
def test_pairs_are_paged_and_filtered_in_the_database(client, review_store):
    total = review_store.scalar("SELECT count(*) FROM comparisons WHERE method <> 'human'")
    seen = []
    for offset in range(0, total, 5):
        page = client.get("/api/pairs", params={"offset": offset, "limit": 5, "sort": "confidence_desc"}).json()
        assert page["total"] == total and len(page["rows"]) == min(5, total - offset)
        assert "response_a" not in page["rows"][0]  # the list carries no full texts
        seen += [r["comparison_id"] for r in page["rows"]]
    assert len(seen) == len(set(seen)) == total
    conf = [r["confidence"] for r in client.get("/api/pairs", params={"sort": "confidence_desc"}).json()["rows"]]
    assert conf == sorted(conf, reverse=True)

    checks = {
        "orderings_disagree": ({"orderings_disagree": "true"}, "position_consistent = false"),
        "pair_kind": ({"pair_kind": "initial_vs_revised"}, "pair_kind = 'initial_vs_revised'"),
        "confidence": ({"min_confidence": 0.5001}, "greatest(p_a, 1 - p_a) >= 0.5001"),
    }
    principle = review_store.scalar("SELECT principle_ids[1] FROM comparisons WHERE method <> 'human' LIMIT 1")
    checks["principle"] = ({"principle": principle}, f"list_contains(principle_ids, '{principle}')")
    for name, (params, where) in checks.items():
        want = review_store.scalar(f"SELECT count(*) FROM comparisons WHERE method <> 'human' AND {where}")
        got = client.get("/api/pairs", params=params).json()["total"]
        assert got == want, name
    # A tag matches the prompt's tags or the tags of one of the principles the judge asked.
    pairs = review_store.query("SELECT c.comparison_id, c.principle_ids, p.tags FROM comparisons c "
                               "JOIN prompts p USING (prompt_id) WHERE c.method <> 'human'")
    ptags = {r["principle_id"]: set(r["tags"] or []) for r in review_store.query("SELECT * FROM principles")}
    for tag in ("violence", next(iter(sorted(set().union(*ptags.values()))))):
        want = {r["comparison_id"] for r in pairs
                if tag in (r["tags"] or []) or any(tag in ptags.get(p, ()) for p in r["principle_ids"] or [])}
        got = {r["comparison_id"] for r in client.get("/api/pairs", params={"tag": tag, "limit": 200}).json()["rows"]}
        assert got == want and want, tag


def test_pair_detail_has_the_principles_question_both_orderings_and_lineage(client, review_store):
    cid = review_store.scalar("SELECT comparison_id FROM comparisons WHERE pair_kind = 'initial_vs_revised' LIMIT 1")
    d = client.get(f"/api/pairs/{cid}").json()
    question = review_store.scalar("SELECT judge FROM principles WHERE principle_id = ? AND constitution_hash = ?",
                                   [d["principle_ids"][0], d["constitution_hash"]])
    assert d["principles"][0]["question"] == question and question
    assert d["principles"][0]["label"]["p_first"] == pytest.approx(d["p_a_first"])
    assert d["p_a_swapped"] is not None and d["position_consistent"] is not None
    assert d["constitution_name"] == "harmless" and d["constitution_version"] and d["judge_spec_hash"]
    assert d["revision_id"] == d["response_b_id"]  # B is the final revision: the chain is linked
    chain = client.get(f"/api/revisions/{d['revision_id']}").json()
    assert chain["text"] == d["response_a"] and chain["rounds"]
    first = chain["rounds"][0]
    # The diff rebuilds both texts: same+del spell the initial response, same+ins the revision.
    assert "".join(t for op, t in first["diff"] if op != "ins") == chain["text"]
    assert "".join(t for op, t in first["diff"] if op != "del") == first["revision"]
    assert first["principle_id"] and first["principle_critique"]
    assert client.get("/api/revisions", params={"limit": 200}).json()["total"] == review_store.scalar(
        "SELECT count(DISTINCT (generation_id, constitution_hash, model_id, params_hash)) FROM revisions")
    assert client.get("/api/pairs/nope").status_code == 404


def test_verdicts_are_comparisons_rows_and_a_changed_mind_replaces_the_row(client, review_store):
    cid = review_store.scalar("SELECT comparison_id FROM comparisons WHERE pair_kind = 'two_samples' "
                              "ORDER BY comparison_id LIMIT 1")
    pair = review_store.query("SELECT * FROM comparisons WHERE comparison_id = ?", [cid])[0]

    def mine():
        return review_store.query("SELECT * FROM comparisons WHERE judge_name = 'human:carol'")

    assert client.post("/api/verdicts", json={"comparison_id": cid, "verdict": "skip", "reviewer": "carol"}
                       ).json() == {"written": False, "verdict": "skip"}
    assert mine() == []
    r = client.post("/api/verdicts", json={"comparison_id": cid, "verdict": "a", "reviewer": "carol"}).json()
    assert r["written"] and r["p_a"] == 1.0
    client.post("/api/verdicts", json={"comparison_id": cid, "verdict": "tie", "reviewer": "carol"})
    rows = mine()
    assert len(rows) == 1
    row = rows[0]
    assert (row["method"], row["pair_kind"], row["status"], row["p_a"]) == ("human", "human", "ok", 0.5)
    assert row["position_consistent"] is None and row["p_a_first"] is None
    assert (row["prompt_id"], row["response_a_id"], row["response_b_id"], row["response_a"]) == (
        pair["prompt_id"], pair["response_a_id"], pair["response_b_id"], pair["response_a"])
    params = json.loads(row["params"])
    assert params["reviewed_comparison_id"] == cid and params["reviewer"] == "carol"
    assert params["constitution_hash"] == pair["constitution_hash"]
    assert params["judge_spec_hash"] == pair["judge_spec_hash"] and params["time"]
    assert json.loads(row["raw_output"])["verdict"] == "tie"
    assert review_store.scalar("SELECT stage FROM runs WHERE run_id = ?", [row["run_id"]]) == "review"
    # Read like imported people's labels: a tie is in no preference, a side is.
    view = "human_preferences" if review_store.scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'human_preferences'") else "preferences"
    assert review_store.scalar(f"SELECT count(*) FROM {view} WHERE judge_name = 'human:carol'") == 0
    client.post("/api/verdicts", json={"comparison_id": cid, "verdict": "b", "reviewer": "carol"})
    assert review_store.scalar(f"SELECT count(*) FROM {view} WHERE judge_name = 'human:carol' "
                               "AND chosen_id = ?", [pair["response_b_id"]]) == 1
    assert len(mine()) == 1
    # The judge's agreement with people: one decided pair here, agreeing when the judge picked B too.
    judges = client.get("/api/agreement").json()["judges"]
    if pair["p_a"] != 0.5:
        (j,) = judges
        assert (j["judge_name"], j["n"], j["agree"]) == (pair["judge_name"], 1, int(pair["p_a"] < 0.5))
        assert 0 <= j["low"] <= j["rate"] <= j["high"] <= 1
    detail = client.get(f"/api/pairs/{cid}").json()
    assert [(v["reviewer"], v["p_a"]) for v in detail["human_verdicts"]] == [("human:carol", 0.0)]

    r = client.post("/api/verdicts", json={"comparison_id": cid, "verdict": "clear", "reviewer": "carol"}).json()
    assert r["withdrawn"] == 1 and mine() == []
    bad = client.post("/api/verdicts", json={"comparison_id": cid, "verdict": "a", "reviewer": "bob smith"})
    assert bad.status_code == 422 and "reviewer name" in bad.json()["detail"]
    assert client.post("/api/verdicts", json={"comparison_id": "nope", "verdict": "a"}).status_code == 404


def test_wilson_interval_matches_known_values():
    from cai.review.queries import wilson

    assert wilson(1, 2) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


def test_plots_are_served_only_from_the_data_and_model_folders(client, review_store):
    run_id = review_store.scalar("SELECT run_id FROM runs WHERE params LIKE '%plots for the review page%'")
    run = client.get(f"/api/runs/{run_id}").json()
    assert [p["available"] for p in run["plots"]] == [True, False, False]  # /etc/passwd is no PNG: not listed
    png = client.get(f"/api/runs/{run_id}/plots/0")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    for i in (1, 2, 3, -1):
        assert client.get(f"/api/runs/{run_id}/plots/{i}").status_code == 404
    stages = {r["stage"] for r in client.get("/api/runs", params={"limit": 200}).json()["rows"]}
    assert {"ingest", "generate", "critique", "sft", "label"} <= stages


def test_read_only_server_refuses_writes(review_store):
    from fastapi.testclient import TestClient

    from cai.review.app import create_app

    before = review_store.scalar("SELECT count(*) FROM comparisons")
    cid = review_store.scalar("SELECT comparison_id FROM comparisons WHERE method <> 'human' LIMIT 1")
    with TestClient(create_app(review_store, read_only=True, reviewer="dave")) as c:
        r = c.post("/api/verdicts", json={"comparison_id": cid, "verdict": "a"})
        assert r.status_code == 403 and "--read-only" in r.json()["detail"]
        assert c.get("/api/info").json()["read_only"] is True
    assert review_store.scalar("SELECT count(*) FROM comparisons") == before


def test_cai_review_says_what_is_wrong_before_serving(tmp_path, review_store):
    missing = subprocess.run([BIN / "cai", "review", "--db", str(tmp_path / "none.duckdb"), "--port", "1"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no store at" in missing.stderr and not (tmp_path / "none.duckdb").exists()
    bad = subprocess.run([BIN / "cai", "review", "--db", str(review_store.path), "--reviewer", "a b"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "reviewer name 'a b' is not allowed" in bad.stderr


# ---- the real server and a real browser ---------------------------------------------------------
def _need_browser() -> None:
    required = os.environ.get("CI") == "true" or os.environ.get("CAI_REQUIRE_BROWSER") == "1"
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        msg = f"browser tests need {', '.join(missing)}: run `make browser` (apt-get install chromium chromium-driver)"
        if required:
            pytest.fail(msg)
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReviewServer:
    def __init__(self, db: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = subprocess.Popen(
            [BIN / "cai", "review", "--db", str(db), "--port", str(self.port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        line = self.proc.stdout.readline()  # printed once the port is bound
        if not line.startswith("cai review: http://127.0.0.1:"):
            self.proc.kill()
            pytest.fail(f"cai review did not start: {line}{self.proc.stdout.read()}")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(prefix='cai-chromium-')}",
                 "--window-size=1500,1100"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _open(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def _wait(driver, js: str, timeout: float = 20) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(js))


def _press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def _shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / name
    driver.save_screenshot(str(out))
    print(f"screenshot: {out}")
    return out


def test_review_in_a_browser_filters_and_records_keyboard_verdicts(review_store, browser):
    from selenium.webdriver.common.by import By

    server = ReviewServer(review_store.path, "--reviewer", "alice")
    try:
        _open(browser, server.url)
        browser.find_element(By.NAME, "orderings_disagree").click()
        disagreeing = review_store.scalar(
            "SELECT count(*) FROM comparisons WHERE method <> 'human' AND position_consistent = false")
        assert disagreeing >= 2
        _wait(browser, f"return document.querySelector('#pair-pager .count').textContent.endsWith('of {disagreeing}')")
        marks = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#pair-list tbody tr td:nth-child(2)")]
        assert marks and set(marks) == {"✗"}
        _wait(browser, "return document.querySelector('#pair-detail .badge.bad')?.textContent === 'orderings disagree'")
        ids = browser.execute_script("return [...document.querySelectorAll('#pair-list tbody tr')].map(r => r.dataset.id)")
        first = browser.execute_script("return state.pairs.detail")
        assert first["comparison_id"] == ids[0]
        texts = browser.find_element(By.ID, "pair-detail").text
        assert first["principles"][0]["question"] in texts and "A shown first" in texts and "B shown first" in texts
        shot = _shot(browser, "review_pairs.png")
        assert shot.stat().st_size > 20_000

        _press(browser, "a")
        _wait(browser, "return document.querySelector('#message').textContent.startsWith('saved: A is better')")
        _wait(browser, f"return state.pairs.detail && state.pairs.detail.comparison_id === '{ids[1]}'")
        _press(browser, "b")
        _wait(browser, "return document.querySelector('#message').textContent.startsWith('saved: B is better')")
        _wait(browser, "return state.pairs.sel === 2 || state.pairs.rows.length === 2")

        rows = review_store.query("SELECT * FROM comparisons WHERE judge_name = 'human:alice' ORDER BY p_a DESC")
        assert [r["p_a"] for r in rows] == [1.0, 0.0]
        for row, cid in zip(rows, ids[:2], strict=True):
            ai = review_store.query("SELECT * FROM comparisons WHERE comparison_id = ?", [cid])[0]
            assert (row["method"], row["pair_kind"], row["status"]) == ("human", "human", "ok")
            assert (row["prompt_id"], row["response_a_id"], row["response_b_id"]) == (
                ai["prompt_id"], ai["response_a_id"], ai["response_b_id"])
            assert json.loads(row["params"])["reviewed_comparison_id"] == cid

        decided = review_store.scalar(f"SELECT count(*) FROM comparisons WHERE comparison_id IN {tuple(ids[:2])} "
                                      "AND p_a <> 0.5")
        _wait(browser, f"return document.querySelector('#agreement').textContent.includes('of {decided} reviewed')"
              if decided else "return true")
        # "judge and people disagree": exactly the pairs whose final label picks the other side.
        expect = review_store.scalar("""
            SELECT count(*) FROM comparisons c JOIN comparisons h ON h.method = 'human'
              AND h.prompt_id = c.prompt_id AND h.response_a_id = c.response_a_id AND h.response_b_id = c.response_b_id
            WHERE c.method <> 'human' AND c.p_a <> 0.5 AND (c.p_a > 0.5) <> (h.p_a > 0.5)""")
        browser.find_element(By.NAME, "orderings_disagree").click()
        browser.find_element(By.NAME, "people_disagree").click()
        _wait(browser, f"return state.pairs.total === {expect} && state.pairs.rows.every(r => r.people_disagree)")

        # The server holds no lock between requests: another process can write the store right now,
        # and while a writer holds it the server waits for it rather than failing.
        with review_store.write(timeout=5) as con:
            con.execute("SELECT 1")
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; from cai.store import Store\n"
            f"with Store({str(review_store.path)!r}).write() as con:\n"
            "    print('locked', flush=True); time.sleep(2)")], stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert holder.stdout.readline().strip() == "locked"
        import httpx

        t0 = time.monotonic()
        r = httpx.get(server.url + "api/pairs", params={"limit": 1}, timeout=30)
        assert r.status_code == 200 and r.json()["total"] > 0
        waited = time.monotonic() - t0
        assert holder.wait(timeout=30) == 0
        print(f"read while a writer held the store: answered after {waited:.1f}s")

        # Revisions: a critique chain as a diff between rounds, each with its principle.
        browser.find_element(By.CSS_SELECTOR, "button[data-tab=revisions]").click()
        _wait(browser, "return document.querySelectorAll('#revision-detail section.round').length > 0")
        head = browser.find_element(By.CSS_SELECTOR, "#revision-detail section.round h3").text
        assert head.startswith("Round 1 · principle ")
        assert browser.execute_script("return document.querySelectorAll('#revision-detail .diff ins, "
                                      "#revision-detail .diff del').length") > 0
        # Runs: statuses, summaries and the plots the stages drew (only from allowed folders).
        browser.find_element(By.CSS_SELECTOR, "button[data-tab=runs]").click()
        _wait(browser, "return document.querySelectorAll('#run-list tbody tr').length > 0")
        stages = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#run-list tbody tr td:first-child")]
        assert stages[0] == "review" and "label" in stages  # newest first: this session's verdicts
        browser.find_elements(By.CSS_SELECTOR, "#run-list tbody tr")[stages.index("evaluate")].click()
        _wait(browser, "const i = document.querySelector('#run-detail figure img'); "
                       "return i && i.complete && i.naturalWidth > 100")
        assert "not shown (missing, or outside" in browser.find_element(By.ID, "run-detail").text
    finally:
        out = server.stop()
    assert "Traceback" not in out, out
    # Stopping the server closes its review run.
    assert review_store.scalar("SELECT status FROM runs WHERE stage = 'review' AND params LIKE '%alice%'") == "ok"


def test_model_written_markup_is_shown_as_text_and_read_only_refuses(review_store, browser):
    from selenium.webdriver.common.by import By

    server = ReviewServer(review_store.path, "--read-only", "--reviewer", "erin")
    before = review_store.scalar("SELECT count(*) FROM comparisons")
    try:
        _open(browser, server.url)
        assert "read-only" in browser.find_element(By.ID, "mode").text
        # The marked-up pair is the oldest: the last row of the first page.
        browser.find_element(By.CSS_SELECTOR, "#pair-list tbody tr[data-id='xss-pair']").click()
        _wait(browser, "return state.pairs.detail && state.pairs.detail.comparison_id === 'xss-pair'")
        a = browser.find_element(By.CSS_SELECTOR, "#response-a .text")
        assert a.text == XSS  # shown character for character
        assert browser.find_element(By.CSS_SELECTOR, "#response-b .text").text == "<i>plain</i> & </div>"
        assert browser.execute_script("return window.__xss === undefined")
        assert browser.execute_script("return document.querySelectorAll('#pair-detail script, #pair-detail img, "
                                      "#pair-detail b, #pair-detail i').length") == 0
        _shot(browser, "review_escaped.png")

        _press(browser, "a")
        _wait(browser, "return document.querySelector('#message').classList.contains('error')")
        msg = browser.find_element(By.ID, "message").text
        assert "not saved: 403" in msg and "--read-only" in msg
        assert browser.execute_script("return state.pairs.detail.comparison_id") == "xss-pair"  # did not move on
    finally:
        out = server.stop()
    assert "Traceback" not in out, out
    assert review_store.scalar("SELECT count(*) FROM comparisons") == before
