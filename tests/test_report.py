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
