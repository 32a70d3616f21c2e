"""Typed stage records: what each stage folder's ``meta.json`` says, one dataclass per stage.

    InstructionsRecord  instructions/meta.json                      (generate_instructions.py)
    VLMRecord           vlm/meta.json                               (train_vlm.py)
    ZeroShotRecord      vlm_zero_shot/<model name>/meta.json        (train_vlm.py --eval_only --zero_shot)
    TeacherRecord       teacher/meta.json                           (train_distillation.py)
    DistillRecord       distill/meta.json, distill/runs/<run>/...   (train_distillation.py)
    GateRecord          gate/meta.json                              (train_gate.py)
    GateProvenance      gate/gate.pt, beside the weights            (train_gate.py)

A record's fields are the keys on disk, in their order. ``load(folder, dataname)`` reads a finished
stage's meta.json, format-checked by ``utils.checkpoints.read_meta`` (a missing folder, another
``format_version``, a missing key or a value not of its field's type is one UserError line naming
the file, the key and the command that rewrites it); ``write(folder)`` writes it, stamped (a stage
writes it last). Fields that older folders may lack default to None; a reader that needs one asks
for it with ``need``. ``check_run`` refuses an output made for other classes or on
another base VLM than the current run's; ``check_built_on`` refuses one that was not built on the
record it is given, blaming the later stage (the one to rerun).

The gate's provenance (how stage 3 computed its inputs, the adapter and head it fuses) is stored in
``gate.pt`` only (``models.gates.save_gate`` / ``load_gate``); :class:`GateProvenance` is that part
of ``gate.pt``, and its ``check_built_on`` holds the gate against stage 1's and stage 2's records.
"""
from __future__ import annotations

import types
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, Sequence, Union, get_args, get_origin, get_type_hints

from utils.checkpoints import META_FILE, STAGE_COMMANDS, read_meta, rewrite_hint, write_meta
from utils.errors import UserError


def _from_dict(cls, record: dict, path: str | Path, stage: str, dataname: str):
    """An instance of the record class ``cls`` from ``record``'s keys (others are ignored); a
    required key that is missing, or a value not of its field's type, is a UserError naming the
    file, the key and the command rewriting it."""
    missing = [field.name for field in fields(cls) if field.name not in record
               and field.default is MISSING and field.default_factory is MISSING]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} recorded; {rewrite_hint(stage, dataname)}")
    hints = get_type_hints(cls)
    for field in fields(cls):
        if field.name in record and not _fits(record[field.name], hints[field.name]):
            shown = repr(record[field.name])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise UserError(f"{path}: {field.name} is {shown}, not {field.type}; {rewrite_hint(stage, dataname)}")
    names = {field.name for field in fields(cls)}
    return cls(**{key: value for key, value in record.items() if key in names})


def _fits(value, hint) -> bool:
    """Whether a JSON value fits a field's type (``int | None``, ``list[str]``, ``float``, ...)."""
    if get_origin(hint) in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(item, get_args(hint)[0]) for item in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, get_origin(hint) or hint)


def _rerun(folder: str | Path, stage: str, dataname: str, problem: str) -> UserError:
    """A mismatch between stages, blamed on ``stage``: its folder, the problem, its command."""
    return UserError(f"{folder}: {problem}; rerun `{STAGE_COMMANDS[stage].format(dataname=dataname)}`")


