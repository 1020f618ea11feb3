"""lungdet's reports in the real OHIF viewer: served by a real Orthanc, opened in headless Chromium, the drawn boxes read back.

Needs Orthanc with its DICOMweb and ServeFolders plugins, Debian's chromium and chromium-driver,
and the OHIF build (``npm pack @ohif/app@3.13.2 --pack-destination ~/.cache/lungdet``; see
tests/pacs/ohif.py). Without them the tests skip, except under CI, where they fail.
Screenshots go to pytest's temporary folder, or to ``$LUNGDET_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungdet.data_tools.dicom_io import dicom_bytes
from lungdet.show.dicom_derived import REPORT_SERIES_NUMBER, model_identity
from lungdet.show.dicom_sr import structured_report
from lungdet.submission.prediction_string import Prediction
from tests.pacs.conftest import Orthanc
from tests.pacs.ohif import IMAGE_SHOWN_JS, VIEWPORTS_JS, OhifViewer, console_errors, prepare_ohif

# Three real positives, each with the two boxes RSNA's radiologists drew on it (XYWH_ABS, original
# pixels of the 1024 x 1024 image) as lungdet's prediction, so the boxes sit on real lungs.
POSITIVES = {
    "00436515-870c-4b36-a041-de91049b9ab4": [[264.0, 152.0, 213.0, 379.0], [562.0, 152.0, 256.0, 453.0]],
    "00704310-78a8-4b38-8475-49f4573b2dbb": [[323.0, 577.0, 160.0, 104.0], [695.0, 575.0, 162.0, 137.0]],
    "00aecb01-a116-45a2-956c-08d2fa55433f": [[288.0, 322.0, 94.0, 135.0], [547.0, 299.0, 119.0, 165.0]],
}
NEGATIVE = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"
SCORES = [0.91, 0.47]
# OHIF converts the SR's image coordinates to world coordinates and the screen; a box drawn more
# than this far from where the report puts it is in the wrong place (a whole-pixel or axis mix-up).
TOLERANCE_PX = 3.0


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OhifViewer]:
    """One Chromium for every study of this module: starting it and compiling OHIF are most of the time."""
    viewer = OhifViewer(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield viewer
    finally:
        viewer.close()


def store_with_report(orthanc, path: Path, boxes: list[list[float]], probability: float) -> pydicom.Dataset:
    """Store the real X-ray at ``path`` and lungdet's report of ``boxes`` (scores from SCORES) and an image head's ``probability``; returns the X-ray's tags."""
    orthanc.upload(path.read_bytes())
    source = pydicom.dcmread(path, stop_before_pixels=True)
    prediction = Prediction.from_arrays(SCORES[: len(boxes)], np.array(boxes, dtype=np.float64).reshape(-1, 4))
    model = model_identity("9.9.9", ["fasterrcnn_mobilenet_v3_large_fpn"], ["ab" * 32], 0.4)
    orthanc.upload(dicom_bytes(structured_report(source, prediction, probability, model)))
    return source


def corner_errors(expected: list[list[float]], drawn: list[list[float]]) -> float:
    """How far, in pixels, the drawn boxes' corners are from the expected ones: the largest difference of a corner's x or y (boxes XYWH_ABS, matched in sorted order)."""
    expected_corners = np.array([[x, y, x + w, y + h] for x, y, w, h in sorted(expected)])
    drawn_corners = np.array([[x, y, x + w, y + h] for x, y, w, h in sorted(drawn)])
    return float(np.abs(expected_corners - drawn_corners).max())


