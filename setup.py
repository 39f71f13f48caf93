"""Package metadata for keras-lora."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    (HERE / "keras_lora" / "version.py").read_text(),
    re.MULTILINE,
).group(1)

# keras-hub 0.32 needs Python 3.11 and Keras 3.15; on Python 3.10 keras_lora
# works without it, and its tests and example skip.
KERAS_HUB = "keras-hub>=0.32; python_version >= '3.11'"

setup(
    name="keras-lora",
    version=VERSION,
    description="LoRA (low-rank adaptation) for Keras 3 models, with peft's numbers.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["keras_lora", "keras_lora.*"]),
    package_data={"keras_lora": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.12",
        "tensorflow>=2.20",
        "numpy",
        "safetensors",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6",
            "ruff==0.17.6",
            "scikit-learn",
            "matplotlib",
            KERAS_HUB,
        ],
        "examples": ["scikit-learn", "matplotlib", KERAS_HUB],
        # The JAX backend (KERAS_BACKEND=jax). torch has no extra: its default
        # wheel on Linux is the CUDA build; install the build you need.
        "jax": ["jax"],
        # keras-hub models (transformers, vision backbones, task models):
        # optional; keras_lora adapts its layers when it is installed.
        "hub": [KERAS_HUB],
        # Regenerates tests/fixtures/peft/ and tests/fixtures/hf/ from peft and
        # transformers themselves (needs torch).
        "fixtures": ["peft==0.21.2", "transformers==5.24.0"],
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
