"""The method's defining parts, each with a test that fails when the part is switched off:
answer-only labels in the batches the Trainer really trains on, a gate that uses both of its
inputs, epochs kept on validation (gate, head and teacher), the teacher's cached logits from the
evaluation transform, and the head's features from the base visual encoder.

``make mutations`` (scripts/mutations.py) switches each part off in a copy of the repository and
checks that these tests (and the others it names) fail."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.pipeline import (CONFIGS, ToyRun, gate_data_from_caches, trained_pipeline,  # noqa: F401
                            write_annotations)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread


# ---------------------------------------------------------------- stage 1: answer-only labels

class FirstBatch(Exception):
    """Raised from inside the Trainer once the first training batch has been seen."""


def test_trainer_batches_label_only_the_answers(toy_root, tiny_vlm_dir, tmp_path, monkeypatch):
    """The batch the Trainer computes its loss on, built by train_vlm.py's own collator and data
    loader, has labels on the assistant answers (and their end token) only."""
    import train_vlm
    from engine.vlm_train import AnswerLogitsTrainer
    from data.annotations import read_annotations, to_conversations
    from data.datasets import load_dataset
    from models.chat import IGNORE_INDEX
    from models.vlm import load_processor

    seen = []

    def first_batch(self, model, inputs, *args, **kwargs):
        seen.append({key: value.detach().cpu() for key, value in inputs.items() if torch.is_tensor(value)})
        raise FirstBatch

    monkeypatch.setattr(AnswerLogitsTrainer, "compute_loss", first_batch)  # the Trainer stage 1 runs
    pipeline = ToyRun(toy_root, tmp_path, tiny_vlm_dir)
    annotations = read_annotations(write_annotations(pipeline))
    with pytest.raises(FirstBatch):
        train_vlm.main(train_vlm.parse(pipeline.argv("--vlm_model", str(tiny_vlm_dir), "--config", str(CONFIGS / "toy_vlm.yaml"),
                                     "--skip_eval")))
    batch = seen[0]
    assert len(batch["labels"]) == 4  # configs/toy_vlm.yaml: batch 4

    class_names = load_dataset(toy_root, "toy", tmp_path).class_names
    answers = {conversation[-1]["content"][0]["text"]  # the assistant's turn
               for annotation in annotations
               for conversation in to_conversations(annotation, class_names).values()}
    tokenizer = load_processor(str(tiny_vlm_dir)).tokenizer
    for row in range(len(batch["labels"])):
        labelled = batch["labels"][row] != IGNORE_INDEX
        text = tokenizer.decode(batch["input_ids"][row][labelled])
        assert text.endswith(tokenizer.eos_token) and text[:-len(tokenizer.eos_token)] in answers, text
        assert torch.equal(batch["labels"][row][labelled], batch["input_ids"][row][labelled])


# ---------------------------------------------------------------- stage 3: both inputs count

def _pipeline_gate_data(pipeline: ToyRun) -> dict:
    """The gate's inputs per split exactly as train_gate.py builds them (from its caches)."""
    import train_gate
    from utils.cli import parse_args

    return gate_data_from_caches(parse_args(train_gate.get_args_parser(), pipeline.argv()))


@pytest.mark.parametrize("gate_file", ["gate.pt", "gate_concat_linear.pt"])
def test_gate_uses_both_inputs_and_is_as_good_as_the_better_one(trained_pipeline, gate_file):
    """gate.pt is the variant best on validation (the one the demo loads); concat_linear the paper's."""
    from dataclasses import replace

    from engine.gate import predictions
    from models.gates import build_gate

    checkpoint = torch.load(trained_pipeline.stage("gate") / gate_file, weights_only=True)
    gate = build_gate(checkpoint["gate"], checkpoint["num_classes"])
    gate.load_state_dict(checkpoint["state_dict"])
    gate.eval()
    test = _pipeline_gate_data(trained_pipeline)["test"]
    fused = predictions(gate, test)
    without_vlm = predictions(gate, replace(test, vlm_signal=torch.zeros_like(test.vlm_signal)))
    without_head = predictions(gate, replace(test, head_logits=torch.zeros_like(test.head_logits)))
    assert (without_vlm != fused).any(), "the gate ignores the VLM's answer"
    assert (without_head != fused).any(), "the gate ignores the distilled head"

    def accuracy(pred):
        return (pred == test.labels).float().mean().item()

    vlm_accuracy, head_accuracy = accuracy(test.vlm_pred), accuracy(test.head_logits.argmax(1))
    assert accuracy(fused) >= max(vlm_accuracy, head_accuracy) - 0.02, (accuracy(fused), vlm_accuracy, head_accuracy)


# ---------------------------------------------------------------- the epoch kept is validation's

def _flipped_gate_world(n: int = 256, seed: int = 0):
    """Train: the head's argmax is the label; validation: the same kind of inputs, the label is the
    head's argmin. Every step that fits the training split costs validation accuracy."""
    from engine.gate import GateData

    generator = torch.Generator().manual_seed(seed)

    def split(flip: bool) -> GateData:
        head = torch.randn(n, 2, generator=generator)
        vlm = torch.nn.functional.one_hot(torch.randint(0, 2, (n,), generator=generator), 2).float()
        labels = head.argmin(1) if flip else head.argmax(1)
        return GateData(vlm_pred=vlm.argmax(1), vlm_signal=vlm, head_logits=head, labels=labels)

    return split(False), split(True)


