from setuptools import find_packages, setup

setup(
    name="sit_fast",
    version="0.1.0",
    description="Fast PyTorch implementation of SiT (Scalable Interpolant Transformers): "
    "fused Triton adaLN kernels, flash attention, torch.compile.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["sit_fast", "sit_fast.*", "kernels", "kernels.*"]),
    py_modules=[],
    install_requires=[
        "torch>=2.8",  # the oldest release the whole test suite passes with (README)
        "numpy",
        "diffusers",
        "torchdiffeq",
        "tqdm",
        "pillow",
        "scikit-learn",
        "safetensors",
    ],
    extras_require={
        # timm: the tests' independent upstream model; pytest-xdist: make test's processes
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "timm"],
        "flash": ["flash-attn>=2.7"],
        "tensorboard": ["tensorboard"],  # train.py --tensorboard
        "wandb": ["wandb"],  # train.py --wandb
    },
)
