"""Typed stage records (utils/records.py): each meta.json round-trips through its record with the
keys on disk unchanged; a record this code cannot read is one error line naming the file and the
command rewriting it; each check refuses outputs that were not built on each other, naming the
stage to rerun; and a stage's ``main`` leaves the parsed flags as the user gave them."""
from __future__ import annotations

import json
from dataclasses import asdict, fields, replace

import pytest

from tests.pipeline import PIPELINE_GATE_ARGS, CONFIGS, finished, trained_pipeline  # noqa: F401
from utils.checkpoints import FORMAT_VERSION
from utils.errors import UserError
from utils.records import (DistillRecord, GateProvenance, GateRecord, InstructionsRecord, TeacherRecord,
                           VLMRecord, ZeroShotRecord)

CLASSES = ["anger", "awe", "fear", "joy"]
# One record per stage folder, every field set (the values a stage writes).
RECORDS = {
    "instructions": InstructionsRecord(class_names=CLASSES, generator="gpt-4o", num_annotated=7, num_train=8,
                                       num_rejected=1, num_mentions_label=2, complete=False),
    "vlm": VLMRecord(class_names=CLASSES, base_model="Qwen/Qwen2-VL-7B-Instruct", base_config_id="c" * 12,
                     adapter_id="a" * 12, min_pixels=3136, max_pixels=1003520, modules_to_save=[],
                     target_modules=["q_proj", "v_proj"], lora_r=8, lora_alpha=8, quant="4bit",
                     train_on_prompt=False, epochs=5, counts={"train_images": 8},
                     reference_annotations={"file": "abstract_annotations_train.json", "records": 9, "matched": 7},
                     attn_implementation="sdpa", gradient_checkpointing=True, eval_every_epoch=True,
                     tasks=["categorical"]),
    "teacher": TeacherRecord(class_names=CLASSES, model="vit_tiny_patch16_224", img_size=64, pretrained=False,
                             teacher_id="t" * 12, best_val_acc=0.5, epoch=2, train_images="1" * 16,
                             val_images="2" * 16, preprocessing="reference",
                             data_config={"input_size": [3, 64, 64], "interpolation": "bilinear"}),
    "distill": DistillRecord(class_names=CLASSES, base_model="Qwen/Qwen2-VL-7B-Instruct", head_id="h" * 12,
                             teacher_id="t" * 12, teacher_checkpoint="out/toy/teacher/teacher.pt",
                             adapter_id="a" * 12, in_dim=3584, run="depth=1,alpha=0.5,seed=42", depth=1,
                             alpha=0.5, seed=42, min_pixels=3136, max_pixels=1003520,
                             feature_dtype="torch.float32"),
    "gate": GateRecord(class_names=CLASSES, gate="concat_linear", gate_id="g" * 12),
    "vlm_zero_shot": ZeroShotRecord(class_names=CLASSES, base_model="Qwen/Qwen2-VL-7B-Instruct",
                                    base_config_id="c" * 12, min_pixels=3136, max_pixels=1003520, quant=None,
                                    vlm_dtype="fp32"),
}
# The keys each stage wrote before the records, in that order (after format_version, kind, stage).
KEYS_ON_DISK = {
    "instructions": ["class_names", "generator", "num_annotated", "num_train", "num_rejected",
                     "num_mentions_label", "complete"],
    "vlm": ["class_names", "base_model", "base_config_id", "adapter_id", "min_pixels", "max_pixels",
            "modules_to_save", "target_modules", "lora_r", "lora_alpha", "quant", "train_on_prompt", "epochs",
            "counts", "reference_annotations", "attn_implementation", "gradient_checkpointing", "eval_every_epoch",
            "tasks"],
    "vlm_zero_shot": ["class_names", "base_model", "base_config_id", "zero_shot", "min_pixels", "max_pixels", "quant",
                      "vlm_dtype"],
    "teacher": ["class_names", "model", "img_size", "pretrained", "teacher_id", "best_val_acc", "epoch",
                "train_images", "val_images", "preprocessing", "data_config"],
    "distill": ["class_names", "base_model", "head_id", "teacher_id", "teacher_checkpoint", "teacher", "adapter_id",
                "in_dim", "run", "depth", "alpha", "seed", "min_pixels", "max_pixels", "feature_dtype", "pre_resize"],
    "gate": ["class_names", "gate", "gate_id"],
}
PROVENANCE = GateProvenance(vlm_signal="onehot", vlm_answer="score", parser="lenient", max_new_tokens=32,
                            quant="none", adapter_id="a" * 12, head_id="h" * 12,
                            base_model="Qwen/Qwen2-VL-7B-Instruct", head_run="depth=1,alpha=0.5,seed=42")


