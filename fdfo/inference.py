"""A base model with an optional trained checkpoint, ready to sample images for evaluation: its sampling
settings, the model loaded and checked against the checkpoint, and the images.

Sampling is the deterministic Euler sampler of evaluation (no churn) from one Gaussian latent per
(prompt, seed), drawn on the CPU: the same seed gives the same image whatever the batch size, the
other prompts or the device. The settings are the checkpoint's run config's (steps, guidance,
resolution, ...), else those of a built-in task's default job, else the published ones; what the
command line gives overrides them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fdfo import settings as run_settings
from fdfo import progress, tasks
from fdfo.models import Conditioning, FlowModel, family_for, family_of, load_flow_model
from fdfo.sampling import sample_deterministic
from fdfo.trained_checkpoint import Checkpoint, check_checkpoint, resolve_checkpoint

PUBLISHED = {"steps": 40, "guidance": 1.0, "max_sequence_length": 128, "resolution": None}
# The sampling settings a command line may override (its flags: --steps, --guidance, ...).
OVERRIDES = ("steps", "guidance", "negative_prompt", "resolution", "max_sequence_length")


def sampling_defaults(model_path: str | None, run_config: dict | None) -> dict:
    """steps, guidance, negative prompt, shift, text length, resolution and the model family's own options
    (FLUX's guidance): the run's, else those of the built-in task's default job (for a ``builtin:``
    model), else the published ones."""
    out = dict(PUBLISHED, negative_prompt="", shift=None, model=model_path, revision=None, cache_dir=None,
               model_options={})
    if run_config is None and tasks.is_builtin(model_path):
        run_config = run_settings.build_config(None, under=tasks.preset(model_path)).to_dict()
    if run_config:
        run_config = run_settings.migrate(run_config)  # (a checkpoint of an earlier version: its keys moved)
        m, s = run_config["model"], run_config["sampling"]
        out.update(model=model_path or m["path"], steps=s["steps"], guidance=s["guidance_scale"],
                   negative_prompt=s.get("negative_prompt", ""), shift=s.get("shift"),
                   max_sequence_length=m["max_sequence_length"], resolution=m["resolution"],
                   revision=m.get("revision"), cache_dir=m.get("cache_dir"),
                   model_options=run_settings.family_settings(run_config))
    return out


def seed_latents(model: FlowModel, seeds: list[int]) -> torch.Tensor:
    """One Gaussian latent per seed, drawn on the CPU: identical on every device and batch size."""
    return torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def generate_images(model: FlowModel, prompts: list[str], seeds: list[int], *, steps: int,
                    guidance: float = 1.0, negative_prompt: str = "", batch_size: int = 8,
                    show_progress: str | None = None) -> torch.Tensor:
    """Images [N, C, H, W] in [0, 1] for the N (prompt, seed) items (deterministic Euler, optional CFG);
    ``show_progress``: the label of a progress display (fdfo.progress) of the images made, or None."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    sigmas = model.sigmas(steps)
    uncond = model.encode([negative_prompt]) if guidance != 1.0 else None
    out = []
    shown = progress.bar(total=len(prompts), desc=show_progress or "", unit="images", enabled=bool(show_progress),
                         leave=True)
    for i in range(0, len(prompts), batch_size):
        cond: Conditioning = model.encode(prompts[i:i + batch_size])
        latents = seed_latents(model, seeds[i:i + batch_size]).to(model.device)
        x0 = sample_deterministic(lambda x, t: model.velocity(x, t, cond, guidance, uncond), latents, sigmas)
        out.append(model.decode(x0).float().cpu())
        shown.update(len(out[-1]))
    shown.close()
    return torch.cat(out)


def resolve(adapter: str | None, model: str | None, overrides: dict) -> tuple[Checkpoint | None, dict]:
    """Checkpoint (not yet applied) and the sampling settings of a base ``model`` and an ``adapter`` (each
    may be None), without loading a model: a missing base model, or a checkpoint that does not fit a local
    base model, is an error here already. ``overrides``: settings of ``OVERRIDES`` (None: not given)."""
    ckpt = resolve_checkpoint(adapter) if adapter else None
    settings = sampling_defaults(model, ckpt.run_config if ckpt else None)
    for key in OVERRIDES:
        if overrides.get(key) is not None:
            settings[key] = overrides[key]
    if settings["model"] is None:
        raise FileNotFoundError("no --model given and the checkpoint carries no run config naming one")
    if not tasks.is_builtin(settings["model"]):
        family = family_of(settings["model"], settings["revision"])  # missing or unsupported: one line
        if ckpt is not None:
            transformer = _meta_transformer(family, settings["model"], settings["revision"])
            if transformer is not None:
                check_checkpoint(transformer, ckpt, settings["model"])
    return ckpt, settings


def _meta_transformer(family: type[FlowModel], path: str, revision: str | None) -> nn.Module | None:
    """The base model's transformer built from its config on the meta device (shapes, no weights), when
    its config is at hand (a local directory or the hub cache); else None and the check waits for the load."""
    try:
        cls = family.transformer_class()
        local = Path(path).expanduser()
        if local.is_dir():
            config = cls.load_config(str(local / "transformer"))
        else:
            config = cls.load_config(path, subfolder="transformer", revision=revision, local_files_only=True)
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception:  # an early check only: the real load reports whatever is wrong with the model
        return None


def load_model(settings: dict, device: str | None, dtype: str) -> FlowModel:
    """The base model of ``resolve``'s settings on ``device`` (None: cuda if available, else cpu), weights in
    ``dtype`` (a ModelConfig dtype: auto, float32, bfloat16, float16)."""
    from fdfo.config import ModelConfig

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_cfg = ModelConfig(path=settings["model"], revision=settings["revision"], dtype=dtype,
                            max_sequence_length=settings["max_sequence_length"], resolution=settings["resolution"],
                            cache_dir=settings["cache_dir"])
    family = family_for(model_cfg)
    options = family.Options(**settings["model_options"].get(family.family, {})) if family.Options else None
    return load_flow_model(model_cfg, device, options=options, shift=settings["shift"])


def check_model(model: FlowModel, ckpt: Checkpoint | None, settings: dict) -> None:
    """What can only be checked against the loaded model, before any sampling: the resolution and
    whether the checkpoint fits (for a base model whose config was not at hand before loading)."""
    resolution = settings["resolution"]
    if resolution is not None:
        step, largest = model.resolution_step()
        if resolution % step or (largest and resolution > largest):
            upto = f" up to {largest}" if largest else ""
            raise ValueError(f"resolution {resolution} does not suit base model '{settings['model']}'; "
                             f"give --resolution as a multiple of {step}{upto}")
    if ckpt is not None:
        check_checkpoint(model.transformer, ckpt, settings["model"])
