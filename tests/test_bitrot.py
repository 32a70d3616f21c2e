"""Bit rot (#26 items 1-4): a few changed bytes inside a file that still opens are caught before use.

Each end-to-end test starts from finished toy outputs and changes bytes inside the tensor data of
a cache, a checkpoint or the adapter, so that the file still loads and holds other numbers; then
the file is rebuilt (a cache, with a warning naming it) or refused (one line naming the file and
the command of the stage to rerun), and no reported number changes. A prediction that is not
finite is never written; a damaged line of a prediction file being resumed is refused.
"""
from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from tests.pipeline import CONFIGS, PIPELINE_GATE_ARGS, finished, trained_pipeline  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread


# ---------------------------------------------------------------- changing bytes in place

def _zip_member_start(path: Path, member: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start: after its local header."""
    with open(path, "rb") as fh:
        fh.seek(member.header_offset)
        header = fh.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return member.header_offset + 30 + name_length + extra_length


def rewrite_tensor(path: Path, pick: Callable, change: Callable[[bytearray], None]) -> None:
    """Change, in place, the bytes of the tensor ``pick(torch.load(path))`` inside the ``.pt`` zip
    archive (``change`` edits them; their length stays): the file still opens, with other numbers."""
    tensor = pick(torch.load(path, map_location="cpu", weights_only=True)).contiguous()
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.infolist() if "/data/" in m.filename and archive.read(m) == raw]
    assert members and members[0].compress_type == zipfile.ZIP_STORED, "the tensor's storage was not found"
    data = bytearray(raw)
    change(data)
    assert len(data) == len(raw) and data != raw
    with open(path, "r+b") as fh:
        fh.seek(_zip_member_start(path, members[0]))
        fh.write(data)


def flip(data: bytearray) -> None:
    """A few flipped bits in the middle of a tensor's bytes."""
    for offset in range(len(data) // 2, len(data) // 2 + 3):
        data[offset] ^= 0x24


def rewrite_safetensors(path: Path, names: Callable[[str], bool], change: Callable[[bytearray], None]) -> list[str]:
    """Change, in place, the bytes of every tensor of a safetensors file whose name passes ``names``."""
    blob = bytearray(path.read_bytes())
    header_length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + header_length])
    changed = []
    for name, entry in header.items():
        if name != "__metadata__" and names(name):
            start, end = (8 + header_length + offset for offset in entry["data_offsets"])
            data = blob[start:end]
            change(data)
            blob[start:end] = data
            changed.append(name)
    path.write_bytes(bytes(blob))
    return changed


def to_nan(data: bytearray) -> None:
    """Every float32 of the tensor turned into NaN (all bits set)."""
    data[:] = b"\xff" * len(data)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err  # progress bars share stderr
    lines = re.findall(r"error: [^\r\n]*", err)
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def stage_files(run, stage: str) -> dict:
    folder = run.stage(stage)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def gate_argv(run) -> list[str]:
    """Stage 3's flags as the session pipeline ran it (so a rerun recomputes the same numbers)."""
    return run.argv("--config", str(CONFIGS / "toy_gate.yaml"), *PIPELINE_GATE_ARGS)


def test_changed_bytes_still_open_with_other_numbers(finished):
    """The damage the tests below make is the issue's: the file loads, its numbers differ."""
    cache = finished.stage("gate") / "cache" / "vlm_score_test.pt"
    before = torch.load(cache, weights_only=True)
    rewrite_tensor(cache, lambda stored: stored["values"]["probs"], flip)
    after = torch.load(cache, weights_only=True)
    assert after["key"] == before["key"] and not torch.equal(after["values"]["probs"], before["values"]["probs"])


# ---------------------------------------------------------------- item 1: stage 2's feature cache

def test_item1_a_damaged_feature_cache_is_refused_by_stage3_and_rebuilt_by_stage2(finished, capsys, caplog):
    """Flipped bytes in ``distill/cache/vlm_features_train.pt``: stage 3 stops with one line naming
    the file and stage 2's command (the old gate and its figures kept); stage 2 then rebuilds the
    file, with a warning naming it, to exactly the features it held."""
    import train_distillation
    import train_gate
    from utils.errors import run_cli

    cache = finished.stage("distill") / "cache" / "vlm_features_train.pt"
    original = torch.load(cache, weights_only=True)
    rewrite_tensor(cache, lambda stored: stored["values"], flip)
    gate_before = stage_files(finished, "gate")
    assert run_cli(train_gate.main, gate_argv(finished), parse=train_gate.parse) == 2
    line = one_error_line(capsys)
    assert "vlm_features_train.pt no longer matches the digest of its values written with it (damaged)" in line
    assert line.endswith("rerun `python train_distillation.py --dataname toy` to rebuild the feature cache"), line
    assert stage_files(finished, "gate") == gate_before

    caplog.set_level(logging.INFO, logger="utils.cache")
    train_distillation.main(train_distillation.parse(finished.argv(
        "--config", str(CONFIGS / "toy_distill.yaml"), "--epochs", "2")))
    assert any(r.levelno == logging.WARNING and str(cache) in r.message and "damaged" in r.message
               for r in caplog.records)
    rebuilt = torch.load(cache, weights_only=True)
    assert rebuilt["key"] == original["key"] and torch.equal(rebuilt["values"], original["values"])