@pytest.mark.parametrize("stage", list(RECORDS))
def test_a_record_round_trips_with_the_keys_on_disk(stage, tmp_path):
    record = RECORDS[stage]
    assert record.STAGE == stage
    path = record.write(tmp_path)
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == ["format_version", "kind", "stage", *KEYS_ON_DISK[stage]]
    assert on_disk == {"format_version": FORMAT_VERSION, "kind": "meta", "stage": stage, **asdict(record)}
    loaded = type(record).load(tmp_path, "toy")
    assert loaded == record and asdict(loaded) == asdict(record)


def test_fields_older_folders_may_lack_default_to_none(tmp_path):
    """Stage 1's meta.json as a benchmark writes it (class names and base model only)."""
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": "meta", "stage": "vlm",
                                                    "class_names": CLASSES, "base_model": "tiny"}))
    record = VLMRecord.load(tmp_path, "toy")
    assert (record.base_model, record.adapter_id, record.quant, record.min_pixels) == ("tiny", None, None, None)
    # How stage 1 trained, recorded later (#24): unknown in an older meta.json.
    assert (record.attn_implementation, record.gradient_checkpointing, record.eval_every_epoch) == (None, None, None)


@pytest.mark.parametrize("stage, key", [("instructions", "generator"), ("vlm", "base_model"),
                                        ("teacher", "class_names"), ("distill", "head_id"), ("distill", "run"),
                                        ("gate", "gate_id")])
def test_a_missing_required_key_is_one_line_naming_the_file(stage, key, tmp_path):
    record = RECORDS[stage]
    path = record.write(tmp_path)
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != key}))
    with pytest.raises(UserError) as err:
        type(record).load(tmp_path, "toy")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: no {key} recorded; "), message
    command = {"instructions": "delete it and rerun `python generate_instructions.py --dataname toy`",
               "vlm": "rerun `python train_vlm.py --dataname toy`",
               "teacher": "rerun `python train_distillation.py --dataname toy --retrain_teacher`",
               "distill": "rerun `python train_distillation.py --dataname toy`",
               "gate": "rerun `python train_gate.py --dataname toy`"}[stage]
    assert command in message, message


def _a_value_not_of(hint):
    """The first of a few JSON values that does not fit the type ``hint``."""
    from utils.records import _fits

    return next(value for value in ("big", 3, None, [1], {}) if not _fits(value, hint))


@pytest.mark.parametrize("stage, key", [(stage, field.name) for stage, record in RECORDS.items()
                                        for field in fields(record)])
def test_a_value_of_the_wrong_type_is_one_line_naming_the_file_and_the_key(stage, key, tmp_path):
    from typing import get_type_hints

    record = RECORDS[stage]
    path = record.write(tmp_path)
    value = _a_value_not_of(get_type_hints(type(record))[key])
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(UserError) as err:
        type(record).load(tmp_path, "toy")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: {key} is {value!r}, not "), message
    assert "rerun `python " in message, message


def test_gate_provenance_types_are_checked_too(tmp_path):
    with pytest.raises(UserError, match=r"gate.pt: max_new_tokens is 'big', not int; rerun `python train_gate.py"):
        GateProvenance.from_checkpoint({**asdict(PROVENANCE), "max_new_tokens": "big"}, tmp_path / "gate.pt", "toy")
    with pytest.raises(UserError, match=r"meta.json: no adapter_id recorded; rerun `python train_vlm.py --dataname toy`"):
        replace(RECORDS["vlm"], adapter_id=None).need(tmp_path, "adapter_id", dataname="toy")


