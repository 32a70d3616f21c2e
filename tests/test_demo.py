"""demo.py and engine/predict.py: the loaded parts reproduce stage 3's test predictions, the app
answers over HTTP with every field, and missing, mismatched or bad inputs give readable errors."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.pipeline import trained_pipeline  # noqa: F401  (session fixture)
from utils.errors import UserError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def predictor(trained_pipeline):  # noqa: F811
    from engine.predictor import EmoVLMKD

    return EmoVLMKD.from_outputs(trained_pipeline.output_dir, "toy", "cpu", str(trained_pipeline.vlm_model))


@pytest.fixture(scope="module")
def test_images(trained_pipeline):  # noqa: F811
    from data.datasets import load_dataset

    splits = load_dataset(trained_pipeline.data_root, "toy", trained_pipeline.output_dir)
    return splits, [splits.absolute(sample) for sample in splits.test]


def test_predictions_match_stage3_evaluation(predictor, test_images, trained_pipeline):  # noqa: F811
    from data.datasets import open_image
    from utils.metrics import classification_metrics

    splits, paths = test_images
    results = predictor.predict_batch([open_image(path) for path in paths])
    for result in results:
        for key in ("vlm_probs", "head_probs", "final_probs"):
            assert list(result[key]) == splits.class_names
            assert sum(result[key].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["final_label"] == max(result["final_probs"], key=result["final_probs"].get)
        assert result["head_label"] == max(result["head_probs"], key=result["head_probs"].get)
    # Same confusion matrices as stage 3's evaluation on the same 32 test images, per module.
    metrics = json.loads((trained_pipeline.stage("gate") / "metrics.json").read_text())
    labels = [sample.label for sample in splits.test]
    index = {name: i for i, name in enumerate(splits.class_names)}
    for key, expected in (("final_label", metrics["gates"][metrics["gate"]]), ("head_label", metrics["head"]),
                          ("vlm_label", metrics["vlm"])):
        pred = [index.get(result[key], -1) for result in results]
        assert classification_metrics(labels, pred, splits.class_names)["confusion_matrix"] \
            == expected["confusion_matrix"], key
    assert predictor.gate_name == metrics["gate"]

    # Per image, every module's probabilities equal stage 3's: the gate on the cached VLM answers
    # and on the head's logits over stage 2's cached features.
    stage3 = stage3_test_outputs(trained_pipeline)
    for i, result in enumerate(results):
        for key, expected in stage3.items():
            assert list(result[key].values()) == pytest.approx(expected[i].tolist(), abs=1e-5), (key, paths[i])
    assert predictor.feature_dtype == torch.float32  # as recorded in distill/meta.json

    one = predictor.predict(open_image(paths[0]), max_new_tokens=12, explain=True)
    assert one["final_probs"] == pytest.approx(results[0]["final_probs"])
    for key in ("observation", "reasoning"):  # generated with the trained observation/reasoning prompts
        assert isinstance(one[key], str) and one[key]
        assert len(predictor.processor.tokenizer(one[key])["input_ids"]) <= 12 + 2


def stage3_test_outputs(pipeline) -> dict[str, torch.Tensor]:  # noqa: F811
    """Class probabilities per test image as stage 3 computed them, from its caches and gate.pt."""
    from models.gates import head_gate_inputs, load_gate, vlm_gate_inputs
    from models.heads import head_logits, load_head
    from models.scorer import VLMPredictions

    gate, meta = load_gate(pipeline.stage("gate"))
    head, _ = load_head(pipeline.stage("distill"))
    features = torch.load(pipeline.stage("distill") / "cache" / "vlm_features_test.pt", weights_only=True)["values"]
    answers = torch.load(pipeline.stage("gate") / "cache" / f"vlm_{meta['vlm_answer']}_test.pt",
                         weights_only=True)["values"]
    answers = VLMPredictions(**answers)
    logits = head_logits(head, features)
    with torch.no_grad():
        final = gate(vlm_gate_inputs(answers, meta["num_classes"], meta["vlm_signal"]),
                     head_gate_inputs(logits, meta.get("head_signal", "logits")))
    return {"vlm_probs": answers.probs, "head_probs": logits.softmax(-1), "final_probs": final.softmax(-1)}


def test_head_features_use_the_dtype_of_stage2s_cache(tiny_vlm_dir, test_images):
    """A checkpoint stored in bf16 loads in bf16, while stage 2 encoded it in float32 on CPU: the
    demo must encode in the recorded dtype to get stage 2's features, and leave the model as it was."""
    from data.datasets import open_image
    from models.vlm import head_features
    from models.backbones import visual_modules
    from models.vlm import load_processor, load_vlm, pooled_image_features

    model, processor = load_vlm(str(tiny_vlm_dir)), load_processor(str(tiny_vlm_dir))
    with torch.no_grad():
        for parameter in model.parameters():  # weights a bf16 checkpoint can hold exactly
            parameter.copy_(parameter.bfloat16().float())
    images = [open_image(path) for path in test_images[1][:4]]
    cached = pooled_image_features(model, processor, images)  # stage 2: float32 on CPU
    model.to(torch.bfloat16)                                   # the demo: the checkpoint's own dtype
    assert torch.allclose(head_features(model, processor, images, torch.float32), cached, atol=1e-6)
    assert all(next(m.parameters()).dtype == torch.bfloat16 for m in visual_modules(model))  # restored
    assert not torch.allclose(head_features(model, processor, images), cached, atol=1e-6)  # bf16 differs