def test_a_damaged_teacher_logit_cache_is_refused_by_stage3(finished, capsys):
    """Stage 3's statistics read the teacher's cached test logits: damaged, one line naming stage 2."""
    import train_gate
    from utils.errors import run_cli

    cache = finished.stage("distill") / "cache" / "teacher_logits_test.pt"
    rewrite_tensor(cache, lambda stored: stored["values"], flip)
    gate_before = stage_files(finished, "gate")
    assert run_cli(train_gate.main, gate_argv(finished), parse=train_gate.parse) == 2
    line = one_error_line(capsys)
    assert "teacher_logits_test.pt no longer matches the digest" in line
    assert "rerun `python train_distillation.py --dataname toy` to rebuild it" in line
    assert stage_files(finished, "gate") == gate_before


# ---------------------------------------------------------------- item 2: stage 3's answer cache

def test_item2_damaged_vlm_answers_are_rebuilt_and_the_figures_do_not_move(finished, caplog):
    """One test answer turned into class 64 and flipped probability bytes in the validation answers:
    stage 3 rebuilds both files (a warning names each) and reports exactly the figures it reported."""
    import train_gate

    cache = finished.stage("gate") / "cache"
    originals = {split: torch.load(cache / f"vlm_score_{split}.pt", weights_only=True) for split in ("val", "test")}
    metrics = json.loads((finished.stage("gate") / "metrics.json").read_text())

    def class_64(data: bytearray) -> None:
        data[8:16] = struct.pack("<q", 64)  # the second answer (int64)

    rewrite_tensor(cache / "vlm_score_test.pt", lambda stored: stored["values"]["pred"], class_64)
    rewrite_tensor(cache / "vlm_score_val.pt", lambda stored: stored["values"]["probs"], flip)
    assert int(torch.load(cache / "vlm_score_test.pt", weights_only=True)["values"]["pred"][1]) == 64

    caplog.set_level(logging.INFO, logger="utils.cache")
    train_gate.main(train_gate.parse(gate_argv(finished)))
    warned = [r.message for r in caplog.records if r.levelno == logging.WARNING and "cache not used" in r.message]
    assert sorted(Path(message.split()[3]).name for message in warned) == ["vlm_score_test.pt", "vlm_score_val.pt"]
    for split, original in originals.items():
        rebuilt = torch.load(cache / f"vlm_score_{split}.pt", weights_only=True)
        assert torch.equal(rebuilt["values"]["pred"], original["values"]["pred"])
        assert torch.equal(rebuilt["values"]["probs"], original["values"]["probs"])
    assert json.loads((finished.stage("gate") / "metrics.json").read_text()) == metrics


def test_answers_outside_the_classes_are_never_used_even_with_a_matching_digest(tmp_path, caplog):
    """Beyond the digest, each answer must be a class of the run (or -1, none read, when generated)."""
    from engine.vlm_answers import check_answers
    from utils.cache import load_cached, store

    class Splits:
        class_names = ["a", "b", "c"]

        @staticmethod
        def split(name):
            return [object()] * 2

    probs = torch.full((2, 3), 1 / 3)
    assert check_answers(Splits, "score", "test", {"pred": torch.tensor([0, 2]), "probs": probs, "texts": None}) is None
    assert check_answers(Splits, "generate", "test", {"pred": torch.tensor([-1, 2]), "probs": None,
                                                      "texts": ["x", "c"]}) is None
    bad = {"pred": torch.tensor([0, 64]), "probs": probs, "texts": None}
    assert "outside the classes" in check_answers(Splits, "score", "test", bad)
    store(tmp_path / "vlm_score_test.pt", {"k": 1}, bad)
    caplog.set_level(logging.WARNING, logger="utils.cache")
    assert load_cached(tmp_path / "vlm_score_test.pt", {"k": 1},
                       lambda values: check_answers(Splits, "score", "test", values)) is None
    assert "vlm_score_test.pt is damaged (answers outside the classes 0..2)" in caplog.text


