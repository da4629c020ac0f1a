"""megatron-sfm: alignment-pretraining experiments on NVIDIA Megatron-Core.

Importing this package is cheap on purpose (no torch, no Megatron-Core): the data tools
run on CPU data nodes and the CLI imports its subcommands lazily.
"""

__version__ = "0.1.0"
