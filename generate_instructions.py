"""Stage 0: emotion instruction data (key elements + reasoning per training image) from a multimodal LLM.

    export OPENAI_API_KEY=...
    python generate_instructions.py --dataname emoset --data_root images
    python generate_instructions.py --dataname FI --base_url http://localhost:8000/v1 \\
        --model Qwen/Qwen2-VL-72B-Instruct            # any OpenAI-compatible server (vLLM, Ollama, ...)
    python generate_instructions.py --dataname toy --backend local \\
        --vlm_model checkpoints/tiny-qwen2-vl --accept_unstructured   # a local Hugging Face VLM
    torchrun --nproc_per_node 8 generate_instructions.py --dataname emoset --backend local \\
        --vlm_model Qwen/Qwen2-VL-72B-Instruct        # images sharded across 8 GPUs

Only training images are sent (the validation images split off train/ never are). Writes
<output_dir>/<dataname>/instructions/: annotations_train.jsonl (read by train_vlm.py),
rejected.jsonl (answers refused after --max_attempts, with the reason), meta.json, run.json.
Rerun the same command to resume: annotated images are skipped, rejected ones asked again
(unless --skip_rejected), failed requests retried.

    python generate_instructions.py --dataname emoset --batch_api   # the OpenAI Batch API: half price, <= 24 h
    python generate_instructions.py --dataname emoset --dry_run --price_in 2.5 --price_out 10

--batch_api sends the same requests as batches; their ids are kept in batches.json, so a rerun
after a kill resumes waiting for the batch it submitted instead of submitting (and paying) again.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from data.annotations import ANNOTATIONS_FILE, read_annotations
from data.datasets import load_dataset
from engine.batch_api import BatchRun, refuse_pending
from engine.instructions import (LocalBackend, OpenAIBackend, Tally, annotated_images, approx_image_tokens,
                                 compact_rejected, image_data_url, make_request, merge_parts, plan_requests,
                                 write_outcomes)
from utils.cli import base_parser, parse_args, stage_dir
from utils.dist import barrier, concat_parts, init_distributed, leave_process_group, shard_map, training_device
from utils.errors import UserError, run_cli
from utils.outputs import lock_folder, releases_locks
from utils.records import InstructionsRecord
from utils.run import record_run

SCRIPT = "generate_instructions.py"  # the command recorded in run.json

# What each numeric flag must be (utils.cli.check_flags; the shared flags are checked too).
FLAG_RULES = {"workers": "count", "max_retries": "index", "timeout": "positive",
              "max_new_tokens": "count", "max_side": "count", "max_attempts": "count", "limit": "count",
              "poll_seconds": "positive", "batch_max_mb": "positive", "price_in": "nonnegative",
              "price_out": "nonnegative"}
# Images whose size (read from the file header) the dry run's token estimate looks at, spread evenly.
ESTIMATE_SAMPLE = 1000


def get_args_parser():
    parser = base_parser("Stage 0: ask a multimodal LLM for key elements and reasoning per training image.",
                         batch_size=4)
    group = parser.add_argument_group("generator")
    group.add_argument("--backend", choices=("openai", "local"), default="openai",
                       help="openai: any OpenAI-compatible API; local: a Hugging Face VLM (--vlm_model)")
    group.add_argument("--model", default="gpt-4o", help="model name on the API")
    group.add_argument("--base_url", default=None,
                       help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OpenAI)")
    group.add_argument("--api_key", default=None,
                       help="prefer the OPENAI_API_KEY environment variable (a flag leaks into shell "
                            "history); never written to any file")
    group.add_argument("--vlm_model", default=None, help="--backend local: hub id or local model folder")
    group.add_argument("--workers", type=int, default=4, help="concurrent API requests")
    group.add_argument("--max_retries", type=int, default=5,
                       help="client retries with backoff on rate limits, timeouts and 5xx")
    group.add_argument("--timeout", type=float, default=120.0, help="seconds per API request")
    group = parser.add_argument_group("answers")
    group.add_argument("--max_new_tokens", type=int, default=512, help="answer length limit")
    group.add_argument("--max_side", type=int, default=1024, help="downscale images to this longer side")
    group.add_argument("--max_attempts", type=int, default=3,
                       help="asks per image while the answer lacks a section or names the emotion")
    group.add_argument("--reject_label_mentions", action="store_true",
                       help="refuse an answer still naming the emotion after --max_attempts (default: keep it "
                            "with \"mentions_label\": true and count it; the whole-word check also catches "
                            "innocent words such as 'an amusement park')")
    group.add_argument("--accept_unstructured", action="store_true",
                       help="keep an answer without the two sections as both fields (weak local "
                            "models, the toy quickstart)")
    group.add_argument("--skip_rejected", action="store_true",
                       help="do not ask again for images already in rejected.jsonl")
    group.add_argument("--limit", type=int, default=None, help="ask for at most N images in this run")
    group.add_argument("--dry_run", action="store_true",
                       help="print one rendered prompt, the token estimate and (with --price_in/--price_out) "
                            "the cost per request and with --batch_api; send nothing")
    group.add_argument("--price_in", type=float, default=None,
                       help="--dry_run: dollars per million prompt tokens (of --model), for the cost estimate")
    group.add_argument("--price_out", type=float, default=None,
                       help="--dry_run: dollars per million output tokens")
    group = parser.add_argument_group("batch API")
    group.add_argument("--batch_api", action="store_true",
                       help="send the requests through the OpenAI Batch API: half the price, answered within "
                            "24 hours; refused answers go into follow-up batches (up to --max_attempts); the "
                            "batch ids are kept in batches.json, so a rerun resumes waiting instead of "
                            "submitting again")
    group.add_argument("--poll_seconds", type=float, default=60.0,
                       help="--batch_api: seconds between checks of the batches' status")
    group.add_argument("--batch_max_mb", type=float, default=190.0,
                       help="--batch_api: largest batch input file; more requests go into several batches "
                            "(the API takes up to 200 MB and 50,000 requests per batch)")
    return parser


def check_args(args) -> None:
    """The rules across flags (each flag's own range is in FLAG_RULES)."""
    if args.backend == "local" and not args.vlm_model:
        raise UserError("--backend local needs --vlm_model (a local model folder or a hub id)")
    if args.batch_api and args.backend != "openai":
        raise UserError("--batch_api needs --backend openai (the Batch API of OpenAI or a compatible server)")
    if (args.price_in is None) != (args.price_out is None):
        raise UserError("--price_in and --price_out go together (dollars per million prompt and output tokens)")


def api_key(args) -> str | None:
    key = args.api_key or os.environ.get("OPENAI_API_KEY") or None
    if key is None and args.backend == "openai" and args.base_url is None and not args.dry_run:
        raise UserError("no API key: export OPENAI_API_KEY=<key>, or point --base_url at an "
                        "OpenAI-compatible server")
    return key


def redacted_command(argv, secret: str | None) -> str:
    words = [SCRIPT, *(sys.argv[1:] if argv is None else argv)]
    return " ".join(word.replace(secret, "***") if secret else word for word in words)


def dry_run(requests, args) -> None:
    if not requests:
        print("dry run: nothing left to ask")
        return
    first = requests[0]
    url, (width, height) = image_data_url(first.path, args.max_side)
    text_tokens = len(first.prompt) // 4  # English averages about 4 characters per token
    image_tokens = approx_image_tokens(width, height)
    print(f"dry run: nothing is sent\n--- prompt for {first.sample.path} (label {first.emotion}) ---\n"
          f"{first.prompt}\n[image: {url[5:url.index(';')]} data URL, {width}x{height} px, "
          f"{len(url) // 1024} KiB]\n---")
    print(f"images to ask: {len(requests)}\n"
          f"approx prompt tokens per image: ~{text_tokens + image_tokens} "
          f"(text ~{text_tokens}, image ~{image_tokens} by the GPT-4o high-detail rule)\n"
          f"max output tokens per image: {args.max_new_tokens} "
          f"(each refused answer costs one more request, up to --max_attempts {args.max_attempts})")
    prompt_tokens, output_tokens = token_estimate(requests, args)
    print(f"estimate for asking every image once: ~{prompt_tokens:,} prompt tokens, at most {output_tokens:,} "
          f"output tokens (images sized from their files; each answer asked again adds one image's share)")
    if args.price_in is None:
        print("add --price_in and --price_out (dollars per million tokens of --model) for the cost per request "
              "and with --batch_api (half price)")
        return
    cost = (prompt_tokens * args.price_in + output_tokens * args.price_out) / 1e6
    print(f"cost at --price_in {args.price_in:g} and --price_out {args.price_out:g} per million tokens: "
          f"per request ~{dollars(cost)} at most, with --batch_api ~{dollars(cost / 2)} at most (half price)")


def token_estimate(requests, args) -> tuple[int, int]:
    """``(prompt tokens, most output tokens)`` of asking each request once: text at about 4
    characters a token; images by the GPT-4o rule at their size as sent, read from the file headers
    of up to ESTIMATE_SAMPLE images spread over the requests and scaled to all."""
    text = sum(len(request.prompt) // 4 for request in requests)
    sample = requests[::math.ceil(len(requests) / ESTIMATE_SAMPLE)]
    image_tokens = []
    for request in sample:
        try:
            with Image.open(request.path) as image:
                width, height = image.size
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # asking for it would stop on it with its own message
        scale = min(1.0, args.max_side / max(width, height))
        image_tokens.append(approx_image_tokens(max(1, round(width * scale)), max(1, round(height * scale))))
    images = round(sum(image_tokens) / len(image_tokens) * len(requests)) if image_tokens else 0
    return text + images, len(requests) * args.max_new_tokens


def dollars(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"


def label_mentions(folder: Path, annotated: set[str]) -> int:
    """Annotations of current training images kept although they name their emotion."""
    path = folder / ANNOTATIONS_FILE
    if not path.is_file():
        return 0
    return sum(a.mentions_label for a in read_annotations(path) if a.image in annotated)


def make_backend(args, key: str | None):
    if args.backend == "local":
        return LocalBackend(args.vlm_model, training_device(args.gpu), args.batch_size,
                            args.max_new_tokens, args.max_side, args.accept_unstructured,
                            args.reject_label_mentions)
    return OpenAIBackend(args.model, key, args.base_url, args.max_retries, args.timeout,
                         args.max_new_tokens, args.max_side, args.max_attempts, args.workers,
                         args.accept_unstructured, args.reject_label_mentions)


def ask_in_batches(requests, splits, args, key: str | None, folder: Path, generator: str) -> Tally:
    """The requests through the Batch API (engine.batch_api), after the batch a killed run left pending."""
    train = {sample.path: sample for sample in splits.train}

    def request_of(image: str):
        return make_request(splits, train[image]) if image in train else None

    return BatchRun(make_backend(args, key), folder, generator, request_of, splits.class_names,
                    max_bytes=int(args.batch_max_mb * 2 ** 20), poll_seconds=args.poll_seconds).run(requests)


def ask_block(block: range, requests, args, key: str | None, folder: Path, generator: str, rank: int,
              world: int) -> Tally:
    """This rank's block of the requests, asked and written to this rank's files; its counts."""
    share, counts = requests[block.start:block.stop], Tally()
    backend = make_backend(args, key)
    with tqdm(total=len(share), desc="instructions", unit="img", disable=rank != 0) as progress:
        progress.set_postfix(counts.counts())
        write_outcomes(backend.outcomes(share), folder, generator, counts, progress,
                       part=rank if world > 1 else None)
    return counts


@releases_locks
def main(args, argv=None) -> None:
    """Stage 0 on parsed flags; ``argv`` (default: the command line) is recorded, the key redacted."""
    key = api_key(args)
    if not args.dry_run:
        lock_folder(stage_dir(args, "instructions"))  # one run per folder, until main returns
    if args.api_key:
        print("note: a key given with --api_key shows in shell history and process lists; "
              "prefer export OPENAI_API_KEY", file=sys.stderr)
    splits = load_dataset(args.data_root, args.dataname, args.output_dir, args.skip_bad_images)
    folder = stage_dir(args, "instructions")
    if (folder / "meta.json").is_file():
        InstructionsRecord.load(folder, args.dataname).check_run(folder, splits.class_names)
    # Under torchrun the requests are sharded: each rank appends to its own part files, which
    # rank 0 merges in rank order (and, first, what a killed multi-process run left behind).
    rank, world = (0, 1) if args.dry_run else init_distributed()
    if rank == 0 and folder.is_dir():
        merge_parts(folder)
    barrier()
    requests, tally = plan_requests(splits, folder, args.skip_rejected, args.limit)
    if rank == 0:
        print(splits.summary())
        print(f"training images: {len(splits.train)}; already annotated or skipped: {tally.skipped}; "
              f"to ask now: {len(requests)} (the {len(splits.val)} validation images are never sent)")
    if args.dry_run:
        dry_run(requests, args)
        return

    generator = args.vlm_model if args.backend == "local" else args.model
    if args.batch_api and world > 1:
        raise UserError("--batch_api runs in one process: start it with python, not torchrun")
    if not args.batch_api:
        refuse_pending(folder)

    try:
        if args.batch_api:
            tally = concat_parts([tally, ask_in_batches(requests, splits, args, key, folder, generator)])
        elif requests:
            asked = shard_map(len(requests), ask_block, requests, args, key, folder, generator, rank, world,
                              unit=args.batch_size)
            tally = concat_parts([tally, asked])
    finally:  # also after a fatal error or Ctrl-C: rejected.jsonl keeps one line per open image
        leave_process_group()
        if rank == 0:
            merge_parts(folder)
            annotated = annotated_images(folder, splits.class_names) & {s.path for s in splits.train}
            num_rejected = compact_rejected(folder, annotated)
    if rank != 0:
        return
    mentions = label_mentions(folder, annotated)
    print(f"this run: {tally.done} annotated ({tally.mentions_label} kept although naming the emotion), "
          f"{tally.rejected} rejected, {tally.failed} failed (rerun to retry); {len(annotated)}/{len(splits.train)} "
          f"training images annotated in {folder}, {mentions} of them marked \"mentions_label\" "
          f"(--reject_label_mentions refuses those); {num_rejected} in rejected.jsonl")
    usage = {"prompt_tokens": tally.prompt_tokens, "completion_tokens": tally.completion_tokens}
    if args.backend == "openai":
        print(f"token usage: prompt {usage['prompt_tokens']}, completion {usage['completion_tokens']}, "
              f"total {sum(usage.values())}" + (" (billed at the Batch API's half price)" if args.batch_api else ""))
    InstructionsRecord(class_names=splits.class_names, generator=generator, num_annotated=len(annotated),
                       num_train=len(splits.train), num_rejected=num_rejected, num_mentions_label=mentions,
                       complete=len(annotated) == len(splits.train)).write(folder)
    record_run(folder, args, command=redacted_command(argv, key), counts=tally.counts(), usage=usage)


def parse(argv=None):
    """The command line as ``main`` takes it: ``--config`` defaults, then every flag rule and the
    rules across flags checked."""
    args = parse_args(get_args_parser(), argv, FLAG_RULES)
    check_args(args)
    return args


if __name__ == "__main__":
    sys.exit(run_cli(main, parse=parse))