def test_a_meta_json_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / "meta.json").write_bytes(b'{"format_version": 1, "kind": "me')
    with pytest.raises(UserError, match=r"meta.json: not a JSON record \(.*\); rerun `python train_gate.py"):
        GateRecord.load(tmp_path, "toy")


@pytest.mark.parametrize("stage", list(RECORDS))
def test_another_format_version_is_one_line_naming_the_file(stage, tmp_path):
    record = RECORDS[stage]
    path = record.write(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(UserError) as err:
        type(record).load(tmp_path, "toy")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: format_version 99, but this code reads 1"), message


def test_a_missing_folder_names_the_command_and_another_stage_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"no finished distill stage output .*run `python train_distillation.py "
                                        r"--dataname toy` first"):
        DistillRecord.load(tmp_path / "distill", "toy")
    RECORDS["vlm"].write(tmp_path)
    with pytest.raises(UserError, match="written by stage 'vlm', expected 'distill'"):
        DistillRecord.load(tmp_path, "toy")


def test_check_run_refuses_other_classes_or_another_base_vlm():
    vlm = RECORDS["vlm"]
    vlm.check_run("out/toy/vlm", CLASSES, vlm.base_model)
    vlm.check_run("out/toy/vlm", CLASSES)  # no --vlm_model: stage 1's is taken
    with pytest.raises(UserError, match=r"^out/toy/vlm: trained for classes \['anger', 'awe', 'fear', 'joy'\], "
                                        r"but this run has \['a', 'b'\]; retrain that stage for this dataset$"):
        vlm.check_run("out/toy/vlm", ["a", "b"])
    with pytest.raises(UserError, match=r"^out/toy/vlm: built on VLM 'Qwen/Qwen2-VL-7B-Instruct', but --vlm_model "
                                        r"is 'other'; pass the same --vlm_model or retrain that stage$"):
        vlm.check_run("out/toy/vlm", CLASSES, "other")


def test_a_teacher_is_reused_only_for_the_same_classes_model_size_and_images():
    teacher = RECORDS["teacher"]
    splits = {"train_images": teacher.train_images, "val_images": teacher.val_images}
    teacher.check_reusable("t", CLASSES, teacher.model, teacher.img_size, splits)
    teacher.check_reusable("t", CLASSES, teacher.model, teacher.img_size, splits, "reference")
    for args, expected in [((["a", "b"], teacher.model, 64, splits), r"trained for classes .*; or pass --retrain_teacher$"),
                           ((CLASSES, "vit_small", 64, splits), r"holds teacher vit_tiny_patch16_224 at 64 px, but "
                                                                r"this run asks for --teacher_model vit_small at 64 px"),
                           ((CLASSES, teacher.model, 224, splits), r"at 224 px; pass those flags, or --retrain_teacher"),
                           ((CLASSES, teacher.model, 64, {**splits, "val_images": "0" * 16}),
                            r"trained on other val_images \(the data split changed\); pass --retrain_teacher"),
                           ((CLASSES, teacher.model, 64, splits, "timm"),
                            r"trained with --teacher_data_config reference, but this run asks for timm")]:
        with pytest.raises(UserError, match=expected):
            teacher.check_reusable("t", *args)


@pytest.mark.parametrize("mismatch", ["classes", "base_vlm"])
def test_a_head_not_built_on_stage1_names_stage2(mismatch):
    vlm, head = RECORDS["vlm"], RECORDS["distill"]
    head.check_built_on(vlm, "out/toy/distill", "out/toy/vlm", "toy")
    other = replace(head, class_names=["a", "b"]) if mismatch == "classes" else replace(head, base_model="tiny")
    with pytest.raises(UserError) as err:
        other.check_built_on(vlm, "out/toy/distill", "out/toy/vlm", "toy")
    expected = {"classes": "out/toy/distill: trained for classes ['a', 'b'], but stage 1 (out/toy/vlm) has "
                           f"{CLASSES}; rerun `python train_distillation.py --dataname toy`",
                "base_vlm": "out/toy/distill: head trained on features of VLM 'tiny', but the stage-1 adapter in "
                            "out/toy/vlm is on 'Qwen/Qwen2-VL-7B-Instruct'; rerun `python train_distillation.py "
                            "--dataname toy --vlm_model Qwen/Qwen2-VL-7B-Instruct`"}[mismatch]
    assert str(err.value) == expected


