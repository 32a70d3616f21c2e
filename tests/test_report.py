"""The results report built from metrics.json files."""
import pytest

from utils.errors import UserError
from utils.io import write_json
from utils.report import build_report


def metric(acc, f1):
    return {"accuracy": acc, "macro_f1": f1}


def test_report_lists_every_row_with_paper_numbers(tmp_path):
    write_json(tmp_path / "FI/gate/metrics.json", {
        "vlm": metric(0.7, 0.6), "head": metric(0.65, 0.6), "teacher": metric(0.6, 0.55),
        "gates": {"concat_linear": metric(0.8, 0.75), "moe": metric(0.78, 0.7)},
        "gate": "concat_linear"})
    (tmp_path / "FI/gate/confusion_matrix.png").write_bytes(b"png")
    text = build_report(tmp_path)
    assert "| FI | VLM | 70.00 | 60.00 | 71.19 |" in text
    assert "| FI | distill module | 65.00 | 60.00 |  |" in text
    assert "| FI | teacher | 60.00 | 55.00 | 68.86 |" in text
    assert "| FI | EmoVLM-KD (concat_linear) * | 80.00 | 75.00 | 79.51 |" in text
    assert "| FI | EmoVLM-KD (moe) | 78.00 | 70.00 |  |" in text
    assert "[gate/confusion_matrix.png](FI/gate/confusion_matrix.png)" in text


def test_report_without_results_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match="run train_gate.py first"):
        build_report(tmp_path)
    with pytest.raises(UserError, match="python train_gate.py --dataname emoset"):
        build_report(tmp_path, ["emoset"])


# ---------------------------------------------------------------- ablation tables (fabricated runs)

def fake_head(root, depth, alpha, accuracy, default=False):
    """Stage 2's kept run ``depth=D,alpha=A,seed=42`` (meta.json, metrics.json); also the
    top-level default head when ``default``."""
    from utils.records import DistillRecord
    from utils.sweeps import run_name

    name = run_name(depth, alpha, 42)
    record = DistillRecord(class_names=["a", "b"], base_model="tiny", head_id=f"id-{name}", run=name,
                           depth=depth, alpha=alpha, seed=42)
    folder = root / "distill" / "runs" / name
    record.write(folder)
    write_json(folder / "metrics.json", {"accuracy": accuracy})
    if default:
        record.write(root / "distill")
    return record


def fake_gate_run(root, head, seed, gates: dict, selected: str):
    """Stage 3's kept run of ``gates`` ({name: test accuracy}) on ``head``, ``selected`` chosen."""
    write_json(root / "gate" / "runs" / head.run / f"seed={seed}" / "metrics.json", {
        "head_id": head.head_id, "head_run": head.run, "gate": selected,
        "gates": {name: metric(acc, acc) for name, acc in gates.items()}})


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| depth", "| alpha", "| gate"))]


def test_depth_ablation_compares_the_papers_gate_on_every_row(tmp_path):
    """`--gate all` on the default head selects MoE (best on validation); `concat_linear` on
    depths 2 and 3: the EmoVLM-KD column is concat_linear on every row, MoE only in the gate table."""
    from utils.ablation import build_ablation

    root = tmp_path / "FI"
    default = fake_head(root, 1, 0.5, 0.60, default=True)
    fake_gate_run(root, default, 0, {"concat_linear": 0.70, "bilinear": 0.72, "moe": 0.90}, selected="moe")
    fake_gate_run(root, default, 1, {"concat_linear": 0.74, "bilinear": 0.71, "moe": 0.91}, selected="moe")
    for depth, acc in ((2, 0.66), (3, 0.68)):
        fake_gate_run(root, fake_head(root, depth, 0.5, acc - 0.1), 0, {"concat_linear": acc}, "concat_linear")
    fake_gate_run(root, fake_head(root, 4, 0.5, 0.5), 0, {"moe": 0.95}, "moe")  # no concat_linear gate

    rows = table_rows(build_ablation(tmp_path, ["FI"], "depth"))
    assert [row[0] for row in rows] == ["1 *", "2", "3", "4"]
    assert rows[0][2] == "72.00 ± 2.83 (n=2)"  # concat_linear's 70 and 74, not MoE's 90 and 91
    assert rows[1][2] == "66.00" and rows[2][2] == "68.00"
    assert rows[3] == ["4", "50.00", "not run"]
    gates = {row[0]: row[1] for row in table_rows(build_ablation(tmp_path, ["FI"], "gate"))}
    assert gates["moe"] == "90.50 ± 0.71 (n=2)" and gates["concat_linear *"] == "72.00 ± 2.83 (n=2)"


def test_alpha_ablation_compares_the_papers_gate_on_every_row(tmp_path):
    from utils.ablation import build_ablation

    root = tmp_path / "FI"
    default = fake_head(root, 1, 0.5, 0.60, default=True)
    fake_gate_run(root, default, 0, {"concat_linear": 0.70, "dynamic_weight": 0.85}, selected="dynamic_weight")
    fake_gate_run(root, fake_head(root, 1, 0.0, 0.5), 0, {"concat_linear": 0.64}, "concat_linear")
    fake_head(root, 1, 1.0, 0.55)  # no gate run
    text = build_ablation(tmp_path, ["FI"], "alpha")
    assert table_rows(text) == [["0", "50.00", "64.00"], ["0.5 *", "60.00", "70.00"], ["1", "55.00", "not run"]]
    assert "concat_linear" in text


