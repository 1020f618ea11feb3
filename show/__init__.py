"""Pictures and reports for lungdet: the EDA page, boxes over the X-rays, the score page, DICOM reports and overlays.

Drawn from boxes and labels, never from a model, so nothing here needs torch; the DICOM reports need
the ``dicom`` extra (highdicom): ``pip install 'lungdet[dicom]'``.
"""

from lungdet import refuse_folder_name

refuse_folder_name(__name__)
