"""The real OHIF viewer (the ``@ohif/app`` npm build) served by the test Orthanc, driven by headless Chromium.

Not a test file: ``tests/pacs/conftest.py`` and ``tests/pacs/test_ohif.py`` use it.

**The build.** ``npm pack @ohif/app@3.13.2 --pack-destination ~/.cache/lungdet`` writes
``~/.cache/lungdet/ohif-app-3.13.2.tgz`` (about 50 MB; set ``LUNGDET_OHIF_TGZ`` to use another
path). The package's ``dist/`` is a static build rooted at ``/``; :func:`prepare_ohif` copies it
once into a cache folder re-rooted at ``/ohif/`` (Orthanc's ServeFolders plugin serves it there,
beside ``/dicom-web`` on the same origin, so the viewer needs no proxy and no CORS), with an
``app-config.js`` whose one data source is that Orthanc.

**The viewer.** :class:`OhifViewer` opens a study in OHIF, double-clicks the report in the study
browser and reads back what OHIF drew: the ``DICOMSRDisplay`` annotations in cornerstone's state
(converted to the image's pixels) and the polylines in the viewport's SVG layer (converted from
screen to image pixels through the viewport's camera), plus the browser console.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tests.conftest
from tests.conftest import skip_or_fail

OHIF_VERSION = "3.13.2"
TARBALL_NAME = f"ohif-app-{OHIF_VERSION}.tgz"
NPM_PACK = f"npm pack @ohif/app@{OHIF_VERSION} --pack-destination ~/.cache/lungdet"
MOUNT = "/ohif"  # where Orthanc serves the viewer; the viewer's own routes (/viewer) sit below it
# Bump when the re-rooting below changes, so that a cached build made by older code is not reused.
RECIPE = 1

# OHIF reads its data source from window.config. The DICOMweb roots are the page's own origin:
# the Orthanc that serves the viewer also answers DICOMweb, whatever port the test gave it.
# A %-template, not str.format: the JavaScript's braces would all need doubling.
APP_CONFIG = """\
// Written by lungdet's tests/pacs/ohif.py: one DICOMweb source, the Orthanc that serves this page.
window.config = {
  routerBasename: '%(mount)s',
  extensions: [],
  modes: [],
  showStudyList: true,
  // cornerstone falls back to CPU rendering without WebGL; its modal would cover the viewport.
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  showWarningMessageForCrossOrigin: false,
  // The research-use dialog would cover the viewport on every first visit.
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'lungdet test Orthanc',
        name: 'orthanc',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
""" % {"mount": MOUNT}  # noqa: UP031


def ohif_tarball() -> Path:
    """The packed ``@ohif/app`` build: ``$LUNGDET_OHIF_TGZ``, else ``~/.cache/lungdet/ohif-app-3.13.2.tgz``.

    Missing, the calling test skips with the ``npm pack`` command that makes it; under CI
    (``CI`` set) it fails, since ``.ci/run`` packs it.
    """
    path = Path(os.environ.get("LUNGDET_OHIF_TGZ") or Path.home() / ".cache" / "lungdet" / TARBALL_NAME).expanduser()
    if not path.exists():
        skip_or_fail(
            f"the OHIF viewer build is not at {path}: {NPM_PACK} (or set LUNGDET_OHIF_TGZ to the .tgz or its extracted dist/)"
        )
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lungdet"


def _source_key(source: Path) -> str:
    # A tarball is named by its content; an extracted dist by its index.html, which names the
    # hashed bundle files and so changes with every build.
    digest = hashlib.sha256(f"recipe {RECIPE}\n{APP_CONFIG}".encode())
    if source.is_dir():
        digest.update(b"dist\n" + (_dist_folder(source) / "index.html").read_bytes())
    else:
        with open(source, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _dist_folder(folder: Path) -> Path:
    """The build inside ``folder``: ``folder`` itself, or the npm package's ``package/dist`` or ``dist``."""
    for candidate in (folder, folder / "dist", folder / "package" / "dist"):
        if (candidate / "index.html").is_file() and (candidate / "app-config.js").is_file():
            return candidate
    raise FileNotFoundError(
        f"{folder} holds no OHIF build (no index.html and app-config.js in it, dist/ or package/dist/); pass the .tgz from {NPM_PACK}, or its extracted dist/"
    )


def _copy_or_link(source: str, target: str) -> None:
    # Hard links make the copy of 200 MB instant; every file this module changes is rewritten
    # through a new file (_rewrite), never in place, so the source build is never changed.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _rewrite(path: Path, change: Callable[[str], str], *, must_change: bool = True) -> None:
    text = path.read_text(encoding="utf-8")
    changed = change(text)
    if must_change and changed == text:
        raise ValueError(
            f"re-rooting OHIF {OHIF_VERSION}: nothing to change in {path.name}; is this build another version than {OHIF_VERSION}?"
        )
    temporary = path.with_name(path.name + ".rerooted")
    temporary.write_text(changed, encoding="utf-8")
    os.replace(temporary, path)


def _reroot(dist: Path) -> None:
    """Move the build from ``/`` to ``MOUNT/``: every absolute URL it holds to its own files."""
    prefix = MOUNT + "/"

    # index.html: the public URL the app builds its own URLs from, and every src/href/content attribute.
    def reroot_page(text: str) -> str:
        text = text.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"')
        return re.sub(r'\b(src|href|content)="/(?!/)', rf'\1="{prefix}', text)  # "//host/..." is not the build's own

    _rewrite(dist / "index.html", reroot_page)
    if f'window.PUBLIC_URL="{prefix}"' not in (dist / "index.html").read_text(encoding="utf-8"):
        raise ValueError(
            f're-rooting OHIF {OHIF_VERSION}: index.html does not set window.PUBLIC_URL="/"; is this build another version?'
        )
    # webpack loads its chunks, workers and wasm from its public path, fixed at build time.
    public_path = '__webpack_require__.p = "/";'
    rerooted = [
        path for path in sorted(dist.glob("*.js")) if public_path in path.read_text(encoding="utf-8", errors="replace")
    ]
    if not any(path.name.startswith("app.bundle.") for path in rerooted):
        raise ValueError(
            f"re-rooting OHIF {OHIF_VERSION}: no app.bundle.*.js in {dist} sets {public_path}; is this build another version?"
        )
    for path in rerooted:
        _rewrite(path, lambda text: text.replace(public_path, f'__webpack_require__.p = "{prefix}";'))
    # Fonts in the style sheets, and the icons in the web manifest.
    for path in sorted(dist.glob("*.css")):
        _rewrite(path, lambda text: re.sub(r"url\(/(?!/)", f"url({prefix}", text), must_change=False)
    _rewrite(dist / "manifest.json", lambda text: text.replace('"/assets/', f'"{prefix}assets/'))
    (dist / "app-config.js").unlink()
    (dist / "app-config.js").write_text(APP_CONFIG, encoding="utf-8")
    # The viewer's route is MOUNT/viewer; ServeFolders serves files only, so the page must exist under that name.
    shutil.copyfile(dist / "index.html", dist / "viewer")


def prepare_ohif(source: Path, cache: Path | None = None) -> Path:
    """The re-rooted build for ``source`` (the ``.tgz`` from ``npm pack``, or its extracted ``dist/``), made once.

    Returns the folder to serve at ``MOUNT``: ``{cache}/ohif-{version}-{key}``, ``key`` naming the
    source and this recipe. ``cache`` defaults to ``$XDG_CACHE_HOME/lungdet`` (``~/.cache/lungdet``).
    A folder already there is reused; a new one is built beside it and renamed into place, so an
    interrupted run or two runs at once never leave a half-made build behind that name.
    """
    source = Path(source).expanduser()
    cache = Path(cache) if cache is not None else _cache_root()
    target = cache / f"ohif-{OHIF_VERSION}-{_source_key(source)}"
    if (target / "viewer").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    building, unpacked = (cache / f"{target.name}.{step}-{os.getpid()}" for step in ("building", "unpacking"))
    try:
        if source.is_dir():
            shutil.copytree(_dist_folder(source), building, copy_function=_copy_or_link)
        else:
            with tarfile.open(source) as archive:
                archive.extractall(unpacked, filter="data")
            os.replace(_dist_folder(unpacked), building)
        _reroot(building)
        try:
            os.replace(building, target)
        except OSError:
            if not (target / "viewer").is_file():  # another run finished first: keep its build
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(unpacked, ignore_errors=True)
    return target


# Beyond the page test's flags (tests/conftest.py): WebGL through SwiftShader, which cornerstone
# renders with; Chromium warns that its automatic fallback to it is deprecated. The content is our own build on loopback.
CHROMIUM_FLAGS = ("--enable-unsafe-swiftshader",)
WINDOW_SIZE = (1400, 1000)
WAIT_S = 60  # for OHIF to show a study or a report (about 3-7 s here on 2 cores)
SETTLE_S = 5  # for the boxes to be drawn once the report is shown (well under 1 s when all goes well)


def start_chromium(profile: Path) -> object:
    """A headless Debian Chromium under selenium, its console kept (``driver.get_log("browser")``).

    Without ``chromium`` and ``chromedriver`` the calling test skips; under CI it fails.
    """
    return tests.conftest.start_chromium(profile, window_size=WINDOW_SIZE, extra_flags=CHROMIUM_FLAGS, console=True)


def console_errors(entries: list[dict]) -> list[dict]:
    """The console entries that are errors: Chromium's SEVERE, and the errors OHIF caught itself.

    OHIF's error boundaries catch what breaks a route or a viewport (even unhandled promise
    rejections, whose default handling they prevent) and log it with ``console.debug`` as
    "<context> Error Boundary", so Chromium never reports them as SEVERE.
    """
    return [entry for entry in entries if entry["level"] == "SEVERE" or "Error Boundary" in entry["message"]]


@dataclass(frozen=True)
class ShownReport:
    """What OHIF drew for one report.

    ``boxes``: one XYWH_ABS box ``[x, y, w, h]`` per ``DICOMSRDisplay`` annotation, in the source
    image's pixels (column, row; the SR's own coordinates), the span of its points, sorted.
    ``screen_boxes``: the same for each polyline in the viewports' SVG layers, what is on screen,
    taken back from screen to image pixels through the viewport's camera.
    ``viewports``: what each viewport shows (display set modality, loaded, number of measurements).
    ``console``: every browser console entry logged from opening the study until now (selenium's
    dicts: level, message, source, timestamp); ``errors`` those of :func:`console_errors`.
    ``rerendered``: the boxes were drawn only once the viewports were rendered again (see
    :meth:`OhifViewer.show_report`).
    """

    boxes: list[list[float]]
    screen_boxes: list[list[float]]
    viewports: list[dict]
    console: list[dict]
    rerendered: bool = False

    @property
    def errors(self) -> list[dict]:
        return console_errors(self.console)


def _span(points: list[list[float]]) -> list[float]:
    xs, ys = [point[0] for point in points], [point[1] for point in points]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


# Is a viewport showing an image? (cornerstone's rendering engines hold OHIF's viewports.)
IMAGE_SHOWN_JS = """
const cs = window.cornerstone;
if (!cs || !cs.getRenderingEngines) return false;
for (const engine of cs.getRenderingEngines() || []) {
  for (const viewport of engine.getViewports()) {
    if (viewport.getCurrentImageId && viewport.getCurrentImageId() && viewport.getImageData && viewport.getImageData()) return true;
  }
}
return false;
"""

# What the viewports show, and whether each display set is loaded (an SR's turns true once its measurements are read).
VIEWPORTS_JS = """
const services = window.services;
if (!services) return [];
const shown = [];
for (const [id, viewport] of services.viewportGridService.getState().viewports) {
  for (const uid of viewport.displaySetInstanceUIDs || []) {
    const displaySet = services.displaySetService.getDisplaySetByUID(uid);
    shown.push({viewport: id, modality: displaySet && displaySet.Modality, loaded: !!(displaySet && displaySet.isLoaded),
                measurements: displaySet && displaySet.measurements ? displaySet.measurements.length : null});
  }
}
return shown;
"""

# The SR's boxes as OHIF holds them (world coordinates) and as drawn (SVG, screen), both taken back to image pixels.
DRAWN_JS = """
const cs = window.cornerstone, tools = window.cornerstoneTools;
const annotations = tools.annotation.state.getAllAnnotations().filter(a => a.metadata && a.metadata.toolName === 'DICOMSRDisplay');
const held = annotations.map(a => {
  const imageId = a.metadata.referencedImageId;
  const points = Object.values(a.data.renderableData || {}).flat(2);
  return points.map(world => Array.from(cs.utilities.worldToImageCoords(imageId, world)));
});
const drawn = [];
for (const line of document.querySelectorAll('svg.svg-layer polyline')) {
  const element = line.closest('[data-viewport-uid]');
  const enabled = element && cs.getEnabledElement(element);
  if (!enabled) continue;
  const viewport = enabled.viewport, imageId = viewport.getCurrentImageId();
  // "x1, y1 x2, y2 ..." (cornerstone writes a space after each comma): pair up the numbers.
  const numbers = (line.getAttribute('points').match(/-?[0-9.]+(?:e[-+]?[0-9]+)?/gi) || []).map(Number);
  const points = [];
  for (let i = 0; i + 1 < numbers.length; i += 2) {
    points.push(Array.from(cs.utilities.worldToImageCoords(imageId, viewport.canvasToWorld([numbers[i], numbers[i + 1]]))));
  }
  drawn.push(points);
}
return {held, drawn};
"""


# Render every viewport and its annotations again (what any interaction with a viewport ends in).
RENDER_JS = """
for (const engine of window.cornerstone.getRenderingEngines() || []) {
  engine.render();
  window.cornerstoneTools.utilities.triggerAnnotationRenderForViewportIds(engine.getViewports().map(viewport => viewport.id));
}
"""


class OhifViewer:
    """OHIF in one headless Chromium, for several studies in turn (starting Chromium and compiling OHIF cost seconds).

    ``OhifViewer(profile)`` starts Chromium (its profile in ``profile``); :meth:`show_report`
    opens one study from one Orthanc and its report; :meth:`close` quits Chromium.
    """

    def __init__(self, profile: Path) -> None:
        self.driver = start_chromium(profile)
        self._console: list[dict] = []

    def close(self) -> None:
        self.driver.quit()

    def console(self) -> list[dict]:
        """Every console entry since the last :meth:`open_study` (selenium hands each entry out once; they are kept here)."""
        self._console += self.driver.get_log("browser")
        return list(self._console)

    def _wait(self, condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> object:
        """``condition()`` once it is true; raises TimeoutError, or RuntimeError as soon as OHIF logs an error."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            errors = console_errors(self.console())
            if errors:
                raise RuntimeError(f"OHIF logged an error before it could {what}: {errors[0]['message'][:2000]}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"OHIF did not {what} within {timeout_s:.0f} s; its console ended with {[entry['message'][:300] for entry in self._console[-5:]]}"
                )
            time.sleep(0.1)

    def open_study(self, orthanc_url: str, study_uid: str) -> None:
        """Open ``study_uid`` in OHIF served by the Orthanc at ``orthanc_url`` and wait until a viewport shows an image."""
        driver = self.driver
        # The guided tour of a first visit would cover the viewport; OHIF keeps the tours already
        # shown in localStorage, which is the origin's, so each new Orthanc (port) needs it once.
        driver.get(f"{orthanc_url}{MOUNT}/app-config.js")
        driver.execute_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));")
        driver.get_log("browser")  # what the last study left
        self._console = []
        driver.get(f"{orthanc_url}{MOUNT}/viewer?StudyInstanceUIDs={study_uid}")
        self._wait(lambda: driver.execute_script(IMAGE_SHOWN_JS), f"show an image of study {study_uid}")

    def open_report(self, series_number: int | None = None) -> None:
        """Double-click the report in the study browser (the one thumbnail without an image, or that of ``series_number``); wait until a viewport shows it."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        selector = "[data-cy=study-browser-thumbnail-no-image]" + (
            f"[data-series='{series_number}']" if series_number is not None else ""
        )
        thumbnails = self._wait(
            lambda: self.driver.find_elements(By.CSS_SELECTOR, selector),
            f"list the report ({selector}) in the study browser",
        )
        if len(thumbnails) != 1:
            raise ValueError(
                f"expected one report thumbnail ({selector}) in OHIF's study browser, found {len(thumbnails)}; pass the report's series number"
            )
        ActionChains(self.driver).double_click(thumbnails[0]).perform()
        self._wait(
            lambda: (
                any(entry["modality"] == "SR" and entry["loaded"] for entry in self.driver.execute_script(VIEWPORTS_JS))
                and self.driver.execute_script(IMAGE_SHOWN_JS)
            ),
            "show the report in a viewport",
        )

    def drawn(self) -> tuple[list[list[float]], list[list[float]]]:
        """``(boxes, screen_boxes)`` as :class:`ShownReport` has them."""
        found = self.driver.execute_script(DRAWN_JS)
        return sorted(_span(points) for points in found["held"] if points), sorted(
            _span(points) for points in found["drawn"] if points
        )

    def show_report(
        self,
        orthanc_url: str,
        study_uid: str,
        *,
        series_number: int | None = None,
        expected_boxes: int | None = None,
        screenshot: Path | None = None,
    ) -> ShownReport:
        """Open the study, then its report, and read back what OHIF drew.

        Waits until the SVG layer holds one polyline per annotation (``expected_boxes`` of each
        when given, for a few seconds: the caller's assertions say what is missing). Raises
        TimeoutError if no image is shown, RuntimeError as soon as OHIF logs an error (either way
        after taking ``screenshot``, a PNG of the window, when given).
        """
        rerendered = False
        try:
            self.open_study(orthanc_url, study_uid)
            self.open_report(series_number)

            def settled() -> tuple | None:
                boxes, screen_boxes = self.drawn()
                wanted = len(boxes) if expected_boxes is None else expected_boxes
                return (boxes, screen_boxes) if len(boxes) == wanted and len(screen_boxes) == wanted else None

            try:
                boxes, screen_boxes = self._wait(settled, "draw the report's boxes", timeout_s=SETTLE_S)
            except TimeoutError:
                # OHIF 3.13.2's SR viewport chooses which annotations it draws (the report's
                # tracking identifiers) without asking for a render: when the image was rendered
                # first, the boxes appear only at the next render, a user's next interaction
                # (seen in 2 of about 25 runs). Render once, as that interaction would, and say so.
                rerendered = True
                self.driver.execute_script(RENDER_JS)
                try:
                    boxes, screen_boxes = self._wait(
                        settled, "draw the report's boxes after a render", timeout_s=SETTLE_S
                    )
                except TimeoutError:
                    boxes, screen_boxes = self.drawn()  # the caller's assertions say what is missing
        finally:
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                self.driver.save_screenshot(str(screenshot))
        return ShownReport(
            boxes=boxes,
            screen_boxes=screen_boxes,
            viewports=self.driver.execute_script(VIEWPORTS_JS),
            console=self.console(),
            rerendered=rerendered,
        )
