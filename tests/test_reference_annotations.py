"""Stage 1 on the authors' own instruction data: their JSON array of ``{"gpt_response", "img",
"img_path", "label"}`` records, matched to the training images by class and file name, each kind
of record reported, and records of validation or test images never trained on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

TOY_CONFIG = str(REPO / "configs" / "toy_vlm.yaml")
AUTHORS_ROOT = "/home/authors/EmoVLM-KD/images"  # where the authors' stage 0 read the images

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread


def response(key: str = "A bright shape on a plain background.",
              reason: str = "The colours and the shape set the mood.") -> str:
    """A response in the reference prompt's format: two numbered sections, headings in lower case."""
    return f"1. key elements \n{key}\n\n2. reasoning\n{reason}\n"


def record(image: str, label: str, text: str | None = None, img_path: str | None = None) -> dict:
    """One record as the reference's stage 0 wrote it: ``img`` the file name, ``img_path`` a path on
    the authors' machine."""
    return {"gpt_response": response() if text is None else text, "img": Path(image).name,
            "img_path": img_path or f"{AUTHORS_ROOT}/{image}", "label": label}


def authors_file(splits, path: Path) -> tuple[Path, dict]:
    """The authors' JSON, by hand, for the toy data: every kind of record once or twice; returns
    the file and what each record should become."""
    names = splits.class_names
    train = splits.train
    label = {s.path: names[s.label] for s in train + splits.val + splits.test}
    # A test image whose file name and class are a train/ folder image's too: img_path tells them apart.
    test = next(s for s in splits.test if any(Path(t.path).name == Path(s.path).name for t in train + splits.val))
    records = [record(s.path, label[s.path]) for s in train[:5]]                              # 0-4 matched
    records.append(record(train[5].path, label[train[5].path].upper()))                         # 5 any case
    records.append(record(train[6].path, label[train[6].path],
                          img_path="C:\\Users\\authors\\images\\" + train[6].path.replace("/", "\\")))  # 6
    records.append(record(train[7].path, label[train[7].path], text="A calm picture, nothing numbered."))  # 7
    records.append(record(train[8].path, label[train[8].path]) | {"gpt_response": None})       # 8 unparseable
    records.append(record(splits.val[0].path, label[splits.val[0].path]))                      # 9 val
    records.append(record(test.path, label[test.path]))                                          # 10 test
    records.append(record("toy/train/awe/not_in_this_copy.png", "awe"))                          # 11 unmatched
    other = next(name for name in names if name != label[train[9].path])
    records.append(record(train[9].path, other))                                                 # 12 wrong class
    records.append(record(train[0].path, label[train[0].path], text=response("Again.", "Twice.")))  # 13 duplicate
    records.append(record(train[4].path, label[train[4].path], text="x") | {"img": train[4].path})  # 14 duplicate
    records[1]["gpt_response"] = response(f"A {label[train[1].path]} scene.")  # names its emotion
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")
    expected = {"matched": [s.path for s in train[:7]], "unparseable": [train[7].path, train[8].path],
                "held_out": [(splits.val[0].path, "val"), (test.path, "test")],
                "unmatched": [11, 12], "duplicates": [train[0].path, train[4].path]}
    return path, expected


@pytest.fixture()
def toy_splits(toy_root, tmp_path):
    from data.datasets import load_dataset

    return load_dataset(toy_root, "toy", tmp_path)


def test_records_are_matched_by_class_and_file_name_and_each_kind_reported(toy_splits, tmp_path):
    from data.annotations import load_annotations

    path, expected = authors_file(toy_splits, tmp_path / "toy_annotations_train.json")
    annotations, report = load_annotations(path, toy_splits)
    assert [a.image for a in annotations] == report.matched == expected["matched"]
    train = {s.path for s in toy_splits.train}
    assert all(a.image in train for a in annotations)  # never a validation or test image
    assert [(h["image"], h["split"]) for h in report.held_out] == expected["held_out"]
    assert [u["image"] for u in report.unparseable] == expected["unparseable"]
    assert [u["record"] for u in report.unmatched] == expected["unmatched"]
    assert "no image of that name" in report.unmatched[0]["reason"]
    assert toy_splits.train[9].path in report.unmatched[1]["reason"]  # its class differs here
    assert [d["image"] for d in report.duplicates] == expected["duplicates"]
    assert report.without_record == [s.path for s in toy_splits.train if s.path not in expected["matched"]]
    assert report.counts() == {"file": str(path), "records": 15, "matched": 7, "mentions_label": 1,
                               "unparseable": 2, "held_out": 2, "unmatched": 2, "duplicates": 2,
                               "without_record": len(toy_splits.train) - 7}
    # Sections split by stage 0's parser; the label is the dataset's class, whatever the case written.
    first, upper = annotations[0], annotations[5]
    assert (first.key_elements, first.reasoning) == ("A bright shape on a plain background.",
                                                     "The colours and the shape set the mood.")
    assert upper.label == toy_splits.class_names[toy_splits.train[5].label]
    assert first.generator == "reference JSON (toy_annotations_train.json)"
    assert [a.mentions_label for a in annotations] == [False, True, False, False, False, False, False]
    summary = report.summary(len(toy_splits.train))
    assert "15 records: 7 matched" in summary and "2 unparseable" in summary
    assert "2 name validation or test images: never trained on" in summary
    assert f"{len(toy_splits.train) - 7} of {len(toy_splits.train)} training images have no usable record" in summary