def test_a_cache_without_a_digest_is_rebuilt(tmp_path, caplog):
    """A cache written before digests were stored cannot be verified: it is rebuilt, not trusted."""
    from utils.cache import load_cached, load_or_build, store

    path = tmp_path / "vlm_features_train.pt"
    torch.save({"key": {"k": 1}, "values": torch.ones(2, 3)}, path)
    caplog.set_level(logging.WARNING, logger="utils.cache")
    values = load_or_build(tmp_path, "vlm_features", {"train": {"k": 1}}, lambda split: torch.zeros(2, 3))
    assert torch.equal(values["train"], torch.zeros(2, 3))
    assert "has no digest of its values (written by an older version)" in caplog.text
    assert torch.equal(load_cached(path, {"k": 1}), torch.zeros(2, 3))  # rebuilt with its digest
    store(path, {"k": 1}, torch.ones(2, 3))
    assert torch.equal(load_cached(path, {"k": 1}), torch.ones(2, 3))


# ---------------------------------------------------------------- items 3 and 4: checkpoints, adapter

def predict_argv(run, tmp_path: Path) -> list[str]:
    images = tmp_path / "photos"
    images.mkdir(exist_ok=True)
    for path in sorted((run.data_root / "toy" / "test").rglob("*.png"))[:3]:
        (images / path.name).write_bytes(path.read_bytes())
    return ["--dataname", "toy", "--output_dir", str(run.output_dir), "--images", str(images),
            "--out", str(tmp_path / "predictions.jsonl")]


def test_item3_a_damaged_gate_is_refused_by_predict(finished, tmp_path, capsys):
    """Flipped bytes in ``gate/gate.pt``'s weights: ``gate_id`` in gate/meta.json is its hash, so
    predict.py stops with one line naming the file and stage 3's command, and writes nothing."""
    import predict
    from utils.errors import run_cli

    path = finished.stage("gate") / "gate.pt"
    rewrite_tensor(path, lambda checkpoint: next(iter(checkpoint["state_dict"].values())), flip)
    argv = predict_argv(finished, tmp_path)
    assert run_cli(predict.main, argv, parse=predict.parse) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {path}: damaged or replaced") and "gate_id" in line, line
    assert line.endswith("rerun `python train_gate.py --dataname toy` to rewrite it"), line
    assert not (tmp_path / "predictions.jsonl").exists()


@pytest.mark.parametrize("consumer", ["predict", "train_gate"])
def test_item4_a_damaged_adapter_is_refused(consumer, finished, tmp_path, capsys):
    """The adapter's ``lora_B`` tensors turned into NaN (the file still opens): ``adapter_id`` in
    vlm/meta.json is its hash, so predict.py, and stage 3 when it must answer again, stop with one
    line naming the file and stage 1's command; nothing is written."""
    import predict
    import train_gate
    from utils.errors import run_cli

    path = finished.stage("vlm") / "adapter_model.safetensors"
    assert rewrite_safetensors(path, lambda name: "lora_B" in name, to_nan)
    if consumer == "predict":
        argv = predict_argv(finished, tmp_path)
        assert run_cli(predict.main, argv, parse=predict.parse) == 2
        assert not (tmp_path / "predictions.jsonl").exists()
    else:
        (finished.stage("gate") / "cache" / "vlm_score_test.pt").unlink()  # stage 3 must answer again
        gate_before = stage_files(finished, "gate")
        assert run_cli(train_gate.main, gate_argv(finished), parse=train_gate.parse) == 2
        assert stage_files(finished, "gate") == gate_before
    line = one_error_line(capsys)
    assert line.startswith(f"error: {path}: damaged or replaced") and "adapter_id" in line, line
    assert line.endswith("rerun `python train_vlm.py --dataname toy` to rewrite it"), line


@pytest.mark.parametrize("checkpoint", ["teacher", "head"])
def test_damaged_teacher_and_head_checkpoints_are_refused(checkpoint, finished, capsys):
    """``teacher.pt`` (reused by stage 2) and ``head.pt`` (read by stage 3) are held to the ids
    their meta.json records: flipped bytes stop the stage with one line naming the stage to rerun."""
    import train_distillation
    import train_gate
    from utils.errors import run_cli

    path = finished.stage(checkpoint if checkpoint == "teacher" else "distill") / f"{checkpoint}.pt"
    rewrite_tensor(path, lambda stored: max(stored["state_dict"].values(), key=torch.Tensor.numel), flip)
    before = stage_files(finished, "distill")
    if checkpoint == "teacher":
        argv = finished.argv("--config", str(CONFIGS / "toy_distill.yaml"), "--epochs", "2")
        assert run_cli(train_distillation.main, argv, parse=train_distillation.parse) == 2
        line = one_error_line(capsys)
        assert line.startswith(f"error: {path}: damaged or replaced") and "teacher_id" in line, line
        assert "rerun `python train_distillation.py --dataname toy --retrain_teacher`" in line
    else:
        assert run_cli(train_gate.main, gate_argv(finished), parse=train_gate.parse) == 2
        line = one_error_line(capsys)
        assert line == (f"error: {path}: missing or not the head meta.json describes; rerun "
                        "`python train_distillation.py --dataname toy`")
    assert stage_files(finished, "distill") == before


