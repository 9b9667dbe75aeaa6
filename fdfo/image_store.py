"""An evaluation's images on disk, one PNG per (prompt set, model, prompt, repeat), so that a killed
run continues from what it had made.

    images/<set>/<model>/pPPPPP_rR.png     prompt PPPPP of the set, repeat R (seed = seed + R)

Each file is written atomically (``fdfo.atomic``: a temporary sibling, flushed, renamed), so an image
under its own name is whole; ``has`` also checks the PNG's first and last bytes, so that a file cut
short by other means (a copy, a full disk) is made again instead of trusted. A killed writer leaves
only its temporary file (``.pPPPPP_rR.png.*.tmp``), which ``remove_partial`` deletes.

Scores are computed from these files, 8-bit as every reward model reads its images, so a resumed run
scores exactly the images on disk (on a CPU, where the sampler is deterministic, the same pixels as an
uninterrupted run; on a GPU in bf16, an image sampled in another batch can differ in its last bits).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from fdfo import atomic
from fdfo.images import to_pil

PNG_START = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk that closes every PNG


class ImageStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, set_name: str, model: str, prompt: int, repeat: int) -> Path:
        return self.root / set_name / model / f"p{prompt:05d}_r{repeat}.png"

    def has(self, set_name: str, model: str, prompt: int, repeat: int) -> bool:
        """The image is on disk, whole (a PNG from its signature to its end chunk)."""
        path = self.path(set_name, model, prompt, repeat)
        try:
            with open(path, "rb") as f:
                head = f.read(len(PNG_START))
                if head != PNG_START or f.seek(0, 2) < len(PNG_START) + len(PNG_END):
                    return False
                f.seek(-len(PNG_END), 2)
                return f.read() == PNG_END
        except OSError:
            return False

    def write(self, set_name: str, model: str, prompt: int, repeat: int, image: torch.Tensor) -> None:
        """Image [C, H, W] in [0, 1] (one channel: a grey PNG), atomically."""
        pil = to_pil(image)
        atomic.write_file(self.path(set_name, model, prompt, repeat), lambda tmp: pil.save(tmp, format="PNG"))

    def read(self, set_name: str, model: str, prompt: int, repeat: int) -> torch.Tensor:
        """The image as [C, H, W] float32 in [0, 1] (C = 1 for a grey PNG, else 3)."""
        from PIL import Image

        path = self.path(set_name, model, prompt, repeat)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L" if im.mode in ("L", "I", "I;16") else "RGB"))
        except (OSError, SyntaxError) as exc:  # (PIL raises SyntaxError for some broken files)
            raise ValueError(f"image '{path}' cannot be read ({exc}); delete it and rerun the same command "
                             "to make it again") from exc
        t = torch.from_numpy(arr.copy()).float() / 255
        return t[None] if t.ndim == 2 else t.permute(2, 0, 1)

    def fingerprint(self, set_name: str, model: str, prompts: int, repeats: int) -> str:
        """A digest of the names, sizes and modification times of a (set, model)'s images: it changes when
        any of them is made again. A missing image is an error (every rank must see every image)."""
        digest = hashlib.sha256()
        for i in range(prompts):
            for r in range(repeats):
                path = self.path(set_name, model, i, r)
                try:
                    st = path.stat()
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"image '{path}' is missing after every rank finished sampling: --out must be on a file "
                        "system that every rank sees") from None
                digest.update(f"{path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def remove_partial(self) -> int:
        """Delete the temporary files that killed writers left; returns how many."""
        count = 0
        if self.root.is_dir():
            for tmp in self.root.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                count += 1
        return count

    def any_images(self) -> bool:
        return self.root.is_dir() and any(self.root.rglob("*.png"))


__all__ = ["ImageStore"]
