"""Preflight: measure the run that will happen before it happens (issue #25).

    python -m engine.preflight --dataname FI [--gpu 0] [--vlm_model ...] [--vlm_config configs/paper_vlm.yaml]
    make preflight DATA=FI

Takes the stages' own flags and configs (each stage's ``parse`` reads them, so a flag means here
what it means there), then reports:

1. the environment: device, memory, bf16, CUDA and driver, a 4-bit matmul on the device, the
   attention kernel, library versions against requirements.txt, free disk and write permission
   under --output_dir, whether the VLM and teacher weights are cached, stage 0's API key or --base_url
   (nothing is sent);
2. the data: classes, split sizes, image sizes, the VLM processor's visual tokens per image under
   the pixel budget and the tokens stage 1 will train on;
3. short timed runs with the real settings on the user's images (warm-up excluded): stage-1
   optimiser steps, the class scorer, stage 2's feature pass and teacher steps, head and gate steps,
   each with time per unit and peak memory (CUDA's peak allocator; on CPU the process's peak RSS,
   reset before each run where Linux allows it);
4. the projection: measured time per unit x the number of units each stage runs, on 1 and on
   --nproc devices for the sharded passes, peak memory against the device's (or --device_memory),
   and stage 0's tokens and cost (--price_in/--price_out, per request and with the Batch API).

Prints one table and writes ``<output_dir>/<dataname>/preflight/preflight.json``; no stage folder is
written. Exit 0 when every stage fits, 2 with one line per stage that does not.

This module measures every stage, so it imports the stage scripts' parsers and their training code
(tests/test_layout.py allows this module alone to).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from PIL import Image

import train_distillation
import train_gate
import train_vlm
from data.annotations import ANNOTATIONS_FILE, TASKS, Annotation, read_annotations, to_conversations
from data.datasets import load_dataset, open_image, pre_resized
from data.prompts import generation_prompt
from engine.batches import MemberAdam, TrainingOrder, epoch_steps, per_step_epoch
from engine.distill import teacher_epoch
from engine.features import FEATURE_DTYPES
from engine.vlm_train import AnswerLogitsTrainer, ConversationCollator, gradient_checkpointing, trainer_settings, wrap_lora
from models.backbones import backbone_for
from models.chat import encode_conversations
from models.gates import GATES, GateEnsemble, build_gate
from models.heads import DistillHead, DropoutMasks, HeadEnsemble, distillation_loss, member_cross_entropy
from models.scorer import predict_vlm
from models.teacher import build_teacher, data_config, default_img_size, teacher_transforms
from models.vlm import (LATER_STAGES_DTYPE, load_processor, load_vlm, pooled_image_features, resolve_quant,
                        vision_hidden_size, vlm_torch_dtype)
from utils.cli import base_parser, parse_args, resolve_device
from utils.errors import run_cli
from utils.io import write_json
from utils.sweeps import as_list, settings

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
STAGE0_OUTPUT_TOKENS = 512  # generate_instructions.py's --max_new_tokens default (the most it asks for)
STAGE0_MAX_SIDE = 1024      # its --max_side default
ASSUMED_ANSWER_WORDS = 120  # stage-0 text per section where no annotations exist yet (an assumption, stated)

FLAG_RULES = {"steps": "count", "warmup": "count", "images": "count", "head_steps": "count", "nproc": "count",
              "device_memory": "positive", "speed_ratio": "positive", "price_in": "nonnegative",
              "price_out": "nonnegative", "max_pixels": "count", "min_pixels": "count",
              "teacher_batch_size": "count", "feature_batch_size": "count"}


def get_args_parser():
    parser = base_parser("Preflight: measure the stages' run on this device before running it.")
    group = parser.add_argument_group("the stages' settings (as their scripts read them)")
    group.add_argument("--vlm_model", default=None, help=f"base VLM (default {train_vlm.DEFAULT_VLM})")
    group.add_argument("--vlm_config", default=None, help="stage 1's --config (e.g. configs/paper_vlm.yaml)")
    group.add_argument("--distill_config", default=None, help="stage 2's --config")
    group.add_argument("--gate_config", default=None, help="stage 3's --config")
    group.add_argument("--min_pixels", type=int, default=None, help="stage 1's --min_pixels")
    group.add_argument("--max_pixels", type=int, default=None, help="stage 1's --max_pixels")
    group.add_argument("--quant", choices=("auto", "4bit", "none"), default=None, help="stage 1's --quant")
    group.add_argument("--gradient_checkpointing", choices=("auto", "on", "off"), default=None,
                       help="stage 1's --gradient_checkpointing")
    group.add_argument("--attn_implementation", choices=("sdpa", "flash_attention_2", "eager"), default=None,
                       help="stage 1's --attn_implementation")
    group.add_argument("--teacher_batch_size", type=int, default=None, help="stage 2's --teacher_batch_size")
    group.add_argument("--feature_batch_size", type=int, default=None, help="stage 2's --feature_batch_size")
    group = parser.add_argument_group("preflight")
    group.add_argument("--steps", type=int, default=5, help="timed steps of each short run (after the warm-up)")
    group.add_argument("--warmup", type=int, default=3,
                       help="untimed steps before each short run (the first few steps of a run are slower)")
    group.add_argument("--images", type=int, default=8, help="images of the user's data each short run uses")
    group.add_argument("--head_steps", type=int, default=300, help="timed steps of the head and of the gate")
    group.add_argument("--nproc", type=int, default=1, help="devices the sharded passes would run on")
    group.add_argument("--device_memory", type=float, default=None,
                       help="GiB of memory to judge fit against (default: this device's)")
    group.add_argument("--speed_ratio", type=float, default=1.0,
                       help="target device time / this device's: every measured time is multiplied by it")
    group.add_argument("--price_in", type=float, default=None, help="stage 0: dollars per million prompt tokens")
    group.add_argument("--price_out", type=float, default=None, help="stage 0: dollars per million output tokens")
    group.add_argument("--base_url", default=None, help="stage 0's OpenAI-compatible server, if not the API")
    group.add_argument("--ping", action="store_true",
                       help="stage 0: list the API's models once to check the key (imports openai; sends a request)")
    return parser


def parse(argv=None):
    return parse_args(get_args_parser(), argv, FLAG_RULES)


def stage_args(args) -> dict[str, argparse.Namespace]:
    """Each stage's flags as its own ``parse`` reads them: the shared flags, the stage config and the
    stage's own flags given here."""
    common = ["--dataname", args.dataname, "--data_root", args.data_root, "--output_dir", args.output_dir,
              "--seed", str(args.seed), "--num_workers", str(args.num_workers)]
    common += ["--gpu", str(args.gpu)] if args.gpu is not None else []
    common += ["--skip_bad_images"] if args.skip_bad_images else []
    model = ["--vlm_model", args.vlm_model] if args.vlm_model else []

    def given(*names):
        return [word for name in names if getattr(args, name) is not None
                for word in (f"--{name}", str(getattr(args, name)))]

    def config(path):
        return ["--config", path] if path else []

    vlm = train_vlm.parse(common + model + config(args.vlm_config) + given("min_pixels", "max_pixels", "quant",
                                                                              "gradient_checkpointing", "attn_implementation"))
    distill = train_distillation.parse(common + model + config(args.distill_config)
                                       + given("teacher_batch_size", "feature_batch_size"))
    gate = train_gate.parse(common + model + config(args.gate_config))
    return {"vlm": vlm, "distill": distill, "gate": gate}


