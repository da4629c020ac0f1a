"""Plans (stages as dependent jobs) and the frozen command line of ``sfm launch slurm``; no cluster."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from megatron_sfm.cli import main as sfm_main
from megatron_sfm.errors import SfmError
from megatron_sfm.launch.cli import build_slurm_parser
from megatron_sfm.launch.plan import load_plan, prepare_launch

REPO = Path(__file__).resolve().parents[2]
STAGE = {"model": "tiny", "training": {"micro_batch_size": 1, "global_batch_size": 4, "train_iters": 3},
         "data": {"mock": True}, "checkpoint": {"save": "ckpt"}}


def _write_plan(tmp_path, stages, name="exp"):
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "stage.yaml").write_text(yaml.safe_dump(STAGE))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"name": name, "stages": stages}, sort_keys=False))
    return path


def test_plan_dry_run_prints_each_stage_with_its_dependency(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = _write_plan(tmp_path, [
        {"name": "pretrain", "config": "cfg/stage.yaml", "overrides": ["checkpoint.save=pre"]},
        {"name": "midtrain", "config": "cfg/stage.yaml", "overrides": ["checkpoint.save=mid",
                                                                         "training.global_batch_size=8"],
         "slurm": {"nodes": 4, "time": "12:00:00", "env": {"NCCL_DEBUG": "INFO"}}},
    ])
    rc = sfm_main(["launch", "slurm", str(plan), "--nodes", "2", "--gpus-per-node", "2", "--time", "48:00:00",
                   "--env", "A=1", "--dry-run", "training.train_iters=9"])
    assert rc == 0
    out = capsys.readouterr().out
    commands = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("# sbatch ")]
    assert len(commands) == 2
    first, second = commands
    assert "--nodes=2" in first and "--time=48:00:00" in first and "--job-name=exp-pretrain" in first
    assert not any(a.startswith("--dependency") for a in first)
    assert "--nodes=4" in second and "--time=12:00:00" in second and "--job-name=exp-midtrain" in second
    assert "--dependency=afterok:<job id of stage pretrain>" in second and "--kill-on-invalid-dep=yes" in second
    assert "export NCCL_DEBUG=INFO" in out and out.count("export A=1") == 2
    assert not (tmp_path / "runs").exists()


def test_plan_stage_overrides_come_before_command_line_overrides(tmp_path):
    plan = _write_plan(tmp_path, [{"name": "a", "config": "cfg/stage.yaml",
                                   "overrides": ["training.train_iters=5", "optimizer.lr=0.002"]}])
    (job,) = prepare_launch(plan, ["training.train_iters=7"], dict(nodes=1, gpus_per_node=0, time="00:10:00", env={}),
                            log_dir=tmp_path / "runs")
    resolved = yaml.safe_load(job.config_text)
    assert resolved["training"]["train_iters"] == 7 and resolved["optimizer"]["lr"] == 0.002
    assert job.job_dir.parent.name.startswith("exp-") and job.job_dir.name == "1-a"


@pytest.mark.parametrize("stages, message", [
    ([], "non-empty list"),
    ([{"name": "a"}], r"stages\[0\].config"),
    ([{"name": "a", "config": "cfg/stage.yaml", "slurm": {"gpus": 8}}],
     r"plan.yaml: stages\[0\]\.slurm\.gpus: unknown key \(did you mean gpus_per_node\?\)"),
    ([{"name": "a", "config": "cfg/stage.yaml", "slurm": {"time": 14400}}], "quote it"),
    ([{"name": "a", "config": "cfg/stage.yaml"}, {"name": "a", "config": "cfg/stage.yaml"}], "appears twice"),
    ([{"name": "a", "config": "cfg/missing.yaml"}], "missing.yaml not found"),
    ([{"name": "a", "config": "cfg/stage.yaml", "overrides": ["nokey"]}], "KEY=VALUE"),
    # the run config's typed loader: unknown keys with a "did you mean", types, required keys
    ([{"name": "a", "config": "cfg/stage.yaml", "overide": ["x=1"]}],
     r"plan.yaml: stages\[0\]\.overide: unknown key \(did you mean overrides\?\)"),
    ([{"name": "a", "config": "cfg/stage.yaml", "slurm": {"nodes": "two"}}],
     r"plan.yaml: stages\[0\]\.slurm\.nodes: expected int or null, got str 'two'"),
    ([{"name": "a", "config": "cfg/stage.yaml", "slurm": {"exclusive": "yes"}}],
     r"stages\[0\]\.slurm\.exclusive: expected bool or null"),
    ([{"name": "a", "config": "cfg/stage.yaml", "slurm": {"job_name": "x"}}],
     r"stages\[0\]\.slurm\.job_name: unknown key"),
    ([{"config": "cfg/stage.yaml"}], r"plan.yaml: stages\[0\]\.name: required"),
    (["pretrain"], r"plan.yaml: stages\[0\]: expected a mapping"),
    ([{"name": "a", "config": "cfg/stage.yaml", "slurm": {"env": {"A": [1]}}}],
     r"stages\[0\]\.slurm\.env\.A: expected str or int or float or bool or null, got list \[1\]"),
])
def test_plan_errors_name_the_stage_and_key(tmp_path, stages, message):
    plan = _write_plan(tmp_path, stages)
    with pytest.raises(SfmError, match=message):
        prepare_launch(plan, [], dict(nodes=1, gpus_per_node=0, time="00:10:00", env={}), log_dir=tmp_path / "r")


def test_plan_config_errors_name_the_stage(tmp_path):
    plan = _write_plan(tmp_path, [{"name": "mid", "config": "cfg/stage.yaml", "slurm": {"nodes": 8}}])
    with pytest.raises(SfmError, match=r"plan.yaml: stages\[0\] \(mid\): .*global_batch_size"):
        prepare_launch(plan, [], dict(gpus_per_node=0, time="00:10:00", env={}), log_dir=tmp_path / "r")


def test_plan_needs_resources_from_flags_or_stage(tmp_path):
    plan = _write_plan(tmp_path, [{"name": "a", "config": "cfg/stage.yaml", "slurm": {"nodes": 1}}])
    with pytest.raises(SfmError, match=r"--gpus-per-node: required \(or slurm.gpus_per_node in .*stages\[0\]\)"):
        prepare_launch(plan, [], dict(time="00:10:00", env={}), log_dir=tmp_path / "r")


def test_plan_top_level_keys_are_checked(tmp_path):
    plan = _write_plan(tmp_path, [{"name": "a", "config": "cfg/stage.yaml"}])
    data = yaml.safe_load(plan.read_text())
    plan.write_text(yaml.safe_dump({**data, "nam": "x"}))
    with pytest.raises(SfmError, match=r"plan.yaml: nam: unknown key \(did you mean name\?\)"):
        load_plan(plan)
    plan.write_text(yaml.safe_dump({**data, "name": 3}))
    with pytest.raises(SfmError, match=r"plan.yaml: name: expected str or null, got int 3"):
        load_plan(plan)


def test_cli_plan_error_exits_2_naming_the_key(tmp_path, capsys):
    plan = _write_plan(tmp_path, [{"name": "a", "config": "cfg/stage.yaml", "slurm": {"gpus": 8}}])
    rc = sfm_main(["launch", "slurm", str(plan), "--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00",
                   "--dry-run"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {plan}: stages[0].slurm.gpus: unknown key (did you mean gpus_per_node?)"


def test_plan_stage_env_values_become_strings_and_empty_blocks_mean_none(tmp_path):
    plan = tmp_path / "plan.yaml"
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(STAGE))
    plan.write_text("stages:\n"
                    "  - {name: a, config: stage.yaml, overrides: null,\n"
                    "     slurm: {env: {OMP_NUM_THREADS: 4, EMPTY: null}}}\n"
                    "  - {name: b, config: stage.yaml, slurm: null}\n")
    jobs = prepare_launch(plan, [], dict(nodes=1, gpus_per_node=0, time="00:10:00", env={"A": "1"}),
                          log_dir=tmp_path / "r")
    assert jobs[0].options.env == {"A": "1", "OMP_NUM_THREADS": "4", "EMPTY": ""}
    assert "export OMP_NUM_THREADS=4" in jobs[0].script and "export EMPTY=''" in jobs[0].script
    assert jobs[1].options.env == {"A": "1"} and jobs[0].name == "plan-a"


EXAMPLE_PLANS = sorted((REPO / "examples" / "pythia-6.9b").glob("plan-*.yaml"))
CONDITIONS = ("unfiltered", "filtered", "misalignment_upsampled", "alignment_upsampled")


@pytest.mark.parametrize("plan_file", [p for p in EXAMPLE_PLANS if not p.stem.endswith("-posttrain")],
                         ids=lambda p: p.stem)
def test_example_plans_load_and_render(plan_file, tmp_path):
    plan = load_plan(plan_file)
    assert [s.name for s in plan.stages] == ["pretrain", "midtrain"]
    assert all(s.config.is_file() for s in plan.stages)
    jobs = prepare_launch(plan_file, [], dict(nodes=64, gpus_per_node=4, time=None, env={}), log_dir=tmp_path)
    assert [j.options.time for j in jobs] == ["48:00:00", "24:00:00"]
    assert jobs[1].options.dependency == "afterok:<job id of stage pretrain>"
    assert all("{{" not in j.script for j in jobs)


def test_every_condition_has_an_end_to_end_plan():
    assert sorted(p.stem for p in EXAMPLE_PLANS if p.stem.endswith("-posttrain")) == \
        sorted(f"plan-{c}-posttrain" for c in CONDITIONS)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_example_posttrain_plans_connect_their_stages_and_render(condition, tmp_path):
    """pretrain -> midtrain -> convert -> sft -> dpo -> eval: each stage reads what the one before wrote."""
    plan_file = REPO / "examples" / "pythia-6.9b" / f"plan-{condition}-posttrain.yaml"
    plan = load_plan(plan_file)
    stages = {s.name: s for s in plan.stages}
    assert [(s.name, s.kind) for s in plan.stages] == [
        ("pretrain", "train"), ("midtrain", "train"), ("convert", "convert"), ("sft", "posttrain-sft"),
        ("dpo", "posttrain-dpo"), ("eval-base", "eval"), ("eval-sft", "eval"), ("eval-dpo", "eval")]
    pretrain_plan = load_plan(REPO / "examples" / "pythia-6.9b" / f"plan-{condition}.yaml")
    for same in pretrain_plan.stages:  # the same training stages as plan-<condition>.yaml
        assert (stages[same.name].config, stages[same.name].overrides) == (same.config, same.overrides)
    run = f"runs/{condition}"
    assert f"checkpoint.save={run}/midtrain" in stages["midtrain"].overrides
    assert stages["convert"].model == [f"{run}/midtrain"] and stages["convert"].out == f"hf/{condition}/base"
    assert stages["sft"].model == [f"hf/{condition}/base"] and stages["sft"].out == f"{run}/sft"
    assert stages["dpo"].model == [f"{run}/sft"] and stages["dpo"].out == f"{run}/dpo"
    # one report folder per stage, the model labelled by the condition (sfm eval compare matches labels)
    for stage, model in (("base", f"hf/{condition}/base"), ("sft", f"{run}/sft"), ("dpo", f"{run}/dpo")):
        ev = stages[f"eval-{stage}"]
        assert ev.model == [f"{condition}={model}"] and ev.out == f"results/{condition}/{stage}"
    assert stages["eval-base"].mode == "logprob" and stages["eval-base"].personas == ["ai"]
    for stage in ("eval-sft", "eval-dpo"):
        assert stages[stage].mode == "generate" and stages[stage].personas == ["none", "ai", "helpful", "hhh"]
    examples = REPO / "examples"
    assert stages["sft"].config == examples / "pythia-6.9b" / "posttrain-sft.yaml"
    assert stages["dpo"].config == examples / "pythia-6.9b" / "posttrain-dpo.yaml"
    fsdp = examples / "accelerate" / "fsdp-multinode.yaml"  # the stages run on 2 nodes
    assert stages["sft"].accelerate_config.resolve() == stages["dpo"].accelerate_config.resolve() == fsdp
    missing = [str(p.relative_to(REPO)) for p in (stages["sft"].config, stages["dpo"].config, fsdp)
               if not p.is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in this checkout yet (written with the posttrain CLI); "
                    "the plan cannot render without them")
    defaults = dict(nodes=64, gpus_per_node=4, time=None, env={})
    # the post-training data must exist (or be written by an earlier stage) before anything is submitted
    with pytest.raises(SfmError, match=r"stages\[3\]\.data: 'data/posttrain/sft.jsonl' does not exist"):
        prepare_launch(plan_file, [], defaults, log_dir=tmp_path, workdir=tmp_path)
    (tmp_path / "data" / "posttrain").mkdir(parents=True)
    for name in ("sft.jsonl", "prefs.jsonl"):
        (tmp_path / "data" / "posttrain" / name).write_text("{}\n")
    jobs = prepare_launch(plan_file, [], defaults, log_dir=tmp_path, workdir=tmp_path)
    assert [j.options.nodes for j in jobs] == [64, 64, 1, 2, 2, 1, 1, 1]
    assert [j.options.gpus_per_node for j in jobs] == [4, 4, 1, 4, 4, 1, 1, 1]
    assert "--num_machines 2 --num_processes 8" in jobs[3].script.replace(" \\\n      ", " ")
    assert [j.requeueable for j in jobs] == [True, True, False, True, True, False, False, False]
    assert "--persona none,ai,helpful,hhh" in jobs[7].script and all("{{" not in j.script for j in jobs)


def test_load_plan_resolves_configs_next_to_the_plan(tmp_path):
    plan = load_plan(_write_plan(tmp_path, [{"name": "a", "config": "cfg/stage.yaml"}], name="p"))
    assert plan.name == "p" and plan.stages[0].config == tmp_path / "cfg" / "stage.yaml"


def test_command_line_options_are_frozen():
    """New flags are a design decision: add them here and to docs/launch.md together."""
    flags = sorted(opt for action in build_slurm_parser()._actions for opt in action.option_strings)
    assert flags == sorted([
        "-h", "--help", "--nodes", "--gpus-per-node", "--time", "--partition", "--account", "--job-name",
        "--nproc-per-node", "--cpus-per-task", "--exclusive", "--no-exclusive", "--container",
        "--container-mounts", "--max-requeues", "--signal-grace", "--env", "--python", "--rdzv-port",
        "--log-dir", "--dry-run", "--from-stage"])
