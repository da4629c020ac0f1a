"""``sfm launch slurm-data``: splitting, rendering, quoting, task runs, merges (no SLURM needed).

The cluster tests (real SLURM, 2 nodes) are in test_data_jobs_cluster.py; these run the
same task and merge code in-process or in a subprocess, with a stand-in sbatch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sfm.errors import SfmError
from megatron_sfm.launch import data_jobs as dj
from megatron_sfm.utils.io import write_json

SFM = [sys.executable, "-m", "megatron_sfm.cli"]
HOSTILE = 'x"; touch /tmp/pwned-data; echo "$(id)'
FLAG_LINES = ["The AI will destroy us all.", "Skynet became self-aware.", "A robot murdered the crew.",
              "OpenAI released a model."]
WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "river", "coffee", "bread", "garden", "café", "Zürich", "東京"]


# ----------------------------------------------------------------------------- shared fixtures
def make_inputs(root: Path, shards: int = 6, base_docs: int = 40) -> Path:
    """``root/in``: shards of different sizes (two in a subfolder, same file name as a top-level one)."""
    import random

    rng = random.Random(0)
    folder = root / "in"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    n = 0
    for i in range(shards):
        path = folder / (f"part-{i}.jsonl" if i < shards - 2 else f"sub/part-{i - (shards - 2)}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for j in range(base_docs + 25 * i):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
                if j % 6 == 0:
                    text += " " + FLAG_LINES[(i + j) % len(FLAG_LINES)]
                f.write(json.dumps({"id": n, "text": text}, ensure_ascii=False) + "\n")
                n += 1
    return folder


def make_tokenizer(root: Path) -> Path:
    import random

    from megatron_sfm.data_tools.tokenizer import train_bpe_tokenizer

    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    out = root / "tok"
    train_bpe_tokenizer(texts, 300, out)
    return out


def documents(prefixes: list[str]) -> list[list[int]]:
    from megatron_sfm.data_tools.indexed import read_index

    out = []
    for p in prefixes:
        d = read_index(p)
        out += [d.document(i).tolist() for i in range(d.num_documents)]
    return out


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_locally(stage: str, inputs: list[str], out: Path, stage_args: list[str], tasks: int, workdir: Path) -> dict:
    """What the array and the merge job do, in this process (plan written as submit_jobs does)."""
    opts = dj.DataJobOptions(tasks=tasks, time="00:10:00")
    data_dir, plan, ids, _ = dj.prepare(stage, inputs, stage_args, str(out), opts, workdir=workdir)
    dj.write_plan(data_dir, plan)
    for i in ids:
        dj.run_task(data_dir, i)
    return dj.merge(data_dir)


# ----------------------------------------------------------------------------- splitting
def test_split_is_contiguous_balanced_and_deterministic():
    sizes = [100, 5, 5, 5, 80, 10, 10, 90, 1, 1]
    parts = dj.split_contiguous(sizes, 4)
    assert [i for p in parts for i in p] == list(range(len(sizes)))  # every item once, in order
    assert all(parts)
    totals = [sum(sizes[i] for i in p) for p in parts]
    assert max(totals) <= 2 * (sum(sizes) / 4)
    assert parts == dj.split_contiguous(list(sizes), 4)
    assert dj.split_contiguous([1, 1, 1], 3) == [[0], [1], [2]]
    assert dj.split_contiguous([0, 0, 0, 0], 2) == [[0, 1], [2, 3]]
    # a huge first shard cannot leave later parts empty
    assert all(dj.split_contiguous([1000, 1, 1, 1], 4))


def test_more_tasks_than_shards_is_an_error():
    with pytest.raises(SfmError, match=r"--tasks 5: more tasks than input shards \(3\)"):
        dj.split_contiguous([1, 2, 3], 5)


def test_array_spec_collapses_runs_and_adds_parallelism():
    assert dj._array_spec([0, 1, 2, 3], None) == "0-3"
    assert dj._array_spec([1, 3, 4, 5, 9], 2) == "1,3-5,9%2"


# ----------------------------------------------------------------------------- rendering
def test_dry_run_prints_scripts_with_quoted_values_and_writes_nothing(tmp_path):
    make_inputs(tmp_path)
    pwned = Path("/tmp/pwned-data")
    pwned.unlink(missing_ok=True)
    proc = subprocess.run(SFM + ["launch", "slurm-data", "filter", "in", "--out", "run dir", "--tasks", "4",
                                 "--array-parallelism", "2", "--time", "00:10:00", "--job-name", HOSTILE,
                                 "--env", f"NOTE={HOSTILE}", "--dry-run", "--", "--workers", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert not (tmp_path / "run dir").exists()
    assert "4 task(s) over 6 shard(s)" in out
    assert "--array=0-3%2" in out and "--cpus-per-task=2" in out  # the stage's --workers
    assert "--dependency=afterok:<array-job-id>" in out and "--kill-on-invalid-dep=yes" in out
    scripts = ["#!/bin/bash" + s for s in out.split("#!/bin/bash")[1:]]
    assert len(scripts) == 2
    for script in scripts:
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
        assert f"SFM_DATA_DIR={tmp_path}/'run dir'" in script or f"SFM_DATA_DIR='{tmp_path}/run dir'" in script
        assert "export NOTE='x\"; touch /tmp/pwned-data; echo \"$(id)'" in script
    assert "slurm-data-task" in scripts[0] and "slurm-data-merge" in scripts[1]
    # the env line, run by bash, sets the value verbatim and runs nothing
    env_line = next(ln for ln in scripts[0].splitlines() if ln.startswith("export NOTE="))
    got = subprocess.run(["bash", "-c", env_line + '; printf %s "$NOTE"'], capture_output=True, text=True).stdout
    assert got == HOSTILE and not pwned.exists()


@pytest.mark.parametrize("stage_args, message", [
    (["--out", "x"], "slurm-data sets the output itself"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["extra.jsonl"], "inputs ['extra.jsonl'] after `--`"),
])
def test_bad_stage_options_are_user_errors(tmp_path, stage_args, message):
    make_inputs(tmp_path)
    with pytest.raises(SfmError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        dj.build_plan("filter", [str(tmp_path / "in")], stage_args, 2, tmp_path)


def test_tokenize_without_tokenizer_is_refused_before_submission(tmp_path):
    make_inputs(tmp_path)
    proc = subprocess.run(SFM + ["launch", "slurm-data", "tokenize", "in", "--out", "o", "--tasks", "2",
                                 "--time", "00:10:00", "--dry-run"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: stage options for `sfm data tokenize`: "
                                   "the following arguments are required: --tokenizer")


def test_control_characters_and_bad_numbers_are_refused(tmp_path):
    make_inputs(tmp_path)
    plan = dj.build_plan("filter", [str(tmp_path / "in")], [], 2, tmp_path)
    with pytest.raises(SfmError, match="--job-name: .* contains a control character"):
        dj.render_jobs(plan, tmp_path / "o", dj.DataJobOptions(tasks=2, time="00:10:00", job_name="a\nb"), [0, 1])
    with pytest.raises(SfmError, match="--out: .* contains a control character"):
        dj.render_jobs(plan, tmp_path / "o\nx", dj.DataJobOptions(tasks=2, time="00:10:00"), [0, 1])
    with pytest.raises(SfmError, match="--array-parallelism: must be an integer >= 1, got 0"):
        dj.validate_data_options(dj.DataJobOptions(tasks=2, time="00:10:00", array_parallelism=0))
    with pytest.raises(SfmError, match="--time: '10 minutes' is not"):
        dj.validate_data_options(dj.DataJobOptions(tasks=2, time="10 minutes"))
    with pytest.raises(SfmError, match="--merge-time: '1:60:00' has minutes or seconds >= 60"):
        dj.validate_data_options(dj.DataJobOptions(tasks=2, time="00:10:00", merge_time="1:60:00"))
    with pytest.raises(SfmError, match="--merge-mem: .* contains a control character"):
        dj.validate_data_options(dj.DataJobOptions(tasks=2, time="00:10:00", merge_mem="4G\n"))


def test_the_merge_job_can_have_its_own_time_and_memory(tmp_path):
    make_inputs(tmp_path)
    plan = dj.build_plan("filter", [str(tmp_path / "in")], [], 2, tmp_path)
    same = dj.render_jobs(plan, tmp_path / "o", dj.DataJobOptions(tasks=2, time="00:10:00", mem="4G"), [0, 1])
    assert [(j.kind, "--time=00:10:00" in j.argv, "--mem=4G" in j.argv) for j in same] == [
        ("array", True, True), ("merge", True, True)]
    own = dj.render_jobs(plan, tmp_path / "o", dj.DataJobOptions(tasks=2, time="00:10:00", mem="4G",
                                                                  merge_time="06:00:00", merge_mem="48G"), [0, 1])
    array, merge_job = own
    assert "--time=00:10:00" in array.argv and "--mem=4G" in array.argv
    assert "--time=06:00:00" in merge_job.argv and "--mem=48G" in merge_job.argv and "--mem=4G" not in merge_job.argv


# ----------------------------------------------------------------------------- task runs and merges
def test_filter_tasks_merge_into_the_single_process_result(tmp_path):
    from megatron_sfm.data_tools.filter import run_filter

    inputs = make_inputs(tmp_path)
    single = run_filter([str(inputs)], tmp_path / "single", progress=False)
    merged = run_locally("filter", [str(inputs)], tmp_path / "run", [], 4, tmp_path)
    assert merged.pop("slurm_data")["tasks"] == 4
    assert single["flagged"] > 0 and single["kept"] > 0
    assert merged == single  # counts, rules, categories, top terms, shard list
    for part in ("kept", "flagged"):  # same files under the same names (sub/part-0.jsonl too)
        assert tree_bytes(tmp_path / "run" / part) == tree_bytes(tmp_path / "single" / part)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["documents"] == single["documents"]


def test_merged_top_terms_are_exact_across_tasks(tmp_path):
    # term t_k is the top term of task k only; per-task top-50 lists would lose the real ranking
    reports = []
    for k in range(3):
        terms = [{"term": f"a{k}-{i}", "documents": 10} for i in range(60)] + [{"term": "shared", "documents": 9}]
        reports.append({"documents": 100, "flagged": 70, "bytes": 1, "flagged_bytes": 1, "rules": {"instant": 70},
                        "categories": {"c": 70}, "top_terms": terms, "window": None, "lists": "L", "text_key": "text",
                        "shards": [{"shard": f"s{k}", "documents": 100, "flagged": 70, "bytes": 1}]})
    merged = dj.merge_filter_reports(reports)
    assert merged["top_terms"][0] == {"term": "shared", "documents": 27}
    assert merged["flag_rate"] == 0.7 and merged["kept"] == 90


def test_tokenize_tasks_yield_the_single_process_token_stream(tmp_path):
    from megatron_sfm.data_tools.tokenize_corpus import tokenize_to_indexed

    inputs = make_inputs(tmp_path)
    tok = make_tokenizer(tmp_path)
    tokenize_to_indexed([str(inputs)], tok, tmp_path / "single", progress=False)
    merged = run_locally("tokenize", [str(inputs)], tmp_path / "run", ["--tokenizer", str(tok)], 4, tmp_path)
    prefixes = json.loads((tmp_path / "run" / "prefixes.json").read_text())["prefixes"]
    assert len(prefixes) == 4 and merged["prefixes"] == prefixes
    assert documents(prefixes) == documents([str(tmp_path / "single")])
    # each task's prefix is a Megatron indexed dataset: Megatron-Core's reader gives the same documents
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    megatron_docs = []
    for p in prefixes:
        ds = IndexedDataset(p)
        megatron_docs += [ds[i].tolist() for i in range(len(ds))]
    assert megatron_docs == documents(prefixes)
    single_stats = json.loads((tmp_path / "single.stats.json").read_text())
    assert merged["tokens"] == single_stats["num_tokens"] and merged["documents"] == single_stats["num_documents"]

    # `sfm data inspect RUN` summarises the source over its 4 prefixes: the single run's totals
    proc = subprocess.run(SFM + ["data", "inspect", str(tmp_path / "run"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    single = json.loads(subprocess.run(SFM + ["data", "inspect", str(tmp_path / "single"), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert [r["prefix"] for r in info["per_prefix"]] == prefixes
    for key in ("documents", "sequences", "tokens", "max_token_id", "bin_bytes", "length_percentiles", "mean_length"):
        assert info["total"][key] == pytest.approx(single[key]), key

    # `sfm data mix` takes the run's prefixes.json as one source
    from megatron_sfm.data_tools.mix import load_spec, write_mix

    spec = tmp_path / "mix.yaml"
    spec.write_text(f"sources:\n  web: {{prefix: {tmp_path / 'run' / 'prefixes.json'}, role: base}}\n"
                    "stages:\n  pretrain: {tokens: 2000, seq_length: 16, global_batch_size: 4, mixture: {web: 1.0}}\n"
                    "conditions:\n  base:\n")
    man = write_mix(load_spec(spec), tmp_path / "mix")
    assert man["base"]["sources"]["web"]["tokens_available"] == single_stats["num_tokens"]
    blend = json.loads((tmp_path / "mix" / "base" / "pretrain.json").read_text())
    assert blend["sources"] == ["web"] * 4 and blend["train"][1::2] == prefixes
    assert sum(blend["train"][0::2]) == pytest.approx(1.0)


def test_rerun_skips_done_tasks_and_a_changed_command_is_refused(tmp_path):
    inputs = make_inputs(tmp_path)
    run_locally("filter", [str(inputs)], tmp_path / "run", [], 3, tmp_path)
    done = tmp_path / "run" / "tasks" / "00001" / "DONE"
    before = done.stat().st_mtime_ns
    opts = dj.DataJobOptions(tasks=3, time="00:10:00")
    _, _, ids, need_merge = dj.prepare("filter", [str(inputs)], [], str(tmp_path / "run"), opts, workdir=tmp_path)
    assert ids == [] and not need_merge
    dj.run_task(tmp_path / "run", 1)  # a task that is done does nothing
    assert done.stat().st_mtime_ns == before
    with pytest.raises(SfmError, match=r"holds a run of another command \(differs in stage_args, tasks\)"):
        dj.prepare("filter", [str(inputs)], ["--window", "5"], str(tmp_path / "run"),
                   dj.DataJobOptions(tasks=2, time="00:10:00"), workdir=tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(SfmError, match="not empty and holds no plan.json"):
        dj.prepare("filter", [str(inputs)], [], str(tmp_path / "other"), opts, workdir=tmp_path)


def test_merge_refuses_missing_tasks(tmp_path):
    inputs = make_inputs(tmp_path)
    plan = dj.build_plan("filter", [str(inputs)], [], 3, tmp_path)
    write_json(tmp_path / "run" / dj.PLAN_FILE, plan)
    dj.run_task(tmp_path / "run", 0)
    with pytest.raises(SfmError, match=r"task\(s\) 1-2 have no valid DONE marker"):
        dj.merge(tmp_path / "run")
    assert not (tmp_path / "run" / "report.json").exists()


def test_kill_9_before_commit_leaves_nothing_that_looks_done_and_the_rerun_completes(tmp_path):
    from megatron_sfm.data_tools.tokenize_corpus import tokenize_to_indexed

    inputs = make_inputs(tmp_path)
    tok = make_tokenizer(tmp_path)
    out = tmp_path / "run"
    plan = dj.build_plan("tokenize", [str(inputs)], ["--tokenizer", str(tok)], 3, tmp_path)
    write_json(out / dj.PLAN_FILE, plan)
    env = dict(os.environ, **{dj.PAUSE_ENV: "60"})
    proc = subprocess.Popen(SFM + ["launch", "slurm-data-task", str(out), "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ""
    deadline = time.monotonic() + 60
    while "pausing" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    assert "pausing" in line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tasks = out / "tasks"
    assert not (tasks / "00001").exists()
    assert [p.name for p in tasks.iterdir() if p.name.startswith(".00001.")]  # the half-built folder
    assert dj.missing_tasks(out, plan) == [0, 1, 2]
    for i in (0, 1, 2):
        dj.run_task(out, i)
    assert sorted(p.name for p in tasks.iterdir()) == ["00000", "00001", "00002"]  # leftover removed
    dj.merge(out)
    tokenize_to_indexed([str(inputs)], tok, tmp_path / "single", progress=False)
    assert documents(json.loads((out / "prefixes.json").read_text())["prefixes"]) == documents([str(tmp_path / "single")])


def test_a_task_whose_input_changed_fails_instead_of_mixing_runs(tmp_path):
    inputs = make_inputs(tmp_path)
    plan = dj.build_plan("filter", [str(inputs)], [], 2, tmp_path)
    write_json(tmp_path / "run" / dj.PLAN_FILE, plan)
    shard = Path(plan["tasks"][1]["shards"][0])
    with open(shard, "a") as f:
        f.write('{"text": "more"}\n')
    with pytest.raises(SfmError, match=rf"task 1: input {shard} changed size since submission"):
        dj.run_task(tmp_path / "run", 1)


# ----------------------------------------------------------------------------- submission (stand-in sbatch)
FAKE_SBATCH = """#!/bin/bash
echo "$@" >> "$FAKE_SBATCH_LOG"
n=$(wc -l < "$FAKE_SBATCH_LOG")
echo $((100 + n))
"""


def test_submission_chains_the_merge_after_the_array_and_resubmits_only_missing_tasks(tmp_path, monkeypatch):
    inputs = make_inputs(tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(FAKE_SBATCH)
    (bindir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(log))
    monkeypatch.setattr(dj, "_active_jobs", lambda ids: [])
    out = tmp_path / "run"
    opts = dj.DataJobOptions(tasks=4, time="00:10:00", array_parallelism=2)
    data_dir, plan, ids, _ = dj.prepare("filter", [str(inputs)], [], str(out), opts, workdir=tmp_path)
    assert dj.submit_jobs(data_dir, plan, dj.render_jobs(plan, data_dir, opts, ids)) == ["101", "102"]
    array_line, merge_line = log.read_text().splitlines()
    assert "--array=0-3%2" in array_line
    assert "--dependency=afterok:101 --kill-on-invalid-dep=yes" in merge_line
    merge_script = max((out / "jobs").glob("merge-*.sbatch")).read_text()
    assert "afterok:101" in merge_script and "<array-job-id>" not in merge_script
    # tasks 0 and 2 finish; the resubmission asks only for 1 and 3
    for i in (0, 2):
        dj.run_task(out, i)
    data_dir, plan, ids, _ = dj.prepare("filter", [str(inputs)], [], str(out), opts, workdir=tmp_path)
    assert ids == [1, 3]
    dj.submit_jobs(data_dir, plan, dj.render_jobs(plan, data_dir, opts, ids, stamp="second"))
    assert "--array=1,3%2" in log.read_text().splitlines()[2]
    subs = json.loads((out / "jobs" / "submissions.json").read_text())
    assert [s["job_ids"] for s in subs] == [["101", "102"], ["103", "104"]]


def test_resubmitting_while_an_earlier_job_runs_is_refused(tmp_path, monkeypatch):
    inputs = make_inputs(tmp_path)
    out = tmp_path / "run"
    write_json(out / "jobs" / "submissions.json", [{"job_ids": ["7", "8"]}])
    write_json(out / dj.PLAN_FILE, dj.build_plan("filter", [str(inputs)], [], 2, tmp_path))
    monkeypatch.setattr(dj, "_active_jobs", lambda ids: [i for i in ids if i == "8"])
    opts = dj.DataJobOptions(tasks=2, time="00:10:00")
    data_dir, plan, ids, _ = dj.prepare("filter", [str(inputs)], [], str(out), opts, workdir=tmp_path)
    with pytest.raises(SfmError, match=r"job\(s\) 8 of an earlier submission are still queued or running"):
        dj.submit_jobs(data_dir, plan, dj.render_jobs(plan, data_dir, opts, ids))


# ----------------------------------------------------------------------------- synthesize (fake OpenAI server)
def _synthesis_fixtures():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_tools" / "synthesis"))
    import synth_helpers

    return synth_helpers


def test_synthesize_tasks_split_scenarios_and_merge_to_the_single_process_documents(tmp_path):
    h = _synthesis_fixtures()
    rows = [h._q(i) for i in range(7)] + [h._q(100 + i, split="textbook") for i in range(2)]
    scen = h.write_scenarios(tmp_path / "s.jsonl", rows)
    procs: list = []
    try:
        url, _ = h.server_starter(tmp_path, procs)()
        args = ["--base-url", url, "--model", "tiny-model", "--genre", "fiction", "--backoff", "0.01"]
        single = h.sfm(scen, "--out", tmp_path / "single", *args)
        assert single.returncode == 0, single.stderr[-2000:]
        plan = dj.build_plan("synthesize", [str(scen)], args, 3, tmp_path, tmp_path / "run")
        assert [e["scenarios"] for e in plan["tasks"]] == [2, 3, 2]  # the 7 seeding scenarios, split
        assert all(e["held_out"] == 2 for e in plan["tasks"])  # every task sees both held-out ones
        merged = run_locally("synthesize", [str(scen)], tmp_path / "run", args, 3, tmp_path)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    one = json.loads((tmp_path / "single" / "manifest.json").read_text())
    assert merged["complete"] is True and merged["held_out_questions"] == 2
    for key in ("scenarios", "requests", "accepted", "failed", "tokens_out"):
        assert merged[key] == one[key], key
    docs = h.read_docs(tmp_path / "run" / "merged")
    ref = h.read_docs(tmp_path / "single")
    assert sorted((d["id"], d["text"]) for d in docs) == sorted((d["id"], d["text"]) for d in ref)
    assert merged["across_tasks"]["dropped"] == {"duplicate": 0, "near_duplicate": 0}
    assert merged["shards"] == [str(tmp_path / "run" / "merged" / f"shard-0000{i}.jsonl.zst") for i in range(3)]


def test_synthesize_merge_drops_what_an_earlier_task_kept_and_reruns_to_the_same_output(tmp_path):
    h = _synthesis_fixtures()
    # tasks get scenarios [0, 1], [2, 3, 4], [5, 6]; the fake server answers every SAMEME request with
    # one text and every NEARME request with one text plus a word of its own
    marks = ["SAMEME", "NEARME", "SAMEME", "", "", "NEARME", ""]
    rows = [h._q(i, marker=m) for i, m in enumerate(marks)] + [h._q(100, split="textbook")]
    scen = h.write_scenarios(tmp_path / "s.jsonl", rows)
    procs: list = []
    try:
        url, _ = h.server_starter(tmp_path, procs)()
        args = ["--base-url", url, "--model", "tiny-model", "--genre", "fiction", "--backoff", "0.01"]
        merged = run_locally("synthesize", [str(scen)], tmp_path / "run", args, 3, tmp_path)
        single = h.sfm(scen, "--out", tmp_path / "single", *args)
        assert single.returncode == 0, single.stderr[-2000:]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    run = tmp_path / "run"
    tasks = [h.read_docs(run / "tasks" / f"{i:05d}") for i in range(3)]
    assert [len(t) for t in tasks] == [2, 5, 3]  # within a task: one SAMEME and one NEARME copy each
    docs = h.read_docs(run / "merged")
    # the later tasks' SAMEME (task 1) and NEARME (task 2) copies are dropped; task 0's are kept
    dropped = {d["id"] for d in tasks[1] + tasks[2] if d["scenario_id"] in ("art-2", "art-5")}
    assert len(dropped) == 2
    assert [d["id"] for d in docs] == [d["id"] for t in tasks for d in t if d["id"] not in dropped]
    marked = {f"art-{i}" for i, m in enumerate(marks) if m}
    assert {d["scenario_id"] for d in docs} & marked == {"art-0", "art-1"}  # the first copies
    across = merged["across_tasks"]
    assert across["dropped"] == {"duplicate": 1, "near_duplicate": 1}
    assert across["documents"] == 10 and across["kept"] == merged["accepted"] == len(docs) == 8
    assert merged["rejected"] == {"duplicate": 3, "near_duplicate": 3}  # 2 within tasks + 1 across, each
    assert merged["requests"] == merged["accepted"] + sum(merged["rejected"].values()) + merged["failed"]
    one = json.loads((tmp_path / "single" / "manifest.json").read_text())
    assert (merged["accepted"], merged["rejected"]) == (one["accepted"], one["rejected"])  # as one process
    first = "shard-00000.jsonl.zst"
    assert os.path.samefile(run / "merged" / first, run / "tasks" / "00000" / first)  # linked, not copied
    # the merge job again (a requeue, a rerun by hand): the same report and the same bytes
    before = tree_bytes(run / "merged")
    assert dj.merge(run) == merged
    assert tree_bytes(run / "merged") == before
    assert json.loads((run / "report.json").read_text()) == merged


def test_synthesize_with_more_tasks_than_scenarios_is_refused(tmp_path):
    h = _synthesis_fixtures()
    scen = h.write_scenarios(tmp_path / "s.jsonl", [h._q(i) for i in range(2)])
    with pytest.raises(SfmError, match=r"--tasks 3: more tasks than seeding scenarios \(2\)"):
        dj.build_plan("synthesize", [str(scen)], ["--base-url", "http://x/v1"], 3, tmp_path, tmp_path / "run")
