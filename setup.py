from setuptools import find_packages, setup

setup(
    name="fdfo",
    version="0.1.0",
    description="Finite Difference Flow Optimization: online RL post-training of flow-matching text-to-image models",
    # fdfo and every package below it (the Triton kernels are fdfo.kernels, in fdfo/kernels/: no top-level
    # package of the repository may be importable under a name a dependency uses, such as `kernels`)
    packages=find_packages(include=["fdfo", "fdfo.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range, not a pin: GPU users bring their own CUDA build of torch.
        "torch>=2.4",
        "diffusers>=0.32",
        "transformers>=4.46",
        "peft>=0.13",
        "deepspeed>=0.16",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "matplotlib",
        "nvidia-ml-py",
        "sentencepiece",
    ],
    extras_require={
        # ftfy: open_clip's tokenizer, the reference of the HPSv2 conversion test (tests/test_convert_hpsv2.py)
        "dev": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "triton>=3.0", "ftfy"],
        "flash": ["flash-attn>=2.6"],
        "vlm": ["qwen-vl-utils"],
        "logging": ["wandb", "tensorboard"],
    },
)
