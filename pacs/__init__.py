"""DICOM out: lungdet's results as DICOM Structured Reports and overlay images, for a PACS.

Needs the ``dicom`` extra (highdicom; dicomweb-client for talking to an archive):
``pip install 'lungdet[dicom]'``.
"""
