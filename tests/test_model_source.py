"""demo.py and predict.py load their model through one classmethod, ``EmoVLMKD.from_args``: an
export with --model, else --dataname's stage folders (engine/predictor.py). No model is loaded
here: the loaders are replaced by recorders."""
from __future__ import annotations

import pytest
from PIL import Image

from engine.predictor import EmoVLMKD
from utils.errors import UserError, run_cli


class Loaded(Exception):
    """Raised by the recording stand-in: the script got as far as loading its model."""


@pytest.fixture
def loaders(monkeypatch):
    """``EmoVLMKD.from_pretrained`` and ``from_outputs`` replaced by recorders of their arguments."""
    calls = []
    monkeypatch.setattr(EmoVLMKD, "from_pretrained", classmethod(
        lambda cls, *a: calls.append(("from_pretrained", *a)) or "export"))
    monkeypatch.setattr(EmoVLMKD, "from_outputs", classmethod(
        lambda cls, *a: calls.append(("from_outputs", *a)) or "stages"))
    return calls


def test_from_args_picks_the_export_or_the_stage_folders(loaders):
    import predict

    args = predict.parse(["--model", "exports/m", "--images", "x", "--out", "p.jsonl", "--quant", "none"])
    assert EmoVLMKD.from_args(args, "cpu") == "export"
    args = predict.parse(["--dataname", "toy", "--output_dir", "outs", "--images", "x", "--out", "p.jsonl",
                          "--vlm_model", "base", "--vlm_dtype", "bf16"])
    assert EmoVLMKD.from_args(args, "cuda:1") == "stages"
    # --model wins over --dataname (whose test images the demo still offers as examples).
    args = predict.parse(["--dataname", "toy", "--model", "exports/m", "--images", "x", "--out", "p.jsonl"])
    assert EmoVLMKD.from_args(args) == "export"
    assert loaders == [("from_pretrained", "exports/m", "cpu", None, "none", None),
                       ("from_outputs", "outs", "toy", "cuda:1", "base", None, "bf16"),
                       ("from_pretrained", "exports/m", "cpu", None, None, None)]
    args.model = args.dataname = None
    with pytest.raises(UserError, match="give --dataname .* or --model"):
        EmoVLMKD.from_args(args)


@pytest.fixture
def through_from_args(monkeypatch):
    """``EmoVLMKD.from_args`` replaced by a recorder that stops the script there."""
    calls = []

    def record(cls, args, device="cpu"):
        calls.append((args.model, args.dataname, str(device)))
        raise Loaded

    monkeypatch.setattr(EmoVLMKD, "from_args", classmethod(record))
    return calls


@pytest.mark.parametrize("source", [["--model", "exports/m"], ["--dataname", "toy"]], ids=["model", "dataname"])
def test_predict_py_loads_through_from_args(loaders, through_from_args, tmp_path, source):
    import predict

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.png")
    args = predict.parse([*source, "--output_dir", str(tmp_path), "--images", str(photos),
                          "--out", str(tmp_path / "p.jsonl")])
    with pytest.raises(Loaded):
        predict.main(args)
    assert through_from_args == [(args.model, args.dataname, "cpu")] and loaders == []


@pytest.mark.parametrize("source", [["--model", "exports/m"], ["--dataname", "toy"]], ids=["model", "dataname"])
def test_demo_py_loads_through_from_args(loaders, through_from_args, tmp_path, source):
    import demo

    args = demo.parse([*source, "--output_dir", str(tmp_path), "--data_root", str(tmp_path)])
    with pytest.raises(Loaded):
        demo.main(args)
    assert through_from_args == [(args.model, args.dataname, "cpu")] and loaders == []


def test_neither_flag_is_one_line_before_any_work(through_from_args, tmp_path, capsys):
    import demo
    import predict

    assert run_cli(predict.main, ["--images", str(tmp_path / "none"), "--out", str(tmp_path / "p.jsonl")],
                   parse=predict.parse) == 2
    assert run_cli(demo.main, [], parse=demo.parse) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("give --dataname" in line and "--model" in line for line in errors)
    assert through_from_args == [] and not (tmp_path / "p.jsonl").exists()
