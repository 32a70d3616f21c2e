"""Scale-out: every frozen pass sharded by utils.dist gives, with two gloo processes, exactly the
one-process output; a killed or failing rank ends the run cleanly and a rerun completes; and
predict.py agrees with stage 3's evaluation image by image.

Each two-process run costs a few seconds of imports, so each pass gets one faulty run and one
clean rerun, and the checks are combined on their outputs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.pipeline import CONFIGS, PIPELINE_GATE_ARGS, gate_data_from_caches, trained_pipeline  # noqa: F401


def torchrun(*args: str, fault: tuple[str, int] | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node <nproc> <args>`` on CPU; ``fault`` kills rank 1 at that function's Nth call."""
    script = ["tests/rank_fault.py", fault[0], str(fault[1])] if fault else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *script, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def copy_stages(pipeline, output_dir: Path, *stages: str) -> Path:
    for stage in stages:
        shutil.copytree(pipeline.stage(stage), output_dir / "toy" / stage)
    shutil.copy(pipeline.output_dir / "toy" / "split.json", output_dir / "toy" / "split.json")
    return output_dir


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ---------------------------------------------------------------- the helper itself

@dataclass
class Answers:
    pred: torch.Tensor
    texts: list | None


def _offset(block: range, start: int) -> list[int]:
    return [start + i for i in block]


def test_blocks_cover_every_item_once_and_join_in_order(tmp_path):
    from utils.dist import concat_parts, merge_part_files, part_file, shard_map, shard_range

    for count in (0, 1, 7, 8, 23):
        for unit in (1, 4):
            blocks = [shard_range(count, rank, 3, unit) for rank in range(3)]
            assert [i for block in blocks for i in block] == list(range(count))
            assert all(block.start % unit == 0 for block in blocks if block)  # whole batches
    assert [len(shard_range(23, rank, 3, 4)) for rank in range(3)] == [8, 8, 7]
    parts = [Answers(torch.tensor([0, 1]), None), None, Answers(torch.tensor([2]), None)]  # None: a rank without items
    joined = concat_parts(parts)
    assert joined.pred.tolist() == [0, 1, 2] and joined.texts is None
    assert shard_map(5, list) == [0, 1, 2, 3, 4]  # no launcher: one block
    assert shard_map(3, _offset, 10) == [10, 11, 12]  # data passed beside the block

    out = tmp_path / "out.jsonl"
    out.write_text("a\n")
    part_file(out, 10).write_text("d\n")
    part_file(out, 2).write_text("b\nc\nunfinish")  # a killed rank's last line
    assert merge_part_files(out) == 3
    assert out.read_text() == "a\nb\nc\nd\n" and not list(tmp_path.glob("*.part*"))


# ---------------------------------------------------------------- stage 1 evaluation

