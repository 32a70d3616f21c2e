"""Browser check of demo.py: headless Chromium loads the page, uploads a toy test image, clicks
Analyse, and the final prediction appears; a screenshot is saved in the test's temporary folder.

Not collected by ``pytest tests`` (the file name does not match ``test_*.py``); run it with
``make browser-test``, i.e. ``.venv/bin/python -m pytest tests/browser_check.py -q -s``.
Needs Debian's ``chromium`` and ``chromium-driver`` and ``pip install -r requirements-browser.txt``.
"""
from __future__ import annotations

import shutil
import tempfile

import pytest

from tests.pipeline import trained_pipeline  # noqa: F401  (session fixture)
from tests.test_demo import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -r requirements-browser.txt")
    from selenium.webdriver.chrome.service import Service

    if not shutil.which(CHROMIUM) or not shutil.which(CHROMEDRIVER):
        pytest.fail("needs Chromium and its driver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1100", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_uploads_an_image_and_shows_the_prediction(trained_pipeline, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    import demo
    from data.datasets import open_image
    from engine.predictor import EmoVLMKD

    predictor = EmoVLMKD.from_outputs(trained_pipeline.output_dir, "toy")
    examples = demo.example_images(trained_pipeline.data_root, "toy", trained_pipeline.output_dir, 4)
    image_path = examples[1]
    expected = predictor.predict(open_image(image_path), explain=False)["final_label"]

    app = demo.build_app(predictor, examples, max_new_tokens=24)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        upload = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(image_path)
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        browser.find_element(By.ID, "analyse").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "final"), expected))
        wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#vlm_answer textarea")
                   .get_attribute("value"))
        screenshot = tmp_path / "demo.png"
        browser.save_screenshot(str(screenshot))
        print(f"\nscreenshot: {screenshot}")
        assert screenshot.stat().st_size > 10_000
        answer = browser.find_element(By.CSS_SELECTOR, "#vlm_answer textarea").get_attribute("value")
        assert "emotion" in answer
    finally:
        app.close()