@dataclass(frozen=True, kw_only=True)
class StageRecord:
    """A finished stage's ``meta.json``; each stage's record adds its own fields."""
    STAGE: ClassVar[str] = ""
    class_names: list[str]

    @classmethod
    def load(cls, folder: str | Path, dataname: str = "<dataname>"):
        """The record of ``folder``; a missing, unreadable or incomplete one is a UserError naming the command."""
        meta = read_meta(folder, cls.STAGE, dataname)
        return _from_dict(cls, meta, Path(folder) / META_FILE, cls.STAGE, dataname)

    def need(self, folder: str | Path, *keys: str, dataname: str = "<dataname>"):
        """This record, when it records each of ``keys`` (fields older folders may lack, that the
        caller cannot do without); otherwise a UserError naming the file and the command."""
        missing = [key for key in keys if getattr(self, key) is None]
        if missing:
            raise UserError(f"{Path(folder) / META_FILE}: no {', '.join(missing)} recorded; "
                            f"{rewrite_hint(self.STAGE, dataname)}")
        return self

    def write(self, folder: str | Path) -> Path:
        """``<folder>/meta.json``, stamped with this code's format."""
        values = asdict(self)
        return write_meta(folder, self.STAGE, values.pop("class_names"), **values)

    def check_run(self, folder: str | Path, class_names: Sequence[str] | None = None,
                  base_model: str | None = None) -> None:
        """Refuse a stage output trained for other classes or on another base VLM than this run's."""
        if class_names is not None and list(self.class_names) != list(class_names):
            raise UserError(f"{folder}: trained for classes {self.class_names}, but this run has "
                            f"{list(class_names)}; retrain that stage for this dataset")
        recorded = getattr(self, "base_model", None)
        if base_model is not None and recorded not in (None, base_model):
            raise UserError(f"{folder}: built on VLM {recorded!r}, but --vlm_model is "
                            f"{base_model!r}; pass the same --vlm_model or retrain that stage")


# Stage 1's conversations per training image (train_vlm.py --tasks; data.annotations builds them):
# a VLMRecord without ``tasks`` was trained on all three.
TASKS = ("observation", "reasoning", "categorical")


@dataclass(frozen=True, kw_only=True)
class InstructionsRecord(StageRecord):
    """Stage 0: who wrote the annotations and how many training images they cover."""
    STAGE: ClassVar[str] = "instructions"
    generator: str
    num_annotated: int | None = None
    num_train: int | None = None
    num_rejected: int | None = None
    num_mentions_label: int | None = None
    complete: bool | None = None


@dataclass(frozen=True, kw_only=True)
class VLMRecord(StageRecord):
    """Stage 1: the base VLM the adapter was trained on, the adapter's id and its training settings."""
    STAGE: ClassVar[str] = "vlm"
    base_model: str
    base_config_id: str | None = None  # lets a later stage accept the same local base folder, moved
    adapter_id: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    modules_to_save: list[str] | None = None
    target_modules: list[str] | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    quant: str | None = None  # "4bit", or None: full precision
    train_on_prompt: bool | None = None
    epochs: int | None = None
    counts: dict | None = None
    reference_annotations: dict | None = None  # trained on the authors' JSON: ReferenceReport.counts()
    # How the training ran (None in a meta.json written before they were recorded): the attention
    # implementation (transformers' name, e.g. "sdpa"), gradient checkpointing, and whether the
    # validation split was scored after each epoch (log.txt's val_acc; the last epoch is saved either way).
    attn_implementation: str | None = None
    gradient_checkpointing: bool | None = None
    eval_every_epoch: bool | None = None
    # The conversations trained on (--tasks, in data.annotations.TASKS order); None in a meta.json
    # written before it was recorded: all three.
    tasks: list[str] | None = None


@dataclass(frozen=True, kw_only=True)
class ZeroShotRecord(StageRecord):
    """A base VLM evaluated as it is, without an adapter (``train_vlm.py --eval_only --zero_shot``):
    which base, how it was loaded and its pixel budget. Its folder is :func:`zero_shot_folder`; its
    ``eval_<mode>/metrics.json`` has the tuned VLM's evaluation keys plus ``zero_shot`` and ``base_model``."""
    STAGE: ClassVar[str] = "vlm_zero_shot"
    base_model: str
    base_config_id: str | None = None
    zero_shot: bool = True
    min_pixels: int | None = None
    max_pixels: int | None = None
    quant: str | None = None  # "4bit", or None: full precision
    vlm_dtype: str | None = None  # the unquantised weights' dtype ("fp32": as the tuned VLM is evaluated)


