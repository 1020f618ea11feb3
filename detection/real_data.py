"""The 1,000 real RSNA radiographs of ``../shared/data/rsna_real``: their held-out split, converted, and naive references.

``benchmarks/real_data.py`` (five folds and the winners' path) and ``lungdet demo --real`` (one
model) both start here:

- :func:`load_split`: 800 patients for cross-validation and 200 held out, seeded and stratified
  by target (:func:`lungdet.data_tools.holdout.holdout_split`), checked against the copy written down
  once in ``benchmarks/rsna_real_split.csv``, so the held-out patients can never drift;
- :func:`prepare`: each side linked into its own folder and converted with ``lungdet convert
  --image-dir`` (the cross-validation side with its folds), plus the held-out labels alone;
- :func:`lung_prior_boxes` / :func:`prior_predictions`: the naive references, the median left
  and right lung box of the cross-validation side, predicted on every image or on the
  positives only (a perfect image classifier).

Nothing is ever tuned on the held-out side: it is predicted and scored, once per run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungdet.atomic import write_text_atomic
from lungdet.data_tools.conversion_report import ConversionReport
from lungdet.data_tools.holdout import holdout_split, link_images, read_split_csv
from lungdet.data_tools.image_io import find_images
from lungdet.data_tools.labels import PatientLabels, format_labels_csv, read_labels
from lungdet.data_tools.metadata import ImageTags, MetadataTable, read_metadata_csv
from lungdet.data_tools.to_coco import ConvertOptions, convert_dataset
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction

# The held-out split as first written, kept in the repository to guard it: from a checkout's root
# load_split checks the seeded split against it; elsewhere (a wheel) the seeded split stands alone.
SPLIT_FILE = Path("benchmarks") / "rsna_real_split.csv"
SPLIT_SEED = 2026
HOLDOUT_FRACTION = 0.2
# The labels' pixel space: the JPEGs are the challenge's 1024 x 1024 images.
IMAGE_SIDE = 1024


def shared_data_dir() -> Path:
    """The example data's folder: ``$LUNGDET_SHARED_DATA``, else ``../shared/data`` from the current folder.

    The data sits beside a clone, so from the clone's root (where the README's commands run) the
    default finds it; never found through this file's location, which is site-packages in a wheel.
    """
    return Path(os.environ.get("LUNGDET_SHARED_DATA") or Path("..") / "shared" / "data")


def real_data_dir() -> Path:
    """The 1,000 real RSNA radiographs: ``rsna_real/`` in :func:`shared_data_dir`."""
    return shared_data_dir() / "rsna_real"


@dataclass(frozen=True)
class RealSet:
    """The files of a real RSNA folder laid out as ``rsna_real/`` is: images/, labels.csv, class_info.csv, metadata.csv."""

    root: Path

    @property
    def images_dir(self) -> Path:
        """``images/``: one ``{patientId}.jpg`` per patient, 1024 x 1024 pixels."""
        return self.root / "images"

    @property
    def labels_csv(self) -> Path:
        """``labels.csv``: RSNA's ``patientId,x,y,width,height,Target``, one row per box.

        Boxes are XYWH_ABS in the images' 1024 x 1024 pixels; a patient without any has one row with empty box fields.
        """
        return self.root / "labels.csv"

    @property
    def class_info_csv(self) -> Path:
        """``class_info.csv``: ``patientId,class``, one of RSNA's three classes per patient."""
        return self.root / "class_info.csv"

    @property
    def metadata_csv(self) -> Path:
        """``metadata.csv``: ``patientId`` and DICOM tags (``PatientAge``, ``PatientSex``, ``ViewPosition``, ...)."""
        return self.root / "metadata.csv"

    def check(self) -> None:
        """Raise LungdetError naming what is missing."""
        missing = [
            path
            for path in (self.images_dir, self.labels_csv, self.class_info_csv, self.metadata_csv)
            if not path.exists()
        ]
        if missing:
            raise LungdetError(
                f"{self.root}: missing {', '.join(path.name for path in missing)}; point at the rsna_real folder "
                "(../shared/data/rsna_real: images/, labels.csv, class_info.csv, metadata.csv)"
            )


def load_split(real: RealSet, *, split_file: Path = SPLIT_FILE) -> dict[str, str]:
    """``{patientId: 'cv' | 'holdout'}`` for every labelled patient: the seeded split.

    When ``split_file`` is about the same patients (the rsna_real set it was written from), the
    seeded split must equal it: the held-out patients can then never drift with the code. For
    another folder of images the file does not apply and the seeded split stands alone.
    """
    split = holdout_split(read_labels(real.labels_csv), holdout_fraction=HOLDOUT_FRACTION, seed=SPLIT_SEED)
    if Path(split_file).is_file():
        written = read_split_csv(split_file)
        if set(written) == set(split) and written != split:
            raise LungdetError(
                f"{split_file}: the written split of these patients differs from the seeded one; the held-out patients must not change. "
                "Restore the file, or the code that seeds it (data_tools/holdout.py)"
            )
    return split


