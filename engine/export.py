"""Export a finished run as one self-contained folder, optionally pushed to the Hugging Face Hub.

    python -m engine.export --dataname FI --out exports/emovlm-kd-fi --license apache-2.0
    python -m engine.export --dataname FI --out exports/emovlm-kd-fi --license apache-2.0 \\
        --push_to_hub you/emovlm-kd-fi --private

The folder holds what ``EmoVLMKD.from_pretrained(folder)`` (and ``predict.py --model folder``) reads:

    export.json             the dataset, class names, base VLM, ids and settings that tie the parts
    class_names.json        the classes, in the order of every output
    vlm/                    stage 1: the LoRA adapter (safetensors, PEFT's format), the processor, meta.json
    distill/                stage 2: head.pt, meta.json (its adapter id, pixel budget, feature dtype, pre_resize)
    gate/                   stage 3: gate.pt (the selected variant and its provenance), meta.json
    teacher/                stage 2's teacher, only with --with_teacher
    merged/                 only with --merge: the VLM with the adapter merged in (save_pretrained)
    metrics.json, table.md  stage 3's test metrics and table (with 95% intervals)
    figures/*.png           the confusion matrices and training curves
    README.md               a model card in the Hub's format (YAML header, then the text)

The head and the gate stay ``.pt`` files: their loaders read tensors only (``torch.load(...,
weights_only=True)``), checked against the ids their records hold; the adapter is safetensors as PEFT
saves it. The base VLM is not copied: it is read from the hub id or local path stage 1 recorded.
The export is written to ``.<out>.new`` beside ``--out`` and swapped in when complete; an ``--out``
that exists and is not an export is refused (nothing in it is touched). ``--push_to_hub`` uploads the
folder with huggingface_hub (the token from ``HF_TOKEN`` or ``huggingface-cli login``; never written).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import yaml

from engine.predictor import EXPORT_FILE, EXPORT_FORMAT, EXPORT_VERSION, check_parts, read_export
from models.gates import GATE_FILE
from utils.checkpoints import META_FILE, STAGE_COMMANDS
from utils.errors import UserError, first_line, network_errors, run_cli
from utils.io import read_json, write_json, write_text
from utils.records import TeacherRecord, VLMRecord

STAGES = ("vlm", "distill", "gate")
FIGURES = ("vlm/curves.png", "vlm/eval_score/confusion_matrix.png", "vlm/eval_generate/confusion_matrix.png",
           "teacher/confusion_matrix.png", "distill/confusion_matrix.png", "distill/curves.png",
           "gate/confusion_matrix.png", "gate/curves.png")
ROWS = (("VLM (stage 1)", "vlm"), ("distilled head (stage 2)", "head"), ("teacher", "teacher"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a finished run as one folder (and push it to the Hub).")
    parser.add_argument("--output_dir", default="outputs", help="where the stages wrote <dataname>/{vlm,distill,gate}")
    parser.add_argument("--dataname", required=True)
    parser.add_argument("--out", required=True, help="the export folder (replaced only if it is an export)")
    parser.add_argument("--license", required=True,
                        help="the model card's license, a Hub license id (e.g. apache-2.0, cc-by-nc-4.0, other); "
                             "the base VLM's and the dataset's terms apply too")
    parser.add_argument("--with_teacher", action="store_true", help="also copy stage 2's teacher (teacher.pt)")
    parser.add_argument("--merge", action="store_true",
                        help="also write merged/: the VLM with the adapter merged into its unquantised base "
                             "(save_pretrained; for servers that take one model folder, e.g. vllm serve)")
    parser.add_argument("--vlm_model", default=None,
                        help="with --merge: where the base VLM is, if its recorded local folder moved")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="then upload the folder to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    return parser


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)  # before any work
    folder = export(args.output_dir, args.dataname, args.out, args.license, args.with_teacher,
                    merge=args.merge, vlm_model=args.vlm_model)
    print(f"exported {args.dataname} to {folder}")
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, args.private)
        print(f"pushed {folder} to {url}")


# ---------------------------------------------------------------- export

def export(output_dir: str | Path, dataname: str, out: str | Path, license: str, with_teacher: bool = False,
           merge: bool = False, vlm_model: str | None = None) -> Path:
    """Write the export of ``<output_dir>/<dataname>`` to ``out`` (staged, swapped in when complete);
    ``merge``: also ``merged/``, the VLM with the adapter merged in (:func:`merge_vlm`)."""
    root, out = Path(output_dir) / dataname, Path(out)
    check_out(out)
    parts = check_parts(root / "vlm", root / "distill", root / "gate", dataname, verify_adapter=True)
    teacher = check_teacher(root / "teacher", parts.distill_record.teacher_id, dataname) if with_teacher else None
    metrics_path = root / "gate" / "metrics.json"
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path}: missing; rerun `{STAGE_COMMANDS['gate'].format(dataname=dataname)}`")
    metrics = read_json(metrics_path)

    staging = out.parent / f".{out.name}.new"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        for stage in STAGES + (("teacher",) if teacher else ()):
            copy_stage(root / stage, staging / stage)
        for name in ("metrics.json", "table.md"):
            if (root / "gate" / name).is_file():
                shutil.copyfile(root / "gate" / name, staging / name)
        figures = copy_figures(root, staging / "figures", with_teacher)
        record = export_record(dataname, parts, teacher, with_teacher, merge)
        if merge:
            merge_vlm(staging / "vlm", staging / "merged", vlm_model)
        write_json(staging / "class_names.json", list(parts.vlm_record.class_names))
        write_text(staging / "README.md", model_card(out.name, license, record, metrics,
                                                     _read_text(staging / "table.md"), figures))
        write_json(staging / EXPORT_FILE, record)  # last: a folder without it is not an export
        # The copies are what a loader will read: check them as it will.
        check_parts(staging / "vlm", staging / "distill", staging / "gate", dataname, verify_adapter=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, out)
    return out


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that holds anything but an earlier export (which is replaced)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder; pass a new folder or an earlier export")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise UserError(f"--out {out}: exists and is not an export (no {EXPORT_FILE}); nothing was written; "
                        "pass a new folder or an earlier export")


def check_teacher(teacher_dir: Path, teacher_id: str | None, dataname: str) -> TeacherRecord:
    record = TeacherRecord.load(teacher_dir, dataname)
    if teacher_id is not None and record.teacher_id != teacher_id:
        raise UserError(f"{teacher_dir}: holds teacher {record.teacher_id}, but the head was distilled from "
                        f"{teacher_id}; rerun `{STAGE_COMMANDS['distill'].format(dataname=dataname)}`, "
                        "or export without --with_teacher")
    return record


def copy_stage(src: Path, dst: Path) -> None:
    """The stage folder's own files (not its caches, runs, locks, logs, pictures (figures/ has them) or
    gate.pt's sibling variants)."""
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".png" and path.name != "log.txt" \
                and not (path.name.startswith("gate_") and path.suffix == ".pt"):
            shutil.copyfile(path, dst / path.name)


