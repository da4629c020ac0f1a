"""``sfm train CONFIG.yaml [key=value ...]``: pretrain or midtrain (run under torchrun or srun).

Examples::

    sfm train examples/configs/tiny.yaml                       # one CPU process
    torchrun --nproc-per-node 8 -m megatron_sfm.cli train examples/configs/pythia-6.9b-pretrain.yaml \\
        data.blend=runs/unfiltered/blend.json checkpoint.save=runs/unfiltered/ckpt
    sfm train cfg.yaml --print-config                          # resolved config, no training
"""

from __future__ import annotations

import argparse
import logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfm train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (see docs/training.md)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. training.train_iters=100")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML) and exit without training")
    return parser


def main(argv: list[str] | None = None) -> int:
    # First thing: a SIGTERM/SIGUSR1 that arrives while the trainer starts (config, imports,
    # model build, resume) must still end in "save if anything was trained, exit 75".
    from megatron_sfm.training.signals import SignalFlag, requeue_exit_code, world_size_from_env

    flag = SignalFlag().install()
    try:
        args = build_parser().parse_args(argv)
        from megatron_sfm.config import dump_config, load_config, validate_run_config

        cfg = load_config(args.config, args.overrides)
        world = world_size_from_env()
        validate_run_config(cfg, world)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        if flag.received is not None and world == 1:
            # one process: no other rank to agree with, and nothing built yet (torch not even imported)
            print(f"received {flag.name()} during startup: nothing trained, nothing to save; "
                  f"exiting with {requeue_exit_code()} (requeue)")
            flag.hold()  # ignore further signals until the process has exited with the requeue code
            return requeue_exit_code()
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        from megatron_sfm.training.loop import run_training

        try:
            return run_training(cfg, signal_flag=flag)
        finally:
            from megatron_sfm.model.parallel import destroy_parallel

            destroy_parallel()
    finally:
        flag.restore()


if __name__ == "__main__":
    import sys

    from megatron_sfm.errors import SfmError

    try:
        sys.exit(main())
    except SfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
