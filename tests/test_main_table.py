"""The paper's main table (`python -m utils.report --table main`) built from fabricated output folders."""
import csv
import json
import statistics

import numpy as np
import pytest

from tests.pipeline import trained_pipeline  # noqa: F401  (session fixture: the toy pipeline)
from tests.test_report import metric, table_rows
from utils.io import read_json, write_json
from utils.stats import bootstrap_ci

LABELS = [0, 1] * 20  # 40 test images


def right_on(k: int) -> list[int]:
    """Predictions right on the first ``k`` test images and wrong on the rest."""
    return LABELS[:k] + [1 - y for y in LABELS[k:]]


def acc(preds) -> float:
    return float(np.mean(np.array(preds) == np.array(LABELS)))


def fake_teacher(root, model="vit_base_patch16_384.orig_in21k_ft_in1k", name=None, teacher_id="teacher-id"):
    """Stage 2's own teacher (``name`` None: ``teacher/``) or a further one (``teachers/<name>/``)."""
    from utils.records import TeacherRecord
    from utils.sweeps import teacher_folder

    TeacherRecord(class_names=["a", "b"], model=model, img_size=384, teacher_id=teacher_id).write(
        teacher_folder(root, name))


def fake_head(root, seed, right, depth=1, teacher_id="teacher-id", default=False, prefix=""):
    """Stage 2's kept head run at ``depth``, alpha 0.5 and ``seed``, right on ``right`` test images."""
    from utils.records import DistillRecord
    from utils.sweeps import run_name

    name = prefix + run_name(depth, 0.5, seed)
    record = DistillRecord(class_names=["a", "b"], base_model="tiny", head_id=f"id-{name}", run=name, depth=depth,
                           alpha=0.5, seed=seed, teacher_id=teacher_id)
    record.write(root / "distill" / "runs" / name)
    write_json(root / "distill" / "runs" / name / "metrics.json",
               {"accuracy": acc(right_on(right)), "teacher": metric(0.5, 0.5)})
    if default:
        record.write(root / "distill")
    return record


def fake_gate_run(root, head, head_right, seed, gates: dict, selected, teacher_right=30, vlm_right=26):
    """Stage 3's kept run on ``head``: ``gates`` = {name: images right}, ``selected`` chosen; stored
    predictions and intervals as train_gate.py writes them. Returns the metrics."""
    preds = {"labels": LABELS, "vlm": right_on(vlm_right), "head": right_on(head_right),
             "teacher": right_on(teacher_right), "gates": {name: right_on(k) for name, k in gates.items()}}
    ci = lambda p: list(bootstrap_ci(np.array(p) == np.array(LABELS)))  # noqa: E731
    metrics = {"head_id": head.head_id, "head_run": head.run, "gate": selected,
               "vlm": {**metric(acc(preds["vlm"]), 0.5), "ci95": ci(preds["vlm"])},
               "head": {**metric(acc(preds["head"]), 0.5), "ci95": ci(preds["head"])},
               "teacher": {**metric(acc(preds["teacher"]), 0.5), "ci95": ci(preds["teacher"])},
               "gates": {name: {**metric(acc(p), 0.5), "ci95": ci(p)} for name, p in preds["gates"].items()},
               "test_predictions": preds}
    write_json(root / "gate" / "runs" / head.run / f"seed={seed}" / "metrics.json", metrics)
    return metrics


