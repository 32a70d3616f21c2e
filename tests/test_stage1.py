"""Stage 1 (train_vlm.py): answer-only masking, LoRA training on the toy data, adapter reload,
score/generate evaluation, a 2-process CPU run, and one-line errors for bad inputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import REPO, run_script
from tests.pipeline import trained_pipeline  # noqa: F401  (session fixture)

TOY_CONFIG = str(REPO / "configs" / "toy_vlm.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread


def write_annotations(data_root: Path, output_dir: Path, extra: tuple[str, ...] = ()) -> Path:
    """Synthetic stage-0 output: one annotation per training image (plus ``extra`` image paths)."""
    from data.annotations import ANNOTATIONS_FILE, Annotation, append_annotation
    from data.datasets import load_dataset

    splits = load_dataset(data_root, "toy", output_dir)
    path = output_dir / "toy" / "instructions" / ANNOTATIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [(s.path, splits.class_names[s.label]) for s in splits.train]
    records += [(image, splits.class_names[0]) for image in extra]
    with open(path, "w", encoding="utf-8") as fh:
        for image, label in records:
            append_annotation(fh, Annotation(image, label, f"A {label} scene: one shape on a plain background.",
                                             "The colours and the shape set the mood.", "test"))
    return path


def stage1_argv(toy_root: Path, output_dir: Path, vlm: Path, *extra: str) -> list[str]:
    return ["--dataname", "toy", "--data_root", str(toy_root), "--output_dir", str(output_dir),
            "--vlm_model", str(vlm), *extra]


def test_masking_labels_only_answers(tiny_vlm_dir, toy_root):
    from data.annotations import Annotation, to_conversations
    from models.chat import IGNORE_INDEX, encode_conversations
    from models.vlm import load_processor

    processor = load_processor(str(tiny_vlm_dir))
    tokenizer = processor.tokenizer
    annotation = Annotation("toy/x.png", "awe", "A red circle on yellow.", "Big bright shapes feel grand.", "t")
    conversations = to_conversations(annotation, ["amusement", "anger", "awe", "contentment"])
    image = Image.open(next((toy_root / "toy" / "train" / "awe").iterdir()))
    small = image.resize((40, 30))  # fewer visual tokens: rows differ in length and get padded
    batch = encode_conversations(processor, list(conversations.values()), [image, small, image])
    answers = ["A red circle on yellow.", "Big bright shapes feel grand.", "{'emotion': 'awe'}"]
    for row, answer in enumerate(answers):
        labelled = batch["labels"][row] != IGNORE_INDEX
        assert tokenizer.decode(batch["input_ids"][row][labelled]) == answer + tokenizer.eos_token
        # Labels are contiguous and equal the inputs there.
        positions = labelled.nonzero().flatten()
        assert positions[-1] - positions[0] + 1 == len(positions)
        assert torch.equal(batch["labels"][row][labelled], batch["input_ids"][row][labelled])

    whole = encode_conversations(processor, list(conversations.values()), [image, small, image],
                                 train_on_prompt=True)
    labelled = whole["labels"] != IGNORE_INDEX
    assert (labelled.sum(1) > (batch["labels"] != IGNORE_INDEX).sum(1) + 50).all()
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not labelled[whole["input_ids"] == image_token].any()
    assert not labelled[whole["attention_mask"] == 0].any()
    assert (whole["attention_mask"] == 0).any()  # the padding case was exercised


def test_examples_skip_val_images_and_refuse_missing_ones(toy_root, tmp_path, caplog):
    from data.annotations import read_annotations
    from data.datasets import load_dataset
    from engine.vlm_train import build_examples
    from utils.errors import UserError

    splits = load_dataset(toy_root, "toy", tmp_path)
    path = write_annotations(toy_root, tmp_path, extra=(splits.val[0].path,))
    examples = build_examples(read_annotations(path), splits, path)
    assert len(examples) == 3 * len(splits.train)
    assert "outside the training split" in caplog.text

    # Images stage 0 gave no usable text keep their categorical conversation: none is lost.
    from data.prompts import categorical_answer
    from engine.vlm_train import example_counts

    half = [a for a in read_annotations(path) if a.image in {s.path for s in splits.train}][::2]
    examples = build_examples(half, splits, path)
    counts = example_counts(examples, len(splits.train))
    assert counts == {"train_images": len(splits.train), "with_text": len(half),
                      "without_text": len(splits.train) - len(half),
                      "conversations": {"observation": len(half), "reasoning": len(half),
                                        "categorical": len(splits.train)}}
    categorical = {Path(e["image"]).relative_to(toy_root).as_posix(): e["conversation"][-1]["content"][0]["text"]
                   for e in examples if e["task"] == "categorical"}
    assert categorical == {s.path: categorical_answer(splits.class_names[s.label]) for s in splits.train}

    gone = write_annotations(toy_root, tmp_path / "gone", extra=("toy/train/awe/deleted.png",))
    with pytest.raises(UserError, match="deleted.png no longer exists"):
        build_examples(read_annotations(gone), splits, gone)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_pipeline) -> Path:  # noqa: F811
    """Stage 1 with the documented toy settings (configs/toy_vlm.yaml: 5 epochs, then the test
    evaluation), run in-process on the session's toy data and tiny VLM: the session pipeline's
    (tests/pipeline.py), so the suite trains it once; its stage 0 and 1 folders are copied, as
    these tests add evaluations to them. Returns the vlm/ folder."""
    output_dir = tmp_path_factory.mktemp("outputs")
    for stage in ("instructions", "vlm"):
        shutil.copytree(trained_pipeline.stage(stage), output_dir / "toy" / stage)
    return output_dir / "toy" / "vlm"


def test_training_lowers_loss_and_learns_the_toy_classes(trained, tiny_vlm_dir):
    history = [json.loads(line) for line in (trained / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    # The toy world has validation images (split off train): each epoch is scored on them.
    assert all(0.0 <= row["val_acc"] <= 1.0 for row in history)
    for name in ("adapter_config.json", "adapter_model.safetensors", "processor_config.json",
                 "run.json", "curves.png", "eval_score/confusion_matrix.png"):
        assert (trained / name).is_file(), name
    meta = json.loads((trained / "meta.json").read_text())
    assert meta["class_names"] == ["amusement", "anger", "awe", "contentment"]
    assert meta["base_model"] == str(tiny_vlm_dir) and meta["modules_to_save"] == ["lm_head"]
    assert (meta["attn_implementation"], meta["gradient_checkpointing"], meta["eval_every_epoch"]) == \
        ("sdpa", False, True)  # transformers' choice; off on CPU; on where validation images exist
    run = json.loads((trained / "run.json").read_text())
    assert meta["counts"] == run["counts"] and run["counts"]["without_text"] == 0  # every image annotated
    assert run["counts"]["conversations"]["categorical"] == run["counts"]["train_images"]
    metrics = json.loads((trained / "eval_score" / "metrics.json").read_text())
    assert metrics["n"] == 32 and metrics["unparseable"] == 0
    # Measured 0.844 (27 of 32, the session pipeline's stage 1; 0.75-0.91 over seeds), chance 0.25:
    # asserted minus 10 points.
    assert metrics["accuracy"] >= 0.74


def _test_images(toy_root: Path, count: int = 6) -> tuple[list[Image.Image], list[str]]:
    files = sorted((toy_root / "toy" / "test").rglob("*.png"))[::5][:count]
    return [Image.open(f).convert("RGB") for f in files], [f.relative_to(toy_root).as_posix() for f in files]


def test_reloaded_adapter_reproduces_the_trained_predictions(trained):
    from models.scorer import predict_vlm
    from models.vlm import load_trained_vlm

    from data.datasets import open_image

    model, processor, vlm_record = load_trained_vlm(trained, "cpu")
    rows = [json.loads(line) for line in (trained / "eval_score" / "predictions.jsonl").read_text().splitlines()]
    root = Path(json.loads((trained / "run.json").read_text())["args"]["data_root"])
    images = [open_image(root / row["image"]) for row in rows[:8]]
    result = predict_vlm(model, processor, images, vlm_record.class_names, "score", batch_size=4)
    saved = torch.tensor([row["probs"] for row in rows[:8]])
    assert torch.allclose(result.probs, saved, atol=2e-6)


def test_score_is_a_distribution_matching_one_class_at_a_time(trained, toy_root):
    from models.scorer import score_classes
    from models.vlm import load_trained_vlm
    from tests.oracles import score_classes_full

    model, processor, vlm_record = load_trained_vlm(trained, "cpu")
    images, _ = _test_images(toy_root)
    images[1] = images[1].resize((90, 40))  # another size: another number of visual tokens
    cached = score_classes(model, processor, images, vlm_record.class_names, batch_size=4)
    full = score_classes_full(model, processor, images, vlm_record.class_names)
    assert torch.allclose(cached, full, atol=1e-3)
    assert torch.equal(cached.argmax(1), full.argmax(1))
    probs = torch.softmax(cached, dim=-1)
    assert torch.allclose(probs.sum(1), torch.ones(len(images)))


def test_generate_mode_and_unparseable_answers(trained, tiny_vlm_dir, toy_root, tmp_path):
    import train_vlm
    from data.datasets import load_dataset
    from engine.vlm_eval import evaluate_vlm
    from models.vlm import load_processor, load_vlm

    # The trained adapter answers in the dictionary form.
    output_dir = trained.parents[1]
    train_vlm.main(train_vlm.parse(stage1_argv(toy_root, output_dir, tiny_vlm_dir, "--eval_only", "--eval_mode", "generate")))
    metrics = json.loads((trained / "eval_generate" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (trained / "eval_generate" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["mode"] == "generate" and len(rows) == metrics["n"] == 32
    # Measured: accuracy 0.844 (the session pipeline's adapter), nothing unparseable (chance 0.25):
    # asserted minus 10 points.
    assert metrics["unparseable"] <= 4 and metrics["accuracy"] >= 0.74
    assert all(row["text"].startswith("{'emotion'") for row in rows if row["pred"] is not None)

    # The untrained model babbles: every answer is unparseable, counted, and scored as wrong.
    splits = load_dataset(toy_root, "toy", output_dir)
    model, processor = load_vlm(str(tiny_vlm_dir)), load_processor(str(tiny_vlm_dir))
    metrics = evaluate_vlm(model, processor, toy_root, splits.test[:4], splits.class_names, tmp_path,
                           mode="generate", max_new_tokens=8)
    assert metrics["unparseable"] == 4 and metrics["accuracy"] == 0.0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(row["pred"] is None and row["text"] for row in rows)


def test_eval_only_refuses_another_base_model(trained, toy_root):
    import train_vlm
    from utils.errors import UserError

    with pytest.raises(UserError, match="adapter trained on --vlm_model"):
        train_vlm.main(train_vlm.parse(stage1_argv(toy_root, trained.parents[1], Path("elsewhere"), "--eval_only")))


def test_evaluation_loads_the_base_as_stage3_and_accepts_a_moved_base(trained, toy_root, tiny_vlm_dir, tmp_path,
                                                                     monkeypatch):
    import shutil
    from dataclasses import replace

    import train_vlm
    from models.vlm import base_model_path, load_trained_vlm, trained_quant
    from utils.errors import UserError
    from utils.records import VLMRecord

    calls = []

    def record(vlm_dir, device, vlm_model=None, quant=None, dtype=None):
        calls.append((quant, dtype))
        raise UserError("stop")

    monkeypatch.setattr(train_vlm, "load_trained_vlm", record)  # the name stage 1 calls
    for flags, expected in (((), "none"), (("--quant", "none"), "none"), (("--quant", "4bit"), "4bit")):
        with pytest.raises(UserError, match="stop"):
            train_vlm.main(train_vlm.parse(stage1_argv(toy_root, trained.parents[1], tiny_vlm_dir, "--eval_only", *flags)))
        # auto -> as train_gate.py loads it by default: unquantised, float32
        assert calls.pop() == (expected, torch.float32)
    monkeypatch.undo()

    assert trained_quant(None, None, "cpu") is None
    assert trained_quant("4bit", "4bit", "cpu") == "4bit"  # asked for: load_vlm then refuses on CPU
    assert trained_quant("4bit", None, "cpu") is None      # as trained is impossible here: warn
    assert trained_quant("4bit", "none", "cpu") is None

    moved = shutil.copytree(tiny_vlm_dir, tmp_path / "moved")
    vlm_record = VLMRecord.load(trained, "toy")
    assert base_model_path(vlm_record, str(moved), trained) == str(moved)
    model, _, _ = load_trained_vlm(trained, "cpu", vlm_model=str(moved))
    assert hasattr(model, "peft_config")
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(UserError, match="must name that same base model"):
        base_model_path(vlm_record, str(moved), trained)
    with pytest.raises(UserError, match="base model folder /gone/tiny is gone; .* --vlm_model"):
        base_model_path(replace(vlm_record, base_model="/gone/tiny"), None, trained)


def test_single_process_sees_only_its_gpu(monkeypatch):
    from utils.dist import pin_single_gpu
    from utils.errors import UserError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    env = {}
    assert pin_single_gpu(2, env) == 0 and env == {"CUDA_VISIBLE_DEVICES": "2"}
    env = {"CUDA_VISIBLE_DEVICES": "3,5,7,9"}
    assert pin_single_gpu(1, env) == 0 and env["CUDA_VISIBLE_DEVICES"] == "5"
    env = {}
    assert pin_single_gpu(None, env) is None and env["CUDA_VISIBLE_DEVICES"] == "0"
    with pytest.raises(UserError, match="--gpu 4: only 4 CUDA device"):
        pin_single_gpu(4, {})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # CPU machine: nothing to do
    env = {}
    assert pin_single_gpu(1, env) == 1 and env == {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher places each process itself
    assert pin_single_gpu(1, env) == 1 and env == {}


@pytest.mark.parametrize("gpus", [1, 3])
def test_trainer_placement_is_checked(gpus, monkeypatch, tmp_path):
    """The real TrainingArguments on a faked CUDA machine: a single process with 3 visible GPUs
    would become DataParallel (n_gpu 3, batch x3); one visible GPU is cuda:0 only."""
    from accelerate.state import AcceleratorState

    import engine.vlm_train
    import train_vlm
    from engine.vlm_train import check_placement, training_arguments
    from utils.cli import parse_args
    from utils.errors import UserError

    for name, value in (("is_available", True), ("device_count", gpus), ("is_bf16_supported", True),
                        ("set_device", None)):
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value, **kwargs: value)
    # Without TF32: transformers would ask the faked GPU for its properties (test_stage1_cuda_optimiser_...).
    monkeypatch.setattr(engine.vlm_train, "tf32_supported", lambda: False)
    args = parse_args(train_vlm.get_args_parser(), ["--dataname", "toy"])
    try:
        training_args = training_arguments(args, tmp_path, on_gpu=True)
        if gpus == 1:
            check_placement(training_args, torch.device("cuda", 0))
            with pytest.raises(UserError, match="model is on cuda:1"):
                check_placement(training_args, torch.device("cuda", 1))
        else:
            with pytest.raises(UserError, match="over 3 GPU"):
                check_placement(training_args, torch.device("cuda", 0))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("tf32", [True, False])
def test_stage1_cuda_optimiser_is_fused_adamw_with_tf32_as_the_reference(tf32, monkeypatch, tmp_path):
    """On a GPU the Trainer gets the reference run's fused AdamW and TF32 matmuls (where the GPU
    has them: Ampere or newer); on CPU the plain AdamW, and TF32 is left alone."""
    import engine.vlm_train
    import train_vlm
    from engine.vlm_train import trainer_settings

    monkeypatch.setattr(engine.vlm_train, "tf32_supported", lambda: tf32)
    args = train_vlm.get_args_parser().parse_args(["--dataname", "toy"])
    cuda = trainer_settings(args, tmp_path, on_gpu=True)
    assert cuda["optim"] == "adamw_torch_fused" and cuda["tf32"] is (True if tf32 else None)
    assert cuda["bf16"] and not cuda["use_cpu"]
    cpu = trainer_settings(args, tmp_path, on_gpu=False)
    assert cpu["optim"] == "adamw_torch" and cpu["tf32"] is None and not cpu["bf16"] and cpu["use_cpu"]


def test_flag_mistakes_stop_before_loading(toy_root, tmp_path, capsys):
    import train_vlm
    from utils.errors import run_cli

    argv = stage1_argv(toy_root, tmp_path, tmp_path / "no-model")
    assert run_cli(train_vlm.main, argv + ["--batch_size", "0"], parse=train_vlm.parse) == 2
    assert "error: --batch_size must be at least 1 (got 0)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_vlm.main(train_vlm.parse(argv + ["--lr_scheduler", "bogus"]))
    assert exit_info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_two_process_cpu_run_saves_one_adapter(tiny_vlm_dir, toy_root, tmp_path):
    write_annotations(toy_root, tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train_vlm.py", *stage1_argv(toy_root, tmp_path, tiny_vlm_dir, "--config", TOY_CONFIG,
                                            "--epoch", "1", "--skip_eval")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "toy" / "vlm"
    assert len(list(folder.glob("*.safetensors"))) == 1 and (folder / "meta.json").is_file()
    assert len((folder / "log.txt").read_text().splitlines()) == 1
    assert "2 process(es)" in result.stdout


def test_resume_continues_from_the_last_checkpoint(tiny_vlm_dir, toy_root, tmp_path, capsys):
    import train_vlm

    write_annotations(toy_root, tmp_path)
    argv = stage1_argv(toy_root, tmp_path, tiny_vlm_dir, "--config", TOY_CONFIG, "--skip_eval")
    train_vlm.main(train_vlm.parse(argv + ["--epoch", "1"]))
    folder = tmp_path / "toy" / "vlm"
    first_adapter = (folder / "adapter_model.safetensors").read_bytes()
    train_vlm.main(train_vlm.parse(argv + ["--epoch", "2", "--resume"]))
    assert "resuming from" in capsys.readouterr().out
    history = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[1]["step"] == 2 * history[0]["step"]  # epoch 1 was not run again
    assert (folder / "adapter_model.safetensors").read_bytes() != first_adapter


def test_missing_annotations_exit_2_naming_stage_0(tiny_vlm_dir, toy_root, tmp_path):
    result = run_script("train_vlm.py", *stage1_argv(toy_root, tmp_path, tiny_vlm_dir))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "python generate_instructions.py --dataname toy" in errors[0]


@pytest.mark.parametrize("case", ["image_gone", "quant_without_cuda", "flash_without_cuda", "unknown_model"])
def test_bad_inputs_are_one_line_errors(case, tiny_vlm_dir, toy_root, tmp_path, capsys):
    import train_vlm
    from utils.errors import run_cli

    extra = ("toy/train/awe/deleted.png",) if case == "image_gone" else ()
    write_annotations(toy_root, tmp_path, extra=extra)
    vlm, flags = tiny_vlm_dir, ()
    if case in ("quant_without_cuda", "flash_without_cuda"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        flags = ("--quant", "4bit") if case == "quant_without_cuda" else ("--attn_implementation", "flash_attention_2")
    if case == "unknown_model":
        vlm = tmp_path / "no-such-model"
    assert run_cli(train_vlm.main, stage1_argv(toy_root, tmp_path, vlm, *flags), parse=train_vlm.parse) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"image_gone": "deleted.png no longer exists", "quant_without_cuda": "--quant 4bit needs a CUDA GPU",
                "flash_without_cuda": "--attn_implementation flash_attention_2 needs a CUDA GPU",
                "unknown_model": "no-such-model"}[case]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "toy" / "vlm" / "meta.json").exists()


@pytest.mark.parametrize("extra, first_lr_fraction, scheduler", [
    ([], 1.0, "constant"),                                  # the reference run: constant, no warm-up
    (["--warmup_ratio", "0.1"], 0.0, "constant_with_warmup"),  # warm-up asked for: it happens
])
def test_stage1_schedule_is_constant_without_warmup_unless_asked(tmp_path, extra, first_lr_fraction, scheduler):
    """The first optimiser step runs at the full lr by default; ``--warmup_ratio`` > 0 ramps it up."""
    from transformers import get_scheduler

    import train_vlm
    from engine.vlm_train import training_arguments

    args = train_vlm.get_args_parser().parse_args(["--dataname", "x", *extra])
    training_args = training_arguments(args, tmp_path, on_gpu=False)
    assert training_args.lr_scheduler_type == scheduler
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    schedule = get_scheduler(training_args.lr_scheduler_type, optimizer,
                             num_warmup_steps=training_args.get_warmup_steps(100), num_training_steps=100)
    assert schedule.get_last_lr()[0] == pytest.approx(first_lr_fraction * args.lr)


def _lora_model(vlm_dir, modules_to_save=("lm_head",)):
    """The tiny VLM under LoRA as stage 1 trains it, lora_B drawn at random: it starts at zero,
    which would leave every lora_A gradient zero and untested."""
    from engine.vlm_train import wrap_lora
    from models.vlm import load_vlm

    model = wrap_lora(load_vlm(str(vlm_dir), trainable=True), 8, 8, 0.0, None, list(modules_to_save),
                      quantized=False, gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _training_batch(processor, toy_root: Path, train_on_prompt: bool) -> dict:
    """Three conversations (observation, reasoning, categorical) on images of different sizes, left-padded."""
    from data.annotations import Annotation, to_conversations
    from models.chat import encode_conversations

    annotation = Annotation("toy/x.png", "awe", "A red circle on yellow.", "Big bright shapes feel grand.", "t")
    conversations = list(to_conversations(annotation, ["amusement", "anger", "awe", "contentment"]).values())
    image = Image.open(next((toy_root / "toy" / "train" / "awe").iterdir())).convert("RGB")
    return dict(encode_conversations(processor, conversations, [image, image.resize((40, 30)), image],
                                     train_on_prompt))


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_logits_at_the_labelled_positions_give_the_trainers_loss_and_gradients(train_on_prompt, tiny_vlm_dir,
                                                                               toy_root, tmp_path):
    """Stage 1's Trainer runs the output layer only where the loss reads it (the answers; every
    text token with --train_on_prompt): the same loss and the same gradients (LoRA's and the fully
    trained lm_head's) as transformers' Trainer computing the logits of every position, per batch
    and normalised by a count of labelled tokens as under gradient accumulation."""
    from transformers import Trainer

    import train_vlm
    from engine.vlm_train import AnswerLogitsTrainer, training_arguments
    from models.chat import IGNORE_INDEX
    from models.vlm import load_processor
    from tests.oracles import loss_and_grads
    from utils.cli import parse_args

    model = _lora_model(tiny_vlm_dir)
    args = parse_args(train_vlm.get_args_parser(), ["--dataname", "toy"], train_vlm.FLAG_RULES)
    trainer = AnswerLogitsTrainer(model=model, args=training_arguments(args, tmp_path, on_gpu=False))
    assert trainer.keep_logits
    batch = _training_batch(load_processor(str(tiny_vlm_dir)), toy_root, train_on_prompt)
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert outputs.logits.shape[0] == labelled < batch["input_ids"].numel()  # the labelled positions only
    losses = []
    for num_items in (None, torch.tensor(3 * labelled)):  # per batch; a third of an accumulated batch
        ours = loss_and_grads(model, lambda: trainer.compute_loss(model, batch, num_items_in_batch=num_items))
        full = loss_and_grads(model, lambda: Trainer.compute_loss(trainer, model, batch, num_items_in_batch=num_items))
        torch.testing.assert_close(ours[0], full[0], rtol=1e-6, atol=1e-7)
        assert ours[1].keys() == full[1].keys() and any("lora_A" in n for n in full[1]) \
            and any("lm_head" in n for n in full[1])
        for name, grad in full[1].items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(ours[1][name], grad, rtol=1e-5, atol=1e-8, msg=name)
        losses.append(float(full[0]))
    # Qwen2-VL's forward takes loss keywords, so the Trainer normalises by its count: both branches ran.
    assert trainer.model_accepts_loss_kwargs and losses[1] == pytest.approx(losses[0] / 3, rel=1e-5)


def test_eval_every_epoch_logs_val_acc_and_changes_no_weight(tiny_vlm_dir, toy_root, tmp_path):
    """Scoring the validation images after each epoch adds val_acc to log.txt and the curves and
    leaves training alone: the same losses and the same saved adapter as a run without it."""
    from safetensors.torch import load_file

    import train_vlm

    folders = {}
    for choice in ("auto", "off"):
        output_dir = tmp_path / choice
        write_annotations(toy_root, output_dir)
        train_vlm.main(train_vlm.parse(stage1_argv(toy_root, output_dir, tiny_vlm_dir, "--config", TOY_CONFIG,
                                                   "--epoch", "2", "--skip_eval", "--eval_every_epoch", choice)))
        folders[choice] = output_dir / "toy" / "vlm"
    history = {choice: [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]
               for choice, folder in folders.items()}
    assert all(0.0 <= row["val_acc"] <= 1.0 for row in history["auto"]) and len(history["auto"]) == 2
    assert not any("val_acc" in row for row in history["off"])
    assert [row["train_loss"] for row in history["auto"]] == [row["train_loss"] for row in history["off"]]
    adapters = {choice: load_file(folder / "adapter_model.safetensors") for choice, folder in folders.items()}
    assert adapters["auto"].keys() == adapters["off"].keys()
    assert all(torch.equal(adapters["auto"][key], adapters["off"][key]) for key in adapters["auto"])
    metas = {choice: json.loads((folder / "meta.json").read_text()) for choice, folder in folders.items()}
    assert (metas["auto"]["eval_every_epoch"], metas["off"]["eval_every_epoch"]) == (True, False)


def test_eval_every_epoch_needs_validation_images_and_config_on_off_reads(tmp_path):
    from types import SimpleNamespace

    import train_vlm
    from utils.errors import UserError

    with_val, without_val = SimpleNamespace(val=["image"]), SimpleNamespace(val=[])
    assert train_vlm.eval_every_epoch("auto", with_val) and not train_vlm.eval_every_epoch("auto", without_val)
    assert not train_vlm.eval_every_epoch("off", with_val)
    with pytest.raises(UserError, match="--eval_every_epoch on: this dataset has no validation images"):
        train_vlm.eval_every_epoch("on", without_val)
    config = tmp_path / "c.yaml"
    config.write_text("eval_every_epoch: off\ngradient_checkpointing: on\n")  # YAML reads both as booleans
    args = train_vlm.parse(["--dataname", "toy", "--config", str(config)])
    assert (args.eval_every_epoch, args.gradient_checkpointing) == ("off", "on")


@pytest.mark.parametrize("choice, on_gpu, expected", [
    ("auto", True, True), ("auto", False, False), ("off", True, False), ("on", False, True)])
def test_gradient_checkpointing_flag(choice, on_gpu, expected, tmp_path, monkeypatch):
    """auto: on where CUDA trains (the reference run), off on CPU; on/off as asked."""
    import engine.vlm_train
    import train_vlm
    from engine.vlm_train import trainer_settings

    monkeypatch.setattr(engine.vlm_train, "tf32_supported", lambda: False)
    args = train_vlm.get_args_parser().parse_args(["--dataname", "toy", "--gradient_checkpointing", choice])
    settings = trainer_settings(args, tmp_path, on_gpu=on_gpu)
    assert settings["activation_checkpointing"] is expected
    assert settings["activation_checkpointing_kwargs"] == ({"use_reentrant": False} if expected else None)


def test_scoring_a_flash_attention_model_switches_to_sdpa_and_back(tiny_vlm_dir, monkeypatch):
    """The class scorer's 4-D mask is not FlashAttention-2's: the per-epoch validation scores with sdpa."""
    from engine.vlm_train import scoring_attention
    from models.vlm import attn_implementation, load_vlm

    model = load_vlm(str(tiny_vlm_dir))
    calls = []
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, name: calls.append(name))
    with scoring_attention(model):
        pass
    assert calls == [] and attn_implementation(model) == "sdpa"
    model.config._attn_implementation = "flash_attention_2"
    with scoring_attention(model):
        assert calls == ["sdpa"]
    assert calls == ["sdpa", "flash_attention_2"]
