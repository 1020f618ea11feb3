"""Kaggle submission format and the official RSNA metric."""
