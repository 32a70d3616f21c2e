"""The efficiency row: what the distilled head and the gate add to the VLM, from the checkpoints and configs.

    python -m utils.report --datasets FI --efficiency [--out efficiency.md]

Parameters: the head's (``distill/head.pt``, the default head) and each gate's (``gate/gate.pt`` and
``gate/gate_<name>.pt``) counted from the loaded checkpoints, the VLM's counted on an empty
(``meta`` device) model built from the base VLM's ``config.json`` (stage 2's ``base_model``; no
weights read; the LoRA adapter left out). FLOPs per image: the head's and the gates' counted by
torch's ``FlopCounterMode`` on one image (2 per multiply-add; ``nn.Bilinear``, which it does not
see, added as 2 per weight); one VLM forward estimated as 2 FLOPs per parameter per token: the
vision tower's parameters times its patches, the language model's (input embedding excluded)
times the prompt's tokens, for stage 3's categorical prompt with a square image of the recorded
pre-resize side (1024 px by default) under stage 1's pixel budget; attention's sequence-length
terms are left out (they add a few percent at ~1,300 tokens), so the VLM's FLOPs are a slight
underestimate and the shares a slight overestimate.

The paper (arXiv 2505.07164) says the head and gate add 0.003% of the parameters. By this count
the paper's depth-1 head (in -> 1024 -> C) on Qwen2-VL-7B's 3,584-d features is ~3.68M parameters,
~0.044% of 8.29B: the claim is 15x too small for that head. It matches a head whose one hidden
layer is 64 wide (the *last* of the widths 1024, 512, 256, 128, 64, ~0.23M, ~0.003%), which is
printed beside it as the likely origin of the figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from data.datasets import REFERENCE_PRE_RESIZE
from models.gates import GATE_FILE, load_gate
from models.heads import HIDDEN_WIDTHS, load_head
from utils.checkpoints import META_FILE
from utils.errors import UserError, first_line, run_cli
from utils.io import write_json, write_text
from utils.records import VLMRecord

PAPER_SHARE_PERCENT = 0.003  # the paper's "0.003% of the parameters" for the head and the gate
PAPER_GATE = "concat_linear"
EFFICIENCY_FILE = "efficiency.json"


def parameter_count(module: nn.Module) -> int:
    """Trainable weights of ``module`` (shared ones once; buffers such as the head's
    standardisation statistics are not parameters)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def module_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward of ``module`` on ``inputs`` (2 per multiply-add, torch's count, plus
    ``nn.Bilinear``'s 2 per weight per example, which FlopCounterMode does not see)."""
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    batch = inputs[0].shape[0]
    bilinear = sum(2 * m.weight.numel() * batch for m in module.modules() if isinstance(m, nn.Bilinear))
    return int(counter.get_total_flops()) + bilinear


def mlp_parameters(widths: list[int]) -> int:
    """Weights and biases of a chain of linear layers ``widths[0] -> widths[1] -> ...``."""
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def empty_vlm(base_model: str):
    """The base VLM built from its config on the ``meta`` device: every parameter's shape, no weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as err:
        raise UserError(f"{base_model}: cannot read the VLM's config.json ({first_line(err)}); the efficiency "
                        "row counts its parameters from it: download it or point stage 1's base_model at it") from None
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def vlm_parameters(model) -> dict:
    """``{"total", "visual", "embedding", "language"}`` parameter counts of a (meta or loaded) VLM:
    the vision tower (with its merger or projector), the input embedding, and the rest."""
    from models.backbones import visual_modules

    total = parameter_count(model)
    visual = sum(parameter_count(module) for module in visual_modules(model))
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "visual": visual, "embedding": embedding, "language": total - visual - embedding}


def prompt_tokens(base_model: str, vlm: VLMRecord, class_names: list[str], side: int) -> dict:
    """``{"sequence", "patches", "image_side"}``: the tokens of stage 3's categorical prompt with a
    ``side`` x ``side`` image under stage 1's pixel budget, and the vision tower's patches."""
    from models.chat import categorical_prompt, encode_prompts
    from models.vlm import load_processor

    processor = load_processor(base_model, vlm.min_pixels, vlm.max_pixels)
    inputs = encode_prompts(processor, [categorical_prompt(class_names)], [Image.new("RGB", (side, side))])
    sequence = int(inputs["input_ids"].shape[1])
    if "image_grid_thw" in inputs:  # Qwen: patches before the 2x2 merge
        patches = int(inputs["image_grid_thw"].prod(dim=-1).sum())
    else:  # LLaVA-OneVision: one projected token per patch
        image_token = getattr(processor.tokenizer, "image_token_id", None) or \
            processor.tokenizer.convert_tokens_to_ids("<image>")
        patches = int((inputs["input_ids"] == image_token).sum())
    return {"sequence": sequence, "patches": patches, "image_side": side}


def vlm_forward_flops(params: dict, tokens: dict) -> int:
    """One VLM forward per image, 2 FLOPs per parameter per token (attention's length terms left out)."""
    return 2 * params["visual"] * tokens["patches"] + 2 * params["language"] * tokens["sequence"]


def gate_files(gate_dir: Path) -> dict[str, nn.Module]:
    """``{gate name: gate}`` of the published stage 3: gate.pt's variant and every gate_<name>.pt."""
    gates = {}
    for path in [gate_dir / GATE_FILE, *sorted(gate_dir.glob("gate_*.pt"))]:
        if path.is_file():
            gate, checkpoint = load_gate(path, gate_dir.parent.name)
            gates.setdefault(checkpoint["gate"], gate)
    return gates


def efficiency(root: Path) -> dict:
    """The efficiency figures of one dataset's outputs (``<output_dir>/<dataset>``)."""
    dataset = root.name
    distill_dir, gate_dir = root / "distill", root / "gate"
    if not (distill_dir / META_FILE).is_file():
        raise UserError(f"{distill_dir}: no stage-2 head; run `python train_distillation.py --dataname {dataset}` first")
    head, record = load_head(distill_dir, dataname=dataset)
    vlm = VLMRecord.load(root / "vlm", dataset) if (root / "vlm" / META_FILE).is_file() else None
    gates = gate_files(gate_dir) if gate_dir.is_dir() else {}
    if not gates:
        raise UserError(f"{gate_dir}: no gate.pt; run `python train_gate.py --dataname {dataset}` first")
    class_names = list(record.class_names)
    num_classes = len(class_names)

    model = empty_vlm(record.base_model)
    params = vlm_parameters(model)
    side = record.pre_resize or REFERENCE_PRE_RESIZE
    tokens = prompt_tokens(record.base_model, vlm or VLMRecord(class_names=class_names, base_model=record.base_model),
                           class_names, side)
    vlm_flops = vlm_forward_flops(params, tokens)

    def row(parameters: int, flops: int) -> dict:
        return {"parameters": parameters, "share_of_vlm_parameters_percent": 100 * parameters / params["total"],
                "flops_per_image": flops, "share_of_vlm_flops_percent": 100 * flops / vlm_flops}

    head_row = row(parameter_count(head), module_flops(head, torch.zeros(1, head.in_dim)))
    inputs = (torch.zeros(1, num_classes), torch.zeros(1, num_classes))  # one image's VLM signal, head logits
    gate_rows = {name: row(parameter_count(gate), module_flops(gate, *inputs)) for name, gate in gates.items()}
    published = load_gate(gate_dir, dataset)[1]["gate"]
    fused = PAPER_GATE if PAPER_GATE in gate_rows else published
    total = row(head_row["parameters"] + gate_rows[fused]["parameters"],
                head_row["flops_per_image"] + gate_rows[fused]["flops_per_image"])
    # How the paper's 0.003% could arise: the same depth's head with the widths taken from the end.
    reversed_widths = [head.in_dim, *HIDDEN_WIDTHS[len(HIDDEN_WIDTHS) - head.depth:], num_classes]
    reading = mlp_parameters(reversed_widths) + gate_rows[fused]["parameters"]
    return {
        "dataset": dataset, "base_model": record.base_model, "head_run": record.run, "depth": head.depth,
        "in_dim": head.in_dim, "num_classes": num_classes,
        "vlm": {"parameters": params, "tokens": tokens, "flops_per_image": vlm_flops,
                "pixel_budget": {"min_pixels": vlm.min_pixels if vlm else None,
                                 "max_pixels": vlm.max_pixels if vlm else None}},
        "head": head_row, "gates": gate_rows, "gate": fused, "published_gate": published,
        "head_and_gate": total,
        "paper": {"share_percent": PAPER_SHARE_PERCENT,
                  "last_widths_reading": {"widths": reversed_widths, "parameters_with_gate": reading,
                                          "share_percent": 100 * reading / params["total"]}},
    }


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e9 else f"{n:,} ({n / 1e6:.2f}M)" if n >= 1e6 else f"{n:,}"


def _flops(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}FLOPs"
    return f"{n} FLOPs"


def efficiency_table(figures: dict) -> str:
    """The markdown efficiency table of one dataset, the paper's claim beside it."""
    f = figures
    rows = [[f"distilled head (depth {f['depth']}, {f['in_dim']} -> {' -> '.join(map(str, HIDDEN_WIDTHS[:f['depth']]))}"
             f"{' -> ' if f['depth'] else ''}{f['num_classes']})", f["head"]]]
    rows += [[f"gate {name}" + (" (published)" if name == f["published_gate"] else ""), row]
             for name, row in f["gates"].items()]
    rows.append([f"head + {f['gate']} gate", f["head_and_gate"]])
    lines = ["| module | parameters | % of VLM parameters | FLOPs per image | % of one VLM forward | paper |",
             "|---|---|---|---|---|---|"]
    for label, row in rows:
        paper = f"{PAPER_SHARE_PERCENT:g}% of parameters" if label.startswith("head +") else ""
        lines.append(f"| {label} | {row['parameters']:,} | {row['share_of_vlm_parameters_percent']:.4f} | "
                     f"{_flops(row['flops_per_image'])} | {row['share_of_vlm_flops_percent']:.3g} | {paper} |")
    vlm, reading = f["vlm"], f["paper"]["last_widths_reading"]
    share = f["head_and_gate"]["share_of_vlm_parameters_percent"]
    return (f"### {f['dataset']}: efficiency\n\n" + "\n".join(lines) + "\n\n"
            f"VLM `{f['base_model']}`: {_count(vlm['parameters']['total'])} parameters (vision tower "
            f"{_count(vlm['parameters']['visual'])}), counted on its config without weights; one forward "
            f"per image ~{_flops(vlm['flops_per_image'])} (2 per parameter per token: {vlm['tokens']['patches']:,} "
            f"vision patches, {vlm['tokens']['sequence']:,} prompt tokens for a {vlm['tokens']['image_side']} px square "
            f"image; attention's length terms left out). Head and gate from their checkpoints (head "
            f"`{f['head_run']}`). The paper claims {PAPER_SHARE_PERCENT:g}% of the parameters; by this count the head "
            f"and gate add {share:.4f}%, {share / PAPER_SHARE_PERCENT:.3g}x that. A head of the same depth with its "
            f"hidden widths taken from the end of {HIDDEN_WIDTHS} ({' -> '.join(map(str, reading['widths']))}) plus "
            f"the gate would add {reading['parameters_with_gate']:,} parameters, {reading['share_percent']:.4f}%: on "
            f"Qwen2-VL-7B (8.29B, 3,584-d features) that is 0.0028%, the likely origin of the paper's figure.")


def build_efficiency(output_dir: str | Path, datasets: list[str]) -> str:
    """The efficiency tables of ``datasets``, writing ``<output_dir>/<dataset>/efficiency.json``."""
    parts = []
    for dataset in datasets:
        root = Path(output_dir) / dataset
        figures = efficiency(root)
        write_json(root / EFFICIENCY_FILE, figures)
        parts.append(efficiency_table(figures) + f" Figures: [{EFFICIENCY_FILE}]({dataset}/{EFFICIENCY_FILE}).")
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.efficiency",
                                     description="The parameters and FLOPs per image the distilled head and the gate "
                                                 "add, as a share of the VLM's (from the checkpoints and the VLM's "
                                                 "config), beside the paper's 0.003%; writes "
                                                 "<output_dir>/<dataset>/efficiency.json")
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--datasets", nargs="*", default=None,
                        help="dataset names (default: every dataset with a stage-3 gate.pt)")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    datasets = args.datasets or sorted(p.parent.parent.name for p in Path(args.output_dir).glob("*/gate/gate.pt"))
    if not datasets:
        raise UserError(f"--output_dir {args.output_dir}: no dataset with a stage-3 gate.pt; pass --datasets")
    text = build_efficiency(args.output_dir, datasets)
    print(text)
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    sys.exit(run_cli(main))
