"""Misalignment-propensity and capability evaluation (``sfm eval``).

Light at import time: heavy modules (torch, transformers, lm-eval) are imported inside
the functions that need them.

- :mod:`.questions`: the scenario schema, loader and bundled illustrative set.
- :mod:`.formats`: the 4 syntax templates x 2 answer orders, the 4 likelihood variants, personas.
- :mod:`.models`: resolve a Hugging Face folder or one of our Megatron checkpoints.
- :mod:`.scoring`: letter log-probs, option likelihoods (shared-prefix KV cache), generate-and-parse.
- :mod:`.stats`: mean and standard error over formats.
- :mod:`.propensity`: the protocol end to end.
- :mod:`.report`: results.json / results.md / bar chart / console table.
- :mod:`.compare`: base vs SFT vs DPO per condition from one report per stage (``sfm eval compare``).
- :mod:`.capabilities`: lm-evaluation-harness through its Python API.
"""

from megatron_sfm.evaluation.questions import Question, load_questions

__all__ = ["Question", "load_questions"]