# ---------------------------------------------------------------- measurement helpers

def _rss_peak_bytes() -> int:
    """The process's peak resident memory (VmHWM, reset by :func:`_reset_peak`; else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return _rss_peak_bytes()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def measured(device: torch.device, result: dict):
    """Peak memory of the block into ``result['peak_bytes']`` (and what kind of peak it is)."""
    _reset_peak(device)
    yield
    result["peak_bytes"] = _peak(device)
    result["peak_kind"] = "CUDA peak allocated" if device.type == "cuda" else "process peak RSS"


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds of ``step()`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------- 1. environment

def _requirements() -> list[dict]:
    from packaging.requirements import Requirement

    rows = []
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        rows.append({"name": requirement.name, "required": str(requirement.specifier), "installed": version,
                     "ok": version is not None and requirement.specifier.contains(version, prereleases=True)})
    return rows


def _four_bit_check(device: torch.device) -> dict:
    """A small NF4 matmul on the device (bitsandbytes), not just an import."""
    if device.type != "cuda":
        return {"ok": None, "why": "skipped: 4-bit loading needs a CUDA GPU (stage 1 trains in full precision here)"}
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
        out = layer(torch.randn(4, 256, device=device, dtype=torch.bfloat16))
        _sync(device)
        return {"ok": bool(torch.isfinite(out).all()), "why": f"bitsandbytes {bnb.__version__}: NF4 matmul ran"}
    except Exception as err:  # noqa: BLE001 - any failure is the answer
        return {"ok": False, "why": f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"}


def _attention_check(device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        q = torch.randn(1, 2, 8, 16, device=device, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        sdpa = True
    except Exception:  # noqa: BLE001
        sdpa = False
    flash = importlib.util.find_spec("flash_attn") is not None
    return {"sdpa": sdpa, "flash_attn_installed": flash, "ok": sdpa,
            "used": "sdpa (transformers' default; the stages set no other)"}


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _weights_cached(model_id: str) -> dict:
    if Path(model_id).is_dir():
        return {"model": model_id, "cached": (Path(model_id) / "config.json").is_file(), "where": "local folder"}
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model_id, "config.json")
        return {"model": model_id, "cached": isinstance(hit, str), "where": "Hugging Face cache"}
    except Exception as err:  # noqa: BLE001
        return {"model": model_id, "cached": False, "where": f"cannot tell ({err.__class__.__name__})"}


def _teacher_cached(args_distill) -> dict:
    name = as_list(args_distill.teacher_model)[0]  # the first teacher of --teacher_model A B ...
    if args_distill.teacher_checkpoint:
        return {"model": name, "cached": Path(args_distill.teacher_checkpoint).is_file(), "where": "--teacher_checkpoint"}
    if args_distill.no_teacher_pretrained:
        return {"model": name, "cached": True, "where": "not needed (--no_teacher_pretrained)"}
    import timm

    hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    if not hub_id:
        return {"model": name, "cached": False, "where": "cannot tell (no hub id)"}
    return {**_weights_cached(hub_id), "model": name}


def environment(args, stages, device: torch.device, vlm_model: str) -> dict:
    out = _existing_parent(Path(args.output_dir))
    writable = os.access(out, os.W_OK)
    env = {"device": str(device), "torch": torch.__version__, "python": sys.version.split()[0]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, memory_bytes=int(props.total_memory), bf16=torch.cuda.is_bf16_supported(),
                   cuda=torch.version.cuda, driver=_driver_version(),
                   compute_capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        env.update(name=f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
                   memory_bytes=int(memory), bf16=False, cuda=torch.version.cuda, driver=None)
    env["four_bit"] = _four_bit_check(device)
    env["attention"] = _attention_check(device)
    env["requirements"] = _requirements()
    env["disk_free_bytes"] = int(shutil.disk_usage(out).free)
    env["output_dir_writable"] = writable
    env["vlm_weights"] = _weights_cached(vlm_model)
    env["teacher_weights"] = _teacher_cached(stages["distill"])
    env["stage0_api"] = _api_check(args)
    return env


def _api_check(args) -> dict:
    key = bool(os.environ.get("OPENAI_API_KEY"))
    result = {"api_key_set": key, "base_url": args.base_url, "ok": key or args.base_url is not None,
              "pinged": False}
    if args.ping:  # the only path that imports openai (and sends anything)
        import openai

        try:
            openai.OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                          timeout=20).models.list()
            result.update(pinged=True, ping="ok")
        except Exception as err:  # noqa: BLE001
            result.update(pinged=True, ping=f"{err.__class__.__name__}", ok=False)
    return result


# ---------------------------------------------------------------- 2. the data

def _sample(items: list, count: int) -> list:
    step = max(1, math.ceil(len(items) / count))
    return items[::step][:count]


def data_report(splits, processor, vlm_args, images: list) -> dict:
    sizes = []
    for sample in _sample(splits.train + splits.val + splits.test, 256):
        try:
            with Image.open(splits.absolute(sample)) as image:
                sizes.append(image.size)
        except OSError:
            continue
    merge = getattr(processor.image_processor, "merge_size", 1) or 1
    tokens, lengths = [], []
    for image in images:
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
        tokens.append(int(grid.prod()) // (merge * merge))
    rows = training_conversations(splits, vlm_args, 1)  # the first sampled image's conversations (--tasks)
    for sample, conversation, task in rows:
        image = open_image(splits.absolute(sample))
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
        batch = encode_conversations(processor, [conversation], [image], vlm_args.train_on_prompt)
        lengths.append({"task": task, "tokens": int(batch["input_ids"].shape[1]) - int(grid.prod()) // (merge * merge)})
    text_per_image = sum(row["tokens"] for row in lengths)
    mean_visual = statistics.mean(tokens)
    per_image = len(rows) * mean_visual + text_per_image
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    return {"classes": splits.class_names, "splits": {name: len(splits.split(name)) for name in ("train", "val", "test")},
            "image_size": {"sampled": len(sizes), "width_median": statistics.median(widths) if widths else None,
                           "height_median": statistics.median(heights) if heights else None,
                           "width_max": max(widths, default=None), "height_max": max(heights, default=None)},
            "pixel_budget": [processor.image_processor.size.shortest_edge, processor.image_processor.size.longest_edge],
            "visual_tokens": {"sampled": len(tokens), "min": min(tokens), "median": statistics.median(tokens),
                              "max": max(tokens), "mean": mean_visual},
            "text_tokens_per_conversation": lengths,
            "text_assumption": "stage 0's text" if not _is_assumed(splits, vlm_args)
            else f"stage-0 sections assumed {ASSUMED_ANSWER_WORDS} words each (no annotations yet)",
            "stage1_tokens": int(round(per_image * len(splits.train) * vlm_args.epochs)),
            "conversations_per_image": len(rows)}


# ---------------------------------------------------------------- 3. short timed runs

def _assumed_annotation(sample, splits) -> Annotation:
    words = " ".join(["word"] * ASSUMED_ANSWER_WORDS)
    return Annotation(sample.path, splits.class_names[sample.label], words, words, "assumed")


def _is_assumed(splits, vlm_args) -> bool:
    return vlm_args.annotations is not None or not (
        Path(vlm_args.output_dir) / vlm_args.dataname / "instructions" / ANNOTATIONS_FILE).is_file()


def training_conversations(splits, vlm_args, count: int) -> list[tuple]:
    """``(sample, conversation, task)`` of ``count`` training images, every task of stage 1's
    ``--tasks`` in turn, as stage 1 builds them: stage 0's text where its annotations exist (the
    default file), else sections of ASSUMED_ANSWER_WORDS words."""
    tasks = getattr(vlm_args, "tasks", None) or TASKS
    annotations = {}
    path = Path(vlm_args.output_dir) / vlm_args.dataname / "instructions" / ANNOTATIONS_FILE
    if not vlm_args.annotations and path.is_file():
        try:
            annotations = {a.image: a for a in read_annotations(path)}
        except Exception:  # noqa: BLE001 - a damaged file is stage 1's to report; assume lengths here
            annotations = {}
    rows = []
    for sample in _sample(splits.train, count):
        annotation = annotations.get(sample.path) or _assumed_annotation(sample, splits)
        for task, conversation in to_conversations(annotation, splits.class_names).items():
            if task in tasks:
                rows.append((sample, conversation, task))
    rows.sort(key=lambda row: TASKS.index(row[2]))  # interleave below
    by_task = [[row for row in rows if row[2] == task] for task in TASKS if task in tasks]
    return [row for group in zip(*by_task) for row in group]


def time_vlm_training(vlm_args, vlm_model, processor, images, splits, device, warmup, steps) -> dict:
    from transformers import TrainerCallback, TrainingArguments

    on_gpu = device.type == "cuda"
    quant = resolve_quant(vlm_args.quant, device)
    result = {"unit": "optimiser step", "quant": quant}
    conversations = training_conversations(splits, vlm_args, len(images))
    with measured(device, result):
        model = load_vlm(vlm_model, device, dtype=torch.bfloat16 if on_gpu else None, quant=quant, trainable=True,
                         attn_implementation=vlm_args.attn_implementation)
        targets = list(vlm_args.target_modules or backbone_for(model).lora_targets)
        checkpointing = gradient_checkpointing(vlm_args.gradient_checkpointing, on_gpu)
        result["gradient_checkpointing"] = checkpointing
        model = wrap_lora(model, vlm_args.lora_r, vlm_args.lora_alpha, vlm_args.lora_dropout, targets,
                          vlm_args.modules_to_save, quantized=quant is not None, gradient_checkpointing=checkpointing)
        per_step = vlm_args.batch_size * vlm_args.grad_accum
        total = (warmup + steps) * per_step
        examples = [{"conversation": conversations[i % len(conversations)][1],
                     "image": str(splits.absolute(conversations[i % len(conversations)][0])),
                     "task": conversations[i % len(conversations)][2]} for i in range(total)]
        stamps = []

        class Clock(TrainerCallback):
            def on_step_end(self, *_, **__):
                _sync(device)
                stamps.append(time.perf_counter())

        with tempfile.TemporaryDirectory() as tmp:
            settings = {**trainer_settings(vlm_args, tmp, on_gpu), "max_steps": warmup + steps, "save_strategy": "no",
                        "logging_strategy": "no", "report_to": "none", "dataloader_num_workers": 0}  # a measurement, not a run
            # Stage 1's own trainer: the output layer only where the loss reads it.
            trainer = AnswerLogitsTrainer(model=model, args=TrainingArguments(**settings), train_dataset=examples,
                              data_collator=ConversationCollator(processor, vlm_args.train_on_prompt),
                              callbacks=[Clock()])
            _sync(device)
            stamps.append(time.perf_counter())
            trainer.train()
        gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    result["seconds_per_unit"] = statistics.median(gaps)
    result["conversations_per_unit"] = per_step
    del trainer, model
    return result


def time_answers(vlm_model, processor, images, class_names, device, mode: str, batch_size: int,
                 max_new_tokens: int, pre_resize: int, warmup, steps) -> dict:
    """The tuned VLM answering images as stage 1's evaluation and stage 3 run it (unquantised, float32,
    images pre-resized): ``score`` (the class scorer) or ``generate`` (greedy decoding up to
    ``max_new_tokens``; a random model never stops early, so this is the most it costs)."""
    result = {"unit": "image", "mode": mode}
    with measured(device, result):
        model = load_vlm(vlm_model, device, dtype=vlm_torch_dtype(LATER_STAGES_DTYPE))
        batch = pre_resized(images[:batch_size], pre_resize)
        seconds = timed_steps(lambda: predict_vlm(model, processor, batch, class_names, mode, batch_size,
                                                  max_new_tokens), warmup, steps, device)
    result["seconds_per_unit"] = seconds / len(batch)
    del model
    return result


def time_features(vlm_model, processor, images, device, dtype, batch_size, pre_resize, warmup, steps) -> dict:
    result = {"unit": "image"}
    with measured(device, result):
        model = load_vlm(vlm_model, device, dtype=dtype)
        batch = pre_resized(images[:batch_size], pre_resize)
        with torch.no_grad():
            seconds = timed_steps(lambda: pooled_image_features(model, processor, batch), warmup, steps, device)
    result["seconds_per_unit"] = seconds / len(batch)
    del model
    return result


def teacher_parts(distill_args) -> dict[str, str]:
    """The teachers stage 2 trains and distils from, by measurement name: the first of
    ``--teacher_model A B C`` (the stage's own, or the one ``--teacher_checkpoint`` gives) as
    ``teacher``, each further one as ``teacher <model>`` (duplicates dropped, as stage 2 drops them)."""
    names = list(dict.fromkeys(as_list(distill_args.teacher_model)))
    if distill_args.teacher_checkpoint:
        names = names[:1]
    return {("teacher" if index == 0 else f"teacher {name}"): name for index, name in enumerate(names)}


def time_teacher(distill_args, name: str, splits, device, warmup, steps) -> dict:
    """Teacher ``name``'s training steps (the architecture of the real teacher, random weights: the
    same cost, nothing downloaded) and its forward pass per image (the logits pass)."""
    from torch.utils.data import DataLoader
    from data.datasets import ImageDataset

    result = {"unit": "optimiser step"}
    with measured(device, result):
        size = distill_args.teacher_img_size or default_img_size(name, distill_args.teacher_data_config)
        model = build_teacher(name, len(splits.class_names), size, pretrained=False).to(device)
        config = data_config(model, size, distill_args.teacher_data_config)
        train_tf, eval_tf = teacher_transforms(config)
        batch = distill_args.teacher_batch_size
        samples = [splits.train[i % len(splits.train)] for i in range(batch)]
        images, labels = next(iter(DataLoader(ImageDataset(splits.data_root, samples, train_tf), batch_size=batch)))
        optimizer = torch.optim.Adam(model.parameters(), lr=distill_args.teacher_lr,
                                     weight_decay=distill_args.teacher_weight_decay)
        loader = [(images, labels)]
        result["seconds_per_unit"] = timed_steps(
            lambda: teacher_epoch(model, loader, optimizer, device, 1, 1, precision=distill_args.teacher_precision),
            warmup, steps, device)
        model.eval()
        with torch.no_grad():
            forward = timed_steps(lambda: model(images.to(device)), warmup, steps, device)
    result["forward_seconds_per_image"] = forward / batch
    result["images_per_unit"] = batch
    return result


def time_small(kind: str, in_dim: int, num_classes: int, batch_size: int, steps: int, device, lr, weight_decay,
               seed: int, depth: int = 1, alpha: float = 0.5, temperature: float = 2.0) -> dict:
    """Head or gate optimiser steps on random tensors shaped as the real ones (their cost does not
    depend on the values): seconds per step."""
    torch.manual_seed(seed)
    rows = batch_size * steps
    result = {"unit": "optimiser step"}
    with measured(device, result):
        if kind == "head":  # a single run is an ensemble of one (engine.distill.train_heads)
            head = DistillHead(in_dim, num_classes, depth)
            generator = torch.Generator().set_state(torch.get_rng_state())
            model = HeadEnsemble([head]).to(device)
            inputs = (torch.randn(rows, in_dim, device=device),)
            targets = (torch.randn(rows, num_classes, device=device),
                       torch.randint(num_classes, (rows,), device=device))
            loss = partial(distillation_loss, alpha=[alpha], temperature=temperature)
            masks = DropoutMasks(model, [generator], epoch_steps(rows, batch_size), device)
            extras, per_member = (lambda: ((step_masks,) for step_masks in masks.epoch())), False
        else:  # engine.gate.train_gates: each member its own (N, ...) data
            model = GateEnsemble([build_gate(kind, num_classes)]).to(device)
            inputs = (torch.randn(1, rows, num_classes, device=device), torch.randn(1, rows, num_classes, device=device))
            targets = (torch.randint(num_classes, (1, rows), device=device),)
            loss, extras, per_member = member_cross_entropy, None, True
        optimizer = MemberAdam(model.parameters(), lr, weight_decay)
        orders = [TrainingOrder(rows, torch.Generator(device=device).manual_seed(seed))]
        epoch = lambda: per_step_epoch(model, optimizer, inputs, targets, loss, orders, batch_size, 1,  # noqa: E731
                                       extras=extras, per_member=per_member)
        seconds = timed_steps(epoch, 1, 1, device)
    result["seconds_per_unit"] = seconds / steps
    result["timed_steps"] = steps
    return result


# ---------------------------------------------------------------- 4. projection and judgement

def projection(measurements: dict, counts: dict, nproc: int, ratio: float) -> list[dict]:
    """One row per (stage, part): per-unit seconds (times ``ratio``) x units, on 1 and ``nproc`` devices."""
    rows = []
    for name, (stage, unit_key, units, sharded) in counts.items():
        per_unit = measurements[unit_key]["seconds_per_unit"] if not isinstance(unit_key, tuple) else \
            measurements[unit_key[0]][unit_key[1]]
        per_unit *= ratio
        seconds = per_unit * units
        rows.append({"stage": stage, "part": name, "units": units, "seconds_per_unit": per_unit,
                     "seconds": seconds, "seconds_on_nproc": seconds / nproc if sharded else seconds,
                     "sharded": sharded})
    return rows


STAGE_PEAKS = {"stage 1": ("vlm_train", "eval"), "stage 2": ("features", "teacher", "head"),
               "stage 3": ("answers", "gate")}
REMEDIES = {"vlm_train": "lower --max_pixels, use --quant 4bit (QLoRA, CUDA), --gradient_checkpointing on "
                         "or a smaller --batch_size",
            "eval": "a smaller --eval_batch_size (stage 1's test evaluation) or --skip_eval",
            "answers": "a smaller --vlm_batch_size, --quant 4bit or --vlm_dtype bf16 (stage 3)",
            "features": "lower --feature_batch_size or --feature_dtype bf16",
            "teacher": "a smaller --teacher_batch_size (or --teacher_img_size)",
            "head": "a smaller --batch_size", "gate": "a smaller --batch_size"}


def judge(measurements: dict, memory_bytes: int) -> list[str]:
    """One line per stage whose measured peak exceeds ``memory_bytes``, naming the part, its figure and
    what to change."""
    lines = []
    for stage, parts in STAGE_PEAKS.items():
        # a part and its kind ("teacher" and each further "teacher <model>")
        measured = [key for key in measurements if key.split(" ", 1)[0] in parts]
        over = [part for part in measured if measurements[part]["peak_bytes"] > memory_bytes]
        if over:
            worst = max(over, key=lambda part: measurements[part]["peak_bytes"])
            lines.append(f"{stage} does not fit: {worst} peaks at {measurements[worst]['peak_bytes'] / GIB:.2f} GiB "
                         f"({measurements[worst]['peak_kind']}) > {memory_bytes / GIB:.2f} GiB; "
                         f"{REMEDIES[worst.split(' ', 1)[0]]}")
    return lines


def stage0_cost(args, splits, sizes_sample) -> dict:
    text = sum(len(generation_prompt(splits.class_names, splits.class_names[s.label])) // 4 for s in splits.train)
    image_tokens = []
    for width, height in sizes_sample:
        scale = min(1.0, STAGE0_MAX_SIDE / max(width, height))
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        scale = min(1.0, 2048 / max(w, h))
        w, h = w * scale, h * scale
        scale = min(1.0, 768 / min(w, h))
        w, h = w * scale, h * scale
        image_tokens.append(85 + 170 * math.ceil(w / 512) * math.ceil(h / 512))
    prompt = text + round(statistics.mean(image_tokens) * len(splits.train)) if image_tokens else text
    output = STAGE0_OUTPUT_TOKENS * len(splits.train)
    result = {"requests": len(splits.train), "prompt_tokens": prompt, "output_tokens_at_most": output,
              "rule": "text ~4 characters a token; images by the GPT-4o high-detail rule at --max_side 1024"}
    if args.price_in is not None and args.price_out is not None:
        cost = (prompt * args.price_in + output * args.price_out) / 1e6
        result.update(dollars_per_request_mode=cost, dollars_batch_api=cost / 2)
    return result


def _fmt_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def environment_lines(env: dict) -> list[str]:
    """The environment in a few lines: what works, and what will not."""
    wrong = [f"{row['name']} {row['installed'] or 'missing'} (wants {row['required'] or 'any'})"
             for row in env["requirements"] if not row["ok"]]
    four_bit = env["four_bit"]
    api = env["stage0_api"]
    return [
        f"device {env['device']}: {env['name']}, {env['memory_bytes'] / GIB:.1f} GiB, bf16 {env['bf16']}, "
        f"CUDA {env['cuda']}, driver {env['driver']}, attention {'SDPA' if env['attention']['sdpa'] else 'none!'}"
        f"{' (flash-attn installed)' if env['attention']['flash_attn_installed'] else ''}",
        f"4-bit: {'works' if four_bit['ok'] else 'FAILS' if four_bit['ok'] is False else 'n/a'} ({four_bit['why']})",
        "libraries: " + ("as requirements.txt asks" if not wrong else "NOT as requirements.txt asks: " + "; ".join(wrong)),
        f"disk: {env['disk_free_bytes'] / GIB:.1f} GiB free under --output_dir, "
        + ("writable" if env["output_dir_writable"] else "NOT writable"),
        f"weights: VLM {env['vlm_weights']['model']} {'cached' if env['vlm_weights']['cached'] else 'NOT cached'}, "
        f"teacher {env['teacher_weights']['model']} "
        f"{'cached' if env['teacher_weights']['cached'] else 'NOT cached'} ({env['teacher_weights']['where']})",
        "stage 0: " + ("API key set" if api["api_key_set"] else "no OPENAI_API_KEY")
        + (f", --base_url {api['base_url']}" if api["base_url"] else "")
        + (f", ping: {api.get('ping')}" if api["pinged"] else " (nothing sent; --ping checks the key)"),
    ]


def table(report: dict) -> str:
    nproc = report["nproc"]
    # wide enough for every part (a further teacher's rows carry its timm name)
    width = max([22, *(len(row["part"]) for row in report["projection"])])

    def line(stage, part, units, per_unit, seconds, on_nproc) -> str:
        return f"{stage:8} {part:{width}} {units:>10} {per_unit:>10} {seconds:>10} {on_nproc:>12}"

    lines = [f"preflight {report['dataname']} on {report['environment']['name']} "
             f"(speed ratio {report['speed_ratio']:g}{' (assumed)' if report['speed_ratio'] != 1 else ''})",
             *environment_lines(report["environment"]),
             line("stage", "part", "units", "per unit", "1 device", f"{nproc} device(s)")]
    for row in report["projection"]:
        lines.append(line(row["stage"], row["part"], row["units"], _fmt_seconds(row["seconds_per_unit"]),
                          _fmt_seconds(row["seconds"]), _fmt_seconds(row["seconds_on_nproc"])))
    for stage, total in report["totals"].items():
        lines.append(line(stage, "total", "", "", _fmt_seconds(total["seconds"]),
                          _fmt_seconds(total["seconds_on_nproc"])))
    memory = report["memory_bytes"]
    lines.append(f"peak memory against {memory / GIB:.2f} GiB"
                 f"{' (--device_memory)' if report['device_memory_given'] else ''}:")
    part_width = max([10, *map(len, report["measurements"])])
    for part, row in report["measurements"].items():
        lines.append(f"  {part:{part_width}} {row['peak_bytes'] / GIB:8.2f} GiB ({row['peak_kind']})"
                     f"{'  OVER' if row['peak_bytes'] > memory else ''}")
    s0 = report["stage0"]
    lines.append(f"stage 0: {s0['requests']} requests, ~{s0['prompt_tokens']:,} prompt tokens, at most "
                 f"{s0['output_tokens_at_most']:,} output tokens"
                 + (f"; ~${s0['dollars_per_request_mode']:,.2f} per request, ~${s0['dollars_batch_api']:,.2f} with "
                    "the Batch API" if "dollars_batch_api" in s0 else "; add --price_in/--price_out for the cost"))
    data = report["data"]
    lines.append(f"data: {len(data['classes'])} classes, splits {data['splits']}, visual tokens per image "
                 f"{data['visual_tokens']['min']}..{data['visual_tokens']['max']} (median "
                 f"{data['visual_tokens']['median']}), stage 1 trains on ~{data['stage1_tokens']:,} tokens")
    return "\n".join(lines)


def main(args) -> None:
    stages = stage_args(args)
    vlm_args, distill_args, gate_args = stages["vlm"], stages["distill"], stages["gate"]
    vlm_model = vlm_args.vlm_model or train_vlm.DEFAULT_VLM
    device = resolve_device(args.gpu)
    out_dir = Path(args.output_dir) / args.dataname / "preflight"
    env = environment(args, stages, device, vlm_model)
    splits = load_dataset(args.data_root, args.dataname, args.output_dir, args.skip_bad_images)
    processor = load_processor(vlm_model, vlm_args.min_pixels, vlm_args.max_pixels)
    samples = _sample(splits.train, args.images)
    images = [open_image(splits.absolute(s)) for s in samples]
    data = data_report(splits, processor, vlm_args, images)
    sizes = [image.size for image in images]
    torch.manual_seed(args.seed)

    measurements = {}
    measurements["vlm_train"] = time_vlm_training(vlm_args, vlm_model, processor, images, splits, device,
                                                  args.warmup, args.steps)
    # The VLM answering: stage 1's test evaluation (--eval_mode) and stage 3's answers (--vlm_answer).
    answer_runs = {"eval": (vlm_args.eval_mode, vlm_args.eval_batch_size, vlm_args.max_new_tokens, vlm_args.pre_resize),
                   "answers": (gate_args.vlm_answer, gate_args.vlm_batch_size, gate_args.max_new_tokens,
                               gate_args.pre_resize)}
    for part, (mode, batch, new_tokens, pre_resize) in answer_runs.items():
        same = next((other for other, run in answer_runs.items() if other in measurements and run == answer_runs[part]),
                    None)
        measurements[part] = dict(measurements[same]) if same else time_answers(
            vlm_model, processor, images, splits.class_names, device, mode, min(batch, len(images)), new_tokens,
            pre_resize, args.warmup, args.steps)
    measurements["features"] = time_features(vlm_model, processor, images, device,
                                             FEATURE_DTYPES[distill_args.feature_dtype],
                                             min(distill_args.feature_batch_size, len(images)),
                                             distill_args.pre_resize, args.warmup, args.steps)
    # Every teacher of --teacher_model A B C is trained and distilled from (one with --teacher_checkpoint):
    # the first is measured as "teacher", each further one as "teacher <model>".
    teachers = teacher_parts(distill_args)
    for part, name in teachers.items():
        measurements[part] = time_teacher(distill_args, name, splits, device, args.warmup, args.steps)
    from transformers import AutoConfig

    in_dim = vision_hidden_size(AutoConfig.from_pretrained(vlm_model))
    classes = len(splits.class_names)
    measurements["head"] = time_small("head", in_dim, classes, distill_args.batch_size, args.head_steps, device,
                                      distill_args.lr, distill_args.weight_decay, args.seed,
                                      max(as_list(distill_args.depth)), as_list(distill_args.alpha)[0],
                                      distill_args.temperature)
    gate_names = list(GATES) if gate_args.gate == "all" else [gate_args.gate]
    measurements["gate"] = time_small(gate_names[0], in_dim, classes, gate_args.batch_size, args.head_steps, device,
                                      gate_args.lr, gate_args.weight_decay, args.seed)

    n_train, n_all = len(splits.train), len(splits.train) + len(splits.val) + len(splits.test)
    conversations = n_train * data["conversations_per_image"]
    vlm_steps = math.ceil(conversations / measurements["vlm_train"]["conversations_per_unit"]) * vlm_args.epochs
    heads = len(settings(as_list(distill_args.depth), as_list(distill_args.alpha),
                         as_list(distill_args.seeds) if distill_args.seeds is not None else [distill_args.seed]))
    seeds = len(as_list(gate_args.seeds)) if gate_args.seeds is not None else 1
    teacher_steps = math.ceil(n_train / distill_args.teacher_batch_size) * distill_args.teacher_epochs
    counts = {  # part: (stage, measurement, units, sharded across --nproc)
        "VLM training": ("stage 1", "vlm_train", vlm_steps, True),
        "test evaluation": ("stage 1", "eval", 0 if vlm_args.skip_eval else len(splits.test), True),
        **{f"{part.replace('teacher', 'teacher training', 1)}": ("stage 2", part, teacher_steps, False)
           for part in teachers},
        **{f"{part.replace('teacher', 'teacher logits', 1)}": ("stage 2", (part, "forward_seconds_per_image"), n_all,
                                                               True) for part in teachers},
        "VLM features": ("stage 2", "features", n_all, True),
        # the sweep's heads from every teacher
        "head training": ("stage 2", "head",
                          math.ceil(n_train / distill_args.batch_size) * distill_args.epochs * heads * len(teachers),
                          False),
        "VLM answers": ("stage 3", "answers", n_all, True),
        "gate training": ("stage 3", "gate",
                          math.ceil(n_train / gate_args.batch_size) * gate_args.epochs * len(gate_names) * seeds, False),
    }
    rows = projection(measurements, counts, args.nproc, args.speed_ratio)
    totals = {}
    for row in rows:
        total = totals.setdefault(row["stage"], {"seconds": 0.0, "seconds_on_nproc": 0.0})
        total["seconds"] += row["seconds"]
        total["seconds_on_nproc"] += row["seconds_on_nproc"]
    totals["all"] = {key: sum(t[key] for t in totals.values()) for key in ("seconds", "seconds_on_nproc")}
    memory = int(args.device_memory * GIB) if args.device_memory is not None else env["memory_bytes"]
    problems = judge(measurements, memory)
    report = {"dataname": args.dataname, "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "environment": env, "data": data, "measurements": measurements, "counts": {
                  name: {"stage": c[0], "measurement": c[1], "units": c[2], "sharded": c[3]} for name, c in counts.items()},
              "projection": rows, "totals": totals, "nproc": args.nproc, "speed_ratio": args.speed_ratio,
              "speed_ratio_note": "measured times multiplied by --speed_ratio (an assumption)"
              if args.speed_ratio != 1 else None,
              "memory_bytes": memory, "device_memory_given": args.device_memory is not None,
              "stage0": stage0_cost(args, splits, sizes), "fits": not problems, "problems": problems,
              "settings": {"vlm_model": vlm_model, "steps": args.steps, "warmup": args.warmup, "images": len(images)}}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "preflight.json", report)
    print(table(report))
    print(f"-> {out_dir / 'preflight.json'}")
    return problems


def run(argv=None) -> int:
    """The command line: exit 0 when every stage fits, 2 with one line per stage that does not
    (a user error: 2 with its one line)."""
    problems = []
    code = run_cli(lambda args: problems.extend(main(args)), argv, parse=parse)
    if code == 0 and problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
