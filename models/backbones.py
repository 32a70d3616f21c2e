"""The few facts that differ between VLM families, in one place.

Every stage works on any supported family through these facts alone; nothing else in the code
looks at the model's name or architecture:

- ``feature_width`` / ``pooled_features``: one pooled visual feature per image (the mean of the
  image's visual tokens as the language model receives them) and its width, read from the config;
- ``prompt_positions``: the rotary positions of a (left-padded) prompt, computed explicitly through
  the model's public method, so the class scorer can continue a cached prompt without relying on
  state a previous forward left on the model (3-D rotary for the Qwen families, 1-D otherwise);
- ``lora_targets`` / ``lora_exclude``: the language model's attention projections, the default
  LoRA targets, and the modules LoRA must skip where the visual encoder uses the same names;
- ``keep_unquantised``: module-name prefixes 4-bit loading leaves in bf16 (the visual encoder,
  whose pooled features must equal stage 2's full-precision cache, and the output layer).

A family is keyed by the config's ``model_type``; an unsupported one is a one-line UserError.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from PIL import Image

from utils.errors import UserError


@dataclass(frozen=True)
class Backbone:
    family: str                                   # config.model_type
    name: str                                     # for people: "Qwen2-VL"
    example: str                                  # a hub checkpoint of the family
    feature_width: Callable[[object], int]        # config -> width of one pooled visual feature
    pooled_features: Callable[..., torch.Tensor]  # (model, processor, images) -> (N, width) float32 CPU
    prompt_positions: Callable[..., torch.Tensor]  # (model, inputs) -> (3, B, L) or (B, L) long
    lora_targets: tuple[str, ...]                 # default --target_modules (module-name suffixes)
    keep_unquantised: tuple[str, ...]
    lora_exclude: str | None = None               # regex of modules LoRA must skip (visual encoder)
    visual_modules: tuple[str, ...] = ("visual",)  # attributes of the inner model computing the feature


def inner_model(model):
    """The multimodal model under the generation head, with or without a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def visual_modules(model) -> list[torch.nn.Module]:
    """The modules that compute the pooled visual feature (encoder, merger or projector)."""
    inner = inner_model(model)
    return [getattr(inner, name) for name in backbone_for(model).visual_modules]


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [image.convert("RGB") for image in images]


@torch.no_grad()
def _mean_visual_tokens(model, processor, images: Sequence[Image.Image], size_key: str) -> torch.Tensor:
    """Mean of each image's visual tokens as the language model receives them; only the modules
    computing them run. ``size_key``: the processor output telling the model each image's layout
    (Qwen: ``image_grid_thw``, merged tokens; LLaVA-OneVision: ``image_sizes``, projected tokens
    of the base view and any-resolution tiles)."""
    inputs = processor.image_processor(images=_rgb(images), return_tensors="pt")
    device = next(model.parameters()).device
    outputs = model.get_image_features(pixel_values=inputs["pixel_values"].to(device),
                                       **{size_key: inputs[size_key].to(device)})
    tokens = outputs.pooler_output if hasattr(outputs, "pooler_output") else outputs
    return torch.stack([image_tokens.float().mean(dim=0) for image_tokens in tokens]).cpu()


# --- Qwen families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) ----------------------------------------------

def _qwen_feature_width(config) -> int:
    # The patch merger's output width: Qwen2.5-VL and Qwen3-VL call it out_hidden_size (their
    # hidden_size is the encoder's inner width); Qwen2-VL calls it hidden_size.
    vision = config.vision_config
    return int(getattr(vision, "out_hidden_size", None) or vision.hidden_size)


def _qwen_prompt_positions(model, inputs) -> torch.Tensor:
    """3-D rotary positions (time, height, width) of a batch of image prompts: (3, B, L)."""
    positions, _ = inner_model(model).get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])
    return positions


# --- 1-D rotary families -----------------------------------------------------------------------

def _text_positions(model, inputs) -> torch.Tensor:
    """Positions counting only real tokens, so left padding shifts nothing: (B, L)."""
    mask = inputs["attention_mask"]
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _projected_feature_width(config) -> int:
    # The projector maps visual tokens into the language model's embedding space.
    return int(config.text_config.hidden_size)


_qwen_pooled_features = partial(_mean_visual_tokens, size_key="image_grid_thw")
_llava_onevision_pooled_features = partial(_mean_visual_tokens, size_key="image_sizes")

_QWEN_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")  # the visual encoder names its layers qkv/proj
_QWEN_SKIP = ("model.visual", "lm_head")

BACKBONES = {
    backbone.family: backbone for backbone in (
        Backbone("qwen2_vl", "Qwen2-VL", "Qwen/Qwen2-VL-7B-Instruct", _qwen_feature_width,
                 _qwen_pooled_features, _qwen_prompt_positions, _QWEN_LORA, _QWEN_SKIP),
        Backbone("qwen2_5_vl", "Qwen2.5-VL", "Qwen/Qwen2.5-VL-7B-Instruct", _qwen_feature_width,
                 _qwen_pooled_features, _qwen_prompt_positions, _QWEN_LORA, _QWEN_SKIP),
        Backbone("qwen3_vl", "Qwen3-VL", "Qwen/Qwen3-VL-8B-Instruct", _qwen_feature_width,
                 _qwen_pooled_features, _qwen_prompt_positions, _QWEN_LORA, _QWEN_SKIP),
        # The SigLIP encoder also has q/k/v_proj layers: excluding it keeps LoRA on the language
        # model, as for the Qwen families (whose encoders name theirs qkv/proj).
        Backbone("llava_onevision", "LLaVA-OneVision", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
                 _projected_feature_width, _llava_onevision_pooled_features, _text_positions, _QWEN_LORA,
                 ("model.vision_tower", "model.multi_modal_projector", "lm_head"),
                 lora_exclude=r".*vision_tower.*", visual_modules=("vision_tower", "multi_modal_projector")),
    )
}


def supported() -> str:
    """Each family with a hub checkpoint of it, for error messages."""
    return ", ".join(f"{b.family} ({b.name}, e.g. {b.example})" for b in BACKBONES.values())


def backbone_for(model_or_config) -> Backbone:
    """The family facts of a model, a config or a peft-wrapped model (by ``config.model_type``)."""
    config = getattr(model_or_config, "config", model_or_config)
    family = getattr(config, "model_type", None)
    if family not in BACKBONES:
        raise UserError(f"unsupported VLM architecture {family!r}; supported: {supported()}")
    return BACKBONES[family]
