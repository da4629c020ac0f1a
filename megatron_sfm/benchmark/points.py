"""The rows of one ``sfm bench`` run: attention backends x the product of ``--sweep`` values.

Imports no torch, so the command line checks its arguments and configs before any heavy
import.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from megatron_sfm.config import RunConfig, load_config
from megatron_sfm.config.loader import parse_override
from megatron_sfm.errors import ConfigError

# Keys that change Megatron's global parallel state, which one process sets up once.
_FIXED_KEYS = ("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
               "parallel.virtual_pipeline_model_parallel_size")


@dataclass
class BenchPoint:
    """One row: an attention backend (None: the config's) and config overrides."""

    backend: str | None = None
    overrides: dict = field(default_factory=dict)  # key -> value text, as on the command line

    @property
    def label(self) -> str:
        parts = [self.backend or "config"]
        parts += [f"{k}={v}" for k, v in self.overrides.items()]
        return " ".join(parts)

    def override_list(self) -> list[str]:
        out = [f"model.attention_backend={self.backend}"] if self.backend else []
        return out + [f"{k}={v}" for k, v in self.overrides.items()]


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``key=v1,v2,...`` -> (key, [v1, v2, ...]) (values as text; parsed later as YAML)."""
    path, _ = parse_override(text)  # validates KEY=VALUE shape
    key = ".".join(path)
    raw = text.split("=", 1)[1]
    values = [v.strip() for v in raw.split(",")]
    if not values or any(v == "" for v in values):
        raise ConfigError(f"--sweep {text!r}: expected KEY=V1,V2,... with no empty value")
    if key in _FIXED_KEYS:
        raise ConfigError(f"--sweep {key}: the parallel layout is set up once per process; run one sfm bench per layout")
    if key == "model.attention_backend":
        raise ConfigError("--sweep model.attention_backend: use --backends")
    return key, values


def plan_points(backends: list[str] | None, sweeps: list[str]) -> list[BenchPoint]:
    """Rows in run order: each backend (in the order given) x the product of the sweeps."""
    parsed = [parse_sweep(s) for s in sweeps]
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--sweep: a key is given twice ({', '.join(keys)})")
    combos = list(itertools.product(*[values for _, values in parsed])) if parsed else [()]
    points = []
    for backend in backends or [None]:
        for combo in combos:
            points.append(BenchPoint(backend=backend, overrides=dict(zip(keys, combo))))
    return points


def point_config(config_path: str | None, base_overrides: list[str], point: BenchPoint) -> RunConfig:
    return load_config(config_path, list(base_overrides) + point.override_list())