def copy_figures(root: Path, dst: Path, with_teacher: bool) -> list[str]:
    """Copy the stages' pictures as ``figures/<stage>_<name>.png``; their paths in the export."""
    copied = []
    for rel in FIGURES:
        if rel.startswith("teacher/") and not with_teacher and not (root / rel).is_file():
            continue
        if (root / rel).is_file():
            dst.mkdir(exist_ok=True)
            name = rel.replace("/", "_")
            shutil.copyfile(root / rel, dst / name)
            copied.append(f"figures/{name}")
    return copied


def export_record(dataname: str, parts, teacher: TeacherRecord | None, with_teacher: bool,
                  merged: bool = False) -> dict:
    vlm, distill, provenance = parts.vlm_record, parts.distill_record, parts.provenance
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "dataname": dataname,
        "class_names": list(vlm.class_names), "base_model": vlm.base_model, "base_config_id": vlm.base_config_id,
        "adapter_id": vlm.adapter_id, "head_id": distill.head_id, "head_run": distill.run,
        "gate": parts.gate_record.gate, "gate_id": parts.gate_record.gate_id,
        "teacher_id": distill.teacher_id, "teacher_included": bool(with_teacher and teacher),
        "min_pixels": vlm.min_pixels, "max_pixels": vlm.max_pixels,
        "feature_min_pixels": distill.min_pixels, "feature_max_pixels": distill.max_pixels,
        "feature_dtype": distill.feature_dtype, "feature_pre_resize": distill.pre_resize,
        "answer_pre_resize": provenance.pre_resize, "vlm_signal": provenance.vlm_signal,
        "vlm_answer": provenance.vlm_answer, "head_signal": provenance.head_signal,
        "quant": provenance.quant, "vlm_dtype": provenance.vlm_dtype, "merged": merged,
    }


