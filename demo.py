"""Gradio demo: every module's prediction for an uploaded image, side by side, and an explorer
of stage 3's test results (or of predict.py's output file).

    python demo.py --dataname emoset                          # loads outputs/emoset/{vlm,distill,gate}
    python demo.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --port 7860
    python demo.py --dataname emoset --no_model               # the explorer tab alone, no model loaded
    python demo.py --dataname emoset --predictions predictions.jsonl --images photos/

Shows the instruction-tuned VLM (its answer, key elements and reasoning, class probabilities),
the distilled head's probabilities, and EmoVLM-KD's final prediction with the gate's source
weights where the gate type exposes them. The "Explore results" tab reads only the files stage 3
(``gate/metrics.json``, every seed's ``gate/runs/*/*/metrics.json``) and predict.py wrote, and the
images: the complementarity table, a paged gallery with filters, the confusion matrices, one
image's detail (engine/explorer.py holds its logic; images are served only from --data_root and
--images). Binds 127.0.0.1 unless --host says otherwise;
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
from engine import explorer
from engine.predictor import (DEFAULT_MAX_IMAGE_SIDE, DEFAULT_MAX_UPLOAD_PIXELS, EmoVLMKD, open_upload,
                              require_model_source)
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
              "max_upload_pixels": "count", "page_size": "count"}


def get_args_parser():
    parser = base_parser("Gradio demo of a trained EmoVLM-KD (stages 1-3).")
    for action in parser._actions:  # --model names the model instead (examples still come from --dataname)
        if action.dest == "dataname":
            action.required = False
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="an export (python -m engine.export): its folder or its Hub repo id (owner/name), "
                            "loaded instead of --dataname's stage folders")
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
    explore = parser.add_argument_group("explorer tab")
    explore.add_argument("--predictions", default=None,
                         help="a file predict.py wrote (JSON Lines or CSV), explored over --images (no labels)")
    explore.add_argument("--images", default=None, help="the folder --predictions was predicted over")
    explore.add_argument("--no_model", action="store_true",
                         help="serve the explorer tab alone, at once, loading no model (no single-image tab, "
                              "no generated reasoning)")
    explore.add_argument("--page_size", type=int, default=24, help="thumbnails per gallery page")
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


EXPLORER_DETAIL_FIELDS = ("image", "vlm_probs", "head_probs", "final_probs", "gate_weights", "path", "caption")


class ExplorerRuns:
    """The runs the explorer tab offers, ``{name: loader}``, each read once, on first use."""

    def __init__(self, loaders: dict, default: str | None = None):
        self.loaders, self._loaded = dict(loaders), {}
        self.default = default if default in self.loaders else next(iter(self.loaders), None)

    @classmethod
    def from_outputs(cls, output_dir, dataname: str, data_root, predictions=None, images=None) -> "ExplorerRuns":
        """Every stage-3 run of ``dataname`` (the published one the default) and, with
        ``predictions``, predict.py's file over ``images`` (then the default)."""
        loaders = {name: (lambda path=path, name=name: explorer.load_stage3_run(path, data_root, dataname, name))
                   for name, path in (explorer.stage3_runs(output_dir, dataname).items() if dataname else ())}
        default = explorer.PUBLISHED
        if predictions:
            default = f"predictions: {Path(predictions).name}"
            loaders = {default: lambda: explorer.load_predictions(predictions, images), **loaders}
        elif not loaders:  # the tab says what to run
            loaders[explorer.PUBLISHED] = lambda: explorer.load_stage3_run(
                Path(output_dir) / dataname / "gate" / "metrics.json", data_root, dataname)
        return cls(loaders, default)

    def get(self, name: str) -> explorer.Run:
        if name not in self.loaders:
            raise UserError(f"no run {name!r}; one of {', '.join(self.loaders)}")
        if name not in self._loaded:
            self._loaded[name] = self.loaders[name]()
        return self._loaded[name]


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def complementarity_rows(run: explorer.Run) -> tuple[list[str], list[list]]:
    """The table at the top of the tab: per pair the 2x2 counts, the oracle's and the gate's accuracy;
    without labels, how often the VLM and the head disagree and whom the gate followed."""
    if not run.labelled:
        counts = [sum(explorer.in_category(r, key) for r in run.records) for key in explorer.UNLABELLED_CATEGORIES]
        return list(explorer.UNLABELLED_CATEGORIES.values()), [counts]
    header = ["pair", "both right", "VLM only right", "other only right", "both wrong", "oracle accuracy %",
              f"EmoVLM-KD ({run.gate}) accuracy %"]
    gate = _percent(explorer.gate_accuracy(run))
    rows = [[f"VLM vs {pair.removeprefix('vlm_vs_')}", *(c[cell] for cell in explorer.CELLS),
             _percent(c["oracle_accuracy"]), gate] for pair, c in explorer.complementarity_counts(run).items()]
    return header, rows


