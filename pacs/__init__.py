"""``lungdet pacs``: a DICOM node that takes new X-rays from a DICOMweb server (PACS) and stores reports back.

Needs the ``dicom`` extra (highdicom; dicomweb-client for talking to an archive):
``pip install 'lungdet[dicom]'``. The reports themselves are written by :mod:`lungdet.show.dicom_results`.
"""

from lungdet import refuse_folder_name

refuse_folder_name(__name__)
