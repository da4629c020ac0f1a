"""``sfm launch slurm-data`` against the real two-node SLURM cluster of conftest.py.

Four array tasks over two nodes (2 CPUs each) for filter and tokenize, compared with a
single-process run; one task cancelled (scancel) after writing its outputs and before
committing them, and the resubmission of the same command redoing only that task; two
synthesize tasks against the fake OpenAI server on this host, whose replies repeat across
the tasks, merged without the later copies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron_sfm.launch import data_jobs as dj

from .conftest import job_info, wait_for_job, wait_until
from .test_data_jobs import _synthesis_fixtures, documents, make_inputs, make_tokenizer, tree_bytes

SFM = [sys.executable, "-m", "megatron_sfm.cli"]


def _submit(cwd: Path, *args: str) -> tuple[str | None, str]:
    """Run ``sfm launch slurm-data``; return (array job id or None, merge job id)."""
    proc = subprocess.run(SFM + ["launch", "slurm-data", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    array = merge = None
    for line in proc.stdout.splitlines():
        if line.startswith("submitted array job "):
            array = line.split()[3].rstrip(":")
        if line.startswith("submitted merge job "):
            merge = line.split()[3].rstrip(":")
    assert merge is not None, proc.stdout
    return array, merge


def _nodes(out: Path) -> set[str]:
    return {json.loads(p.read_text())["node"] for p in (out / "tasks").glob("*/DONE")}


def test_filter_array_on_two_nodes_equals_one_process(slurm_cluster, tmp_path):
    from megatron_sfm.data_tools.filter import run_filter

    inputs = make_inputs(tmp_path, shards=8)
    single = run_filter([str(inputs)], tmp_path / "single", progress=False)
    array, merge = _submit(tmp_path, "filter", str(inputs), "--out", "run", "--tasks", "4", "--time", "00:05:00")
    out = tmp_path / "run"
    info = wait_for_job(merge, timeout=180, log=next(iter((out / "jobs").glob("merge-*.out")), None))
    logs = "".join(p.read_text() for p in (out / "jobs").glob("*.out"))
    assert info["JobState"] == "COMPLETED", logs
    assert job_info(array)["JobState"] == "COMPLETED"
    merged = json.loads((out / "report.json").read_text())
    assert merged.pop("slurm_data")["tasks"] == 4
    assert merged == single
    for part in ("kept", "flagged"):
        assert tree_bytes(out / part) == tree_bytes(tmp_path / "single" / part)
    assert len(_nodes(out)) == 2, logs  # 4 one-CPU tasks on two 2-CPU nodes
    # the same command again: nothing left to do
    proc = subprocess.run(SFM + ["launch", "slurm-data", "filter", str(inputs), "--out", "run", "--tasks", "4",
                                 "--time", "00:05:00"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "nothing to submit" in proc.stdout


def test_tokenize_task_cancelled_before_commit_is_redone_by_the_resubmission(slurm_cluster, tmp_path):
    from megatron_sfm.data_tools.tokenize_corpus import tokenize_to_indexed

    inputs = make_inputs(tmp_path, shards=8)
    tok = make_tokenizer(tmp_path)
    tokenize_to_indexed([str(inputs)], tok, tmp_path / "single", progress=False)
    args = ["tokenize", str(inputs), "--out", "run", "--tasks", "4", "--array-parallelism", "4",
            "--time", "00:05:00"]
    array, merge = _submit(tmp_path, *args, "--env", f"{dj.PAUSE_ENV}=6", "--", "--tokenizer", str(tok))
    out = tmp_path / "run"
    log1 = out / "jobs" / f"task-1-{array}.out"
    wait_until(lambda: log1.exists() and "pausing" in log1.read_text(), 120, "task 1 to write its outputs")
    subprocess.run(["scancel", f"{array}_1"], check=True)
    merge_info = wait_for_job(merge, timeout=120)
    assert merge_info["JobState"] == "CANCELLED"  # afterok never satisfied: --kill-on-invalid-dep
    wait_until(lambda: all(job_info(f"{array}_{i}")["JobState"] in ("COMPLETED", "CANCELLED") for i in range(4)),
               120, "the array to end")
    assert job_info(f"{array}_1")["JobState"] == "CANCELLED"
    assert not (out / "tasks" / "00001").exists() and not (out / "report.json").exists()
    plan = dj.read_plan(out)
    assert dj.missing_tasks(out, plan) == [1]

    _, merge2 = _submit(tmp_path, *args, "--", "--tokenizer", str(tok))
    info = wait_for_job(merge2, timeout=180)
    logs = "".join(p.read_text() for p in (out / "jobs").glob("*.out"))
    assert info["JobState"] == "COMPLETED", logs
    subs = json.loads((out / "jobs" / "submissions.json").read_text())
    assert "--array=1%4" in subs[1]["argv"][0]  # only the cancelled task ran again
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["00000", "00001", "00002", "00003"]
    prefixes = json.loads((out / "prefixes.json").read_text())["prefixes"]
    assert documents(prefixes) == documents([str(tmp_path / "single")])  # nothing lost, nothing twice
    single = json.loads((tmp_path / "single.stats.json").read_text())
    assert json.loads((out / "report.json").read_text())["tokens"] == single["num_tokens"]


def test_synthesize_array_against_a_local_server_merges_without_cross_task_duplicates(slurm_cluster, tmp_path):
    h = _synthesis_fixtures()
    # task 0 gets scenarios 0-2, task 1 gets 3-5; the server answers every SAMEME request with one text
    # and every NEARME request with one text plus a word of its own, in whichever task it comes
    marks = ["SAMEME", "NEARME", "", "SAMEME", "NEARME", ""]
    rows = [h._q(i, marker=m) for i, m in enumerate(marks)] + [h._q(100, split="textbook")]
    scen = h.write_scenarios(tmp_path / "s.jsonl", rows)
    procs: list = []
    try:
        url, server_log = h.server_starter(tmp_path, procs)()
        args = ["synthesize", str(scen), "--out", "run", "--tasks", "2", "--time", "00:05:00", "--",
                "--base-url", url, "--model", "tiny-model", "--genre", "fiction", "--backoff", "0.01"]
        array, merge = _submit(tmp_path, *args)
        out = tmp_path / "run"
        info = wait_for_job(merge, timeout=180, log=next(iter((out / "jobs").glob("merge-*.out")), None))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    logs = "".join(p.read_text() for p in (out / "jobs").glob("*.out"))
    assert info["JobState"] == "COMPLETED", logs
    assert all(job_info(f"{array}_{i}")["JobState"] == "COMPLETED" for i in range(2)), logs
    served = [json.loads(line) for line in server_log.read_text().splitlines()]
    assert len(served) == len({s["prompt"] for s in served}) == 12  # 6 scenarios x 2 pools, each asked once
    tasks = [h.read_docs(out / "tasks" / f"{i:05d}") for i in range(2)]
    assert [len(t) for t in tasks] == [4, 4]  # each task kept one SAMEME and one NEARME reply of its two
    docs = h.read_docs(out / "merged")
    later_copies = {d["id"] for d in tasks[1] if d["scenario_id"] in ("art-3", "art-4")}
    assert len(later_copies) == 2
    assert [d["id"] for d in docs] == [d["id"] for t in tasks for d in t if d["id"] not in later_copies]
    report = json.loads((out / "report.json").read_text())
    assert report["across_tasks"]["dropped"] == {"duplicate": 1, "near_duplicate": 1}
    assert report["accepted"] == len(docs) == 6 and report["complete"] is True
    assert report["rejected"] == {"duplicate": 3, "near_duplicate": 3}  # 1 in each task + 1 across, each
    assert report["held_out_questions"] == 1 and report["slurm_data"]["tasks"] == 2
    assert report["shards"] == [str(out / "merged" / f"shard-0000{i}.jsonl.zst") for i in range(2)]
