"""A dedicated image classifier against the detector's own head, on the real cross-validation (a benchmark, not a test).

For each fold asked, :func:`lungdet.detection.classifier.train_classifier` trains the classifier on
the other folds of the 800 cross-validation patients of ``../shared/data/rsna_real`` (the split of
``benchmarks/real_data.py``; the 200 held out are never read) and predicts its own fold. Beside
the detector's out-of-fold predictions (``--detector-oof``: a ``lungdet cv`` oof.csv of the same
folds), it reports on those patients:

- the image-level AUC of the head, of the classifier, and of their mean logit;
- the honest tuned mAP (``lungdet tune``, each fold scored with settings tuned on the others) with
  the head's probability as the gate, and with the classifier's and the mean's in its place;
- the classifier's minutes of CPU per fold.

Run: ``.venv/bin/python benchmarks/image_classifier.py --work runs/real --detector-oof runs/real/cv/oof.csv --folds 0,1 [--architecture resnet18 --image-size 384]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from lungdet.data_tools.labels import read_labels
from lungdet.detection.classifier import CLASSIFIERS, ClassifierSettings, train_classifier
from lungdet.detection.cv import OOF_LABELS_FILE, parse_folds
from lungdet.detection.real_data import RealSet, prepare, real_data_dir
from lungdet.detection.runtime import resolve_precision
from lungdet.submission.platt import logit, sigmoid
from lungdet.submission.raw_predictions import read_raw_predictions
from lungdet.submission.score import roc_auc
from lungdet.submission.tune import tune_postprocess


def with_probabilities(rows: list, probabilities: dict[str, float]) -> list:
    """The raw rows with each image's probability replaced (every pass of an image gets the same one)."""
    return [dataclasses.replace(row, probability=probabilities[row.patient_id]) for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        required=True,
        help="the real-data work folder (the classifier's data is converted into it once)",
    )
    parser.add_argument(
        "--detector-oof", type=Path, required=True, help="oof.csv of lungdet cv on the same 800 patients and folds"
    )
    parser.add_argument("--real-dir", type=Path, default=real_data_dir())
    parser.add_argument("--folds", type=parse_folds, default=[0, 1])
    parser.add_argument("--architecture", choices=sorted(CLASSIFIERS), default="resnet18")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-metadata", action="store_true")
    parser.add_argument("--no-class-info", action="store_true")
    args = parser.parse_args()
    settings = ClassifierSettings(
        architecture=args.architecture,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        metadata=not args.no_metadata,
        class_info=not args.no_class_info,
    )
    # Full-size copies: the classifier reads them at its own input size.
    prepared = prepare(RealSet(args.real_dir), args.work, image_size=None, progress=False)
    precision = resolve_precision("auto", torch.device("cpu"))
    rows = [row for row in read_raw_predictions(args.detector_oof) if row.fold in args.folds]
    truth = {
        patient: labels.boxes for patient, labels in read_labels(args.detector_oof.parent / OOF_LABELS_FILE).items()
    }
    results, classifier_probability = {}, {}
    for fold in args.folds:
        result = train_classifier(settings, prepared.cv_data, fold=fold, precision=precision)
        classifier_probability.update(result["probabilities"])
        results[fold] = {key: result[key] for key in ("auc", "epoch", "minutes", "history")}
    head = {}
    for row in rows:
        if row.pass_name == "plain" and row.probability is not None:
            head[row.patient_id] = row.probability
    patients = sorted(set(head) & set(classifier_probability))
    mean = {
        patient: float(sigmoid((logit(head[patient]) + logit(classifier_probability[patient])) / 2))
        for patient in patients
    }
    labels = [len(truth[patient]) > 0 for patient in patients]
    kept = [row for row in rows if row.patient_id in set(patients)]
    report = {"settings": dataclasses.asdict(settings), "folds": results, "patients": len(patients)}
    for name, probability in (("head", head), ("classifier", classifier_probability), ("mean logit", mean)):
        tuned = tune_postprocess(with_probabilities(kept, probability), truth, bootstrap_draws=1000)
        report[name] = {
            "auc": roc_auc(labels, [probability[patient] for patient in patients]),
            "tuned_honest": tuned.honest,
            "interval": tuned.honest_interval,
        }
        print(
            f"{name:<12} AUC {report[name]['auc']:.3f}   tuned honest mAP {tuned.honest:.4f} [{tuned.honest_interval[0]:.4f}, {tuned.honest_interval[1]:.4f}]"
        )
    minutes = np.mean([result["minutes"] for result in results.values()])
    print(
        f"classifier {args.architecture} at {args.image_size}px: {minutes:.1f} min per fold on this CPU; {len(patients)} out-of-fold patients"
    )
    out = args.work / f"classifier_{args.architecture}_{args.image_size}.json"
    out.write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
