"""Browser check of demo.py: headless Chromium loads the page, uploads a toy test image, clicks
Analyse, and the final prediction appears. The explorer tab (no model loaded): it opens, a click
on a complementarity cell fills the gallery with that cell's images, a click on a thumbnail shows
that image's detail. Each test saves a screenshot of the whole page for review:
``outputs/browser/demo.png`` and ``outputs/browser/explorer.png`` (gitignored, overwritten per run).

Not collected by ``pytest tests`` (the file name does not match ``test_*.py``); run it with
``make browser-test``, i.e. ``.venv/bin/python -m pytest tests/browser_check.py -q -s``.
Needs Debian's ``chromium`` and ``chromium-driver`` and ``pip install -r requirements-browser.txt``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.pipeline import trained_pipeline  # noqa: F401  (session fixture)
from tests.test_demo import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The screenshots to look at after a run (outputs/ is gitignored; each run overwrites them).
SCREENSHOTS = Path(__file__).resolve().parents[1] / "outputs" / "browser"


def text_of(element) -> str:
    """An element's text as the DOM holds it (Selenium's ``.text`` is empty for elements it deems hidden)."""
    return (element.get_attribute("textContent") or "").strip()


def save_full_page(driver, name: str) -> Path:
    """A screenshot of the whole page (the window stretched to its height) as ``SCREENSHOTS/name``."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1600, min(max(1100, height + 100), 6000))
    driver.execute_script("window.scrollTo(0, 0)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    driver.save_screenshot(str(path))
    print(f"\nscreenshot: {path}")
    return path


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


def test_page_uploads_an_image_and_shows_the_prediction(trained_pipeline, browser):  # noqa: F811
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
        screenshot = save_full_page(browser, "demo.png")
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
    both_right = metrics["complementarity"]["vlm_vs_head"]["both_right"]
    runs = demo.ExplorerRuns.from_outputs(trained_pipeline.output_dir, "toy", trained_pipeline.data_root)
    run = runs.get(explorer.PUBLISHED)
    cell_images = {run.records[i].image for i in explorer.select(run, explorer.Query(cell=("vlm_vs_head", "both_right")))}
    assert len(cell_images) == both_right
    app = demo.build_app(None, runs=runs, thumbnails=explorer.Thumbnails(tmp_path / "thumbs"), page_size=8)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       allowed_paths=[str(trained_pipeline.data_root)])
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(ready.text_to_be_present_in_element((By.ID, "explore_status"), "32 images"))
        # Gradio's Dataframe draws its rows as div[role=gridcell] cells with data-row/data-col (its
        # <table><tbody> holds one hidden row that only sizes the columns); Selenium's .text is empty
        # for some of them, so the cells are read by textContent.
        first_column = wait.until(lambda d: d.find_elements(
            By.CSS_SELECTOR, '#complementarity [role=gridcell][data-col="0"]'))
        pairs = {text_of(c): c.get_attribute("data-row") for c in first_column}
        assert set(pairs) == {"VLM vs teacher", "VLM vs head"}
        row = pairs["VLM vs head"]
        cell = browser.find_element(By.CSS_SELECTOR, f'#complementarity [role=gridcell][data-row="{row}"][data-col="1"]')
        assert text_of(cell) == str(both_right)
        cell.click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "gallery_info"),
                                                       f"{both_right} images (VLM and head both right)"))
        thumbs = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .thumbnail-item"))
        assert len(thumbs) == min(8, both_right)
        thumbs[1].click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#picked textarea").get_attribute("value"))
        picked = browser.find_element(By.CSS_SELECTOR, "#picked textarea").get_attribute("value")
        assert picked in cell_images
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#detail_image img")))
        record = run.records[run.index_of(picked)]
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#detail_caption textarea").get_attribute("value")
                   == explorer.caption(run, record))
        screenshot = save_full_page(browser, "explorer.png")
        assert screenshot.stat().st_size > 10_000
    finally:
        app.close()
