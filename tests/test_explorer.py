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
    preds = {"labels": [0], "vlm": [0], "head": [0], "gates": {"concat_linear": [0]}}
    path.write_text(json.dumps({"class_names": CLASSES, "gate": "concat_linear", "test_predictions": preds}))
    with pytest.raises(UserError, match="older train_gate.py.*rerun `python train_gate.py --dataname toy`"):
        explorer.load_stage3_run(path, tmp_path, "toy")


def test_a_bad_predictions_file_is_one_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"image": "a.png"}\n')
    with pytest.raises(UserError, match="line 1 is not a predict.py record"):
        explorer.load_predictions(path, tmp_path)


def predict_py_lines(fmt: str, weights: bool) -> list[str]:
    """Five records as predict.py writes them (engine.predict_folder's own rendering) in ``fmt``:
    one whose VLM answer named no class, texts with commas, quotes and line breaks."""
    from engine.predict_folder import csv_columns, prediction_record, render

    rng = random.Random(1)
    records = []
    for i in range(5):
        probs = {}
        for key in ("final", "vlm", "head"):
            values = [rng.random() for _ in CLASSES]
            probs[key] = {c: v / sum(values) for c, v in zip(CLASSES, values)}
        result = {"final_label": CLASSES[i % 4], "final_probs": probs["final"], "vlm_answer": f'the "mood", {i}\nis',
                  "vlm_label": None if i == 2 else CLASSES[(i + 1) % 4], "vlm_probs": probs["vlm"],
                  "head_label": CLASSES[(i + 2) % 4], "head_probs": probs["head"], "gate": "dynamic_weight",
                  "gate_weights": {"vlm": 0.1 * i, "head": 1 - 0.1 * i} if weights else None,
                  "observation": "a, b", "reasoning": "c\nd"}
        records.append(prediction_record(f"sub/{i}.png", result, explain=True))
    columns = csv_columns(CLASSES, ["vlm", "head"] if weights else [], explain=True)
    header = [render(dict(zip(columns, columns)), "csv", columns)] if fmt == "csv" else []
    return header + [render(record, fmt, columns) for record in records]


@pytest.mark.parametrize("weights", [True, False], ids=["gate_weights", "no_gate_weights"])
def test_predict_py_csv_reads_as_its_jsonl(tmp_path, weights):
    """The same predictions written by predict.py as CSV (under any name: --format csv) and as JSON
    Lines load to the same run."""
    runs = {}
    for fmt, name in (("jsonl", "p.jsonl"), ("csv", "p.csv"), ("csv", "p.txt")):
        path = tmp_path / name
        path.write_text("".join(predict_py_lines(fmt, weights)), encoding="utf-8")
        runs[name] = explorer.load_predictions(path, tmp_path)
    jsonl = runs["p.jsonl"]
    assert jsonl.class_names == CLASSES and len(jsonl.records) == 5 and jsonl.gate == "dynamic_weight"
    assert [r.vlm for r in jsonl.records] == [1, 2, -1, 0, 1] and [r.final for r in jsonl.records] == [0, 1, 2, 3, 0]
    assert (jsonl.records[3].weights == {"vlm": pytest.approx(0.3), "head": pytest.approx(0.7)}) if weights \
        else all(r.weights is None for r in jsonl.records)
    for name in ("p.csv", "p.txt"):
        run = runs[name]
        assert (run.class_names, run.gate, run.labelled) == (jsonl.class_names, jsonl.gate, False)
        for got, want in zip(run.records, jsonl.records, strict=True):
            assert (got.image, got.label, got.vlm, got.head, got.final) == \
                (want.image, want.label, want.vlm, want.head, want.final)
            assert got.probs == {k: pytest.approx(v) for k, v in want.probs.items()}
            assert got.weights == (None if want.weights is None else pytest.approx(want.weights))


def test_a_bad_predictions_csv_row_is_one_line(tmp_path):
    lines = predict_py_lines("csv", weights=False)
    path = tmp_path / "p.csv"
    path.write_text("".join(lines[:3]) + lines[3].replace("amusement", "joy", 1) + "".join(lines[4:]))
    with pytest.raises(UserError, match=r"p.csv: line 4 is not a predict.py record"):
        explorer.load_predictions(path, tmp_path)
    path.write_text("".join(lines[:2]) + "sub/9.png,amusement\n")
    with pytest.raises(UserError, match=r"line 3 is not a predict.py record \(2 columns"):
        explorer.load_predictions(path, tmp_path)


