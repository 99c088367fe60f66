"""The data stage: sources of examples (code with a summary, a label, or whole files) and their deterministic
splits."""

from codetune.core.data.prepare import Examples, PreparedData, prepare_data

__all__ = ["Examples", "PreparedData", "prepare_data"]
