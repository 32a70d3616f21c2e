"""Gradio demo: every module's prediction for an uploaded image, side by side.

    python demo.py --dataname emoset                          # loads outputs/emoset/{vlm,distill,gate}
    python demo.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --port 7860

Shows the instruction-tuned VLM (its answer, key elements and reasoning, class probabilities),
the distilled head's probabilities, and EmoVLM-KD's final prediction with the gate's source
weights where the gate type exposes them. Binds 127.0.0.1 unless --host says otherwise;
--share (a public Gradio link) is opt-in; analytics are off. Gradio is imported (through
``_gradio``) only by the functions that build or serve the app; the prediction itself lives in
engine/predictor.py (it works without Gradio).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image

from data.datasets import load_dataset
from engine.predictor import DEFAULT_MAX_IMAGE_SIDE, DEFAULT_MAX_UPLOAD_PIXELS, EmoVLMKD, open_upload
from models.vlm import VLM_DTYPES
from utils.cli import base_parser, parse_args, resolve_device
from utils.errors import UserError, run_cli
from utils.outputs import releases_locks

log = logging.getLogger("demo")


def _gradio():
    """The gradio module, with its usage analytics switched off before it is first imported."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio  # lazy on purpose: only the app needs it, and the switch above must come first

    return gradio


OUTPUT_FIELDS = ("vlm_answer", "observation", "reasoning", "vlm_probs", "head_probs",
                 "final_probs", "gate_weights")


# What each numeric flag must be (utils.cli.check_flags; the shared flags are checked too).
FLAG_RULES = {"max_new_tokens": "count", "port": "port", "num_examples": "index", "max_image_side": "count",
              "max_upload_pixels": "count"}


def get_args_parser():
    parser = base_parser("Gradio demo of a trained EmoVLM-KD (stages 1-3).")
    for action in parser._actions:  # --model names the model instead (examples still come from --dataname)
        if action.dest == "dataname":
            action.required = False
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="an export folder (python -m engine.export) to load instead of --dataname's stage folders")
    model.add_argument("--vlm_model", default=None,
                       help="where to read the base VLM from (default: the id saved by stage 1); "
                            "must be the model stage 1 trained")
    model.add_argument("--quant", choices=("4bit", "none"), default=None,
                       help="how the VLM is loaded: 4bit (CUDA) or none (full precision); default: as "
                            "stage 3 loaded it to compute the gate's inputs")
    model.add_argument("--vlm_dtype", choices=list(VLM_DTYPES), default=None,
                       help="the dtype of the VLM's unquantised weights: fp32 or bf16 (half the memory); "
                            "default: as stage 3 loaded it")
    model.add_argument("--max_new_tokens", type=int, default=128,
                       help="length limit of the generated key elements and reasoning")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="interface to bind; 0.0.0.0 exposes the demo to your network")
    server.add_argument("--port", type=int, default=7860)
    server.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    server.add_argument("--num_examples", type=int, default=8,
                        help="test images of the dataset offered as examples (0: none)")
    server.add_argument("--max_image_side", type=int, default=DEFAULT_MAX_IMAGE_SIDE,
                        help="uploads with a longer side are shrunk to this many pixels")
    server.add_argument("--max_upload_pixels", type=int, default=DEFAULT_MAX_UPLOAD_PIXELS,
                        help="uploads above this many pixels are refused with a message")
    return parser


def example_images(data_root: str | Path, dataname: str, output_dir: str | Path, limit: int) -> list[str]:
    """Up to ``limit`` test images, taking classes in turn; none (with a warning) if the data is absent."""
    if limit <= 0:
        return []
    try:
        splits = load_dataset(data_root, dataname, output_dir)
    except UserError as err:
        log.warning("no examples: %s", err)
        return []
    by_class = [[s for s in splits.test if s.label == c] for c in range(len(splits.class_names))]
    picked = [samples[i] for i in range(max(map(len, by_class), default=0))
              for samples in by_class if i < len(samples)][:limit]
    return [str(splits.absolute(sample)) for sample in picked]


def readable_upload_errors(image, max_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS):
    """Make a ``gr.Image`` show an undecodable or oversized upload as a message, not a server error.

    Gradio opens uploads with PIL before the event function runs, so the check has to wrap the
    component's own preprocessing (a subclass would make Gradio write a .pyi stub beside this file).
    The size is read from the file's header, before anything decodes the pixels.
    """
    gr = _gradio()
    preprocess = image.preprocess

    def checked(payload):
        try:
            path = getattr(payload, "path", None)
            if path:
                with Image.open(path) as img:  # the header only
                    width, height = img.size
                if width * height > max_pixels:
                    raise gr.Error(f"the image is {width}x{height} pixels ({width * height / 1e6:.0f} MP); the "
                                   f"limit is {max_pixels / 1e6:.0f} MP: upload a smaller image")
            return preprocess(payload)
        except gr.Error:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            reason = "is too large to decode safely" if isinstance(err, Image.DecompressionBombError) \
                else "is not an image that can be decoded"
            raise gr.Error(f"{name} {reason}; upload a JPEG, PNG, WebP, BMP or GIF image") from None

    image.preprocess = checked
    return image


