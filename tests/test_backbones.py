"""Every supported VLM family (models/backbones.py) on its tiny builder: the cached class scorer
equals full scoring with explicit positions and no deprecated API, labels cover exactly the answer
tokens under the family's own chat template, pooled features do not depend on batching, LoRA
and 4-bit loading leave the visual encoder alone, and stages 1-3 + the predictor run end to end."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.backbones import BACKBONES, backbone_for, inner_model
from models.tiny import ARCHES
from tests.pipeline import ToyRun, run_pipeline
from utils.errors import UserError

CLASSES = ["amusement", "anger", "awe", "contentment"]
QWEN_ARCHES = [arch for arch in ARCHES if arch.startswith("qwen")]
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, tiny_vlm_dir):
    """``family_dir(arch)``: the tiny model folder of that family, built once per session."""
    from models.tiny import build_tiny_vlm

    def build(arch: str) -> Path:
        if arch == "qwen2_vl":
            return tiny_vlm_dir
        if arch not in _BUILT:
            _BUILT[arch] = build_tiny_vlm(tmp_path_factory.mktemp("families") / f"tiny-{arch}", arch, seed=0)
        return _BUILT[arch]

    return build


@pytest.fixture(scope="session")
def family_model(family_dir):
    """``family_model(arch)``: (model, processor) loaded through the Auto classes, cached."""
    from models.vlm import load_processor, load_vlm

    loaded = {}

    def load(arch: str):
        if arch not in loaded:
            loaded[arch] = load_vlm(family_dir(arch)), load_processor(family_dir(arch))
        return loaded[arch]

    return load


def _images() -> list[Image.Image]:
    """Three images of different sizes (so different numbers of visual tokens and padding)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((64, 64), (40, 90), (120, 50))]


def test_every_builder_is_a_supported_family():
    assert set(ARCHES) == set(BACKBONES)


@pytest.mark.parametrize("arch", ARCHES)
def test_cached_scorer_equals_full_scoring_without_deprecated_api(arch, family_model):
    from models.scorer import score_classes
    from tests.oracles import score_classes_full

    model, processor = family_model(arch)
    assert type(backbone_for(model)).__name__ == "Backbone" and backbone_for(model).family == arch
    images = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. transformers' FutureWarning for past_key_values=
        cached = score_classes(model, processor, images, CLASSES, batch_size=3)  # left-padded batch
    full = score_classes_full(model, processor, images, CLASSES)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    assert (full[:, 0] - full[:, 1]).abs().max() > 1e-4  # the classes score differently


@pytest.mark.parametrize("arch", QWEN_ARCHES)
def test_scorer_never_lets_the_model_infer_rotary_positions(arch, family_model, monkeypatch):
    """The model's own position inference reads and writes ``rope_deltas`` on the model; the
    scorer passes positions computed through ``get_rope_index`` instead."""
    from models.scorer import score_classes

    model, processor = family_model(arch)
    expected = score_classes(model, processor, _images(), CLASSES, batch_size=3)

    def forbidden(*args, **kwargs):
        raise AssertionError("the scorer relied on the model's hidden rotary state")

    monkeypatch.setattr(inner_model(model), "compute_3d_position_ids", forbidden)
    inner_model(model).rope_deltas = torch.full((3, 1), 1000)  # stale state from an unrelated forward
    torch.testing.assert_close(score_classes(model, processor, _images(), CLASSES, batch_size=3), expected)


@pytest.mark.parametrize("arch", ARCHES)
def test_labels_cover_exactly_the_answer_under_the_family_template(arch, family_model):
    from data.prompts import categorical_answer
    from models.chat import class_conversations
    from models.chat import IGNORE_INDEX, encode_conversations, encode_prompts

    _, processor = family_model(arch)
    conversations = class_conversations(CLASSES)[:2]
    images = _images()[:2]
    batch = encode_conversations(processor, conversations, images)
    tokenizer = processor.tokenizer
    for row, name in enumerate(CLASSES[:2]):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == categorical_answer(name) + "<|im_end|>"
        # The evaluation prompt is exactly the conversation before its answer.
        prompt = encode_prompts(processor, [conversations[row][:-1]], [images[row]])["input_ids"][0]
        real = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert torch.equal(real[:len(prompt)], prompt)
        assert torch.equal(real[len(prompt):len(prompt) + len(labelled)], labelled)


def test_family_templates_differ_as_the_real_ones_do(family_model):
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    rendered = {arch: family_model(arch)[1].apply_chat_template(user, tokenize=False) for arch in ARCHES}
    assert rendered["qwen2_vl"].startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert rendered["qwen3_vl"].startswith("<|im_start|>user\n<|vision_start|>")  # no default system turn
    assert "<|im_start|>user\n<image>\nHi" in rendered["llava_onevision"]


@pytest.mark.parametrize("arch", ARCHES)
def test_pooled_features_of_a_batch_equal_one_by_one(arch, family_model):
    from models.vlm import pooled_image_features, vision_hidden_size

    model, processor = family_model(arch)
    images = _images()
    batch = pooled_image_features(model, processor, images)
    single = torch.cat([pooled_image_features(model, processor, [image]) for image in images])
    assert batch.shape == (3, vision_hidden_size(model.config)) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHES)
