"""EmoVLM-KD as one predictor: the stage-1 VLM, the stage-2 distilled head and the stage-3 gate.

``EmoVLMKD.from_outputs(output_dir, dataname)`` loads the three parts from their stage folders
(``EmoVLMKD.from_pretrained(folder)`` from an export of them, engine/export.py; ``EmoVLMKD.from_args``
picks one of the two from a script's --model / --dataname flags, for demo.py and predict.py)
and refuses, naming the stage to rerun, parts that are missing, damaged (``gate.pt``, ``head.pt`` and
the adapter are checked against the ids their records hold) or were not built on each other
(class names, base VLM, adapter and head ids). ``predict`` / ``predict_batch`` compute every
module's output for PIL images: the gate's VLM input is obtained exactly as stage 3 obtained it
(the ``vlm_signal`` / ``vlm_answer`` settings saved in ``gate.pt``), and so is its head input
(``head_signal``), so a test image gets the prediction stage 3's evaluation gave it. No Gradio here: demo.py wraps this class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from data.annotations import prompt_messages
from data.datasets import pre_resized, to_rgb
from data.prompts import OBSERVATION_QUESTION, REASONING_QUESTION, categorical_answer
from engine.features import recorded_dtype
from models.chat import generate_texts
from models.gates import GATE_FILE, gate_weights, head_gate_inputs, load_gate, vlm_gate_inputs
from models.heads import load_head
from models.scorer import predict_vlm
from models.vlm import ADAPTER_FILE, head_features, load_processor, load_trained_vlm, vlm_torch_dtype
from utils.checkpoints import META_FILE, verify_file
from utils.errors import UserError, first_line, network_errors
from utils.io import read_json
from utils.records import DistillRecord, GateProvenance, GateRecord, VLMRecord

DEFAULT_MAX_IMAGE_SIDE = 4096
DEFAULT_MAX_UPLOAD_PIXELS = 64_000_000


def require_model_source(args) -> None:
    """A script's flags must name a model: --model (an export) or --dataname (the stage folders under
    --output_dir); the scripts check this before any other work, ``EmoVLMKD.from_args`` again."""
    if not getattr(args, "model", None) and not getattr(args, "dataname", None):
        raise UserError("give --dataname (the stage folders under --output_dir) or --model (an export folder or Hub repo id)")


def open_upload(path: str | Path, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
                max_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS) -> Image.Image:
    """Decode an uploaded file as RGB, the way the datasets are read.

    Non-images and images above ``max_pixels`` are a UserError (checked from the header, before
    decoding); a longer side above ``max_image_side`` is shrunk to it, which bounds the decoding
    work (the VLM's processor resizes to its own pixel budget anyway).
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise UserError(f"the image is {width}x{height} pixels ({width * height / 1e6:.0f} MP); "
                                f"the limit is {max_pixels / 1e6:.0f} MP: upload a smaller image")
            if max(width, height) > max_image_side:
                img.draft("RGB", (max_image_side, max_image_side))  # JPEG: decode at reduced scale
                img.thumbnail((max_image_side, max_image_side))
            return to_rgb(img)  # the same pixels as the datasets' images
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        reason = "too large to decode safely" if isinstance(err, Image.DecompressionBombError) \
            else "not an image that can be decoded"
        raise UserError(f"{Path(path).name}: {reason}; upload a JPEG, PNG, WebP, BMP or GIF image") from None


def _as_dict(probs: torch.Tensor, class_names: Sequence[str]) -> dict[str, float]:
    return {name: float(p) for name, p in zip(class_names, probs)}


# An export (engine/export.py) is one folder: vlm/, distill/, gate/ as the stages wrote them (the
# files the predictor reads), and this file naming the dataset and the ids that tie them.
EXPORT_FILE = "export.json"
EXPORT_FORMAT = "emovlm-kd-export"
EXPORT_VERSION = 1


def export_folder(name: str | Path) -> Path:
    """An export's local folder: ``name`` itself when it exists, else a Hub model repo id
    (``owner/name``) downloaded with huggingface_hub's ``snapshot_download`` (its cache, its token:
    ``HF_TOKEN`` or the login). Neither: a UserError naming it."""
    path = Path(name)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        raise UserError(f"{name}: no such folder, and not a Hub repo id (owner/name); give an export's folder "
                        "(`python -m engine.export`) or its repo id") from None
    try:
        return Path(snapshot_download(repo_id=str(name), repo_type="model"))
    except LocalEntryNotFoundError:
        raise UserError(f"{name}: no such folder, and the Hub repo is not in the local cache "
                        "(offline, or no connection); download it where there is a connection") from None
    except HfHubHTTPError as err:
        raise UserError(f"{name}: no such folder, and the Hub did not give the repo ({first_line(err)}); "
                        "check the id and HF_TOKEN for a private repo") from None
    except network_errors() as err:
        raise UserError(f"{name}: no such folder, and the Hub could not be reached ({first_line(err)})") from None


def read_export(folder: str | Path) -> dict:
    """``export.json`` of an export folder; anything else is a UserError naming the command that writes one."""
    path = Path(folder) / EXPORT_FILE
    try:
        export = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{folder}: not an EmoVLM-KD export (no {EXPORT_FILE}); write one with "
                        "`python -m engine.export --dataname <dataname> --out <folder>`") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it ({first_line(err)}); export again with "
                        "`python -m engine.export`") from None
    if not isinstance(export, dict) or export.get("format") != EXPORT_FORMAT \
            or export.get("format_version") != EXPORT_VERSION or not isinstance(export.get("dataname"), str):
        raise UserError(f"{path}: not an export of this code's format (format {EXPORT_FORMAT!r}, version "
                        f"{EXPORT_VERSION}); export again with `python -m engine.export`")
    return export


