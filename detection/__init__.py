"""Detection models, training and prediction for lungdet."""