def fake_world(tmp_path):
    """FI: the default teacher (ViT-B/16), a VGG-16 trained beside it, a zero-shot evaluation, two
    head seeds at the paper's setting with three concat_linear gate runs between them (MoE selected
    and better), plus runs the table must leave out (depth 2; a head of another teacher).
    emotion6: only a published gate/metrics.json (no kept runs), whose selected gate is MoE."""
    fi = tmp_path / "FI"
    fake_teacher(fi)
    h42 = fake_head(fi, 42, 28, default=True)
    h7 = fake_head(fi, 7, 24)
    published = fake_gate_run(fi, h42, 28, 0, {"concat_linear": 32, "moe": 38}, "moe")
    fake_gate_run(fi, h42, 28, 1, {"concat_linear": 34, "moe": 39}, "moe")
    fake_gate_run(fi, h7, 24, 0, {"concat_linear": 31, "moe": 37}, "moe")
    write_json(fi / "gate" / "metrics.json", published)
    write_json(fi / "distill" / "metrics.json", {"accuracy": acc(right_on(28)), "teacher": published["teacher"]})
    fake_gate_run(fi, fake_head(fi, 42, 39, depth=2), 39, 0, {"concat_linear": 40}, "concat_linear")
    fake_gate_run(fi, fake_head(fi, 3, 40, teacher_id="other"), 40, 0, {"concat_linear": 40}, "concat_linear")
    fake_teacher(fi, "vgg16", name="vgg16", teacher_id="vgg-id")  # a further teacher: 50% on the test images
    write_json(fi / "teachers" / "vgg16" / "metrics.json", {"accuracy": 0.5, "ci95": [0.3, 0.7]})
    fake_head(fi, 42, 27, teacher_id="vgg-id", prefix="teacher=vgg16,")
    zero = fi / "vlm_zero_shot" / "Qwen2-VL-7B-Instruct" / "eval_score"
    write_json(zero / "metrics.json", metric(acc(right_on(22)), 0.4))
    (zero / "predictions.jsonl").write_text("".join(
        json.dumps({"image": f"{i}.jpg", "label": "ab"[y], "pred": "ab"[p]}) + "\n"
        for i, (y, p) in enumerate(zip(LABELS, right_on(22)))))
    emo = tmp_path / "emotion6"
    fake_teacher(emo)
    emo_head = fake_head(emo, 42, 30)
    write_json(emo / "gate" / "metrics.json", fake_gate_run(emo, emo_head, 30, 0, {"concat_linear": 33, "moe": 36}, "moe"))
    # The published copy alone: drop the kept runs (an older layout).
    import shutil

    shutil.rmtree(emo / "gate" / "runs")
    shutil.rmtree(emo / "distill")
    return fi, emo


def seeds_cell(values):
    """What a multi-run cell must say, computed here from the files' accuracies."""
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} (n={len(values)})"


def interval_of(runs, key):
    """The 95% interval of the accuracy averaged over ``runs`` (per-image share of runs right)."""
    preds = [read_json(path)["test_predictions"] for path in runs]
    correct = [np.array(p["head"] if key == "head" else p["gates"][key]) == np.array(LABELS) for p in preds]
    low, high = bootstrap_ci(np.mean(np.stack(correct).astype(float), axis=0))
    return f"[{100 * low:.2f}, {100 * high:.2f}]"


