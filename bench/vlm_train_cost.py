"""Stage 1's costs: ``python -m bench.vlm_train_cost``.

1. Peak memory of one training step at real widths, the output layer run at the answer positions
   only (stage 1's ``AnswerLogitsTrainer``) against at every position (transformers' own loss).
   The model is built like ``models/tiny.py`` (tiny visual encoder, two language-model layers)
   but with Qwen2-VL-7B's widths where they set the logits' size: the 151,936-token vocabulary
   and the 3,584-d hidden state (28 attention heads, 4 key/value heads, as the 7B); the layers'
   inner width stays tiny, as it does not touch the logits. bf16 weights, LoRA on the attention
   projections, gradient checkpointing on: stage 1 on a GPU. The example is one observation
   conversation on a 1120x896 image at the default pixel budget (1,280 visual tokens), ~1,350
   tokens in all. Each variant runs in a fresh process: on CUDA its peak is
   ``torch.cuda.max_memory_allocated``; on CPU the process's peak resident memory (``VmHWM``).
   Target (set before measuring): the answer-only step's peak at least 30% lower (<= 0.7x).
2. Stage 1 on the toy world with ``--eval_every_epoch on`` / ``off`` (5 epochs, the toy
   config; the validation split's images scored after each epoch): the ratio is printed, no target.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import TARGETS_KEY, print_results, target_row

REPO = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, HEADS, KV_HEADS = 151_936, 3_584, 28, 4  # Qwen2-VL-7B-Instruct's
MROPE_SECTION = [16, 24, 24]  # Qwen2-VL-7B's split of head_dim / 2 = 64 rotary pairs
IMAGE_SIZE = (1008, 812)  # 36 x 29 merged 28-px patches: 1,044 visual tokens
MEMORY_TARGET = 0.7  # answer-only peak / every-position peak
EVAL_EPOCHS = 5
DESCRIPTION = ("A harbour at dusk: fishing boats rock against a wooden pier, gulls circle the masts, and a "
               "low orange sun lights the water.")


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: its peak so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _real_width_model(device):
    """The tiny Qwen2-VL recipe at Qwen2-VL-7B's vocabulary and hidden widths, with its processor
    at the default pixel budget; LoRA on the attention projections, gradient checkpointing on."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig
    from transformers.image_utils import SizeDict

    from engine.vlm_train import wrap_lora
    from models.tiny import CHAT_TEMPLATE, TINY_MIN_PIXELS, _processor, _qwen_ids, _text_config, _train_tokenizer
    from models.vlm import DEFAULT_MAX_PIXELS

    tokenizer = _train_tokenizer(CHAT_TEMPLATE)
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": MROPE_SECTION}
    text = {**_text_config(tokenizer, rope_parameters=rope), "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}
    vision = dict(depth=2, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2)  # merger -> 3,584-d
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tokenizer))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).to(device)
    model = wrap_lora(model, 8, 8, 0.0, None, [], quantized=False, gradient_checkpointing=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    processor = _processor("qwen2_vl", tokenizer, CHAT_TEMPLATE)
    processor.image_processor.size = SizeDict(shortest_edge=TINY_MIN_PIXELS, longest_edge=DEFAULT_MAX_PIXELS)
    return model, processor


def _training_example(processor, device) -> dict:
    import numpy as np
    from PIL import Image

    from data.annotations import Annotation, to_conversations
    from models.chat import encode_conversations

    annotation = Annotation("x.jpg", "contentment", DESCRIPTION, "Warm light and calm work feel content.", "bench")
    conversation = to_conversations(annotation, ["amusement", "anger", "awe", "contentment"])["observation"]
    pixels = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    batch = encode_conversations(processor, [conversation], [Image.fromarray(pixels)])
    return {key: value.to(device) for key, value in batch.items()}


def measure_step(variant: str) -> dict:
    """One training step (forward, backward, AdamW) of the real-width model in this process:
    ``variant`` ``answers`` (the logits at the labelled positions) or ``all`` (every position)."""
    import torch

    from engine.vlm_train import kept_logits_loss
    from models.chat import IGNORE_INDEX

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, processor = _real_width_model(device)
    batch = _training_example(processor, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kib("VmRSS") * 1024
        before_peak = _status_kib("VmHWM") * 1024
    start = time.perf_counter()
    loss = kept_logits_loss(model, batch)[0] if variant == "answers" else model(**batch).loss
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {"variant": variant, "device": str(device), "seconds": time.perf_counter() - start,
            "loss": loss.item(), "tokens": int(batch["input_ids"].shape[1]),
            "labelled": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
            "before_mib": before / 2 ** 20, "peak_mib": peak / 2 ** 20,
            "peak_before_step_mib": None if cuda else before_peak / 2 ** 20}


def _step_in_fresh_process(variant: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "bench.vlm_train_cost", "--step", variant], cwd=REPO,
                            capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise RuntimeError(f"the {variant} step failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory() -> dict:
    steps = {variant: _step_in_fresh_process(variant) for variant in ("all", "answers")}
    ratio = steps["answers"]["peak_mib"] / steps["all"]["peak_mib"]
    extra = {variant: step["peak_mib"] - step["before_mib"] for variant, step in steps.items()}
    print(f"one training step at real widths ({steps['all']['tokens']} tokens, {steps['all']['labelled']} "
          f"labelled; {steps['all']['device']}): peak {steps['all']['peak_mib']:,.0f} MiB with the logits of every "
          f"position, {steps['answers']['peak_mib']:,.0f} MiB with the answers' only ({ratio:.2f}x; the step "
          f"itself added {extra['all']:,.0f} / {extra['answers']:,.0f} MiB to the loaded model's "
          f"{steps['all']['before_mib']:,.0f} MiB); loss {steps['all']['loss']:.4f} / {steps['answers']['loss']:.4f}; "
          f"{steps['all']['seconds']:.1f} s / {steps['answers']['seconds']:.1f} s")
    return {"step_tokens": steps["all"]["tokens"], "step_labelled_tokens": steps["all"]["labelled"],
            "step_device": steps["all"]["device"],
            "peak_mib_all_positions": round(steps["all"]["peak_mib"], 1),
            "peak_mib_answer_positions": round(steps["answers"]["peak_mib"], 1),
            "step_extra_mib_all_positions": round(extra["all"], 1),
            "step_extra_mib_answer_positions": round(extra["answers"], 1),
            "loaded_model_mib": round(steps["all"]["before_mib"], 1),
            "step_seconds_all_positions": round(steps["all"]["seconds"], 2),
            "step_seconds_answer_positions": round(steps["answers"]["seconds"], 2),
            "peak_ratio": round(ratio, 3),
            TARGETS_KEY: [target_row("stage 1 training step peak memory at real widths (151,936 x 3,584), logits "
                                     "at answer positions / at every position", ratio, "<=", MEMORY_TARGET)]}


def eval_cost() -> dict:
    """Stage 1 on the toy world with and without the per-epoch validation, best of two runs each."""
    import torch

    import train_vlm
    from bench.world import CONFIGS, ToyRun, write_annotations
    from data.datasets import load_dataset
    from data.toy import make_toy_dataset
    from models.tiny import build_tiny_vlm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are too small to split (as the test suite runs it)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_toy_dataset(root / "images" / "toy", num_classes=4, per_class=24, test_per_class=8, seed=0, size=64)
        run = ToyRun(root / "images", root / "outputs", build_tiny_vlm(root / "tiny", seed=0))
        write_annotations(run)
        val_images = len(load_dataset(run.data_root, run.dataname, run.output_dir).val)
        seconds = {"on": [], "off": []}
        for _ in range(2):
            for choice in ("off", "on"):
                argv = run.argv("--vlm_model", str(run.vlm_model), "--config", str(CONFIGS / "toy_vlm.yaml"),
                                "--epoch", str(EVAL_EPOCHS), "--skip_eval", "--eval_every_epoch", choice)
                start = time.perf_counter()
                train_vlm.main(train_vlm.parse(argv))
                seconds[choice].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    on, off = min(seconds["on"]), min(seconds["off"])
    print(f"stage 1 on the toy world, {EVAL_EPOCHS} epochs: {on:.1f} s with --eval_every_epoch ({val_images} "
          f"validation images scored per epoch), {off:.1f} s without ({on / off:.2f}x; "
          f"{(on - off) / (EVAL_EPOCHS * val_images) * 1000:.0f} ms per validation image per epoch)")
    return {"eval_every_epoch_seconds": round(on, 2), "no_eval_every_epoch_seconds": round(off, 2),
            "eval_every_epoch_ratio": round(on / off, 3), "val_images": val_images}


def run() -> dict:
    results = memory()
    targets = results.pop(TARGETS_KEY)
    results.update(eval_cost())
    results[TARGETS_KEY] = targets
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--step":
        print(json.dumps(measure_step(sys.argv[2])))
    else:
        print_results(run())
