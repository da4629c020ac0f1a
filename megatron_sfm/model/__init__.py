"""The GPT-NeoX / Pythia model on Megatron-Core: layer spec, backends, builder, summary.

Knows nothing of data files, SLURM or the CLI. Heavy imports happen in the submodules.
"""