@pytest.mark.parametrize("recorded", ["probs", None])
def test_the_gate_gets_the_head_signal_gate_pt_records(recorded, trained_pipeline, test_images, tmp_path):  # noqa: F811
    """A gate trained on the head's softmax (--head_signal probs) is fed the softmax by the demo and
    predict.py; a gate.pt without the key was trained on the logits."""
    from data.datasets import open_image
    from engine.predictor import EmoVLMKD
    from models.gates import load_gate, vlm_gate_inputs
    from models.scorer import VLMPredictions

    out = _copy_outputs(trained_pipeline, tmp_path)
    path = out / "toy" / "gate" / "gate.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["head_signal"] == "logits"  # stage 3's default
    if recorded is None:
        del checkpoint["head_signal"]
    else:
        checkpoint["head_signal"] = recorded
    _save_gate(checkpoint, path)
    predictor = EmoVLMKD.from_outputs(out, "toy", "cpu", str(trained_pipeline.vlm_model))
    assert predictor.head_signal == (recorded or "logits")
    images = [open_image(p) for p in test_images[1][:4]]
    results = predictor.predict_batch(images)
    gate, meta = load_gate(path)
    answers = torch.load(trained_pipeline.stage("gate") / "cache" / "vlm_score_test.pt", weights_only=True)["values"]
    signal = vlm_gate_inputs(VLMPredictions(**answers), meta["num_classes"], meta["vlm_signal"])[:4]
    head_probs = torch.tensor([list(result["head_probs"].values()) for result in results])
    final = torch.tensor([list(result["final_probs"].values()) for result in results])
    on_logits = stage3_test_outputs(trained_pipeline)["final_probs"][:4]  # stage 3's gate on the head's logits
    if recorded is None:
        assert torch.allclose(final, on_logits, atol=1e-5)
    else:
        with torch.no_grad():
            on_probs = gate(signal, head_probs).softmax(-1)
        assert torch.allclose(final, on_probs, atol=1e-5) and not torch.allclose(final, on_logits, atol=1e-3)


@pytest.mark.parametrize("recorded, override, dtype", [
    ("fp32", None, torch.float32),  # stage 3's default, the reference code's precision, as gate.pt records
    (None, None, None),  # a gate.pt from before vlm_dtype was recorded: the checkpoint's own dtype, as then
    ("fp32", "bf16", torch.bfloat16),  # the demo's and predict.py's --vlm_dtype
])
def test_the_vlm_loads_as_gate_pt_records(recorded, override, dtype, trained_pipeline, tmp_path,  # noqa: F811
                                          monkeypatch):
    import engine.predictor
    from engine.predictor import EmoVLMKD

    out = _copy_outputs(trained_pipeline, tmp_path)
    path = out / "toy" / "gate" / "gate.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert (checkpoint["quant"], checkpoint["vlm_dtype"]) == ("none", "fp32")  # stage 3's defaults
    if recorded is None:
        del checkpoint["vlm_dtype"]
        _save_gate(checkpoint, path)
    calls = []
    original = engine.predictor.load_trained_vlm
    monkeypatch.setattr(engine.predictor, "load_trained_vlm", lambda *a: calls.append(a[3:]) or original(*a))
    predictor = EmoVLMKD.from_outputs(out, "toy", vlm_dtype=override)
    assert calls == [(None, dtype)]  # quant None: as stage 1 trained it, here in full precision as recorded
    stored = json.loads((Path(str(trained_pipeline.vlm_model)) / "config.json").read_text())["dtype"]
    assert next(predictor.model.parameters()).dtype == (dtype or getattr(torch, stored))


