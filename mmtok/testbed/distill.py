"""Teach a testbed's image encoder to emit the visual tokens a trained testbed's language model reads.

``testbed-qwen2vl`` takes its language model from ``testbed-llava`` (:mod:`mmtok.testbed.transfer`), but its
vision tower starts from scratch, and the answer loss alone reaches it only through a language model that has
never seen its tokens: on an H200, 1,266 steps of 32 items left held-out accuracy at chance and
``media_gain`` near 0 (issue #4, session 6). The trained Llava computes, for every scene, exactly the
256 tokens (one per 21 px layout cell) that this language model answers from; Qwen2-VL's merger emits one
token per 28 px cell of the same scene at 448 px, the same 16 x 16 grid in the same row-major order
(:mod:`mmtok.testbed.media_grid`). So the student's tokens can be regressed onto the teacher's, token by
token, in the language model's input space: a dense target for every image token from the first step.

This is hint-based feature distillation (Romero et al., 2015, "FitNets: Hints for Thin Deep Nets",
Sec. 2.2: the student's guided layer is trained to predict the teacher's hint layer by an L2 loss), with
the hint taken at the teacher's projector output and no regressor, since both live in the same
``hidden_size`` space of the shared language model. The loss is normalised by the teacher tokens' mean
squared norm, so its scale does not depend on the teacher's.

The scale matters: Llava's projected tokens have a norm of about 74 against 1.4 for a word embedding, and
its language model reads them at that norm; a Qwen2-VL tower trained with the dense probe alone had tokens
pointing the right way (cosine 0.83 to the teacher's) at a norm of 1.7, and its answers stayed at chance.
Adam moves a weight by about the learning rate per step, so the loss alone needs thousands of steps to
grow them 40-fold. :func:`fit_output_layer` starts distillation with the least-squares (ridge) solution of
the merger's last linear layer on a batch of scenes instead, the closed-form optimum of the same loss for
that layer with the rest of the encoder fixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmtok.testbed.curriculum import image_features
from mmtok.testbed.media_grid import model_kind
from mmtok.testbed.models import encode_items


def feature_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the student's tokens to the teacher's, over the teacher's mean squared norm.

    Args:
        student: ``[n_images, N, hidden]`` the student's visual tokens (gradients flow into its encoder).
        teacher: ``[n_images, N, hidden]`` the teacher's visual tokens (targets; no gradient is taken).

    Returns:
        A scalar: 0 when the tokens are equal, 1 when the student emits zeros.

    Raises:
        ValueError: the shapes differ.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student tokens {tuple(student.shape)} and teacher tokens {tuple(teacher.shape)} differ; "
                         "distillation needs one teacher token per student token (same grid, same hidden size)")
    teacher = teacher.detach().to(student.dtype)
    scale = teacher.pow(2).sum(-1).mean().clamp_min(1e-12)
    return (student - teacher).pow(2).sum(-1).mean() / scale


class FeatureTeacher:
    """A trained Llava testbed, frozen, giving the projected visual tokens of images.

    Args:
        source: an exported Llava testbed directory (e.g. ``assets/testbed-llava``), loaded through
            :func:`mmtok.load`.
        device: where the teacher runs.

    Raises:
        ValueError: the directory is not a saved model, or its model is not a Llava testbed.
    """

    def __init__(self, source: str | Path, device: str | torch.device = "cpu") -> None:
        from mmtok.loading import load

        model, processor = load(Path(source), dtype=torch.float32)
        if model_kind(model) != "llava":
            raise ValueError(f"the distillation teacher must be a Llava testbed (CLIP + projector), "
                             f"{source} holds {type(model).__name__}")
        self.model = model.to(device).eval().requires_grad_(False)
        self.image_processor = processor.image_processor
        self.source = str(source)

    @property
    def hidden_size(self) -> int:
        """Width of the teacher's visual tokens (its language model's hidden size)."""
        return int(self.model.config.text_config.hidden_size)

    def pixels(self, images: list[Any]) -> torch.Tensor:
        """``[n_images, 3, H, W]``: the teacher's own preprocessing of PIL images (run in data workers)."""
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n_images, N, hidden]``: the visual tokens the teacher's language model receives."""
        device = next(self.model.parameters()).device
        return image_features(self.model, pixel_values.to(device))


@torch.no_grad()
def fit_output_layer(model: Any, processor: Any, teacher: FeatureTeacher, items: list[Any],
                     ridge: float = 1e-3) -> dict[str, float]:
    """Set a Qwen2-VL model's merger output layer to the ridge-regression fit of the teacher's tokens, in place.

    With ``X`` the layer's inputs ``[n_tokens, d_in]`` (a column of ones appended for the bias) and ``T`` the
    teacher's tokens ``[n_tokens, hidden]`` of the same scenes, the weights become
    ``(X^T X + ridge * tr(X^T X) / d * I)^-1 X^T T``.

    Args:
        model: a Qwen2-VL testbed model whose image tokens lie on the scenes' grid.
        processor: its processor.
        teacher: the frozen teacher.
        items: image items to fit on (a few dozen: 256 tokens each).
        ridge: the regulariser, relative to the mean diagonal of ``X^T X``.

    Returns:
        ``{"before": loss, "after": loss}``: :func:`feature_distill_loss` on ``items`` before and after.

    Raises:
        ValueError: not a Qwen2-VL model, or items without images.
    """
    if model_kind(model) != "qwen2vl":
        raise ValueError(f"fit_output_layer fits a Qwen2-VL merger, not {type(model).__name__}")
    images = [it for it in items if it.modality == "image"]
    if not images:
        raise ValueError("fit_output_layer needs image items")
    layer = model.model.visual.merger.mlp[-1]
    batch = encode_items(processor, images)
    device = layer.weight.device
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        out = model.model.get_image_features(batch["pixel_values"].to(device), batch["image_grid_thw"].to(device),
                                             return_dict=True)
    finally:
        handle.remove()
    student = torch.stack(list(out.pooler_output))
    target = teacher.tokens(teacher.pixels([it.media for it in images])).to(device, student.dtype)
    before = float(feature_distill_loss(student, target))
    x = torch.cat([seen[0].double(), torch.ones(len(seen[0]), 1, dtype=torch.float64, device=device)], 1)
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=device)
    solution = torch.linalg.solve(gram, x.T @ target.reshape(-1, target.shape[-1]).double())
    layer.weight.copy_(solution[:-1].T.to(layer.weight.dtype))
    layer.bias.copy_(solution[-1].to(layer.bias.dtype))
    after_out = model.model.get_image_features(batch["pixel_values"].to(device), batch["image_grid_thw"].to(device),
                                               return_dict=True)
    after = float(feature_distill_loss(torch.stack(list(after_out.pooler_output)), target))
    return {"before": before, "after": after}