@pytest.mark.parametrize("mismatch", ["classes", "base_vlm", "adapter", "head"])
def test_a_gate_not_built_on_stage1_and_stage2_names_stage3(mismatch):
    vlm, head = RECORDS["vlm"], RECORDS["distill"]
    PROVENANCE.check_built_on(CLASSES, vlm, head, "out/toy/gate", "out/toy/vlm", "toy")
    classes, provenance = CLASSES, PROVENANCE
    if mismatch == "classes":
        classes = ["a", "b"]
    else:
        field = {"base_vlm": "base_model", "adapter": "adapter_id", "head": "head_id"}[mismatch]
        provenance = replace(PROVENANCE, **{field: "0" * 12})
    with pytest.raises(UserError) as err:
        provenance.check_built_on(classes, vlm, head, "out/toy/gate", "out/toy/vlm", "toy")
    problem = {"classes": f"trained for classes ['a', 'b'], but stage 1 (out/toy/vlm) has {CLASSES}",
               "base_vlm": "built on VLM '000000000000', but stage 1 (out/toy/vlm) trained 'Qwen/Qwen2-VL-7B-Instruct'",
               "adapter": f"trained on the answers of another stage-1 adapter (000000000000, now {'a' * 12})",
               "head": f"trained on another distilled head (000000000000, now {'h' * 12})"}[mismatch]
    assert str(err.value) == f"out/toy/gate: {problem}; rerun `python train_gate.py --dataname toy`"


def test_gate_provenance_round_trips_through_gate_pt(tmp_path):
    from models.gates import build_gate, load_gate, save_gate

    save_gate(tmp_path / "gate.pt", "concat_linear", build_gate("concat_linear", 4), CLASSES, best_val_acc=0.5,
              epoch=2, **asdict(PROVENANCE))
    _, checkpoint = load_gate(tmp_path)
    assert GateProvenance.from_checkpoint(checkpoint, tmp_path / "gate.pt", "toy") == PROVENANCE
    del checkpoint["head_id"]
    with pytest.raises(UserError, match=r"gate.pt: no head_id recorded; rerun `python train_gate.py --dataname toy` "
                                        r"to rewrite it$"):
        GateProvenance.from_checkpoint(checkpoint, tmp_path / "gate.pt", "toy")


def test_stage3_leaves_the_flags_as_given_and_records_what_it_resolved(finished):  # noqa: F811
    """train_gate.main on the toy pipeline (its caches: no VLM forward): ``args`` is unchanged, run.json's
    ``args`` holds the flags as given and ``resolved`` what the stage derived; gate.pt keeps the resolved quant."""
    import torch

    import train_gate

    args = train_gate.parse(finished.argv("--config", str(CONFIGS / "toy_gate.yaml"), *PIPELINE_GATE_ARGS))
    given = vars(args).copy()
    train_gate.main(args)
    assert vars(args) == given
    run = json.loads((finished.stage("gate") / "run.json").read_text())
    assert run["args"]["seeds"] is None and "head_run" not in run["args"]
    # The VLM as the reference code loads it for the gate's inputs: unquantised, in float32.
    assert (run["args"]["quant"], run["args"]["vlm_dtype"]) == ("none", "fp32")
    assert run["resolved"] == {"head_run": "depth=1,alpha=0.5,seed=42", "seeds": [42]}
    gate = torch.load(finished.stage("gate") / "gate.pt", weights_only=True)
    assert (gate["quant"], gate["vlm_dtype"]) == ("none", "fp32")
