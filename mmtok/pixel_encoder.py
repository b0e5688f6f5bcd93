"""A model-free stand-in encoder: image patches as tokens, for ``mmtok compress`` without a VLM.

It exists so that every compressor can be run on a real image with no model at hand (the demo, the
compressor benchmark). Its signals are stand-ins and are labelled as such wherever they are shown:

- features: each ``patch x patch`` RGB patch, standardised over the image and projected to ``dim``
  by a fixed seeded Gaussian matrix (a Johnson-Lindenstrauss projection, so cosine similarity
  between patches is roughly preserved);
- ``cls_attn``: pixel saliency, the softmax of each patch's distance from the mean patch (where
  a CLS token's attention would come from the vision tower);
- ``signals["mid_attn"]``: local contrast, the softmax of each patch's distance from the mean of its
  3 x 3 neighbourhood (where a middle vision layer's attention would come from, for ``hiprune``);
- ``text``: one token, the mean feature (a query-agnostic "what the whole image is about"), where
  a prompt's text embeddings would come from the LLM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmtok.core import VisualTokens


def open_image(source: str | Path | Image.Image) -> Image.Image:
    """Open an image file (or pass a PIL image through) as RGB, with a clear error if it is not one."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image ({err}); use a PNG, JPEG, WebP, ... file") from err


def pixel_tokens(
    image: str | Path | Image.Image,
    *,
    grid: tuple[int, int] = (24, 24),
    patch: int = 14,
    dim: int = 256,
    seed: int = 0,
) -> VisualTokens:
    """Turn an image into ``H x W`` patch tokens with stand-in signals (see the module docstring).

    Args:
        image: a path or a PIL image.
        grid: ``(H, W)`` tokens; the image is resized to ``(H * patch, W * patch)`` pixels.
        patch: patch side in pixels (14, as in CLIP ViT-L/14 at 336 px).
        dim: feature width after projection.
        seed: seed of the projection matrix.

    Returns:
        :class:`VisualTokens` with features ``[1, H*W, dim]``, ``grid``, ``cls_attn`` ``[1, H*W]`` and
        ``text`` ``[1, 1, dim]``.
    """
    gh, gw = grid
    if gh < 1 or gw < 1 or patch < 1 or dim < 1:
        raise ValueError(f"grid, patch and dim must be positive, got grid={grid}, patch={patch}, dim={dim}")
    img = open_image(image).resize((gw * patch, gh * patch), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    patches = arr.reshape(gh, patch, gw, patch, 3).permute(0, 2, 1, 3, 4).reshape(gh * gw, -1)
    standard = (patches - patches.mean(0)) / patches.std(0).clamp(min=1e-3)
    proj = torch.randn(standard.shape[1], dim, generator=torch.Generator().manual_seed(seed))
    feats = standard @ proj / standard.shape[1] ** 0.5
    distance = (patches - patches.mean(0)).norm(dim=1)
    saliency = torch.softmax(distance / distance.std().clamp(min=1e-6), dim=0)
    pix = patches.reshape(gh, gw, -1).permute(2, 0, 1).unsqueeze(0)
    local = torch.nn.functional.avg_pool2d(pix, 3, stride=1, padding=1, count_include_pad=False)
    contrast = (pix - local).squeeze(0).norm(dim=0).reshape(-1)
    local_saliency = torch.softmax(contrast / contrast.std().clamp(min=1e-6), dim=0)
    return VisualTokens(
        feats.unsqueeze(0),
        grid=(gh, gw),
        cls_attn=saliency.unsqueeze(0),
        text=feats.mean(0, keepdim=True).unsqueeze(0),
        signals={"mid_attn": local_saliency.unsqueeze(0)},
    )