def table_selection(run: explorer.Run, row: int, col: int) -> tuple[str | None, str]:
    """``(category or None, selection)`` for a click on the complementarity table's cell (row, col)."""
    if not run.labelled:
        return list(explorer.UNLABELLED_CATEGORIES)[col], ""
    pair = list(explorer.complementarity_counts(run))[row]
    if 1 <= col <= 4:
        return None, f"cell:{pair}:{explorer.CELLS[col - 1]}"
    return None, {5: f"oracle:{pair}", 6: "gate:right"}.get(col, "")


def confusion_frame(run: explorer.Run, module: str):
    import pandas as pd  # a dependency of gradio's; only the app needs it

    matrix = explorer.confusion_matrix(run, module)
    columns = [f"→ {name}" for name in run.class_names] + (["→ none"] if module == "vlm" else [])
    rows = [[name, *row[:len(columns)]] for name, row in zip(run.class_names, matrix)]
    return pd.DataFrame(rows, columns=[f"true \\ {explorer.MODULE_LABELS[module]}", *columns])


def with_select_data(gr, fn):
    """``fn`` with its ``evt`` parameter annotated as ``gr.SelectData``, the class itself: Gradio
    finds the parameter it fills in from the annotation, which it cannot evaluate from a string
    (``gr`` is no global here)."""
    fn.__annotations__ = {"evt": gr.SelectData}
    return fn


