"""No setting is silently ignored (#23 item 14).

Every key of ``configs/paper_*.yaml`` reaches the code that uses it: each stage runs through its
real ``parse`` and ``main`` once with the paper's file and once with a file where every key has
another valid value (:data:`CHANGED`), and spies on the real code record what was built and
trained: the LoRA modules and the Trainer of stage 1, the teacher, the head and their
optimisers in stage 2, the VLM's answers and the gate in stage 3. For each key :data:`CHECKS`
names what shows it (``observe``) and what that must be for a value (``expect``); both runs must
show their own value. A key with no check fails, so a new key needs one.

Runs stop (:class:`Stop`) where the rest costs time and shows nothing more: stage 1 before
``Trainer.train``, the teacher before its first epoch, a 4-bit load (CUDA and bitsandbytes), a
hub model that is not downloaded here. Decoding is replaced by a fixed answer, ``{"emotion":
"<first class>"}`` with double quotes, which the strict parser cannot read and the lenient one
can; the decoding limit asked for is recorded.

The settings built into the method, not flags, are checked too: the head's GELU and dropout 0.1
(active in training only), the gate's seeded PyTorch initialisation, LoRA without biases and off
the visual encoder, and the optimisers (Adam for the teacher, the head and the gate; AdamW for
stage 1). ``scripts/mutations.py`` plants a head without dropout, a ReLU head, an ignored LoRA
dropout, an ignored head weight decay and an unseeded gate and checks that this file fails.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from torch import nn

from engine.batches import MemberAdam
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread

STAGES = ("vlm", "distill", "gate")
PAPER = {stage: yaml.safe_load((REPO / "configs" / f"paper_{stage}.yaml").read_text(encoding="utf-8"))
         for stage in STAGES}
TINY = "<the tiny VLM>"  # replaced by the session's tiny VLM folder when the file is written
NUM_CLASSES = 3
# Another valid value for every key of configs/paper_*.yaml. A stage's numbers differ from each
# other too (lora_r 4, lora_alpha 16, epochs 2, batch_size 3, ...), so a setting read in place of
# another shows.
CHANGED = {
    "vlm": {"vlm_model": TINY, "quant": "none", "lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.2,
            "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"], "epochs": 2, "lr": 3.0e-4,
            "lr_scheduler": "linear", "warmup_ratio": 0.1, "max_grad_norm": 1.5, "batch_size": 3,
            "max_new_tokens": 7, "tasks": ["categorical"]},
    "distill": {"feature_dtype": "bf16", "pre_resize": 32, "teacher_model": "vit_tiny_patch16_224",
                "teacher_data_config": "timm",
                "teacher_img_size": 48, "no_teacher_pretrained": True, "teacher_lr": 1.0e-3,
                "teacher_weight_decay": 0.02, "teacher_batch_size": 5, "teacher_epochs": 4, "teacher_precision": "bf16", "depth": [2],
                "alpha": [0.25], "temperature": 4.0, "lr": 2.0e-3, "weight_decay": 0.03, "epochs": 3,
                "batch_size": 6, "reshuffle": True, "standardize_features": True},
    "gate": {"gate": "bilinear", "vlm_signal": "probs", "head_signal": "probs", "vlm_answer": "score",
             "parser": "lenient", "max_new_tokens": 7, "quant": "4bit", "vlm_dtype": "bf16", "pre_resize": 32,
             "batch_size": 4, "reshuffle": True, "epochs": 3, "lr": 2.0e-3, "weight_decay": 0.03},
}


class Stop(BaseException):
    """Raised by a spy once a run has shown what it is run for (a BaseException: no ``except
    Exception`` on the way turns it into something else)."""


# ---------------------------------------------------------------- spies on the real code

@dataclass
class Record:
    """What one run's spies saw, in call order."""
    output_dir: Path
    calls: dict[str, list] = field(default_factory=dict)
    stopped: str | None = None

    def add(self, name: str, value) -> None:
        self.calls.setdefault(name, []).append(value)

    def first(self, name: str):
        assert self.calls.get(name), f"the run never reached {name} (stopped: {self.stopped})"
        return self.calls[name][0]


