-- Run once, when the postgres volume is first initialised: MLflow's and the sweeps' databases beside Prefect's.
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
