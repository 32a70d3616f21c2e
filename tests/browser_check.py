"""Browser check of demo.py: headless Chromium loads the page, uploads a toy test image, clicks
Analyse, and the final prediction appears; a screenshot is saved in the test's temporary folder.
The explorer tab (no model loaded): it opens, a click on a complementarity cell fills the gallery,
a click on a thumbnail shows that image's detail.

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


def test_explorer_tab_cell_fills_the_gallery_and_a_thumbnail_shows_its_detail(trained_pipeline, browser,  # noqa: F811
                                                                              tmp_path):
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    import demo
    from engine import explorer

    metrics = json.loads((trained_pipeline.stage("gate") / "metrics.json").read_text())
    runs = demo.ExplorerRuns.from_outputs(trained_pipeline.output_dir, "toy", trained_pipeline.data_root)
    app = demo.build_app(None, runs=runs, thumbnails=explorer.Thumbnails(tmp_path / "thumbs"), page_size=8)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       allowed_paths=[str(trained_pipeline.data_root)])
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(ready.text_to_be_present_in_element((By.ID, "explore_status"), "32 images"))
        # The "both right" count of the VLM-vs-head row: the last row, second column.
        cells = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#complementarity tbody tr"))
        cell = cells[-1].find_elements(By.CSS_SELECTOR, "td")[1]
        assert cell.text.strip() == str(metrics["complementarity"]["vlm_vs_head"]["both_right"])
        cell.click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "gallery_info"), "VLM and head both right"))
        thumbs = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .thumbnail-item"))
        assert 0 < len(thumbs) <= 8
        thumbs[0].click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#picked textarea").get_attribute("value"))
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#detail_image img")))
        wait.until(lambda d: "true:" in d.find_element(By.CSS_SELECTOR, "#detail_caption textarea")
                   .get_attribute("value"))
        screenshot = tmp_path / "explorer.png"
        browser.save_screenshot(str(screenshot))
        print(f"\nscreenshot: {screenshot}")
    finally:
        app.close()
