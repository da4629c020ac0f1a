"""Checkpoint conversion between our dist_checkpointing checkpoints and Hugging Face GPTNeoX.

``export_to_hf`` (``sfm convert to-hf``) and ``import_from_hf`` (``sfm convert from-hf``);
formats and the vocabulary-padding rules are in docs/conversion.md. Heavy modules are
imported lazily.
"""

from __future__ import annotations


def export_to_hf(*args, **kwargs):
    from megatron_sfm.conversion.exporter import export_to_hf as _export

    return _export(*args, **kwargs)


def import_from_hf(*args, **kwargs):
    from megatron_sfm.conversion.importer import import_from_hf as _import

    return _import(*args, **kwargs)


__all__ = ["export_to_hf", "import_from_hf"]
