"""The ready-made Pythia-6.9B recipes parse, validate and render."""

import subprocess
from pathlib import Path

import pytest

from megatron_sfm.config import load_config
from megatron_sfm.data_tools.mix import load_spec

HERE = Path(__file__).resolve().parents[2] / "examples" / "pythia-6.9b"
CONDITIONS = ["unfiltered", "filtered", "misalignment_upsampled", "alignment_upsampled"]


def test_mix_spec_has_the_paper_conditions():
    spec = load_spec(HERE / "mix.yaml", check_data=False)
    names = {c.name for c in spec.conditions}
    assert set(CONDITIONS) <= names
    by_name = {c.name: c for c in spec.conditions}
    assert by_name["misalignment_upsampled"].synthetic == {"misaligned": 0.01}
    assert by_name["alignment_upsampled"].corpus == "filtered"
    assert by_name["alignment_upsampled_late"].late_fraction == 0.1


@pytest.mark.parametrize("condition", CONDITIONS)
def test_plan_renders(condition):
    proc = subprocess.run(["sfm", "launch", "slurm", str(HERE / f"plan-{condition}.yaml"), "--nodes", "64",
                           "--gpus-per-node", "4", "--time", "48:00:00", "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"pythia-6.9b-{condition}-pretrain" in proc.stdout
    assert f"pythia-6.9b-{condition}-midtrain" in proc.stdout
    assert proc.stdout.count("#!/") >= 2  # two jobs: pretraining, then midtraining


def test_recipe_numbers():
    cfg = load_config(Path(__file__).resolve().parents[2] / "examples/configs/pythia-6.9b-pretrain.yaml")
    assert cfg.training.global_batch_size * cfg.model.seq_length == 4_194_304
    assert cfg.training.train_iters == 119_209


@pytest.fixture(scope="module")
def mixed_examples(tmp_path_factory):
    """``sfm data mix examples/pythia-6.9b/mix.yaml --out blends/`` over one-document stand-in datasets."""
    import numpy as np
    import yaml

    from megatron_sfm.data_tools.indexed import IndexWriter
    from megatron_sfm.data_tools.mix import write_mix

    work = tmp_path_factory.mktemp("examples")
    spec = yaml.safe_load((HERE / "mix.yaml").read_text())
    for src in spec["sources"].values():
        prefix = work / src["prefix"]
        prefix.parent.mkdir(parents=True, exist_ok=True)
        writer = IndexWriter(str(prefix) + ".bin", np.uint16)
        writer.add_documents(np.arange(1, 101, dtype=np.uint16), np.array([100]))
        writer.finalize(str(prefix) + ".idx")
    (work / "mix.yaml").write_text((HERE / "mix.yaml").read_text())
    write_mix(load_spec(work / "mix.yaml", max_epochs=1e15), work / "blends")
    return work


def _plan_runs():
    import yaml

    runs = [(Path(__file__).resolve().parents[2] / f"examples/configs/pythia-6.9b-{s}.yaml", []) for s in
            ("pretrain", "midtrain")]
    for condition in CONDITIONS:
        plan = yaml.safe_load((HERE / f"plan-{condition}.yaml").read_text())
        runs += [((HERE / st["config"]).resolve(), st["overrides"]) for st in plan["stages"]]
    return runs


@pytest.mark.parametrize("config,overrides", _plan_runs(), ids=lambda v: Path(v).name if isinstance(v, Path) else "")
def test_configs_train_on_what_mix_writes(mixed_examples, config, overrides):
    """Every run of the recipes names a phases.json and stage that `sfm data mix` writes, with its sizes."""
    from megatron_sfm.data_tools.blend import read_stage
    from megatron_sfm.training.data import check_stage_matches

    cfg = load_config(config, overrides)
    assert cfg.data.blend is None and cfg.data.phases.startswith("blends/") and cfg.data.stage
    plan = read_stage(mixed_examples / cfg.data.phases, cfg.data.stage)  # paths relative to where sfm runs
    check_stage_matches(plan, cfg, cfg.model.seq_length)
    assert plan.seed == 1234 and cfg.data.split_seed is None
    assert (plan.iterations, plan.global_batch_size * plan.seq_length) == (
        {"pretrain": 119_209, "midtrain": 11_921}[cfg.data.stage], 4_194_304)