# ---------------------------------------------------------------- efficiency row (tiny models)

def fake_stages(root, vlm_dir, gates=("moe", "concat_linear"), published="moe"):
    """Stage 1's record on the tiny VLM, a depth-1 head on its features and stage 3's gate files
    (``--gate all`` style: gate_<name>.pt each, ``published`` as gate.pt)."""
    from models.gates import build_gate, save_gate
    from models.heads import DistillHead, save_head
    from models.vlm import vision_hidden_size
    from transformers import AutoConfig
    from utils.checkpoints import file_id
    from utils.records import DistillRecord, VLMRecord

    classes = ["amusement", "anger", "awe"]
    VLMRecord(class_names=classes, base_model=str(vlm_dir)).write(root / "vlm")
    in_dim = vision_hidden_size(AutoConfig.from_pretrained(vlm_dir))
    head = save_head(root / "distill" / "head.pt", DistillHead(in_dim, len(classes), depth=1), classes)
    DistillRecord(class_names=classes, base_model=str(vlm_dir), head_id=file_id(head), run="depth=1,alpha=0.5,seed=42",
                  depth=1, alpha=0.5, seed=42).write(root / "distill")
    for name in gates:
        save_gate(root / "gate" / f"gate_{name}.pt", name, build_gate(name, len(classes)), classes)
    save_gate(root / "gate" / "gate.pt", published, build_gate(published, len(classes)), classes)
    return in_dim, len(classes)


def test_efficiency_figures_equal_a_hand_count_on_the_tiny_models(tmp_path, tiny_vlm_dir, capsys):
    import json

    from transformers import AutoModelForImageTextToText

    from engine.efficiency import main

    in_dim, c = fake_stages(tmp_path / "toy", tiny_vlm_dir)
    main(["--output_dir", str(tmp_path), "--out", str(tmp_path / "efficiency.md")])
    text = capsys.readouterr().out
    figures = json.loads((tmp_path / "toy" / "efficiency.json").read_text())
    loaded = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir)
    vlm = sum(p.numel() for p in loaded.parameters())  # the loaded weights, against the meta count
    assert figures["vlm"]["parameters"]["total"] == vlm
    assert figures["vlm"]["parameters"]["visual"] == sum(p.numel() for p in loaded.model.visual.parameters())
    head = in_dim * 1024 + 1024 + 1024 * c + c  # in -> 1024 -> C
    gate = 2 * c * c + c                         # concat_linear: 2C -> C
    assert figures["head"]["parameters"] == head and figures["gates"]["concat_linear"]["parameters"] == gate
    assert figures["head"]["flops_per_image"] == 2 * (in_dim * 1024 + 1024 * c)
    assert figures["gates"]["concat_linear"]["flops_per_image"] == 2 * 2 * c * c
    # The paper's gate is the one added, not the published MoE (selected on validation).
    assert figures["gate"] == "concat_linear" and figures["published_gate"] == "moe"
    total = figures["head_and_gate"]
    assert total["parameters"] == head + gate
    assert total["share_of_vlm_parameters_percent"] == pytest.approx(100 * (head + gate) / vlm)
    tokens, params = figures["vlm"]["tokens"], figures["vlm"]["parameters"]
    assert tokens["patches"] > 0 and tokens["sequence"] > tokens["patches"] // 4
    assert figures["vlm"]["flops_per_image"] == 2 * params["visual"] * tokens["patches"] + 2 * params["language"] * tokens["sequence"]
    flops = 2 * (in_dim * 1024 + 1024 * c) + 2 * 2 * c * c
    assert total["flops_per_image"] == flops
    assert total["share_of_vlm_flops_percent"] == pytest.approx(100 * flops / figures["vlm"]["flops_per_image"])
    assert f"| head + concat_linear gate | {head + gate:,} |" in text and "0.003% of parameters" in text
    assert (tmp_path / "efficiency.md").read_text() in text