def test_gate_weights_are_reported_for_gates_that_expose_them(predictor, test_images):
    from data.datasets import open_image
    from engine.predictor import EmoVLMKD
    from models.gates import build_gate

    torch.manual_seed(0)
    moe = EmoVLMKD(predictor.model, predictor.processor, predictor.head, build_gate("moe", 4),
                   predictor.class_names, "moe", feature_processor=predictor.feature_processor)
    result = moe.predict(open_image(test_images[1][0]), explain=False)
    assert set(result["gate_weights"]) == {"expert_0", "expert_1", "expert_2"}
    assert sum(result["gate_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["observation"] is None
    saved = predictor.predict(open_image(test_images[1][0]), explain=False)["gate_weights"]
    assert (saved is None) == (not hasattr(predictor.gate, "forward_with_weights"))


def test_app_over_http_returns_every_field(predictor, test_images, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    import demo
    from data.datasets import open_image

    _, paths = test_images
    app = demo.build_app(predictor, examples=[str(paths[0])], max_new_tokens=8)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        outputs = client.predict(handle_file(str(paths[0])), api_name="/predict")
        assert len(outputs) == len(demo.OUTPUT_FIELDS)
        fields = dict(zip(demo.OUTPUT_FIELDS, outputs))
        expected = predictor.predict(open_image(paths[0]), max_new_tokens=8)
        assert fields["vlm_answer"].startswith(expected["vlm_answer"])
        assert fields["observation"] == expected["observation"]
        assert fields["reasoning"] == expected["reasoning"]
        for key, label in (("vlm_probs", expected["vlm_label"]), ("head_probs", expected["head_label"]),
                           ("final_probs", expected["final_label"])):
            assert fields[key]["label"] == label
            shown = {row["label"]: row["confidence"] for row in fields[key]["confidences"]}
            assert shown == pytest.approx(expected[key])

        not_image = tmp_path / "notes.png"
        not_image.write_text("not an image")
        with pytest.raises(AppError, match="not an image that can be decoded"):
            client.predict(handle_file(str(not_image)), api_name="/predict")
    finally:
        app.close()


def test_upload_checks(tmp_path):
    from engine.predictor import open_upload

    text = tmp_path / "a.jpg"
    text.write_text("hello")
    with pytest.raises(UserError, match="a.jpg: not an image"):
        open_upload(text)
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(huge)  # 72 MP, a small file: refused from its header
    with pytest.raises(UserError, match="9000x8000 pixels"):
        open_upload(huge, max_pixels=64_000_000)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (300, 100), "red").save(wide)
    image = open_upload(wide, max_image_side=60)
    assert image.size == (60, 20) and image.mode == "RGB"


def _copy_outputs(pipeline, tmp_path) -> Path:
    out = tmp_path / "outputs"
    shutil.copytree(pipeline.output_dir / "toy", out / "toy",
                    ignore=shutil.ignore_patterns("cache", "trainer", "*.png"))
    return out


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _save_gate(checkpoint: dict, path: Path) -> None:
    """An edited ``gate.pt``, with its id in gate/meta.json as stage 3 records it (otherwise the
    predictor refuses it as damaged before reading it)."""
    from utils.checkpoints import file_id

    torch.save(checkpoint, path)
    _edit_json(path.parent / "meta.json", gate_id=file_id(path))


@pytest.mark.parametrize("damage, command", [
    ("no_vlm", "train_vlm.py"),
    ("no_gate", "train_gate.py"),
    ("distill_classes", "train_distillation.py"),
    ("distill_backbone", "train_distillation.py"),
    ("gate_classes", "train_gate.py"),
    ("gate_stale_head", "train_gate.py"),
    ("gate_stale_adapter", "train_gate.py"),
    ("gate_without_format", "train_gate.py"),
])
def test_missing_or_mismatched_parts_name_the_stage(trained_pipeline, tmp_path, damage, command):  # noqa: F811
    from engine.predictor import EmoVLMKD

    out = _copy_outputs(trained_pipeline, tmp_path)
    stage = out / "toy"
    if damage == "no_vlm":
        shutil.rmtree(stage / "vlm")
    elif damage == "no_gate":
        (stage / "gate" / "gate.pt").unlink()
    elif damage == "distill_classes":
        _edit_json(stage / "distill" / "meta.json", class_names=["a", "b", "c", "d"])
    elif damage == "distill_backbone":
        _edit_json(stage / "distill" / "meta.json", base_model="Qwen/Qwen2-VL-7B-Instruct")
    elif damage == "gate_without_format":  # an older gate.pt: its keys may mean something else
        checkpoint = torch.load(stage / "gate" / "gate.pt", weights_only=True)
        del checkpoint["format_version"]
        _save_gate(checkpoint, stage / "gate" / "gate.pt")
    else:
        checkpoint = torch.load(stage / "gate" / "gate.pt", weights_only=True)
        key, value = {"gate_classes": ("class_names", ["a", "b", "c", "d"]),
                      "gate_stale_head": ("head_id", "0" * 12),
                      "gate_stale_adapter": ("adapter_id", "0" * 12)}[damage]
        _save_gate({**checkpoint, key: value}, stage / "gate" / "gate.pt")
    with pytest.raises(UserError, match=command):
        EmoVLMKD.from_outputs(out, "toy")


@pytest.mark.parametrize("damage", ["no_gate", "format_missing", "format_unknown"])
def test_cli_error_is_one_line(damage, trained_pipeline, tmp_path, capsys, monkeypatch):  # noqa: F811
    import demo
    from utils.errors import run_cli

    out = _copy_outputs(trained_pipeline, tmp_path)
    path = out / "toy" / "gate" / "gate.pt"
    found = {"no_gate": "no gate.pt (stage 3 did not finish)", "format_missing": "gate.pt: no format_version",
             "format_unknown": "gate.pt: format_version 99, but this code reads 1"}[damage]
    if damage == "no_gate":
        path.unlink()
    else:  # a gate.pt of an older (no format_version) or a newer (99) version of this code
        checkpoint = torch.load(path, weights_only=True)
        checkpoint.pop("format_version")
        _save_gate(checkpoint if damage == "format_missing" else {"format_version": 99, **checkpoint}, path)
    monkeypatch.setattr(demo, "build_app", lambda *a, **k: pytest.fail("the app must not start"))
    code = run_cli(demo.main, ["--dataname", "toy", "--output_dir", str(out)], parse=demo.parse)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and found in err[0], err
    assert "python train_gate.py --dataname toy" in err[0], err


def test_head_features_ignore_an_adapter_on_the_vision_tower(tiny_vlm_dir, test_images):
    from peft import LoraConfig, get_peft_model

    from models.vlm import head_features
    from models.vlm import load_processor, load_vlm, pooled_image_features

    images = [Image.open(path).convert("RGB") for path in test_images[1][:2]]
    processor = load_processor(str(tiny_vlm_dir))
    base = pooled_image_features(load_vlm(str(tiny_vlm_dir)), processor, images)
    torch.manual_seed(0)  # init_lora_weights=False: random, non-zero LoRA weights on the vision attention
    adapted = get_peft_model(load_vlm(str(tiny_vlm_dir)), LoraConfig(target_modules=["qkv"], init_lora_weights=False))
    assert not torch.allclose(pooled_image_features(adapted, processor, images), base)
    torch.testing.assert_close(head_features(adapted, processor, images), base)
    assert not torch.allclose(pooled_image_features(adapted, processor, images), base)  # adapter back on


@pytest.mark.parametrize("flag", ["--max_new_tokens", "--max_image_side", "--max_upload_pixels"])
def test_counts_below_one_are_one_line_errors(flag, tmp_path, capsys):
    import demo
    from utils.errors import run_cli

    assert run_cli(demo.main, ["--dataname", "toy", "--output_dir", str(tmp_path), flag, "0"], parse=demo.parse) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {flag} must be at least 1 (got 0)"]


def test_importing_the_demo_changes_nothing_until_gradio_is_needed():
    """No import-time side effect: gradio's analytics switch is set only when the app needs gradio,
    and then before gradio is imported."""
    check = ("import os, sys; import demo as demo; "
             "assert 'GRADIO_ANALYTICS_ENABLED' not in os.environ and 'gradio' not in sys.modules; "
             "demo._gradio(); assert os.environ['GRADIO_ANALYTICS_ENABLED'] == 'False'")
    env = {key: value for key, value in os.environ.items() if key != "GRADIO_ANALYTICS_ENABLED"}
    subprocess.run([sys.executable, "-c", check], check=True, env=env, cwd=Path(__file__).parent.parent)
