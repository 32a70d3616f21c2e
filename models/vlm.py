"""Loading a VLM and reading its visual encoder: shared by every stage.

A hub id (``Qwen/Qwen2-VL-7B-Instruct``) and a local ``save_pretrained`` folder (such as the tiny
model from ``models/tiny.py``) load the same way; ``load_trained_vlm`` loads a stage-1 folder
(base + LoRA adapter, quantised as trained). Prompt building lives elsewhere.
"""
from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Sequence

import torch
from peft import PeftModel
from PIL import Image
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
from transformers.image_utils import SizeDict

from models.backbones import BACKBONES, backbone_for, visual_modules
from utils.checkpoints import META_FILE, file_id, rewrite_hint, verify_file
from utils.errors import UserError, first_line
from utils.records import VLMRecord

log = logging.getLogger(__name__)

QUANT_CHOICES = ("4bit",)
# Stage 1's --attn_implementation (transformers' names); left out, transformers chooses (sdpa).
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
# The hub processor of Qwen2-VL-7B-Instruct allows 12,845,056 pixels (16,384 visual tokens) per
# image; without a cap a large photo would need tens of GB. 1280 merged 28x28 patches is the
# transformers default and Qwen's recommended budget.
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
# Left in bf16 by 4-bit loading of a Qwen model: the visual encoder (its pooled features must
# equal stage 2's full-precision feature cache) and the output layer. Prefixes of module names
# (transformers 5); every family's own list is in models.backbones.
BNB_SKIP_MODULES = BACKBONES["qwen2_vl"].keep_unquantised


# Stage 3's --vlm_dtype: the dtype of the VLM's weights that are not quantised (all of them
# without --quant 4bit). fp32 is the reference code's; bf16 halves the memory.
VLM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# How the later stages load a trained stage 1 by default (stage 3's --quant and --vlm_dtype, the
# reference code's): the base unquantised, in float32. Stage 1's evaluation loads it so too, so
# its test accuracy is the VLM row stage 3 reports.
LATER_STAGES_QUANT = "none"
LATER_STAGES_DTYPE = "fp32"
# The LoRA adapter's weights in a stage-1 folder (PEFT's name); VLMRecord.adapter_id is its file_id.
ADAPTER_FILE = "adapter_model.safetensors"


