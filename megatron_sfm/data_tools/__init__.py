"""Data tools: the AI-discourse filter, tokenization into Megatron indexed datasets, and
condition mixing (``sfm data filter|tokenize|inspect|train-tokenizer|mix``).

Nothing here imports torch at import time; see docs/data.md for formats and APIs.
"""