def test_stage1_eval_two_processes_equal_one(trained_pipeline, tmp_path):  # noqa: F811
    import train_vlm

    one, two = (copy_stages(trained_pipeline, tmp_path / name, "vlm") for name in ("one", "two"))
    flags = ["--dataname", "toy", "--data_root", str(trained_pipeline.data_root), "--eval_only",
             "--eval_batch_size", "3"]
    train_vlm.main(train_vlm.parse([*flags, "--output_dir", str(one)]))
    result = torchrun("train_vlm.py", *flags, "--output_dir", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test accuracy") == 1  # printed by rank 0 only
    assert "32 items sharded over 2 processes (14-18 each)" in result.stderr
    for name in ("predictions.jsonl", "metrics.json"):
        assert (two / "toy/vlm/eval_score" / name).read_text() == (one / "toy/vlm/eval_score" / name).read_text()


# ---------------------------------------------------------------- stage 2's teacher, data-parallel

def test_stage2_teacher_data_parallel_over_two_processes_equals_one(toy_root, tiny_vlm_dir, tmp_path):
    """The teacher trained by 2 gloo processes is the teacher one process trains: the same weights
    (within 1e-5), epochs, losses and validation. Global batches of 3 over 88 training images: each
    step splits 2+1 (uneven, so a local mean instead of the global one changes the steps: weights
    then differ by ~3e-3), and the last batch of 1 leaves rank 1 without images (its zero gradient
    must not count).

    One part of the weights is left out: the key third of each attention's qkv bias. Its gradient
    is zero in exact arithmetic (softmax ignores a shift shared by all keys), so what it gets is
    rounding noise, which Adam normalises into lr-sized steps: two runs whose sums round
    differently (any change of batch shapes or threads) move it apart, without changing a logit.
    The same holds, rarely, for a weight whose gradient happens to be near zero: measured, one
    weight in ~10^5 ends about lr/4 apart (2.5e-5 at lr 1e-4). So the test trains at lr 1e-5 (the
    paper's teacher takes 3e-5), where the two runs stay within 3e-6 and the local-mean mutant ends
    ~3e-4 away."""
    from data.toy import toy_class_names
    from utils.checkpoints import write_meta

    flags = ["train_distillation.py", "--dataname", "toy", "--data_root", str(toy_root), "--config",
             str(CONFIGS / "toy_distill.yaml"), "--teacher_epochs", "2", "--teacher_batch_size", "3", "--teacher_lr", "1e-5", "--epochs", "1"]
    runs = {}
    for nproc in (1, 2):
        output_dir = tmp_path / f"nproc{nproc}"
        write_meta(output_dir / "toy" / "vlm", "vlm", toy_class_names(4), base_model=str(tiny_vlm_dir),
                   adapter_id="stand-in")
        result = torchrun(*flags, "--output_dir", str(output_dir), nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = (output_dir / "toy" / "teacher", result.stdout)
    (one, one_out), (two, two_out) = runs[1], runs[2]
    assert "teacher: one process, batch 3, fp32" in one_out
    assert two_out.count("teacher: data-parallel over 2 processes, global batch 3 (2+1 per step), fp32") == 1

    weights = [torch.load(folder / "teacher.pt", weights_only=True) for folder in (one, two)]
    assert weights[0]["epoch"] == weights[1]["epoch"] and weights[0]["best_val_acc"] == weights[1]["best_val_acc"]
    assert weights[0]["state_dict"].keys() == weights[1]["state_dict"].keys()
    for key, value in weights[0]["state_dict"].items():
        other = weights[1]["state_dict"][key]
        if key.endswith(".attn.qkv.bias"):  # the query and value biases; the key bias is free (see above)
            third = len(value) // 3
            value, other = torch.cat([value[:third], value[2 * third:]]), torch.cat([other[:third], other[2 * third:]])
        torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-5, msg=key)
    first = [json.loads(line) for line in (one / "log.txt").read_text().splitlines()]
    second = [json.loads(line) for line in (two / "log.txt").read_text().splitlines()]
    assert [row["val_acc"] for row in first] == [row["val_acc"] for row in second] and len(first) == 2
    for a, b in zip(first, second):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert json.loads((two / "metrics.json").read_text())["accuracy"] == \
        json.loads((one / "metrics.json").read_text())["accuracy"]
    record = json.loads((two / "run.json").read_text())
    assert record["processes"] == 2 and record["args"]["teacher_precision"] == "fp32"


# ---------------------------------------------------------------- stage 3 VLM answers

def test_stage3_killed_rank_keeps_caches_valid_and_sharded_rerun_equals_one(trained_pipeline, tmp_path):  # noqa: F811
    output_dir = copy_stages(trained_pipeline, tmp_path / "out", "vlm", "distill")
    argv = ["train_gate.py", *trained_pipeline.argv("--config", str(CONFIGS / "toy_gate.yaml"), *PIPELINE_GATE_ARGS)]
    argv[argv.index("--output_dir") + 1] = str(output_dir)
    cache, reference = output_dir / "toy/gate/cache", trained_pipeline.stage("gate") / "cache"

    killed = torchrun(*argv, fault=("engine.vlm_answers.predict_vlm", 1))
    assert killed.returncode != 0
    assert not list(cache.glob("vlm_score_*.pt")) and not (output_dir / "toy/gate/meta.json").exists()

    rerun = torchrun(*argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("items sharded over 2 processes") == 3  # train, val, test
    for split in ("train", "val", "test"):
        built = torch.load(cache / f"vlm_score_{split}.pt", weights_only=True)
        expected = torch.load(reference / f"vlm_score_{split}.pt", weights_only=True)
        assert built["key"] == expected["key"]
        assert torch.equal(built["values"]["pred"], expected["values"]["pred"])
        assert torch.equal(built["values"]["probs"], expected["values"]["probs"])
    metrics = json.loads((output_dir / "toy/gate/metrics.json").read_text())
    assert metrics == json.loads((trained_pipeline.stage("gate") / "metrics.json").read_text())


# ---------------------------------------------------------------- stage 0, local backend

def test_stage0_local_backend_killed_rank_resumes_to_the_one_process_file(tiny_vlm_dir, tmp_path):
    from data.annotations import ANNOTATIONS_FILE
    from data.toy import make_toy_dataset
    from generate_instructions import main, parse

    root = tmp_path / "images"
    make_toy_dataset(root / "toy", num_classes=2, per_class=6, test_per_class=1, seed=0, size=64)
    flags = ["generate_instructions.py", "--dataname", "toy", "--data_root", str(root), "--backend", "local",
             "--vlm_model", str(tiny_vlm_dir), "--accept_unstructured", "--max_new_tokens", "6",
             "--batch_size", "2"]
    main(parse([*flags[1:], "--output_dir", str(tmp_path / "one")]))
    folder = tmp_path / "two/toy/instructions"

    # Rank 1 dies before writing; rank 0 may have written part of its block: a prefix of the
    # images, so the rerun's remaining images come after it and the order stays the one-process order.
    killed = torchrun(*flags, "--output_dir", str(tmp_path / "two"), fault=("engine.instructions.generate_texts", 1))
    assert killed.returncode != 0 and not (folder / "meta.json").exists()
    rerun = torchrun(*flags, "--output_dir", str(tmp_path / "two"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (folder / ANNOTATIONS_FILE).read_text() == (tmp_path / "one/toy/instructions" / ANNOTATIONS_FILE).read_text()
    assert not list(folder.glob("*.part*"))
    assert json.loads((folder / "meta.json").read_text())["complete"] is True


# ---------------------------------------------------------------- predict.py

def stage3_test_predictions(pipeline) -> dict[str, dict]:
    """Stage 3's evaluation per test image (from its caches and gate.pt): labels and final probabilities."""
    import train_gate
    from data.datasets import load_dataset
    from engine.gate import gate_logits
    from models.gates import load_gate
    from utils.cli import parse_args

    args = parse_args(train_gate.get_args_parser(), pipeline.argv())
    splits = load_dataset(args.data_root, "toy", args.output_dir)
    gate, checkpoint = load_gate(pipeline.stage("gate"))
    args.vlm_signal, args.vlm_answer = checkpoint["vlm_signal"], checkpoint["vlm_answer"]
    test = gate_data_from_caches(args)["test"]
    probs = gate_logits(gate, test).softmax(-1)
    names = splits.class_names
    return {Path(sample.path).relative_to("toy/test").as_posix(): {
        "final": names[int(probs[i].argmax())], "final_probs": probs[i].tolist(),
        "head": names[int(test.head_logits[i].argmax())],
        "vlm": names[int(test.vlm_pred[i])] if test.vlm_pred[i] >= 0 else None}
        for i, sample in enumerate(splits.test)}


def test_predict_folder_sharded_failing_rank_rerun_and_agreement_with_stage3(trained_pipeline, tmp_path):  # noqa: F811
    import predict
    from engine.predict_folder import list_images

    images = tmp_path / "photos"
    shutil.copytree(trained_pipeline.data_root / "toy" / "test", images)
    flags = ["predict.py", "--dataname", "toy", "--output_dir", str(trained_pipeline.output_dir),
             "--images", str(images), "--batch_size", "4"]
    predict.main(predict.parse([*flags[1:], "--out", str(tmp_path / "one.jsonl")]))
    one = (tmp_path / "one.jsonl").read_text()
    records = [json.loads(line) for line in one.splitlines()]
    assert [r["image"] for r in records] == list_images(images)

    # Image by image, predict.py gives what stage 3's evaluation gave.
    expected = stage3_test_predictions(trained_pipeline)
    assert len(records) == len(expected) == 32
    for record in records:
        want = expected[record["image"]]
        assert (record["final_label"], record["head_label"], record["vlm_label"]) == \
            (want["final"], want["head"], want["vlm"]), record["image"]
        assert list(record["final_probs"].values()) == pytest.approx(want["final_probs"], abs=1e-5)

    # An undecodable image first in rank 1's block: one error line naming it, rank 0's records kept.
    names = list_images(images)
    bad = images / (str(Path(names[19]).with_suffix("")) + "_bad.png")  # sorts right after image 19
    bad.write_bytes(b"not an image")
    assert list_images(images).index(bad.relative_to(images).as_posix()) == 20  # 33 images: 5 batches + 4
    out = tmp_path / "two.jsonl"
    failed = torchrun(*flags, "--out", str(out))
    assert failed.returncode != 0
    assert len(error_lines(failed.stderr)) == 1 and "rank 1 of 2" in error_lines(failed.stderr)[0] \
        and bad.name in error_lines(failed.stderr)[0], failed.stderr[-3000:]
    assert out.read_text() == "".join(one.splitlines(keepends=True)[:20])

    bad.unlink()
    rerun = torchrun(*flags, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "20 were already in" in rerun.stdout
    assert out.read_text() == one and not list(tmp_path.glob("*.part*"))


def test_predict_csv_resumes_and_explains(trained_pipeline, tmp_path):  # noqa: F811
    import csv

    import predict

    images = tmp_path / "photos"
    for path in sorted((trained_pipeline.data_root / "toy" / "test").rglob("*.png"))[:3]:
        (images / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, images / path.parent.name / path.name)
    out = tmp_path / "p.csv"
    argv = ["--dataname", "toy", "--output_dir", str(trained_pipeline.output_dir), "--images", str(images),
            "--out", str(out), "--explain", "--max_new_tokens", "4"]
    predict.main(predict.parse(argv))
    first = out.read_text()
    with open(out, "a") as fh:  # a killed run's unfinished line
        fh.write("amusement/x.png,amu")
    (images / "more").mkdir()
    shutil.copy(next(images.rglob("*.png")), images / "more" / "new.png")
    predict.main(predict.parse(argv))
    rows = list(csv.DictReader(out.open()))
    assert out.read_text().startswith(first) and len(rows) == 4 and rows[-1]["image"] == "more/new.png"
    assert {"final_label", "final_probs.anger", "head_probs.awe", "key_elements", "reasoning"} <= set(rows[0])
    assert all(row["key_elements"] for row in rows)


@pytest.mark.parametrize("case", ["no_folder", "no_images", "out_is_folder", "csv_of_another_run"])
def test_predict_bad_inputs_are_one_line_errors(case, trained_pipeline, tmp_path, capsys):  # noqa: F811
    import predict
    from utils.errors import run_cli

    images, out = tmp_path / "photos", tmp_path / "p.csv"
    images.mkdir()
    shutil.copy(next((trained_pipeline.data_root / "toy" / "test").rglob("*.png")), images / "a.png")
    expected = {"no_folder": "no such folder", "no_images": "no images", "out_is_folder": "is a folder",
                "csv_of_another_run": "its columns are not this run's"}[case]
    if case == "no_folder":
        images = tmp_path / "missing"
    elif case == "no_images":
        (images / "a.png").rename(images / "a.txt")
    elif case == "out_is_folder":
        out = tmp_path
    else:
        out.write_text("image,label\na.png,awe\n")
    before = out.read_bytes() if out.is_file() else None
    argv = ["--dataname", "toy", "--output_dir", str(trained_pipeline.output_dir), "--images", str(images),
            "--out", str(out)]
    assert run_cli(predict.main, argv, parse=predict.parse) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err[-2000:]
    if before is not None:
        assert out.read_bytes() == before  # nothing already written is lost