def build_explorer_tab(gr, app, runs: ExplorerRuns, thumbnails: explorer.Thumbnails, predictor=None,
                       page_size: int = 24, max_new_tokens: int = 128):
    """The explorer tab's components and events (inside a ``gr.Blocks``); every event also has an
    api_name: explore_run, explore_gallery, explore_detail, explore_explain."""
    import pandas as pd

    def run_of(name: str) -> explorer.Run:
        try:
            return runs.get(name)
        except UserError as err:
            raise gr.Error(str(err)) from None

    def show_run(name: str):
        try:
            run = runs.get(name)
        except UserError as err:  # a missing or stale run: the message, empty tables
            empty = pd.DataFrame()
            return (f"**{err}**", empty, empty, empty, empty, gr.update(), gr.update(), gr.update(), "")
        header, rows = complementarity_rows(run)
        classes = [("any", "")] + [(c, str(i)) for i, c in enumerate(run.class_names)]
        source = f"`{run.source}`" + ("" if run.labelled else f", images in `{run.image_root}`")
        status = (f"{len(run.records)} images from {source}; gate `{run.gate}`"
                  + ("" if run.labelled else " (no labels: the agreement filters compare the modules)"))
        frames = [confusion_frame(run, m) if run.labelled else pd.DataFrame() for m in explorer.MODULES]
        return (status, pd.DataFrame(rows, columns=header), *frames,
                gr.update(choices=[(label, key) for key, label in run.categories.items()], value="all"),
                gr.update(choices=classes, value=""), gr.update(choices=classes, value=""), "")

    def gallery(name, category, selection, true_class, pred_module, pred_class, low, high, sort, number):
        run = run_of(name)
        try:
            picked = explorer.parse_selection(selection)
            query = explorer.Query(category=picked.pop("category", category or "all"),
                                   true_class=int(true_class) if true_class not in (None, "") else None,
                                   pred_module=pred_module or "final",
                                   pred_class=int(pred_class) if pred_class not in (None, "") else None,
                                   min_confidence=float(low), max_confidence=float(high), sort=sort, **picked)
            chosen = explorer.select(run, query)
        except (UserError, ValueError) as err:
            raise gr.Error(str(err)) from None
        shown, number, pages = explorer.page(chosen, number or 1, page_size)
        items = [(str(_thumbnail(run, run.records[i])), explorer.caption(run, run.records[i])) for i in shown]
        info = (f"{len(chosen)} images ({explorer.describe_selection(run, selection)}); "
                f"page {number} of {pages}")
        return items, number, info, [run.records[i].image for i in shown]

    def _thumbnail(run, record):
        try:
            return thumbnails.get(explorer.safe_image_path(run.image_root, record.image))
        except (UserError, OSError, ValueError, Image.DecompressionBombError):
            return thumbnails.placeholder()

    def detail(name: str, image: str):
        run = run_of(name)
        if not image:
            raise gr.Error("click a thumbnail first")
        try:
            path = explorer.safe_image_path(run.image_root, image)
        except UserError as err:
            raise gr.Error(str(err)) from None
        index = run.index_of(image)
        if index is None:
            raise gr.Error(f"{image}: refused (not an image of run {name})")
        record = run.records[index]

        def probs(module):
            values = record.probs.get(module)
            return dict(zip(run.class_names, values)) if values else None
        return (str(path), probs("vlm"), probs("head"), probs("final"), record.weights or None, str(path),
                explorer.caption(run, record))

    def explain(name: str, image: str):
        if predictor is None:
            raise gr.Error("no model is loaded (the demo was started with --no_model)")
        path = detail(name, image)[0]
        try:
            result = predictor.predict(open_upload(path), max_new_tokens=max_new_tokens, explain=True)
        except UserError as err:
            raise gr.Error(str(err)) from None
        return result["observation"] or "", result["reasoning"] or ""

    def pick_table(name, evt):
        category, selection = table_selection(run_of(name), *evt.index)
        return (gr.update() if category is None else category), selection, 1

    def pick_confusion(module):
        def pick(name, evt):
            row, col = evt.index
            pred = col - 1 if col - 1 < len(run_of(name).class_names) else -1
            return f"confusion:{module}:{row}:{pred}" if col >= 1 else "", 1
        return with_select_data(gr, pick)

    def pick_thumbnail(shown, evt):
        return shown[evt.index] if shown and 0 <= evt.index < len(shown) else ""

    with_select_data(gr, pick_table)
    with_select_data(gr, pick_thumbnail)

    thumbnails = thumbnails or explorer.Thumbnails(explorer.default_thumbnail_folder())
    gr.Markdown("Stage 3's test predictions (or predict.py's file): click a cell of a table to fill the "
                "gallery, a thumbnail for its detail. Nothing here loads a model.")
    with gr.Row():
        run_select = gr.Dropdown(choices=list(runs.loaders), value=runs.default, label="Run", elem_id="explore_run",
                                 scale=2)
        status = gr.Markdown(elem_id="explore_status")
    table = gr.Dataframe(label="Complementarity on the test split (click a cell)", interactive=False,
                         elem_id="complementarity")
    with gr.Row():
        confusions = [gr.Dataframe(label=f"Confusion: {explorer.MODULE_LABELS[m]} (click a cell)", interactive=False,
                                   elem_id=f"confusion_{m}") for m in explorer.MODULES]
    with gr.Row():
        category = gr.Dropdown(label="Agreement", choices=[("all images", "all")], value="all", elem_id="category",
                               allow_custom_value=True)
        true_class = gr.Dropdown(label="True class", choices=[("any", "")], value="", allow_custom_value=True)
        pred_module = gr.Dropdown(label="Predicted by", value="final",
                                  choices=[(explorer.MODULE_LABELS[m], m) for m in explorer.MODULES])
        pred_class = gr.Dropdown(label="Predicted class", choices=[("any", "")], value="", allow_custom_value=True)
    with gr.Row():
        low = gr.Slider(0, 1, value=0, step=0.01, label="EmoVLM-KD confidence at least")
        high = gr.Slider(0, 1, value=1, step=0.01, label="at most")
        sort = gr.Dropdown(label="Sort", choices=list(explorer.SORTS), value="index")
        selection = gr.Textbox(label="Table cell", value="", interactive=False, elem_id="selection")
        clear = gr.Button("Clear cell")
    with gr.Row():
        previous = gr.Button("◀ Previous", elem_id="previous")
        number = gr.Number(value=1, precision=0, label="Page", elem_id="page")
        following = gr.Button("Next ▶", elem_id="next")
        info = gr.Markdown(elem_id="gallery_info")
    thumbs = gr.Gallery(label="Test images", columns=6, height="auto", allow_preview=False, elem_id="gallery")
    shown = gr.JSON(visible=False)
    with gr.Row():
        with gr.Column(scale=1):
            picked = gr.Textbox(label="Image (path in the image folder)", elem_id="picked")
            image = gr.Image(label="Image", type="filepath", interactive=False, height=320, elem_id="detail_image")
            full_path = gr.Textbox(label="File")
            marks = gr.Textbox(label="Predictions", elem_id="detail_caption")
        with gr.Column(scale=1):
            vlm_probs = gr.Label(label="VLM class probabilities (score mode)", num_top_classes=5)
            head_probs = gr.Label(label="Head probabilities", num_top_classes=5)
            final_probs = gr.Label(label="EmoVLM-KD probabilities", num_top_classes=5, elem_id="detail_final")
            weights = gr.Label(label="Gate source weights (gates that expose them)")
        with gr.Column(scale=1):
            generate = gr.Button("Generate key elements and reasoning (loads nothing; needs the model)",
                                 interactive=predictor is not None)
            observation = gr.Textbox(label="Key elements", lines=4)
            reasoning = gr.Textbox(label="Reasoning", lines=4)

    filters = [run_select, category, selection, true_class, pred_module, pred_class, low, high, sort, number]
    gallery_out = [thumbs, number, info, shown]
    loaded = [status, table, *confusions, category, true_class, pred_class, selection]
    run_select.change(show_run, run_select, loaded, api_name="explore_run").then(
        lambda: 1, None, number).then(gallery, filters, gallery_out, api_name="explore_gallery")
    for control in (category, true_class, pred_module, pred_class, low, high, sort):
        control.input(lambda: 1, None, number, api_visibility="private").then(
            gallery, filters, gallery_out, api_visibility="private")
    for button, step in ((previous, -1), (following, 1)):
        button.click(lambda n, s=step: max(1, int(n or 1) + s), number, number, api_visibility="private").then(
            gallery, filters, gallery_out, api_visibility="private")
    number.submit(gallery, filters, gallery_out, api_visibility="private")
    clear.click(lambda: ("", 1), None, [selection, number], api_visibility="private").then(
        gallery, filters, gallery_out, api_visibility="private")
    table.select(pick_table, run_select, [category, selection, number], api_visibility="private").then(
        gallery, filters, gallery_out, api_visibility="private")
    for module, frame in zip(explorer.MODULES, confusions):
        frame.select(pick_confusion(module), run_select, [selection, number], api_visibility="private").then(
            gallery, filters, gallery_out, api_visibility="private")
    thumbs.select(pick_thumbnail, shown, picked, api_visibility="private").then(
        detail, [run_select, picked], [image, vlm_probs, head_probs, final_probs, weights, full_path, marks],
        api_name="explore_detail")
    generate.click(explain, [run_select, picked], [observation, reasoning], api_name="explore_explain")
    app.load(show_run, run_select, loaded, api_visibility="private").then(
        gallery, filters, gallery_out, api_visibility="private")