def answer_ids(tokenizer) -> torch.Tensor:
    """The fixed decoded answer: the first class in double quotes (unreadable for ``strict``)."""
    from data.toy import toy_class_names

    text = '{"emotion": "%s"}' % toy_class_names(NUM_CLASSES)[0]
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def install_spies(mp: pytest.MonkeyPatch, record: Record, tokenizer) -> None:
    """Wrap the functions that receive each setting; each records what it got and calls the real one."""
    import timm
    from transformers import GenerationMixin, Trainer

    import engine.batches
    import engine.distill
    import engine.features
    import engine.gate
    import engine.vlm_answers
    import models.scorer
    import models.vlm
    import train_vlm

    def trainer_train(self, *args, **kwargs):  # stage 1: the Trainer as built, not trained
        record.add("trainer", self)
        raise Stop("Trainer.train")

    mp.setattr(Trainer, "train", trainer_train)

    real_processor = train_vlm.load_processor

    def load_processor(model_id, *args, **kwargs):
        record.add("load_processor", str(model_id))
        if not Path(str(model_id)).exists():
            raise Stop("a hub model, not downloaded here")
        return real_processor(model_id, *args, **kwargs)

    mp.setattr(train_vlm, "load_processor", load_processor)

    def load_vlm_spy(real, where):
        def load_vlm(model_id, device="cpu", dtype=None, quant=None, **kwargs):
            record.add("load_vlm", {"where": where, "model_id": str(model_id), "quant": quant, "dtype": dtype})
            if quant is not None:
                raise Stop("a 4-bit load needs CUDA and bitsandbytes")
            model = real(model_id, device, dtype=dtype, quant=quant, **kwargs)
            record.add("vlm_weights_dtype", model.get_input_embeddings().weight.dtype)
            return model
        return load_vlm

    for module in (train_vlm, engine.features, models.vlm):  # stage 1, stage 2's encoder, load_trained_vlm
        mp.setattr(module, "load_vlm", load_vlm_spy(module.load_vlm, module.__name__))

    def pre_resized_spy(real, where):
        def pre_resized(images, longest_side):
            out = real(images, longest_side)
            record.add("pre_resized", {"where": where, "longest_side": longest_side,
                                       "largest": max((max(image.size) for image in out), default=None)})
            return out
        return pre_resized

    for module in (engine.features, engine.vlm_answers):
        mp.setattr(module, "pre_resized", pre_resized_spy(module.pre_resized, module.__name__))

    real_create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        record.add("create_model", {"name": name, "pretrained": pretrained, **kwargs})
        if pretrained:  # no hub here: a random tiny ViT of the asked size stands in for the weights
            return real_create("vit_tiny_patch16_224", pretrained=False, **kwargs)
        return real_create(name, pretrained=False, **kwargs)

    mp.setattr(timm, "create_model", create_model)

    def fit_spy(real):
        def fit(model, epochs, train_epoch, evaluate, **kwargs):
            entry = {"name": kwargs["name"], "model": model, "epochs": epochs, "train_epoch": train_epoch}
            record.add("fit", entry)
            if kwargs["name"] == "teacher":  # its optimiser and loader are built: enough
                raise Stop("the teacher's first epoch")
            entry["result"] = real(model, epochs, train_epoch, evaluate, **kwargs)
            return entry["result"]
        return fit

    def fit_members_spy(real, name):  # the heads of a sweep, stage 3's gates: one entry per member
        def fit_members(model, epochs, train_epoch, evaluate, member_state, **kwargs):
            selections = real(model, epochs, train_epoch, evaluate, member_state, **kwargs)
            for index, selection in enumerate(selections):
                record.add("fit", {"name": name, "model": model.member(index), "epochs": epochs,
                                   "result": selection})
            return selections
        return fit_members

    def adam_spy(real):
        def member_adam(params, lr, weight_decay):
            optimizer = real(params, lr, weight_decay)
            record.add("optimizer", optimizer)
            return optimizer
        return member_adam

    mp.setattr(engine.distill, "fit", fit_spy(engine.distill.fit))
    for module, name in ((engine.distill, "head"), (engine.gate, "gate")):
        mp.setattr(module, "fit_members", fit_members_spy(module.fit_members, name))
        mp.setattr(module, "MemberAdam", adam_spy(module.MemberAdam))

    class RecordedOrder:
        """The first member's order, recorded each epoch as each step's rows."""

        def __init__(self, order, batch_size):
            self.order, self.batch_size = order, batch_size

        def epoch_rows(self):
            rows = self.order.epoch_rows()
            record.add("epoch_batches", [chunk.tolist() for chunk in rows.split(self.batch_size)])
            return rows

    def epoch_spy(real, module):
        def per_step_epoch(model, optimizer, inputs, targets, loss, orders, batch_size, epoch, **kwargs):
            if module is engine.gate and epoch == 1:
                record.add("gate_inputs", [tensor[0].detach().cpu() for tensor in inputs])  # the first member's
            orders = [RecordedOrder(orders[0], batch_size), *orders[1:]]
            return real(model, optimizer, inputs, targets, loss, orders, batch_size, epoch, **kwargs)
        return per_step_epoch

    real_loss = engine.distill.distillation_loss

    def distillation_loss(student, teacher, targets, alpha, temperature):
        for each in alpha if isinstance(alpha, (list, tuple)) else [alpha]:  # an ensemble's: one per member
            record.calls.setdefault("loss_settings", set()).add((each, temperature))
        return real_loss(student, teacher, targets, alpha, temperature)

    mp.setattr(engine.distill, "distillation_loss", distillation_loss)

    for module in (engine.distill, engine.gate):
        mp.setattr(module, "per_step_epoch", epoch_spy(module.per_step_epoch, module))

    real_score = models.scorer.score_classes

    def score_classes(*args, **kwargs):
        record.add("answered_by", "score")
        return real_score(*args, **kwargs)

    mp.setattr(models.scorer, "score_classes", score_classes)

    answer = answer_ids(tokenizer)

    def generate(self, input_ids=None, max_new_tokens=None, **kwargs):  # every answer the fixed one
        record.add("answered_by", "generate")
        record.add("max_new_tokens", max_new_tokens)
        return torch.cat([input_ids, answer.to(input_ids.device).expand(len(input_ids), -1)], dim=1)

    mp.setattr(GenerationMixin, "generate", generate)


