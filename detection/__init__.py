"""Detection models, training, cross-validation, prediction and export for lungdet (the layer that needs torch)."""

from lungdet import refuse_folder_name

refuse_folder_name(__name__)
