"""Batch prediction: the trained EmoVLM-KD (stages 1-3) on every image of a folder.

    python predict.py --dataname emoset --images photos/ --out predictions.jsonl
    python predict.py --dataname emoset --images photos/ --out predictions.csv --explain
    python predict.py --model exports/emovlm-kd-emoset --images photos/ --out predictions.jsonl   # an export
    torchrun --nproc_per_node 8 predict.py --dataname emoset --images photos/ --out predictions.jsonl

Loads <output_dir>/<dataname>/{vlm,distill,gate} (as demo.py does), or with --model an export of
them (``python -m engine.export``; docs/sharing.md), and writes one record per
image found under --images (recursively; .jpg .jpeg .png .webp .bmp .gif): the final label and
probabilities, the VLM's answer and probabilities, the distilled head's probabilities and, for
gates that expose them, the gate's source weights; --explain adds the generated key elements
and reasoning. Rerun the same command to resume: images already in --out are skipped.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from engine.predict_folder import FORMATS, list_images, output_format, predict_folder
from engine.predictor import EmoVLMKD, require_model_source
from models.vlm import VLM_DTYPES
from utils.cli import base_parser, parse_args
from utils.dist import init_distributed, leave_process_group, training_device
from utils.errors import UserError, run_cli
from utils.outputs import lock_output, releases_locks

FLAG_RULES = {"max_new_tokens": "count"}


def get_args_parser():
    parser = base_parser("Predict every image of a folder with the trained EmoVLM-KD.", batch_size=8)
    for action in parser._actions:  # --model names the model instead
        if action.dest == "dataname":
            action.required = False
            action.help += "; not needed with --model"
    group = parser.add_argument_group("prediction")
    group.add_argument("--model", default=None,
                       help="an export (python -m engine.export): its folder or its Hub repo id (owner/name), "
                            "loaded instead of --dataname's stage folders")
    group.add_argument("--images", required=True, help="folder of images (searched recursively)")
    group.add_argument("--out", required=True, help="output file: one record per image; appended to on a rerun")
    group.add_argument("--format", choices=FORMATS, default=None,
                       help="jsonl (one JSON object per line) or csv (one column per class probability); "
                            "default: from the --out suffix, jsonl unless .csv")
    group.add_argument("--explain", action="store_true",
                       help="also generate the key elements and reasoning (slower: two greedy answers per image)")
    group.add_argument("--max_new_tokens", type=int, default=128, help="length limit of each --explain text")
    group.add_argument("--vlm_model", default=None, help="base VLM check (default: the one stage 1 trained on)")
    group.add_argument("--quant", choices=("4bit", "none"), default=None,
                       help="how to load the VLM (default: as stage 3 loaded it)")
    group.add_argument("--vlm_dtype", choices=list(VLM_DTYPES), default=None,
                       help="the dtype of the VLM's unquantised weights, fp32 or bf16 (default: as stage 3 loaded it)")
    return parser


@releases_locks
def main(args) -> None:
    """Predict every image under ``args.images`` into ``args.out`` (rank 0 prints the counts)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    require_model_source(args)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as {out / 'predictions.jsonl'}")
    list_images(args.images, out)  # a wrong folder fails before the models load
    lock_output(out)  # one run per output file, until main returns (rank 0 only)
    rank, _ = init_distributed()
    predictor = EmoVLMKD.from_args(args, training_device(args.gpu))
    counts = predict_folder(predictor, args.images, out, output_format(out, args.format), args.batch_size,
                            args.explain, args.max_new_tokens, args.skip_bad_images)
    leave_process_group()
    if rank == 0:
        print(f"predicted {counts['done']} images, {counts['skipped']} were already in {out}"
              + (f", {counts['bad']} undecodable skipped" if counts["bad"] else "")
              + f": {counts['done'] + counts['skipped']}/{counts['total']} done")


def parse(argv=None):
    """The command line as ``main`` takes it: ``--config`` defaults, then every flag rule checked."""
    return parse_args(get_args_parser(), argv, FLAG_RULES)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse=parse))
