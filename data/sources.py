"""Readers of the shapes datasets are distributed in: each returns ``SourceImage``s (a path
relative to the source root, the class as the source names it, and the given split if any).
A source of another shape is a one-line ``UserError`` saying what was expected and found."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from data.datasets import IMAGE_EXTENSIONS, SPLITS, is_image_file
from utils.errors import UserError
from utils.io import read_json

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class SourceImage:
    source: str        # path relative to the source root (posix)
    label: str         # class as the source names it
    split: str | None  # given split, or None when the source has none


def _images_in(folder: Path, recursive: bool = True) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if is_image_file(p))


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_folders(src: Path) -> list[SourceImage]:
    """``src/<class>/**/<image>``, or ``src/{train,val,test}/<class>/**/<image>`` (a given split)."""
    subfolders = _visible_dirs(src)
    names = {p.name.lower() for p in subfolders}
    if subfolders and names <= set(SPLITS) and {"train", "test"} <= names:
        return [SourceImage(_relative(f, src), class_dir.name, split_dir.name.lower())
                for split_dir in subfolders for class_dir in _visible_dirs(split_dir)
                for f in _images_in(class_dir)]
    if not subfolders:
        found = len(_images_in(src, recursive=False))
        raise UserError(f"--src {src}: expected one sub-folder per class; found no sub-folders"
                        + (f" but {found} image(s) (class in the file name? use `prefix`)" if found else ""))
    return [SourceImage(_relative(f, src), class_dir.name, None)
            for class_dir in subfolders for f in _images_in(class_dir)]


def read_prefix(src: Path, sep: str) -> list[SourceImage]:
    """Images directly in ``src`` named ``<class><sep><anything>.<ext>``."""
    files = _images_in(src, recursive=False)
    if not files:
        subfolders = _visible_dirs(src)
        raise UserError(f"--src {src}: expected images named <class>{sep}<anything> directly in it; found none"
                        + (f" (it has {len(subfolders)} sub-folder(s): one per class? use `folders`)"
                           if subfolders else ""))
    unnamed = [f.name for f in files if sep not in f.stem or not f.stem.split(sep, 1)[0]]
    if unnamed:
        raise UserError(f"--src {src}: {len(unnamed)} image name(s) have no class before '{sep}' "
                        f"(e.g. {unnamed[0]}); expected <class>{sep}<anything>, or set --sep")
    return [SourceImage(f.name, f.stem.split(sep, 1)[0], None) for f in files]


def _emoset_image_path(entry, where: str) -> tuple[str, str]:
    """(emotion, image path) of one split-file entry: the official release lists
    ``[emotion, image_id, "image/<emotion>/<id>.jpg", "annotation/<emotion>/<id>.json"]``; the
    image path is the first later element with an image extension, so a shorter
    ``[emotion, image_path, ...]`` variant reads too."""
    if not (isinstance(entry, list) and entry and isinstance(entry[0], str)):
        raise UserError(f"{where}: expected [emotion, image_id, image_path, annotation_path], found {entry!r:.80}")
    for item in entry[1:]:
        if isinstance(item, str) and Path(item).suffix.lower() in IMAGE_EXTENSIONS:
            return entry[0], item
    raise UserError(f"{where}: no image path (.jpg, .png, ...) in {entry!r:.120}")


def read_emoset(src: Path) -> list[SourceImage]:
    """EmoSet-118K's official lists: ``src/{train,val,test}.json`` (val optional)."""
    missing = [f"{split}.json" for split in ("train", "test") if not (src / f"{split}.json").is_file()]
    if missing:
        inner = [p.name for p in _visible_dirs(src) if (p / "train.json").is_file()]
        hint = f" (found it in {src / inner[0]}: point --src there)" if inner else ""
        raise UserError(f"--src {src}: expected EmoSet-118K's split lists train.json, val.json, test.json "
                        f"at its root; missing {', '.join(missing)}{hint}")
    images = []
    for split in SPLITS:
        split_file = src / f"{split}.json"
        if not split_file.is_file():
            continue
        try:
            entries = read_json(split_file)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{split_file}: not valid JSON ({err.__class__.__name__}); re-extract the archive") from None
        if not isinstance(entries, list):
            raise UserError(f"{split_file}: expected a list of [emotion, image_id, image_path, annotation_path] "
                            f"entries, found a {type(entries).__name__}")
        for index, entry in enumerate(entries):
            emotion, path = _emoset_image_path(entry, f"{split_file} entry {index}")
            images.append(SourceImage(Path(path).as_posix(), emotion, split))
    return images