@dataclass(frozen=True)
class PreparedRealData:
    """What :func:`prepare` wrote under its work folder."""

    cv_data: Path  # lungdet convert output of the cross-validation side (with its folds)
    holdout_data: (
        Path  # lungdet convert output of the held-out side (its image records carry age, sex, view for the slices)
    )
    holdout_images: Path  # links to the held-out JPEGs, for lungdet predict --image-dir
    holdout_labels_csv: Path  # the held-out patients' labels alone
    cv_report: ConversionReport
    holdout_patients: list[str]
    holdout_tags: dict[
        str, ImageTags
    ]  # the held-out patients' view, sex and age (metadata.csv), which predict gives an image head with metadata


def prepare(
    real: RealSet,
    work: Path,
    *,
    image_size: int | None,
    normalization: str = "none",
    folds: int = 5,
    progress: bool = True,
) -> PreparedRealData:
    """Link each side of the split into ``work`` and convert it (atomically, resumably: a rerun converts nothing again)."""
    real.check()
    work = Path(work)
    split = load_split(real)
    labels = read_labels(real.labels_csv, real.class_info_csv)
    metadata = read_metadata_csv(real.metadata_csv)
    images = find_images(real.images_dir)
    # The held-out side is converted at its own size, only for its records' age, sex and view (the
    # score's slices): predict reads its JPEGs as they are, and prepares them as each model needs.
    outputs = {"cv": work / f"cv_{image_size or 'full'}_{normalization}", "holdout": work / "holdout_records"}
    settings = {"cv": (image_size, normalization), "holdout": (None, "none")}
    reports = {}
    for side in ("cv", "holdout"):
        patients = {patient for patient, value in split.items() if value == side}
        link_images(images, patients, work / f"images_{side}")
        side_metadata = MetadataTable(
            path=metadata.path,
            tags={patient: tags for patient, tags in metadata.tags.items() if patient in patients},
            columns=metadata.columns,
        )
        size, method = settings[side]
        reports[side] = convert_dataset(
            work / f"images_{side}",
            {patient: labels[patient] for patient in sorted(patients)},
            outputs[side],
            ConvertOptions(image_size=size, normalization=method, folds=folds),
            source="picture",
            metadata=side_metadata,
            progress=progress,
        )
    holdout_patients = sorted(patient for patient, value in split.items() if value == "holdout")
    holdout_labels_csv = work / "holdout_labels.csv"
    write_text_atomic(
        holdout_labels_csv, format_labels_csv({patient: labels[patient].boxes for patient in holdout_patients})
    )
    return PreparedRealData(
        cv_data=outputs["cv"],
        holdout_data=outputs["holdout"],
        holdout_images=work / "images_holdout",
        holdout_labels_csv=holdout_labels_csv,
        cv_report=reports["cv"],
        holdout_patients=holdout_patients,
        holdout_tags={patient: metadata.tags[patient] for patient in holdout_patients if patient in metadata.tags},
    )


def lung_prior_boxes(labels: Mapping[str, PatientLabels], *, image_width: float = IMAGE_SIDE) -> np.ndarray:
    """``[2, 4]`` XYWH_ABS: the median box of those whose centre lies left of the image's middle, then of the right ones.

    The naive 'every image has an opacity in each lung, where they usually are' prediction;
    computed from the labels given (the cross-validation side, never the held-out one).
    """
    boxes = np.concatenate([patient.boxes for patient in labels.values() if len(patient.boxes)] or [np.zeros((0, 4))])
    if len(boxes) == 0:
        raise LungdetError("no boxes in these labels to take a median from")
    centres = boxes[:, 0] + boxes[:, 2] / 2
    sides = [boxes[centres < image_width / 2], boxes[centres >= image_width / 2]]
    if any(len(side) == 0 for side in sides):
        raise LungdetError("the labels have boxes on one side of the images only; no left and right median to take")
    return np.stack([np.median(side, axis=0) for side in sides])


def prior_predictions(
    patients: Iterable[str], prior: np.ndarray, *, only: set[str] | None = None
) -> dict[str, Prediction]:
    """``prior``'s boxes at confidence 1 on each patient (on those in ``only`` when given; none elsewhere)."""
    return {
        patient: Prediction.from_arrays(np.ones(len(prior)), prior)
        if only is None or patient in only
        else Prediction.empty()
        for patient in patients
    }
