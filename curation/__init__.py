"""jurassiclass curation stages: plain functions over a manifest, a workspace and its catalog (no Prefect)."""
