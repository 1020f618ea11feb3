"""The page in a real browser: headless Debian Chromium driven by selenium against a running ``lungdet serve``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``;
``.ci/run`` installs them). Without them the test skips, except under CI, where it fails.
The screenshot goes to pytest's temporary folder, or to ``$LUNGDET_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import start_chromium

POSITIVE_SAMPLE = "00436515-870c-4b36-a041-de91049b9ab4.dcm"
WAIT_S = 120


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"), window_size=(1280, 1000))
    downloads = tmp_path_factory.mktemp("downloads")
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def api_reply(url: str, path: Path) -> dict:
    """What the page asks the API for the same file: every box (min_confidence 0)."""
    boundary = "pagetestboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="min_confidence"\r\n\r\n0\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n\r\n'.encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{url}api/v1/detect", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def shown_boxes(card) -> list[float]:
    from selenium.webdriver.common.by import By

    return sorted(
        float(box.get_attribute("data-confidence"))
        for box in card.find_elements(By.CSS_SELECTOR, ".box")
        if box.is_displayed()
    )


def test_page_shows_the_api_result_and_the_slider_hides_boxes(
    browser, serve_process, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    sample = rsna_sample_dir / POSITIVE_SAMPLE
    reply = api_reply(serve_process.url, sample)
    confidences = sorted(box["confidence"] for box in reply["boxes"])
    assert len(set(confidences)) >= 3, "the test checkpoint should give boxes of several confidences on this file"

    browser.get(serve_process.url)
    WebDriverWait(browser, WAIT_S).until(lambda driver: "Model " in driver.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "upload").send_keys(str(sample))
    card = WebDriverWait(browser, WAIT_S).until(
        lambda driver: driver.find_element(By.CSS_SELECTOR, ".result[aria-busy='false']")
    )

    # The verdict and the boxes are the API's.
    verdict = card.find_element(By.CSS_SELECTOR, ".verdict").text
    if reply["label"]["probability"] is None:  # no image head: whether a box reached the cut-off, and no percentage
        reached = "a box reached" if reply["label"]["name"] == "Lung Opacity" else "no box reached"
        assert (
            verdict == f"{reply['label']['name']} ({reached} the cut-off; this model gives no image-level probability)"
        ), verdict
    else:
        assert verdict.startswith(
            f"{reply['label']['name']} (probability of an opacity {reply['label']['probability']:.1f}%"
        ), verdict
    assert len(card.find_elements(By.CSS_SELECTOR, ".box")) == len(reply["boxes"])
    assert (
        "Not a diagnostic device" in card.text
        and "Not a diagnostic device" in browser.find_element(By.TAG_NAME, "body").text
    )
    threshold = reply["model"]["score_threshold"]
    assert shown_boxes(card) == [
        value for value in confidences if value >= threshold
    ]  # the slider starts at the tuned cut-off
    meta = card.find_element(By.CSS_SELECTOR, ".meta").text
    assert f"{reply['image']['view_position']}" in meta and f"{reply['image']['age']} years" in meta

    # Keyboard only: End hides every box below 100%, Home shows them all, then step up to a value between two confidences.
    slider = card.find_element(By.CSS_SELECTOR, ".min-confidence")
    slider.send_keys(Keys.END)
    assert shown_boxes(card) == [value for value in confidences if value >= 1.0]
    slider.send_keys(Keys.HOME)
    assert shown_boxes(card) == confidences
    middle = round(confidences[len(confidences) // 2] * 100)
    for _ in range(middle):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert slider.get_attribute("value") == str(middle)
    expected = [value for value in confidences if round(value * 10000) >= middle * 100]
    assert 0 < len(expected) < len(confidences)
    assert shown_boxes(card) == expected
    shown_rows = [row for row in card.find_elements(By.CSS_SELECTOR, ".box-table tbody tr") if row.is_displayed()]
    assert len(shown_rows) == len(expected)
    prediction_string = card.find_element(By.CSS_SELECTOR, ".prediction-string-text").get_attribute("value")
    assert len(prediction_string.split()) == 5 * len(expected)
    assert reply["prediction_string"].startswith(prediction_string)

    # The annotated PNG comes from the API's annotate route at the slider's value, named by the upload's id.
    card.find_element(By.CSS_SELECTOR, ".download").click()
    downloaded = browser.downloads / f"lungdet-{reply['id']}.png"
    WebDriverWait(browser, WAIT_S).until(lambda _: downloaded.is_file() and downloaded.stat().st_size > 0)
    assert downloaded.read_bytes().startswith(b"\x89PNG")

    folder = Path(os.environ.get("LUNGDET_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    screenshot = folder / "serve_page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000


def test_page_shows_a_bad_upload_as_an_error_card(browser, serve_process, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    text_file = tmp_path / "report.dcm"
    text_file.write_text("not an x-ray\n" * 50)
    browser.get(serve_process.url)
    browser.find_element(By.ID, "upload").send_keys(str(text_file))
    card = WebDriverWait(browser, WAIT_S).until(
        lambda driver: driver.find_element(By.CSS_SELECTOR, ".result.failed[aria-busy='false']")
    )
    assert "lungdet reads DICOM" in card.text
    assert (
        card.find_elements(By.CSS_SELECTOR, ".verdict")
        and not card.find_element(By.CSS_SELECTOR, ".verdict").is_displayed()
    )


def test_page_asks_for_the_token_once(
    browser, serving_checkpoint: Path, rsna_sample_dir: Path, tmp_path: Path, serve_starter
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serve_starter(serving_checkpoint, tmp_path, env={"LUNGDET_API_TOKEN": "page-test-token"})
    browser.get(server.url)
    panel = WebDriverWait(browser, WAIT_S).until(lambda driver: driver.find_element(By.ID, "token-panel"))
    WebDriverWait(browser, WAIT_S).until(lambda _: panel.is_displayed())
    assert "needs its API token" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "token").send_keys("page-test-token")
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    WebDriverWait(browser, WAIT_S).until(lambda driver: "Model " in driver.find_element(By.ID, "model-info").text)
    assert not panel.is_displayed()
    # Once given, the token goes with every upload, and a reload of the tab does not ask again.
    for _ in range(2):
        browser.find_element(By.ID, "upload").send_keys(str(sorted(rsna_sample_dir.glob("*.dcm"))[1]))
        card = WebDriverWait(browser, WAIT_S).until(
            lambda driver: driver.find_element(By.CSS_SELECTOR, ".result[aria-busy='false']")
        )
        assert card.find_element(By.CSS_SELECTOR, ".verdict").is_displayed()
        browser.refresh()
        WebDriverWait(browser, WAIT_S).until(lambda driver: "Model " in driver.find_element(By.ID, "model-info").text)
        assert not browser.find_element(By.ID, "token-panel").is_displayed()
    assert "page-test-token" not in server.log()


def test_page_shows_files_in_order_and_no_identifier(
    browser, serve_process, phi_dicom: Path, phi_strings: list[str], rsna_sample_dir: Path
) -> None:
    """Two files chosen at once, one named after its patient and carrying fake identifying tags: neither its name nor a tag reaches the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    other = sorted(rsna_sample_dir.glob("*.dcm"))[2]
    browser.get(serve_process.url)
    browser.find_element(By.ID, "upload").send_keys(f"{phi_dicom}\n{other}")
    WebDriverWait(browser, WAIT_S).until(
        lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".result[aria-busy='false']")) == 2
    )
    titles = [title.text for title in browser.find_elements(By.CSS_SELECTOR, ".result .card-title")]
    assert [title.split(" · ")[0] for title in titles] == ["File 1 of 2", "File 2 of 2"]
    page = browser.page_source
    for value in phi_strings + [other.stem]:
        assert value.lower() not in page.lower(), value
    log = serve_process.log()
    assert phi_dicom.name not in log and other.stem not in log


def test_a_lateral_view_shows_the_gate_s_verdict_and_nothing_else(
    browser, serve_process, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    import pydicom
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    dataset = pydicom.dcmread(rsna_sample_dir / POSITIVE_SAMPLE)
    dataset.ViewPosition = "LL"
    lateral = tmp_path / "lateral.dcm"
    dataset.save_as(lateral)
    browser.get(serve_process.url)
    WebDriverWait(browser, WAIT_S).until(lambda driver: "Model " in driver.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "upload").send_keys(str(lateral))
    card = WebDriverWait(browser, WAIT_S).until(
        lambda driver: driver.find_element(By.CSS_SELECTOR, ".result[aria-busy='false']")
    )
    assert card.find_element(By.CSS_SELECTOR, ".card-state").text.endswith(
        ": not a frontal chest radiograph: ViewPosition LL (only AP and PA views are frontal)"
    )
    # No empty X-ray, table or buttons under the verdict: the card's body stays hidden.
    assert not card.find_element(By.CSS_SELECTOR, ".card-body").is_displayed()
    assert card.find_elements(By.CSS_SELECTOR, ".box") == []