# ---------------------------------------------------------------- the toy world and the runs

@dataclass
class World:
    root: Path
    data_root: Path
    vlm: Path
    base: Path       # stage 0 (synthetic) and a real stage 1 (one epoch, configs/toy_vlm.yaml)
    teacher: Path    # a random tiny ViT's teacher.pt at 32 px: what stage 2's head runs distil


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_vlm_dir) -> World:
    """3 classes of 10 training (1 of them validation) and 2 test images: small enough that every
    run below takes a few seconds."""
    import train_vlm
    from bench.world import CONFIGS, ToyRun, write_annotations
    from data.toy import make_toy_dataset, toy_class_names
    from models.teacher import build_teacher, data_config, save_teacher

    root = tmp_path_factory.mktemp("settings_reach")
    make_toy_dataset(root / "images" / "toy", num_classes=NUM_CLASSES, per_class=10, test_per_class=2, seed=0,
                     size=64)
    base = ToyRun(root / "images", root / "base", tiny_vlm_dir)
    write_annotations(base)
    train_vlm.main(train_vlm.parse(base.argv("--vlm_model", str(tiny_vlm_dir), "--config",
                                             str(CONFIGS / "toy_vlm.yaml"), "--epochs", "1", "--skip_eval")))
    torch.manual_seed(0)
    teacher = build_teacher("vit_tiny_patch16_224", NUM_CLASSES, 32, pretrained=False)
    path = save_teacher(root / "teacher.pt", teacher, "vit_tiny_patch16_224", 32, toy_class_names(NUM_CLASSES),
                        data_config(teacher, 32), False, 0.0, 1)
    return World(root, root / "images", Path(tiny_vlm_dir), root / "base", path)


