"""Stage 2 (train_distillation.py): the distillation loss, batched pooled features, teacher and head
on the toy data, the feature/logit caches, head reload, a 2-process run, and one-line errors."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import REPO, run_script

TOY_CONFIG = str(REPO / "configs" / "toy_distill.yaml")


def stage1_meta(output_dir: Path, vlm: Path) -> Path:
    """Stage 1's meta.json, the only stage-1 output stage 2 reads, written by the function stage 1
    uses. Real stage 1 -> 2 runs are covered by tests/pipeline.py and the quickstart test; here
    the stage-2 tests stay independent of LoRA training."""
    from data.toy import toy_class_names
    from utils.checkpoints import write_meta

    return write_meta(output_dir / "toy" / "vlm", "vlm", toy_class_names(4), base_model=str(vlm), adapter_id="test")


def stage2_argv(toy_root: Path, output_dir: Path, *extra: str) -> list[str]:
    # Three teacher epochs suffice for the tiny ViT on the toy set (from scratch at 64 px it reaches 100% by epoch 3).
    return ["--dataname", "toy", "--data_root", str(toy_root), "--output_dir", str(output_dir),
            "--config", TOY_CONFIG, "--teacher_epochs", "3", *extra]


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "toy" / "distill" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, toy_root, tiny_vlm_dir) -> Path:
    """One full in-process stage-2 run on the toy data; returns its --output_dir."""
    from train_distillation import main, parse

    output_dir = tmp_path_factory.mktemp("stage2")
    stage1_meta(output_dir, tiny_vlm_dir)
    main(parse(stage2_argv(toy_root, output_dir)))
    return output_dir


def test_loss_matches_the_formula():
    student = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0], [-1.5, 1.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0, -1.0], [3.0, -1.0, 0.0], [0.2, 0.2, 2.5]])
    targets = torch.tensor([0, 2, 1])

    def expected(alpha: float, t: float) -> float:
        kl = 0.0
        for s_row, t_row in zip(student.double(), teacher.double()):
            p = torch.exp(t_row / t) / torch.exp(t_row / t).sum()
            q = torch.exp(s_row / t) / torch.exp(s_row / t).sum()
            kl += float((p * (p / q).log()).sum())
        kl /= len(student)
        ce = -sum(float(torch.log(torch.exp(row) / torch.exp(row).sum())[y])
                  for row, y in zip(student.double(), targets)) / len(student)
        return alpha * t * t * kl + (1 - alpha) * ce

    from models.heads import distillation_loss

    for alpha in (0.0, 0.5, 1.0):
        for temperature in (1.0, 2.0, 4.0):
            got = distillation_loss(student, teacher, targets, alpha, temperature).item()
            assert got == pytest.approx(expected(alpha, temperature), rel=1e-5), (alpha, temperature)
    assert distillation_loss(student, teacher, targets, 0.0, 2.0).item() == pytest.approx(
        F.cross_entropy(student, targets).item())
    # alpha 1 ignores the labels; the T^2 factor is there (KL alone at T=4 is 16 times smaller).
    assert distillation_loss(student, teacher, targets.flip(0), 1.0, 4.0).item() == pytest.approx(expected(1.0, 4.0))
    assert distillation_loss(student, teacher, targets, 1.0, 4.0).item() == pytest.approx(
        16 * F.kl_div(F.log_softmax(student / 4, -1), F.softmax(teacher / 4, -1), reduction="batchmean").item())


def test_pooled_features_batched_equal_one_at_a_time(tiny_vlm_dir, toy_root):
    from models.vlm import load_processor, load_vlm, pooled_image_features, vision_hidden_size

    model, processor = load_vlm(str(tiny_vlm_dir)), load_processor(str(tiny_vlm_dir))
    files = sorted((toy_root / "toy" / "train").rglob("*.png"))[::20][:4]
    sizes = [(64, 64), (40, 30), (90, 60), (56, 112)]  # different numbers of visual tokens
    images = [Image.open(f).convert("RGB").resize(size) for f, size in zip(files, sizes)]
    batched = pooled_image_features(model, processor, images)
    assert batched.shape == (4, vision_hidden_size(model.config))
    single = torch.cat([pooled_image_features(model, processor, [image]) for image in images])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])


def test_teacher_and_head_beat_chance_and_the_folders_describe_themselves(stage2):
    metrics = read_metrics(stage2)
    assert metrics["n"] == 32 and metrics["split"] == "test"
    # Measured: head 0.906, teacher 0.938, agreement 0.938 (chance 0.25); asserted minus 10 points.
    assert metrics["accuracy"] >= 0.80 and metrics["teacher_accuracy"] >= 0.83
    assert metrics["agreement"] >= 0.83 and set(metrics["per_class"]) == set(metrics["class_names"])
    teacher_dir, distill_dir = stage2 / "toy" / "teacher", stage2 / "toy" / "distill"
    assert json.loads((teacher_dir / "metrics.json").read_text())["accuracy"] == metrics["teacher_accuracy"]
    checkpoint = torch.load(teacher_dir / "teacher.pt", weights_only=True)
    assert checkpoint["class_names"] == metrics["class_names"] and checkpoint["img_size"] == 64
    log_rows = [json.loads(line) for line in (distill_dir / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in log_rows] == list(range(1, 21))
    head = torch.load(distill_dir / "head.pt", weights_only=True)
    assert head["best_val_acc"] == max(row["val_acc"] for row in log_rows)
    assert head["in_dim"] == 64 and head["depth"] == 1 and head["class_names"] == metrics["class_names"]
    assert head["feature_dtype"] == json.loads((distill_dir / "meta.json").read_text())["feature_dtype"] \
        == "torch.float32"  # what stage 3 asks the feature cache for, on whatever device it runs
    for name in ("curves.png", "confusion_matrix.png", "run.json"):
        assert (distill_dir / name).is_file() and (teacher_dir / name).is_file()


def test_reloaded_head_reproduces_its_logits_exactly(stage2, toy_root, tmp_path):
    from engine.distill import train_head
    from models.heads import head_logits, load_head, save_head
    from utils.checkpoints import file_id, write_meta

    cache = stage2 / "toy" / "distill" / "cache"
    features = {s: torch.load(cache / f"vlm_features_{s}.pt", weights_only=True)["values"]
                for s in ("train", "val", "test")}
    teacher = {s: torch.load(cache / f"teacher_logits_{s}.pt", weights_only=True)["values"] for s in features}
    labels = {s: teacher[s].argmax(-1) for s in features}
    head = train_head(features, teacher, labels, 64, 4, depth=2, epochs=3, lr=1e-3, batch_size=16,
                      standardize=True).model
    path = save_head(tmp_path / "head.pt", head, ["a", "b", "c", "d"], base_model="tiny", teacher_id="t")
    write_meta(tmp_path, "distill", ["a", "b", "c", "d"], base_model="tiny", head_id=file_id(path), run="test")
    reloaded, _ = load_head(tmp_path)
    assert torch.equal(head_logits(reloaded, features["test"]), head_logits(head, features["test"]))
    assert torch.equal(reloaded.feature_std, head.feature_std) and not torch.all(reloaded.feature_std == 1)

    # The script's own head, reloaded, gives exactly the test metrics it wrote.
    from data.datasets import load_dataset
    from utils.metrics import classification_metrics

    script_head, head_record = load_head(stage2 / "toy" / "distill")
    truth = [sample.label for sample in load_dataset(toy_root, "toy", stage2).test]
    recomputed = classification_metrics(truth, head_logits(script_head, features["test"]).argmax(-1),
                                        head_record.class_names)
    metrics = read_metrics(stage2)
    assert recomputed["accuracy"] == metrics["accuracy"]
    assert recomputed["confusion_matrix"] == metrics["confusion_matrix"]


def test_second_run_reuses_the_caches_and_gives_the_same_metrics(stage2, toy_root, monkeypatch, caplog):
    import engine.features
    from train_distillation import main, parse

    calls = []
    for name in ("load_vlm", "pooled_image_features", "load_teacher"):
        original = getattr(engine.features, name)
        monkeypatch.setattr(engine.features, name,
                            lambda *a, _name=name, _f=original, **k: calls.append(_name) or _f(*a, **k))
    before = read_metrics(stage2)
    caplog.set_level(logging.INFO, logger="utils.cache")
    main(parse(stage2_argv(toy_root, stage2)))
    assert calls == []  # no VLM load, no encoder forward, no teacher forward
    assert sum("cache hit" in record.message for record in caplog.records) == 6
    assert read_metrics(stage2) == before


def test_feature_dtype_bf16_rebuilds_the_cache_in_bf16_and_records_it(stage2, toy_root, tmp_path, caplog):
    """--feature_dtype bf16 (the faster pass) is another cache key and is recorded with the head,
    which stage 3 and the predictor follow; the default is the reference code's float32."""
    from train_distillation import main, parse

    output_dir = tmp_path / "out"
    for name in ("vlm", "teacher", "distill"):  # stage 2's own float32 cache, so the key's dtype decides
        shutil.copytree(stage2 / "toy" / name, output_dir / "toy" / name)
    shutil.copy(stage2 / "toy" / "split.json", output_dir / "toy" / "split.json")
    caplog.set_level(logging.INFO, logger="utils.cache")
    main(parse(stage2_argv(toy_root, output_dir, "--feature_dtype", "bf16")))
    stale = [r.message for r in caplog.records if "cache stale" in r.message]
    assert len(stale) == 3 and all("dtype" in message for message in stale)  # train, val, test re-encoded
    distill_dir = output_dir / "toy" / "distill"
    cached = torch.load(distill_dir / "cache" / "vlm_features_train.pt", weights_only=True)
    assert cached["key"]["dtype"] == "torch.bfloat16"
    head = torch.load(distill_dir / "head.pt", weights_only=True)
    assert head["feature_dtype"] == json.loads((distill_dir / "meta.json").read_text())["feature_dtype"] \
        == "torch.bfloat16"
    assert parse(stage2_argv(toy_root, output_dir)).feature_dtype == "fp32"