# ----------------------------------------------------------------------------- over HTTP, the toy pipeline

from tests.pipeline import trained_pipeline  # noqa: E402,F401  (session fixture)
from tests.test_demo import free_port  # noqa: E402

PAGE = 5  # the toy test split's 32 images take 7 pages


@pytest.fixture(scope="module")
def served(trained_pipeline, tmp_path_factory):  # noqa: F811
    """The explorer tab alone (no model) over the toy pipeline's stage-3 runs, and a gradio_client."""
    from gradio_client import Client

    import demo

    runs = demo.ExplorerRuns.from_outputs(trained_pipeline.output_dir, "toy", trained_pipeline.data_root)
    thumbs = explorer.Thumbnails(tmp_path_factory.mktemp("thumbs"))
    app = demo.build_app(None, runs=runs, thumbnails=thumbs, page_size=PAGE)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       allowed_paths=[str(trained_pipeline.data_root)])
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), port, runs
    finally:
        app.close()


def stored(trained_pipeline):  # noqa: F811
    metrics = json.loads((trained_pipeline.stage("gate") / "metrics.json").read_text())
    preds = metrics["test_predictions"]
    return metrics, preds, metrics["test_outputs"]["images"], preds["gates"][metrics["gate"]]


def gallery_images(client, run="published", category="all", selection="", true_class="", pred_module="final",
                   pred_class="", low=0.0, high=1.0, sort="index") -> list[str]:
    """Every page of the gallery for these filters, concatenated (the images' relative paths)."""
    images, number = [], 1
    while True:
        items, shown_number, info, shown = client.predict(run, category, selection, true_class, pred_module,
                                                          pred_class, low, high, sort, number,
                                                          api_name="/explore_gallery")
        assert shown_number == number and len(items) == len(shown or []) <= PAGE
        images += shown or []
        pages = int(info.rsplit(" of ", 1)[1])
        if number >= pages:
            return images
        number += 1


def test_the_page_counts_equal_metrics_json(served, trained_pipeline):  # noqa: F811
    client, _, _ = served
    metrics, *_ = stored(trained_pipeline)
    status, table, *confusions = client.predict("published", api_name="/explore_run")[:5]
    assert "32 images" in status
    shown = {row[0]: dict(zip(table["headers"], row)) for row in table["data"]}
    for pair, counts in metrics["complementarity"].items():
        if not pair.startswith("vlm_vs_"):
            continue
        row = shown[f"VLM vs {pair.removeprefix('vlm_vs_')}"]
        assert [int(row[h]) for h in ("both right", "VLM only right", "other only right", "both wrong")] == \
            [counts["both_right"], counts["a_only"], counts["b_only"], counts["both_wrong"]]
        assert row["oracle accuracy %"] == f"{100 * counts['oracle_accuracy']:.1f}"
        assert row[table["headers"][-1]] == f"{100 * metrics['complementarity']['gate_accuracy']:.1f}"
    for frame, key in zip(confusions, ("vlm", "head", "gates")):
        expected = metrics[key] if key != "gates" else metrics["gates"][metrics["gate"]]
        got = [[int(v) for v in row[1:1 + len(metrics["class_names"])]] for row in frame["data"]]
        assert got == expected["confusion_matrix"], key


@pytest.mark.parametrize("category", list(explorer.LABELLED_CATEGORIES))
def test_every_agreement_filter_returns_exactly_its_images(served, trained_pipeline, category):  # noqa: F811
    client, _, _ = served
    _, preds, images, final = stored(trained_pipeline)
    want = []
    for i, label in enumerate(preds["labels"]):
        v, h, f = preds["vlm"][i] == label, preds["head"][i] == label, final[i] == label
        if {"all": True, "both_right": v and h, "vlm_only": v and not h, "head_only": h and not v,
            "both_wrong": not v and not h, "gate_overruled": not f and (v or h),
                "gate_rescued": f and not (v and h)}[category]:
            want.append(images[i])
    assert gallery_images(client, category=category) == want


