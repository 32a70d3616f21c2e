"""Dataset preparation (data/prepare.py) and the leakage/hygiene check (data/hygiene.py) on
synthetic miniatures of each source shape the authors distribute."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_script
import data.prepare
from data.datasets import VAL_CARVED, load_dataset
from data.hygiene import check_layout, difference_hash
from utils.errors import UserError


def photo(path: Path, seed: int, size=(48, 36)) -> Path:
    """A smooth random colour image (distinct seeds give dHashes >= 13 bits apart)."""
    blocks = (np.random.default_rng(seed).random((6, 8, 3)) * 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blocks).resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def reencoded(source: Path, target: Path) -> Path:
    """The same picture at 80% size and JPEG quality 50: other bytes, nearly the same dHash."""
    with Image.open(source) as img:
        w, h = img.size
        target.parent.mkdir(parents=True, exist_ok=True)
        img.resize((int(w * 0.8), int(h * 0.8))).save(target, quality=50)
    return target


def make_folders(root: Path, sizes: dict[str, int], seed0=0) -> Path:
    for k, (name, n) in enumerate(sizes.items()):
        for i in range(n):
            photo(root / name / f"img{i:02d}.jpg", seed0 + 100 * k + i)
    return root


def prepare(*argv: str) -> None:
    data.prepare.main([str(a) for a in argv])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def class_counts(out: Path) -> dict:
    return {split: {c.name: len(list(c.iterdir())) for c in sorted((out / split).iterdir())}
            for split in ("train", "val", "test") if (out / split).is_dir()}


def test_folders_stratified_split_is_exact_linked_and_loads(tmp_path, capsys):
    src = make_folders(tmp_path / "src", {"joy": 20, "anger": 13, "neutral": 7})
    out = tmp_path / "images" / "mini"
    prepare("folders", "--src", src, "--out", out, "--split", 0.8, 0.05, 0.15,
            "--classes", "anger", "joy=happiness")
    printed = capsys.readouterr().out
    assert "dropped class neutral: 7 image(s)" in printed
    # val/test = max(1, round(n * ratio)), train the rest: 20 -> 16/1/3, 13 -> 10/1/2
    expected = {"train": {"anger": 10, "happiness": 16}, "val": {"anger": 1, "happiness": 1},
                "test": {"anger": 2, "happiness": 3}}
    assert class_counts(out) == expected
    record = manifest(out)
    assert record["counts"] == expected and record["dropped_classes"] == {"neutral": 7}
    assert record["settings"]["seed"] == 42 and record["links"] == {"hardlink": 33}
    # links are links: every file is the source's inode
    for target, source in record["files"]:
        assert os.stat(out / target).st_ino == os.stat(src / source).st_ino
    assert {Path(t).parts[1] for t, s in record["files"] if s.startswith("joy/")} == {"happiness"}
    splits = load_dataset(out.parent, out.name, tmp_path / "outputs")
    assert splits.class_names == ["anger", "happiness"] and not splits.val_from_train
    assert (len(splits.train), len(splits.val), len(splits.test)) == (26, 2, 5)


def test_rerun_is_a_noop_other_arguments_refused_and_the_manifest_reproduces(tmp_path, capsys):
    src = make_folders(tmp_path / "src", {"a": 12, "b": 12})
    out = tmp_path / "out"
    args = ["folders", "--src", src, "--out", out, "--split", 0.7, 0.1, 0.2]
    prepare(*args)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    prepare(*args)
    assert "already prepared with these arguments (24 images); nothing changed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(UserError, match=r"other arguments \(seed differ\); pass --overwrite"):
        prepare(*args, "--seed", 7)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused: nothing touched
    # the same arguments elsewhere give the same split (the manifest's file list and hash)
    prepare(*[str(a).replace(str(out), str(tmp_path / "again")) for a in args])
    first, again = manifest(out), manifest(tmp_path / "again")
    assert again["files"] == first["files"] and again["plan_sha256"] == first["plan_sha256"]
    prepare(*args, "--seed", 7, "--overwrite")
    reseeded = manifest(out)
    assert reseeded["settings"]["seed"] == 7 and reseeded["files"] != first["files"]
    assert reseeded["counts"] == first["counts"]  # another shuffle, the same stratified sizes
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == sorted(t for t, _ in reseeded["files"])
    # a layout that lost a file is not "the same" any more
    (out / reseeded["files"][0][0]).unlink()
    with pytest.raises(UserError, match="of its files are gone"):
        prepare(*args, "--seed", 7)


def make_emoset(root: Path) -> Path:
    """EmoSet-118K's shape: image/<emotion>/<id>.jpg, annotation/<emotion>/<id>.json and the
    official lists of [emotion, image_id, image_path, annotation_path]."""
    lists = {"train": [], "val": [], "test": []}
    plan = {"train": 6, "val": 2, "test": 3}
    for k, emotion in enumerate(("amusement", "anger", "awe")):
        index = 0
        for split, n in plan.items():
            for _ in range(n):
                image_id = f"{emotion}_{index:05d}"
                photo(root / "image" / emotion / f"{image_id}.jpg", 1000 * k + index)
                (root / "annotation" / emotion).mkdir(parents=True, exist_ok=True)
                (root / "annotation" / emotion / f"{image_id}.json").write_text("{}")
                lists[split].append([emotion, image_id, f"image/{emotion}/{image_id}.jpg",
                                     f"annotation/{emotion}/{image_id}.json"])
                index += 1
    # leakage planted by hand: a byte-identical copy of a train image in test, and the same
    # train photo re-encoded in val
    train_image = root / "image/awe/awe_00000.jpg"
    (root / "image/awe/awe_90000.jpg").write_bytes(train_image.read_bytes())
    lists["test"].append(["awe", "awe_90000", "image/awe/awe_90000.jpg", "annotation/awe/awe_90000.json"])
    reencoded(root / "image/anger/anger_00001.jpg", root / "image/anger/anger_90001.jpg")
    lists["val"].append(["anger", "anger_90001", "image/anger/anger_90001.jpg", "annotation/anger/anger_90001.json"])
    for split, entries in lists.items():
        (root / f"{split}.json").write_text(json.dumps(entries))
    (root / "info.json").write_text("{}")
    return root


def test_emoset_keeps_the_official_split_and_the_check_finds_planted_leakage(tmp_path):
    src = make_emoset(tmp_path / "EmoSet-118K")
    out = tmp_path / "images" / "emoset"
    prepare("emoset", "--src", src, "--out", out, "--official_val")
    assert manifest(out)["settings"]["val"] == "official val.json (--official_val)"
    assert manifest(out)["val_left_out"] == {"images": 0, "why": None}
    assert class_counts(out) == {"train": {"amusement": 6, "anger": 6, "awe": 6},
                                 "val": {"amusement": 2, "anger": 3, "awe": 2},
                                 "test": {"amusement": 3, "anger": 3, "awe": 4}}
    assert (out / "test/awe/awe_90000.jpg").is_file() and (out / "val/anger/anger_90001.jpg").is_file()
    check = manifest(out)["check"]
    assert check["cross_split_duplicates"] == [["train/awe/awe_00000.jpg", "test/awe/awe_90000.jpg"]]
    assert [pair[:2] for pair in check["near_duplicates_across_splits"]] == [
        ["train/anger/anger_00001.jpg", "val/anger/anger_90001.jpg"]]
    assert check["near_duplicates_across_splits"][0][2] <= check["settings"]["near_duplicate_bits"]
    assert check["undecodable"] == [] and check["conflicting_label_duplicates"] == []
    assert len(load_dataset(out.parent, "emoset", tmp_path / "outputs").test) == 10
    # dropping removes the test-side copy only, and the manifest says so
    dropped = tmp_path / "images" / "emoset_clean"
    prepare("emoset", "--src", src, "--out", dropped, "--drop_cross_split_duplicates", "--official_val")
    record = manifest(dropped)
    assert record["check"]["dropped"] == ["test/awe/awe_90000.jpg"]
    assert not (dropped / "test/awe/awe_90000.jpg").exists() and (dropped / "train/awe/awe_00000.jpg").exists()
    assert record["counts"]["test"]["awe"] == 3 and len(record["files"]) == 34


def test_emoset_missing_images_stop_or_are_skipped(tmp_path, capsys):
    src = make_emoset(tmp_path / "EmoSet-118K")
    (src / "image/amusement/amusement_00007.jpg").unlink()  # a val image
    with pytest.raises(UserError, match=r"1 listed image.s. not found under .*amusement_00007.jpg.*--skip_missing"):
        prepare("emoset", "--src", src, "--out", tmp_path / "out", "--official_val")
    assert not (tmp_path / "out").exists()
    prepare("emoset", "--src", src, "--out", tmp_path / "out", "--skip_missing", "--official_val")
    assert "skipped 1 listed image(s) missing on disk" in capsys.readouterr().out
    assert manifest(tmp_path / "out")["counts"]["val"]["amusement"] == 1
    # by default val.json's images are left out, so a missing one does not matter
    prepare("emoset", "--src", src, "--out", tmp_path / "default")
    assert manifest(tmp_path / "default")["missing_skipped"] == 0


def test_emoset_default_leaves_val_out_for_the_loader_to_carve_from_train(tmp_path, capsys):
    """As the reference: train/ and test/ only; the loader carves 10% of train/ as validation,
    split.json says so, and --official_val (a settings change) writes val/ from val.json."""
    src = make_emoset(tmp_path / "EmoSet-118K")
    for k, emotion in enumerate(("amusement", "anger", "awe")):  # 10 training images per class: 1 carved off each
        for i in range(4):
            image_id = f"{emotion}_8000{i}"
            photo(src / "image" / emotion / f"{image_id}.jpg", 5000 + 10 * k + i)
        entries = json.loads((src / "train.json").read_text())
        entries += [[emotion, f"{emotion}_8000{i}", f"image/{emotion}/{emotion}_8000{i}.jpg", ""] for i in range(4)]
        (src / "train.json").write_text(json.dumps(entries))
    out = tmp_path / "images" / "emoset"
    prepare("emoset", "--src", src, "--out", out)
    printed = capsys.readouterr().out
    assert ("left out the 7 image(s) of val.json: the reference carves its validation from train/; "
            "--official_val writes val/ from val.json") in printed
    assert not (out / "val").exists()
    assert class_counts(out) == {"train": {"amusement": 10, "anger": 10, "awe": 10},
                                 "test": {"amusement": 3, "anger": 3, "awe": 4}}
    record = manifest(out)
    assert record["settings"]["val"] == VAL_CARVED == "carved by the loader from train/ (stratified 10%, seed 42)"
    assert record["val_left_out"] == {"images": 7, "why": "the reference carves its validation from train/; "
                                                          "--official_val writes val/ from val.json"}
    assert "val" not in record["counts"] and not any(t.startswith("val/") for t, _ in record["files"])
    # the loader carves 10% of train/ per class and records where validation came from
    splits = load_dataset(out.parent, "emoset", tmp_path / "outputs")
    assert splits.val_from_train and (len(splits.train), len(splits.val), len(splits.test)) == (27, 3, 10)
    saved = json.loads((tmp_path / "outputs/emoset/split.json").read_text())
    assert saved["val_source"] == f"{VAL_CARVED}: the layout has no val/ folder"
    assert saved["prepared_val"] == VAL_CARVED
    # a split.json written before val_source was recorded still loads, as it is
    split_file = tmp_path / "outputs/emoset/split.json"
    old = {key: value for key, value in saved.items() if key not in ("val_source", "prepared_val")}
    split_file.write_text(json.dumps(old))
    again = load_dataset(out.parent, "emoset", tmp_path / "outputs")
    assert (again.train, again.val) == (splits.train, splits.val)
    assert json.loads(split_file.read_text()) == old
    # switching to the official val is a settings change: refused, then done with --overwrite
    before = manifest(out)
    with pytest.raises(UserError, match=r"other arguments \(val differ\); pass --overwrite"):
        prepare("emoset", "--src", src, "--out", out, "--official_val")
    assert manifest(out) == before and not (out / "val").exists()
    prepare("emoset", "--src", src, "--out", out, "--official_val", "--overwrite")
    assert class_counts(out)["val"] == {"amusement": 2, "anger": 3, "awe": 2}
    assert manifest(out)["settings"]["val"] == "official val.json (--official_val)"
    official = load_dataset(out.parent, "emoset", tmp_path / "other_outputs")
    assert not official.val_from_train and len(official.val) == 7
    assert not (tmp_path / "other_outputs/emoset/split.json").exists()
    with pytest.raises(UserError, match=r"other arguments \(val differ\)"):
        prepare("emoset", "--src", src, "--out", out)


def test_official_val_without_val_json_is_one_clear_error(tmp_path):
    src = make_emoset(tmp_path / "EmoSet-118K")
    (src / "val.json").unlink()
    with pytest.raises(UserError, match=r"--official_val: no val.json in --src .*; drop --official_val"):
        prepare("emoset", "--src", src, "--out", tmp_path / "out", "--official_val")
    prepare("emoset", "--src", src, "--out", tmp_path / "out")
    assert manifest(tmp_path / "out")["val_left_out"] == {"images": 0, "why": None}


@pytest.mark.parametrize("ratios, has_val", [((0.85, 0, 0.15), False), ((0.8, 0.05, 0.15), True)])
def test_split_records_its_val_and_a_manifest_from_before_the_record_still_matches(tmp_path, capsys, ratios, has_val):
    """--split 0.85 0 0.15 (Emotion6, Abstract, ArtPhoto as the reference splits them) leaves
    validation to the loader; a VAL above 0 writes val/. A layout prepared before settings.val
    existed is still "the same" when rerun with its arguments."""
    src = make_folders(tmp_path / "src", {"a": 20, "b": 20})
    out = tmp_path / "out"
    args = ["folders", "--src", src, "--out", out, "--split", *ratios]
    prepare(*args)
    record = manifest(out)
    assert (out / "val").is_dir() == has_val
    assert record["settings"]["val"] == ("--split: a random 0.05 of each class (--seed)" if has_val else VAL_CARVED)
    del record["settings"]["val"]
    (out / "manifest.json").write_text(json.dumps(record))
    capsys.readouterr()
    prepare(*args)
    assert "nothing changed" in capsys.readouterr().out


def test_prefix_csv_name_collisions_undecodable_and_cross_class_duplicate(tmp_path):
    # prefix: the class is the file name up to its first '_'
    flat = tmp_path / "testImages_artphoto"
    for k, emotion in enumerate(("fear", "awe")):
        for i in range(10):
            photo(flat / f"{emotion}_{i:03d}_x.jpg", 50 * k + i)
    prepare("prefix", "--src", flat, "--out", tmp_path / "artphoto", "--split", 0.8, 0.0, 0.2)
    assert class_counts(tmp_path / "artphoto") == {"train": {"awe": 8, "fear": 8}, "test": {"awe": 2, "fear": 2}}
    # csv with a given split; two files called x.jpg (one X.JPG) in one class folder; one
    # undecodable file; the same bytes under two classes
    photos = tmp_path / "photos"
    rows = ["path,label,split"]
    for k, label in enumerate(("negative", "positive")):
        for i in range(4):
            rows.append(f"{label}/{i}.jpg,{label},{'test' if i == 3 else 'train'}")
            photo(photos / label / f"{i}.jpg", 10 * k + i)
    photo(photos / "a" / "x.jpg", 77)
    photo(photos / "b" / "X.JPG", 78)
    (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
    (photos / "copy.jpg").write_bytes((photos / "negative/0.jpg").read_bytes())
    rows += ["a/x.jpg,positive,train", "b/X.JPG,positive,train", "broken.jpg,negative,train",
             "copy.jpg,positive,train"]
    table = tmp_path / "labels.csv"
    table.write_text("\n".join(rows) + "\n")
    out = tmp_path / "flickr"
    prepare("csv", "--src", table, "--root", photos, "--out", out)
    names = sorted(p.name for p in (out / "train/positive").iterdir())
    assert names == ["0.jpg", "1.jpg", "2.jpg", "X_1.JPG", "copy.jpg", "x.jpg"]  # sorted by source path
    assert os.stat(out / "train/positive/X_1.JPG").st_ino == os.stat(photos / "b/X.JPG").st_ino
    check = manifest(out)["check"]
    assert check["undecodable"] == [["train/negative/broken.jpg", "UnidentifiedImageError"]]
    assert check["conflicting_label_duplicates"] == [["train/negative/0.jpg", "train/positive/copy.jpg"]]
    assert check["cross_split_duplicates"] == []


def test_vote_table_takes_the_majority_and_leaves_ties_out(tmp_path, capsys):
    """Abstract's shape: testImages_abstract/ABSTRACT_groundTruth.csv, names in single quotes."""
    folder = tmp_path / "testImages_abstract"
    votes = {"'abstract_01.jpg'": (5, 1, 0), "'abstract_02.jpg'": (0, 3, 1), "'abstract_03.jpg'": (2, 2, 0),
             "'abstract_04.jpg'": (1, 0, 4), "'abstract_05.jpg'": (4, 0, 0), "'abstract_06.jpg'": (0, 5, 0),
             "'abstract_07.jpg'": (0, 0, 2)}
    for k, name in enumerate(votes):
        photo(folder / name.strip("'"), 600 + k)
    lines = ["'ImageName','Amusement','Content','Sad'"] + [f"{n},{a},{b},{c}" for n, (a, b, c) in votes.items()]
    (folder / "ABSTRACT_groundTruth.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "abstract"
    prepare("csv", "--votes", "--src", folder / "ABSTRACT_groundTruth.csv", "--out", out,
            "--split", 0.5, 0.0, 0.5, "--classes", "Amusement=amusement", "Content=contentment", "Sad=sadness")
    assert "left out 1 image(s) whose votes tie for most" in capsys.readouterr().out
    record = manifest(out)
    labels = {Path(source).name: Path(target).parts[1] for target, source in record["files"]}
    assert labels == {"abstract_01.jpg": "amusement", "abstract_02.jpg": "contentment",
                      "abstract_04.jpg": "sadness", "abstract_05.jpg": "amusement",
                      "abstract_06.jpg": "contentment", "abstract_07.jpg": "sadness"}
    assert record["tied_votes"] == 1


def test_tiny_images_imbalance_and_the_check_command(tmp_path, capsys):
    layout = tmp_path / "hand"
    make_folders(layout / "train", {"big": 12, "small": 1})
    make_folders(layout / "test", {"big": 2, "small": 1}, seed0=500)
    photo(layout / "test/small/thumb.jpg", 9, size=(20, 16))
    (layout / "test/big/dup.jpg").write_bytes((layout / "train/big/img00.jpg").read_bytes())
    assert run_script("-m", "data.prepare", "check", str(layout), "--max_imbalance", "5").returncode == 0
    check = manifest(layout)["check"]
    assert check["tiny"] == [["test/small/thumb.jpg", 20, 16]]
    assert check["imbalance"]["train"] == {"largest": ["big", 12], "smallest": ["small", 1], "ratio": 12.0}
    assert check["imbalanced"] and check["cross_split_duplicates"] == [["train/big/img00.jpg", "test/big/dup.jpg"]]
    data.prepare.main(["check", str(layout), "--drop_cross_split_duplicates"])
    assert not (layout / "test/big/dup.jpg").exists() and (layout / "train/big/img00.jpg").exists()
    assert "dropped 1 later-split duplicate(s)" in capsys.readouterr().out


def test_near_duplicate_threshold_decides(tmp_path):
    """The re-encoded copy is found because of the dHash distance, not by chance: at 0 bits it
    is not reported, and a distinct photo never is."""
    layout = tmp_path / "l"
    photo(layout / "train/a/one.jpg", 1)
    photo(layout / "train/a/two.jpg", 2)
    reencoded(layout / "train/a/one.jpg", layout / "test/a/one_again.jpg")
    photo(layout / "test/a/three.jpg", 3)
    found = check_layout(layout, progress=False)
    assert [p[:2] for p in found["near_duplicates_across_splits"]] == [["train/a/one.jpg", "test/a/one_again.jpg"]]
    distance = found["near_duplicates_across_splits"][0][2]
    assert 0 < distance <= 6
    assert check_layout(layout, near_bits=distance - 1, progress=False)["near_duplicates_across_splits"] == []
    with Image.open(layout / "train/a/one.jpg") as a, Image.open(layout / "test/a/three.jpg") as b:
        assert bin(difference_hash(a) ^ difference_hash(b)).count("1") > 6


def test_difference_hash_is_the_documented_bits():
    pixels = np.zeros((8, 9), dtype=np.uint8)
    pixels[:, 1::2] = 200  # brighter than the left neighbour at odd columns: bits 10101010 per row
    image = Image.fromarray(pixels, "L")
    assert difference_hash(image) == int("10101010" * 8, 2)


def test_link_falls_back_to_symlink_then_copy(tmp_path, monkeypatch):
    source = photo(tmp_path / "s.jpg", 0)
    assert data.prepare.link_file(source, tmp_path / "h.jpg", copy=False) == "hardlink"
    assert data.prepare.link_file(source, tmp_path / "c.jpg", copy=True) == "copy"
    assert os.stat(tmp_path / "c.jpg").st_ino != os.stat(source).st_ino

    def refuse(*_):
        raise OSError("cross-device link")
    monkeypatch.setattr(os, "link", refuse)
    assert data.prepare.link_file(source, tmp_path / "l.jpg", copy=False) == "symlink"
    assert (tmp_path / "l.jpg").is_symlink() and (tmp_path / "l.jpg").resolve() == source.resolve()
    monkeypatch.setattr(os, "symlink", refuse)
    assert data.prepare.link_file(source, tmp_path / "k.jpg", copy=False) == "copy"


def test_check_reports_links_whose_source_is_gone(tmp_path):
    layout = tmp_path / "l"
    photo(layout / "train/a/kept.jpg", 0)
    (layout / "test/a").mkdir(parents=True)
    os.symlink(photo(tmp_path / "moved.jpg", 1), layout / "test/a/gone.jpg")
    (tmp_path / "moved.jpg").unlink()
    report = check_layout(layout, progress=False)
    assert report["broken_links"] == ["test/a/gone.jpg"] and report["images"] == 1


def test_failed_overwrite_keeps_the_old_layout(tmp_path, monkeypatch):
    src = make_folders(tmp_path / "src", {"a": 6, "b": 6})
    out = tmp_path / "out"
    prepare("folders", "--src", src, "--out", out, "--split", 0.5, 0.0, 0.5)
    old = manifest(out)
    calls = []

    def fail_later(source, target, copy):
        calls.append(target)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return "hardlink" if os.link(source, target) is None else None
    monkeypatch.setattr(data.prepare, "link_file", fail_later)
    with pytest.raises(KeyboardInterrupt):
        prepare("folders", "--src", src, "--out", out, "--split", 0.5, 0.0, 0.5, "--seed", 1, "--overwrite")
    assert manifest(out) == old and class_counts(out) == {"train": {"a": 3, "b": 3}, "test": {"a": 3, "b": 3}}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("mode, setup, message", [
    ("folders", "flat", "expected one sub-folder per class; found no sub-folders but 2 image(s) (class in the file name? use `prefix`)"),
    ("prefix", "nested", "expected images named <class>_<anything> directly in it; found none (it has 2 sub-folder(s)"),
    ("prefix", "no_sep", "1 image name(s) have no class before '_' (e.g. plain.jpg)"),
    ("emoset", "parent", "missing train.json, test.json (found it in"),
    ("emoset", "dict_list", "expected a list of [emotion, image_id, image_path, annotation_path] entries, found a dict"),
    ("emoset", "bad_entry", "train.json entry 0: expected [emotion, image_id, image_path, annotation_path]"),
    ("csv", "no_header", "expected a header row with columns path,label[,split]"),
    ("csv", "bad_split", "line 2: split 'holdout' is not one of train, val, test"),
    ("folders", "bad_ratios", "--split 0.8 0.1 0.2: three ratios"),
    ("folders", "unknown_class", "--classes joyy: 'joyy' is not a class of the source"),
    ("folders", "too_few", "class 'a' has 2 image(s): too few for --split"),
    ("folders", "out_inside", "inside --src"),
    ("folders", "foreign_out", "was not written by data.prepare"),
    ("csv", "given_and_ratios", "the source already gives its split (kept as is); drop --split"),
])
def test_wrongly_shaped_sources_are_one_clear_error(tmp_path, mode, setup, message):
    src, out = tmp_path / "src", tmp_path / "out"
    extra = ["--split", "0.5", "0.0", "0.5"] if mode in ("folders", "prefix") else []
    if setup == "flat":
        photo(src / "a_1.jpg", 0), photo(src / "b_1.jpg", 1)
    elif setup == "nested":
        make_folders(src, {"a": 1, "b": 1})
    elif setup == "no_sep":
        photo(src / "a_1.jpg", 0), photo(src / "plain.jpg", 1)
    elif setup == "parent":
        make_emoset(src / "EmoSet-118K")
    elif setup in ("dict_list", "bad_entry"):
        src.mkdir()
        (src / "test.json").write_text("[]")
        (src / "train.json").write_text(json.dumps({"a": 1} if setup == "dict_list" else [[1, 2]]))
    elif setup in ("no_header", "bad_split", "given_and_ratios"):
        src.mkdir()
        photo(src / "x.jpg", 0), photo(src / "y.jpg", 1)
        header = {"no_header": "x.jpg,a", "bad_split": "path,label,split", "given_and_ratios": "path,label,split"}[setup]
        row = "x.jpg,a,holdout" if setup == "bad_split" else "x.jpg,a,train\ny.jpg,b,test"
        (src / "t.csv").write_text(f"{header}\n{row}\n")
        src = src / "t.csv"
        extra = ["--split", "0.5", "0.0", "0.5"] if setup == "given_and_ratios" else []
    else:
        make_folders(src, {"a": 2 if setup == "too_few" else 4, "b": 4})
        if setup == "bad_ratios":
            extra = ["--split", "0.8", "0.1", "0.2"]
        elif setup == "unknown_class":
            extra += ["--classes", "joyy"]
        elif setup == "too_few":
            extra = ["--split", "0.4", "0.3", "0.3"]
        elif setup == "out_inside":
            out = src / "prepared"
        elif setup == "foreign_out":
            photo(out / "mine.jpg", 5)
    with pytest.raises(UserError) as err:
        prepare(mode, "--src", src, "--out", out, *extra)
    assert message in str(err.value)
    if setup == "foreign_out":
        assert (out / "mine.jpg").is_file()


def test_cli_error_is_one_line_exit_2(tmp_path):
    result = run_script("-m", "data.prepare", "folders", "--src", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "out"), "--split", "0.8", "0.05", "0.15")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: --src {tmp_path / 'nowhere'}: no such folder"
    missing_split = run_script("-m", "data.prepare", "folders", "--src", str(tmp_path), "--out", str(tmp_path / "o"))
    assert missing_split.returncode == 2
    assert missing_split.stderr.strip().splitlines()[-1].startswith("error: ")


