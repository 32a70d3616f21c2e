"""A tiny random VLM of each supported family that loads exactly like the real checkpoint.

``python -m models.tiny --out checkpoints/tiny-qwen2-vl [--arch qwen2_vl|qwen2_5_vl|qwen3_vl|llava_onevision] [--seed 0]``

The folder holds a randomly initialised model (~0.2M parameters), our own byte-level BPE
tokenizer with the Qwen special tokens, a chat template shaped like the family's own (ChatML;
Qwen3-VL writes no default system message; LLaVA-OneVision puts an ``<image>`` line before the
text) and the family's processor, keeping images to a handful of visual tokens.
``AutoModelForImageTextToText`` and ``AutoProcessor`` load it like the hub checkpoints (e.g.
``Qwen/Qwen2-VL-7B-Instruct``), so every stage runs end to end on a CPU in seconds. Its answers
are noise until trained (see the toy settings in docs/stages.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import (AutoModelForImageTextToText, LlavaOnevisionConfig, LlavaOnevisionImageProcessor,
                          LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2_5_VLConfig,
                          Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig, Qwen3VLProcessor,
                          Qwen3VLVideoProcessor)

from utils.errors import UserError, run_cli

ARCHES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")

# The timm teacher used by tests and the CPU quickstart (from scratch, 64 px toy images).
TINY_TEACHER_MODEL = "vit_tiny_patch16_224"
TINY_TEACHER_IMG_SIZE = 64

# Small pixel budget: one merged visual token per 28x28 block, so 4 to 16 tokens per image.
TINY_MIN_PIXELS = 28 * 28 * 4
TINY_MAX_PIXELS = 28 * 28 * 16
TINY_HIDDEN = 64
# LLaVA-OneVision: 32 px tiles, any-resolution grids of up to 2x2 tiles.
LLAVA_TILE = 32
LLAVA_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
LLAVA_TOKENS = ("<image>", "<video>")  # LLaVA-OneVision's image and video placeholders


def _chat_template(default_system: bool, image: str) -> str:
    """ChatML; an image item becomes ``image``, the placeholder the processor expands to N tokens."""
    system = ("{% if loop.first and message['role'] != 'system' %}"
              "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "{% endif %}") if default_system else ""
    return (
        "{% for message in messages %}" + system +
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image +
        "{% elif item['type'] == 'text' %}{{ item['text'] }}"
        "{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHAT_TEMPLATE = _chat_template(True, "<|vision_start|><|image_pad|><|vision_end|>")
CHAT_TEMPLATES = {
    "qwen2_vl": CHAT_TEMPLATE,
    "qwen2_5_vl": CHAT_TEMPLATE,
    "qwen3_vl": _chat_template(False, "<|vision_start|><|image_pad|><|vision_end|>"),
    "llava_onevision": _chat_template(True, "<image>\n"),
}

# Enough text for merges on the words our prompts and answers use; any other text still
# encodes because the byte alphabet is in the vocabulary.
_CORPUS = (
    "You are a helpful assistant. You are an expert in visual emotion analysis.",
    "Describe the key elements of this image. Explain the reasoning from those elements to the emotion.",
    "Which emotion does this image evoke? Choose the category from the list and answer as a dictionary.",
    "{'emotion': 'amusement'} {'emotion': 'anger'} {'emotion': 'awe'} {'emotion': 'contentment'}",
    "{'emotion': 'disgust'} {'emotion': 'excitement'} {'emotion': 'fear'} {'emotion': 'sadness'}",
    "{'emotion': 'joy'} {'emotion': 'surprise'} {'emotion': 'positive'} {'emotion': 'negative'}",
    "1. Key elements: the colours, the shapes, the people, the light and the scene.",
    "2. Reasoning: these elements together suggest the feeling that the viewer has.",
    "The image shows a bright scene with warm colours, a calm sky, a dark room and a sad face.",
)


def _train_tokenizer(chat_template: str = CHAT_TEMPLATE, extra_tokens: tuple[str, ...] = (),
                     vocab_size: int = 512):
    """Byte-level BPE trained on ``_CORPUS``, wrapped as a Qwen2 tokenizer with Qwen's specials."""
    bpe = Tokenizer(tokenizer_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    vocab = bpe.get_vocab()
    # Qwen2Tokenizer wants merges as (left, right) pairs; the trained model exposes them via JSON.
    merges = [tuple(merge) for merge in json.loads(bpe.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, extra_special_tokens=list(SPECIAL_TOKENS[1:] + extra_tokens),
                          chat_template=chat_template)


def _text_config(tokenizer, **extra) -> dict:
    """The tiny text model: hidden 64, 2 layers, 4 heads (head_dim 16)."""
    return dict(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # rounded up, as real checkpoints pad the vocab
        hidden_size=TINY_HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, max_window_layers=2,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def _qwen_ids(tokenizer) -> dict:
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}


def _config(arch: str, tokenizer):
    """The family's config at toy size: the text recipe above, a 2-layer visual encoder."""
    # mrope_section splits head_dim/2 = 8 rotary pairs over (time, height, width).
    mrope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
    if arch == "qwen2_vl":
        vision_config = dict(depth=2, embed_dim=32, hidden_size=TINY_HIDDEN, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config=_text_config(tokenizer, rope_parameters=mrope),
                             vision_config=vision_config, **_qwen_ids(tokenizer))
    if arch == "qwen2_5_vl":
        vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                             out_hidden_size=TINY_HIDDEN, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=_text_config(tokenizer, rope_parameters=mrope),
                                vision_config=vision_config, **_qwen_ids(tokenizer))
    if arch == "qwen3_vl":
        # Qwen3-VL interleaves the three rotary axes and adds visual features of the encoder's
        # first layer to the language model's first layer (deepstack).
        vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                             out_hidden_size=TINY_HIDDEN, num_position_embeddings=64,
                             deepstack_visual_indexes=[0])
        text = _text_config(tokenizer, head_dim=16, rope_parameters={**mrope, "mrope_interleaved": True})
        return Qwen3VLConfig(text_config=text, vision_config=vision_config, **_qwen_ids(tokenizer))
    # LLaVA-OneVision: SigLIP encoder (32 px tiles of 8 px patches: 16 tokens per tile), a
    # projector, and a Qwen2 language model with 1-D rotary positions.
    vision_config = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, image_size=LLAVA_TILE, patch_size=8)
    text = dict(_text_config(tokenizer), model_type="qwen2")
    return LlavaOnevisionConfig(vision_config=vision_config, text_config=text,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                image_grid_pinpoints=LLAVA_PINPOINTS, vision_feature_select_strategy="full")


