"""The lifecycle services: tracking, the registry, publishing, monitoring and sweeps, built on the core with MLflow,
Optuna, boto3 and huggingface_hub. Prefect's tasks and flows wrap them; they import nothing of tasks/ or flows/."""
