"""Read and convert for lungdet: DICOM and image readers, tags, RSNA labels, COCO with folds, the held-out split, synthetic data."""
