import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from training_corpus import make_corpus  # noqa: E402
from training_helpers import check, run_train, write_config  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A two-source learnable corpus (web: step 1, aligned: step 3) and its blend JSON."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, corpus):
    """The single-process 10-step run every layout is compared against (also saves at 5 and 10)."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = write_config(folder / "cfg.yaml", corpus)
    check(run_train(cfg, [f"checkpoint.save={folder / 'ckpt'}", "checkpoint.save_interval=5",
                          "training.eval_interval=5"],
                    env={"SFM_SAMPLE_LOG": str(folder / "samples")}))
    return folder