def merge_vlm(vlm_dir: Path, dst: Path, vlm_model: str | None = None) -> Path:
    """``dst``: the base VLM, loaded unquantised in its checkpoint's dtype, with the stage-1 adapter
    merged in (PEFT's ``merge_and_unload``; ``modules_to_save`` copies replace the base modules), and
    the processor; a plain transformers folder (``save_pretrained``). On the CPU: it needs the
    base model's size in memory."""
    from models.vlm import base_model_path, load_processor, load_vlm

    record = VLMRecord.load(vlm_dir)
    model = load_vlm(base_model_path(record, vlm_model, vlm_dir), "cpu", quant=None, adapter=vlm_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(dst)
    load_processor(str(vlm_dir), record.min_pixels, record.max_pixels).save_pretrained(dst)
    return dst


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty or an earlier export) by the complete ``staging`` folder."""
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


# ---------------------------------------------------------------- model card

def _module_rows(metrics: dict) -> list[tuple[str, dict]]:
    rows = [(label, metrics[key]) for label, key in ROWS if metrics.get(key)]
    selected = metrics.get("gate")
    if selected and selected in metrics.get("gates", {}):
        rows.append((f"EmoVLM-KD ({selected} gate)", metrics["gates"][selected]))
    return rows


def card_metadata(name: str, license: str, record: dict, metrics: dict) -> dict:
    """The model card's YAML header (the Hub's model card metadata, with model-index results)."""
    dataset = record["dataname"]
    results = [{
        "task": {"type": "image-classification", "name": "Visual emotion classification"},
        "dataset": {"type": dataset, "name": dataset, "split": metrics.get("split", "test")},
        "metrics": [{"type": "accuracy", "value": round(float(result["accuracy"]), 4), "name": f"{label} accuracy"}
                    for label, result in _module_rows(metrics)],
    }]
    base = record["base_model"]
    meta = {"license": license, "library_name": "peft", "pipeline_tag": "image-classification",
            "tags": ["emotion-recognition", "visual-emotion-analysis", "knowledge-distillation", "lora", "peft",
                     "vision-language-model", "emovlm-kd"],
            "datasets": [dataset], "metrics": ["accuracy"]}
    if not Path(base).is_absolute() and not base.startswith((".", "~")):  # a hub id, not a local folder
        meta["base_model"] = base
    meta["model-index"] = [{"name": name, "results": results}]
    return meta


def model_card(name: str, license: str, record: dict, metrics: dict, table: str, figures: list[str]) -> str:
    meta = card_metadata(name, license, record, metrics)
    dataset, classes = record["dataname"], ", ".join(record["class_names"])
    rows = "\n".join(f"| {label} | {100 * result['accuracy']:.2f} | "
                     + (f"[{100 * result['ci95'][0]:.2f}, {100 * result['ci95'][1]:.2f}]" if result.get("ci95") else "")
                     + " |" for label, result in _module_rows(metrics))
    pictures = "\n".join(f"![{path}]({path})" for path in figures)
    local = "base_model" not in meta
    return f"""---
{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()}
---

# {name}