def test_main_table_rows_seeds_paper_numbers_and_files(tmp_path, capsys):
    from utils.report import main

    fi, emo = fake_world(tmp_path)
    main(["--output_dir", str(tmp_path), "--table", "main"])
    out = capsys.readouterr().out
    text = (tmp_path / "tables" / "main.md").read_text()
    assert text in out and f"written: {tmp_path / 'tables' / 'main.md'} and main.csv beside it" in out
    assert ("| method | FI % | FI 95% CI % | FI paper % | emotion6 % | emotion6 95% CI % | emotion6 paper % |"
            in text)
    rows = {row[0]: row[1:] for row in table_rows(text)[1:]}
    assert list(rows) == ["VGG-16", "ResNet-50", "ViT-B/16", "zero-shot Qwen2-VL-7B-Instruct (score)",
                          "instruction-tuned VLM", "distilled head (depth 1, alpha 0.5)", "EmoVLM-KD (concat_linear)"]

    # EmoVLM-KD: concat_linear (not the selected MoE) over every gate seed on both head seeds.
    fi_gates = [fi / "gate" / "runs" / f"depth=1,alpha=0.5,seed={head}" / f"seed={gate}" / "metrics.json"
                for head, gate in ((42, 0), (42, 1), (7, 0))]
    fused = [read_json(p)["gates"]["concat_linear"]["accuracy"] for p in fi_gates]
    assert rows["EmoVLM-KD (concat_linear)"][:3] == [seeds_cell(fused), interval_of(fi_gates, "concat_linear"), "79.51"]
    emo_gate = read_json(emo / "gate" / "metrics.json")["gates"]["concat_linear"]
    emo_ci = f"[{100 * emo_gate['ci95'][0]:.2f}, {100 * emo_gate['ci95'][1]:.2f}]"
    assert rows["EmoVLM-KD (concat_linear)"][3:] == [f"{100 * emo_gate['accuracy']:.2f}", emo_ci, "73.91"]

    # The head: both seeds at depth 1 / alpha 0.5 from the default teacher (not depth 2, not the other teacher's).
    heads = [fi / "distill" / "runs" / f"depth=1,alpha=0.5,seed={s}" for s in (42, 7)]
    head_accs = [read_json(h / "metrics.json")["accuracy"] for h in heads]
    head_gates = [fi / "gate" / "runs" / h.name / "seed=0" / "metrics.json" for h in heads]
    assert rows["distilled head (depth 1, alpha 0.5)"][:3] == [seeds_cell(head_accs), interval_of(head_gates, "head"), ""]

    published = read_json(fi / "gate" / "metrics.json")
    vit = published["teacher"]
    assert rows["ViT-B/16"][:3] == [f"{100 * vit['accuracy']:.2f}",
                                    f"[{100 * vit['ci95'][0]:.2f}, {100 * vit['ci95'][1]:.2f}]", "68.86"]
    assert rows["instruction-tuned VLM"][0] == f"{100 * published['vlm']['accuracy']:.2f}"
    assert rows["instruction-tuned VLM"][2] == "71.19" and rows["instruction-tuned VLM"][5] == ""
    assert rows["VGG-16"][:2] == ["50.00", "[30.00, 70.00]"] and rows["VGG-16"][3] == "not run"
    assert rows["ResNet-50"] == ["not run", "", "", "not run", "", ""]
    zero = rows["zero-shot Qwen2-VL-7B-Instruct (score)"]
    low, high = bootstrap_ci(np.array(right_on(22)) == np.array(LABELS))
    assert zero == ["55.00", f"[{100 * low:.2f}, {100 * high:.2f}]", "", "not run", "", ""]

    lines = list(csv.DictReader((tmp_path / "tables" / "main.csv").open()))
    cell = {(line["method"], line["dataset"]): line for line in lines}
    assert len(lines) == 7 * 2
    kd = cell[("EmoVLM-KD (concat_linear)", "FI")]
    assert kd["status"] == "ok" and kd["runs"] == "3" and kd["paper_pct"] == "79.51"
    assert float(kd["accuracy_pct"]) == pytest.approx(100 * statistics.mean(fused), abs=1e-4)
    assert float(kd["std_pct"]) == pytest.approx(100 * statistics.stdev(fused), abs=1e-4)
    assert f"[{float(kd['ci95_low_pct']):.2f}, {float(kd['ci95_high_pct']):.2f}]" == interval_of(fi_gates, "concat_linear")
    head = cell[("distilled head (depth 1, alpha 0.5)", "FI")]
    assert head["runs"] == "2" and float(head["accuracy_pct"]) == pytest.approx(100 * statistics.mean(head_accs), abs=1e-4)
    assert float(cell[("EmoVLM-KD (concat_linear)", "emotion6")]["accuracy_pct"]) == pytest.approx(
        100 * emo_gate["accuracy"], abs=1e-4)
    assert cell[("ResNet-50", "FI")]["status"] == "not run" and cell[("ResNet-50", "FI")]["accuracy_pct"] == ""
    assert cell[("ViT-B/16", "FI")]["paper_pct"] == "68.86"