def build_app(predictor, examples: Sequence[str] = (), max_new_tokens: int = 128,
              max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
              max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS, runs: ExplorerRuns | None = None,
              thumbnails: explorer.Thumbnails | None = None, page_size: int = 24):
    """The Gradio Blocks app around ``predictor`` (an ``engine.predictor.EmoVLMKD``; None: the
    explorer tab alone), with the explorer tab over ``runs`` when given.

    The single-image tab's event, ``api_name="predict"``: image file path in, OUTPUT_FIELDS out. A
    bad upload raises ``gr.Error``, which the page shows as a message.
    """
    gr = _gradio()
    if predictor is None:
        with gr.Blocks(title="EmoVLM-KD explorer") as app:
            gr.Markdown("# EmoVLM-KD: explore results")
            build_explorer_tab(gr, app, runs, thumbnails, None, page_size, max_new_tokens)
        return app
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
        with gr.Tabs():
            with gr.Tab("Single image", id="single"):
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
            if runs is not None:
                with gr.Tab("Explore results", id="explorer", elem_id="explorer_tab"):
                    build_explorer_tab(gr, app, runs, thumbnails, predictor, page_size, max_new_tokens)
        outputs = [vlm_answer, observation, reasoning, vlm_probs, head_probs, final_probs, gate_weights]
        run.click(analyse, inputs=image, outputs=outputs, api_name="predict")
    return app


