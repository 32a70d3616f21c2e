"""The preflight (``python -m engine.preflight``, issue #25) on the toy world and the tiny VLM, on CPU:
it finishes, every figure is positive and finite, the projection is the measured per-unit figures
times the counts, a --device_memory below a stage's peak exits 2 naming that stage, no stage folder
is written, and neither gradio nor openai is imported."""
import json
import math

import pytest
import yaml

from conftest import REPO, run_script
from engine import preflight

pytestmark = pytest.mark.slow
CONFIGS = REPO / "configs"
STAGE_FOLDERS = ("instructions", "vlm", "distill", "teacher", "gate")
NPROC, RATIO = 2, 0.5
# Runs engine.preflight as `python -m engine.preflight` does, then reports which modules it imported.
_RUN = ("import json, sys; from engine.preflight import run; code = run(sys.argv[1:]); "
        "print('MODULES ' + json.dumps({name: name in sys.modules for name in ('gradio', 'openai')})); "
        "sys.exit(code)")


def argv(toy_root, tiny_vlm_dir, output_dir, *extra):
    return ["--dataname", "toy", "--data_root", str(toy_root), "--output_dir", str(output_dir),
            "--vlm_model", str(tiny_vlm_dir), "--num_workers", "0",
            "--vlm_config", str(CONFIGS / "toy_vlm.yaml"), "--distill_config", str(CONFIGS / "toy_distill.yaml"),
            "--gate_config", str(CONFIGS / "toy_gate.yaml"),
            "--steps", "2", "--warmup", "1", "--images", "4", "--head_steps", "30", *extra]


FURTHER_TEACHER = "test_resnet"  # the run below projects a teacher ablation: --teacher_model <toy ViT> test_resnet


@pytest.fixture(scope="module")
def preflight_run(tmp_path_factory, toy_root, tiny_vlm_dir):
    output_dir = tmp_path_factory.mktemp("preflight_outputs")
    distill = yaml.safe_load((CONFIGS / "toy_distill.yaml").read_text())
    distill["teacher_model"] = [*distill["teacher_model"], FURTHER_TEACHER]
    config = output_dir.parent / "two_teachers.yaml"
    config.write_text(yaml.safe_dump(distill))
    result = run_script("-c", _RUN, *argv(toy_root, tiny_vlm_dir, output_dir, "--nproc", str(NPROC),
                                          "--speed_ratio", str(RATIO), "--price_in", "2.5", "--price_out", "10",
                                          "--distill_config", str(config)))
    path = output_dir / "toy" / "preflight" / "preflight.json"
    report = json.loads(path.read_text()) if path.is_file() else None
    return result, report, output_dir


def test_it_finishes_with_every_figure_positive_and_finite(preflight_run):
    result, report, _ = preflight_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["fits"] and report["problems"] == []
    for part, row in report["measurements"].items():
        assert math.isfinite(row["seconds_per_unit"]) and row["seconds_per_unit"] > 0, part
        assert row["peak_bytes"] > 0, part
    for row in report["projection"]:
        assert row["units"] > 0 and math.isfinite(row["seconds"]) and row["seconds"] > 0, row
    assert all(total["seconds"] > 0 for total in report["totals"].values())
    data = report["data"]
    assert data["splits"]["train"] > 0 and data["visual_tokens"]["min"] > 0 and data["stage1_tokens"] > 0
    assert report["stage0"]["prompt_tokens"] > 0 and report["stage0"]["dollars_batch_api"] > 0
    assert report["stage0"]["dollars_batch_api"] == pytest.approx(report["stage0"]["dollars_per_request_mode"] / 2)
    env = report["environment"]
    assert env["memory_bytes"] > 0 and env["disk_free_bytes"] > 0 and env["output_dir_writable"]
    assert env["four_bit"]["ok"] is None and "skipped" in env["four_bit"]["why"]  # CPU: skipped with a reason
    assert env["vlm_weights"]["cached"] and env["teacher_weights"]["cached"]  # a local folder; no pretraining
    assert {row["name"] for row in env["requirements"]} >= {"torch", "transformers", "peft"}
    assert "VLM training" in result.stdout and "total" in result.stdout  # the printed table


