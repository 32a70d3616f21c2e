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
