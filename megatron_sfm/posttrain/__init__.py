"""Post-training (``sfm posttrain``): SFT then DPO on a Hugging Face export, with TRL.

Light at import time: the configs are plain dataclasses; torch, transformers and TRL
are imported when :func:`run_sft` or :func:`run_dpo` runs.

- :mod:`.config`: :class:`SFTConfig`, :class:`DPOConfig`, :class:`DataFile`, :func:`load_stage_config`.
- :mod:`.chat_template`: the ``sfm-chatml`` template, its tokens and embedding rows.
- :mod:`.data`: local JSONL/Parquet files -> checked examples -> the weighted mix.
- :mod:`.run`: the output folder (resume, refuse, overwrite), TRL's trainers, the final model and manifest.
- :mod:`.cli`: ``sfm posttrain sft|dpo``.
"""

from __future__ import annotations

from megatron_sfm.posttrain.config import (
    DataFile,
    DPOConfig,
    SFTConfig,
    load_stage_config,
)

__all__ = ["DPOConfig", "DataFile", "SFTConfig", "load_stage_config", "run_dpo", "run_sft"]


def run_sft(cfg: SFTConfig, progress: bool = True, **kwargs):
    """See :func:`megatron_sfm.posttrain.run.run_sft` (imported here when called)."""
    from megatron_sfm.posttrain.run import run_sft as _run_sft

    return _run_sft(cfg, progress, **kwargs)


def run_dpo(cfg: DPOConfig, progress: bool = True, **kwargs):
    """See :func:`megatron_sfm.posttrain.run.run_dpo` (imported here when called)."""
    from megatron_sfm.posttrain.run import run_dpo as _run_dpo

    return _run_dpo(cfg, progress, **kwargs)
