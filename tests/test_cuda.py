"""The code paths only a CUDA GPU takes (docs/gpu.md), on the toy world and the tiny VLM: marked
``cuda`` and skipped without a GPU; ``scripts/gpu_check.sh`` runs them on a GPU machine. Their CPU
twins are covered by the tests docs/gpu.md names."""
import importlib.util
import json

import pytest
import torch

from bench.world import CONFIGS, ToyRun, write_annotations
from engine import preflight
from engine.batches import MemberAdam
from models.vlm import load_processor, load_vlm, pooled_image_features

pytestmark = pytest.mark.cuda
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="4-bit loading needs bitsandbytes: pip install -r requirements-qlora.txt")


def toy_images(toy_root, output_dir, count=4):
    from data.datasets import load_dataset, open_image

    splits = load_dataset(toy_root, "toy", output_dir)
    return [open_image(splits.absolute(sample)) for sample in splits.train[:count]]


def test_placement_puts_the_model_on_the_gpu(tiny_vlm_dir):
    model = load_vlm(tiny_vlm_dir, "cuda:0", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bf16_features_are_close_to_fp32(tiny_vlm_dir, toy_root, tmp_path):
    images = toy_images(toy_root, tmp_path)
    processor = load_processor(tiny_vlm_dir)
    fp32 = pooled_image_features(load_vlm(tiny_vlm_dir, "cuda:0", dtype=torch.float32), processor, images)
    bf16 = pooled_image_features(load_vlm(tiny_vlm_dir, "cuda:0", dtype=torch.bfloat16), processor, images)
    assert torch.isfinite(bf16).all()
    assert torch.allclose(fp32, bf16.float(), atol=5e-2, rtol=5e-2)


@needs_bitsandbytes
def test_four_bit_loading_runs_a_forward(tiny_vlm_dir, toy_root, tmp_path):
    model = load_vlm(tiny_vlm_dir, "cuda:0", quant="4bit")
    features = pooled_image_features(model, load_processor(tiny_vlm_dir), toy_images(toy_root, tmp_path, 2))
    assert torch.isfinite(features).all()


def test_fused_adam_on_cuda_follows_adam_on_cpu():
    """MemberAdam (the head's and the gate's optimiser: the fused kernel on each member's slice of
    the stacked weights) on CUDA takes the steps torch's Adam takes on the CPU."""
    torch.manual_seed(0)
    cpu = torch.nn.Linear(16, 4)
    stacks = [torch.nn.Parameter(tensor.detach().cuda().unsqueeze(0).repeat(2, *[1] * tensor.dim()))
              for tensor in (cpu.weight, cpu.bias)]  # two members, both the CPU model
    reference = torch.optim.Adam(cpu.parameters(), lr=1e-2, weight_decay=1e-4)
    fused = MemberAdam(stacks, 1e-2, 1e-4)
    for _ in range(20):
        x = torch.randn(8, 16)
        reference.zero_grad()
        cpu(x).square().mean().backward()
        reference.step()
        fused.zero_grad()
        (x.cuda() @ stacks[0].transpose(1, 2) + stacks[1].unsqueeze(1)).square().mean(dim=(1, 2)).sum().backward()
        fused.step()
    for member in range(2):
        assert torch.allclose(cpu.weight, stacks[0][member].detach().cpu(), atol=1e-5)
        assert torch.allclose(cpu.bias, stacks[1][member].detach().cpu(), atol=1e-5)


@pytest.mark.slow
def test_stage1_trains_in_bf16_with_the_fused_optimiser_on_the_gpu(toy_root, tiny_vlm_dir, tmp_path):
    import train_vlm

    run = ToyRun(toy_root, tmp_path / "outputs", tiny_vlm_dir)
    write_annotations(run)
    train_vlm.main(train_vlm.parse(run.argv("--vlm_model", str(tiny_vlm_dir), "--config", str(CONFIGS / "toy_vlm.yaml"),
                                            "--epochs", "1", "--skip_eval", "--quant", "none", "--gpu", "0")))
    assert (run.stage("vlm") / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (run.stage("vlm") / "log.txt").read_text().splitlines()]
    assert log and all(torch.isfinite(torch.tensor(row["train_loss"])) for row in log)


@pytest.mark.slow
def test_preflight_on_the_gpu_measures_cuda_peaks(toy_root, tiny_vlm_dir, tmp_path):
    code = preflight.run(["--dataname", "toy", "--data_root", str(toy_root), "--output_dir", str(tmp_path),
                          "--vlm_model", str(tiny_vlm_dir), "--num_workers", "0", "--gpu", "0",
                          "--vlm_config", str(CONFIGS / "toy_vlm.yaml"), "--quant", "none",
                          "--distill_config", str(CONFIGS / "toy_distill.yaml"),
                          "--gate_config", str(CONFIGS / "toy_gate.yaml"), "--steps", "2", "--head_steps", "50"])
    report = json.loads((tmp_path / "toy" / "preflight" / "preflight.json").read_text())
    assert code == 0 and report["environment"]["device"].startswith("cuda")
    assert all(row["peak_kind"] == "CUDA peak allocated" and row["peak_bytes"] > 0
               for row in report["measurements"].values())
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert report["environment"]["four_bit"]["ok"] is True