def test_lora_and_4bit_leave_the_visual_encoder_alone(arch, family_dir):
    from transformers.quantizers.quantizers_utils import should_convert_module

    from engine.vlm_train import wrap_lora
    from models.vlm import load_vlm

    model = load_vlm(family_dir(arch), trainable=True)
    backbone = backbone_for(model)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    visual = {name for name in linear if not name.startswith("model.language_model.") and name != "lm_head"}
    kept = {name for name in linear if not should_convert_module(name, list(backbone.keep_unquantised))}
    assert visual and kept == visual | {"lm_head"}
    adapted = wrap_lora(model, 4, 4, 0.0, None, [], quantized=False, gradient_checkpointing=False)
    lora = {name.split(".lora_A")[0] for name, _ in adapted.named_modules() if name.endswith("lora_A")}
    assert lora and all(".language_model." in name for name in lora)
    assert {name.rsplit(".", 1)[1] for name in lora} == set(backbone.lora_targets)


def test_unsupported_architecture_is_one_line_naming_the_supported(tmp_path):
    from transformers import LlavaConfig

    from models.vlm import load_vlm

    LlavaConfig().save_pretrained(tmp_path)
    with pytest.raises(UserError) as error:
        load_vlm(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "'llava'" in message
    assert all(family in message and backbone.example in message for family, backbone in BACKBONES.items())


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_pipeline_end_to_end_above_chance(arch, family_dir, toy_root, tmp_path_factory):
    """Stages 1-3, the demo's predictor and stage 0's local generator; qwen2_vl runs through
    tests/pipeline.py and the quickstart elsewhere.
    Measured test accuracy (32 images, chance 0.25): VLM 0.75 / 0.97 / 1.0, head 0.88 / 0.91 /
    1.0, gate 0.94 / 0.94 / 1.0 (Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision); bars are 0.5 and 0.75."""
    from data.datasets import load_dataset
    from engine.predictor import EmoVLMKD

    pipeline = run_pipeline(ToyRun(toy_root, tmp_path_factory.mktemp(f"pipeline-{arch}"), family_dir(arch)),
                            vlm_epochs=5, gate_args=())
    metrics = json.loads((pipeline.stage("gate") / "metrics.json").read_text())
    assert metrics["vlm"]["accuracy"] >= 0.5
    assert metrics["head"]["accuracy"] >= 0.75
    assert metrics["gates"][metrics["gate"]]["accuracy"] >= 0.75

    splits = load_dataset(toy_root, "toy", pipeline.output_dir)
    predictor = EmoVLMKD.from_outputs(pipeline.output_dir, "toy", "cpu", str(pipeline.vlm_model))
    images = [Image.open(splits.absolute(sample)).convert("RGB") for sample in splits.test]
    results = predictor.predict_batch(images)
    labels = [splits.class_names[sample.label] for sample in splits.test]
    final_accuracy = np.mean([result["final_label"] == label for result, label in zip(results, labels)])
    assert final_accuracy == pytest.approx(metrics["gates"][metrics["gate"]]["accuracy"])
    # Stage 0 with the family as the local generator (greedy generation), on two images.
    import generate_instructions
    from data.annotations import ANNOTATIONS_FILE

    stage0 = ToyRun(toy_root, tmp_path_factory.mktemp(f"stage0-{arch}"), family_dir(arch))
    generate_instructions.main(generate_instructions.parse(stage0.argv("--backend", "local", "--vlm_model", str(family_dir(arch)),
                                           "--accept_unstructured", "--max_new_tokens", "8", "--limit", "2")))
    # The random generator's answers may fail stage 0's checks; each one is kept or rejected, none lost.
    folder = stage0.stage("instructions")
    kept = (folder / ANNOTATIONS_FILE).read_text().splitlines()
    rejected = (folder / "rejected.jsonl").read_text().splitlines() if (folder / "rejected.jsonl").exists() else []
    assert len(kept) + len(rejected) == 2


@pytest.mark.parametrize("arch", ARCHES)
def test_train_on_prompt_labels_every_text_token_and_no_image_token(arch, family_model):
    from models.chat import class_conversations
    from models.chat import IGNORE_INDEX, encode_conversations

    _, processor = family_model(arch)
    batch = encode_conversations(processor, class_conversations(CLASSES)[:1], _images()[:1], train_on_prompt=True)
    image = batch["input_ids"][0] == processor.image_token_id
    real = batch["attention_mask"][0].bool()
    labelled = batch["labels"][0] != IGNORE_INDEX
    assert image.sum() > 0 and torch.equal(labelled, real & ~image)


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("arch", ARCHES)
def test_logits_at_the_labelled_positions_give_the_full_loss_and_gradients(arch, train_on_prompt, family_dir):
    """Stage 1's loss from the logits at the labelled positions only (``logits_to_keep``) is the
    family's own loss on every position's logits, with the same LoRA gradients, on every family."""
    from engine.vlm_train import keeps_logits, kept_logits_loss, wrap_lora
    from models.chat import class_conversations, encode_conversations
    from models.vlm import load_processor, load_vlm
    from tests.oracles import loss_and_grads

    model = wrap_lora(load_vlm(family_dir(arch), trainable=True), 8, 8, 0.0, None, [], quantized=False,
                      gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A's gradients zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    assert keeps_logits(model)  # no family falls back to the logits of every position
    batch = dict(encode_conversations(load_processor(family_dir(arch)), class_conversations(CLASSES)[:3], _images(),
                                      train_on_prompt))
    kept = loss_and_grads(model, lambda: kept_logits_loss(model, batch)[0])
    full = loss_and_grads(model, lambda: model(**batch).loss)
    torch.testing.assert_close(kept[0], full[0], rtol=1e-6, atol=1e-7)
    assert kept[1].keys() == full[1].keys() and any("lora_A" in name for name in full[1])
    for name, grad in full[1].items():
        torch.testing.assert_close(kept[1][name], grad, rtol=1e-5, atol=1e-8, msg=name)
