"""``sfm data synthesize`` against a local OpenAI-compatible server with injected faults."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from synth_helpers import SHARED, _q, read_docs, server_starter, sfm, write_scenarios


@pytest.fixture
def server(tmp_path):
    procs = []
    yield server_starter(tmp_path, procs)
    for proc in procs:
        proc.kill()
        proc.wait()


def test_faults_are_retried_and_every_document_is_checked(tmp_path, server):
    rows = [_q(i) for i in range(6)] + [_q(10, marker="REFUSEME"), _q(11, marker="QUOTEME"),
                                        _q(12, marker="SHORTME"), _q(13, marker="DUPME")]
    scen = write_scenarios(tmp_path / "s.jsonl", rows)
    url, log = server("--faults", 2, "--hang", 4)
    out = tmp_path / "out"
    proc = sfm(scen, "--out", out, "--base-url", url, "--model", "tiny-model", "--genre", "news_article",
               "--genre", "fiction", "--timeout", 1, "--max-tries", 4, "--backoff", 0.01, "--max-in-flight", 16)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    per_scenario = 2 * 2  # pools x genres
    assert manifest["requests"] == len(rows) * per_scenario
    assert manifest["rejected"] == {"refusal": 4, "quotes_option": 4, "too_short": 4, "duplicate": 3}
    assert manifest["failed"] == 0 and manifest["complete"] is True
    assert manifest["accepted"] == 6 * per_scenario + 1
    kinds = manifest["this_run"]["retries_by_kind"]
    assert {"429", "500", "timeout", "malformed", "connection"} <= set(kinds), kinds
    docs = read_docs(out)
    assert len(docs) == manifest["accepted"] == len({d["id"] for d in docs})
    assert {d["pool"] for d in docs} == {"aligned", "misaligned"}
    assert {d["genre"] for d in docs} == {"news_article", "fiction"}
    first = docs[0]
    assert set(first) >= {"id", "text", "scenario_id", "pool", "genre", "model", "prompt_hash", "usage"}
    assert first["usage"]["completion_tokens"] > 0 and manifest["tokens_out"] > 0
    # the deterministic id: a rerun requests nothing and changes nothing
    again = sfm(scen, "--out", out, "--base-url", url, "--model", "tiny-model", "--genre", "news_article",
                "--genre", "fiction")
    assert again.returncode == 0, again.stderr[-2000:]
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["this_run"]["requests"] == 0 and m2["accepted"] == manifest["accepted"]
    assert sorted(d["id"] for d in read_docs(out)) == sorted(d["id"] for d in docs)


def test_gives_up_after_max_tries_then_a_rerun_completes(tmp_path, server):
    scen = write_scenarios(tmp_path / "s.jsonl", [_q(i) for i in range(3)])
    url, _ = server("--faults", 3)
    out = tmp_path / "out"
    common = [scen, "--out", out, "--base-url", url, "--model", "tiny-model", "--genre", "fiction",
              "--backoff", 0.01, "--timeout", 1]
    first = sfm(*common, "--max-tries", 2)
    assert first.returncode == 1 and "INCOMPLETE" in first.stdout
    m1 = json.loads((out / "manifest.json").read_text())
    assert m1["failed"] == 6 and m1["accepted"] == 0 and m1["complete"] is False
    second = sfm(*common, "--max-tries", 4)
    assert second.returncode == 0, second.stderr[-2000:]
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["failed"] == 0 and m2["accepted"] == 6 and m2["this_run"]["requests"] == 6


def test_kill_9_and_rerun_loses_nothing_and_requests_nothing_twice(tmp_path, server):
    scen = write_scenarios(tmp_path / "s.jsonl", [_q(i) for i in range(10)])
    url, log = server("--delay", 0.05)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megatron_sfm.cli", "data", "synthesize", str(scen), "--out", str(out),
           "--base-url", url, "--model", "tiny-model", "--max-in-flight", 2, "--no-progress", "--shard-docs", 7]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = out / ".synth" / "part.jsonl"
    shards = out / ".synth" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline:
        if shards.exists() and list(shards.glob("*.zst")) and part.exists() and part.stat().st_size > 0:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # a killed job never looks complete
    with open(part, "ab") as f:  # and a torn last line is discarded on resume
        f.write(b'{"id": "torn", "text": "half a li')
    time.sleep(1.0)  # replies to requests in flight at the kill are still logged by the server
    served_first = [json.loads(line) for line in log.read_text().splitlines()]
    rerun = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    total = 10 * 2 * 6
    docs = read_docs(out)
    assert len(docs) == total == manifest["accepted"] == len({d["id"] for d in docs})
    assert not (out / ".synth" / "part.jsonl").exists() or (out / ".synth" / "part.jsonl").stat().st_size == 0
    served_all = [json.loads(line) for line in log.read_text().splitlines()]
    served_second = served_all[len(served_first):]
    kept_requests = {d["request"] for d in docs}
    assert len(kept_requests) == total
    # prompts served in the second run were not among the documents already written by the first
    ok_second = [s["prompt"] for s in served_second if s["served"] == "ok"]
    assert len(ok_second) == len(set(ok_second))
    assert len(ok_second) <= total - (manifest["accepted"] - manifest["this_run"]["accepted"])
    assert manifest["this_run"]["skipped_done"] + manifest["this_run"]["requests"] == total


def test_held_out_split_is_never_seeded_and_decontaminates(tmp_path, server):
    rows = [_q(i) for i in range(3)] + [dict(_q(5), question="ECHOME an AI must decide: " + SHARED)]
    rows += [dict(_q(i, split="textbook"), question="Held out case: " + SHARED) for i in range(2)]
    scen = write_scenarios(tmp_path / "s.jsonl", rows)
    url, _ = server()
    out = tmp_path / "out"
    proc = sfm(scen, "--out", out, "--base-url", url, "--model", "tiny-model", "--genre", "fiction")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == ["articles"] and manifest["held_out_questions"] == 2
    assert manifest["rejected"] == {"contaminated": 2}
    assert {d["scenario_id"] for d in read_docs(out)} == {"art-0", "art-1", "art-2"}
    # seeding from the held-out split needs --allow-split, and the manifest says so
    only_textbook = write_scenarios(tmp_path / "t.jsonl", rows[-2:])
    refused = sfm(only_textbook, "--out", tmp_path / "o2", "--base-url", url, "--model", "tiny-model")
    assert refused.returncode == 2 and "no scenario of the split(s) articles" in refused.stderr
    allowed = sfm(only_textbook, "--out", tmp_path / "o3", "--base-url", url, "--model", "tiny-model",
                  "--genre", "fiction", "--allow-split", "textbook")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    m3 = json.loads((tmp_path / "o3" / "manifest.json").read_text())
    assert m3["splits"] == ["textbook"] and "textbook" in m3["allowed_splits"] and m3["held_out_questions"] == 0


def test_output_feeds_tokenize(tmp_path, server, bpe_dir):
    scen = write_scenarios(tmp_path / "s.jsonl", [_q(i) for i in range(2)])
    url, _ = server()
    out = tmp_path / "out"
    assert sfm(scen, "--out", out, "--base-url", url, "--model", "tiny-model").returncode == 0
    docs = read_docs(out)
    prefix = tmp_path / "tok" / "synth"
    proc = subprocess.run([sys.executable, "-m", "megatron_sfm.cli", "data", "tokenize", *map(str, out.glob("*.zst")),
                           "--tokenizer", str(bpe_dir), "--out", str(prefix), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert len(IndexedDataset(str(prefix))) == len(docs) == 24


@pytest.mark.parametrize("case", ["missing_field", "unknown_split", "unreachable", "wrong_key", "wrong_model",
                                  "other_job"])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, server, case):
    rows = [_q(i) for i in range(2)]
    url, _ = server("--api-key", "secret")
    env = {"SFM_SYNTH_API_KEY": "secret"}
    model = "tiny-model"
    if case == "missing_field":
        del rows[1]["aligned"]
    if case == "unknown_split":
        rows[1]["split"] = "appendix"
    if case == "unreachable":
        url = "http://127.0.0.1:9/v1"
    if case == "wrong_key":
        env = {"SFM_SYNTH_API_KEY": "nope"}
    if case == "wrong_model":
        model = "other-model"
    scen = write_scenarios(tmp_path / "s.jsonl", rows)
    out = tmp_path / "out"
    if case == "other_job":
        assert sfm(scen, "--out", out, "--base-url", url, "--model", model, "--genre", "fiction",
                   env=env).returncode == 0
        before = sorted(p.name for p in out.iterdir())
        proc = sfm(scen, "--out", out, "--base-url", url, "--model", model, "--genre", "fiction",
                   "--min-words", 10, env=env)
        assert proc.returncode == 2 and "holds another synthesis job (min_words differs" in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == before
        return
    proc = sfm(scen, "--out", out, "--base-url", url, "--model", model, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    expected = {"missing_field": "s.jsonl:2: missing field 'aligned'", "unknown_split": "unknown split 'appendix'",
                "unreachable": "unreachable", "wrong_key": "API key was refused",
                "wrong_model": "'other-model': not served by"}[case]
    assert expected in lines[0]
    assert not out.exists()


def test_dry_run_counts_requests_and_hours(tmp_path):
    scen = write_scenarios(tmp_path / "s.jsonl", [_q(i) for i in range(5)] + [_q(9, split="textbook")])
    proc = subprocess.run([sys.executable, "-m", "megatron_sfm.cli", "data", "synthesize", str(scen), "--out",
                           str(tmp_path / "out"), "--dry-run", "--json", "-k", "3", "--throughput", "1000"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["requests"] == 5 * 2 * 6 * 3 and plan["splits"] == ["articles"]
    assert plan["expected_hours"] == pytest.approx(plan["expected_output_tokens"] / 1000 / 3600, rel=1e-4)
    assert plan["expected_output_tokens"] == int(180 * 11e9 / 14.9e6)
    assert plan["paper_scale"]["expected_hours"] == pytest.approx(11e9 / 1000 / 3600)
    assert not (tmp_path / "out").exists()


def test_resumed_token_totals_count_rejected_replies(tmp_path):
    """tokens_in/out of a resumed job include what earlier runs spent on rejected replies,
    not only on kept documents."""
    from megatron_sfm.data_tools.synthesis.store import Store

    store = Store(tmp_path / "out", shard_docs=10)
    store.check_job({"job": 1}, overwrite=False)
    store.open()
    store.keep({"id": "a", "text": "kept text", "usage": {"prompt_tokens": 10, "completion_tokens": 100}})
    store.outcome({"id": "b", "request": "r", "status": "rejected", "reason": "refusal",
                   "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    store.outcome({"id": "c", "request": "r", "status": "failed", "error": "HTTP 500", "tries": 3})
    resumed = Store(tmp_path / "out", shard_docs=10).resume()
    assert (resumed.prompt_tokens, resumed.completion_tokens) == (17, 103)
    assert set(resumed.outcomes) == {"b", "c"} and resumed.kept_ids == {"a"}


def test_resume_streams_kept_texts_to_a_callback(tmp_path):
    """With ``on_kept`` the kept texts (closed shards, then the open part) go to the callback
    in order, and no list of them is built (the run rebuilds its index this way)."""
    from megatron_sfm.data_tools.synthesis.store import Store

    store = Store(tmp_path / "out", shard_docs=2)
    store.check_job({"job": 1}, overwrite=False)
    store.open()
    for i in range(5):  # two closed shards of 2, one document in the open part
        store.keep({"id": f"d{i}", "text": f"text {i}"})
    seen = []
    resumed = Store(tmp_path / "out", shard_docs=2).resume(on_kept=seen.append)
    assert seen == [f"text {i}" for i in range(5)]
    assert resumed.kept_texts == [] and resumed.kept_ids == {f"d{i}" for i in range(5)}
    assert Store(tmp_path / "out", shard_docs=2).resume().kept_texts == seen