def zero_shot_name(model_id: str | Path) -> str:
    """The folder name of a base VLM's zero-shot evaluation: the last part of its hub id or local
    folder (``Qwen/Qwen2-VL-7B-Instruct`` -> ``Qwen2-VL-7B-Instruct``)."""
    path = Path(str(model_id).rstrip("/\\"))
    return path.name or path.resolve().name or "base"


def zero_shot_folder(output_dir: str | Path, dataname: str, model_id: str | Path) -> Path:
    """``<output_dir>/<dataname>/vlm_zero_shot/<model name>/``: beside ``vlm/``, never inside it."""
    return Path(output_dir) / dataname / ZeroShotRecord.STAGE / zero_shot_name(model_id)


@dataclass(frozen=True, kw_only=True)
class TeacherRecord(StageRecord):
    """Stage 2's teacher: which timm model at which size, trained on which images."""
    STAGE: ClassVar[str] = "teacher"
    model: str | None = None
    img_size: int | None = None
    pretrained: bool | None = None
    teacher_id: str | None = None
    best_val_acc: float | None = None
    epoch: int | None = None
    train_images: str | None = None  # utils.cache.image_list_id of the training split
    val_images: str | None = None
    # --teacher_data_config: "reference" (mean/std 0.5, bilinear, 384 px by default) or "timm" (the
    # checkpoint's own), and the resolved config (as in teacher.pt); None in a record written before.
    preprocessing: str | None = None
    data_config: dict | None = None

    def check_reusable(self, folder: str | Path, class_names: Sequence[str], model: str, img_size: int,
                       split_ids: dict[str, str], preprocessing: str | None = None) -> None:
        """Refuse to reuse this teacher for a run with other classes, another model or size, other
        training or validation images (``split_ids``: ``train_images`` and ``val_images``), or
        another ``preprocessing`` (where both the record and the run name one)."""
        if list(self.class_names) != list(class_names):
            raise UserError(f"{folder}: trained for classes {self.class_names}, but this run has "
                            f"{list(class_names)}; retrain that stage for this dataset; or pass --retrain_teacher")
        if (self.model, self.img_size) != (model, img_size):
            raise UserError(f"{folder}: holds teacher {self.model} at {self.img_size} px, but this run "
                            f"asks for --teacher_model {model} at {img_size} px; pass those flags, "
                            "or --retrain_teacher to replace it")
        if None not in (self.preprocessing, preprocessing) and self.preprocessing != preprocessing:
            raise UserError(f"{folder}: holds teacher {self.model} trained with --teacher_data_config "
                            f"{self.preprocessing}, but this run asks for {preprocessing}; pass that flag, "
                            "or --retrain_teacher to replace it")
        recorded = {"train_images": self.train_images, "val_images": self.val_images}
        changed = [name for name, value in split_ids.items() if recorded.get(name) != value]
        if changed:
            raise UserError(f"{folder}: the teacher was trained on other {' and '.join(changed)} (the data split "
                            "changed); pass --retrain_teacher to replace it")


