"""``lungdet``: one command, one subcommand per pipeline stage.

Each stage lives in its own module with ``get_args_parser()`` and ``main(args)``; this file only
dispatches, imports the chosen module lazily (so ``lungdet score`` does not pay for importing
torch) and turns domain errors into a one-line message and exit status 2.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from lungdet.errors import LungdetError

# subcommand -> (module, one-line summary)
SUBCOMMANDS = {
    "demo": ("lungdet.detection.demo", "run the whole pipeline on synthetic + sample data on CPU (a few minutes)"),
    "synth": ("lungdet.data_tools.synth", "write synthetic RSNA-shaped DICOMs and a labels CSV"),
    "eda": ("lungdet.show.eda", "one HTML page of figures about the labels and DICOM tags, to read before training"),
    "convert": ("lungdet.data_tools.to_coco", "DICOMs + RSNA labels -> COCO dataset with PNGs and patient-level folds"),
    "pretrain": (
        "lungdet.detection.pretrain",
        "pretrain a detector's backbone on radiographs (NIH labels, or self-supervised) for model.pretrained",
    ),
    "train": ("lungdet.detection.train", "train a torchvision detector on a converted dataset"),
    "cv": (
        "lungdet.detection.cv",
        "train every fold, predict each fold's patients out of fold, summarize (for lungdet tune)",
    ),
    "predict": (
        "lungdet.detection.predict",
        "run a checkpoint (or an export) on DICOMs and write a Kaggle submission.csv",
    ),
    "score": ("lungdet.show.score_cli", "score a submission.csv against RSNA labels with the official metric"),
    "tune": (
        "lungdet.submission.tune",
        "search the post-processing on out-of-fold raw predictions -> postprocess.yaml",
    ),
    "visualize": ("lungdet.show.visualize", "draw truth and predicted boxes over the X-rays as PNGs"),
    "export": (
        "lungdet.detection.export",
        "a checkpoint as one self-describing ONNX or TorchScript file, checked against it",
    ),
    "pacs": (
        "lungdet.pacs.cli",
        "a DICOM node: new X-rays from a DICOMweb server (PACS) in, Structured Reports back into their studies",
    ),
    "serve": (
        "lungdet.server.cli",
        "a web page and a JSON API that find boxes on one uploaded X-ray (DICOM, PNG, JPEG)",
    ),
}


def usage() -> str:
    """The top-level usage text: the command line, each subcommand with its summary, and the research-use notice."""
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items())
    return (
        "usage: lungdet SUBCOMMAND [options]   (lungdet SUBCOMMAND --help for its options)\n\n"
        f"subcommands:\n{rows}\n\n"
        "lungdet is a research tool, not a diagnostic device."
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lungdet`` command: runs the subcommand ``argv`` names; returns the exit status (0: success).

    ``argv`` defaults to ``sys.argv[1:]``. No subcommand or ``-h``/``--help`` prints :func:`usage` (0); an unknown one
    prints the closest name and the usage (2). A :class:`LungdetError` prints one line (2); Ctrl-C gives 130 and a
    closed pipe 141, without a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"lungdet: unknown subcommand '{name}'.{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    # Intermixed, so KEY=VALUE overrides may stand before or after flags (train optim.lr=0.1 --fold 2 seed=3).
    args = module.get_args_parser().parse_intermixed_args(rest)
    try:
        return int(module.main(args) or 0)
    except LungdetError as error:
        print(f"lungdet {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"lungdet {name}: interrupted; finished outputs are complete, nothing half-written was kept",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        # The reader went away (lungdet score | head -1): what it wanted was printed; no traceback.
        # stdout is pointed at /dev/null so that Python's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
