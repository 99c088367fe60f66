"""Prefect tasks: thin wrappers that add retries, artifacts and run logging to the codetune core stages."""
