"""A tiny random Qwen2-VL (or Qwen2.5-VL) that loads exactly like the real checkpoint.

``python -m models.tiny --out checkpoints/tiny-qwen2-vl [--arch qwen2_vl|qwen2_5_vl] [--seed 0]``

The folder holds a randomly initialised model (~0.2M parameters), our own byte-level BPE
tokenizer with the Qwen special tokens and a ChatML chat template, and a Qwen2-VL processor
that keeps images to a handful of visual tokens. ``AutoModelForImageTextToText`` and
``AutoProcessor`` load it like ``Qwen/Qwen2-VL-7B-Instruct``, so every stage runs end to end on
a CPU in seconds. Its answers are noise until trained (see the toy settings in the README).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from utils.errors import UserError, run_cli

ARCHES = ("qwen2_vl", "qwen2_5_vl")

# The timm teacher used by tests and the CPU quickstart (from scratch, 64 px toy images).
TINY_TEACHER_MODEL = "vit_tiny_patch16_224"
TINY_TEACHER_IMG_SIZE = 64

# Small pixel budget: one merged visual token per 28x28 block, so 4 to 16 tokens per image.
TINY_MIN_PIXELS = 28 * 28 * 4
TINY_MAX_PIXELS = 28 * 28 * 16

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# ChatML; an image item becomes the vision placeholder the processor expands to N image tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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


def _train_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on ``_CORPUS``, wrapped as a Qwen2 tokenizer with Qwen's specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    vocab = bpe.get_vocab()
    # Qwen2Tokenizer wants merges as (left, right) pairs; the trained model exposes them via JSON.
    merges = [tuple(merge) for merge in json.loads(bpe.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, extra_special_tokens=list(SPECIAL_TOKENS[1:]),
                          chat_template=CHAT_TEMPLATE)


def _config(arch: str, tokenizer):
    """The OFFLINE.md recipe: text hidden 64, 2 layers, 4 heads (head_dim 16), vision depth 2."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    hidden = 64
    text_config = dict(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # rounded up, as real checkpoints pad the vocab
        hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, max_window_layers=2,
        # mrope_section splits head_dim/2 = 8 rotary pairs over (time, height, width).
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "qwen2_vl":
        vision_config = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **ids)
    vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                         window_size=56, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **ids)


def build_tiny_vlm(out: str | Path, arch: str = "qwen2_vl", seed: int = 0) -> Path:
    """Build, seed and ``save_pretrained`` a tiny VLM with its processor into ``out``."""
    import torch
    from transformers import (AutoModelForImageTextToText, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    if arch not in ARCHES:
        raise UserError(f"--arch {arch}: choose one of {', '.join(ARCHES)}")
    out = Path(out)
    tokenizer = _train_tokenizer()
    config = _config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id

    pixels = dict(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    processor_class = Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor
    processor = processor_class(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build a tiny random Qwen2-VL folder for CPU tests.",
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
