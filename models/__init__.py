"""jurassiclass classifier training and cross-validation (no Prefect)."""