@dataclass(frozen=True)
class Parts:
    """The small parts of a finished run, checked against each other (:func:`check_parts`)."""
    vlm_dir: Path
    vlm_record: VLMRecord
    distill_record: DistillRecord
    gate_record: GateRecord
    provenance: GateProvenance
    checkpoint: dict
    head: torch.nn.Module
    gate: torch.nn.Module


def check_parts(vlm_dir: Path, distill_dir: Path, gate_dir: Path, dataname: str,
                verify_adapter: bool = False) -> Parts:
    """Read and check stage 1's record, stage 2's head and stage 3's gate (not the VLM; the adapter
    file too with ``verify_adapter``, else the VLM's loading checks it): a part that is missing,
    damaged or not built on the others is a UserError naming the stage to rerun."""
    vlm_record = VLMRecord.load(vlm_dir, dataname).need(vlm_dir, "adapter_id", dataname=dataname)
    if verify_adapter:
        verify_file(vlm_dir / ADAPTER_FILE, vlm_record.adapter_id, "adapter_id", vlm_dir / META_FILE, "vlm", dataname)
    distill_record = DistillRecord.load(distill_dir, dataname)
    gate_record = GateRecord.load(gate_dir, dataname)
    if (gate_dir / GATE_FILE).is_file():  # a missing one: load_gate says stage 3 did not finish
        verify_file(gate_dir / GATE_FILE, gate_record.gate_id, "gate_id", gate_dir / META_FILE, "gate", dataname)
    gate, checkpoint = load_gate(gate_dir, dataname)
    provenance = GateProvenance.from_checkpoint(checkpoint, gate_dir / GATE_FILE, dataname)
    # A later stage is blamed for a mismatch with an earlier one: it is the one to retrain.
    distill_record.check_built_on(vlm_record, distill_dir, vlm_dir, dataname)
    provenance.check_built_on(checkpoint["class_names"], vlm_record, distill_record, gate_dir, vlm_dir, dataname)
    head, _ = load_head(distill_dir, dataname=dataname)
    return Parts(Path(vlm_dir), vlm_record, distill_record, gate_record, provenance, checkpoint, head, gate)