@releases_locks
def main(args) -> None:
    """Load the trained stages (unless --no_model) and serve the app until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if bool(args.predictions) != bool(args.images):
        raise UserError("--predictions and --images go together: predict.py's file and the folder it predicted")
    _gradio()  # a missing gradio fails here, before the models load
    require_model_source(args)
    if args.no_model and not args.dataname:
        raise UserError("--no_model serves the explorer tab of --dataname's stage-3 runs: give --dataname")
    # The explorer tab reads --dataname's stage-3 runs and --predictions (an export alone has no tab).
    runs = ExplorerRuns.from_outputs(args.output_dir, args.dataname, args.data_root, args.predictions,
                                     args.images) if args.dataname or args.predictions else None
    if args.predictions and runs is not None:
        runs.get(runs.default)  # a bad --predictions file or --images folder: one line, before serving
    if args.no_model:
        predictor = None
    else:
        predictor = EmoVLMKD.from_args(args, resolve_device(args.gpu))
    examples = example_images(args.data_root, args.dataname, args.output_dir, args.num_examples) \
        if args.dataname and not args.no_model else []
    app = build_app(predictor, examples, args.max_new_tokens, args.max_image_side, args.max_upload_pixels,
                    runs=runs, page_size=args.page_size)
    app.queue(default_concurrency_limit=1)  # one model, one prediction at a time
    # Served files: the dataset's images and --images (Gradio itself serves its own cache of the
    # thumbnails and uploads); nothing else.
    allowed = [str(Path(args.data_root).resolve())] + ([str(Path(args.images).resolve())] if args.images else [])
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=allowed)
    except OSError as err:  # port taken, host not bindable
        raise UserError(f"--host {args.host} --port {args.port}: cannot serve there ({err}); "
                        "pick another --port") from None


def parse(argv=None):
    """The command line as ``main`` takes it: ``--config`` defaults, then every flag rule checked."""
    return parse_args(get_args_parser(), argv, FLAG_RULES)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse=parse))
