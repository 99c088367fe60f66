"""The registered model behind HTTP on Ray Serve, speaking MLflow's scoring protocol.

`POST /invocations` takes what `mlflow models serve` takes (`inputs`, `instances`, `dataframe_split`,
`dataframe_records`, parsed by MLflow's own parser) and answers `{"predictions": [...]}`, plus
`model_version`: which registered version answered. Concurrent requests are grouped into one
`predict` call (`serve.batch`; generation then sorts the batch by length). The server follows the
alias: when it moves, the new version is loaded beside the old one and swapped in between batches,
so no request fails or is answered by a half-loaded model.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import mlflow
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from ray import serve

log = logging.getLogger(__name__)

app = FastAPI()


@dataclass(frozen=True)
class Served:
    version: str
    model: Any
    """The pyfunc's python model (codetune.serving.CodeModel): family, model, tokenizer, settings."""


def load_alias(name: str, alias: str) -> Served:
    version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
    return Served(version, mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model())


def parse_model_uri(uri: str) -> tuple[str, str]:
    """models:/<name>@<alias> -> (name, alias)."""
    if not uri.startswith("models:/") or "@" not in uri:
        raise ValueError(f"--model must be models:/<name>@<alias> (got '{uri}'): the server follows the alias")
    name, alias = uri.removeprefix("models:/").split("@", 1)
    return name, alias


def as_frame(data: Any) -> pd.DataFrame:
    return data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data) if not isinstance(data, str) else [data])


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error_code": "BAD_REQUEST" if status == 400 else str(status), "message": message}, status)


@serve.deployment
@serve.ingress(app)
class ModelServer:
    def __init__(self, model_uri: str, max_rows: int, max_body_bytes: int, alias_poll_s: float, max_batch_rows: int):
        self.name, self.alias = parse_model_uri(model_uri)
        self.max_rows, self.max_body_bytes = max_rows, max_body_bytes
        self.served = load_alias(self.name, self.alias)
        self.predict_batch.set_max_batch_size(max_batch_rows)
        self.metrics = CollectorRegistry()
        self.latency = Histogram("codetune_request_seconds", "request latency", ["status"], registry=self.metrics)
        self.batch_rows = Histogram(
            "codetune_batch_rows", "rows per predict call", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.metrics
        )
        self.version = Gauge("codetune_serving_version", "the registered version answering", registry=self.metrics)
        self.version.set(float(self.served.version))
        self.follower = asyncio.get_event_loop().create_task(self.follow_alias(alias_poll_s))

    async def follow_alias(self, poll_s: float) -> None:
        """Load the alias's new version beside the serving one, then swap; a failed check keeps serving the old."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                client = mlflow.MlflowClient()
                version = await asyncio.to_thread(client.get_model_version_by_alias, self.name, self.alias)
                if version.version != self.served.version:
                    log.info("%s@%s moved to v%s: loading it", self.name, self.alias, version.version)
                    self.served = await asyncio.to_thread(load_alias, self.name, self.alias)
                    self.version.set(float(self.served.version))
            except Exception as exc:  # the registry may be briefly away; serving goes on
                log.warning(
                    "could not check %s@%s (%s); still serving v%s", self.name, self.alias, exc, self.served.version
                )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def predict_batch(self, frames: list[pd.DataFrame]) -> list[tuple[list, str]]:
        served = self.served  # one version for the whole batch
        joined = pd.concat(frames, ignore_index=True)
        self.batch_rows.observe(len(joined))
        m = served.model
        predictions = await asyncio.to_thread(m.family.predict, m.model, m.tokenizer, joined, m.settings)
        answers, start = [], 0
        for frame in frames:
            answers.append((list(predictions[start : start + len(frame)]), served.version))
            start += len(frame)
        return answers

    @app.post("/invocations")
    async def invocations(self, request: Request) -> Response:
        started = time.perf_counter()
        response = await self._invoke(request)
        self.latency.labels(str(response.status_code)).observe(time.perf_counter() - started)
        return response

    async def _invoke(self, request: Request) -> Response:
        from mlflow.pyfunc.scoring_server import infer_and_parse_data

        body = await request.body()
        if len(body) > self.max_body_bytes:
            return _error(413, f"request body over {self.max_body_bytes} bytes: send fewer rows per request")
        try:
            frame = as_frame(infer_and_parse_data(json.loads(body)))
        except Exception as exc:  # what the client sent, never the server's state
            return _error(400, f"malformed input: {exc}")
        if not 1 <= len(frame) <= self.max_rows:
            return _error(400, f"{len(frame)} rows: send between 1 and {self.max_rows} per request")
        try:
            predictions, version = await self.predict_batch(frame)
        except ValueError as exc:  # the family's own input checks (a code-search model needs query and code)
            return _error(400, str(exc))
        return JSONResponse({"predictions": predictions, "model_version": version})

    @app.get("/ping")
    @app.get("/health")
    async def health(self) -> Response:
        return Response("\n", media_type="application/json")

    @app.get("/version")
    async def version_info(self) -> dict:
        return {"mlflow": mlflow.__version__, "model": f"models:/{self.name}/{self.served.version}"}

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics), media_type=CONTENT_TYPE_LATEST)


def run_server(
    model_uri: str,
    host: str,
    port: int,
    max_rows: int = 256,
    max_body_bytes: int = 4 << 20,
    alias_poll_s: float = 5.0,
    max_batch_rows: int = 32,
    max_queued_requests: int = 512,
    request_timeout_s: float = 120.0,
) -> None:
    """Start Ray (local) and Serve, deploy the model, and serve until interrupted."""
    import ray

    parse_model_uri(model_uri)
    # The replicas are other processes: they find the registry through the environment.
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}})
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    deployment = ModelServer.options(max_ongoing_requests=max_batch_rows * 2, max_queued_requests=max_queued_requests)
    serve.run(
        deployment.bind(model_uri, max_rows, max_body_bytes, alias_poll_s, max_batch_rows),
        name="codetune",
        route_prefix="/",
        blocking=True,
    )