def test_efficiency_of_qwen2_vl_7b_from_its_config_alone():
    """Qwen2-VL-7B-Instruct's published dimensions: 8,291,375,616 parameters without a weight
    read; a depth-1 head on its 3,584-d features is 3.68M, ~0.044%, and the paper's 0.003% is a
    64-wide hidden layer (the last of the widths)."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    from engine.efficiency import mlp_parameters, vlm_parameters

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16))
    with torch.device("meta"):
        total = vlm_parameters(AutoModelForImageTextToText.from_config(config))["total"]
    assert total == 8_291_375_616
    head = mlp_parameters([3584, 1024, 8])
    assert head == 3_679_240 and round(100 * head / total, 3) == 0.044
    last_widths = 100 * (mlp_parameters([3584, 64, 8]) + 136) / total  # + the 8-class concat_linear gate
    assert round(last_widths, 3) == 0.003 and f"{last_widths:.4f}" == "0.0028"  # as engine.efficiency's note says


def test_efficiency_without_a_gate_is_one_line(tmp_path, tiny_vlm_dir, capsys):
    from utils.errors import run_cli
    from engine.efficiency import main

    fake_stages(tmp_path / "toy", tiny_vlm_dir, gates=())
    (tmp_path / "toy" / "gate" / "gate.pt").unlink()
    assert run_cli(main, ["--output_dir", str(tmp_path), "--datasets", "toy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train_gate.py --dataname toy" in err
    assert not (tmp_path / "toy" / "efficiency.json").exists()


# ---------------------------------------------------------------- several runs side by side

def fake_metrics(folder, dataset, labels, vlm, gate, images=None):
    """A stage-3 metrics.json with stored test predictions (no intervals: the report computes them)."""
    import numpy as np

    acc = lambda preds: float(np.mean(np.array(preds) == np.array(labels)))  # noqa: E731
    write_json(folder / dataset / "gate" / "metrics.json", {
        "vlm": metric(acc(vlm), 0.5), "head": metric(acc(vlm), 0.5), "teacher": None,
        "gates": {"concat_linear": metric(acc(gate), 0.5)}, "gate": "concat_linear",
        "test_images": images or [f"{dataset}/test/{i}.jpg" for i in range(len(labels))],
        "test_predictions": {"labels": labels, "vlm": vlm, "head": vlm, "teacher": None,
                             "gates": {"concat_linear": gate}}})


def test_runs_table_has_a_row_per_run_and_module_and_pairs_them(tmp_path, capsys):
    from utils.report import main
    from utils.stats import bootstrap_ci, mcnemar

    labels = [0, 1] * 20
    wrong = [1 - y for y in labels]
    base_gate = labels[:30] + wrong[30:]   # 30 of 40 right
    other_gate = labels[:38] + wrong[38:]  # 38 of 40 right: 8 images only the second gets right
    for dataset in ("FI", "emotion6"):
        fake_metrics(tmp_path / "base", dataset, labels, labels[:20] + wrong[20:], base_gate)
        fake_metrics(tmp_path / "other", dataset, labels, labels[:20] + wrong[20:], other_gate)
    main(["--runs", f"base={tmp_path / 'base'}", f"other={tmp_path / 'other'}", "--out", str(tmp_path / "runs.md")])
    text = capsys.readouterr().out
    low, high = bootstrap_ci([True] * 38 + [False] * 2)
    rows = table_rows(text.split("\n\n")[0])[1:]  # after the header
    assert [row[:2] for row in rows] == [["base", "VLM"], ["base", "distill module"], ["base", "EmoVLM-KD (concat_linear)"],
                                         ["other", "VLM"], ["other", "distill module"], ["other", "EmoVLM-KD (concat_linear)"]]
    assert "| run | module | FI | emotion6 |" in text  # datasets sorted: upper case first
    assert rows[5][2] == rows[5][3] == f"95.00 [{100 * low:.2f}, {100 * high:.2f}]"
    p = mcnemar([True] * 30 + [False] * 10, [True] * 38 + [False] * 2)["p_value"]
    assert f"| FI | EmoVLM-KD (concat_linear) | base vs other | +20.00 | 0 | 8 | {p:.3g} | exact binomial |" in text
    assert "| FI | VLM | base vs other | +0.00 | 0 | 0 | 1 |" in text
    assert (tmp_path / "runs.md").read_text() in text


def test_runs_over_other_test_images_are_refused_in_one_line(tmp_path, capsys):
    from utils.errors import run_cli
    from utils.report import main

    labels = [0, 1] * 5
    fake_metrics(tmp_path / "base", "FI", labels, labels, labels)
    fake_metrics(tmp_path / "other", "FI", labels, labels, labels,
                 images=[f"FI/test/{i}.jpg" for i in range(9)] + ["FI/test/other.jpg"])
    out = tmp_path / "runs.md"
    argv = ["--runs", f"base={tmp_path / 'base'}", f"other={tmp_path / 'other'}", "--out", str(out)]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FI's test images differ between base and other" in err
    assert "image 9 is FI/test/9.jpg vs FI/test/other.jpg" in err and not out.exists()
    fake_metrics(tmp_path / "other", "FI", labels * 2, labels * 2, labels * 2)
    assert run_cli(main, argv) == 2
    assert "10 vs 20 images" in capsys.readouterr().err and not out.exists()


def test_runs_folder_without_results_is_one_line_and_writes_nothing(tmp_path, capsys):
    from utils.errors import run_cli
    from utils.report import main

    fake_metrics(tmp_path / "base", "FI", [0, 1], [0, 1], [0, 1])
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs.md"
    assert run_cli(main, ["--runs", f"base={tmp_path / 'base'}", f"other={tmp_path / 'empty'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--runs other={tmp_path / 'empty'}: no <dataset>/gate/metrics.json" in err
    assert not out.exists()
    assert run_cli(main, ["--runs", "base"]) == 2 and "expected NAME=FOLDER" in capsys.readouterr().err
