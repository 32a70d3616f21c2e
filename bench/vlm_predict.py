"""Cost of the VLM's categorical prediction per image: ``python -m bench.vlm_predict``.

On the tiny Qwen2-VL and toy images (CPU), times per image:
- ``prompt``: one forward pass over the categorical prompt (image + question), no answers;
- ``score``: our default, the prompt encoded once, its cache reused across the C answers;
- ``reencode``: the same scores from C full sequences per image (prompt re-encoded per class);
- ``generate``: greedy decoding of the answer (32 new tokens at most) and parsing;
- ``reference``: the reference code's way, sampling up to 256 new tokens at temperature 0.8.
Targets (set before measuring): ``score`` at most 1.5x ``prompt`` whatever the number of classes
C; re-encoding at least C/2 times slower than ``score`` (the shared prompt cache is the point);
``generate`` not cheaper than ``score``; the reference at least 10x slower than ``score``. Also
printed: the mean length of the reference's sampled answers (the tiny model is untrained, so it
rarely stops before the 256-token limit; a trained VLM stops earlier).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from bench import TARGETS_KEY, print_results, target_row
from data.toy import make_toy_dataset, toy_class_names
from models.chat import IGNORE_INDEX, categorical_prompt, class_conversations, encode_conversations, encode_prompts
from models.scorer import predict_vlm, score_classes
from models.tiny import build_tiny_vlm
from models.vlm import load_processor, load_vlm

BATCH_SIZE = 8
NUM_IMAGES = 16
REFERENCE_IMAGES = 4  # sampling 256 tokens is slow: time fewer images
TARGET = 1.5
REFERENCE_SPEEDUP = 10.0  # reference sampling vs score: at least this much slower


def _per_image(fn, count: int, repeats: int = 3) -> float:
    """Median seconds per image of ``fn()`` (which handles ``count`` images), after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / count


def _reencode_scores(model, processor, images, class_names):
    """Batched scoring without cache reuse: every (image, class) conversation run whole."""
    conversations = class_conversations(class_names)
    per_batch = max(1, BATCH_SIZE // len(class_names)) * len(class_names)
    pairs = [(image, conversation) for image in images for conversation in conversations]
    scores = []
    with torch.no_grad():
        for start in range(0, len(pairs), per_batch):
            chunk = pairs[start:start + per_batch]
            batch = encode_conversations(processor, [c for _, c in chunk], [i for i, _ in chunk])
            labels = batch.pop("labels")[:, 1:]
            log_probs = torch.log_softmax(model(**batch).logits[:, :-1].float(), dim=-1)
            token = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append((token * (labels != IGNORE_INDEX)).sum(1))
    return torch.cat(scores).view(len(images), len(class_names))


def _measure(model, processor, images, class_names) -> dict:
    prompt = categorical_prompt(class_names)

    def prompt_forward():
        with torch.no_grad():
            for start in range(0, len(images), BATCH_SIZE):
                batch = images[start:start + BATCH_SIZE]
                model(**encode_prompts(processor, [prompt] * len(batch), batch), logits_to_keep=1)

    lengths = []  # new tokens per sampled answer

    def reference():
        with torch.no_grad():
            for image in images[:REFERENCE_IMAGES]:
                inputs = encode_prompts(processor, [prompt], [image])
                output = model.generate(**inputs, do_sample=True, temperature=0.8, max_new_tokens=256,
                                        pad_token_id=processor.tokenizer.pad_token_id)
                lengths.append(output.shape[1] - inputs["input_ids"].shape[1])

    n = len(images)
    times = {
        "prompt": _per_image(prompt_forward, n),
        "score": _per_image(lambda: score_classes(model, processor, images, class_names, BATCH_SIZE), n),
        "reencode": _per_image(lambda: _reencode_scores(model, processor, images, class_names), n),
        "generate": _per_image(lambda: predict_vlm(model, processor, images, class_names, "generate",
                                                   BATCH_SIZE, max_new_tokens=32), n),
        "reference": _per_image(reference, REFERENCE_IMAGES, repeats=1),
    }
    # The cached scores must equal the re-encoded ones, or the speed-up means nothing.
    cached = score_classes(model, processor, images, class_names, BATCH_SIZE)
    assert torch.allclose(cached, _reencode_scores(model, processor, images, class_names), atol=1e-3)
    times["sampled_tokens"] = sum(lengths) / len(lengths)
    return times


def run() -> dict:
    """Build the tiny world, time each way for 4 and 8 classes; return ratios and ms per image."""
    torch.manual_seed(0)
    # One thread: the tiny model's ops are too small to split, and timings stay stable on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_vlm(Path(tmp) / "tiny-qwen2-vl", seed=0)
        make_toy_dataset(Path(tmp) / "toy", num_classes=8, per_class=1, test_per_class=2, seed=0, size=64)
        files = sorted((Path(tmp) / "toy" / "test").rglob("*.png"))[:NUM_IMAGES]
        images = [Image.open(f).convert("RGB") for f in files]
        model, processor = load_vlm(str(tiny)), load_processor(str(tiny))
        for num_classes in (4, 8):
            times = _measure(model, processor, images, toy_class_names(num_classes))
            results[f"C{num_classes}.score_ms"] = round(1000 * times["score"], 2)
            results[f"C{num_classes}.prompt_forward_ms"] = round(1000 * times["prompt"], 2)
            results[f"C{num_classes}.score_over_prompt_forward"] = times["score"] / times["prompt"]
            results[f"C{num_classes}.reencode_over_score"] = times["reencode"] / times["score"]
            results[f"C{num_classes}.generate_over_score"] = times["generate"] / times["score"]
            results[f"C{num_classes}.reference_sampling_over_score"] = times["reference"] / times["score"]
            results[f"C{num_classes}.reference_mean_sampled_tokens"] = round(times["sampled_tokens"], 1)
    torch.set_num_threads(threads)
    results[TARGETS_KEY] = [row for c in (4, 8) for row in (
        target_row(f"VLM score per image / one prompt forward ({c} classes)",
                   results[f"C{c}.score_over_prompt_forward"], "<=", TARGET),
        target_row(f"re-encoding the prompt per class / score ({c} classes)",
                   results[f"C{c}.reencode_over_score"], ">=", c / 2),
        target_row(f"greedy generate / score ({c} classes)", results[f"C{c}.generate_over_score"], ">=", 1.0),
        target_row(f"reference sampling (256 tokens max, T 0.8) / score ({c} classes)",
                   results[f"C{c}.reference_sampling_over_score"], ">=", REFERENCE_SPEEDUP))]
    return results


def main() -> int:
    results = run()
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