def _read_rows(table: Path) -> list[list[str]]:
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            rows = [row for row in csv.reader(fh) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise UserError(f"--src {table}: not a UTF-8 text table") from None
    if len(rows) < 2:
        raise UserError(f"--src {table}: no rows; expected a header row and one row per image")
    return rows


def read_vote_table(table: Path) -> tuple[list[SourceImage], int]:
    """A table of votes (Abstract's ``ABSTRACT_groundTruth.csv``): the first column is the image,
    every other column a class named by its header, holding that class's vote count. The label
    is the class with most votes; images with a tie for most are left out and counted.
    Single quotes around names (as Abstract writes them) are removed."""
    rows = [[cell.strip().strip("'").strip() for cell in row] for row in _read_rows(table)]
    classes = rows[0][1:]
    if len(classes) < 2 or not all(classes):
        raise UserError(f"--src {table}: expected a header row image,<class>,<class>,... for --votes; found {rows[0]}")
    images, ties = [], 0
    for line, row in enumerate(rows[1:], start=2):
        try:
            votes = [float(cell) for cell in row[1:len(classes) + 1]]
        except ValueError:
            raise UserError(f"{table} line {line}: vote counts must be numbers, found {row[1:]}") from None
        if len(votes) != len(classes) or not row[0]:
            raise UserError(f"{table} line {line}: expected an image and {len(classes)} vote counts")
        top = max(votes)
        if votes.count(top) > 1:
            ties += 1
            continue
        images.append(SourceImage(row[0], classes[votes.index(top)], None))
    return images, ties


def read_csv_source(table: Path) -> list[SourceImage]:
    """Rows of ``path,label[,split]`` (a header row naming the columns; any order, extra columns
    ignored). Paths are relative to ``--root`` (or absolute)."""
    rows = _read_rows(table)
    header = [name.strip().lower() for name in rows[0]]
    if "path" not in header or "label" not in header:
        raise UserError(f"--src {table}: expected a header row with columns path,label[,split]; found {rows[0]}")
    columns = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    images = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < len(header):
            raise UserError(f"{table} line {line}: {len(row)} column(s), the header has {len(header)}")
        path, label = row[columns["path"]].strip(), row[columns["label"]].strip()
        if not path or not label:
            raise UserError(f"{table} line {line}: empty path or label")
        split = None
        if "split" in columns:
            given = row[columns["split"]].strip().lower()
            if given not in SPLIT_ALIASES:
                raise UserError(f"{table} line {line}: split {given!r} is not one of train, val, test")
            split = SPLIT_ALIASES[given]
        images.append(SourceImage(path, label, split))
    return images


def keep_existing(images: list[SourceImage], root: Path, skip_missing: bool) -> tuple[list[SourceImage], int]:
    """Drop listed files that are not on disk when ``--skip_missing``; otherwise name one and stop."""
    missing = [image for image in images if not (root / image.source).is_file()]
    if missing and not skip_missing:
        raise UserError(f"{len(missing)} listed image(s) not found under {root} (e.g. {missing[0].source}); "
                        "fix the paths (--root), or pass --skip_missing to leave them out")
    if missing:
        gone = {image.source for image in missing}
        images = [image for image in images if image.source not in gone]
    return images, len(missing)


def dedupe(images: list[SourceImage]) -> tuple[list[SourceImage], int]:
    """One entry per source file; a file listed twice with another label or split is an error."""
    seen: dict[str, SourceImage] = {}
    for image in images:
        first = seen.setdefault(image.source, image)
        if first != image:
            raise UserError(f"{image.source} is listed twice, as ({first.label}, {first.split}) and "
                            f"({image.label}, {image.split}); keep one")
    return list(seen.values()), len(images) - len(seen)