def outputs_of(result: dict) -> tuple:
    """A prediction dict as the app's output values, in OUTPUT_FIELDS order."""
    vlm_text = result["vlm_answer"]
    if result["vlm_label"] is None:
        vlm_text += "\n(no class could be read from this answer)"
    return (vlm_text, result["observation"] or "", result["reasoning"] or "", result["vlm_probs"],
            result["head_probs"], result["final_probs"], result["gate_weights"] or {})


def build_app(predictor, examples: Sequence[str] = (), max_new_tokens: int = 128,
              max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
              max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS):
    """The Gradio Blocks app around ``predictor`` (an ``engine.predictor.EmoVLMKD``).

    One event, ``api_name="predict"``: image file path in, OUTPUT_FIELDS out. A bad upload
    raises ``gr.Error``, which the page shows as a message.
    """
    gr = _gradio()
    class_names = predictor.class_names
    top_k = min(5, len(class_names))
    weights_exposed = hasattr(predictor.gate, "forward_with_weights")

    def analyse(image_path: str | None):
        if not image_path:
            raise gr.Error("Upload an image first (or click one of the examples).")
        try:
            image = open_upload(image_path, max_image_side, max_upload_pixels)
            return outputs_of(predictor.predict(image, max_new_tokens=max_new_tokens, explain=True))
        except UserError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="EmoVLM-KD demo") as app:
        gr.Markdown(f"# EmoVLM-KD\nVisual emotion analysis: an instruction-tuned VLM and a head "
                    f"distilled from a vision model, fused by a `{predictor.gate_name}` gate.  \n"
                    f"Classes: {', '.join(class_names)}.")
        with gr.Row():
            with gr.Column(scale=1):
                # image_mode None: Gradio passes the file on untouched; open_upload decodes it as
                # the datasets' images are (EXIF orientation, 16-bit), whatever its mode.
                image = readable_upload_errors(gr.Image(type="filepath", label="Image", height=320,
                                                        sources=["upload", "clipboard"], elem_id="image",
                                                        image_mode=None), max_upload_pixels)
                run = gr.Button("Analyse", variant="primary", elem_id="analyse")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=image,
                                label="Test images")
            with gr.Column(scale=1):
                gr.Markdown("### Instruction-tuned VLM")
                vlm_answer = gr.Textbox(label="Answer", lines=2, elem_id="vlm_answer")
                observation = gr.Textbox(label="Key elements (observation prompt)", lines=4)
                reasoning = gr.Textbox(label="Reasoning (reasoning prompt)", lines=4)
                vlm_probs = gr.Label(label="VLM class probabilities", num_top_classes=top_k)
            with gr.Column(scale=1):
                gr.Markdown("### Distilled head")
                head_probs = gr.Label(label="Head probabilities", num_top_classes=top_k)
            with gr.Column(scale=1):
                gr.Markdown("### EmoVLM-KD (final)")
                final_probs = gr.Label(label="Final prediction", num_top_classes=top_k,
                                       elem_id="final")
                gate_weights = gr.Label(label=f"Gate weights ({predictor.gate_name})",
                                        visible=weights_exposed)
        outputs = [vlm_answer, observation, reasoning, vlm_probs, head_probs, final_probs, gate_weights]
        run.click(analyse, inputs=image, outputs=outputs, api_name="predict")
    return app


@releases_locks
def main(args) -> None:
    """Load the trained stages and serve the app until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _gradio()  # a missing gradio fails here, before the models load
    if not args.model and not args.dataname:
        raise UserError("give --dataname (the stage folders under --output_dir) or --model (an export folder)")
    if args.model:
        predictor = EmoVLMKD.from_pretrained(args.model, resolve_device(args.gpu), args.vlm_model, args.quant,
                                             args.vlm_dtype)
    else:
        predictor = EmoVLMKD.from_outputs(args.output_dir, args.dataname, resolve_device(args.gpu),
                                          args.vlm_model, args.quant, args.vlm_dtype)
    examples = example_images(args.data_root, args.dataname, args.output_dir, args.num_examples) \
        if args.dataname else []
    app = build_app(predictor, examples, args.max_new_tokens, args.max_image_side,
                    args.max_upload_pixels)
    app.queue(default_concurrency_limit=1)  # one model, one prediction at a time
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share,
                   allowed_paths=[str(Path(args.data_root).resolve())])
    except OSError as err:  # port taken, host not bindable
        raise UserError(f"--host {args.host} --port {args.port}: cannot serve there ({err}); "
                        "pick another --port") from None


def parse(argv=None):
    """The command line as ``main`` takes it: ``--config`` defaults, then every flag rule checked."""
    return parse_args(get_args_parser(), argv, FLAG_RULES)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse=parse))
