"""Data preparation for lungdet: DICOM reading, RSNA labels, COCO conversion, synthetic data, pictures."""