# Each stage's runs: (its config, what it starts from, extra flags). "paper" is configs/paper_<stage>.yaml,
# "changed" a file of CHANGED's values; a flag given here overrides the file, so a run shows only
# the keys it leaves to the file.
RUNS = {
    "vlm": {
        "paper": ("paper", "base", ("--vlm_model", TINY, "--quant", "none", "--skip_eval")),
        "paper_vlm_model": ("paper", "base", ("--quant", "none", "--skip_eval")),
        "paper_quant": ("paper", "base", ("--vlm_model", TINY, "--skip_eval")),
        "paper_eval": ("paper", "base", ("--vlm_model", TINY, "--quant", "none", "--eval_only",
                                         "--eval_mode", "generate")),
        "changed": ("changed", "base", ("--skip_eval",)),
        "changed_eval": ("changed", "base", ("--eval_only", "--eval_mode", "generate")),
    },
    "distill": {  # stage 2 trains its teacher, or with --teacher_checkpoint distils the world's one
        "paper_teacher": ("paper", "base", ()),
        "changed_teacher": ("changed", "base", ()),
        "paper": ("paper", "base", ("--teacher_checkpoint", "<teacher>")),
        "changed": ("changed", "base", ("--teacher_checkpoint", "<teacher>")),
    },
    "gate": {  # stage 3 on stage 2's paper run (its head and caches)
        "paper": ("paper", "distill/paper", ()),
        "changed": ("changed", "distill/paper", ("--quant", "none")),
        "changed_generate": ("changed", "distill/paper", ("--quant", "none", "--vlm_answer", "generate",
                                                          "--vlm_signal", "onehot")),
        "changed_quant": ("changed", "distill/paper", ()),
    },
}
SCRIPTS = {"vlm": "train_vlm", "distill": "train_distillation", "gate": "train_gate"}


@pytest.fixture(scope="module")
def runs(world):
    """``runs(stage, name) -> Record``: each run once, on first use."""
    import importlib

    from models.vlm import load_processor

    tokenizer = load_processor(str(world.vlm)).tokenizer
    done: dict[tuple[str, str], Record] = {}

    def substitute(value):
        if isinstance(value, list):
            return [substitute(item) for item in value]
        return {TINY: str(world.vlm), "<teacher>": str(world.teacher)}.get(value, value) \
            if isinstance(value, str) else value

    def run(stage: str, name: str) -> Record:
        if (stage, name) in done:
            return done[(stage, name)]
        which, start, flags = RUNS[stage][name]
        source = world.base if start == "base" else run(*start.split("/")).output_dir
        output_dir = world.root / "runs" / f"{stage}_{name}"
        shutil.copytree(source, output_dir)
        config = REPO / "configs" / f"paper_{stage}.yaml"  # the paper's file itself
        if which == "changed":
            config = world.root / "runs" / f"{stage}_{name}.yaml"
            config.write_text(yaml.safe_dump({key: substitute(value) for key, value in CHANGED[stage].items()}),
                              encoding="utf-8")
        script = importlib.import_module(SCRIPTS[stage])
        argv = ["--dataname", "toy", "--data_root", str(world.data_root), "--output_dir", str(output_dir),
                "--num_workers", "0", "--config", str(config), *map(substitute, flags)]
        record = Record(output_dir)
        with pytest.MonkeyPatch.context() as mp:
            install_spies(mp, record, tokenizer)
            try:
                script.main(script.parse(argv))
            except Stop as stop:
                record.stopped = str(stop)
        done[(stage, name)] = record
        return record

    return run


# ---------------------------------------------------------------- what shows each key

def lora_layers(model) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def saved_modules(model) -> list[str]:
    from peft.utils import ModulesToSaveWrapper

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, ModulesToSaveWrapper)})


def lora_settings(record: Record, read: Callable) -> set:
    """``read(layer)`` of every LoRA layer of the model stage 1's Trainer was given."""
    return {read(layer) for layer in lora_layers(record.first("trainer").model).values()}


def trainer_optimizer(record: Record):
    trainer = record.first("trainer")
    return trainer.optimizer or trainer.create_optimizer()


def loader_of(train_epoch):
    from torch.utils.data import DataLoader

    return next(arg for arg in train_epoch.args if isinstance(arg, DataLoader))


def optimizer_of(train_epoch):
    return next(arg for arg in train_epoch.args if isinstance(arg, torch.optim.Optimizer))


def fitted(record: Record, name: str) -> dict:
    return next(entry for entry in record.calls.get("fit", []) if entry["name"] == name)


def teacher_loader(record: Record):
    return loader_of(fitted(record, "teacher")["train_epoch"])


def teacher_images(record: Record):
    """The image dataset the teacher's loader reads (inside engine.distill.SeededAugmentation)."""
    dataset = teacher_loader(record).dataset
    return getattr(dataset, "dataset", dataset)


