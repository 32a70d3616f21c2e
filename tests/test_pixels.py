"""One decision for an image's pixels, in the data layer: EXIF orientation applied, 16-bit scaled to
8 bits. Stages 0-3 (open_image), the demo's uploads and batch prediction see the same pixels."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from data.datasets import ORIENTATION_TAG, open_image, to_rgb


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
