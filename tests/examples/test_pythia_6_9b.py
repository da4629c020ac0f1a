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
