"""Training throughput on mock data (``sfm bench``).

One run measures several *points* (an attention backend, optionally with config
overrides from a sweep) side by side in one process, each built with the trainer's
:func:`megatron_sfm.training.state.build_training_state` and stepped with its
:func:`megatron_sfm.training.step.train_step`, on random tokens generated on the device.
Throughput numbers come from :mod:`megatron_sfm.metrics`. See docs/benchmarking.md.
"""

SCHEMA = "sfm-bench/1"

__all__ = ["SCHEMA"]