class EmoVLMKD:
    """The instruction-tuned VLM, the distilled head and the gate, run together on images.

    ``processor`` prepares the VLM's prompts (stage 1's); ``feature_processor`` prepares the
    head's pooled visual features (stage 2's; the same object unless their settings differ).
    """

    def __init__(self, model, processor, head: torch.nn.Module, gate: torch.nn.Module,
                 class_names: Sequence[str], gate_name: str, vlm_signal: str = "onehot",
                 vlm_answer: str = "score", answer_max_new_tokens: int = 256, feature_processor=None,
                 feature_dtype: torch.dtype | None = None, parser: str = "lenient",
                 head_signal: str = "logits", answer_pre_resize: int | None = None,
                 feature_pre_resize: int | None = None):
        self.model, self.processor = model, processor
        self.feature_dtype = feature_dtype  # stage 2's encoding dtype: None keeps the model's
        # The longer side images are shrunk to before the VLM answers (stage 3's) and before the
        # head's features are pooled (stage 2's); 0 or None: not (data.datasets.pre_resize).
        self.answer_pre_resize, self.feature_pre_resize = answer_pre_resize, feature_pre_resize
        self.parser = parser
        self.feature_processor = feature_processor or processor
        self.head, self.gate = head.eval(), gate.eval()
        self.class_names = list(class_names)
        self.gate_name, self.vlm_signal, self.vlm_answer = gate_name, vlm_signal, vlm_answer
        self.head_signal = head_signal  # what the gate was trained on of the head: gate.pt's record
        self.answer_max_new_tokens = answer_max_new_tokens

    @classmethod
    def from_outputs(cls, output_dir: str | Path, dataname: str, device: str | torch.device = "cpu",
                     vlm_model: str | None = None, quant: str | None = None,
                     vlm_dtype: str | None = None) -> "EmoVLMKD":
        """Load ``<output_dir>/<dataname>/{vlm,distill,gate}``; small files are checked before the VLM loads.

        ``quant`` (``4bit`` or ``none``) and ``vlm_dtype`` (``fp32`` or ``bf16``) override how the VLM
        is loaded; by default it is loaded as it was when stage 3 computed the gate's inputs (a
        gate.pt without ``vlm_dtype``: in the checkpoint's own dtype, as then).
        """
        root = Path(output_dir) / dataname
        parts = check_parts(root / "vlm", root / "distill", root / "gate", dataname)
        return cls._from_parts(parts, device, vlm_model, quant, vlm_dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        vlm_model: str | None = None, quant: str | None = None,
                        vlm_dtype: str | None = None) -> "EmoVLMKD":
        """Load an export (``python -m engine.export``): a folder, or a Hub repo id (downloaded by
        :func:`export_folder`). The same
        parts, checked the same way, as the stage folders it was exported from, so the same predictions.
        The base VLM is read from the hub id or local path recorded (``vlm_model``: its moved folder)."""
        folder = export_folder(folder)
        export = read_export(folder)
        parts = check_parts(folder / "vlm", folder / "distill", folder / "gate", export["dataname"])
        return cls._from_parts(parts, device, vlm_model, quant, vlm_dtype)

    @classmethod
    def from_args(cls, args, device: str | torch.device = "cpu") -> "EmoVLMKD":
        """The predictor a script's parsed flags name (demo.py, predict.py): ``--model``, an export
        (:meth:`from_pretrained`), else ``--dataname``'s stage folders under ``--output_dir``
        (:meth:`from_outputs`); ``--vlm_model``, ``--quant`` and ``--vlm_dtype`` apply to either."""
        require_model_source(args)
        options = (device, args.vlm_model, args.quant, args.vlm_dtype)
        if args.model:
            return cls.from_pretrained(args.model, *options)
        return cls.from_outputs(args.output_dir, args.dataname, *options)

    @classmethod
    def _from_parts(cls, parts: "Parts", device, vlm_model, quant, vlm_dtype) -> "EmoVLMKD":
        vlm_record, distill_record, provenance = parts.vlm_record, parts.distill_record, parts.provenance
        # By default the VLM loads as stage 3 loaded it for the gate's inputs; when that was as
        # trained, load_trained_vlm's own default also covers a machine where 4-bit cannot run.
        quant = quant or provenance.quant
        if quant == (vlm_record.quant or "none"):
            quant = None
        dtype = vlm_torch_dtype(vlm_dtype or provenance.vlm_dtype)
        model, processor, _ = load_trained_vlm(parts.vlm_dir, device, vlm_model, quant, dtype)
        # The head's features are pooled as stage 2 pooled them: the base model's processor with
        # the pixel budget recorded in the distill folder.
        feature_processor = load_processor(vlm_record.base_model, distill_record.min_pixels,
                                           distill_record.max_pixels)
        return cls(model, processor, parts.head.to(device), parts.gate.to(device), vlm_record.class_names,
                   parts.checkpoint["gate"], provenance.vlm_signal, provenance.vlm_answer,
                   provenance.max_new_tokens, feature_processor, recorded_dtype(distill_record),
                   provenance.parser, provenance.head_signal, provenance.pre_resize, distill_record.pre_resize)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def explain(self, images: Sequence[Image.Image], max_new_tokens: int = 128) -> list[tuple[str, str]]:
        """``(observation, reasoning)`` per image, greedy, with the questions stage 1 trained on."""
        messages = [prompt_messages(OBSERVATION_QUESTION), prompt_messages(REASONING_QUESTION)]
        texts = generate_texts(self.model, self.processor, messages * len(images),
                               [image for image in images for _ in messages], max_new_tokens,
                               batch_size=len(messages))
        return list(zip(texts[0::2], texts[1::2]))

    @torch.no_grad()
    def predict_batch(self, images: Sequence[Image.Image], max_new_tokens: int = 128,
                      explain: bool = False) -> list[dict]:
        """Every module's output per image (see :meth:`predict`)."""
        images = [to_rgb(image) for image in images]
        # Each part sees the images as the stage that trained on it prepared them.
        answer_images = pre_resized(images, self.answer_pre_resize)
        num_classes = len(self.class_names)
        scored = predict_vlm(self.model, self.processor, answer_images, self.class_names, mode="score")
        # The gate's VLM input, obtained as train_gate.py obtained it (settings saved in gate.pt).
        answered = scored if self.vlm_answer == "score" else predict_vlm(
            self.model, self.processor, answer_images, self.class_names, self.vlm_answer,
            max_new_tokens=self.answer_max_new_tokens, parser=self.parser)
        signal = vlm_gate_inputs(answered, num_classes, self.vlm_signal)
        features = head_features(self.model, self.feature_processor, pre_resized(images, self.feature_pre_resize),
                                 self.feature_dtype)
        head_device = next(self.head.parameters()).device
        head_logits = self.head(features.to(head_device)).float().cpu()
        head_input = head_gate_inputs(head_logits, self.head_signal)  # as stage 3 gave it (gate.pt)
        gate_device = next(self.gate.parameters()).device
        final_logits = self.gate(signal.to(gate_device), head_input.to(gate_device)).float().cpu()
        weights = gate_weights(self.gate, signal.to(gate_device), head_input.to(gate_device))
        explanations = self.explain(answer_images, max_new_tokens) if explain else [(None, None)] * len(images)

        results = []
        for i, (observation, reasoning) in enumerate(explanations):
            answer_index = int(answered.pred[i])
            vlm_label = self.class_names[answer_index] if answer_index >= 0 else None
            head_probs, final_probs = head_logits[i].softmax(-1), final_logits[i].softmax(-1)
            results.append({
                "vlm_answer": answered.texts[i] if answered.texts is not None
                else categorical_answer(vlm_label),
                "vlm_label": vlm_label,
                "vlm_probs": _as_dict(scored.probs[i], self.class_names),
                "observation": observation,
                "reasoning": reasoning,
                "head_label": self.class_names[int(head_probs.argmax())],
                "head_probs": _as_dict(head_probs, self.class_names),
                "final_label": self.class_names[int(final_probs.argmax())],
                "final_probs": _as_dict(final_probs, self.class_names),
                "gate": self.gate_name,
                "gate_weights": None if weights is None
                else {name: float(w[i]) for name, w in weights.items()},
            })
        return results

    def predict(self, image: Image.Image, max_new_tokens: int = 128, explain: bool = True) -> dict:
        """Every module's output for one image.

        Keys: ``vlm_answer`` (the VLM's categorical answer: the generated text, or in ``score``
        mode the best-scored candidate answer), ``vlm_label`` (its class, None if unparseable:
        what the gate received), ``vlm_probs`` (class distribution from answer likelihoods),
        ``observation`` / ``reasoning`` (greedy texts, None unless ``explain``), ``head_label`` /
        ``head_probs`` (distilled head), ``final_label`` / ``final_probs`` (the gate's output:
        EmoVLM-KD's prediction), ``gate`` (its type) and ``gate_weights`` (per source or expert,
        None for gates that do not expose them). Probabilities are ``{class name: float}``.
        """
        return self.predict_batch([image], max_new_tokens, explain)[0]
