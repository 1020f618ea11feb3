"""Detection models, training, cross-validation, prediction and export for lungdet (the layer that needs torch)."""
