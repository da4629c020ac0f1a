"""The ``sfm`` command: a thin dispatcher over the library.

Each command group lives in its own module, imported only when that group runs, so
``sfm data filter --help`` does not pay for torch. A group whose module is not present
in this installation is not listed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from megatron_sfm.errors import SfmError

# group name -> (module with ``main(argv) -> int``, one-line help)
GROUPS: dict[str, tuple[str, str]] = {
    "data": ("megatron_sfm.data_tools.cli", "filter, tokenize, inspect and mix training data"),
    "model": ("megatron_sfm.model.cli", "model presets: parameter, FLOP and memory summary"),
    "train": ("megatron_sfm.training.cli", "pretrain or midtrain on Megatron-Core (under torchrun/srun)"),
    "convert": ("megatron_sfm.conversion.cli", "convert checkpoints to and from Hugging Face"),
    "eval": ("megatron_sfm.evaluation.cli", "misalignment propensity and capability evaluation"),
    "launch": ("megatron_sfm.launch.cli", "render and submit SLURM jobs"),
    "bench": ("megatron_sfm.benchmark.cli", "measure training throughput on mock data"),
    "demo": ("megatron_sfm.demo.cli", "the whole experiment end to end on CPU, in minutes"),
    "posttrain": ("megatron_sfm.posttrain.cli", "SFT and DPO on a Hugging Face export (TRL)"),
}


def available_groups() -> dict[str, tuple[str, str]]:
    """The groups whose module exists in this installation."""
    return {name: entry for name, entry in GROUPS.items() if _present(entry[0])}


def _present(module: str) -> bool:
    # find_spec imports the parent package, so the listing looks up every group but a
    # command only its own (``sfm data tokenize`` does not import megatron_sfm.evaluation)
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _usage(groups: dict[str, tuple[str, str]]) -> str:
    width = max(len(n) for n in groups) if groups else 0
    lines = ["usage: sfm COMMAND [ARGS...]", "", "megatron-sfm: alignment pretraining on Megatron-Core", "", "commands:"]
    for name, (_, help_text) in groups.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines += ["", "Run 'sfm COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(available_groups()))
        return 0 if argv else 2
    if argv[0] == "--version":
        from megatron_sfm import __version__

        print(f"megatron-sfm {__version__}")
        return 0
    name = argv[0]
    if name not in GROUPS or not _present(GROUPS[name][0]):
        print(f"error: unknown command {name!r}; known: {', '.join(available_groups())}", file=sys.stderr)
        return 2
    module = importlib.import_module(GROUPS[name][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except SfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
