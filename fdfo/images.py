"""Pictures from image tensors: one image as a PIL image, and a labelled grid of them.

Every picture fdfo writes goes through here (generate's files and grid, evaluate's report, the
protocol's grid and image store, the trainer's sample grids), so the same tensor gives the same
pixels wherever it is drawn. Labels are set in DejaVu Sans (Bitstream Vera licence), the font that
ships with matplotlib: PIL's built-in font runs the words of a prompt together.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import torch


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] -> 8-bit pixel values (clamped, rounded to nearest) of the same shape and device:
    what saving them as a PNG keeps."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil(image: torch.Tensor, min_side: int = 0):
    """[C, H, W] in [0, 1], or 8-bit pixels as ``quantize`` gives them (uint8, taken as they are) -> PIL
    image (grey for one channel), upscaled (nearest) to at least min_side."""
    from PIL import Image

    arr = (image if image.dtype == torch.uint8 else quantize(image)).cpu().numpy()
    pil = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    if min_side and min(pil.size) < min_side:
        k = math.ceil(min_side / min(pil.size))
        pil = pil.resize((pil.width * k, pil.height * k), Image.NEAREST)
    return pil


def image_grid(rows: list[list[torch.Tensor | None]], row_labels: list[str], col_labels: list[str],
               captions: list[list[str]] | None = None, min_side: int = 96, label_width: int = 220):
    """A labelled grid: rows of images [C, H, W] as ``to_pil`` takes them (None leaves a blank cell),
    optional caption under each."""
    from PIL import Image, ImageDraw

    first = next(img for row in rows for img in row if img is not None)
    cell = to_pil(first, min_side).size
    pad, header = 6, 16
    cap_h = 12 * max((len(c.splitlines()) for row in captions for c in row), default=0) if captions else 0
    step_y = cell[1] + cap_h + pad
    width = label_width + max(len(r) for r in rows) * (cell[0] + pad) + pad
    canvas = Image.new("RGB", (width, header + len(rows) * step_y + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.font = label_font()
    for c, text in enumerate(col_labels):
        draw.text((label_width + c * (cell[0] + pad) + pad, 2), text, fill="black")
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        y = header + r * step_y + pad
        for k, line in enumerate(_wrap(text, 34)[: max(1, (cell[1] + cap_h) // 12)]):
            draw.text((4, y + 12 * k), line, fill="black")
        for c, img in enumerate(row):
            x = label_width + c * (cell[0] + pad) + pad
            if img is not None:
                canvas.paste(to_pil(img, min_side).convert("RGB").resize(cell), (x, y))
            if captions and captions[r][c]:
                draw.multiline_text((x, y + cell[1] + 1), captions[r][c], fill="black", spacing=1)
    return canvas


@functools.cache
def label_font(size: int = 10):
    """DejaVu Sans at ``size`` pixels, from matplotlib's own fonts (found without importing matplotlib)."""
    from PIL import ImageFont

    package = Path(importlib.util.find_spec("matplotlib").submodule_search_locations[0])
    return ImageFont.truetype(str(package / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def _wrap(text: str, width: int) -> list[str]:
    """Words of ``text`` on lines of at most ``width`` characters (a longer word stands alone)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])
