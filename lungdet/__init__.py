"""lungdet: lung opacities as bounding boxes in RSNA chest X-rays (a research tool, not a diagnostic device).

The one import name lungdet installs. Its stages live in the repository's top-level folders and are
mapped under it by ``pyproject.toml`` (``package-dir``): ``data_tools/`` is ``lungdet.data_tools``,
``detection/`` is ``lungdet.detection``, ``submission/`` is ``lungdet.submission``, ``server/`` is
``lungdet.server`` and ``pacs/`` is ``lungdet.pacs``.
"""
