"""The trainer behind ``sfm train`` (see docs/training.md).

Entry points: :func:`megatron_sfm.training.state.build_training_state`,
:func:`megatron_sfm.training.step.train_step`, :func:`megatron_sfm.training.loop.run_training`,
:mod:`megatron_sfm.training.checkpoint`. Nothing is imported here (the CLI stays light).
"""