def test_folders_with_a_given_split_keep_it(tmp_path):
    src = tmp_path / "given"
    make_folders(src / "train", {"a": 5, "b": 4})
    make_folders(src / "test", {"a": 2, "b": 3}, seed0=300)
    out = tmp_path / "out"
    prepare("folders", "--src", src, "--out", out)
    assert class_counts(out) == {"train": {"a": 5, "b": 4}, "test": {"a": 2, "b": 3}}
    record = manifest(out)
    assert record["settings"]["split"] is None and record["settings"]["seed"] is None
    assert ["test/a/img00.jpg", "test/a/img00.jpg"] in record["files"]
    # a given split that misses a class cannot load, so it is refused
    for f in (src / "test" / "b").iterdir():
        f.unlink()
    (src / "test" / "b").rmdir()
    with pytest.raises(UserError, match=r"the source's test split has no images of \['b'\]"):
        prepare("folders", "--src", src, "--out", tmp_path / "other")


def test_a_run_killed_between_the_two_renames_is_repaired(tmp_path, capsys):
    src = make_folders(tmp_path / "src", {"a": 4, "b": 4})
    out = tmp_path / "out"
    args = ["folders", "--src", src, "--out", out, "--split", 0.5, 0.0, 0.5]
    prepare(*args)
    out.rename(tmp_path / ".out.replaced")  # the old layout moved aside, the new one not yet in
    capsys.readouterr()
    prepare(*args)
    assert "nothing changed" in capsys.readouterr().out
    assert not (tmp_path / ".out.replaced").exists() and len(manifest(out)["files"]) == 8
