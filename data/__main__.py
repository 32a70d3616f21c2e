"""Check a dataset before a long run: ``python -m data --dataname emoset [--data_root images]``.

Prints the classes and split sizes, persists the validation split when ``val/`` is missing,
and decodes every image once so a broken file shows up now rather than hours into training.
"""
from __future__ import annotations

import logging
import sys

from tqdm import tqdm

from data.datasets import load_dataset, open_image
from utils.cli import base_parser, parse_args
from utils.errors import run_cli


def get_args_parser():
    parser = base_parser("Check a folder-per-class dataset and persist its validation split.")
    parser.add_argument("--no_decode", action="store_true", help="skip decoding every image")
    return parser


def main(argv=None) -> None:
    args = parse_args(get_args_parser(), argv, rules={})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    splits = load_dataset(args.data_root, args.dataname, args.output_dir, args.skip_bad_images)
    print(splits.summary())
    if splits.skipped:
        print(f"skipped {len(splits.skipped)} undecodable image(s)")
    if not args.no_decode:
        for sample in tqdm(splits.train + splits.val + splits.test, desc="decoding", unit="img"):
            open_image(splits.absolute(sample))
        print("all images decode")


if __name__ == "__main__":
    sys.exit(run_cli(main))
