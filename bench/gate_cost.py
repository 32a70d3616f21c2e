"""Cost of stage 3 with cached inputs vs one pass of the frozen models and vs the reference approach.

``python -m bench.gate_cost``: on a toy world of 2000 images (4 classes, 450 train+val and 50 test
images each: the size of Emotion6, the smallest dataset the paper reports, fixed before measuring;
the tiny VLM after one epoch of stage 1 and the distilled head after a short stage 2,
both built first and untimed; how well they are trained does not change their cost), one process
times:
(1) one pass of the frozen models over every train/val/test image, as stage 3 needs it: the
    trained VLM loaded once and its class answers (``score``, batch 8), and the head on the visual
    features stage 2 cached (stage 3 reuses them and never re-encodes);
(2) the whole stage cold: ``train_gate.py`` with the paper's 10 epochs and its VLM-answer cache
    emptied, so it makes that pass itself;
(3) the same stage warm (answers cached): no model runs, so this is the stage's per-run
    overhead (reading the caches, 10 gate epochs, metrics, two PNGs, the run record);
(4) the reference approach: for every training image in every epoch, the VLM generates its answer
    with sampling (temperature 0.8, up to 256 new tokens) and the encoder and head run again, all
    at batch 1, before a gate step; timed on 16 images and scaled to the training split and 10
    epochs (no validation or test passes, which favours it).
A first, untimed cold stage pays the one-off costs (imports, first model load); (1), (2) and (3)
are each the best of two runs. Targets: (2) <= 1.3 x (1); (4) >= 5 x (2). The tiny VLM takes
~3 ms per image, so the overhead (3), a fraction of a second, is far from negligible here while
next to a real 7B pass it vanishes; ``stage_over_one_pass`` keeps it in (the target row),
``inputs_over_one_pass`` leaves it out. The world is built by bench/world.py.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import TARGETS_KEY, best_of, print_results, target_row
from bench.world import stages_1_and_2
from data.datasets import load_dataset, open_image
from engine.features import read_vlm_features
import train_gate
from engine.vlm_answers import predict_samples
from models.chat import categorical_prompt, encode_prompts
from models.gates import build_gate
from models.heads import head_logits, load_head
from models.vlm import load_trained_vlm, pooled_image_features

EPOCHS = 10
CLASSES, PER_CLASS, TEST_PER_CLASS = 4, 450, 50
REFERENCE_IMAGES = 16
TARGET = 1.3  # stage wall time at most 1.3x one pass of the frozen models
REFERENCE_TARGET = 5.0  # the reference approach at least 5x slower than the stage


def frozen_pass(pipeline, splits) -> None:
    """What stage 3 cannot avoid: every image through the trained VLM, and the head on stage 2's
    cached features (also batch_one's stage-3 yardstick)."""
    model, processor, _ = load_trained_vlm(pipeline.stage("vlm"), "cpu")
    head, head_record = load_head(pipeline.stage("distill"))
    features = read_vlm_features(splits, head_record, pipeline.stage("distill") / "cache", "cpu")
    for split in ("train", "val", "test"):
        predict_samples(model, processor, splits.data_root, splits.split(split), splits.class_names,
                        "score", 8, 32)
        head_logits(head, features[split])


def gate_stage(pipeline, cold: bool, *extra: str) -> None:
    """``train_gate.py`` with ``EPOCHS`` epochs and ``extra`` flags; ``cold``: its VLM-answer cache
    emptied first, so it makes the frozen pass itself."""
    if cold:
        shutil.rmtree(pipeline.stage("gate") / "cache", ignore_errors=True)
    train_gate.main(train_gate.parse(pipeline.argv("--epochs", str(EPOCHS), "--num_workers", "0", *extra)))


def _reference(pipeline, splits) -> tuple[float, float]:
    """Seconds per training image and epoch the reference way, and the mean generated length."""
    model, processor, _ = load_trained_vlm(pipeline.stage("vlm"), "cpu")
    head, _ = load_head(pipeline.stage("distill"))
    num_classes = len(splits.class_names)
    gate = build_gate("concat_linear", num_classes)
    optimizer = torch.optim.Adam(gate.parameters(), lr=1e-4, weight_decay=1e-4)
    prompt = categorical_prompt(splits.class_names)
    samples = splits.train[::max(1, len(splits.train) // REFERENCE_IMAGES)][:REFERENCE_IMAGES]
    lengths = []
    start = time.perf_counter()
    for sample in samples:
        image = open_image(splits.absolute(sample))
        inputs = encode_prompts(processor, [prompt], [image])
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=True, temperature=0.8, max_new_tokens=256,
                                    pad_token_id=processor.tokenizer.pad_token_id)
            lengths.append(output.shape[1] - inputs["input_ids"].shape[1])
            signal = torch.zeros(1, num_classes)  # the parsed answer's one-hot (parsing costs nothing here)
            logits = head(pooled_image_features(model, processor, [image]))
        loss = F.cross_entropy(gate(signal, logits), torch.tensor([sample.label]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(samples), sum(lengths) / len(lengths)


def run() -> dict:
    """Build the toy world, time the four ways, return the ratios and times."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = stages_1_and_2(Path(tmp), CLASSES, PER_CLASS, TEST_PER_CLASS)
        splits = load_dataset(pipeline.data_root, "toy", pipeline.output_dir)
        gate_stage(pipeline, cold=True)  # untimed: pays one-off costs (imports, first model load)
        one_pass = best_of(lambda: frozen_pass(pipeline, splits))
        stage = best_of(lambda: gate_stage(pipeline, cold=True))
        warm = best_of(lambda: gate_stage(pipeline, cold=False))
        per_image, tokens = _reference(pipeline, splits)
        reference = per_image * len(splits.train) * EPOCHS
    return {
        "images": len(splits.train) + len(splits.val) + len(splits.test),
        "one_pass_s": round(one_pass, 2),
        "stage_cold_s": round(stage, 2),
        "stage_warm_s": round(warm, 2),
        "reference_s": round(reference, 1),
        "reference_generated_tokens": round(tokens, 1),
        "stage_over_one_pass": stage / one_pass,
        # The warm rerun runs no model: it is the stage's per-run overhead. Without it, the
        # stage's own pass over the images vs one pass:
        "overhead_share_of_stage": warm / stage,
        "inputs_over_one_pass": (stage - warm) / one_pass,
        "reference_over_stage": reference / stage,
        TARGETS_KEY: [
            target_row(f"stage 3 ({EPOCHS} gate epochs, cold caches) / one pass of the frozen models",
                       stage / one_pass, "<=", TARGET),
            target_row("reference stage 3 (sampling + head re-run per image per epoch, batch 1) / ours",
                       reference / stage, ">=", REFERENCE_TARGET),
        ],
    }


def main() -> int:
    results = run()
    print_results(results)
    print(f"stage (10 epochs, cold caches) / one pass of the frozen models on {results['images']} images: "
          f"{results['stage_over_one_pass']:.2f}x (target <= {TARGET}x), of which {results['stage_warm_s']:.2f} s is "
          f"per-run overhead (without it: {results['inputs_over_one_pass']:.2f}x); "
          f"reference approach / stage: {results['reference_over_stage']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
