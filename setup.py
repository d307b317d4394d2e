"""Packaging for megatron-eslm.

The top-level ``kernels/`` folder is installed as ``megatron_eslm.kernels`` (see ``package_dir``) so it
never shadows, or is shadowed by, the unrelated PyPI package called ``kernels``; from the project root, where
the folder itself is on sys.path, its ``__init__`` hands a top-level ``import kernels`` over to that package.
"""
from setuptools import find_packages, setup

# Every package under megatron_eslm/ (a non-editable install must not miss one), plus the kernels.
PACKAGES = [*find_packages(include=["megatron_eslm", "megatron_eslm.*"]), "megatron_eslm.kernels"]

setup(
    name="megatron-eslm",
    version="0.1.0",
    description="Megatron-style GPT pretraining with ESLM (Efficient Selective Language Modeling)",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"megatron_eslm.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",  # torch.get_autocast_dtype, scaled_dot_product_attention(enable_gqa=)
        "numpy>=1.24",
        "sentencepiece>=0.1.99",
        "tensorboard>=2.12",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.19"],
        "triton": ["triton>=2.3"],
        # tools/selection_study.py draws its plot with matplotlib.
        "study": ["matplotlib>=3.7"],
        # megatron-core: the format-compatibility tests compare against its own reader and writer;
        # tokenizers: HuggingFaceTokenizer; transformers: LlamaForCausalLM, the Llama blocks' reference.
        # Tests that need one skip without it.
        # pytest-xdist: pytest.ini runs the suite on two workers (-n 2).
        "test": ["pytest>=7", "pytest-xdist>=3.5", "hypothesis>=6", "megatron-core>=0.12", "tokenizers>=0.19",
                 "transformers>=4.45"],
        # What CI and the README's commands install: torch 2.13.0 is the CPU build on the CI machines.
        "ci": ["torch==2.13.0", "triton==3.9.0", "deepspeed==0.19.0", "pytest==9.2.0", "pytest-xdist==3.8.0",
               "hypothesis==6.170.15",
               "megatron-core==0.16.1", "tokenizers==0.23.3", "transformers==5.17.0",
               "matplotlib==3.11.2"],
    },
)
