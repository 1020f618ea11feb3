"""lungdet: lung opacities as bounding boxes in RSNA chest X-rays (a research tool, not a diagnostic device).

The one import name lungdet installs. Its stages live in the repository's top-level folders, and
``lungdet/<stage>`` are symbolic links to them (so that tools reading the checkout follow every
import), in layers that import only downward:

- ``lungdet/`` (this package): the shared base (``errors``, ``boxes``, ``atomic``, ``typed_config``,
  ``cli_types``) and, on top of everything, the command (``cli``, ``__main__``);
- ``data_tools/`` is ``lungdet.data_tools``: read and convert;
- ``submission/`` is ``lungdet.submission``: the submission format, post-processing, tuning, the metric;
- ``show/`` is ``lungdet.show``: pictures and reports;
- ``detection/`` is ``lungdet.detection``: models, training, cv, prediction, export;
- ``server/`` and ``pacs/`` are ``lungdet.server`` and ``lungdet.pacs``: the deployments.

``tests/test_layers.py`` holds the order.
"""

from importlib.metadata import PackageNotFoundError, version


def refuse_folder_name(name: str) -> None:
    """Called by each stage's ``__init__`` with its ``__name__``: a stage is ``lungdet.<stage>``, never its folder's name.

    From the repository root ``import detection`` would find the folder itself and load every
    module a second time, with classes that are not the ones ``lungdet.detection`` defines.
    """
    if not name.startswith("lungdet."):
        raise ImportError(f"'{name}' is lungdet's {name}/ folder; import it as lungdet.{name}")


def lungdet_version() -> str:
    """The installed lungdet's version (what exports and replies record), 'unknown' from a checkout that was never installed."""
    try:
        return version("lungdet")
    except PackageNotFoundError:
        return "unknown"
