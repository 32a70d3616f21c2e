"""One checkpoint schema: each artefact's save/load pair round-trips exactly, and a record of a
format this code does not read (no ``format_version``, an unknown one, another kind) is one
error line naming the file and the command that rewrites it. The stage command lines that read
each artefact are checked in test_stage2.py, test_stage3.py and test_demo.py."""
from __future__ import annotations

import json

import pytest
import torch

from models.gates import GATES, build_gate, load_gate, save_gate
from models.heads import DistillHead, load_head, save_head
from models.teacher import build_teacher, load_teacher, save_teacher
from utils.checkpoints import FORMAT_VERSION, check_format, file_id, read_checkpoint, read_meta, stamp, write_meta
from utils.errors import UserError

CLASSES = ["anger", "awe", "fear", "joy"]


def test_teacher_round_trip_reproduces_its_logits_and_metadata(tmp_path):
    torch.manual_seed(0)
    teacher = build_teacher("vit_tiny_patch16_224", len(CLASSES), 32, pretrained=False).eval()
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    path = save_teacher(tmp_path / "teacher.pt", teacher, "vit_tiny_patch16_224", 32, CLASSES, config,
                        False, 0.75, 3)
    reloaded, checkpoint = load_teacher(path, CLASSES)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(images), teacher(images))
    assert {key: checkpoint[key] for key in ("format_version", "kind", "model", "img_size", "class_names",
                                             "data_config", "pretrained", "best_val_acc", "epoch")} == {
        "format_version": FORMAT_VERSION, "kind": "teacher", "model": "vit_tiny_patch16_224", "img_size": 32,
        "class_names": CLASSES, "data_config": config, "pretrained": False, "best_val_acc": 0.75, "epoch": 3}


def test_head_round_trip_reproduces_its_logits_and_metadata(tmp_path):
    torch.manual_seed(0)
    head = DistillHead(16, len(CLASSES), depth=2).eval()
    head.set_standardization(torch.randn(10, 16) * 3 + 1)
    path = save_head(tmp_path / "head.pt", head, CLASSES, base_model="tiny", teacher_id="t" * 12)
    write_meta(tmp_path, "distill", CLASSES, base_model="tiny", head_id=file_id(path), run="test")
    reloaded, head_record = load_head(tmp_path, CLASSES, "tiny")
    features = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(features), head(features))
    assert (reloaded.depth, reloaded.dropout) == (2, head.dropout)
    assert head_record.head_id == file_id(path)
    assert torch.equal(load_head(path)[0](features), head(features))  # the file itself works too
    saved = torch.load(path, weights_only=True)
    assert (saved["kind"], saved["class_names"], saved["base_model"], saved["teacher_id"]) == \
        ("head", CLASSES, "tiny", "t" * 12)


@pytest.mark.parametrize("name", list(GATES))
def test_gate_round_trip_reproduces_its_logits_and_metadata(name, tmp_path):
    torch.manual_seed(0)
    gate = build_gate(name, len(CLASSES)).eval()
    path = save_gate(tmp_path / "gate.pt", name, gate, CLASSES, best_val_acc=0.5, epoch=2, head_id="h" * 12)
    reloaded, checkpoint = load_gate(tmp_path)  # the stage folder; the file itself works too
    signal, logits = torch.eye(len(CLASSES))[[0, 2, 3]], torch.randn(3, len(CLASSES))
    with torch.no_grad():
        assert torch.equal(reloaded(signal, logits), gate(signal, logits))
    assert checkpoint == {"format_version": FORMAT_VERSION, "kind": "gate", "gate": name,
                          "num_classes": len(CLASSES), "class_names": CLASSES, "best_val_acc": 0.5, "epoch": 2,
                          "head_id": "h" * 12}
    assert load_gate(path)[1] == checkpoint


def test_meta_round_trip(tmp_path):
    write_meta(tmp_path, "vlm", CLASSES, base_model="tiny", adapter_id="a" * 12)
    assert read_meta(tmp_path, "vlm", "toy") == {"format_version": FORMAT_VERSION, "kind": "meta", "stage": "vlm",
                                                 "class_names": CLASSES, "base_model": "tiny",
                                                 "adapter_id": "a" * 12}


@pytest.mark.parametrize("case", ["missing", "unknown", "other_kind", "not_a_dict"])
def test_an_unreadable_format_is_one_line_naming_file_and_command(case):
    record = {"missing": {"state_dict": {}}, "unknown": {"format_version": 99, "kind": "head"},
              "other_kind": stamp({}, "gate"), "not_a_dict": [1, 2]}[case]
    with pytest.raises(UserError) as err:
        check_format(record, "out/toy/distill/head.pt", "head", dataname="toy")
    message = str(err.value)
    found = {"missing": "no format_version", "unknown": "format_version 99, but this code reads 1",
             "other_kind": "a 'gate' record where a 'head' one belongs", "not_a_dict": "no format_version"}[case]
    assert "\n" not in message and message.startswith("out/toy/distill/head.pt: ") and found in message
    assert message.endswith("rerun `python train_distillation.py --dataname toy` to rewrite it")
    assert check_format(stamp({"x": 1}, "head"), "head.pt", "head") == {"format_version": 1, "kind": "head", "x": 1}


def test_an_old_meta_json_names_the_stage_that_writes_it(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"stage": "vlm", "class_names": CLASSES}))
    with pytest.raises(UserError, match=r"meta.json: no format_version .*rerun `python train_vlm.py --dataname toy`"):
        read_meta(tmp_path, "vlm", "toy")
    # Stage 0 reads its own meta.json when it resumes: rerunning it alone would meet the same file.
    (tmp_path / "meta.json").write_text(json.dumps({"stage": "instructions", "class_names": CLASSES}))
    with pytest.raises(UserError, match=r"delete it and rerun `python generate_instructions.py --dataname toy`"):
        read_meta(tmp_path, "instructions", "toy")


def test_an_unreadable_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "gate.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError) as err:
        read_checkpoint(path, "gate", "toy")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: cannot read it (")
    assert message.endswith("rerun `python train_gate.py --dataname toy` to rewrite it")