# ---------------------------------------------------------------- non-finite predictions, resumed files

CLASSES = ["amusement", "anger", "awe"]


class FakePredictor:
    """``EmoVLMKD``'s interface for predict_folder: a fixed distribution, NaN for images named ``nan*``."""
    class_names = CLASSES
    gate = torch.nn.Identity()  # exposes no weights

    def predict_batch(self, images, max_new_tokens=128, explain=False):
        results = []
        for image in images:
            probs = dict(zip(CLASSES, [0.5, 0.25, 0.25]))
            vlm = {name: float("nan") for name in CLASSES} if image.info.get("nan") else probs
            results.append({"final_label": "amusement", "final_probs": probs, "vlm_label": "awe",
                            "vlm_answer": "awe", "vlm_probs": vlm, "head_label": "amusement",
                            "head_probs": probs, "gate": "concat_linear", "gate_weights": None,
                            "observation": None, "reasoning": None})
        return results


@pytest.fixture
def photos(tmp_path, monkeypatch) -> Path:
    import engine.predict_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png", "nan.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    real = engine.predict_folder.open_image

    def open_image(path):  # the fake predictor's NaN for nan.png
        image = real(path)
        image.info["nan"] = Path(path).name.startswith("nan")
        return image

    monkeypatch.setattr(engine.predict_folder, "open_image", open_image)
    return folder


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_non_finite_prediction_is_an_error_naming_the_image(fmt, photos, tmp_path):
    from engine.predict_folder import predict_folder
    from utils.errors import UserError

    out = tmp_path / f"p.{fmt}"
    with pytest.raises(UserError, match=r"nan\.png: the prediction is not finite \(NaN or infinity in vlm_probs\)"):
        predict_folder(FakePredictor(), photos, out, fmt, batch_size=2)
    text = out.read_text()
    assert "nan" not in text.lower().replace("nan.png", "") and "a.png" in text and "b.png" in text


@pytest.mark.parametrize("fmt, damage", [("jsonl", "nan"), ("jsonl", "digit"), ("jsonl", "label"),
                                         ("csv", "nan"), ("csv", "digit")])
def test_a_damaged_line_of_a_resumed_prediction_file_is_refused(fmt, damage, photos, tmp_path):
    """Resuming reads every line back: a NaN, a changed digit (the distribution no longer sums to 1)
    or a label of no class is refused, naming the file and line; the file is left as it was."""
    from engine.predict_folder import predict_folder
    from utils.errors import UserError

    (photos / "nan.png").unlink()
    out = tmp_path / f"p.{fmt}"
    assert predict_folder(FakePredictor(), photos, out, fmt)["done"] == 2
    lines = out.read_text().splitlines(keepends=True)
    last = lines[-1]
    lines[-1] = {"nan": last.replace("0.25", "NaN", 1) if fmt == "jsonl" else last.replace("0.25", "nan", 1),
                 "digit": last.replace("0.25", "0.75", 1), "label": last.replace('"awe"', '"aww"', 1)}[damage]
    assert lines[-1] != last
    out.write_text("".join(lines))
    before = out.read_bytes()
    with pytest.raises(UserError, match=rf"--out {re.escape(str(out))}:{len(lines)}: a damaged prediction record"):
        predict_folder(FakePredictor(), photos, out, fmt)
    assert out.read_bytes() == before


def test_json_outputs_never_hold_nan(tmp_path, caplog):
    from utils.io import write_json

    caplog.set_level(logging.WARNING, logger="utils.io")
    path = write_json(tmp_path / "metrics.json", {"kappa": float("nan"), "rows": [1.0, float("inf")]})
    assert json.loads(path.read_text()) == {"kappa": None, "rows": [1.0, None]}
    assert "kappa is nan; written as null" in caplog.text and "rows[1] is inf" in caplog.text


def test_stage1_evaluation_never_writes_nan_probabilities(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import engine.vlm_eval
    from models.scorer import VLMPredictions
    from utils.errors import UserError

    probs = torch.tensor([[0.5, 0.5], [float("nan"), 0.5]])
    monkeypatch.setattr(engine.vlm_eval, "predict_samples",
                        lambda *a, **k: VLMPredictions(pred=torch.tensor([0, 1]), probs=probs, texts=None))
    samples = [SimpleNamespace(path="a/1.png", label=0), SimpleNamespace(path="b/2.png", label=1)]
    with pytest.raises(UserError, match=r"b/2\.png: the VLM's class probabilities are not finite"):
        engine.vlm_eval.evaluate_vlm(None, None, tmp_path, samples, ["a", "b"], tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
