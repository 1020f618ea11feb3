"""``lungdet serve``: a web page and a JSON API for one chest X-ray at a time (FastAPI + uvicorn; ``pip install 'lungdet[serve]'``)."""

from lungdet import refuse_folder_name

refuse_folder_name(__name__)
