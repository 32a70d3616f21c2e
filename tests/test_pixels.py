"""One decision for an image's pixels, in the data layer: EXIF orientation applied, 16-bit scaled to
8 bits. Stages 0-3 (open_image), the demo's uploads and batch prediction see the same pixels."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import engine.features
import engine.vlm_answers
from data.datasets import ORIENTATION_TAG, Sample, open_image, pre_resize, to_rgb
from engine.features import encode_block, vlm_feature_key
from engine.vlm_answers import VLMAnswerer, vlm_cache_key
from models.scorer import VLMPredictions
from utils.records import VLMRecord


@pytest.fixture
def rotated_jpeg(tmp_path):
    """A 40x20 picture stored sideways: left half red, right half blue, EXIF orientation 6 (90° CW)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    path = tmp_path / "sideways.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


@pytest.fixture
def png16(tmp_path):
    """A 16-bit greyscale PNG: a ramp over the full 0..65535 range."""
    values = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    return path


def test_exif_orientation_is_applied(rotated_jpeg):
    image = open_image(rotated_jpeg)
    assert image.size == (20, 40)  # turned upright
    top, bottom = np.asarray(image)[2, 10], np.asarray(image)[-3, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top, blue below


def test_16_bit_values_are_scaled_not_clipped(png16):
    grey = np.asarray(open_image(png16))[..., 0].astype(int)
    expected = np.rint(np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16) / 257)
    assert np.abs(grey - expected).max() <= 1
    assert grey.min() == 0 and grey.max() == 255 and (grey == 255).mean() < 0.01


@pytest.mark.parametrize("name", ["rotated_jpeg", "png16"])
def test_the_demo_and_batch_prediction_see_the_dataset_pixels(name, request):
    from engine.predictor import open_upload

    path = request.getfixturevalue(name)
    expected = np.asarray(open_image(path))
    assert np.array_equal(np.asarray(open_upload(path)), expected)  # demo upload
    with Image.open(path) as raw:  # EmoVLMKD.predict_batch is handed an image as a user opened it
        assert np.array_equal(np.asarray(to_rgb(raw)), expected)


@pytest.mark.parametrize("name", ["rotated_jpeg", "png16"])
def test_stage_0_sends_the_same_pixels_without_an_orientation_tag(name, request):
    from engine.instructions import image_data_url

    path = request.getfixturevalue(name)
    url, size = image_data_url(path, max_side=1024)
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.getexif().get(ORIENTATION_TAG, 1) == 1 and sent.size == size == open_image(path).size
    if name == "png16":  # lossless: exactly the dataset's pixels
        assert np.array_equal(np.asarray(sent.convert("RGB")), np.asarray(open_image(path)))


def test_demo_refuses_an_oversized_upload_from_its_header(tmp_path):
    import gradio as gr

    from demo import readable_upload_errors

    class Component:  # stands in for gr.Image: its preprocessing would decode the pixels
        def preprocess(self, payload):
            pytest.fail("the pixels were decoded before the size check")

    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(huge)  # 72 MP in a small file

    class Payload:
        path, orig_name = str(huge), "huge.png"

    component = readable_upload_errors(Component(), max_pixels=64_000_000)
    with pytest.raises(gr.Error, match="9000x8000 pixels"):
        component.preprocess(Payload())


def _picture(width: int, height: int) -> Image.Image:
    """A picture with detail at every scale, so resampling filters give different pixels."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_pre_resize_shrinks_the_longer_side_with_lanczos_as_the_reference():
    large = _picture(2000, 1500)
    shrunk = pre_resize(large, 1024)
    assert shrunk.size == (1024, 768)
    assert np.array_equal(np.asarray(shrunk), np.asarray(large.resize((1024, 768), Image.Resampling.LANCZOS)))
    assert not np.array_equal(np.asarray(shrunk), np.asarray(large.resize((1024, 768), Image.Resampling.BICUBIC)))
    assert pre_resize(_picture(1500, 2000), 1024).size == (768, 1024)  # portrait: the longer side is the height
    small = _picture(640, 480)
    assert pre_resize(small, 1024) is small  # smaller images untouched
    assert pre_resize(large, 0) is large and pre_resize(large, None) is large  # off: today's path


class _RecordSizes:
    """Stands in for the model call of a frozen pass: records the sizes of the images it is given."""

    def __init__(self, num_classes: int = 2):
        self.sizes, self.num_classes = [], num_classes

    def answers(self, model, processor, images, *args, **kwargs):
        self.sizes += [image.size for image in images]
        return VLMPredictions(pred=torch.zeros(len(images), dtype=torch.long),
                              probs=torch.full((len(images), self.num_classes), 0.5), texts=None)

    def features(self, model, processor, images, *args):
        self.sizes += [image.size for image in images]
        return torch.zeros(len(images), 3)


@pytest.fixture
def two_sizes(tmp_path):
    """A dataset folder with a 2000x1500 and a 640x480 image, and their samples."""
    for name, size in (("large.png", (2000, 1500)), ("small.png", (640, 480))):
        (tmp_path / "toy").mkdir(exist_ok=True)
        _picture(*size).save(tmp_path / "toy" / name)
    return tmp_path, [Sample("toy/large.png", 0), Sample("toy/small.png", 1)]


@pytest.mark.parametrize("side, expected", [(1024, [(1024, 768), (640, 480)]), (0, [(2000, 1500), (640, 480)])])
def test_the_frozen_passes_hand_the_processor_pre_resized_images(two_sizes, side, expected, monkeypatch):
    from data.datasets import DatasetSplits

    root, samples = two_sizes
    recorder = _RecordSizes()
    monkeypatch.setattr(engine.vlm_answers, "predict_vlm", recorder.answers)  # stage 1's evaluation, stage 3
    VLMAnswerer(root, ["a", "b"], model=object(), processor=object(), batch_size=1, pre_resize=side).answer_block(
        range(2), samples, "test")
    assert recorder.sizes == expected
    recorder.sizes.clear()
    monkeypatch.setattr(engine.features, "pooled_image_features", recorder.features)  # stage 2
    splits = DatasetSplits("toy", root, ["a", "b"], samples, [], [], False)
    encode_block(range(2), object(), object(), splits, samples, 1, 0, "test", side)
    assert recorder.sizes == expected


def test_the_cache_keys_change_with_the_pre_resize(two_sizes, tiny_vlm_dir):
    from transformers import AutoConfig

    from models.vlm import load_processor

    root, samples = two_sizes
    vlm = VLMRecord(class_names=["a", "b"], base_model="base", adapter_id="abc")
    answers = {side: vlm_cache_key(vlm, "score", 256, "none", ["a", "b"], root, samples, pre_resize=side)
               for side in (None, 0, 1024, 512)}
    processor, config = load_processor(tiny_vlm_dir), AutoConfig.from_pretrained(tiny_vlm_dir)
    features = {side: vlm_feature_key(str(tiny_vlm_dir), processor, config, torch.float32, side)
                for side in (None, 0, 1024, 512)}
    for keys in (answers, features):
        # Off, the key is the one caches had before the setting existed: they stay valid.
        assert keys[None] == keys[0] and "pre_resize" not in keys[0]
        assert keys[1024] != keys[0] and keys[1024] != keys[512]