def teacher_optimizer(record: Record):
    return optimizer_of(fitted(record, "teacher")["train_epoch"])


def groups(optimizer, key: str) -> set:
    if isinstance(optimizer, MemberAdam):  # one setting for every member
        return {{"lr": optimizer.lr, "weight_decay": optimizer.weight_decay, "betas": optimizer.betas,
                 "eps": optimizer.eps}[key]}
    return {group[key] for group in optimizer.param_groups}


def hidden_layers(head) -> int:
    return sum(isinstance(module, nn.Linear) for module in head.mlp) - 1


def epoch_orders_differ(record: Record) -> bool:
    orders = [sum(batches, []) for batches in record.calls["epoch_batches"]]
    assert len(orders) >= 2, "needs two epochs to compare their orders"
    return any(order != orders[0] for order in orders[1:])


def largest_batch(record: Record) -> int:
    return max(len(rows) for rows in record.calls["epoch_batches"][0])


def pre_resize_seen(record: Record, where: str) -> tuple:
    seen = [entry for entry in record.calls["pre_resized"] if entry["where"] == where]
    return {entry["longest_side"] for entry in seen}, max(entry["largest"] for entry in seen)


def pre_resize_expected(value: int) -> tuple:
    return {value}, min(value, 64) if value else 64  # the toy images are 64 px


def signal_kind(signal: torch.Tensor) -> str:
    """``onehot`` (rows of 0/1 with at most one 1), ``probs`` (rows summing to 1), else ``logits``."""
    if bool(((signal == 0) | (signal == 1)).all()) and bool((signal.sum(dim=1) <= 1).all()):
        return "onehot"
    if bool((signal >= 0).all()) and torch.allclose(signal.sum(dim=1), torch.ones(len(signal))):
        return "probs"
    return "logits"


def gate_name(model) -> str:
    from models.gates import GATES

    return next(name for name, cls in GATES.items() if type(model) is cls)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEACHER_RUNS = ("paper_teacher", "changed_teacher")


def same(value):
    return value


@dataclass(frozen=True)
class Check:
    """A key's check: ``observe(record)`` of the run with the paper's value (``runs[0]``) and of the
    run with the changed one (``runs[1]``) must equal ``expect(value)``."""
    observe: Callable[[Record], Any]
    expect: Callable[[Any], Any] = same
    runs: tuple[str, str] = ("paper", "changed")