def screenshot_folder(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LUNGDET_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_ohif_draws_each_box_of_lungdet_reports_where_the_report_puts_it(
    orthanc_with_ohif, viewer: OhifViewer, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    studies = {
        stem: store_with_report(orthanc_with_ohif, rsna_sample_dir / f"{stem}.dcm", boxes, 0.83).StudyInstanceUID
        for stem, boxes in POSITIVES.items()
    }
    folder = screenshot_folder(tmp_path)
    for stem, boxes in POSITIVES.items():
        screenshot = folder / f"ohif_boxes_{stem[:8]}.png"
        shown = viewer.show_report(
            orthanc_with_ohif.url,
            studies[stem],
            series_number=REPORT_SERIES_NUMBER,
            expected_boxes=len(boxes),
            screenshot=screenshot,
        )
        assert not shown.errors, f"{stem}: OHIF logged errors: {[entry['message'][:500] for entry in shown.errors]}"
        if shown.rerendered:  # OHIF's own race (OhifViewer.show_report), not lungdet's; kept visible in the summary
            warnings.warn(
                f"{stem}: OHIF drew the report's boxes only after the viewport was rendered again", stacklevel=1
            )
        assert [(viewport["modality"], viewport["measurements"]) for viewport in shown.viewports] == [
            ("SR", len(boxes))
        ], stem
        # What OHIF holds (its annotations) and what it drew (the SVG on screen), each against the report.
        assert len(shown.boxes) == len(boxes), (
            f"{stem}: OHIF holds {len(shown.boxes)} boxes for the report's {len(boxes)}: {shown.boxes}"
        )
        assert corner_errors(boxes, shown.boxes) <= TOLERANCE_PX, f"{stem}: annotations {shown.boxes}, report {boxes}"
        assert len(shown.screen_boxes) == len(boxes), (
            f"{stem}: {len(shown.screen_boxes)} polylines on screen for the report's {len(boxes)}"
        )
        assert corner_errors(boxes, shown.screen_boxes) <= TOLERANCE_PX, (
            f"{stem}: on screen {shown.screen_boxes}, report {boxes}"
        )
        assert screenshot.stat().st_size > 10_000


def test_ohif_opens_the_report_of_an_image_without_boxes_and_keeps_showing_the_xray(
    orthanc_with_ohif, viewer: OhifViewer, rsna_sample_dir: Path, tmp_path: Path
) -> None:
    """A negative's report (a Chest CAD SR without findings) is listed, and opening it leaves the X-ray on screen, without an error.

    (A TID 1500 report without measurement groups would blank the viewport: OHIF 3.13.2's SR
    viewport reads the first one. The Chest CAD SR is not one OHIF draws, so it passes it over.)
    """
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    source = store_with_report(orthanc_with_ohif, rsna_sample_dir / f"{NEGATIVE}.dcm", [], 0.12)
    viewer.open_study(orthanc_with_ohif.url, source.StudyInstanceUID)
    selector = f"[data-cy=study-browser-thumbnail-no-image][data-series='{REPORT_SERIES_NUMBER}']"
    listed = WebDriverWait(viewer.driver, 10).until(lambda driver: driver.find_elements(By.CSS_SELECTOR, selector))
    assert len(listed) == 1, "the report should be listed once in the study browser"
    ActionChains(viewer.driver).double_click(listed[0]).perform()
    time.sleep(3)  # what OHIF does with the double-click happens asynchronously; an error would be logged by then
    viewer.driver.save_screenshot(str(screenshot_folder(tmp_path) / "ohif_no_boxes.png"))
    assert viewer.driver.execute_script(IMAGE_SHOWN_JS), "the X-ray should stay on screen"
    assert all(viewport["modality"] != "SR" for viewport in viewer.driver.execute_script(VIEWPORTS_JS))
    errors = console_errors(viewer.console())
    assert not errors, [entry["message"][:500] for entry in errors]


def write_build(folder: Path, *, public_path: str = '__webpack_require__.p = "/";') -> Path:
    """A miniature of the npm build's dist/: the files and the absolute URLs that prepare_ohif re-roots."""
    folder.mkdir(parents=True)
    (folder / "index.html").write_text(
        '<html><head><script>window.PUBLIC_URL="/"</script><link rel="manifest" href="/manifest.json">'
        '<meta name="msapplication-TileImage" content="/assets/tile.png"><script src="/app-config.js"></script>'
        '<script defer src="/app.bundle.abc.js"></script><a href="//example.org/x">x</a></head></html>'
    )
    (folder / "app.bundle.abc.js").write_text(f"(() => {{ {public_path} }})();\n")
    (folder / "worker.bundle.def.js").write_text('__webpack_require__.p = "/";\n')
    (folder / "app.bundle.css").write_text("@font-face{src:url(/font.woff2)}")
    (folder / "manifest.json").write_text('{"icons": [{"src": "/assets/icon.png"}], "start_url": "./index.html"}')
    (folder / "app-config.js").write_text("window.config = {routerBasename: null};\n")
    return folder


def test_prepare_ohif_reroots_the_build_once_and_leaves_the_source_alone(tmp_path: Path) -> None:
    source = write_build(tmp_path / "package" / "dist")
    before = {path.name: path.read_text() for path in source.iterdir()}

    served = prepare_ohif(tmp_path / "package", tmp_path / "cache")

    index = (served / "index.html").read_text()
    assert 'window.PUBLIC_URL="/ohif/"' in index
    assert (
        'href="/ohif/manifest.json"' in index
        and 'content="/ohif/assets/tile.png"' in index
        and 'src="/ohif/app.bundle.abc.js"' in index
    )
    assert 'href="//example.org/x"' in index  # a protocol-relative URL is not the build's own
    assert (served / "viewer").read_text() == index
    assert '__webpack_require__.p = "/ohif/";' in (served / "app.bundle.abc.js").read_text()
    assert (served / "worker.bundle.def.js").read_text() == '__webpack_require__.p = "/ohif/";\n'
    assert (served / "app.bundle.css").read_text() == "@font-face{src:url(/ohif/font.woff2)}"
    assert '"src": "/ohif/assets/icon.png"' in (served / "manifest.json").read_text()
    config = (served / "app-config.js").read_text()
    assert (
        "routerBasename: '/ohif'" in config
        and "window.location.origin + '/dicom-web'" in config
        and "option: 'never'" in config
    )
    # The copy is made of hard links where it can: a rewritten file must not write through to the source.
    assert {path.name: path.read_text() for path in source.iterdir()} == before

    stamp = (served / "viewer").stat().st_mtime_ns
    assert prepare_ohif(tmp_path / "package", tmp_path / "cache") == served
    assert (served / "viewer").stat().st_mtime_ns == stamp, "a prepared build is reused, not made again"
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [served.name], "no half-made build is left behind"


def test_prepare_ohif_rejects_a_build_it_cannot_reroot(tmp_path: Path) -> None:
    write_build(tmp_path / "dist", public_path='__webpack_require__.p = "auto";')
    with pytest.raises(
        ValueError, match=r"no app\.bundle\.\*\.js .* sets __webpack_require__\.p = \"/\";.*another version"
    ):
        prepare_ohif(tmp_path / "dist", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="holds no OHIF build"):
        prepare_ohif(tmp_path / "cache", tmp_path / "cache2")


def test_orthanc_refuses_to_serve_a_folder_whose_path_has_a_dot(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"serve /ohif from .*a\.b, whose path has a dot.*folder without dots"):
        Orthanc(
            "Orthanc", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so", tmp_path, serve={"/ohif": tmp_path / "a.b"}
        )