EmoVLM-KD for visual emotion classification on **{dataset}** ({len(record['class_names'])} classes: {classes}):
a vision-language model instruction-tuned with a LoRA adapter (stage 1), a small head distilled from a
vision teacher on the VLM's pooled visual features (stage 2), and a gate that fuses the two (stage 3,
`{record['gate']}`). Reproduction of "EmoVLM-KD" (arXiv 2505.07164).

## Results ({metrics.get('split', 'test')} split, n = {metrics.get('n', '?')})

| Module | Accuracy (%) | 95% interval (bootstrap) |
|---|---|---|
{rows}

Full table (macro-F1, McNemar tests, the paper's figures):

{table.strip()}

{pictures}

## How to load it

The base VLM is `{record['base_model']}`{' (a local folder on the machine that trained it: pass its location with `--vlm_model`)' if local else ' (downloaded from the Hub)'}.
With the EmoVLM-KD reproduction's code (its `engine/predictor.py`):

```python
from engine.predictor import EmoVLMKD
model = EmoVLMKD.from_pretrained("{name}")  # this folder (huggingface_hub.snapshot_download it first)
print(model.predict(image)["final_label"])
```

```bash
python predict.py --model {name} --images photos/ --out predictions.jsonl
```

{'`merged/` is the VLM with the adapter merged into its base, a plain transformers folder (e.g. `vllm serve merged`); it gives the VLM answers only.' if record.get('merged') else ''}

`export.json` lists the ids that tie the parts: adapter `{record['adapter_id']}`, head `{record['head_id']}`,
gate `{record['gate_id']}`; the loader refuses parts whose files do not match them.

## Training settings

- Stage 1: LoRA on `{record['base_model']}`, pixel budget {record['min_pixels']}..{record['max_pixels']} (see `vlm/meta.json`, `vlm/adapter_config.json`).
- Stage 2: head `{record['head_run']}` on features encoded in `{record['feature_dtype']}`, pixel budget
  {record['feature_min_pixels']}..{record['feature_max_pixels']}, images pre-resized to {record['feature_pre_resize']} px (longer side; 0 or None: not).
- Stage 3: gate `{record['gate']}`, VLM input `{record['vlm_signal']}` from `{record['vlm_answer']}` answers, head input `{record['head_signal']}`,
  VLM loaded as `{record['quant']}` / `{record['vlm_dtype']}`, images pre-resized to {record['answer_pre_resize']} px.
- Every stage's flags: `vlm/run.json`, `distill/run.json`, `gate/run.json`.

## Data

Trained and evaluated on {dataset}'s train / val / test split (`metrics.json` holds the test predictions).
Its annotations for stage 1 were generated by a large model (stage 0); the dataset's own license applies.

## Limitations

- Emotion labels are subjective; accuracy on {dataset} says little about other image sources or cultures.
- The head and the gate are `.pt` files of tensors (loaded with `weights_only=True`), not safetensors.
- The base VLM's own license and limitations apply; it is not included here.
"""


# ---------------------------------------------------------------- Hub

def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--push_to_hub {repo_id}: not a Hub repo id ({first_line(err)}); "
                        "use owner/name") from None


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create the model repo (if needed) and upload ``folder``; the token is huggingface_hub's own
    (``HF_TOKEN`` or the login cache). Returns the repo's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    check_repo_id(repo_id)
    read_export(folder)  # only an export is pushed
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload EmoVLM-KD export")
    except LocalTokenNotFoundError:
        raise UserError("--push_to_hub: no Hugging Face token; set HF_TOKEN or run `huggingface-cli login`") from None
    except HfHubHTTPError as err:
        raise UserError(f"--push_to_hub {repo_id}: the Hub refused the upload ({first_line(err)})") from None
    except network_errors() as err:
        raise UserError(f"--push_to_hub {repo_id}: could not reach the Hub ({first_line(err) or type(err).__name__}); "
                        "check the connection (or HF_ENDPOINT) and push again: the export folder is complete") from None
    return str(url)



if __name__ == "__main__":
    sys.exit(run_cli(main))
