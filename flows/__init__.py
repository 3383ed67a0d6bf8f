"""Thin Prefect flows over `curation` and `models`."""
