"""Kaggle submission format and the official RSNA metric."""

from lungdet import refuse_folder_name

refuse_folder_name(__name__)
