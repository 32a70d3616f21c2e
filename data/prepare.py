"""From a dataset as its authors distribute it to ``<out>/{train,val,test}/<class>/<image>``.

```
python -m data.prepare emoset  --src EmoSet-118K --out images/emoset [--official_val]
python -m data.prepare folders --src FI/emotion_dataset --out images/FI --split 0.8 0.05 0.15
python -m data.prepare prefix  --src testImages_artphoto --out images/artphoto --split 0.85 0 0.15
python -m data.prepare csv     --src labels.csv --root photos --out images/flickr --split 0.8 0.05 0.15
python -m data.prepare check   images/FI [--drop_cross_split_duplicates]
```

Sources: ``emoset`` reads EmoSet-118K's ``train.json``/``val.json``/``test.json`` (lists of
``[emotion, image_id, image_path, annotation_path]``); ``folders`` one sub-folder per class (or
``train/``, ``val/``, ``test/`` each holding class folders: a given split); ``prefix`` class =
file name up to the first ``--sep``; ``csv`` a table with columns ``path,label[,split]``, or
with ``--votes`` a table of vote counts per class (Abstract's).
Given splits are kept, except EmoSet's ``val.json``: by default its images are left out (counted)
and the layout has ``train/`` and ``test/`` only, so the loader carves a stratified 10% of
``train/`` as validation, as the reference code does; ``--official_val`` writes ``val/`` from
``val.json``. Otherwise ``--split`` ratios, stratified by class and seeded (a VAL of 0 writes no
``val/``: the loader's carve-out again). ``settings.val`` in the manifest records where
validation comes from. Files are
hard-linked (then symlinked, then copied). ``manifest.json`` records how the layout was made
and the leakage/hygiene check (data/hygiene.py) that ends every prepare. The readers of each
source shape are in data/sources.py.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data.datasets import LAYOUT_MANIFEST, SPLITS, VAL_CARVED, known_classes
from data.hygiene import (MAX_IMBALANCE, MIN_SIDE, NEAR_DUPLICATE_BITS, check_layout, drop_cross_split_duplicates,
                          format_report)
from data.sources import (SourceImage, dedupe, keep_existing, read_csv_source, read_emoset,
                          read_folders, read_prefix, read_vote_table)
from utils.errors import UserError, first_line, run_cli
from utils.io import read_json, write_json

MANIFEST = LAYOUT_MANIFEST
MANIFEST_FORMAT = 1
LINK_METHODS = ("hardlink", "symlink", "copy")
# settings.val: where the layout's validation comes from (VAL_CARVED when it has no val/).
VAL_OFFICIAL = "official val.json (--official_val)"
VAL_GIVEN = "the source's own val split"
VAL_LEFT_OUT_WHY = "the reference carves its validation from train/; --official_val writes val/ from val.json"


@dataclass(frozen=True)
class PlannedFile:
    split: str
    class_name: str
    name: str          # file name inside <out>/<split>/<class>/
    source: str        # relative to the source root

    @property
    def target(self) -> str:
        return f"{self.split}/{self.class_name}/{self.name}"


# ---------------------------------------------------------------- classes and splits

def check_class_name(name: str, origin: str) -> None:
    """A class becomes a folder name and the loader ignores hidden folders."""
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name
            or any(ord(ch) < 32 for ch in name)):
        raise UserError(f"class name {name!r} ({origin}) cannot be a class folder name "
                        "(no '/', '\\', leading '.', or control characters); rename it with --classes OLD=NEW")


def parse_class_map(items: list[str] | None, source_classes: list[str]) -> dict[str, str]:
    """``--classes a b=c``: keep ``a``, rename ``b`` to ``c``, drop every class not listed.
    Without the flag every class is kept under its own name."""
    if not items:
        return {name: name for name in source_classes}
    mapping = {}
    for item in items:
        old, _, new = item.partition("=")
        old, new = old.strip(), (new.strip() if "=" in item else old.strip())
        if old not in source_classes:
            raise UserError(f"--classes {item}: {old!r} is not a class of the source (its classes: "
                            f"{', '.join(source_classes)})")
        if old in mapping:
            raise UserError(f"--classes: {old!r} is given twice")
        check_class_name(new, f"--classes {item}")
        mapping[old] = new
    return mapping


def apply_classes(images: list[SourceImage], mapping: dict[str, str]) -> tuple[list[SourceImage], dict[str, int]]:
    """Rename classes; images of classes not in ``mapping`` are dropped and counted per class."""
    kept, dropped = [], Counter()
    for image in images:
        if image.label in mapping:
            kept.append(SourceImage(image.source, mapping[image.label], image.split))
        else:
            dropped[image.label] += 1
    return kept, dict(sorted(dropped.items()))


def split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) sizes for a class of ``n`` images: val and test get
    ``max(1, round(n * ratio))`` when their ratio is above 0, train gets the rest."""
    val = max(1, round(n * ratios[1])) if ratios[1] > 0 else 0
    test = max(1, round(n * ratios[2])) if ratios[2] > 0 else 0
    return n - val - test, val, test


