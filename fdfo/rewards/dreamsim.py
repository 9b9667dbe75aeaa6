"""DreamSim diversity of a prompt's images: the mean pairwise DreamSim distance between them.

DreamSim (Fu et al., 2023; the ``dreamsim`` package) embeds an image with an ensemble of three
ViT-B/16 backbones fine-tuned with LoRA on human similarity judgements: DINO (the CLS token of
its last block), OpenAI CLIP and OpenCLIP (their projected image embeddings). The embedding is
their concatenation, centred and L2-normalised; the distance of two images is 1 − cos of their
embeddings (``model(img_a, img_b)``). Images go through DreamSim's own preprocessing: an 8-bit
PIL image resized to 224×224 (bicubic; the aspect ratio is not kept).

The published diversity figure is, for each prompt, the mean of that distance over the pairs of
its images (4 per prompt), averaged over prompts. ``DreamSimDiversity.embed_images`` returns
the unit embeddings, so that ``mean_pairwise_distance`` of a prompt's embeddings (1 − dot,
averaged over pairs i < j) is the mean of ``model(a, b)`` over its pairs.

Weights come only from a local directory (``--path dreamsim_diversity=DIR``), never from the
network: the cache that ``dreamsim(pretrained=True, cache_dir=DIR)`` fills on its first call,
i.e. DreamSim's checkpoint archive (CLIP and OpenCLIP backbones, DINO's head, the ensemble's
LoRA adapter) and, through torch.hub, DINO's code and weights. To get it, on a machine with
network::

    pip install dreamsim==0.2.1
    python -c "from dreamsim import dreamsim; dreamsim(pretrained=True, device='cpu', cache_dir='DIR')"

then copy DIR over. A missing or incomplete DIR is an error that lists the missing files; the
``dreamsim`` package is only called once every file it would otherwise download is there.
The package itself (with open_clip_torch, peft and a torchvision built for the installed torch,
which it imports) must be installed: it is not a dependency of fdfo.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import Tensor

from fdfo.rewards.base import RewardUnavailable, mean_pairwise_distance, to_uint8

DREAMSIM_VERSION = "0.2.1"
DREAMSIM_TYPE = "ensemble"  # the published DreamSim: DINO + CLIP + OpenCLIP ViT-B/16
HOW_TO_GET = (f"on a machine with network run `pip install dreamsim=={DREAMSIM_VERSION}` and `python -c \"from "
              "dreamsim import dreamsim; dreamsim(pretrained=True, device='cpu', cache_dir='DIR')\"`, copy DIR "
              "here and pass --path dreamsim_diversity=DIR")
# What dreamsim(pretrained=True, cache_dir=DIR) reads from DIR for the ensemble (and downloads when absent).
CACHE_FILES = (
    "dino_vitb16_pretrain.pth",                 # DreamSim's archive: DINO's projection head
    "clip_vitb16_pretrain.pth.tar",             # DreamSim's archive: OpenAI CLIP ViT-B/16 backbone
    "open_clip_vitb16_pretrain.pth.tar",        # DreamSim's archive: OpenCLIP ViT-B/16 backbone
    "ensemble_lora/adapter_config.json",        # DreamSim's archive: the ensemble's LoRA adapter
    "facebookresearch_dino_main/hubconf.py",    # torch.hub: DINO's code
    "checkpoints/dino_vitbase16_pretrain.pth",  # torch.hub: DINO ViT-B/16 weights
)
ADAPTER_WEIGHTS = ("ensemble_lora/adapter_model.safetensors", "ensemble_lora/adapter_model.bin")
NOTE = ("mean pairwise DreamSim distance (1 - cosine of DreamSim ensemble embeddings) across the repeats of "
        "each prompt, averaged over prompts")


def missing_cache_files(cache_dir: str | Path) -> list[str]:
    """The files of DreamSim's cache that ``cache_dir`` lacks (empty: complete)."""
    root = Path(cache_dir)
    missing = [name for name in CACHE_FILES if not (root / name).is_file()]
    if not any((root / name).is_file() for name in ADAPTER_WEIGHTS):
        missing.append(" or ".join(ADAPTER_WEIGHTS))
    return missing


def check_cache(path: str | None) -> Path:
    """The cache directory, complete; RewardUnavailable without a path, FileNotFoundError when incomplete."""
    if path in (None, "", "default"):
        raise RewardUnavailable("DreamSim diversity is not available: no weights given (it never downloads); "
                                + HOW_TO_GET)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dreamsim_diversity: '{path}' " + ("is a file" if root.exists() else "does not exist")
                                + "; give the directory DreamSim cached its weights in: " + HOW_TO_GET)
    missing = missing_cache_files(root)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise FileNotFoundError(f"dreamsim_diversity: '{path}' is not a complete DreamSim cache (it lacks {shown}); "
                                + HOW_TO_GET)
    return root


def _import_dreamsim():
    try:
        import dreamsim
    except Exception as exc:  # ImportError, or e.g. the RuntimeError of a torchvision built for another torch
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RewardUnavailable(
            f"DreamSim diversity is not available: the dreamsim package cannot be imported ({reason}); install "
            f"dreamsim=={DREAMSIM_VERSION} with a torchvision built for this torch ({torch.__version__})") from exc
    return dreamsim


class DreamSimDiversity:
    """Image embedder of the DreamSim diversity: ``embed_images`` -> unit DreamSim embeddings [B, D]."""

    name = "dreamsim_diversity"
    note = NOTE

    def __init__(self, path: str | None = None, *, device: torch.device | str = "cpu", batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.cache_dir = check_cache(path)  # before anything is imported: never a download
        package = _import_dreamsim()
        self.device, self.batch_size = torch.device(device), batch_size
        hub_dir = torch.hub.get_dir()  # dreamsim points torch.hub at its cache; put it back afterwards
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its "Using cached ..." line
                self.model, self.preprocess = package.dreamsim(
                    pretrained=True, device=str(self.device), cache_dir=str(self.cache_dir), normalize_embeds=True,
                    dreamsim_type=DREAMSIM_TYPE)
        except Exception as exc:  # a damaged cache fails in many ways (pickle, zip, peft, hub)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FileNotFoundError(f"dreamsim_diversity: DreamSim could not be loaded from '{path}' ({reason}); "
                                    "the cache may be damaged: " + HOW_TO_GET) from exc
        finally:
            torch.hub.set_dir(hub_dir)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """[B, C, H, W] in [0, 1] -> unit DreamSim embeddings [B, D] (float32, on self.device), each image
        quantised to 8 bits and preprocessed by DreamSim as a PIL image."""
        from PIL import Image

        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
        out = []
        for i in range(0, len(pixels), self.batch_size):
            batch = torch.cat([self.preprocess(Image.fromarray(p)) for p in pixels[i:i + self.batch_size]])
            out.append(self.model.embed(batch.to(self.device)).float().reshape(len(batch), -1))
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def diversity(self, images: Tensor) -> Tensor:
        """The DreamSim diversity of one prompt's images: the mean pairwise distance (NaN for one image)."""
        return mean_pairwise_distance(self.embed_images(images).cpu())