def _processor(arch: str, tokenizer, chat_template: str):
    """The family's processor with a pixel budget of a handful of visual tokens per image."""
    if arch == "llava_onevision":
        size = {"height": LLAVA_TILE, "width": LLAVA_TILE}
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=LLAVA_PINPOINTS),
            video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tokenizer,
            num_image_tokens=(LLAVA_TILE // 8) ** 2, vision_feature_select_strategy="full",
            chat_template=chat_template)
    if arch == "qwen3_vl":
        # 16 px patches merged 2x2: one visual token per 32x32 block, 4 to 16 per image.
        pixels = dict(size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 16}, patch_size=16)
        return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                video_processor=Qwen3VLVideoProcessor(**pixels), chat_template=chat_template)
    pixels = dict(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    processor_class = Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor
    return processor_class(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                           video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=chat_template)


def build_tiny_vlm(out: str | Path, arch: str = "qwen2_vl", seed: int = 0) -> Path:
    """Build, seed and ``save_pretrained`` a tiny VLM with its processor into ``out``."""
    if arch not in ARCHES:
        raise UserError(f"--arch {arch}: choose one of {', '.join(ARCHES)}")
    out = Path(out)
    template = CHAT_TEMPLATES[arch]
    tokenizer = _train_tokenizer(template, LLAVA_TOKENS if arch == "llava_onevision" else ())
    config = _config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    processor = _processor(arch, tokenizer, template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build a tiny random VLM folder (any supported family) for CPU tests.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="checkpoints/tiny-qwen2-vl", help="folder to write")
    parser.add_argument("--arch", default="qwen2_vl", choices=ARCHES)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    out = build_tiny_vlm(args.out, args.arch, args.seed)
    size_kb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1024
    print(f"tiny {args.arch}: {out} ({size_kb:.0f} KB) built in {time.perf_counter() - start:.1f}s; "
          f"use it with --vlm_model {out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