def test_complementarity_cells_filter_to_their_images(served, trained_pipeline):  # noqa: F811
    client, _, _ = served
    metrics, preds, images, final = stored(trained_pipeline)
    for pair in [p for p in metrics["complementarity"] if p.startswith("vlm_vs_")]:
        other = preds[pair.removeprefix("vlm_vs_")]
        for cell, rule in (("both_right", lambda a, b: a and b), ("a_only", lambda a, b: a and not b),
                           ("b_only", lambda a, b: b and not a), ("both_wrong", lambda a, b: not a and not b)):
            want = [images[i] for i, y in enumerate(preds["labels"]) if rule(preds["vlm"][i] == y, other[i] == y)]
            got = gallery_images(client, selection=f"cell:{pair}:{cell}")
            assert got == want and len(got) == metrics["complementarity"][pair][cell], (pair, cell)
    assert gallery_images(client, selection="gate:right") == \
        [images[i] for i, y in enumerate(preds["labels"]) if final[i] == y]


def test_paging_covers_every_image_once(served, trained_pipeline):  # noqa: F811
    client, _, _ = served
    _, _, images, _ = stored(trained_pipeline)
    assert gallery_images(client) == images and len(set(images)) == 32
    by_confidence = gallery_images(client, sort="confidence (high first)")
    assert sorted(by_confidence) == sorted(images)


def test_a_confusion_cell_filters_to_its_images(served, trained_pipeline):  # noqa: F811
    client, _, _ = served
    metrics, preds, images, final = stored(trained_pipeline)
    columns = {"vlm": preds["vlm"], "head": preds["head"], "final": final}
    for module, pred in columns.items():
        for true, pred_class in {(y, p) for y, p in zip(preds["labels"], pred)}:
            want = [images[i] for i, (y, p) in enumerate(zip(preds["labels"], pred)) if (y, p) == (true, pred_class)]
            assert gallery_images(client, selection=f"confusion:{module}:{true}:{pred_class}") == want


def test_class_and_confidence_filters(served, trained_pipeline):  # noqa: F811
    client, _, _ = served
    metrics, preds, images, final = stored(trained_pipeline)
    assert gallery_images(client, true_class="1") == [images[i] for i, y in enumerate(preds["labels"]) if y == 1]
    assert gallery_images(client, pred_module="head", pred_class="2") == \
        [images[i] for i, p in enumerate(preds["head"]) if p == 2]
    confidence = [max(p) for p in metrics["test_outputs"]["final_probs"]]
    middle = sorted(confidence)[len(confidence) // 2]
    assert gallery_images(client, low=middle, high=1.0) == [images[i] for i, c in enumerate(confidence)
                                                            if c >= middle - 1e-9]


def test_detail_and_refused_paths(served, trained_pipeline):  # noqa: F811
    import urllib.error
    import urllib.request

    from gradio_client.exceptions import AppError

    client, port, _ = served
    metrics, preds, images, final = stored(trained_pipeline)
    image, vlm, head, final_probs, weights, path, marks = client.predict("published", images[3],
                                                                         api_name="/explore_detail")
    assert Path(path) == (trained_pipeline.data_root / images[3]).resolve()
    assert final_probs["label"] == metrics["class_names"][final[3]]
    assert head["label"] == metrics["class_names"][preds["head"][3]]
    assert marks.startswith(f"true: {metrics['class_names'][preds['labels'][3]]}")
    outside = trained_pipeline.data_root.parent / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    for bad in ("../secret.png", str(outside), "/etc/passwd", f"toy/../../{outside.name}"):
        with pytest.raises(AppError, match="refused"):
            client.predict("published", bad, api_name="/explore_detail")
    for route in ("/gradio_api/file=/etc/passwd", f"/gradio_api/file={outside}"):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}{route}")
    with pytest.raises(AppError, match="no model"):
        client.predict("published", images[3], api_name="/explore_explain")


