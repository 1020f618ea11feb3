"""Detection models, training, cross-validation, prediction and export for lungdet (the layer that needs torch)."""

import os

from lungdet import refuse_folder_name

refuse_folder_name(__name__)

# albumentations asks PyPI for its latest version when it is imported, unless told not to; lungdet
# reaches nothing on the internet at run time (and a machine without a network waited on the lookup).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
