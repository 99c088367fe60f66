"""The lifecycle services: tracking, the registry, publishing and its destinations, monitoring and sweeps, built on
the core with MLflow, Optuna, boto3 and huggingface_hub (credentials from Prefect blocks where a config names one).
Prefect's tasks and flows wrap them; they import nothing of tasks/ or flows/ (tests/unit/test_layers.py)."""
