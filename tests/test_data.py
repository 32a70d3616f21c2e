"""The dataset layer, prompts, answer parser, annotation format and shared utilities."""
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_script
from data.annotations import Annotation, append_annotation, read_annotations, to_conversations
from data.datasets import ImageDataset, load_dataset
from data.prompts import (categorical_answer, categorical_question, parse_emotion,
                          split_sections)
from utils.cli import base_parser, parse_args
from utils.errors import UserError
from utils.io import repair_tail
from utils.metrics import classification_metrics, write_metrics

CLASSES = ["amusement", "anger", "awe", "contentment"]


def draw(path: Path, colour=(200, 30, 30), size=(16, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_tree(root: Path, per_class=10, splits=("train", "test"), classes=("anger", "awe")) -> Path:
    for split in splits:
        for c in classes:
            for i in range(per_class):
                draw(root / "ds" / split / c / f"{i:03d}.png")
    return root


def test_classes_are_sorted_and_odd_files_ignored(tmp_path):
    root = make_tree(tmp_path, classes=("fear", "awe"))
    draw(root / "ds/train/awe/UPPER.JPG")
    draw(root / "ds/train/awe/x.WebP")
    (root / "ds/train/awe/.DS_Store").write_text("junk")
    (root / "ds/train/awe/notes.txt").write_text("junk")
    splits = load_dataset(root, "ds", tmp_path / "out")
    assert splits.class_names == ["awe", "fear"]
    everything = splits.train + splits.val
    assert len(everything) == 22
    assert {Path(s.path).suffix for s in everything} == {".png", ".JPG", ".WebP"}
    assert all(s.label == 0 for s in everything if "/awe/" in s.path)


def test_val_split_is_stratified_persisted_and_checked(tmp_path):
    root = make_tree(tmp_path, per_class=20)
    out = tmp_path / "out"
    first = load_dataset(root, "ds", out)
    assert first.val_from_train
    assert [sum(s.label == k for s in first.val) for k in (0, 1)] == [2, 2]
    assert not set(first.val) & set(first.train)
    split_file = out / "ds" / "split.json"
    saved = json.loads(split_file.read_text())
    assert sorted(saved["val"]) == sorted(s.path for s in first.val)
    assert saved["val_source"] == "carved by the loader from train/ (stratified 10%, seed 42): the layout has no val/ folder"
    assert "prepared_val" not in saved  # no manifest.json: not laid out by data.prepare
    again = load_dataset(root, "ds", out)
    assert again.val == first.val and again.train == first.train
    draw(root / "ds/train/awe/new.png")
    with pytest.raises(UserError, match="no longer matches"):
        load_dataset(root, "ds", out)
    # a different output folder (no split file yet) splits again, identically (seed 42)
    (root / "ds/train/awe/new.png").unlink()
    assert load_dataset(root, "ds", tmp_path / "other").val == first.val


def test_existing_val_folder_is_used(tmp_path):
    root = make_tree(tmp_path, per_class=3, splits=("train", "val", "test"))
    splits = load_dataset(root, "ds", tmp_path / "out")
    assert not splits.val_from_train and len(splits.val) == 6 and len(splits.train) == 6
    assert not (tmp_path / "out/ds/split.json").exists()


@pytest.mark.parametrize("breakage, message", [
    ("no_root", "no such folder"),
    ("no_test", "test: missing"),
    ("differing", "missing here ['awe'], extra here ['joy']"),
    ("empty_class", "holds no images"),
])
def test_bad_layouts(tmp_path, breakage, message):
    root = make_tree(tmp_path, per_class=2)
    if breakage == "no_root":
        root = tmp_path / "nowhere"
    elif breakage == "no_test":
        for p in sorted((root / "ds/test").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / "ds/test").rmdir()
    elif breakage == "differing":
        (root / "ds/test/awe").rename(root / "ds/test/joy")
    elif breakage == "empty_class":
        for p in (root / "ds/train/awe").iterdir():
            p.unlink()
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_dataset(root, "ds", tmp_path / "out")


def test_undecodable_image_is_named_or_skipped(tmp_path):
    root = make_tree(tmp_path, per_class=3, splits=("train", "val", "test"))
    bad = root / "ds/train/awe/broken.jpg"
    bad.write_bytes(b"not really a jpeg")
    splits = load_dataset(root, "ds", tmp_path / "out")
    dataset = ImageDataset(root, splits.train)
    index = [s.path for s in splits.train].index("ds/train/awe/broken.jpg")
    with pytest.raises(UserError, match="broken.jpg: cannot decode"):
        dataset[index]
    image, label = dataset[0]
    assert image.mode == "RGB" and label == 0
    skipped = load_dataset(root, "ds", tmp_path / "out", skip_bad_images=True)
    assert skipped.skipped == ["ds/train/awe/broken.jpg"] and len(skipped.train) == 6


def test_data_check_cli_errors_are_one_line_exit_2(tmp_path):
    root = make_tree(tmp_path, per_class=3)
    ok = run_script("-m", "data", "--dataname", "ds", "--data_root", str(root),
                    "--output_dir", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert "2 classes ['anger', 'awe']" in ok.stdout and "all images decode" in ok.stdout
    (root / "ds/test/awe/0.png").write_bytes(b"garbage")
    bad = run_script("-m", "data", "--dataname", "ds", "--data_root", str(root),
                     "--output_dir", str(tmp_path / "out"))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (f"error: {root}/ds/test/awe/0.png: cannot decode "
                                                   "image (UnidentifiedImageError); fix or remove "
                                                   "it, or pass --skip_bad_images")
    missing = run_script("-m", "data", "--dataname", "nope", "--data_root", str(root))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1 and "no such dataset folder" in missing.stderr


def test_categorical_prompt_uses_the_dataset_classes():
    question = categorical_question(["negative", "positive"])
    assert "[negative, positive]" in question and "{'emotion': '<category>'}" in question
    assert categorical_answer("awe") == "{'emotion': 'awe'}"


@pytest.mark.parametrize("text, expected", [
    ("{'emotion': 'awe'}", 2),
    ('{"emotion": "Anger"}', 1),
    ("  {  'emotion' :  'contentment' }  because it is calm", 3),
    ("Sure! {'emotion': 'amusement'", 0),
    ("The image evokes awe.", 2),
    ("{'emotion': 'joy'}", None),
    ("anger or awe, hard to say", None),
    ("", None),
    ("awesome", None),
])
def test_parse_emotion(text, expected):
    assert parse_emotion(text, CLASSES) == expected


# What each parser reads from a decoded answer (classes: amusement 0, anger 1, awe 2, contentment 3).
# strict is the reference code's rule: the first "{'emotion': ... '}" on one line, read by
# ast.literal_eval, its value a class name exactly as written; lenient reads what it always read.
PARSER_TABLE = [
    # text                                                     strict lenient
    ("{'emotion': 'awe'}",                                        2,    2),     # the form stage 1 trains
    ("{'emotion':'awe'}",                                         2,    2),     # no space after the colon
    ("Sure. {'emotion': 'anger'} The clenched fist says so.",     1,    1),     # text around it is ignored
    ('{"emotion": "awe"}',                                        None, 2),     # double quotes
    ("{'emotion': 'Awe'}",                                        None, 2),     # the class in another case
    ("{'Emotion': 'awe'}",                                        None, 2),     # the key in another case
    ("{ 'emotion': 'awe' }",                                      None, 2),     # spaces inside the braces
    ("  {  'emotion' :  'contentment' }  because it is calm",     None, 3),
    ("{'emotion': ' awe'}",                                       None, 2),     # the space is part of the value
    ("{'emotion': 'awe', 'confidence': 'high'}",                  2,    2),     # an extra key after it
    ("{'emotion': 'awe', 'confidence': 0.9}",                     None, 2),     # ... not ending in '}
    ("{'confidence': 'high', 'emotion': 'awe'}",                  None, 2),     # an extra key before it
    ("{'emotion': 'awe'} or {'emotion': 'anger'}",                2,    2),     # two dictionaries: the first
    ("{'emotion': 'awe', 'emotion': 'anger'}",                    1,    2),     # a repeated key: the literal's last
    ("{'emotion': 'joy'}",                                        None, None),  # a class not in the list
    ("{'emotion': 'it's awe'}",                                   None, 2),     # a malformed literal
    ("{'emotion': 'amusement' or 'awe'}",                         None, 0),     # an expression, not a literal
    ("{'emotion': 'awe'\n}",                                      None, 2),     # the dictionary across lines
    ("Sure! {'emotion': 'amusement'",                             None, 0),     # no closing brace
    ('{"emotion": "Anger"}',                                      None, 1),
    ("The image evokes awe.",                                     None, 2),     # a lone class word
    ("emotion: awe",                                              None, 2),
    ("anger or awe, hard to say",                                 None, None),  # ambiguous
    ("",                                                          None, None),
]


@pytest.mark.parametrize("text, strict, lenient", PARSER_TABLE)
def test_each_parser_reads_the_answers_it_should(text, strict, lenient):
    assert parse_emotion(text, CLASSES, "strict") == strict
    assert parse_emotion(text, CLASSES, "lenient") == lenient


def test_lenient_reads_every_answer_strict_reads():
    assert all(lenient is not None for _, strict, lenient in PARSER_TABLE if strict is not None)


def test_strict_takes_the_class_with_its_case_as_written():
    classes = ["Negative", "Positive"]
    assert parse_emotion("{'emotion': 'Positive'}", classes, "strict") == 1
    assert parse_emotion("{'emotion': 'positive'}", classes, "strict") is None
    assert parse_emotion("{'emotion': 'positive'}", classes, "lenient") == 1


def test_split_sections():
    assert split_sections("1. Key elements: a dog in sun\n2. Reasoning: warm light") == \
        ("a dog in sun", "warm light")
    assert split_sections("**1. Key Elements:**\n- dog\n\n**2. Reasoning:**\nwarm") == ("- dog", "warm")
    assert split_sections("1. Key elements: a dog") is None
    assert split_sections("1. Key elements:\n2. Reasoning: warm") is None


def test_annotations_round_trip_and_broken_tail(tmp_path):
    path = tmp_path / "a.jsonl"
    records = [Annotation(f"ds/train/awe/{i}.png", "awe", f"key {i}", f"why {i}", "gpt-4o")
               for i in range(3)]
    with open(path, "a", encoding="utf-8") as fh:
        for record in records:
            append_annotation(fh, record)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"image": "ds/train/awe/9.png", "lab')  # interrupted write
    assert read_annotations(path) == records
    repair_tail(path)
    assert path.read_text().endswith("\n") and read_annotations(path) == records
    path.write_text(path.read_text().replace('"key 1"', "oops", 1))
    with pytest.raises(UserError, match=r"a.jsonl:2: not a valid annotation"):
        read_annotations(path)


def test_conversions_give_three_tasks():
    record = Annotation("ds/train/awe/1.png", "awe", "mountains at dawn", "vastness", "m")
    conv = to_conversations(record, CLASSES)
    assert list(conv) == ["observation", "reasoning", "categorical"]
    for messages in conv.values():
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[1]["content"][0] == {"type": "image"}
    assert conv["observation"][2]["content"][0]["text"] == "mountains at dawn"
    assert conv["reasoning"][2]["content"][0]["text"] == "vastness"
    assert conv["categorical"][2]["content"][0]["text"] == "{'emotion': 'awe'}"
    with pytest.raises(UserError, match="not one of"):
        to_conversations(Annotation("x.png", "joy", "a", "b", "m"), CLASSES)


def test_config_file_sets_defaults_command_line_wins(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 7\ndata_root: elsewhere\n")
    parser = base_parser("t", batch_size=4)
    args = parse_args(parser, ["--dataname", "x", "--config", str(config), "--seed", "3"])
    assert (args.seed, args.data_root, args.batch_size) == (3, "elsewhere", 4)
    config.write_text("sead: 7\n")
    with pytest.raises(UserError, match=r"unknown keys \['sead'\]"):
        parse_args(base_parser("t"), ["--dataname", "x", "--config", str(config)])


def test_config_values_are_checked_like_flags(tmp_path):
    parser = base_parser("t", batch_size=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--mode", choices=("score", "generate"), default="score")
    parser.add_argument("--modules", nargs="*", default=[])
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-4\nbatch_size: '8'\nmodules: lm_head\nskip_bad_images: true\n")  # YAML: '1e-4' a str
    args = parse_args(parser, ["--dataname", "x", "--config", str(config)])
    assert (args.lr, args.batch_size, args.modules, args.skip_bad_images) == (1e-4, 8, ["lm_head"], True)
    for text, message in [("mode: bogus\n", r"c.yaml: mode: 'bogus' is not one of score, generate"),
                          ("batch_size: four\n", r"c.yaml: batch_size: 'four' is not a valid int"),
                          ("batch_size: 2.5\n", r"batch_size: 2.5 is not a valid int"),
                          ("lr: [1, 2]\n", r"lr: expected a single value")]:
        config.write_text(text)
        with pytest.raises(UserError, match=message):
            parse_args(parser, ["--dataname", "x", "--config", str(config)])


def test_metrics_match_hand_counts(tmp_path):
    metrics = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, -1, 2], ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["unparseable"] == 1
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(0.5)
    # per-class F1 by hand: a (p 1, r 1/2), b (p 1/2, r 1/2), c (p 1, r 1)
    f1 = {"a": 2 * 1 * 0.5 / 1.5, "b": 0.5, "c": 1.0}
    assert metrics["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    write_metrics(tmp_path, metrics, "test")
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 5
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("damage, message", [
    (lambda saved: {**saved, "val": saved["val"] + saved["train"][:1]}, "listed in both train and val"),
    (lambda saved: {k: v for k, v in saved.items() if k != "val"}, "damaged (needs 'train' and 'val' lists"),
    (lambda saved: {**saved, "train": saved["train"] + saved["train"][:1]}, "is listed twice in train"),
    (None, "cannot be read (JSONDecodeError)"),
])
def test_a_persisted_split_is_validated_on_load(damage, message, tmp_path):
    root = make_tree(tmp_path, per_class=20)
    out = tmp_path / "out"
    load_dataset(root, "ds", out)
    split_file = out / "ds" / "split.json"
    if damage is None:
        split_file.write_text('{"train": [')
    else:
        split_file.write_text(json.dumps(damage(json.loads(split_file.read_text()))))
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_dataset(root, "ds", out)
    assert "delete it to re-split" in str(info.value) and "\n" not in str(info.value)


def test_a_class_left_without_validation_images_is_warned_about(tmp_path, caplog):
    root = make_tree(tmp_path, per_class=10)
    for path in sorted((root / "ds/train/awe").iterdir())[1:]:
        path.unlink()  # awe keeps one training image: none to spare
    splits = load_dataset(root, "ds", tmp_path / "out")
    assert not any(s.label == 1 for s in splits.val)
    assert "classes ['awe'] have too few training images" in caplog.text


def test_class_folders_in_other_unicode_forms_are_matched(tmp_path):
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    assert nfc != nfd
    for split, name in (("train", nfc), ("test", nfd)):
        for other in (name, "awe"):
            for i in range(3):
                draw(tmp_path / "ds" / split / other / f"{i}.png")
    splits = load_dataset(tmp_path, "ds", tmp_path / "out")
    assert splits.class_names == ["awe", nfc]
    assert sum(s.label == 1 for s in splits.test) == 3  # the NFD test folder is the same class
    for i in range(3):
        draw(tmp_path / "ds" / "train" / nfd / f"{i}.png")  # both spellings inside train/
    with pytest.raises(UserError, match="two spellings of one name"):
        load_dataset(tmp_path, "ds", tmp_path / "out2")


@pytest.mark.parametrize("labels", [[], [0], [0, 1, 2]])
def test_gate_on_too_few_validation_images_is_one_line(labels):
    import torch

    from engine.gate import GateData, gate_training_data

    def data(n):
        return GateData(vlm_pred=torch.zeros(n, dtype=torch.long), vlm_signal=torch.zeros(n, 3),
                        head_logits=torch.zeros(n, 3), labels=torch.tensor(labels[:n] if n else [], dtype=torch.long))

    with pytest.raises(UserError, match="--gate_train_split val: the .* cannot fill two halves"):
        gate_training_data({"train": data(0), "val": data(len(labels))}, "val", seed=0)


def test_torch_save_is_byte_identical_for_the_same_tensors(tmp_path):
    """Checkpoint ids (file hashes) must not change between runs that saved the same weights."""
    import torch

    from utils.io import torch_save

    state = {"weight": torch.arange(6.0).reshape(2, 3)}
    first, second = torch_save(state, tmp_path / "a.pt"), torch_save(state, tmp_path / "sub" / "a.pt")
    assert first.read_bytes() == second.read_bytes()
    assert torch.equal(torch.load(first, weights_only=True)["weight"], state["weight"])