CHECKS: dict[str, dict[str, Check]] = {
    "vlm": {
        # the model stage 1 loads (a hub id is not downloaded here: the run stops at its processor)
        "vlm_model": Check(lambda r: r.first("load_processor"), runs=("paper_vlm_model", "changed")),
        # how the base loads: 4-bit NF4 (stops there: CUDA and bitsandbytes) or full precision
        "quant": Check(lambda r: r.first("load_vlm")["quant"], lambda v: None if v == "none" else v,
                       runs=("paper_quant", "changed")),
        # the LoRA modules of the model the Trainer gets
        "lora_r": Check(lambda r: lora_settings(r, lambda m: m.r["default"]), lambda v: {v}),
        "lora_alpha": Check(lambda r: lora_settings(r, lambda m: m.lora_alpha["default"]), lambda v: {v}),
        "lora_dropout": Check(lambda r: lora_settings(r, lambda m: m.lora_dropout["default"].p), lambda v: {v}),
        "target_modules": Check(lambda r: sorted({name.rsplit(".", 1)[-1]
                                                  for name in lora_layers(r.first("trainer").model)}), sorted),
        "modules_to_save": Check(lambda r: saved_modules(r.first("trainer").model), sorted),
        # the Trainer's settings and its optimiser
        "epochs": Check(lambda r: r.first("trainer").args.num_train_epochs),
        "lr": Check(lambda r: groups(trainer_optimizer(r), "lr"), lambda v: {v}),
        "lr_scheduler": Check(lambda r: r.first("trainer").args.lr_scheduler_type.value),
        "warmup_ratio": Check(lambda r: r.first("trainer").args.get_warmup_steps(1000) / 1000),
        "max_grad_norm": Check(lambda r: r.first("trainer").args.max_grad_norm),
        "batch_size": Check(lambda r: r.first("trainer").args.per_device_train_batch_size),
        # the conversations the Trainer trains on (the world's stage 0 wrote text for every image)
        "tasks": Check(lambda r: sorted({example["task"] for example in r.first("trainer").train_dataset}), sorted),
        # the decoding limit of the test evaluation (--eval_mode generate)
        "max_new_tokens": Check(lambda r: r.first("max_new_tokens"), runs=("paper_eval", "changed_eval")),
    },
    "distill": {
        # the frozen encoder's weights and the images it is given
        "feature_dtype": Check(lambda r: r.first("vlm_weights_dtype"), DTYPES.get),
        "pre_resize": Check(lambda r: pre_resize_seen(r, "engine.features"), pre_resize_expected),
        # the teacher asked of timm, its training images, optimiser, loader and epochs
        "teacher_model": Check(lambda r: r.first("create_model")["name"], lambda v: v[0] if isinstance(v, list) else v,
                               runs=TEACHER_RUNS),
        # the interpolation the teacher's training images are resized with (the changed vit_tiny's own: bicubic)
        "teacher_data_config": Check(lambda r: teacher_images(r).transform.transforms[0].interpolation.value,
                                     lambda v: {"reference": "bilinear", "timm": "bicubic"}[v], runs=TEACHER_RUNS),
        # (the size timm is asked for, and that of the images the teacher trains on)
        "teacher_img_size": Check(lambda r: (r.first("create_model")["img_size"],
                                             teacher_loader(r).dataset[0][0].shape[-1]),
                                  lambda v: (v, v), runs=TEACHER_RUNS),
        "no_teacher_pretrained": Check(lambda r: not r.first("create_model")["pretrained"], runs=TEACHER_RUNS),
        "teacher_lr": Check(lambda r: groups(teacher_optimizer(r), "lr"), lambda v: {v}, runs=TEACHER_RUNS),
        "teacher_weight_decay": Check(lambda r: groups(teacher_optimizer(r), "weight_decay"), lambda v: {v},
                                      runs=TEACHER_RUNS),
        # (the global batch: split across the processes under a launcher, whole in one process)
        "teacher_batch_size": Check(lambda r: (teacher_loader(r).batch_sampler.batch_size,
                                               len(next(iter(teacher_loader(r).batch_sampler)))),
                                    lambda v: (v, v), runs=TEACHER_RUNS),
        "teacher_epochs": Check(lambda r: fitted(r, "teacher")["epochs"], runs=TEACHER_RUNS),
        "teacher_precision": Check(lambda r: fitted(r, "teacher")["train_epoch"].keywords["precision"],
                                   runs=TEACHER_RUNS),
        # the head trained: its layers, loss, optimiser, epochs, batches and order
        "depth": Check(lambda r: [hidden_layers(e["model"]) for e in r.calls["fit"] if e["name"] == "head"]),
        "alpha": Check(lambda r: sorted({alpha for alpha, _ in r.calls["loss_settings"]})),
        "temperature": Check(lambda r: {t for _, t in r.calls["loss_settings"]}, lambda v: {v}),
        "lr": Check(lambda r: groups(r.first("optimizer"), "lr"), lambda v: {v}),
        "weight_decay": Check(lambda r: groups(r.first("optimizer"), "weight_decay"), lambda v: {v}),
        "epochs": Check(lambda r: len(fitted(r, "head")["result"].history)),
        "batch_size": Check(largest_batch),
        "reshuffle": Check(epoch_orders_differ),
        "standardize_features": Check(lambda r: not bool((fitted(r, "head")["model"].feature_std == 1).all())),
    },
    "gate": {
        # the gate trained, its inputs, optimiser, epochs, batches and order
        "gate": Check(lambda r: gate_name(r.first("fit")["model"])),
        "vlm_signal": Check(lambda r: signal_kind(r.first("gate_inputs")[0])),
        "head_signal": Check(lambda r: signal_kind(r.first("gate_inputs")[1])),
        # how the VLM answered, how its answer was read, and how it was loaded
        "vlm_answer": Check(lambda r: sorted(set(r.calls["answered_by"])), lambda v: [v]),
        # the fixed answer is unreadable for `strict` (a zero vector), read for `lenient`
        "parser": Check(lambda r: {float(s) for s in r.first("gate_inputs")[0].sum(dim=1)},
                        lambda v: {"strict": {0.0}, "lenient": {1.0}}[v], runs=("paper", "changed_generate")),
        "max_new_tokens": Check(lambda r: r.first("max_new_tokens"), runs=("paper", "changed_generate")),
        "quant": Check(lambda r: r.first("load_vlm")["quant"], lambda v: None if v == "none" else v,
                       runs=("paper", "changed_quant")),
        "vlm_dtype": Check(lambda r: r.first("vlm_weights_dtype"), DTYPES.get),
        "pre_resize": Check(lambda r: pre_resize_seen(r, "engine.vlm_answers"), pre_resize_expected),
        "batch_size": Check(largest_batch),
        "reshuffle": Check(epoch_orders_differ),
        "epochs": Check(lambda r: len(r.first("fit")["result"].history)),
        "lr": Check(lambda r: groups(r.first("optimizer"), "lr"), lambda v: {v}),
        "weight_decay": Check(lambda r: groups(r.first("optimizer"), "weight_decay"), lambda v: {v}),
    },
}

