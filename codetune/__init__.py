"""codetune: fine-tune, evaluate, track and publish code models. The core imports without Prefect or MLflow."""

__version__ = "0.1.0"
