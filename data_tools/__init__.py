"""Read and convert for lungdet: DICOM and image readers, tags, RSNA labels, COCO with folds, the held-out split, synthetic data."""

from lungdet import refuse_folder_name

refuse_folder_name(__name__)
