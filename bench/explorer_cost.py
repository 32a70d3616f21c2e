"""How responsive demo.py's explorer tab stays on a 17,000-image test split: ``python -m bench.explorer_cost``.

Writes a synthetic finished stage 3 of EmoSet's size (17,000 test images, its 8 classes) to a
temporary folder: ``gate/metrics.json`` as train_gate.py writes it (``utils.io.write_json``,
indented; every image's labels and predictions of the VLM, the head, the teacher and the 5 gates
of ``--gate all``, and ``test_outputs``: its path and the VLM's, the head's and EmoVLM-KD's class
probabilities rounded to 5 decimals, no gate weights as for the paper's ``concat_linear``), with
accuracies near the paper's FI figures (VLM 71%, head 69%, EmoVLM-KD 79%; 1% of the VLM's answers
name no class). The images are 8 photo-sized JPEGs (500x375, FI's common size) hard-linked under
17,000 names, so every name is its own file to the thumbnail cache (made on demand, keyed by path)
while the disk holds 8.

Then times, each the best of two runs, each run from a fresh load and an empty thumbnail cache:
(1) loading the run (``demo.ExplorerRuns``: reading metrics.json into 17,000 records);
(2) the complementarity table (``demo.complementarity_rows``: the 2x2 counts against the teacher
    and the head, the oracle's and the gate's accuracy);
(3) the three confusion matrices as the tab shows them (``demo.confusion_frame``);
(4) opening the tab: (1) to (3) and the first gallery page of 24 thumbnails with their captions;
(5) one filter query (agreement "VLM only right", EmoVLM-KD confidence at least 0.2, sorted by
    confidence) and its first page of 24 thumbnails;
(6) the same over HTTP: the app served on 127.0.0.1 and called with gradio_client (``explore_run``
    then ``explore_gallery``; a filter: ``explore_gallery``), until the server's answer (the
    gallery as file URLs) and, with another client, until the 24 thumbnail files are also fetched
    (gradio_client fetches them one after another; a browser fetches several at a time).
Targets, fixed before measuring: (1) at most 1.5 s, (2) and (3) at most 0.2 s each, (4) at most
2 s, (5) at most 1 s; over HTTP, opening at most 2 s and a filter with its page at most 1 s (both
ways of (6)).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import demo
from bench import TARGETS_KEY, best_of, print_results, seconds, target_row
from data.datasets import MIKELS
from engine import explorer
from utils.io import write_json

IMAGES = 17_000
DATANAME = "emoset"
PAGE_SIZE = 24  # demo.py's --page_size default
PHOTO = (500, 375)
ACCURACY = {"vlm": 0.71, "head": 0.69, "teacher": 0.69, "final": 0.79}
GATES = ("concat_linear", "bilinear", "moe", "dynamic_weight", "cross_gate")
# The filter of (5): gallery arguments as the tab passes them (explore_gallery's order after the run).
FILTER = {"category": "vlm_only", "min_confidence": 0.2, "sort": "confidence (high first)"}
TARGETS = {"load": 1.5, "table": 0.2, "confusion": 0.2, "open": 2.0, "filter": 1.0, "http_open": 2.0,
           "http_filter": 1.0}


def class_names() -> list[str]:
    return list(MIKELS)  # EmoSet's classes (sorted, as every stage orders them)


def _predictions(rng, labels: np.ndarray, accuracy: float, classes: int) -> np.ndarray:
    wrong = (labels + rng.integers(1, classes, labels.size)) % classes
    return np.where(rng.random(labels.size) < accuracy, labels, wrong)


def _probs(rng, preds: np.ndarray, classes: int) -> list[list[float]]:
    """Class probabilities whose most likely class is ``preds`` (the VLM's -1: no class, spread out)."""
    raw = rng.dirichlet(np.ones(classes), preds.size)
    top = np.where(preds >= 0, preds, 0)
    raw[np.arange(preds.size), top] += rng.uniform(0.5, 3.0, preds.size) * (preds >= 0)
    raw /= raw.sum(1, keepdims=True)
    return [[round(float(v), 5) for v in row] for row in raw]


def write_world(root: Path, images: int = IMAGES, seed: int = 0) -> tuple[Path, Path]:
    """``(output_dir, data_root)`` of a finished synthetic stage 3 over ``images`` test images."""
    rng = np.random.default_rng(seed)
    names = class_names()
    classes = len(names)
    data_root, output_dir = root / "images", root / "outputs"
    root.mkdir(parents=True, exist_ok=True)
    sources = []
    for c in range(classes):  # smooth colour fields, photo-sized, one per class
        blocks = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
        source = root / f"source{c}.jpg"
        Image.fromarray(blocks).resize(PHOTO, Image.Resampling.BICUBIC).save(source, quality=90)
        sources.append(source)
    labels = rng.integers(0, classes, images)
    paths = []
    for i, label in enumerate(labels):
        relative = f"{DATANAME}/test/{names[label]}/{names[label]}_{i:05d}.jpg"
        target = data_root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(sources[label], target)
        except OSError:  # a file system without hard links
            shutil.copyfile(sources[label], target)
        paths.append(relative)
    preds = {key: _predictions(rng, labels, accuracy, classes) for key, accuracy in ACCURACY.items()}
    preds["vlm"][rng.random(images) < 0.01] = -1
    gates = {name: (preds["final"] if name == GATES[0] else _predictions(rng, labels, 0.77, classes)).tolist()
             for name in GATES}
    metrics = {"dataset": DATANAME, "split": "test", "n": images, "class_names": names, "gate": GATES[0],
               "test_images": paths,
               "test_predictions": {"labels": labels.tolist(), "vlm": preds["vlm"].tolist(),
                                    "head": preds["head"].tolist(), "teacher": preds["teacher"].tolist(),
                                    "gates": gates},
               "test_outputs": {"images": paths, "vlm_probs": _probs(rng, preds["vlm"], classes),
                                "head_probs": _probs(rng, preds["head"], classes),
                                "final_probs": _probs(rng, preds["final"], classes), "gate_weights": None}}
    write_json(output_dir / DATANAME / "gate" / "metrics.json", metrics)
    return output_dir, data_root


def open_tab(output_dir: Path, data_root: Path, thumbs: Path) -> tuple:
    """What the tab computes when it opens: the run, its tables and the first page."""
    run = demo.ExplorerRuns.from_outputs(output_dir, DATANAME, data_root).get(explorer.PUBLISHED)
    demo.complementarity_rows(run)
    for module in explorer.MODULES:
        demo.confusion_frame(run, module)
    return run, gallery_page(run, explorer.Query(), explorer.Thumbnails(thumbs))


def gallery_page(run: explorer.Run, query: explorer.Query, thumbnails: explorer.Thumbnails) -> list:
    """The indices a query selects and its first page as the tab's gallery shows it (thumbnail, caption)."""
    shown, _, _ = explorer.page(explorer.select(run, query), 1, PAGE_SIZE)
    return [(thumbnails.get(explorer.safe_image_path(run.image_root, run.records[i].image)),
             explorer.caption(run, run.records[i])) for i in shown]


def fresh(root: Path) -> Path:
    """An empty folder (a cold thumbnail cache)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def over_http(output_dir: Path, data_root: Path, thumbs: Path) -> dict:
    """Seconds through the served app, thumbnails cold: ``{"open", "filter"}`` until the page has the
    server's answer (the gallery as file URLs), and ``{"open_fetched", "filter_fetched"}`` until
    gradio_client has also fetched the page's 24 thumbnail files (one after another; a browser
    fetches them several at a time)."""
    from gradio_client import Client

    runs = demo.ExplorerRuns.from_outputs(output_dir, DATANAME, data_root)
    app = demo.build_app(None, runs=runs, thumbnails=explorer.Thumbnails(thumbs), page_size=PAGE_SIZE)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       allowed_paths=[str(data_root)])
    try:
        result = {}
        for suffix, download in (("", False), ("_fetched", thumbs.parent / "downloads")):
            client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=download)

            def gallery(category="all", low=0.0, sort="index", client=client):
                items = client.predict(explorer.PUBLISHED, category, "", "", "final", "", low, 1.0, sort, 1,
                                       api_name="/explore_gallery")[0]
                assert len(items) == PAGE_SIZE, len(items)

            def opening(client=client, gallery=gallery):
                runs._loaded.clear()  # a fresh read of metrics.json, as when the demo starts
                client.predict(explorer.PUBLISHED, api_name="/explore_run")
                gallery()

            def filtered(gallery=gallery):
                gallery(FILTER["category"], FILTER["min_confidence"], FILTER["sort"])

            def cold(fn):
                def call():
                    for file in thumbs.iterdir():
                        file.unlink()
                    fn()
                return call
            result["open" + suffix], result["filter" + suffix] = best_of(cold(opening)), best_of(cold(filtered))
        return result
    finally:
        app.close()


def run(images: int = IMAGES) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_explorer_cost_"))
    try:
        start = time.perf_counter()
        output_dir, data_root = write_world(root, images)
        built = time.perf_counter() - start
        metrics_mb = (output_dir / DATANAME / "gate" / "metrics.json").stat().st_size / 2**20
        load = best_of(lambda: demo.ExplorerRuns.from_outputs(output_dir, DATANAME, data_root).get(explorer.PUBLISHED))
        run_ = demo.ExplorerRuns.from_outputs(output_dir, DATANAME, data_root).get(explorer.PUBLISHED)
        assert len(run_.records) == images
        table = best_of(lambda: demo.complementarity_rows(run_))
        confusion = best_of(lambda: [demo.confusion_frame(run_, m) for m in explorer.MODULES])
        opened = best_of(lambda: open_tab(output_dir, data_root, fresh(root / "thumbs")))
        query = explorer.Query(category=FILTER["category"], min_confidence=FILTER["min_confidence"],
                               sort=FILTER["sort"])
        matched = len(explorer.select(run_, query))
        filtered = best_of(lambda: gallery_page(run_, query, explorer.Thumbnails(fresh(root / "thumbs"))))
        warm_thumbs = explorer.Thumbnails(root / "thumbs")
        warm = best_of(lambda: gallery_page(run_, query, warm_thumbs))
        one_thumbnail = seconds(lambda: gallery_page(run_, query, explorer.Thumbnails(fresh(root / "thumbs")))) \
            / PAGE_SIZE
        http = over_http(output_dir, data_root, fresh(root / "thumbs_http"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "images": images,
        "classes": len(class_names()),
        "metrics_json_mb": round(metrics_mb, 1),
        "world_build_s": round(built, 1),
        "load_s": round(load, 3),
        "complementarity_table_s": round(table, 4),
        "confusion_matrices_s": round(confusion, 4),
        "open_tab_s": round(opened, 3),
        "filter_matches": matched,
        "filter_and_page_s": round(filtered, 3),
        "filter_and_page_thumbnails_cached_s": round(warm, 3),
        "per_thumbnail_s": round(one_thumbnail, 4),
        "http_open_s": round(http["open"], 3),
        "http_filter_and_page_s": round(http["filter"], 3),
        "http_open_thumbnails_fetched_s": round(http["open_fetched"], 3),
        "http_filter_and_page_thumbnails_fetched_s": round(http["filter_fetched"], 3),
        TARGETS_KEY: [
            target_row(f"loading a stage-3 run of {images:,} test images", load, "<=", TARGETS["load"], " s"),
            target_row("the complementarity table (teacher and head pairs, oracle, gate)", table, "<=",
                       TARGETS["table"], " s"),
            target_row("the 3 confusion matrices", confusion, "<=", TARGETS["confusion"], " s"),
            target_row(f"opening the tab: load, tables and the first page of {PAGE_SIZE} thumbnails (cold)", opened,
                       "<=", TARGETS["open"], " s"),
            target_row(f"a filter query and its first page of {PAGE_SIZE} thumbnails (cold)", filtered, "<=",
                       TARGETS["filter"], " s"),
            target_row("over HTTP: opening the tab (explore_run + the first gallery page), the server's answer",
                       http["open"], "<=", TARGETS["http_open"], " s"),
            target_row("over HTTP: a filter query and its first page, the server's answer", http["filter"], "<=",
                       TARGETS["http_filter"], " s"),
            target_row("over HTTP: opening the tab, the 24 thumbnails fetched one by one (gradio_client)",
                       http["open_fetched"], "<=", TARGETS["http_open"], " s"),
            target_row("over HTTP: a filter query and its page, the 24 thumbnails fetched one by one",
                       http["filter_fetched"], "<=", TARGETS["http_filter"], " s"),
        ],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=IMAGES)
    print_results(run(parser.parse_args(argv).images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
