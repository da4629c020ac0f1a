"""megatron-sfm: alignment-pretraining experiments on Megatron-Core.

One top-level package, ``megatron_sfm``; the kernels, data tools and evaluation live
inside it (``megatron_sfm/kernels`` ...), so nothing in the checkout shadows another
distribution's top-level name (PyPI's ``kernels`` is imported by transformers) and every
file's path equals its module name.
"""
from setuptools import find_packages, setup


setup(
    name="megatron-sfm",
    version="0.1.0",
    description="Alignment pretraining (AI-discourse data conditions) on NVIDIA Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_sfm", "megatron_sfm.*"]),
    include_package_data=True,
    package_data={
        "megatron_sfm.data_tools": ["resources/**/*", "resources/*"],
        "megatron_sfm.evaluation": ["resources/**/*", "resources/*"],
        "megatron_sfm.launch": ["templates/*"],
        "megatron_sfm.demo": ["resources/**/*", "resources/*"],
    },
    install_requires=[
        "megatron-core==0.16.1",
        "torch>=2.4",
        "numpy",
        "psutil",  # megatron-core's dist_checkpointing save hangs without it (undeclared)
        "tokenizers",
        "sentencepiece",
        "triton; platform_system == 'Linux'",
        "transformers>=5",  # posttrain relies on v5 semantics (warmup_steps as a fraction, dtype=)
        "safetensors",
        "xxhash",  # checkpoint content checksums (megatron_sfm/checkpoint_format.py)
        "tensorboard",
        "pyyaml",
        "rich",
        "matplotlib",
        "pyahocorasick",
        "ahocorasick-rs>=1.0",  # data_tools filter: Rust DFA matcher, ~2x pyahocorasick (optional at run time)
        "orjson>=3.8",  # data_tools: JSONL parsing for filter/tokenize
        "zstandard",
        "pyarrow",
        "gigatoken",
        "openai[aiohttp]>=2",  # data_tools synthesis: OpenAI-compatible endpoints (vLLM, ...)
        "datasketch",  # data_tools synthesis: MinHash near-duplicate detection
        "trl>=1.13,<2",  # posttrain: SFTTrainer / DPOTrainer (megatron_sfm/posttrain)
        "accelerate",  # posttrain: multi-GPU launch (FSDP), required by trl
        "datasets",  # posttrain: the trainers' data format
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        # FP8 without Transformer Engine: torchao float8 training (megatron_sfm/model/float8.py)
        "fp8": ["torchao==0.18.0"],
        "eval": ["lm-eval[hf]==0.4.13", "accelerate"],
        "dev": ["pytest", "pytest-timeout", "ruff", "transformers[serving]"],  # serving: the synthesis e2e test
    },
    entry_points={"console_scripts": ["sfm=megatron_sfm.cli:main"]},
)