def test_gate_keeps_the_epoch_best_on_validation_not_on_training():
    from engine.gate import _evaluate, train_gate

    train, val = _flipped_gate_world()
    result = train_gate("concat_linear", 2, train, val, epochs=8, lr=3e-3, batch_size=32, seed=0)
    rows = {row["epoch"]: row for row in result.history}
    # The training loss falls while validation gets worse: the two splits disagree on the best epoch.
    assert rows[8]["train_loss"] < rows[1]["train_loss"]
    assert rows[8]["val_acc"] < max(row["val_acc"] for row in rows.values())
    best = max(rows.values(), key=lambda row: (row["val_acc"], -row["val_loss"]))
    assert result.best_epoch == best["epoch"] < 8
    row = _evaluate(result.model, val)  # the returned weights are that epoch's
    assert row["val_acc"] == result.best_val_acc == best["val_acc"]
    assert row["val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)


def test_head_keeps_the_epoch_best_on_validation_not_on_training():
    from engine.distill import train_head

    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(8, generator=generator)
    features = {split: torch.randn(256, 8, generator=generator) for split in ("train", "val")}
    scores = {split: x @ direction for split, x in features.items()}
    labels = {"train": (scores["train"] > 0).long(), "val": (scores["val"] <= 0).long()}  # validation flipped
    teacher = {split: torch.stack([-s, s], 1) for split, s in scores.items()}  # agrees with training
    result = train_head(features, teacher, labels, 8, 2, epochs=8, lr=3e-3, batch_size=32, seed=0)
    history = result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = max(row["val_acc"] for row in history)
    assert history[-1]["val_acc"] < best
    assert result.best_epoch == next(row["epoch"] for row in history if row["val_acc"] == best) < 8
    with torch.no_grad():
        val_acc = (result.model(features["val"]).argmax(1) == labels["val"]).float().mean().item()
    assert val_acc == result.best_val_acc == best  # the returned weights are that epoch's


def _colour_images(folder: Path, colour: tuple[int, int, int], count: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        noise = torch.randint(-40, 41, (32, 32, 3), generator=generator)
        pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")


def test_teacher_keeps_the_epoch_best_on_validation_not_on_training(tmp_path):
    """Training images: negative red, positive blue; validation images the other way round."""
    from torch.utils.data import DataLoader

    from data.datasets import ImageDataset, load_dataset
    from engine.distill import evaluate_teacher, train_teacher
    from models.teacher import build_teacher, data_config, teacher_transforms
    from models.tiny import TINY_TEACHER_IMG_SIZE, TINY_TEACHER_MODEL

    red, blue = (200, 40, 40), (40, 40, 200)
    for split, colours in (("train", (red, blue)), ("val", (blue, red)), ("test", (red, blue))):
        for (name, colour), seed in zip(zip(("negative", "positive"), colours), (1, 2)):
            _colour_images(tmp_path / "images" / "flip" / split / name, colour, 16 if split == "train" else 8,
                           seed + len(split))
    splits = load_dataset(tmp_path / "images", "flip", tmp_path / "out")
    torch.manual_seed(0)
    model = build_teacher(TINY_TEACHER_MODEL, 2, TINY_TEACHER_IMG_SIZE, pretrained=False)
    config = data_config(model, TINY_TEACHER_IMG_SIZE)
    result = train_teacher(model, splits, config, torch.device("cpu"), epochs=3, lr=1e-3, weight_decay=0.0,
                           batch_size=8, num_workers=0, seed=0, out_dir=tmp_path)
    _, eval_transform = teacher_transforms(config)

    def accuracy(split: str) -> float:
        return evaluate_teacher(model, DataLoader(ImageDataset(splits.data_root, splits.split(split), eval_transform),
                                                  batch_size=8), "cpu")["val_acc"]

    best = max(row["val_acc"] for row in result.history)
    assert result.model is model and result.best_val_acc == best == accuracy("val")  # that epoch's weights
    assert result.best_epoch == next(row["epoch"] for row in result.history if row["val_acc"] == best)
    assert accuracy("test") > best  # the training colours were learnt: train and val disagree


# ---------------------------------------------------------------- stage 2: what the caches hold

def test_teacher_cache_equals_a_direct_pass_with_the_evaluation_transform(trained_pipeline):
    from data.datasets import load_dataset, open_image
    from models.teacher import load_teacher, teacher_transforms

    distill = trained_pipeline.stage("distill")
    splits = load_dataset(trained_pipeline.data_root, "toy", trained_pipeline.output_dir)
    teacher, checkpoint = load_teacher(trained_pipeline.stage("teacher") / "teacher.pt", splits.class_names)
    _, eval_transform = teacher_transforms(checkpoint["data_config"])
    for split in ("train", "test"):
        cached = torch.load(distill / "cache" / f"teacher_logits_{split}.pt", weights_only=True)["values"]
        with torch.no_grad():
            direct = torch.cat([teacher(eval_transform(open_image(splits.absolute(sample)))[None])
                                for sample in splits.split(split)])
        torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-4)


def test_head_features_are_the_base_encoders(trained_pipeline):
    """Stage 2's cached features are the base VLM's pooled visual tokens (no adapter), with the
    pixel budget it recorded; stage 3 and the demo feed the head these."""
    from data.datasets import load_dataset, open_image
    from models.vlm import load_processor, load_vlm, pooled_image_features
    from utils.io import read_json

    distill = trained_pipeline.stage("distill")
    meta = read_json(distill / "meta.json")
    assert meta["base_model"] == str(trained_pipeline.vlm_model)
    splits = load_dataset(trained_pipeline.data_root, "toy", trained_pipeline.output_dir)
    processor = load_processor(meta["base_model"], meta["min_pixels"], meta["max_pixels"])
    base = load_vlm(meta["base_model"])
    images = [open_image(splits.absolute(sample)) for sample in splits.test]
    cached = torch.load(distill / "cache" / "vlm_features_test.pt", weights_only=True)["values"]
    torch.testing.assert_close(cached, pooled_image_features(base, processor, images), atol=1e-5, rtol=1e-4)
