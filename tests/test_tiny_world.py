"""The tiny world every other test stands on: toy images, the tiny VLM folder, models/vlm.py."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import toy
from data.toy import make_toy_dataset
from models.tiny import TINY_TEACHER_IMG_SIZE, TINY_TEACHER_MODEL, build_tiny_vlm
from models.vlm import load_processor, load_vlm, pooled_image_features, vision_hidden_size
from utils.errors import UserError


@pytest.fixture(scope="module")
def tiny_qwen25_dir(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("checkpoints") / "tiny-qwen2_5-vl", arch="qwen2_5_vl", seed=0)


def _images_of_different_sizes() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((64, 64), (90, 200), (150, 120))]


def _chat(processor, image: Image.Image, question: str = "Which emotion does this image evoke?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, processor(text=[text], images=[image], return_tensors="pt")


# ---- toy data -------------------------------------------------------------------------------

def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_toy_dataset_layout_and_same_bytes_for_a_seed(tmp_path):
    names = make_toy_dataset(tmp_path / "a", num_classes=4, per_class=3, test_per_class=2, seed=0, size=32)
    make_toy_dataset(tmp_path / "b", num_classes=4, per_class=3, test_per_class=2, seed=0, size=32)
    make_toy_dataset(tmp_path / "c", num_classes=4, per_class=3, test_per_class=2, seed=1, size=32)
    assert names == ["amusement", "anger", "awe", "contentment"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["test", "train"]
    for split, count in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (tmp_path / "a" / split).iterdir()) == names
        for name in names:
            files = list((tmp_path / "a" / split / name).glob("*.png"))
            assert len(files) == count
            assert Image.open(files[0]).size == (32, 32) and Image.open(files[0]).mode == "RGB"
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_toy_class_names_and_user_errors(tmp_path, capsys):
    toy.main(["--out", str(tmp_path / "bin"), "--num_classes", "2", "--per_class", "1",
              "--test_per_class", "1"])
    assert "['negative', 'positive']" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "bin" / "train").iterdir()) == ["negative", "positive"]
    assert make_toy_dataset(tmp_path / "eight", 8, 1, 1)[-1] == "sadness"
    for bad in (1, 9):
        with pytest.raises(UserError, match="--num_classes"):
            make_toy_dataset(tmp_path / f"k{bad}", num_classes=bad, per_class=1, test_per_class=1)
    with pytest.raises(UserError, match="not empty"):
        make_toy_dataset(tmp_path / "bin", num_classes=2, per_class=1, test_per_class=1)


# ---- tiny VLM folder ------------------------------------------------------------------------

def test_tiny_vlm_loads_through_auto_classes_and_runs_a_chat_prompt(tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    text, inputs = _chat(processor, Image.new("RGB", (64, 64), (200, 30, 30)))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Which emotion does this image evoke?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    # The processor expands the one placeholder into one token per merged 2x2 patch block.
    num_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert num_image_tokens == int(inputs["image_grid_thw"].prod()) // 4 > 0
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    # Our byte-level tokenizer round-trips any text, and knows the Qwen special tokens.
    tokenizer = processor.tokenizer
    sample = "{'emotion': 'awe'} naïve 🙂"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) <= model.config.text_config.vocab_size


def test_chat_template_string_content_system_and_answer(tiny_vlm_dir):
    processor = load_processor(tiny_vlm_dir)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "{'emotion': 'awe'}"}]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n{'emotion': 'awe'}<|im_end|>\n")
    assert processor.tokenizer.padding_side == "left"


def test_pooled_features_batch_equals_one_by_one(tiny_vlm_dir):
    model, processor = load_vlm(tiny_vlm_dir), load_processor(tiny_vlm_dir)
    assert not model.training
    images = _images_of_different_sizes()
    batch = pooled_image_features(model, processor, images)
    single = torch.cat([pooled_image_features(model, processor, [image]) for image in images])
    assert batch.shape == (3, vision_hidden_size(model)) == (3, model.config.text_config.hidden_size)
    assert batch.dtype == torch.float32 and batch.device.type == "cpu"
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-4  # different images, different features


def test_pooled_features_through_a_peft_model(tiny_vlm_dir):
    from peft import LoraConfig, get_peft_model

    processor = load_processor(tiny_vlm_dir)
    images = _images_of_different_sizes()[:2]
    expected = pooled_image_features(load_vlm(tiny_vlm_dir), processor, images)
    # Nonzero LoRA weights (B is zero by default): on the language model they leave the visual
    # features alone, on the visual encoder's qkv they change them.
    language = get_peft_model(load_vlm(tiny_vlm_dir), LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
    assert vision_hidden_size(language) == expected.shape[1]
    torch.testing.assert_close(pooled_image_features(language, processor, images), expected)
    visual = get_peft_model(load_vlm(tiny_vlm_dir), LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False))
    assert (pooled_image_features(visual, processor, images) - expected).abs().max() > 1e-4


def test_4bit_loading_leaves_the_visual_encoder_and_lm_head_alone(tiny_vlm_dir):
    from transformers.quantizers.quantizers_utils import should_convert_module

    from models.vlm import BNB_SKIP_MODULES

    linear = [name for name, module in load_vlm(tiny_vlm_dir).named_modules() if isinstance(module, torch.nn.Linear)]
    kept = {name for name in linear if not should_convert_module(name, list(BNB_SKIP_MODULES))}
    assert kept == {name for name in linear if name.startswith("model.visual.")} | {"lm_head"}
    assert any(name.startswith("model.visual.") for name in kept) and len(kept) < len(linear)


def test_pixel_budget_override_changes_visual_tokens(tiny_vlm_dir):
    image = Image.new("RGB", (200, 90))
    default = load_processor(tiny_vlm_dir).image_processor(images=[image])["image_grid_thw"]
    larger = load_processor(tiny_vlm_dir, max_pixels=28 * 28 * 64).image_processor(images=[image])["image_grid_thw"]
    assert int(larger.prod()) > int(default.prod())
    with pytest.raises(UserError, match="--min_pixels 9000 is above --max_pixels 4000"):
        load_processor(tiny_vlm_dir, min_pixels=9000, max_pixels=4000)


def test_default_pixel_budget_is_capped(tiny_vlm_dir, tmp_path):
    import json
    import shutil

    from models.vlm import DEFAULT_MAX_PIXELS

    assert load_processor(tiny_vlm_dir).image_processor.size.longest_edge == 12544  # its own, small budget
    # Qwen2-VL-7B-Instruct's hub processor allows 12845056 pixels (16384 visual tokens).
    hub_like = shutil.copytree(tiny_vlm_dir, tmp_path / "hub-like")
    config = json.loads((hub_like / "processor_config.json").read_text())
    config["image_processor"]["size"]["longest_edge"] = 12845056
    (hub_like / "processor_config.json").write_text(json.dumps(config))
    assert load_processor(hub_like).image_processor.size.longest_edge == DEFAULT_MAX_PIXELS
    assert load_processor(hub_like, max_pixels=2 * DEFAULT_MAX_PIXELS).image_processor.size.longest_edge \
        == 2 * DEFAULT_MAX_PIXELS


def test_qwen2_5_vl_builds_and_runs(tiny_qwen25_dir):
    model, processor = load_vlm(tiny_qwen25_dir), load_processor(tiny_qwen25_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    # Qwen2.5-VL's merger output width is out_hidden_size; hidden_size is the encoder's inner width.
    assert model.config.vision_config.hidden_size != vision_hidden_size(model) == 64
    _, inputs = _chat(processor, Image.new("RGB", (90, 60), (30, 30, 200)))
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    images = _images_of_different_sizes()
    batch = pooled_image_features(model, processor, images)
    single = torch.cat([pooled_image_features(model, processor, [image]) for image in images])
    assert batch.shape == (3, 64)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_missing_model_is_a_user_error(tmp_path):
    missing = tmp_path / "no-such-model"
    for load in (load_vlm, load_processor):
        with pytest.raises(UserError, match=f"--vlm_model {missing}: no such folder"):
            load(str(missing))
    with pytest.raises(UserError, match="--vlm_model nobody/no-such-model"):
        load_vlm("nobody/no-such-model")


def test_quant_and_adapter_mistakes_are_user_errors(tiny_vlm_dir, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--quant 4bit needs a CUDA GPU"):
            load_vlm(tiny_vlm_dir, quant="4bit")
    with pytest.raises(UserError, match="adapter_config.json"):
        load_vlm(tiny_vlm_dir, adapter=tmp_path)


def test_tiny_teacher_builds_for_toy_images():
    import timm

    teacher = timm.create_model(TINY_TEACHER_MODEL, pretrained=False, num_classes=4, img_size=TINY_TEACHER_IMG_SIZE)
    with torch.no_grad():
        assert teacher(torch.randn(2, 3, TINY_TEACHER_IMG_SIZE, TINY_TEACHER_IMG_SIZE)).shape == (2, 4)