def test_the_projection_is_the_measured_figures_times_the_counts(preflight_run):
    _, report, _ = preflight_run
    measurements, counts = report["measurements"], report["counts"]
    for row in report["projection"]:
        count = counts[row["part"]]
        source = count["measurement"]
        per_unit = measurements[source]["seconds_per_unit"] if isinstance(source, str) \
            else measurements[source[0]][source[1]]
        assert row["units"] == count["units"]
        assert row["seconds"] == pytest.approx(per_unit * RATIO * count["units"], rel=1e-9)
        assert row["seconds_on_nproc"] == pytest.approx(row["seconds"] / (NPROC if count["sharded"] else 1), rel=1e-9)
    splits = report["data"]["splits"]
    # Stage 1: three conversations per training image, in optimiser steps of batch x accumulation, per epoch.
    steps = math.ceil(splits["train"] * 3 / measurements["vlm_train"]["conversations_per_unit"]) * 5  # toy_vlm.yaml
    assert counts["VLM training"]["units"] == steps
    assert counts["VLM features"]["units"] == sum(splits.values())
    # Both teachers are measured and projected; the sweep's heads are trained from each.
    further = f"teacher {FURTHER_TEACHER}"
    assert measurements[further]["seconds_per_unit"] != measurements["teacher"]["seconds_per_unit"]
    assert counts[f"teacher training {FURTHER_TEACHER}"]["measurement"] == further
    assert counts[f"teacher logits {FURTHER_TEACHER}"]["measurement"] == [further, "forward_seconds_per_image"]
    assert counts[f"teacher training {FURTHER_TEACHER}"]["units"] == counts["teacher training"]["units"]
    assert counts["head training"]["units"] == math.ceil(splits["train"] / 16) * 20 * 2  # toy_distill.yaml, 2 teachers
    assert report["totals"]["all"]["seconds"] == pytest.approx(sum(r["seconds"] for r in report["projection"]))


def test_no_stage_folder_is_written_and_neither_gradio_nor_openai_is_imported(preflight_run):
    result, _, output_dir = preflight_run
    assert not [name for name in STAGE_FOLDERS if (output_dir / "toy" / name).exists()]
    line = next(line for line in result.stdout.splitlines() if line.startswith("MODULES "))
    assert json.loads(line.removeprefix("MODULES ")) == {"gradio": False, "openai": False}


def test_judge_names_exactly_the_stages_whose_peak_exceeds_the_memory(preflight_run):
    _, report, _ = preflight_run
    measurements = report["measurements"]
    worst = max(measurements, key=lambda part: measurements[part]["peak_bytes"])
    lines = preflight.judge(measurements, measurements[worst]["peak_bytes"] - 1)
    stages = [stage for stage, parts in preflight.STAGE_PEAKS.items() if worst.split(" ", 1)[0] in parts]
    assert len(lines) >= len(stages) and all(any(line.startswith(f"{stage} ") for line in lines) for stage in stages)
    assert preflight.judge(measurements, max(row["peak_bytes"] for row in measurements.values())) == []


def test_device_memory_below_the_peaks_exits_2_with_one_line_per_stage(tmp_path, toy_root, tiny_vlm_dir, capsys):
    code = preflight.run(argv(toy_root, tiny_vlm_dir, tmp_path, "--steps", "1", "--head_steps", "5",
                              "--device_memory", "0.01"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2
    assert [line.split()[1:3] for line in errors] == [["stage", "1"], ["stage", "2"], ["stage", "3"]]
    assert all("does not fit" in line and "GiB" in line and "0.01 GiB" in line for line in errors)
    assert all(" --" in line for line in errors)  # each names a flag to change


@pytest.mark.parametrize("extra, message", [(("--nproc", "0"), "--nproc must be at least 1"),
                                            (("--device_memory", "-1"), "--device_memory must be")])
def test_bad_flags_are_one_line_errors(extra, message, tmp_path, capsys):
    code = preflight.run(["--dataname", "toy", "--output_dir", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}")
    assert not (tmp_path / "toy").exists()
