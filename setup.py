from pathlib import Path

from setuptools import find_packages, setup


setup(
    name="diffit-diffusers",
    version="0.1.0",
    description="DiffiT (Diffusion Vision Transformers with time-dependent self-attention) for Hugging Face diffusers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["diffit_diffusers", "diffit_diffusers.*"]),
    package_data={"diffit_diffusers": ["presets/*/*.json", "data/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.35,<0.50",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface_hub>=2.4",
        "safetensors>=0.4",
        "numpy>=1.24",
        "Pillow>=9.0",
        "tqdm>=4.60",
        # Training: YAML config files.
        "pyyaml>=6.0",
        # Training: options parsed by HfArgumentParser, batches from torchdata's StatefulDataLoader.
        "transformers>=4.41,<6",
        "torchdata>=0.8,<0.12",
    ],
    extras_require={
        "train": ["tensorboard>=2.14", "scikit-learn>=1.3"],
        # LoRA adapters (PeftAdapterMixin, load_lora_weights, examples/train_diffit_lora.py).
        "lora": ["peft>=0.15"],
        # Quantized loading on CPU and GPU (TorchAoConfig, QuantoConfig).
        "quantization": ["torchao>=0.10", "optimum-quanto>=0.2.7"],
        "test": [
            "pytest>=8.0",
            "pytest-timeout>=2.2",
            "pytest-xdist>=3.5",
            "scipy>=1.10",
            "scikit-learn>=1.3",
            "tensorboard>=2.14",
            "torchmetrics>=1.4",
            "peft>=0.15",
            "torchao>=0.10",
            "optimum-quanto>=0.2.7",
        ],
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26", "ruff>=0.6"],
        "eval": ["torchmetrics>=1.4"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