def test_stale_cache_is_rebuilt_with_a_log_line(stage2, tiny_vlm_dir, toy_root, tmp_path, caplog):
    from data.datasets import load_dataset
    from engine.features import cached_vlm_features

    cache = tmp_path / "cache"
    splits = load_dataset(toy_root, "toy", stage2)
    first = cached_vlm_features(splits, str(tiny_vlm_dir), None, "cpu", 8, cache, names=("val",))["val"]
    caplog.set_level(logging.INFO, logger="utils.cache")

    other_model = tmp_path / "other-vlm"
    shutil.copytree(tiny_vlm_dir, other_model)
    again = cached_vlm_features(splits, str(other_model), None, "cpu", 8, cache, names=("val",))["val"]
    assert any("cache stale" in r.message and "vlm_model" in r.message for r in caplog.records)
    torch.testing.assert_close(again, first)  # same weights, rebuilt all the same

    caplog.clear()
    splits.val = splits.val[1:]
    fewer = cached_vlm_features(splits, str(other_model), None, "cpu", 8, cache, names=("val",))["val"]
    assert any("cache stale" in r.message and "images" in r.message for r in caplog.records)
    assert len(fewer) == len(first) - 1


def test_two_processes_shard_the_images_and_match_one(stage2, toy_root, tmp_path):
    output_dir = tmp_path / "out"
    for name in ("vlm", "teacher"):  # stage 1 meta and the trained teacher, so only stage 2's sharded part runs
        shutil.copytree(stage2 / "toy" / name, output_dir / "toy" / name)
    shutil.copy(stage2 / "toy" / "split.json", output_dir / "toy" / "split.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train_distillation.py", *stage2_argv(toy_root, output_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    assert read_metrics(output_dir) == read_metrics(stage2)
    cache = "toy/distill/cache/vlm_features_train.pt"
    assert torch.equal(torch.load(output_dir / cache)["values"], torch.load(stage2 / cache)["values"])


def test_leaving_the_process_group_tears_it_down_once(tmp_path):
    import torch.distributed as dist

    from utils.dist import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    leave_process_group()
    assert not dist.is_initialized()
    leave_process_group()  # a second call, or a run without a launcher, does nothing


def test_missing_stage1_output_exits_2_naming_train_vlm(toy_root, tmp_path):
    result = run_script("train_distillation.py", *stage2_argv(toy_root, tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "python train_vlm.py --dataname toy" in lines[0]


@pytest.mark.parametrize("case", ["teacher_checkpoint_classes", "own_teacher_classes", "own_teacher_other_split",
                                  "another_vlm", "teacher_without_format", "teacher_of_unknown_format",
                                  "vlm_meta_without_format"])
def test_bad_inputs_are_one_line_errors(case, stage2, tiny_vlm_dir, toy_root, tmp_path, capsys):
    from data.toy import toy_class_names
    from models.teacher import build_teacher, save_teacher
    from train_distillation import main, parse
    from utils.checkpoints import write_meta
    from utils.errors import run_cli

    meta_path = stage1_meta(tmp_path, tiny_vlm_dir)
    extra = []
    if case in ("teacher_without_format", "teacher_of_unknown_format"):  # a teacher.pt this code cannot read
        checkpoint = torch.load(stage2 / "toy" / "teacher" / "teacher.pt", weights_only=True)
        assert checkpoint["class_names"] == toy_class_names(4)  # it fits this dataset otherwise
        checkpoint.pop("format_version")
        if case == "teacher_of_unknown_format":
            checkpoint = {"format_version": 99, **checkpoint}
        torch.save(checkpoint, tmp_path / "teacher.pt")
        extra = ["--teacher_checkpoint", str(tmp_path / "teacher.pt")]
        found = {"teacher_without_format": "no format_version (not written by this version of the code)",
                 "teacher_of_unknown_format": "format_version 99, but this code reads 1"}[case]
        expected = f"teacher.pt: {found}; rerun `python train_distillation.py --dataname toy --retrain_teacher`"
    elif case == "vlm_meta_without_format":  # stage 1's meta.json from before format_version
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("format_version", "kind")}))
        expected = "meta.json: no format_version (not written by this version of the code); rerun " \
            "`python train_vlm.py --dataname toy` to rewrite it"
    elif case == "teacher_checkpoint_classes":
        model = build_teacher("vit_tiny_patch16_224", 2, 64, pretrained=False)
        path = save_teacher(tmp_path / "other.pt", model, "vit_tiny_patch16_224", 64, ["cats", "dogs"],
                            {"input_size": (3, 64, 64)}, False, 1.0, 1)
        extra, expected = ["--teacher_checkpoint", str(path)], "['cats', 'dogs']"
    elif case == "own_teacher_classes":
        folder = tmp_path / "toy" / "teacher"
        folder.mkdir(parents=True)
        (folder / "teacher.pt").write_bytes(b"")
        write_meta(folder, "teacher", ["cats", "dogs"], model="vit_tiny_patch16_224", img_size=64)
        expected = "--retrain_teacher"
    elif case == "own_teacher_other_split":  # the stage's own teacher, as if trained before the split changed
        shutil.copytree(stage2 / "toy" / "teacher", tmp_path / "toy" / "teacher")
        shutil.copy(stage2 / "toy" / "split.json", tmp_path / "toy" / "split.json")
        meta_path = tmp_path / "toy" / "teacher" / "meta.json"
        meta = json.loads(meta_path.read_text())
        assert len(meta["train_images"]) == len(meta["val_images"]) == 16
        meta_path.write_text(json.dumps({**meta, "val_images": "0" * 16}))
        expected = "trained on other val_images (the data split changed); pass --retrain_teacher"
    else:
        extra, expected = ["--vlm_model", str(tmp_path / "elsewhere")], "--vlm_model"
    assert run_cli(main, stage2_argv(toy_root, tmp_path, *extra), parse=parse) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


@pytest.mark.parametrize("flag", ["--epochs", "--teacher_epochs", "--batch_size", "--feature_batch_size",
                                  "--teacher_batch_size"])
def test_counts_below_one_are_one_line_errors(flag, toy_root, tmp_path, capsys):
    from train_distillation import main, parse
    from utils.errors import run_cli

    assert run_cli(main, stage2_argv(toy_root, tmp_path, flag, "0"), parse=parse) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {flag} must be at least 1 (got 0)"]


def test_every_teacher_uses_the_authors_preprocessing_and_timms_is_one_flag_away():
    """Default teacher: google/vit-base-patch16-384's weights with mean/std 0.5 and bilinear
    resizing; train = random resized crop 384 + flip, eval = resize + centre crop 384. Every other
    teacher the same by default (the reference's VGG-16 and ResNet-50 too); --teacher_data_config
    timm gives each checkpoint its own."""
    from types import SimpleNamespace

    import timm
    from torchvision import transforms as T

    from models.teacher import DEFAULT_TEACHER, data_config, teacher_transforms
    import train_distillation

    assert DEFAULT_TEACHER == "vit_base_patch16_384.orig_in21k_ft_in1k"
    parser = train_distillation.get_args_parser()
    assert parser.get_default("teacher_model") == [DEFAULT_TEACHER]
    assert parser.get_default("teacher_data_config") == "reference"

    def fake_model(name):  # data_config reads only the checkpoint's pretrained config
        return SimpleNamespace(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())

    config = data_config(fake_model(DEFAULT_TEACHER))
    assert (config["mean"], config["std"], config["interpolation"]) == ((0.5,) * 3, (0.5,) * 3, "bilinear")
    assert config["input_size"] == (3, 384, 384)
    train, evaluate = teacher_transforms(config)
    steps = [repr(t) for t in train.transforms]  # timm's own RandomResizedCrop class: compare by description
    assert steps[0].startswith("RandomResizedCrop") and "size=(384, 384)" in steps[0] and "bilinear" in steps[0]
    assert isinstance(train.transforms[1], T.RandomHorizontalFlip)
    resize, crop = evaluate.transforms[:2]
    assert isinstance(resize, T.Resize) and resize.interpolation == T.InterpolationMode.BILINEAR
    assert isinstance(crop, T.CenterCrop) and crop.size == (384, 384)
    normalize = evaluate.transforms[-1]
    assert normalize.mean.tolist() == normalize.std.tolist() == [0.5] * 3

    assert data_config(fake_model(DEFAULT_TEACHER), preprocessing="timm")["interpolation"] == "bicubic"

    for other in ("resnet50.a1_in1k", "vgg16.tv_in1k"):  # the reference's other teachers: 384 px, 0.5, bilinear
        config = data_config(fake_model(other))
        assert (config["input_size"], config["mean"], config["std"], config["interpolation"], config["crop_pct"]) == (
            (3, 384, 384), (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
        own = timm.models.get_pretrained_cfg(other)  # timm's own, one flag away
        config = data_config(fake_model(other), preprocessing="timm")
        assert (config["input_size"], config["mean"], config["interpolation"], config["crop_pct"]) == (
            own.input_size, own.mean, own.interpolation, own.crop_pct)
        assert config["mean"] != (0.5,) * 3