def vlm_torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a ``--vlm_dtype`` value; None (a gate.pt written before the dtype was
    recorded) keeps transformers' default, the checkpoint's own dtype, as such a gate was made."""
    return None if name is None else VLM_DTYPES[name]


def resolve_quant(choice: str | None, device: torch.device) -> str | None:
    """``auto`` (the paper's QLoRA where it can run): 4-bit on CUDA with bitsandbytes, else none."""
    if choice == "auto":
        usable = device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
        return "4bit" if usable else None
    return None if choice in (None, "none") else choice


def _check_model_id(model_id: str | Path) -> None:
    """Fail early on a missing local folder: the hub would only say it is not a valid repo id."""
    model_id = str(model_id)
    is_hub_id = model_id.count("/") <= 1 and not model_id.startswith((".", "/", "~"))
    if not Path(model_id).exists() and not is_hub_id:
        raise UserError(f"--vlm_model {model_id}: no such folder; build a tiny one with "
                        "`python -m models.tiny` or give a hub id such as Qwen/Qwen2-VL-7B-Instruct")


def _load_error(model_id: str, err: Exception) -> UserError:
    what = "cannot load this folder" if Path(model_id).exists() else "not a local folder nor a cached hub id"
    return UserError(f"--vlm_model {model_id}: {what} ({first_line(err)})")


def load_processor(model_id: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model's processor, with batched prompts padded on the left (needed for generation).

    The pixel budget per image is ``[min_pixels, max_pixels]``; None keeps the checkpoint's own
    value, except that its upper bound is capped at ``DEFAULT_MAX_PIXELS``.
    """
    _check_model_id(model_id)
    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        raise _load_error(model_id, err) from None
    processor.tokenizer.padding_side = "left"
    # The image processor's size holds the pixel budget (shortest_edge = min, longest_edge = max).
    size = processor.image_processor.size
    if size.longest_edge is None:  # fixed-size tiles (LLaVA-OneVision): no pixel budget to set
        if min_pixels or max_pixels:
            flag = "--min_pixels" if min_pixels else "--max_pixels"
            raise UserError(f"{flag}: {model_id} resizes images to fixed tiles and takes no pixel budget; "
                            "leave it out")
        return processor
    min_pixels = min_pixels or size.shortest_edge
    max_pixels = max_pixels or min(size.longest_edge, DEFAULT_MAX_PIXELS)
    if min_pixels > max_pixels:
        raise UserError(f"--min_pixels {min_pixels} is above --max_pixels {max_pixels}; lower it or raise --max_pixels")
    processor.image_processor.size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
    return processor


def _quantization_config(quant: str, device: torch.device, keep_unquantised: Sequence[str]):
    if quant not in QUANT_CHOICES:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANT_CHOICES)} or leave it out")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UserError(f"--quant {quant} needs a CUDA GPU (bitsandbytes); drop --quant to run in full precision")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--quant {quant} needs bitsandbytes: pip install -r requirements-qlora.txt")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=list(keep_unquantised))


def check_attn_implementation(name: str | None, device: torch.device) -> None:
    """Refuse an attention implementation that cannot run here before any weight loads."""
    if name not in (None, *ATTN_IMPLEMENTATIONS):
        raise UserError(f"--attn_implementation {name}: choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        if device.type != "cuda":
            raise UserError("--attn_implementation flash_attention_2 needs a CUDA GPU; leave it out (or use sdpa)")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("--attn_implementation flash_attention_2 needs the flash-attn package "
                            "(pip install flash-attn); leave it out (or use sdpa)")


def attn_implementation(model) -> str | None:
    """The attention implementation a loaded model (peft-wrapped or not) runs with."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None)


def load_vlm(model_id: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
             quant: str | None = None, adapter: str | Path | None = None, trainable: bool = False,
             attn_implementation: str | None = None):
    """Load the VLM (optionally 4-bit, optionally with a LoRA adapter) on ``device``.

    ``dtype`` None keeps transformers' default; ``attn_implementation`` (``ATTN_IMPLEMENTATIONS``)
    None keeps transformers' choice (``sdpa`` where torch has it); the model is in eval mode
    unless ``trainable``.
    """
    device = torch.device(device)
    kwargs = {} if dtype is None else {"dtype": dtype}
    check_attn_implementation(attn_implementation, device)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    _check_model_id(model_id)
    try:
        config = AutoConfig.from_pretrained(model_id)
        backbone = backbone_for(config)  # an unsupported family fails here, before any weight loads
        if quant is not None:
            kwargs["quantization_config"] = _quantization_config(quant, device, backbone.keep_unquantised)
            kwargs["device_map"] = {"": device.index or 0}  # bitsandbytes places weights while loading
        model = AutoModelForImageTextToText.from_pretrained(model_id, config=config, **kwargs)
    except ImportError as err:  # e.g. an attention implementation's package missing or too old
        raise UserError(f"--vlm_model {model_id}: {first_line(err)}") from None
    except (OSError, ValueError) as err:
        raise _load_error(model_id, err) from None
    if quant is None:
        model.to(device)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"adapter {adapter}: no adapter_config.json there; point to the folder "
                            "written by the instruction-tuning stage")
        try:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
        except SafetensorError as err:  # a truncated or damaged adapter file
            raise UserError(f"{Path(adapter) / 'adapter_model.safetensors'}: cannot read it ({first_line(err)}); "
                            f"{rewrite_hint('vlm', Path(adapter).parent.name)}") from None
    model.train(trainable)
    return model


def vision_hidden_size(model_or_config) -> int:
    """Width of one pooled visual feature (the visual tokens the language model receives), from the config."""
    config = getattr(model_or_config, "config", model_or_config)
    return backbone_for(config).feature_width(config)


def pooled_image_features(model, processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Mean of each image's visual tokens: (len(images), vision_hidden_size), float32 on CPU.

    Runs only the visual encoder (and its merger or projector); images may have different sizes.
    """
    return backbone_for(model).pooled_features(model, processor, images)


@contextmanager
def vision_dtype(model, dtype: torch.dtype | None):
    """Run the visual encoder in ``dtype`` inside the block, then restore it. A checkpoint stored in
    bf16 loads in bf16 while stage 2 encoded it in float32 on CPU; the float32 upcast of bf16 weights
    is exact, so the features equal stage 2's cache."""
    modules = visual_modules(model)
    original = next(modules[0].parameters()).dtype
    if dtype is None or dtype == original:
        yield
        return
    for module in modules:
        module.to(dtype)
    try:
        yield
    finally:
        for module in modules:
            module.to(original)


@torch.no_grad()
def head_features(model, processor, images: Sequence[Image.Image], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The head's input: pooled visual features of the base VLM, as stage 2 cached them (in ``dtype``,
    the one recorded with the cache), even when ``model`` carries stage 1's adapter (a LoRA may
    touch the vision tower)."""
    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext(), vision_dtype(model, dtype):
        return pooled_image_features(model, processor, images)


def trained_quant(recorded: str | None, quant: str | None, device: str | torch.device) -> str | None:
    """How to load the base under a stage-1 adapter trained on a ``recorded`` base (``VLMRecord.quant``):
    ``quant`` None means as trained, falling back to full precision, with a warning, where 4-bit cannot
    run (no CUDA or no bitsandbytes); ``"none"`` full precision; ``"4bit"`` 4-bit NF4."""
    if quant is not None:
        return resolve_quant(quant, torch.device(device))
    if recorded is not None and resolve_quant("auto", torch.device(device)) != recorded:
        log.warning("the adapter was trained on a %s base, which cannot load on %s here; "
                    "using the full-precision base", recorded, device)
        return None
    return recorded


def base_model_path(vlm: VLMRecord, vlm_model: str | None, vlm_dir: str | Path) -> str:
    """Where to read the base model of a stage-1 folder (its record ``vlm``) from.

    ``--vlm_model`` is a consistency check, not a switch: it must name the base the adapter was
    trained on (``vlm.base_model``). The one exception is a local base folder that moved:
    a folder whose ``config.json`` is identical to the recorded one (``vlm.base_config_id``)
    is taken as the same model.
    """
    recorded = vlm.base_model
    if vlm_model is None or vlm_model == recorded:
        if vlm_model is None and _looks_local(recorded) and not Path(recorded).exists():
            raise UserError(f"{vlm_dir}: its base model folder {recorded} is gone; if it moved, pass the "
                            "new location with --vlm_model")
        return recorded
    config = Path(vlm_model) / "config.json"
    if vlm.base_config_id and config.is_file() and file_id(config) == vlm.base_config_id:
        return str(vlm_model)
    raise UserError(f"{vlm_dir}: adapter trained on --vlm_model {recorded!r}, not {vlm_model!r}; "
                    "--vlm_model must name that same base model (or its moved local folder); "
                    "leave it out or retrain stage 1")


def _looks_local(model_id: str) -> bool:
    # A hub id is "name" or "owner/name"; a short relative folder is indistinguishable from one.
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1


def load_trained_vlm(vlm_dir: str | Path, device: str | torch.device, vlm_model: str | None = None,
                     quant: str | None = None, dtype: torch.dtype | None = None):
    """``(model, processor, record)`` from a stage-1 folder: base VLM + LoRA adapter, eval mode, and
    the folder's :class:`utils.records.VLMRecord`.

    ``vlm_model`` None reads the base from the record's ``base_model``; otherwise it must name that
    same model (see :func:`base_model_path`). ``quant`` None loads the base as it was trained
    (see :func:`trained_quant`), ``"none"`` in full precision, ``"4bit"`` in 4-bit. ``dtype`` is that
    of the weights left unquantised (None: the checkpoint's own). The adapter file must be the one
    the record's ``adapter_id`` names (a damaged one is refused, naming stage 1's command).
    """
    vlm_dir = Path(vlm_dir)
    vlm = VLMRecord.load(vlm_dir, vlm_dir.parent.name)
    base = base_model_path(vlm, vlm_model, vlm_dir)
    verify_file(vlm_dir / ADAPTER_FILE, vlm.adapter_id, "adapter_id", vlm_dir / META_FILE, "vlm", vlm_dir.parent.name)
    processor = load_processor(str(vlm_dir), vlm.min_pixels, vlm.max_pixels)
    model = load_vlm(base, device, dtype=dtype, quant=trained_quant(vlm.quant, quant, device), adapter=vlm_dir)
    return model, processor, vlm