def test_predictions_file_over_its_folder(trained_pipeline, tmp_path):  # noqa: F811
    """predict.py's records over a folder of new images: no labels, the disagreement filters."""
    import shutil

    from gradio_client import Client

    import demo
    from engine.predict_folder import prediction_record

    metrics, preds, images, final = stored(trained_pipeline)
    names, outputs = metrics["class_names"], metrics["test_outputs"]
    folder = tmp_path / "photos"
    folder.mkdir()
    lines = []
    for i, image in enumerate(images[:12]):
        shutil.copy(trained_pipeline.data_root / image, folder / f"{i:02d}.png")
        probs = {key: dict(zip(names, outputs[f"{key}_probs"][i] or outputs["final_probs"][i]))
                 for key in ("vlm", "head", "final")}
        result = {"final_label": names[final[i]], "final_probs": probs["final"], "vlm_answer": "",
                  "vlm_label": names[preds["vlm"][i]] if preds["vlm"][i] >= 0 else None,
                  "vlm_probs": probs["vlm"], "head_label": names[preds["head"][i]], "head_probs": probs["head"],
                  "gate": metrics["gate"], "gate_weights": None}
        lines.append(json.dumps(prediction_record(f"{i:02d}.png", result, False)))
    out = tmp_path / "predictions.jsonl"
    out.write_text("\n".join(lines) + "\n")
    runs = demo.ExplorerRuns.from_outputs(trained_pipeline.output_dir, "toy", trained_pipeline.data_root, out, folder)
    assert runs.default == "predictions: predictions.jsonl" and "published" in runs.loaders
    app = demo.build_app(None, runs=runs, thumbnails=explorer.Thumbnails(tmp_path / "thumbs"), page_size=PAGE)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       allowed_paths=[str(folder)])
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        run = runs.default
        status, table = client.predict(run, api_name="/explore_run")[:2]
        disagree = [i for i in range(12) if preds["vlm"][i] != preds["head"][i]]
        assert table["data"][0][:2] == [12, len(disagree)]
        assert gallery_images(client, run=run) == [f"{i:02d}.png" for i in range(12)]
        assert gallery_images(client, run=run, category="disagree") == [f"{i:02d}.png" for i in disagree]
        assert gallery_images(client, run=run, category="followed_head") == \
            [f"{i:02d}.png" for i in disagree if final[i] == preds["head"][i]]
        detail = client.predict(run, "03.png", api_name="/explore_detail")
        assert Path(detail[5]) == (folder / "03.png").resolve()
        from gradio_client.exceptions import AppError
        with pytest.raises(AppError, match="refused"):
            client.predict(run, "../predictions.jsonl", api_name="/explore_detail")
    finally:
        app.close()


def test_cli_flags(tmp_path, capsys):
    import demo
    from utils.errors import run_cli

    assert run_cli(demo.main, ["--dataname", "toy", "--output_dir", str(tmp_path), "--predictions", "p.jsonl"],
                   parse=demo.parse) == 2
    assert "--predictions and --images go together" in capsys.readouterr().err
    assert run_cli(demo.main, ["--dataname", "toy", "--output_dir", str(tmp_path), "--predictions",
                               str(tmp_path / "p.jsonl"), "--images", str(tmp_path)], parse=demo.parse) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0] and "predict.py" in err[0]
    assert demo.parse(["--dataname", "toy"]).host == "127.0.0.1"


def test_the_click_handlers_get_the_select_data(tmp_path, recwarn):
    """Gradio fills in a ``gr.SelectData`` parameter only when it can read its annotation: every
    click handler of the tab (table cells, confusion cells, thumbnails) must have one."""
    import gradio

    import demo

    run = synthetic_run(tmp_path)
    runs = demo.ExplorerRuns({"synthetic": lambda: run})
    app = demo.build_app(None, runs=runs, thumbnails=explorer.Thumbnails(tmp_path / "thumbs"))
    assert not [w for w in recwarn if "Expected" in str(w.message) and "arguments" in str(w.message)]
    selects = [fn for fn in app.fns.values() if any(trigger[1] == "select" for trigger in fn.targets)]
    assert len(selects) == 5  # the complementarity table, three confusion matrices, the gallery
    for fn in selects:
        hints = gradio.utils.get_type_hints(fn.fn)
        assert hints.get("evt") is gradio.SelectData
    # A click on the VLM's confusion cell (true 2, predicted 1) and on the table's "both wrong".
    pick = next(fn.fn for fn in selects if fn.fn.__name__ == "pick" and fn.outputs)
    event = gradio.SelectData(None, {"index": [2, 2], "value": 0})
    assert pick("synthetic", event)[0].startswith("confusion:") and pick("synthetic", event)[0].endswith(":2:1")
    table = next(fn.fn for fn in selects if fn.fn.__name__ == "pick_table")
    clicked = table("synthetic", gradio.SelectData(None, {"index": [1, 4], "value": 0}))
    assert clicked[1] == "cell:vlm_vs_head:both_wrong"
