"""Reading the caller's media (images, videos) and matching them to the prompts' placeholders.

Everything here runs before any model code, so a missing file, a corrupt image or a prompt whose
placeholders do not match its media fails with a ``ValueError`` while nothing has run yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The generic markers a caller may write in any prompt; adapters translate them to the model's own.
GENERIC_MARKERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}

# Frames per second assumed for a video given as an array of frames (qwen-vl-utils' sampling default).
DEFAULT_FPS = 2.0


@dataclass
class Video:
    """A decoded video: sampled RGB frames and the rate they were sampled at.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 frames in time order.
        fps: sampled frames per second of the original clip's time (``T / duration``).
    """

    frames: np.ndarray
    fps: float = DEFAULT_FPS

    @property
    def num_frames(self) -> int:
        """``T``."""
        return int(self.frames.shape[0])


def per_row(media: Any, batch: int, single: bool, name: str) -> list[list[Any]]:
    """Normalise a media argument to one list of items per prompt.

    Args:
        media: None; for one prompt an item or a list of items; for ``batch`` prompts a list with one
            entry per prompt (an item, a list of items, or None).
        batch: number of prompts.
        single: whether the caller passed one prompt as a ``str``.
        name: the argument's name, for messages.

    Raises:
        ValueError: a list of the wrong length for a batch of prompts.
    """
    if media is None:
        return [[] for _ in range(batch)]
    if single:
        return [list(media) if isinstance(media, (list, tuple)) else [media]]
    if not isinstance(media, (list, tuple)) or len(media) != batch:
        got = f"a list of {len(media)}" if isinstance(media, (list, tuple)) else type(media).__name__
        raise ValueError(
            f"with {batch} prompts, {name} must be a list of {batch} entries (an item, a list of items or None "
            f"per prompt), got {got}"
        )
    return [[] if m is None else list(m) if isinstance(m, (list, tuple)) else [m] for m in media]


def load_image(x: Any) -> Any:
    """An image as the processor wants it: paths are opened and fully decoded as RGB ``PIL.Image``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a decodable image.
    """
    if isinstance(x, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        path = Path(x)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"could not decode image {path}: {err}") from err
    if type(x).__module__.startswith("PIL."):
        return x.convert("RGB")
    return x


def load_video(x: Any, num_frames: int) -> Video:
    """A video as sampled frames.

    Args:
        x: a path (decoded with PyAV, ``num_frames`` frames sampled uniformly over the clip), a
            :class:`Video`, an array ``[T, H, W, 3]`` (uint8 or float in [0, 255]), or a list of
            ``PIL.Image`` frames (both taken as they are, at :data:`DEFAULT_FPS`).
        num_frames: frames to sample from a file.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be decoded, has no frames, or the array has the wrong shape.
    """
    if isinstance(x, Video):
        return x
    if isinstance(x, (str, Path)):
        return _decode_video(Path(x), num_frames)
    if isinstance(x, (list, tuple)) and x and all(type(f).__module__.startswith("PIL.") for f in x):
        x = np.stack([np.asarray(f.convert("RGB")) for f in x])
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"a video array must have shape [T, H, W, 3] with T >= 1, got {tuple(arr.shape)}")
    return Video(np.clip(arr, 0, 255).astype(np.uint8), DEFAULT_FPS)


def _decode_video(path: Path, num_frames: int) -> Video:
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            duration = float(container.duration or 0) / 1e6
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except av.error.FFmpegError as err:
        raise ValueError(f"could not decode video {path}: {err}") from err
    if not frames:
        raise ValueError(f"video {path} has no decodable frames")
    count = min(num_frames, len(frames))
    index = np.linspace(0, len(frames) - 1, count).round().astype(int)
    duration = duration if duration > 0 else len(frames) / float(stream.average_rate or DEFAULT_FPS)
    return Video(np.stack([frames[i] for i in index]), count / duration)


def normalise_prompts(
    prompts: Sequence[str],
    rows: dict[str, list[list[Any]]],
    markers: dict[str, str],
    chat: Any = None,
) -> list[str]:
    """Check each prompt's placeholders against its media; insert them when a prompt has none.

    Args:
        prompts: the ``B`` prompts.
        rows: per modality, per prompt, the media items.
        markers: per modality, the model's own placeholder text (e.g. ``"<image>"`` or
            ``"<|vision_start|><|image_pad|><|vision_end|>"``). The generic markers ``<image>`` /
            ``<video>`` are accepted in any prompt and replaced by these.
        chat: a callable ``(text, counts) -> str | None`` that wraps a prompt with no placeholders in the
            model's chat template with its media first; where it gives None the placeholders are prefixed.

    Returns:
        The prompts, each holding exactly one model placeholder per item, in the items' order.

    Raises:
        ValueError: a prompt has placeholders but not exactly one per item given for it.
    """
    out = []
    single = len(prompts) == 1
    for b, p in enumerate(prompts):
        for m, mark in markers.items():
            generic = GENERIC_MARKERS[m]
            if generic != mark and generic in p:
                p = p.replace(generic, mark)
        counts = {m: len(rows[m][b]) for m in markers}
        found = {m: p.count(mark) for m, mark in markers.items()}
        if not any(found.values()) and any(counts.values()):
            wrapped = chat(p, counts) if chat is not None else None
            p = wrapped if wrapped is not None else "".join(markers[m] * counts[m] for m in markers) + "\n" + p
        else:
            for m, mark in markers.items():
                if found[m] != counts[m]:
                    where = "the prompt" if single else f"prompt {b}"
                    raise ValueError(
                        f"{where} has {found[m]} {m} placeholder(s) ({GENERIC_MARKERS[m]!r} or {mark!r}) but "
                        f"{counts[m]} {m}(s) were given for it; write one placeholder where each {m} goes, or none "
                        f"to put them all before the text"
                    )
        out.append(p)
    return out
