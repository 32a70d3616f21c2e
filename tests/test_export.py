"""An export of a finished run (engine/export.py): one folder that loads to the same predictions,
a Hub model card, refusals in one line, and the push with huggingface_hub mocked at its boundary."""
import json
import shutil

import pytest
import yaml

from data.datasets import load_dataset, open_image
import engine.export
from engine.predictor import EXPORT_FILE, EmoVLMKD
from tests.pipeline import finished, trained_pipeline  # noqa: F401  (fixtures)
from utils.errors import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def export_cli(run, out, *extra):
    return run_cli(engine.export.main, ["--output_dir", str(run.output_dir), "--dataname", "toy",
                                        "--out", str(out), "--license", "apache-2.0", *extra])


@pytest.fixture(scope="module")
def exported(trained_pipeline, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("exports") / "emovlm-kd-toy"
    assert export_cli(trained_pipeline, out) == 0
    return out


def card_header(folder):
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_export_holds_every_part_and_the_records_that_tie_them(exported, trained_pipeline):  # noqa: F811
    for rel in ("vlm/adapter_model.safetensors", "vlm/adapter_config.json", "vlm/meta.json", "vlm/tokenizer.json",
                "distill/head.pt", "distill/meta.json", "gate/gate.pt", "gate/meta.json", "metrics.json",
                "table.md", "class_names.json", "figures/gate_confusion_matrix.png",
                "figures/distill_confusion_matrix.png", "figures/vlm_eval_score_confusion_matrix.png"):
        assert (exported / rel).is_file(), rel
    assert not (exported / "teacher").exists()  # only with --with_teacher
    assert not list((exported / "gate").glob("gate_*.pt")) and not (exported / "gate" / "cache").exists()
    record = json.loads((exported / EXPORT_FILE).read_text())
    vlm = json.loads((trained_pipeline.stage("vlm") / "meta.json").read_text())
    distill = json.loads((trained_pipeline.stage("distill") / "meta.json").read_text())
    assert record["dataname"] == "toy" and record["class_names"] == vlm["class_names"]
    assert (record["base_model"], record["adapter_id"]) == (vlm["base_model"], vlm["adapter_id"])
    assert (record["head_id"], record["feature_dtype"], record["feature_pre_resize"]) == \
        (distill["head_id"], distill["feature_dtype"], distill["pre_resize"])
    assert (record["min_pixels"], record["max_pixels"]) == (vlm["min_pixels"], vlm["max_pixels"])
    assert json.loads((exported / "class_names.json").read_text()) == vlm["class_names"]


def test_model_card_is_in_the_hubs_format(exported):
    meta, text = card_header(exported)
    metrics = json.loads((exported / "metrics.json").read_text())
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "image-classification"
    assert "base_model" not in meta  # the tiny VLM is a local folder, not a hub id
    assert meta["datasets"] == ["toy"] and "emovlm-kd" in meta["tags"]
    results = meta["model-index"][0]["results"][0]
    values = {m["name"]: m["value"] for m in results["metrics"]}
    assert values["VLM (stage 1) accuracy"] == round(metrics["vlm"]["accuracy"], 4)
    assert values["distilled head (stage 2) accuracy"] == round(metrics["head"]["accuracy"], 4)
    gate = metrics["gate"]
    assert values[f"EmoVLM-KD ({gate} gate) accuracy"] == round(metrics["gates"][gate]["accuracy"], 4)
    for heading in ("## Results", "## How to load it", "## Training settings", "## Data", "## Limitations"):
        assert heading in text
    assert "95% interval" in text and "from_pretrained" in text


def test_hub_base_model_id_goes_into_the_card():
    meta = engine.export.card_metadata("x", "mit", {"dataname": "FI", "base_model": "Qwen/Qwen2-VL-7B-Instruct"},
                                       {"vlm": {"accuracy": 0.7}})
    assert meta["base_model"] == "Qwen/Qwen2-VL-7B-Instruct" and meta["license"] == "mit"


def test_export_predicts_as_the_stage_folders_image_by_image(exported, trained_pipeline):  # noqa: F811
    vlm_model = str(trained_pipeline.vlm_model)
    staged = EmoVLMKD.from_outputs(trained_pipeline.output_dir, "toy", "cpu", vlm_model)
    loaded = EmoVLMKD.from_pretrained(exported, "cpu")  # the base from the recorded path
    splits = load_dataset(trained_pipeline.data_root, "toy", trained_pipeline.output_dir)
    images = [open_image(splits.absolute(sample)) for sample in splits.test[:8]]
    for image in images:
        assert loaded.predict(image, explain=False) == staged.predict(image, explain=False)


def test_reexport_replaces_an_export_and_teacher_is_optional(finished, tmp_path):  # noqa: F811
    out = tmp_path / "export"
    assert export_cli(finished, out) == 0
    (out / "stale.txt").write_text("from the first export")
    assert export_cli(finished, out, "--with_teacher") == 0
    assert (out / "teacher" / "teacher.pt").is_file() and not (out / "stale.txt").exists()
    assert json.loads((out / EXPORT_FILE).read_text())["teacher_included"] is True
    assert not list(tmp_path.glob(".export.*"))  # no staging or old folder left


def test_out_that_is_not_an_export_is_refused_untouched(trained_pipeline, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert export_cli(trained_pipeline, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an export" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".mine.*"))


@pytest.mark.parametrize("stage,damage,command", [
    ("gate", lambda d: (d / "gate.pt").unlink(), "train_gate.py"),
    ("vlm", lambda d: shutil.rmtree(d), "train_vlm.py"),
    ("vlm", lambda d: (d / "adapter_model.safetensors").write_bytes(b"x"), "train_vlm.py"),
    ("distill", lambda d: (d / "head.pt").unlink(), "train_distillation.py"),
])
def test_missing_or_inconsistent_stage_names_the_stage_to_rerun(finished, tmp_path, capsys,  # noqa: F811
                                                                 stage, damage, command):
    damage(finished.stage(stage))
    out = tmp_path / "export"
    assert export_cli(finished, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and command in err
    assert not out.exists() and not list(tmp_path.glob(".export.*"))


def test_from_pretrained_refuses_a_folder_that_is_not_an_export(tmp_path):
    from utils.errors import UserError

    with pytest.raises(UserError, match="not an EmoVLM-KD export"):
        EmoVLMKD.from_pretrained(tmp_path)


def test_from_pretrained_downloads_a_hub_repo_id(exported, trained_pipeline, monkeypatch):  # noqa: F811
    """A name that is no folder is a Hub repo id: huggingface_hub's snapshot_download (mocked at its
    boundary: no network here) fetches it, and the download predicts as the export itself."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: calls.append(kw) or str(exported))
    loaded = EmoVLMKD.from_pretrained("someone/emovlm-kd-toy", "cpu")
    assert calls == [{"repo_id": "someone/emovlm-kd-toy", "repo_type": "model"}]
    local = EmoVLMKD.from_pretrained(exported, "cpu")
    splits = load_dataset(trained_pipeline.data_root, "toy", trained_pipeline.output_dir)
    for sample in splits.test[:4]:
        image = open_image(splits.absolute(sample))
        assert loaded.predict(image, explain=False) == local.predict(image, explain=False)


def test_model_name_neither_folder_nor_reachable_repo_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from utils.errors import UserError

    with pytest.raises(UserError, match="not a Hub repo id") as bad:
        EmoVLMKD.from_pretrained(tmp_path / "no" / "such--export")
    assert len(str(bad.value).splitlines()) == 1
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="someone/absent-export") as absent:
        EmoVLMKD.from_pretrained("someone/absent-export")
    assert len(str(absent.value).splitlines()) == 1


def test_push_to_hub_uploads_the_export_folder(trained_pipeline, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_written")
    out = tmp_path / "export"
    assert export_cli(trained_pipeline, out, "--push_to_hub", "someone/emovlm-kd-toy", "--private") == 0
    (create, repo, create_kw), (upload, repo2, upload_kw) = calls
    assert (create, repo, create_kw["private"], create_kw["repo_type"]) == ("create", "someone/emovlm-kd-toy",
                                                                              True, "model")
    assert (upload, repo2, upload_kw["folder_path"]) == ("upload", "someone/emovlm-kd-toy", str(out))
    assert "token" not in create_kw and "token" not in upload_kw  # huggingface_hub reads HF_TOKEN itself
    assert not any("hf_secret" in p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file())


def test_push_without_a_connection_is_one_line_and_keeps_the_export(trained_pipeline, tmp_path, monkeypatch,  # noqa: F811
                                                                      capsys):
    """No mock: huggingface_hub's own client, pointed at a closed local port, fails to connect."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    out = tmp_path / "export"
    assert export_cli(trained_pipeline, out, "--push_to_hub", "someone/emovlm-kd-toy") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not reach the Hub" in err and "Traceback" not in err
    assert (out / "export.json").is_file()  # the export was written before the push and is kept


def test_invalid_repo_id_is_one_line_before_any_work(trained_pipeline, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "export"
    assert export_cli(trained_pipeline, out, "--push_to_hub", "not/a/repo--id") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--push_to_hub" in err and not out.exists()


def test_predict_py_model_flag_gives_the_stage_folders_records(exported, trained_pipeline, tmp_path):  # noqa: F811
    import predict

    splits = load_dataset(trained_pipeline.data_root, "toy", trained_pipeline.output_dir)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, sample in enumerate(splits.test[:4]):
        shutil.copyfile(splits.absolute(sample), photos / f"{i}{splits.absolute(sample).suffix}")
    common = ["--images", str(photos), "--batch_size", "4"]
    staged, loaded = tmp_path / "staged.jsonl", tmp_path / "export.jsonl"
    assert run_cli(predict.main, ["--dataname", "toy", "--output_dir", str(trained_pipeline.output_dir),
                                  "--vlm_model", str(trained_pipeline.vlm_model), "--out", str(staged), *common],
                   parse=predict.parse) == 0
    assert run_cli(predict.main, ["--model", str(exported), "--out", str(loaded), *common], parse=predict.parse) == 0
    rows = [sorted(map(json.loads, path.read_text().splitlines()), key=lambda r: json.dumps(r, sort_keys=True))
            for path in (staged, loaded)]
    assert len(rows[0]) == 4 and rows[0] == rows[1]


def test_merge_gives_the_logits_of_base_plus_adapter(exported, trained_pipeline, tmp_path):  # noqa: F811
    import torch
    from transformers import AutoModelForImageTextToText

    from models.vlm import load_vlm

    merged_dir = engine.export.merge_vlm(exported / "vlm", tmp_path / "merged")
    assert (merged_dir / "config.json").is_file() and list(merged_dir.glob("*.safetensors"))
    assert not (merged_dir / "adapter_config.json").exists()  # a plain transformers folder
    adapted = load_vlm(str(trained_pipeline.vlm_model), "cpu", adapter=exported / "vlm")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    base = AutoModelForImageTextToText.from_pretrained(trained_pipeline.vlm_model).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, plain = (model(input_ids=ids).logits for model in (adapted, merged, base))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-2)  # the adapter changes them: the check has teeth


def test_demo_model_flag_loads_an_export(exported, monkeypatch, tmp_path, capsys):
    import demo

    served = []

    class App:
        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            served.append(kwargs)

    monkeypatch.setattr(demo, "build_app", lambda predictor, examples, *rest, **options:
                        served.append((predictor, examples)) or App())
    assert run_cli(demo.main, ["--model", str(exported)], parse=demo.parse) == 0
    (predictor, examples), _ = served
    assert predictor.class_names == json.loads((exported / "class_names.json").read_text()) and examples == []
    assert run_cli(demo.main, ["--model", str(tmp_path)], parse=demo.parse) == 2
    assert "not an EmoVLM-KD export" in capsys.readouterr().err
    assert run_cli(demo.main, [], parse=demo.parse) == 2
    assert "--model" in capsys.readouterr().err.strip().splitlines()[-1]
