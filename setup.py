from setuptools import find_packages, setup

setup(
    name="fdfo",
    version="0.1.0",
    description="Finite Difference Flow Optimization: online RL post-training of flow-matching text-to-image models",
    license="Apache-2.0",  # LICENSE; why this one: README, "License"
    # fdfo and every package below it (the Triton kernels are fdfo.kernels, in fdfo/kernels/: no top-level
    # package of the repository may be importable under a name a dependency uses, such as `kernels`)
    packages=find_packages(include=["fdfo", "fdfo.*"]),
    # Lower bounds: the oldest release the code needs, from the API it uses. Only the versions of
    # locks/cpu.txt (Python 3.11) and the GPU image's (Python 3.12, torch 2.11) were run; a bound below
    # them says "needs at least", not "tested with". CI checks the newest releases these ranges allow
    # every day (make smoke); a release that breaks them gets a fix or an upper bound here, with the reason.
    python_requires=">=3.11",  # 3.10 was never run: numpy 2.4 and the lock's other releases need 3.11
    install_requires=[
        # A range, not a pin: GPU users bring their own CUDA build of torch (ran: 2.11 on the GPU image,
        # 2.13 in the lock; torch.compile, SDPA and the CUDA-graph API used are in every release since 2.4)
        "torch>=2.4",
        # diffusers.models.attention_dispatch (the attention backends of FLUX.1 and SD3) arrived in 0.35
        "diffusers>=0.35",
        # 5.0: CLIPTokenizer built from an in-memory vocabulary (the built-in tiny models and the digits
        # base), and Qwen2_5_VLForConditionalGeneration (the VLM reward; in transformers since 4.49)
        "transformers>=5.0",
        "peft>=0.13",  # LoraConfig and diffusers' peft integration as used here; not run below the lock's
        "deepspeed>=0.16",  # ZeRO stages 0-3, universal checkpoints; not run below the lock's
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
        # data.prompts: hf:DATASET[:SPLIT]:COLUMN (fdfo/hf_prompts.py); load_dataset(split=) as used is in every 2.x
        "prompts": ["datasets>=2.0"],
    },
)
