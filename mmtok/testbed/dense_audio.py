"""Dense per-token targets of the audio items, for training ``testbed-audio`` (images: ``dense``; videos: ``dense_video``).

``testbed-audio``'s encoder turns a clip's 10 ms mel frames into one language-model token per
``TOKEN_MS`` = 40 ms (Whisper's stride-2 convolution, then Qwen2-Audio's stride-2 pooling; Chu et al.,
"Qwen2-Audio Technical Report", 2024, Sec. 2: "each frame of the encoder output approximately corresponds
to a 40ms segment of the original audio signal"), and the scene gives every event's span in whole
milliseconds. So each audio token has exact targets, the same three hops as for images: the tied read-out
says which kind of event sounds during most of the token's 40 ms ("none", "tone" or "chirp", words the
questions use), the relevance marks say whether the token lies in one of the question's key spans
(``scene["query"]["key"]``), and the answer position attends to those tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmtok.testbed.data.items import QAItem

TOKEN_MS = 40
KIND_CLASSES = ("none", "tone", "chirp")
AUDIO_HEADS = (KIND_CLASSES,)


def _overlap(lo: int, hi: int, n: int) -> torch.Tensor:
    """``[n]`` milliseconds of ``[lo, hi)`` inside each token's ``[i * TOKEN_MS, (i + 1) * TOKEN_MS)``."""
    starts = torch.arange(n) * TOKEN_MS
    return (torch.clamp(torch.minimum(starts + TOKEN_MS, torch.tensor(hi)) - torch.maximum(starts, torch.tensor(lo)),
                        min=0))


def audio_token_labels(scene: dict[str, Any]) -> torch.Tensor:
    """``[T]`` long: the event kind (index into :data:`KIND_CLASSES`) sounding over most of each token.

    ``T = duration_ms / TOKEN_MS``; a token is an event's when the event covers more than half of it.

    Raises:
        ValueError: the duration is not a whole number of tokens.
    """
    duration = scene["duration_ms"]
    if duration % TOKEN_MS:
        raise ValueError(f"a clip of {duration} ms is not a whole number of {TOKEN_MS} ms audio tokens")
    n = duration // TOKEN_MS
    out = torch.zeros(n, dtype=torch.long)
    for ev in scene["events"]:
        covered = _overlap(ev["start_ms"], ev["start_ms"] + ev["dur_ms"], n) * 2 > TOKEN_MS
        out[covered] = KIND_CLASSES.index(ev["kind"])
    return out


def audio_key_tokens(scene: dict[str, Any]) -> torch.Tensor:
    """``[T]`` long: 1 on the tokens that overlap a key span of the question (``[start_ms, end_ms)``), else 0."""
    n = scene["duration_ms"] // TOKEN_MS
    out = torch.zeros(n, dtype=torch.long)
    for lo, hi in scene["query"]["key"]:
        out[_overlap(lo, hi, n) > 0] = 1
    return out


def audio_batch_labels(items: Sequence[QAItem]) -> torch.Tensor:
    """``[n_audio, T, 3]`` targets of the audio items: event kind, key flag and answer-word order (always 0).

    Raises:
        ValueError: ``items`` holds no audio.
    """
    rows = [torch.stack([audio_token_labels(it.scene), audio_key_tokens(it.scene),
                         torch.zeros(it.scene["duration_ms"] // TOKEN_MS, dtype=torch.long)], 1)
            for it in items if it.modality == "audio"]
    if not rows:
        raise ValueError("audio_batch_labels needs at least one audio item")
    return torch.stack(rows)
