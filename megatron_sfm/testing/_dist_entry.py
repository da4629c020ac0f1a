"""Entry point run on every rank by :func:`run_distributed`."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys


def _resolve(target: str):
    module_name, func_name = target.rsplit(":", 1)
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("_sfm_dist_body", module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, func_name)


def main() -> None:
    target, args_json, result_path = sys.argv[1:4]
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        out = _resolve(target)(**json.loads(args_json))
        if dist.get_rank() == 0:
            with open(result_path, "w") as f:
                json.dump(out, f)
    finally:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
        except ImportError:
            pass
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
