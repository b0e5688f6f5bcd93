"""Loading a model and its processor: ``mmtok.load`` (local dirs, ``testbed-*`` names, cached hub ids).

:func:`load` checks that a directory has its weights and tokenizer before anything is read (and says how to
fetch what is missing), picks the model class from the config (:func:`model_class`) and falls back to
:class:`ProcessorParts` where the stock processor class needs torchvision. Re-exported by :mod:`mmtok.api`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class ProcessorParts:
    """A model's processor given as its parts, for when the stock processor class cannot be built.

    transformers' video processors need torchvision; without it ``AutoProcessor`` fails for models
    whose processor holds one (Qwen2-VL, Qwen2.5-VL). The adapters only need the tokenizer, the image
    processor, the video processor's settings and the chat template, which this holds.

    Attributes:
        tokenizer: the model's tokenizer.
        image_processor: its image processor (the PIL backend where torchvision is missing).
        video_processor: its video processor, or None.
        video_config: the video processor's saved settings (``video_preprocessor_config.json``).
        chat_template: the processor's chat template, or None.
    """

    tokenizer: Any
    image_processor: Any
    video_processor: Any = None
    video_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """The tokenizer's ``apply_chat_template`` with the processor's template."""
        if self.chat_template is not None:
            kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Tokenize text (the media go through the adapter, which knows the placeholders)."""
        return self.tokenizer(*args, **kwargs)


def resolve_path(name_or_path: str | Path) -> tuple[Path | None, str]:
    """A local directory (for ``testbed-*`` names and paths) or None and the hub id.

    Raises:
        ValueError: a ``testbed-*`` model that is not installed.
    """
    name = str(name_or_path)
    if name.startswith("testbed-"):
        path = ROOT / "assets" / name
        if not path.is_dir():
            raise ValueError(
                f"the offline testbed model {name!r} is not installed: {path} does not exist. Build it with "
                "`mmtok testbed` (or pass a local model directory or a downloaded hub id)"
            )
        return path, name
    path = Path(name).expanduser()
    if path.is_dir():
        return path, name
    if path.is_absolute() or name.startswith(".") or name.count("/") != 1:
        raise ValueError(f"{name!r} is neither a model directory nor a Hugging Face hub id of the form 'org/name'")
    return None, name


def missing_files(path: Path) -> list[str]:
    """The files a model directory lacks for ``from_pretrained`` (config, weights, tokenizer)."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES) and not list(path.glob("*.safetensors")):
        missing.append("model weights (model.safetensors or model-*.safetensors + index)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json / tokenizer.model / vocab.json)")
    return missing


def _hub_missing(repo: str) -> list[str]:
    from huggingface_hub import try_to_load_from_cache

    want = ["config.json", "preprocessor_config.json", "tokenizer_config.json"]
    return [f for f in want if not isinstance(try_to_load_from_cache(repo, f), str)]


def load(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load a vision- or audio-language model and its processor with the stock Hugging Face classes.

    Args:
        name_or_path: ``"testbed-<name>"`` (the offline testbed under ``assets/``), a local directory
            saved with ``save_pretrained``, or a hub id such as ``"llava-hf/llava-1.5-7b-hf"`` that is
            already in the local Hugging Face cache (nothing is downloaded here).
        dtype: ``torch.float16`` / ``"bfloat16"`` / ``"auto"``...; the checkpoint's default when None.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``, ``"cuda:0"``).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...; the default when None.

    Returns:
        ``(model, processor)``: the model in eval mode (the class :func:`model_class` picks) and its
        ``AutoProcessor`` (a :class:`ProcessorParts` where the stock processor needs torchvision and it is
        missing).

    Raises:
        ValueError: a testbed model that is not installed, a directory that lacks files, or a hub id
            whose files are not in the local cache (the message says which files and how to get them), or
            a checkpoint no transformers class loads.
    """
    path, name = resolve_path(name_or_path)
    if path is not None and (missing := missing_files(path)):
        raise ValueError(
            f"model directory {path} is missing {', '.join(missing)}; save the model there with "
            "save_pretrained(), or download a checkpoint with `huggingface-cli download <org/name> --local-dir "
            f"{path}` on a machine with network access"
        )
    source = str(path) if path is not None else name
    kwargs: dict[str, Any] = {"local_files_only": True}
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must be a torch dtype or its name (float32, float16, bfloat16) or 'auto', got {dtype!r}")
        dtype = getattr(torch, dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = model_class(source).from_pretrained(source, **kwargs)
        processor = load_processor(source)
    except OSError as err:
        if path is not None:
            raise
        missing = _hub_missing(name)
        raise ValueError(
            f"the files of {name!r} are not on this machine (missing from the Hugging Face cache: "
            f"{', '.join(missing) or 'the model weights'}). With network access run `huggingface-cli download "
            f"{name} --local-dir <dir>`, copy <dir> here and pass mmtok.load('<dir>')"
        ) from err
    return model.eval(), processor


def model_class(source: str) -> Any:
    """The class that loads a checkpoint: the first auto class mapping its config, else its architecture.

    ``AutoModelForImageTextToText`` (LLaVA, Qwen2-VL ...), then ``AutoModelForMultimodalLM`` (which also
    maps Qwen2-Audio), then the first transformers class named in ``config.architectures``.

    Raises:
        OSError: the config is not on this machine.
        ValueError: no transformers class loads it.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoModelForMultimodalLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        MODEL_FOR_MULTIMODAL_LM_MAPPING,
    )

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    for auto, mapping in ((AutoModelForImageTextToText, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING),
                          (AutoModelForMultimodalLM, MODEL_FOR_MULTIMODAL_LM_MAPPING)):
        if type(config) in mapping:
            return auto
    for name in config.architectures or ():
        if isinstance(cls := getattr(transformers, name, None), type):
            return cls
    raise ValueError(f"no transformers class loads {source!r} (model type {config.model_type!r}, architectures "
                     f"{config.architectures}); mmtok.load takes vision- and audio-language models")


def load_processor(source: str) -> Any:
    """``AutoProcessor.from_pretrained``, or its parts when the stock class needs torchvision."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(source, local_files_only=True)
    except (ImportError, ValueError) as err:  # a video processor class without torchvision raises either
        if "torchvision" not in str(err).lower():
            raise
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
    video_config, template = {}, getattr(tokenizer, "chat_template", None)
    path = Path(source)
    if (path / "video_preprocessor_config.json").is_file():
        video_config = json.loads((path / "video_preprocessor_config.json").read_text())
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    return ProcessorParts(tokenizer, image_processor, None, video_config, template)


# ---------------------------------------------------------------------- compress_then_generate
