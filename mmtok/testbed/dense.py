"""Dense per-token supervision of a testbed model's visual tokens during training (the probe is not shipped).

Answer-only training gives one or two supervised words per image of 256 visual tokens, and a model trained
from scratch first learns to answer from the question alone (``media_gain`` stays at 0 for thousands of
steps: the run-1 and run-2 failures of issue #4). Like the caption-alignment stage of LLaVA (Liu et al.,
2023, Sec. 4.2 "Stage 1: pre-training for feature alignment"), which teaches the projector what the visual
tokens mean before instruction tuning, we give every visual token a target of its own: a linear probe on the
projector's output predicts, for the grid cell under that token, the colour and shape of the object there
(or "none" / "box" / "label") and the label character there. The scene description gives these labels
exactly, because the image generator lays objects out on the same grid as the model's patches
(:data:`mmtok.testbed.data.images.CELL`). A second dense target supervises the other hop a question needs:
at each visual token, the language model's own next-word logits for "yes" / "no" are trained to say whether
its cell is one the question is about (the scene's key boxes; :func:`relevance_loss`). Both losses are added
to the answer loss with a weight; the probe has no weights of its own (it reads out through the tied word
embeddings), so the shipped model is the stock architecture with nothing extra.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmtok.testbed.attention_rows import QueryRows
from mmtok.testbed.data.images import relation_winner
from mmtok.testbed.data.items import ALPHABET, COLOUR_NAMES, SHAPES, QAItem
from mmtok.testbed.relation_swaps import swaps

COLOUR_CLASSES = ("none", *COLOUR_NAMES)
SHAPE_CLASSES = ("none", *SHAPES, "box", "label")
CHAR_CLASSES = ("none", *ALPHABET)
VISUAL_HEADS = (COLOUR_CLASSES, SHAPE_CLASSES, CHAR_CLASSES)  # the probe heads of image and video tokens
VERTICAL_CLASSES = ("top", "bottom")
HORIZONTAL_CLASSES = ("left", "right")
# Image tokens also name the half of the image they lie in, in the words of the position questions.
IMAGE_HEADS = (*VISUAL_HEADS, VERTICAL_CLASSES, HORIZONTAL_CLASSES)
# With the position ramp, those two heads read the grid axis (0: rows, 1: columns) as a soft target.
IMAGE_RAMPS = {3: 0, 4: 1}
IGNORE = -100
# Values of the key-flag column of the dense labels: a key cell, a cell of a relation's colour-shape swap, and
# one of a position question's look-alikes.
KEY, SWAP, LOOKALIKE = 1, 2, 3
TEMPERATURE = 10.0  # cosine logits in [-10, 10]: confident enough for a near-zero loss, bounded norms


def cell_labels(scene: dict[str, Any], cell: int) -> torch.Tensor:
    """Per-cell targets of one image scene, row-major over the ``size / cell`` square grid.

    A cell takes the colour and shape of the object whose box overlaps it (a 2 x 2 object labels all four
    cells), ``"box"`` where only the box outline crosses it, ``"label"`` (colour ``"none"``) and the
    character under it on the label.

    Args:
        scene: an image scene from :mod:`mmtok.testbed.data.images` (``size``, ``objects``, optional
            ``frame`` and ``label``).
        cell: grid pitch in pixels (the model's patch size).

    Returns:
        ``[G * G, 3]`` long tensor of class indices into (:data:`COLOUR_CLASSES`, :data:`SHAPE_CLASSES`,
        :data:`CHAR_CLASSES`), ``G = size // cell``.

    Raises:
        ValueError: ``size`` is not a multiple of ``cell``.
    """
    size = scene["size"]
    if cell < 1 or size % cell:
        raise ValueError(f"image size {size} is not a multiple of the cell size {cell}")
    g = size // cell
    out = torch.zeros(g, g, 3, dtype=torch.long)

    def cells(box: Sequence[int]) -> tuple[slice, slice]:
        x0, y0, x1, y1 = box
        return slice(y0 // cell, (y1 - 1) // cell + 1), slice(x0 // cell, (x1 - 1) // cell + 1)

    if "frame" in scene:
        rows, cols = cells(scene["frame"]["box"])
        out[rows, cols, 1] = SHAPE_CLASSES.index("box")
    for obj in scene["objects"]:
        rows, cols = cells(obj["box"])
        out[rows, cols, 0] = COLOUR_CLASSES.index(obj["colour"])
        out[rows, cols, 1] = SHAPE_CLASSES.index(obj["shape"])
    if "label" in scene:
        label = scene["label"]
        rows, cols = cells(label["box"])
        out[rows, cols, 0] = 0
        out[rows, cols, 1] = SHAPE_CLASSES.index("label")
        pitch = label.get("pitch", cell)
        x0, y0 = label["box"][0], label["box"][1]
        for i, ch in enumerate(label["text"]):
            cx = (x0 + i * pitch + pitch // 2) // cell
            out[y0 // cell, cx, 2] = CHAR_CLASSES.index(ch)
    return out.reshape(g * g, 3)


def half_labels(g: int) -> torch.Tensor:
    """``[G * G, 2]`` long, row-major: each cell's half of the image (:data:`VERTICAL_CLASSES`, :data:`HORIZONTAL_CLASSES`).

    A cell of the top half is "top" (0), of the left half "left" (0); ``G`` is even on every testbed grid,
    so no cell straddles a half. These are the words of the position questions ("the ... in the top left
    quadrant"): with them each visual token says where it is in words the language model reads, as the other
    heads make it say what is there. Without them the shipped model of session 4 found the named quadrant's
    object about half the time (its attention mass on it: 0.53). The tokens can only learn them once the
    vision tower codes positions at a readable size (:mod:`mmtok.testbed.position_code`).

    Raises:
        ValueError: ``g`` is odd.
    """
    if g % 2:
        raise ValueError(f"the grid side must be even to split it in halves, got {g}")
    rows = torch.arange(g)[:, None].expand(g, g)
    cols = torch.arange(g)[None, :].expand(g, g)
    return torch.stack([(rows >= g // 2).long(), (cols >= g // 2).long()], -1).reshape(g * g, 2)


def position_ramp(g: int, axis: int) -> torch.Tensor:
    """``[G * G]`` float, row-major: each cell's place along ``axis`` (0: rows, 1: columns), ``(i + 0.5) / G``.

    The soft target of a half head under the position ramp (:class:`DenseProbe`): a cell of column ``i`` is
    "right" with probability ``(i + 0.5) / G``. With hard halves, two objects in the same half give their tokens
    the same target, and "which is further left, the A or the B?" has nothing to compare: the shipped
    testbed-llava and testbed-qwen2vl, trained with hard halves, answered the left / right questions at chance
    (21 of 40 held-out items) and the higher / lower ones at 82 % (49 of 60), which the language model's 1-D
    positions order for it (the image tokens run row by row). The
    ramp's optimum, ``logit(right) - logit(left) = log((i + 0.5) / (G - i - 0.5))``, rises with the column,
    so the difference of the two words' scores is a monotone read-out of the place that an attention head
    can compare; the half stays its argmax.

    Raises:
        ValueError: ``axis`` is not 0 or 1, or ``g`` < 1.
    """
    if axis not in (0, 1) or g < 1:
        raise ValueError(f"a position ramp runs along axis 0 (rows) or 1 (columns) of a grid side >= 1, "
                         f"got axis {axis}, side {g}")
    index = torch.arange(g * g)
    place = index // g if axis == 0 else index % g
    return (place.float() + 0.5) / g


def key_cells(scene: dict[str, Any], cell: int) -> torch.Tensor:
    """``[G * G]`` long: 1 on the cells under the scene's key boxes (``scene["query"]["key"]``), else 0.

    The key boxes are what the question is about (the counted objects, the object in the named quadrant,
    the two compared objects, the label, the box outline and its content ...); an "is there" question whose
    answer is "no" has none.
    """
    g = scene["size"] // cell
    out = torch.zeros(g, g, dtype=torch.long)
    for x0, y0, x1, y1 in scene["query"]["key"]:
        out[y0 // cell:(y1 - 1) // cell + 1, x0 // cell:(x1 - 1) // cell + 1] = 1
    return out.reshape(g * g)


def swap_cells(scene: dict[str, Any], cell: int) -> torch.Tensor:
    """``[G * G]`` long: 1 on the cells of a relation scene's colour-shape swaps that no key box covers, else 0.

    "Which is further left, the orange square or the purple diamond?" with an orange diamond in the clutter:
    the diamond pairs one named object's colour with the other's shape (:func:`mmtok.testbed.relation_swaps.swaps`),
    and a mark that matches single words says "yes" on it (docs/testbed.md, recipe items 15 and 16). Scenes of
    other families are all 0.
    """
    g = scene["size"] // cell
    out = torch.zeros(g, g, dtype=torch.long)
    query = scene["query"]
    if "relation" in query:
        boxes = [list(b) for b in query["key"]]
        named = [f"{o['colour']} {o['shape']}" for b in boxes for o in scene["objects"] if list(o["box"]) == b]
        for o in swaps(named, scene["objects"]):
            x0, y0, x1, y1 = o["box"]
            out[y0 // cell:(y1 - 1) // cell + 1, x0 // cell:(x1 - 1) // cell + 1] = 1
    return out.reshape(g * g) * (1 - key_cells(scene, cell))


def lookalike_cells(scene: dict[str, Any], cell: int) -> torch.Tensor:
    """``[G * G]`` long: 1 on the cells of a position scene's look-alikes, else 0.

    "What colour is the diamond in the top left quadrant?" is asked of a scene with one diamond in each
    quadrant: the three outside the named quadrant match the question's shape word and differ only by where
    they are. Run B's stage marked all of them "yes" after the first layer, as the key (mean mark 3.6 against
    the key's 3.7 on 60 held-out items), and a fifth of its short position answers named one of them. As
    their own class of the marks (``lookalike_class`` of :func:`relevance_terms`) they weigh as much as the
    ~250 other tokens together; in a 900-step stage of the first layer's marks this made the marks hedge
    (-2.6 on the key and the look-alikes alike) rather than tell them apart (docs/testbed.md, session 18).
    Scenes of other families are all 0.
    """
    g = scene["size"] // cell
    out = torch.zeros(g, g, dtype=torch.long)
    query = scene["query"]
    if "region" in query:
        key = list(query["key"][0])
        named = "shape" if query["ask"] == "colour" else "colour"
        target = next(o for o in scene["objects"] if list(o["box"]) == key)
        for o in scene["objects"]:
            if o[named] == target[named] and list(o["box"]) != key:
                x0, y0, x1, y1 = o["box"]
                out[y0 // cell:(y1 - 1) // cell + 1, x0 // cell:(x1 - 1) // cell + 1] = 1
    return out.reshape(g * g) * (1 - key_cells(scene, cell))


def answer_order(scene: dict[str, Any], cell: int, relation_every_word: bool = False) -> torch.Tensor:
    """``[G * G]`` long: which answer words read each cell, as bits (bit ``i - 1`` set: answer word ``i``), else 0.

    A "read" answer is the label's characters in order, one answer word each, so answer word ``i`` has one
    cell to read: the one whose bit ``i - 1`` this sets (``1 << (i - 1)``). A "relation" answer names one of
    the two compared objects (the scene's two key boxes), so its first word reads the cells of that object
    (bit 0): supervising it toward both, as the key flags do, taught the model to find the pair but not to
    choose (session 4's model put 0.9 of its mass on the pair, 0.11 on the answer). With
    ``relation_every_word`` both words of that answer ("colour shape") read the object (bits 0 and 1): left
    free, the second word often took the other object's shape ("blue cross" for "blue triangle" beside an
    orange cross; 27 of 49 wrong short relation answers of run B's stage). Other scenes are all 0.
    """
    g = scene["size"] // cell
    out = torch.zeros(g, g, dtype=torch.long)
    query = scene["query"]
    if "relation" in query:
        x0, y0, x1, y1 = query["key"][relation_winner(query["relation"], *query["key"])]
        out[y0 // cell:(y1 - 1) // cell + 1, x0 // cell:(x1 - 1) // cell + 1] = 0b11 if relation_every_word else 1
    if "label" in scene:
        label = scene["label"]
        pitch = label.get("pitch", cell)
        x0, y0 = label["box"][0], label["box"][1]
        for i in range(len(label["text"])):
            out[y0 // cell, (x0 + i * pitch + pitch // 2) // cell] = 1 << i
    return out.reshape(g * g)


def batch_labels(items: Sequence[QAItem], cell: int, relation_every_word: bool = False) -> torch.Tensor:
    """``[n_images, G * G, 7]`` targets of the image items in ``items`` (other modalities are skipped).

    Columns: colour, shape and character classes (:func:`cell_labels`), the vertical and horizontal half
    (:func:`half_labels`; the probe heads :data:`IMAGE_HEADS` read these five), the key flag (1 on
    :func:`key_cells`, 2 on :func:`swap_cells`, 3 on :func:`lookalike_cells`, else 0: :data:`KEY`,
    :data:`SWAP`, :data:`LOOKALIKE`) and the answer words that read the cell (:func:`answer_order`, as bits;
    ``relation_every_word`` is its option).
    """
    rows = [torch.cat([cell_labels(it.scene, cell), half_labels(it.scene["size"] // cell),
                       (KEY * key_cells(it.scene, cell) + SWAP * swap_cells(it.scene, cell)
                        + LOOKALIKE * lookalike_cells(it.scene, cell))[:, None],
                       answer_order(it.scene, cell, relation_every_word)[:, None]], 1)
            for it in items if it.modality == "image"]
    if not rows:
        raise ValueError("batch_labels needs at least one image item")
    return torch.stack(rows)


class DenseProbe(torch.nn.Module):
    """A linear read-out of each media token: by default the colour, shape and character logits of its cell.

    The read-out is the language model's own (tied) word embedding matrix: class ``k`` of a head scores
    the token against the embedding of word ``k``, so a red circle's token is pulled toward the words "red"
    and "circle" that the questions use, which is what LLaVA's alignment stage achieves with a pretrained
    language model. The scores are cosine similarities times ``TEMPERATURE``: with raw dot products the loss
    is lowered fastest by inflating the visual tokens' norms (to ~100x the word embeddings' in a first run),
    and tokens that large drown everything the language model's layers add to them. The probe has no
    weights of its own. Other heads (``heads``: one tuple of class words each) read out other media, e.g.
    the event kind of an audio token (:mod:`mmtok.testbed.dense_audio`).

    ``balanced``: each head's loss is the mean over the classes that occur of each class's mean
    cross-entropy (:func:`balanced_mean`) instead of the mean over tokens, for heads whose rare classes carry
    the answers (an audio clip's chirp covers ~4 % of its tokens; with the token mean, ``testbed-audio``'s
    encoder read 116 of 159 held-out chirp tokens as "tone").

    ``ramps`` (head index -> grid axis; :data:`IMAGE_RAMPS` for the half heads of images): those two-class
    heads are trained toward the soft :func:`position_ramp` of their token's cell instead of its hard label,
    by the KL divergence (0 at the optimum) averaged over the tokens whose label is not ignored; the tokens
    lie row-major on a square grid, so the cell is the token's index.
    """

    def __init__(self, word_embeddings: torch.nn.Embedding, word_ids: Sequence[Sequence[int]],
                 heads: Sequence[Sequence[str]] = VISUAL_HEADS, balanced: bool = False,
                 ramps: Mapping[int, int] | None = None) -> None:
        super().__init__()
        self.balanced = balanced
        self.sizes = tuple(len(classes) for classes in heads)
        if tuple(len(ids) for ids in word_ids) != self.sizes:
            raise ValueError(f"word_ids must list {self.sizes} ids for the {len(heads)} heads, "
                             f"got {tuple(len(ids) for ids in word_ids)}")
        self.ramps = dict(ramps or {})
        for k in self.ramps:
            if not 0 <= k < len(self.sizes) or self.sizes[k] != 2:
                raise ValueError(f"a position ramp needs a two-class head; head {k} of sizes {self.sizes} is not one")
        self.register_buffer("ids", torch.tensor([i for ids in word_ids for i in ids]), persistent=False)
        self.words = [word_embeddings]  # a list: not registered, so its weight is the model's, not ours

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., sum(sizes)]`` class logits of ``tokens`` ``[..., hidden]``."""
        words = torch.nn.functional.normalize(self.words[0].weight[self.ids], dim=-1)
        return TEMPERATURE * torch.nn.functional.normalize(tokens, dim=-1) @ words.T

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the heads' mean (or class-balanced mean) cross-entropies.

        Args:
            tokens: ``[n_media, N, hidden]`` media tokens as the language model receives them.
            labels: ``[n_media, N, >= n_heads]`` targets, one column per head first (e.g. from
                :func:`batch_labels`).

        Returns:
            Scalar loss.

        Raises:
            ValueError: token and label shapes disagree.
        """
        if tokens.shape[:2] != labels.shape[:2]:
            raise ValueError(f"{tuple(tokens.shape[:2])} visual tokens but labels for {tuple(labels.shape[:2])}")
        logits = self.logits(tokens).float().split(self.sizes, dim=-1)
        total = tokens.new_zeros((), dtype=torch.float32)
        for k, lg in enumerate(logits):
            target = labels[..., k].reshape(-1)
            if k in self.ramps:
                total = total + ramp_loss(lg, labels[..., k] != IGNORE, self.ramps[k])
                continue
            if not self.balanced:
                total = total + torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), target,
                                                                  ignore_index=IGNORE)
                continue
            keep = target != IGNORE
            losses = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1])[keep], target[keep],
                                                       reduction="none")
            total = total + balanced_mean(*class_sums(losses, target[keep], self.sizes[k]))
        return total


def ramp_loss(logits: torch.Tensor, keep: torch.Tensor, axis: int) -> torch.Tensor:
    """KL divergence of two-class ``logits`` ``[n_media, N, 2]`` from the :func:`position_ramp` of their cells.

    Args:
        logits: the head's scores of tokens lying row-major on a square grid of ``N`` cells.
        keep: ``[n_media, N]`` bool, the tokens that count.
        axis: 0 (rows) or 1 (columns).

    Returns:
        Scalar mean over the kept tokens (0 when none is kept).

    Raises:
        ValueError: ``N`` is not a square.
    """
    n = logits.shape[1]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"a position ramp needs tokens on a square grid, got {n} per medium")
    q = position_ramp(g, axis).to(logits.device)
    target = torch.stack([1 - q, q], -1).expand_as(logits)
    each = (target * (target.log() - logits.log_softmax(-1))).sum(-1)
    return each[keep].sum() / keep.sum().clamp_min(1)


def relevance_loss(logits: torch.Tensor, visual_cells: torch.Tensor, key: torch.Tensor, yes_id: int, no_id: int,
                   swap_class: bool = False, lookalike_class: bool = False) -> torch.Tensor:
    """Class-balanced cross-entropy of the language model saying "yes" at the visual tokens the question is about.

    The second supervised hop: with the question before the image, each visual token can read the question
    in the language model's layers; at its position the model's own next-word logits, restricted to "yes" /
    "no", are trained to say whether its cell is a key cell. The answer position then only has to attend to
    tokens the model already marked, instead of discovering both hops from the answer loss alone.

    Args:
        logits: ``[B, L, V]`` next-word logits (the training loop reads them out after the first layer).
        visual_cells: ``[B, L]`` long, the grid cell of each visual token, -1 elsewhere.
        key: ``[B, N]`` the key flags of the cells (:data:`KEY` on key cells, :data:`SWAP` on swap cells,
            :data:`LOOKALIKE` on look-alike cells, 0 else; the key-flag column of :func:`batch_labels`).
        yes_id: token id of "yes".
        no_id: token id of "no".
        swap_class: weigh the swap tokens (target "no") as a class of their own (recipe item 16); otherwise
            they are other tokens.
        lookalike_class: weigh a position question's look-alike tokens (target "no",
            :func:`lookalike_cells`) as a class of their own; otherwise they are other tokens.

    Returns:
        Scalar: mean over key tokens plus mean over the others, halved (the mean over whichever kind exists
        when a batch has only one); with ``swap_class`` / ``lookalike_class``, the mean of the key, other,
        swap and look-alike tokens' means (over the classes the batch has).
    """
    return balanced_mean(*relevance_terms(logits, visual_cells, key, yes_id, no_id, swap_class, lookalike_class))


def relevance_terms(logits: torch.Tensor, visual_cells: torch.Tensor, key: torch.Tensor, yes_id: int, no_id: int,
                    swap_class: bool = False, lookalike_class: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums and counts behind :func:`relevance_loss`, so that sub-batches can be pooled exactly.

    Returns:
        ``[4]`` float sums of the cross-entropies over the other tokens, the key tokens, the swap tokens and
        the look-alike tokens, and ``[4]`` long counts of those tokens (the swap class is empty unless
        ``swap_class``, the look-alike class unless ``lookalike_class``).
    """
    rows, cols = (visual_cells >= 0).nonzero(as_tuple=True)
    flag = key[rows, visual_cells[rows, cols]]
    target = (flag == KEY).long()
    group = torch.where(flag == SWAP, SWAP if swap_class else 0, target)
    group = torch.where(flag == LOOKALIKE, LOOKALIKE if lookalike_class else 0, group)
    two = logits[rows, cols][:, [no_id, yes_id]].float()
    each = torch.nn.functional.cross_entropy(two, target, reduction="none")
    classes = (0, KEY, SWAP, LOOKALIKE)
    return (torch.stack([each[group == v].sum() for v in classes]),
            torch.stack([(group == v).sum() for v in classes]))


def class_sums(losses: torch.Tensor, target: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n_classes]`` sums of ``losses`` ``[N]`` per ``target`` class ``[N]`` and their counts, for :func:`balanced_mean`."""
    return losses.new_zeros(n_classes).index_add(0, target, losses), torch.bincount(target, minlength=n_classes)


def balanced_mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of the per-class means ``sums / counts`` over the classes that occur (see :func:`relevance_terms`).

    Raises:
        ValueError: no class occurs (no media tokens).
    """
    present = counts > 0
    if not bool(present.any()):
        raise ValueError("no media tokens to mark: the batch has no visual cells")
    return (sums[present] / counts[present]).sum() / present.sum()


def attention_loss(attn: torch.Tensor | QueryRows, labels: torch.Tensor, visual_cells: torch.Tensor, key: torch.Tensor,
                   order: torch.Tensor | None = None, head: int = 0) -> torch.Tensor:
    """Negative log of the attention mass one head puts on the cells each answer word must read.

    The third hop, supervised directly (attention supervision, as in Liu et al., "Attention Correctness in
    Neural Image Captioning", AAAI 2017, Sec. 3.2, where each generated word is supervised toward its own
    image region): the position that predicts the first answer word should look at the key tokens of the
    question. Where ``order`` marks cells (a "read" answer, one word per label character), each answer word
    ``i`` is supervised instead toward the cells whose bit ``i - 1`` is set, its mean over the words: the
    answer is then read off left to right rather than guessed as a whole. Rows without key tokens ("is there
    ...?" with answer "no") are left out.

    Args:
        attn: ``[B, H, L, L]`` one layer's attention probabilities, or the supervised head's rows at the
            answer-predicting positions (:func:`mmtok.testbed.attention_rows.query_rows`, which spares the
            language model eager attention).
        labels: ``[B, L]`` answer labels (``-100`` off the answer); the position before each answer word is
            the one that predicts it.
        visual_cells: ``[B, L]`` the grid cell of each visual token, -1 elsewhere.
        key: ``[B, N]`` key flags of the cells (the cells flagged :data:`KEY` are read; swap cells are not).
        order: ``[B, N]`` the answer words that read each cell, as bits (bit ``i - 1``: word ``i``), 0
            elsewhere (the last column of :func:`batch_labels`, :func:`answer_order`); None supervises the
            first answer word only.
        head: the supervised head (the others stay free); ignored for :class:`QueryRows`, which hold one.

    Returns:
        Scalar mean over rows with key tokens (0 when no row has any).
    """
    total, count = attention_terms(attn, labels, visual_cells, key, order, head)
    return total / count if count else total


def attention_terms(attn: torch.Tensor | QueryRows, labels: torch.Tensor, visual_cells: torch.Tensor,
                    key: torch.Tensor, order: torch.Tensor | None = None, head: int = 0) -> tuple[torch.Tensor, int]:
    """The sum over rows and the row count behind :func:`attention_loss` (same arguments), for pooling."""
    def row(b: int, position: int) -> torch.Tensor:
        return attn.at(b, position) if isinstance(attn, QueryRows) else attn[b, head, position]

    losses = []
    for b in range(labels.shape[0]):
        answer = (labels[b] != IGNORE).nonzero()[:, 0]
        vis = visual_cells[b] >= 0
        on_key = torch.zeros_like(vis)
        on_key[vis] = key[b, visual_cells[b, vis]] == KEY
        if len(answer) == 0 or not bool(on_key.any()):
            continue
        words = torch.zeros_like(visual_cells[b])
        if order is not None:
            words[vis] = order[b, visual_cells[b, vis]]
        n_words = min(int(words.max()).bit_length(), len(answer))
        if n_words == 0:
            losses.append(-torch.log(row(b, int(answer[0]) - 1)[on_key].sum().float().clamp_min(1e-6)))
            continue
        masses = torch.stack([row(b, int(answer[i]) - 1)[(words >> i) & 1 == 1].sum() for i in range(n_words)])
        losses.append(-torch.log(masses.float().clamp_min(1e-6)).mean())
    if not losses:
        return labels.new_zeros((), dtype=torch.float), 0
    return torch.stack(losses).sum(), len(losses)


def class_word_ids(tokenizer: Any, heads: Sequence[Sequence[str]] = VISUAL_HEADS) -> list[list[int]]:
    """Token ids of the class words of the heads ("none" is the pad token; "box", "label" are words).

    Raises:
        ValueError: a class word is not a single known token of ``tokenizer``.
    """
    out = []
    for classes in heads:
        ids = []
        for word in classes:
            tok = tokenizer.pad_token if word == "none" else word
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no token for the probe class word {word!r}")
            ids.append(int(i))
        out.append(ids)
    return out