KEYS = [(stage, key) for stage in STAGES for key in PAPER[stage]]


@pytest.mark.parametrize("stage, key", KEYS, ids=[f"{stage}-{key}" for stage, key in KEYS])
def test_config_key_reaches_what_is_trained(stage, key, runs, world):
    """The paper's value and another one each show in what the stage builds or trains."""
    assert key in CHECKS[stage], (f"configs/paper_{stage}.yaml: no check shows that `{key}` reaches the code; add "
                                  f"one to CHECKS[{stage!r}] (and another value to CHANGED) in {Path(__file__).name}")
    assert key in CHANGED[stage] and CHANGED[stage][key] != PAPER[stage][key], f"CHANGED[{stage!r}][{key!r}]"
    check = CHECKS[stage][key]
    for name, value in zip(check.runs, (PAPER[stage][key], CHANGED[stage][key])):
        value = str(world.vlm) if value == TINY else value
        assert check.observe(runs(stage, name)) == check.expect(value), f"{stage} run {name!r}: {key} = {value!r}"


# ---------------------------------------------------------------- settings built into the method

@pytest.mark.parametrize("name", ["paper", "changed"])
def test_head_has_gelu_and_dropout_0_1_active_in_training_only(runs, name):
    """Each hidden layer of the head stage 2 trains (and of the head.pt it saves) is Linear, exact
    GELU and dropout 0.1, widths 1024, 512, ...; the dropout acts in training, not in evaluation."""
    from models.heads import HIDDEN_WIDTHS, load_head

    record = runs("distill", name)
    head = fitted(record, "head")["model"]
    saved, _ = load_head(next((record.output_dir / "toy" / "distill" / "runs").iterdir()))
    for model in (head, saved):
        depth = hidden_layers(model)
        assert depth == (CHANGED if name == "changed" else PAPER)["distill"]["depth"][0]
        layers = list(model.mlp)
        assert len(layers) == 3 * depth + 1
        width = model.in_dim
        for index, hidden in enumerate(HIDDEN_WIDTHS[:depth]):
            linear, activation, dropout = layers[3 * index:3 * index + 3]
            assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (width, hidden)
            assert type(activation) is nn.GELU and activation.approximate == "none", activation
            assert type(dropout) is nn.Dropout and dropout.p == 0.1, dropout
            width = hidden
        assert isinstance(layers[-1], nn.Linear) and (layers[-1].in_features, layers[-1].out_features) == \
            (width, NUM_CLASSES)
        features = torch.randn(16, model.in_dim)
        with torch.no_grad():
            model.train()
            assert not torch.equal(model(features), model(features)), "no dropout in training"
            model.eval()
            assert torch.equal(model(features), model(features)), "dropout in evaluation"


