"""demo.py's explorer tab (issue #28): engine/explorer.py's records, categories, filters, paging and
path checks on small synthetic runs, then the tab over HTTP (gradio_client) on the toy pipeline's
stage-3 outputs and on a predict.py file: every filter returns exactly the images the stored
predictions put there, the counts equal metrics.json's ``complementarity``."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from engine import explorer
from engine.explorer import Query, Record, Run
from utils.errors import UserError

CLASSES = ["amusement", "anger", "awe", "fear"]


def synthetic_run(tmp_path: Path, n: int = 60, seed: int = 0) -> Run:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        label = rng.randrange(4)
        guess = lambda: label if rng.random() < 0.6 else rng.randrange(-1, 4)  # noqa: E731
        final = [rng.random() for _ in CLASSES]
        final = [v / sum(final) for v in final]
        records.append(Record(image=f"toy/test/{CLASSES[label]}/{i:03d}.png", label=label, vlm=guess(),
                              head=max(0, guess()), final=max(0, guess()), teacher=max(0, guess()),
                              probs={"final": final}, weights={"vlm": rng.random()}))
    return Run("synthetic", CLASSES, records, tmp_path)


def expected(run: Run, category: str) -> list[int]:
    out = []
    for i, r in enumerate(run.records):
        v, h, f = r.vlm == r.label, r.head == r.label, r.final == r.label
        ok = {"all": True, "both_right": v and h, "vlm_only": v and not h, "head_only": h and not v,
              "both_wrong": not v and not h, "gate_overruled": not f and (v or h),
              "gate_rescued": f and not (v and h)}[category]
        if ok:
            out.append(i)
    return out


@pytest.mark.parametrize("category", list(explorer.LABELLED_CATEGORIES))
def test_categories_select_exactly_their_images(tmp_path, category):
    run = synthetic_run(tmp_path)
    assert explorer.select(run, Query(category=category)) == expected(run, category)


def test_the_agreement_categories_partition_the_images(tmp_path):
    run = synthetic_run(tmp_path)
    parts = [explorer.select(run, Query(category=c)) for c in ("both_right", "vlm_only", "head_only", "both_wrong")]
    assert sorted(sum(parts, [])) == list(range(len(run.records)))
    counts = explorer.complementarity_counts(run)["vlm_vs_head"]
    assert [counts[c] for c in explorer.CELLS] == [len(p) for p in parts]


def test_filters_sorting_and_paging(tmp_path):
    run = synthetic_run(tmp_path, n=103)
    chosen = explorer.select(run, Query(true_class=2, pred_module="head", pred_class=1))
    assert chosen == [i for i, r in enumerate(run.records) if r.label == 2 and r.head == 1]
    chosen = explorer.select(run, Query(min_confidence=0.3, max_confidence=0.5, sort="confidence (high first)"))
    confidences = [run.records[i].confidence for i in chosen]
    assert confidences == sorted(confidences, reverse=True) and all(0.3 <= c <= 0.5 for c in confidences)
    assert len(chosen) == sum(0.3 <= r.confidence <= 0.5 for r in run.records)
    by_weight = explorer.select(run, Query(sort="gate weight (low first)"))
    assert [run.records[i].weights["vlm"] for i in by_weight] == sorted(r.weights["vlm"] for r in run.records)
    everything = explorer.select(run, Query())
    pages = []
    number, total = 1, None
    while total is None or number <= total:
        shown, number, total = explorer.page(everything, number, 10)
        pages += shown
        number += 1
    assert total == 11 and pages == list(range(103))
    assert explorer.page(everything, 99, 10)[1] == 11  # clamped


@pytest.mark.parametrize("module", explorer.MODULES)
def test_a_confusion_cell_filters_to_its_images(tmp_path, module):
    run = synthetic_run(tmp_path)
    matrix = explorer.confusion_matrix(run, module)
    for true in range(4):
        for pred in range(-1, 4):
            chosen = explorer.select(run, Query(confusion=(module, true, pred)))
            assert len(chosen) == matrix[true][pred if pred >= 0 else 4]
            assert all(run.records[i].label == true and getattr(run.records[i], module) == pred for i in chosen)
    assert sum(map(sum, matrix)) == len(run.records)


def test_unlabelled_categories(tmp_path):
    run = synthetic_run(tmp_path)
    for r in run.records:
        r.label = None
    run.labelled = False
    assert explorer.select(run, Query(category="disagree")) == [i for i, r in enumerate(run.records) if r.vlm != r.head]
    vlm = explorer.select(run, Query(category="followed_vlm"))
    head = explorer.select(run, Query(category="followed_head"))
    assert all(run.records[i].final == run.records[i].vlm != run.records[i].head for i in vlm)
    assert all(run.records[i].final == run.records[i].head != run.records[i].vlm for i in head)
    with pytest.raises(UserError, match="unknown category"):
        explorer.select(run, Query(category="both_right"))


@pytest.mark.parametrize("bad", ["../secret.png", "toy/../../secret.png", "/etc/passwd", "..", "",
                                 "C:\\Windows\\win.ini", "toy\\..\\..\\secret.png"])
def test_paths_outside_the_image_folder_are_refused(tmp_path, bad):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(UserError, match="refused"):
        explorer.safe_image_path(root, bad)


def test_a_link_leading_outside_is_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "inside.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(UserError, match="refused"):
        explorer.safe_image_path(root, "inside.png")
    (root / "ok.png").write_bytes(b"x")
    assert explorer.safe_image_path(root, "ok.png") == (root / "ok.png").resolve()


def test_thumbnails_are_made_once_and_small(tmp_path):
    image = tmp_path / "big.png"
    Image.new("RGB", (1200, 800), "red").save(image)
    thumbs = explorer.Thumbnails(tmp_path / "thumbs", side=100)
    first = thumbs.get(image)
    assert Image.open(first).size == (100, 67)
    mtime = first.stat().st_mtime_ns
    assert thumbs.get(image) == first and first.stat().st_mtime_ns == mtime


def test_missing_or_stale_stage3_outputs_name_the_command(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(UserError, match="python train_gate.py --dataname toy"):
        explorer.load_stage3_run(path, tmp_path, "toy")
    path.write_text(json.dumps({"class_names": CLASSES, "gate": "concat_linear",
                                "test_predictions": {"labels": [0], "vlm": [0], "head": [0], "gates": {"concat_linear": [0]}}}))
    with pytest.raises(UserError, match="older train_gate.py.*rerun `python train_gate.py --dataname toy`"):
        explorer.load_stage3_run(path, tmp_path, "toy")


def test_a_bad_predictions_file_is_one_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "a.png"}\n')
    with pytest.raises(UserError, match="line 1 is not a predict.py record"):
        explorer.load_predictions(path, tmp_path)