@dataclass(frozen=True, kw_only=True)
class DistillRecord(StageRecord):
    """Stage 2's head (the top-level ``distill/`` or one run of a sweep): the VLM whose features it
    reads, its id, the teacher it was distilled from, its setting and how the features were encoded."""
    STAGE: ClassVar[str] = "distill"
    base_model: str
    head_id: str
    teacher_id: str | None = None
    teacher_checkpoint: str | None = None
    # The further teacher of --teacher_model A B ... it was distilled from, as named there (its run
    # is teacher=<name>,depth=..); None: the stage's own teacher in teacher/ (the first named).
    teacher: str | None = None
    adapter_id: str | None = None
    in_dim: int | None = None
    run: str  # the run's name, e.g. depth=1,alpha=0.5,seed=42 (utils.sweeps.run_name)
    depth: int | None = None
    alpha: float | None = None
    seed: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    feature_dtype: str | None = None  # e.g. "torch.float32": the dtype the feature cache was encoded in
    # The longer side images were shrunk to before the processor (data.datasets.pre_resize; 0: not);
    # None in a record written before it was recorded: no pre-resize, as stage 2 then encoded.
    pre_resize: int | None = None

    def check_built_on(self, vlm: VLMRecord, folder: str | Path, vlm_dir: str | Path,
                       dataname: str = "<dataname>") -> None:
        """Refuse a head trained for other classes than stage 1's, or on the features of another base VLM."""
        if list(self.class_names) != list(vlm.class_names):
            raise _rerun(folder, "distill", dataname, f"trained for classes {list(self.class_names)}, "
                         f"but stage 1 ({vlm_dir}) has {list(vlm.class_names)}")
        if self.base_model != vlm.base_model:
            raise UserError(f"{folder}: head trained on features of VLM {self.base_model!r}, but the "
                            f"stage-1 adapter in {vlm_dir} is on {vlm.base_model!r}; rerun "
                            f"`python train_distillation.py --dataname {dataname} --vlm_model {vlm.base_model}`")


@dataclass(frozen=True, kw_only=True)
class GateRecord(StageRecord):
    """Stage 3's ``gate/meta.json``: it only names ``gate.pt`` (the selected variant and the file's
    id); the gate's provenance is in ``gate.pt`` itself (:class:`GateProvenance`)."""
    STAGE: ClassVar[str] = "gate"
    gate: str
    gate_id: str


@dataclass(frozen=True, kw_only=True)
class GateProvenance:
    """What ``gate.pt`` records beside the weights about how the gate was made: how its VLM input
    was computed (the predictor computes it the same way) and the adapter and head it fuses."""
    vlm_signal: str
    vlm_answer: str
    parser: str
    max_new_tokens: int
    quant: str  # how the VLM answering was loaded: "4bit" or "none"
    adapter_id: str | None
    head_id: str
    base_model: str | None = None
    head_run: str | None = None
    # The dtype of the VLM's unquantised weights, "fp32" or "bf16" (stage 3's --vlm_dtype); None in a
    # gate.pt written before it was recorded: the checkpoint's own dtype, as the VLM loaded then.
    vlm_dtype: str | None = None
    # What the gate was given of the head (stage 3's --head_signal): "logits" or "probs", their
    # softmax; a gate.pt written before it was recorded was given the logits.
    head_signal: str = "logits"
    # The longer side images were shrunk to before the VLM answered (data.datasets.pre_resize; 0: not);
    # None in a gate.pt written before it was recorded: no pre-resize, as stage 3 then answered.
    pre_resize: int | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, path: str | Path, dataname: str = "<dataname>") -> GateProvenance:
        """The provenance part of a ``gate.pt`` record (``models.gates.load_gate``'s dict)."""
        return _from_dict(cls, checkpoint, path, "gate", dataname)

    def check_built_on(self, class_names: Sequence[str], vlm: VLMRecord, head: DistillRecord,
                       folder: str | Path, vlm_dir: str | Path, dataname: str = "<dataname>") -> None:
        """Refuse a gate (trained for ``class_names``) not built on stage 1's adapter and stage 2's head."""
        if list(class_names) != list(vlm.class_names):
            raise _rerun(folder, "gate", dataname, f"trained for classes {list(class_names)}, "
                         f"but stage 1 ({vlm_dir}) has {list(vlm.class_names)}")
        if self.base_model != vlm.base_model:
            raise _rerun(folder, "gate", dataname, f"built on VLM {self.base_model!r}, but "
                         f"stage 1 ({vlm_dir}) trained {vlm.base_model!r}")
        if self.adapter_id != vlm.adapter_id:
            raise _rerun(folder, "gate", dataname, f"trained on the answers of another stage-1 adapter "
                         f"({self.adapter_id}, now {vlm.adapter_id})")
        if self.head_id != head.head_id:
            raise _rerun(folder, "gate", dataname, f"trained on another distilled head "
                         f"({self.head_id}, now {head.head_id})")
