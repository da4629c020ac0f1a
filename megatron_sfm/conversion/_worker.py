"""Entry point of the per-rank conversion processes (run by torchrun; needs the main guard
because dist_checkpointing starts a spawn-based helper process)."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    action, args_path, error_path = argv
    with open(args_path, encoding="utf-8") as f:
        args = json.load(f)
    from megatron_sfm.errors import SfmError

    try:
        if action == "import":
            from megatron_sfm.conversion.importer import import_rank

            import_rank(**args)
        else:
            raise SfmError(f"unknown worker action {action!r}")
    except SfmError as exc:
        with open(error_path, "a", encoding="utf-8") as f:
            f.write(f"{exc}\n")
        return 1
    finally:
        from megatron_sfm.model.parallel import destroy_parallel

        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