def test_gate_starts_from_pytorch_default_init_drawn_from_its_seed(tmp_path, monkeypatch):
    """Stage 3 builds each gate right after seeding with its seed: PyTorch's default initialisation
    (a linear layer uniform in +-1/sqrt(fan-in)), the same whichever gates trained before it."""
    import engine.gate
    import train_gate
    from engine.gate import GateData
    from models.gates import build_gate

    starts = []
    real_build = engine.gate.build_gate

    def build(name, num_classes):
        gate = real_build(name, num_classes)
        starts.append((name, {key: value.clone() for key, value in gate.state_dict().items()}))
        return gate

    monkeypatch.setattr(engine.gate, "build_gate", build)
    classes = 4
    generator = torch.Generator().manual_seed(0)

    def split(count: int) -> GateData:
        labels = torch.arange(count) % classes
        return GateData(vlm_pred=labels, vlm_signal=nn.functional.one_hot(labels, classes).float(),
                        head_logits=torch.randn(count, classes, generator=generator), labels=labels)

    data = {"train": split(12), "val": split(8)}
    for seed in (42, 7):
        args = train_gate.parse(["--dataname", "toy", "--epochs", "1", "--seed", str(seed)])
        torch.manual_seed(1234)  # whatever state an earlier computation left
        train_gate.fit_gates([args], ["bilinear", "concat_linear"], data, classes, "cpu", [tmp_path / "log.txt"])
    assert [name for name, _ in starts] == ["bilinear", "concat_linear"] * 2
    for (name, state), seed in zip(starts, (42, 42, 7, 7)):
        torch.manual_seed(seed)
        fresh = build_gate(name, classes).state_dict()
        assert state.keys() == fresh.keys() and all(torch.equal(state[key], fresh[key]) for key in state), \
            f"{name} (seed {seed}) does not start from the seeded default initialisation"
    torch.manual_seed(42)
    linear = nn.Linear(2 * classes, classes)
    concat = starts[1][1]
    assert torch.equal(concat["linear.weight"], linear.weight.detach()) and torch.equal(concat["linear.bias"],
                                                                                          linear.bias.detach())
    assert concat["linear.weight"].abs().max() <= (2 * classes) ** -0.5
    assert not torch.equal(starts[1][1]["linear.weight"], starts[3][1]["linear.weight"])  # seed 42 vs 7


@pytest.mark.parametrize("name", ["paper", "changed"])
def test_lora_adapts_the_language_model_without_biases(runs, name):
    """Stage 1 trains the LoRA matrices of the language model's projections only (bias "none", the
    visual encoder excluded), plus the modules to save; every base weight stays frozen."""
    from peft.tuners.lora import LoraLayer

    from models.backbones import visual_modules

    model = runs("vlm", name).first("trainer").model
    saved = CHANGED["vlm"]["modules_to_save"] if name == "changed" else PAPER["vlm"]["modules_to_save"]
    trainable = [key for key, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in key or ".lora_B." in key
                             or any(f".{module}.modules_to_save." in key for module in saved) for key in trainable)
    assert not any(key.endswith("bias") and "lora_" in key for key, _ in model.named_parameters())
    assert not any(isinstance(module, LoraLayer) for visual in visual_modules(model) for module in visual.modules())


def test_optimisers_are_the_references(runs):
    """Adam (not AdamW) with torch's defaults for the teacher, the head and the gate, as the
    reference code (the head and the gate through MemberAdam: torch's fused Adam kernel on each
    member, without amsgrad); AdamW without weight decay for stage 1, the Trainer's."""
    teacher = teacher_optimizer(runs("distill", "paper_teacher"))
    assert type(teacher) is torch.optim.Adam and groups(teacher, "amsgrad") == {False}
    optimisers = [teacher, runs("distill", "paper").first("optimizer"), runs("gate", "paper").first("optimizer")]
    assert [type(optimizer) for optimizer in optimisers[1:]] == [MemberAdam, MemberAdam]
    for optimizer in optimisers:
        assert groups(optimizer, "betas") == {(0.9, 0.999)} and groups(optimizer, "eps") == {1e-8}
    trainer = trainer_optimizer(runs("vlm", "paper"))
    assert isinstance(trainer, torch.optim.AdamW) and groups(trainer, "weight_decay") == {0.0}
    assert groups(trainer, "betas") == {(0.9, 0.999)}


def test_every_check_names_a_key_of_the_paper_configs():
    """No check, and no changed value, for a key the paper's files no longer have."""
    for stage in STAGES:
        assert set(CHECKS[stage]) <= set(PAPER[stage]), set(CHECKS[stage]) - set(PAPER[stage])
        assert set(CHANGED[stage]) <= set(PAPER[stage]), set(CHANGED[stage]) - set(PAPER[stage])
