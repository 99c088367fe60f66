"""The data stage: sources of (code, summary) pairs and their deterministic splits."""

from codetune.data.prepare import PreparedData, prepare_data

__all__ = ["PreparedData", "prepare_data"]