def assign_splits(images: list[SourceImage], ratios: tuple[float, float, float], seed: int) -> list[SourceImage]:
    """Stratified, seeded split: each class's images, sorted by path, are shuffled by a generator
    seeded with (seed, class), so a class's split does not depend on the other classes."""
    by_class: dict[str, list[SourceImage]] = defaultdict(list)
    for image in images:
        by_class[image.label].append(image)
    assigned = []
    for class_name in sorted(by_class):
        group = sorted(by_class[class_name], key=lambda image: image.source)
        n_train, n_val, n_test = split_counts(len(group), ratios)
        if n_train < 1:
            raise UserError(f"class {class_name!r} has {len(group)} image(s): too few for --split "
                            f"{' '.join(map(str, ratios))} (every split needs at least one per class)")
        random.Random(f"{seed}/{class_name}").shuffle(group)
        labels = ["test"] * n_test + ["val"] * n_val + ["train"] * n_train
        assigned += [SourceImage(image.source, image.label, split) for image, split in zip(group, labels)]
    return assigned


def check_given_splits(images: list[SourceImage]) -> None:
    """A given split must hold every class (the loader requires the same class folders)."""
    present = defaultdict(set)
    for image in images:
        present[image.split].add(image.label)
    classes = set().union(*present.values())
    for split in SPLITS:
        if split in present and present[split] != classes:
            raise UserError(f"the source's {split} split has no images of {sorted(classes - present[split])}; "
                            "every split needs every class (drop the class with --classes)")
    if "train" not in present or "test" not in present:
        raise UserError(f"the source gives splits {sorted(present)} but needs at least train and test")


def leave_out_val(images: list[SourceImage]) -> tuple[list[SourceImage], int]:
    """EmoSet without ``--official_val``: the images ``val.json`` lists are left out and counted."""
    kept = [image for image in images if image.split != "val"]
    return kept, len(images) - len(kept)


def val_choice(mode: str, ratios: list[float] | None, has_val: bool) -> str:
    """``settings.val``: where validation comes from. Decided by whether the layout gets a
    ``val/`` folder and, when it does, by what fills it (never by a dataset's name)."""
    if not has_val:
        return VAL_CARVED
    if ratios:
        return f"--split: a random {ratios[1]:g} of each class (--seed)"
    return VAL_OFFICIAL if mode == "emoset" else VAL_GIVEN


def plan_layout(images: list[SourceImage]) -> list[PlannedFile]:
    """Target names: the source file name, made unique inside each class folder (compared
    case-insensitively, for case-insensitive file systems) with ``_1``, ``_2``... in path order."""
    plan, used = [], defaultdict(set)
    for image in sorted(images, key=lambda i: (SPLITS.index(i.split), i.label, i.source)):
        name = Path(image.source).name
        stem, suffix = Path(name).stem, Path(name).suffix
        folder = (image.split, image.label)
        counter = 0
        while name.lower() in used[folder]:
            counter += 1
            name = f"{stem}_{counter}{suffix}"
        used[folder].add(name.lower())
        plan.append(PlannedFile(image.split, image.label, name, image.source))
    return plan