def test_main_table_without_zero_shot_or_results(tmp_path, capsys):
    """A folder without zero-shot runs still lists the zero-shot row, as not run; an empty folder,
    an unknown dataset and --table with --ablation are one line each, exit 2, nothing written."""
    from utils.errors import run_cli
    from utils.main_table import build_main_table
    from utils.report import main

    (tmp_path / "empty").mkdir()
    assert run_cli(main, ["--output_dir", str(tmp_path / "empty"), "--table", "main"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no results of any stage" in err
    assert not (tmp_path / "empty" / "tables").exists()
    fi, _ = fake_world(tmp_path / "out")
    assert run_cli(main, ["--output_dir", str(tmp_path / "out"), "--table", "main", "--datasets", "nope"]) == 2
    assert "--datasets nope: no folder" in capsys.readouterr().err
    assert run_cli(main, ["--output_dir", str(tmp_path / "out"), "--table", "main", "--ablation", "depth"]) == 2
    assert "--ablation and --table: choose one table" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tables").exists()
    import shutil

    shutil.rmtree(fi / "vlm_zero_shot")
    text, _ = build_main_table(tmp_path / "out", ["FI"])
    assert "| zero-shot VLM | not run |  |  |" in text
    # Without kept runs, a published gate/metrics.json on a head of another setting gives no head or EmoVLM-KD.
    published = read_json(tmp_path / "out" / "emotion6" / "gate" / "metrics.json")
    write_json(tmp_path / "out" / "flickr" / "gate" / "metrics.json", {**published, "head_run": "depth=3,alpha=0.5,seed=42"})
    rows = {row[0]: row[1:] for row in table_rows(build_main_table(tmp_path / "out", ["flickr"])[0])[1:]}
    assert rows["distilled head (depth 1, alpha 0.5)"] == ["not run", "", ""]
    assert rows["EmoVLM-KD (concat_linear)"] == ["not run", "", "88.90"]  # the paper's Flickr figure beside it
    assert rows["instruction-tuned VLM"][0] == f"{100 * published['vlm']['accuracy']:.2f}"


def test_main_table_of_several_runs(tmp_path, capsys):
    """--table main --runs: a row per run and method; a dataset one run lacks is not run there."""
    from utils.report import main

    fake_world(tmp_path / "base")
    other = tmp_path / "other" / "FI"
    head = fake_head(other, 42, 20, default=True)
    write_json(other / "gate" / "metrics.json", fake_gate_run(other, head, 20, 0, {"concat_linear": 36}, "concat_linear"))
    main(["--table", "main", "--output_dir", str(tmp_path), "--runs", f"base={tmp_path / 'base'}",
          f"other={tmp_path / 'other'}"])
    text = (tmp_path / "tables" / "main_runs.md").read_text()
    rows = {tuple(row[:2]): row[2:] for row in table_rows(text)[1:]}
    assert rows[("other", "EmoVLM-KD (concat_linear)")][:3] == ["90.00", rows[("other", "EmoVLM-KD (concat_linear)")][1],
                                                                 "79.51"]
    assert rows[("other", "EmoVLM-KD (concat_linear)")][3] == "not run"  # no emotion6 in that run
    assert rows[("base", "EmoVLM-KD (concat_linear)")][0].endswith("(n=3)")
    lines = list(csv.DictReader((tmp_path / "tables" / "main_runs.csv").open()))
    assert {line["run"] for line in lines} == {"base", "other"}


def test_main_table_of_the_toy_pipeline(trained_pipeline):
    """On real stage outputs (one seed each, `--gate all`): each row is the file's number, the
    teacher named by its timm model, EmoVLM-KD the concat_linear gate whichever was selected."""
    from utils.main_table import build_main_table
    from utils.records import TeacherRecord

    metrics = read_json(trained_pipeline.stage("gate") / "metrics.json")
    text, table_csv = build_main_table(trained_pipeline.output_dir, ["toy"])  # nothing written into the shared run
    rows = {row[0]: row[1:] for row in table_rows(text)[1:]}
    ci = lambda r: f"[{100 * r['ci95'][0]:.2f}, {100 * r['ci95'][1]:.2f}]"  # noqa: E731
    cells = lambda r: [f"{100 * r['accuracy']:.2f}", ci(r)]  # noqa: E731
    teacher = TeacherRecord.load(trained_pipeline.stage("teacher"), "toy").model  # vit_tiny_patch16_224
    assert rows[teacher] == cells(metrics["teacher"]) and rows["ViT-B/16"] == ["not run", ""]
    assert rows["instruction-tuned VLM"] == cells(metrics["vlm"])
    assert rows["distilled head (depth 1, alpha 0.5)"] == cells(metrics["head"])
    assert rows["EmoVLM-KD (concat_linear)"] == cells(metrics["gates"]["concat_linear"])
    assert rows["zero-shot VLM"] == ["not run", ""]
    assert "toy,ok,1," in table_csv