def test_examples_come_from_training_images_only(toy_splits, tmp_path):
    """Records of validation and test images add no conversation; every training image keeps its
    categorical one, with or without a record."""
    from data.annotations import load_annotations
    from engine.vlm_train import build_examples, example_counts

    path, expected = authors_file(toy_splits, tmp_path / "authors.json")
    annotations, _ = load_annotations(path, toy_splits)
    examples = build_examples(annotations, toy_splits, path)
    images = {Path(e["image"]).relative_to(toy_splits.data_root).as_posix() for e in examples}
    assert images == {s.path for s in toy_splits.train}
    assert not images & {image for image, _ in expected["held_out"]}
    assert example_counts(examples, len(toy_splits.train)) == {
        "train_images": len(toy_splits.train), "with_text": 7, "without_text": len(toy_splits.train) - 7,
        "conversations": {"observation": 7, "reasoning": 7, "categorical": len(toy_splits.train)}}


def test_the_format_is_told_by_the_first_character(toy_root, tmp_path, toy_splits):
    from data.annotations import ANNOTATIONS_FILE, is_reference_file, load_annotations
    from tests.test_stage1 import write_annotations

    jsonl = write_annotations(toy_root, tmp_path)
    assert jsonl.name == ANNOTATIONS_FILE and not is_reference_file(jsonl)
    annotations, report = load_annotations(jsonl, toy_splits)
    assert report is None and len(annotations) == len(toy_splits.train)
    array = tmp_path / "authors.json"
    array.write_text("\ufeff \n " + json.dumps([record(toy_splits.train[0].path, "amusement")]), encoding="utf-8")
    assert is_reference_file(array)


@pytest.mark.parametrize("case", ["invalid_json", "not_an_object", "missing_key", "nothing_matches"])
def test_a_bad_authors_file_is_one_line_exit_2(case, toy_root, tmp_path, capsys):
    import train_vlm
    from utils.errors import run_cli

    path = tmp_path / "authors.json"
    good = record("toy/train/awe/awe_0000.png", "awe")
    text = {"invalid_json": "[" + json.dumps(good) + ",",
            "not_an_object": json.dumps([good, "awe_0001.png"]),
            "missing_key": json.dumps([good, {k: v for k, v in good.items() if k != "label"}]),
            "nothing_matches": json.dumps([record("toy/train/awe/elsewhere.png", "awe"),
                                           record("toy/test/awe/awe_0000.png", "awe")])}[case]
    path.write_text(text, encoding="utf-8")
    argv = ["--dataname", "toy", "--data_root", str(toy_root), "--output_dir", str(tmp_path),
            "--vlm_model", str(tmp_path / "never-loaded"), "--annotations", str(path)]
    assert run_cli(train_vlm.main, argv, parse=train_vlm.parse) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"invalid_json": "not valid JSON", "not_an_object": "record 1 (counting from 0) is a JSON string",
                "missing_key": "record 1 (counting from 0) has no string label",
                "nothing_matches": "none of its 2 records gives text for a training image"}[case]
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and expected in err[0], err


def test_stage1_trains_on_the_authors_file_and_records_the_counts(toy_root, tiny_vlm_dir, tmp_path, capsys):
    import train_vlm
    from data.datasets import load_dataset

    splits = load_dataset(toy_root, "toy", tmp_path)
    path, _ = authors_file(splits, tmp_path / "authors.json")
    argv = ["--dataname", "toy", "--data_root", str(toy_root), "--output_dir", str(tmp_path), "--vlm_model",
            str(tiny_vlm_dir), "--config", TOY_CONFIG, "--epochs", "1", "--skip_eval", "--annotations", str(path)]
    train_vlm.main(train_vlm.parse(argv))
    out = capsys.readouterr().out
    assert f"{path}: the authors' instruction data, 15 records: 7 matched" in out
    assert "2 name validation or test images: never trained on" in out
    folder = tmp_path / "toy" / "vlm"
    meta = json.loads((folder / "meta.json").read_text())
    run = json.loads((folder / "run.json").read_text())
    assert meta["reference_annotations"] == run["reference_annotations"]
    assert meta["reference_annotations"]["matched"] == 7 and meta["reference_annotations"]["held_out"] == 2
    assert meta["counts"]["with_text"] == 7 and meta["counts"]["train_images"] == len(splits.train)
    report = json.loads((folder / "reference_annotations.json").read_text())
    assert len(report["without_record"]) == len(splits.train) - 7