def plan_hash(plan: list[PlannedFile]) -> str:
    listing = "\n".join(f"{f.target}\t{f.source}" for f in plan)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def counts_of(plan: list[PlannedFile]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for f in plan:
        counts[f.split][f.class_name] += 1
    return {split: dict(sorted(counts[split].items())) for split in SPLITS if split in counts}


# ---------------------------------------------------------------- writing

def link_file(source: Path, target: Path, copy: bool) -> str:
    """Hard link, else symbolic link (absolute), else copy; returns the method used."""
    if not copy:
        try:
            os.link(source, target)
            return "hardlink"
        except OSError:
            pass
        try:
            os.symlink(source.resolve(), target)
            return "symlink"
        except OSError:
            pass
    shutil.copy2(source, target)
    return "copy"


def build_layout(plan: list[PlannedFile], source_root: Path, staging: Path, copy: bool) -> dict[str, int]:
    for split in {f.split for f in plan}:
        for class_name in {f.class_name for f in plan}:
            (staging / split / class_name).mkdir(parents=True, exist_ok=True)
    methods = Counter()
    for f in tqdm(plan, desc="linking", unit="img"):
        methods[link_file(source_root / f.source, staging / f.target, copy)] += 1
    return {method: methods[method] for method in LINK_METHODS if methods[method]}


def is_prepared_by_us(out: Path) -> bool:
    manifest = out / MANIFEST
    try:
        return manifest.is_file() and "settings" in read_json(manifest)
    except (OSError, ValueError):
        return False


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with renames, so ``out`` is either the old layout or the
    new one; a run killed in between is repaired by the next run (``_restore_backup``)."""
    backup = out.parent / f".{out.name}.replaced"
    if out.exists():
        out.rename(backup)
    staging.rename(out)
    if backup.exists():
        shutil.rmtree(backup)


def _restore_backup(out: Path) -> None:
    backup = out.parent / f".{out.name}.replaced"
    if backup.exists():
        if out.exists():
            shutil.rmtree(backup)
        else:
            backup.rename(out)


def recorded_settings(manifest: dict) -> dict:
    """The manifest's settings; one written before ``val`` was recorded gets the value its
    layout implies (it wrote ``val/`` whenever the source gave, or ``--split`` asked for, one)."""
    settings = manifest["settings"]
    if "val" in settings:
        return settings
    has_val = "val" in (manifest.get("counts") or {})
    return {**settings, "val": val_choice(settings.get("mode"), settings.get("split"), has_val)}


def existing_layout_state(out: Path, settings: dict, digest: str) -> str:
    """"absent", "same" (complete and made the same way) or a reason why it differs."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "absent"
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if not is_prepared_by_us(out):
        raise UserError(f"--out {out}: exists, is not empty, and was not written by data.prepare "
                        f"(no {MANIFEST} with its settings); move it away or choose another --out")
    manifest = read_json(out / MANIFEST)
    saved = recorded_settings(manifest)
    if saved != settings:
        changed = sorted(k for k in set(settings) | set(saved) if settings.get(k) != saved.get(k))
        return f"it was prepared with other arguments ({', '.join(changed)} differ)"
    if manifest.get("plan_sha256") != digest:
        return "the source's images or labels changed since it was prepared"
    missing = [path for path in manifest.get("files", []) if not (out / path[0]).exists()]
    if missing:
        return f"{len(missing)} of its files are gone (e.g. {missing[0][0]})"
    return "same"


# ---------------------------------------------------------------- commands

def read_source(args) -> tuple[list[SourceImage], Path, int]:
    """The source's images, the folder their paths are relative to, and the number of images
    left out for tied votes (``csv --votes``)."""
    src = Path(args.src)
    if args.mode == "csv":
        if not src.is_file():
            raise UserError(f"--src {src}: no such file (csv mode reads a table path,label[,split])")
        root = Path(args.root) if args.root else src.parent
        if not root.is_dir():
            raise UserError(f"--root {root}: no such folder")
        if args.votes:
            images, ties = read_vote_table(src)
            return images, root, ties
        return read_csv_source(src), root, 0
    if not src.is_dir():
        raise UserError(f"--src {src}: no such folder")
    if args.mode == "emoset":
        return read_emoset(src), src, 0
    if args.mode == "folders":
        return read_folders(src), src, 0
    return read_prefix(src, args.sep), src, 0


def resolve_splits(images: list[SourceImage], args) -> tuple[list[SourceImage], list[float] | None]:
    given = {image.split for image in images}
    if given != {None}:
        if None in given:
            raise UserError("the source gives a split for some images but not for others; give one for every image")
        if args.split is not None:
            raise UserError("--split: the source already gives its split (kept as is); drop --split")
        check_given_splits(images)
        return images, None
    if args.split is None:
        raise UserError(f"the source ({args.mode}) gives no split: pass --split TRAIN VAL TEST "
                        "(e.g. --split 0.8 0.05 0.15, the common random split)")
    ratios = tuple(args.split)
    if any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6 or ratios[0] <= 0 or ratios[2] <= 0:
        raise UserError(f"--split {' '.join(map(str, ratios))}: three ratios (train val test) that sum to 1, "
                        "train and test above 0")
    return assign_splits(images, ratios, args.seed), list(ratios)


def prepare(args) -> None:
    out = Path(args.out)
    images, source_root, ties = read_source(args)
    if args.mode in ("folders", "prefix", "emoset") and out.resolve().is_relative_to(source_root.resolve()):
        raise UserError(f"--out {out}: inside --src {source_root}; write the layout elsewhere")
    val_left_out = 0
    if args.mode == "emoset":
        if args.official_val and not (source_root / "val.json").is_file():
            raise UserError(f"--official_val: no val.json in --src {source_root}; "
                            "drop --official_val to let the loader carve validation from train/")
        if not args.official_val:
            images, val_left_out = leave_out_val(images)
    if args.mode in ("emoset", "csv"):
        images, missing = keep_existing(images, source_root, args.skip_missing)
    else:
        missing = 0
    images, repeated = dedupe(images)
    source_classes = sorted({image.label for image in images})
    mapping = parse_class_map(args.classes, source_classes)
    images, dropped = apply_classes(images, mapping)
    class_names = sorted({image.label for image in images})
    for name in class_names:
        check_class_name(name, f"from {args.src}")
    if len(class_names) < 2:
        raise UserError(f"{len(class_names)} class(es) left ({class_names}); a dataset needs at least 2")
    images, ratios = resolve_splits(images, args)
    plan = plan_layout(images)
    digest = plan_hash(plan)
    settings = {"mode": args.mode, "source": str(Path(args.src).resolve()), "root": str(source_root.resolve()),
                "split": ratios, "seed": args.seed if ratios else None, "classes": mapping,
                "sep": args.sep if args.mode == "prefix" else None,
                "votes": args.mode == "csv" and args.votes, "skip_missing": args.skip_missing,
                "copy": args.copy, "drop_cross_split_duplicates": args.drop_cross_split_duplicates,
                "val": val_choice(args.mode, ratios, any(f.split == "val" for f in plan))}

    _restore_backup(out)
    state = existing_layout_state(out, settings, digest)
    if state == "same":
        print(f"{out}: already prepared with these arguments ({len(plan)} images); nothing changed "
              f"(`python -m data.prepare check {out}` checks it again)")
        return
    if state != "absent" and not args.overwrite:
        raise UserError(f"--out {out}: holds a layout, but {state}; pass --overwrite to replace it "
                        "(or choose another --out)")
    _report_source(args, class_names, dropped, missing, repeated, ties, val_left_out)
    staging = out.parent / f".{out.name}.preparing"
    try:
        if staging.exists():
            shutil.rmtree(staging)  # left by an interrupted run
        staging.parent.mkdir(parents=True, exist_ok=True)
        methods = build_layout(plan, source_root, staging, args.copy)
        report = _check(staging, args)
        dropped_files = set(report["dropped"])
        final = [f for f in plan if f.target not in dropped_files]
        write_json(staging / MANIFEST, {
            "format": MANIFEST_FORMAT, "tool": "data.prepare", "settings": settings,
            "class_names": class_names, "dropped_classes": dropped, "missing_skipped": missing,
            "listed_twice": repeated, "tied_votes": ties,
            "val_left_out": {"images": val_left_out, "why": VAL_LEFT_OUT_WHY if val_left_out else None},
            "links": methods, "counts": counts_of(final),
            "plan_sha256": digest, "files": [[f.target, f.source] for f in final], "check": report,
        })
        swap_in(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"--out {out}: cannot write the layout ({first_line(err)}); "
                        "nothing was changed there") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    expected = known_classes(out.name)
    if expected is not None and sorted(expected) != class_names:
        print(f"warning: classes {class_names} differ from the known {out.name} classes {sorted(expected)}")
    print(f"wrote {out}: {_counts_line(counts_of(final))}; files {_methods_line(methods)}")


def _report_source(args, class_names, dropped, missing, repeated, ties, val_left_out=0) -> None:
    print(f"{args.mode} source {args.src}: classes {class_names}")
    if val_left_out:
        print(f"  left out the {val_left_out} image(s) of val.json: {VAL_LEFT_OUT_WHY}")
    if ties:
        print(f"  left out {ties} image(s) whose votes tie for most")
    for name, count in dropped.items():
        print(f"  dropped class {name}: {count} image(s)")
    if missing:
        print(f"  skipped {missing} listed image(s) missing on disk (--skip_missing)")
    if repeated:
        print(f"  {repeated} image(s) listed twice, kept once")


def _counts_line(counts: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{split} {sum(per_class.values())}" for split, per_class in counts.items())


def _methods_line(methods: dict[str, int]) -> str:
    return ", ".join(f"{n} {method}" for method, n in methods.items()) or "none"


def _check(root: Path, args) -> dict:
    report = check_layout(root, args.near_duplicate_bits, args.min_side, args.max_imbalance)
    if args.drop_cross_split_duplicates:
        drop_cross_split_duplicates(root, report)
    print(format_report(report))
    return report


def check(args) -> None:
    """``check <layout>``: report, and record the report in the layout's manifest."""
    root = Path(args.layout)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    report = _check(root, args)
    manifest_file = root / MANIFEST
    manifest = read_json(manifest_file) if manifest_file.is_file() else {"format": MANIFEST_FORMAT,
                                                                          "tool": "data.prepare check"}
    manifest["check"] = report
    if report["dropped"] and "files" in manifest:
        gone = set(report["dropped"])
        manifest["files"] = [entry for entry in manifest["files"] if entry[0] not in gone]
        manifest["counts"] = report["counts"]
    try:
        write_json(manifest_file, manifest)
    except OSError as err:
        raise UserError(f"{manifest_file}: cannot write the report ({first_line(err)})") from None
    print(f"report written to {manifest_file}")


# ---------------------------------------------------------------- command line

def _add_check_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("leakage and hygiene check")
    group.add_argument("--near_duplicate_bits", type=int, default=NEAR_DUPLICATE_BITS,
                       help="report images in different splits whose 64-bit difference hashes differ "
                            "in at most this many bits")
    group.add_argument("--min_side", type=int, default=MIN_SIDE, help="report images with a shorter side below this (px)")
    group.add_argument("--max_imbalance", type=float, default=MAX_IMBALANCE,
                       help="flag train when its largest class is more than this many times its smallest")
    group.add_argument("--drop_cross_split_duplicates", action="store_true",
                       help="delete the val/test copies of images whose bytes also appear in an earlier split")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True, metavar="{emoset,folders,prefix,csv,check}")
    sources = {
        "emoset": "EmoSet-118K: train.json/test.json at --src (the official split; val.json with --official_val)",
        "folders": "one sub-folder per class (or train/, val/, test/ holding class folders)",
        "prefix": "images named <class><sep><anything> directly in --src",
        "csv": "a table path,label[,split]; paths relative to --root",
    }
    for mode, help_text in sources.items():
        sub = modes.add_parser(mode, help=help_text, description=help_text,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("--src", required=True, help="the dataset as downloaded" if mode != "csv" else "the CSV table")
        sub.add_argument("--out", required=True, help="the layout to write, e.g. images/FI")
        if mode == "csv":
            sub.add_argument("--root", default=None, help="folder the CSV paths are relative to; None means the CSV's own folder")
            sub.add_argument("--votes", action="store_true",
                             help="the table is image,<class>,<class>,... vote counts (e.g. Abstract's "
                                  "ABSTRACT_groundTruth.csv): label = most votes, ties left out")
        if mode == "prefix":
            sub.add_argument("--sep", default="_", help="the class is the file name up to the first --sep")
        if mode != "emoset":
            sub.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=None,
                             help="ratios of a stratified random split (when the source gives none)")
        else:
            sub.set_defaults(split=None)
        sub.add_argument("--seed", type=int, default=42, help="seed of the --split shuffle")
        sub.add_argument("--classes", nargs="+", default=None, metavar="NAME[=NEW]",
                         help="classes to keep (others are dropped and counted), NAME=NEW renames")
        sub.add_argument("--copy", action="store_true", help="copy files instead of linking them")
        if mode == "emoset":
            sub.add_argument("--official_val", action="store_true",
                             help="write val/ from val.json; without it val.json's images are left out "
                                  "and the loader carves a stratified 10%% of train/ (seed 42) as "
                                  "validation, as the reference code does")
        if mode in ("emoset", "csv"):
            sub.add_argument("--skip_missing", action="store_true",
                             help="leave out listed images missing on disk (counted) instead of stopping")
        else:
            sub.set_defaults(skip_missing=False)
        sub.add_argument("--overwrite", action="store_true",
                         help="replace a layout prepared earlier with other arguments")
        _add_check_flags(sub)
    sub = modes.add_parser("check", help="leakage and hygiene check of a prepared layout",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_argument("layout", help="a folder holding train/, test/ (and val/), e.g. images/FI")
    _add_check_flags(sub)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.near_duplicate_bits < 0 or args.min_side < 0 or args.max_imbalance < 1:
        raise UserError("--near_duplicate_bits and --min_side must be >= 0, --max_imbalance >= 1")
    if args.mode == "check":
        check(args)
    else:
        prepare(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
