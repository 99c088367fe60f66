"""The registered model behind HTTP on Ray Serve, speaking MLflow's scoring protocol and the OpenAI API.

`POST /invocations` takes what `mlflow models serve` takes (`inputs`, `instances`, `dataframe_split`,
`dataframe_records`, parsed by MLflow's own parser) and answers `{"predictions": [...]}`, plus
`model_version`: which registered version answered. Concurrent requests are grouped into one
`predict` call (`serve.batch`; generation then sorts the batch by length). The server follows the
alias: when it moves, the new version is loaded beside the old one and swapped in between batches,
so no request fails or is answered by a half-loaded model.

The OpenAI routes (`/v1/models`, `/v1/completions` with `suffix` for a fill-in-the-middle model,
`/v1/chat/completions` through the tokenizer's chat template) are what editors and chat clients send;
their requests are batched the same way, grouped by sampling settings (docs/serving.md).
"""

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from ray import serve

from codetune.core.errors import without_credentials
from codetune.core.families import FAMILIES, FAMILY_KEY
from codetune.core.families.base import Completion, input_texts
from server.openai_api import CompletionJob, OpenAIError, chat_job, completion_job, events, response_body

log = logging.getLogger(__name__)

app = FastAPI()


# Families whose predict answers each row on its own, so several requests may share one call. Read from this
# codetune: a registered model runs the codetune bundled with it, which may be older (MLflow models from code).
JOINABLE_FAMILIES = {task for task, family in FAMILIES.items() if family.rows_independent}


@dataclass(frozen=True)
class Served:
    version: str
    model: mlflow.pyfunc.PyFuncModel
    joins_requests: bool
    """Whether requests may be joined into one predict call: the family stamped in the model's config says."""


def load_alias(name: str, alias: str) -> Served:
    version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    config = getattr(getattr(model.unwrap_python_model(), "model", None), "config", None)
    return Served(version, model, getattr(config, FAMILY_KEY, None) in JOINABLE_FAMILIES)


def parse_model_uri(uri: str) -> tuple[str, str]:
    """models:/<name>@<alias> -> (name, alias)."""
    if not uri.startswith("models:/") or "@" not in uri:
        raise ValueError(f"--model must be models:/<name>@<alias> (got '{uri}'): the server follows the alias")
    name, alias = uri.removeprefix("models:/").split("@", 1)
    return name, alias


def as_frame(data: Any) -> pd.DataFrame:
    return data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data) if not isinstance(data, str) else [data])


def log_inputs(directory: Path, texts: list[str], version: str) -> None:
    """Append what was served to <directory>/<UTC date>.jsonl, one input per line: `codetune monitor`'s third source
    (monitor.served_inputs). A line is written whole in one call, so concurrent appends do not interleave."""
    now = datetime.now(timezone.utc)
    lines = "".join(json.dumps({"time": now.isoformat(), "model_version": version, "input": t}) + "\n" for t in texts)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{now:%Y-%m-%d}.jsonl", "a", encoding="utf-8") as f:
        f.write(lines)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error_code": "BAD_REQUEST" if status == 400 else str(status), "message": message}, status)


@dataclass(frozen=True)
class Limits:
    """What one request may ask, and how much waits: beyond these the server answers 400, 413 or 503."""

    rows: int = 256
    """Inputs per request."""
    input_chars: int = 100_000
    body_bytes: int = 8 << 20
    batch_requests: int = 32
    """Requests joined into one predict call."""
    batch_wait_s: float = 0.1
    """How long the first request of a batch waits for others. Answers come back together, and their clients'
    next requests arrive staggered: too short a wait splits the batches into fragments (docs/serving.md)."""
    queued_requests: int = 512
    """Requests waiting beyond the ones in flight; more get 503 with Retry-After."""
    request_timeout_s: float = 120.0


@serve.deployment
@serve.ingress(app)
class ModelServer:
    def __init__(self, model_uri: str, limits: Limits, alias_poll_s: float, inputs_log: str | None = None):
        self.name, self.alias = parse_model_uri(model_uri)
        self.limits = limits
        self.inputs_log = Path(inputs_log) if inputs_log else None
        self.served = load_alias(self.name, self.alias)
        for batched in (self.predict_batch, self.generate_batch):
            batched.set_max_batch_size(limits.batch_requests)
            batched.set_batch_wait_timeout_s(limits.batch_wait_s)
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

    @serve.batch
    async def predict_batch(self, frames: list[pd.DataFrame]) -> list[tuple[list | ValueError, str]]:
        """One predict call for the batch where the family allows it (else one per request); a request whose input
        the model refuses gets its ValueError, the others their answers."""
        served = self.served  # one version for the whole batch

        def predict(frame: pd.DataFrame) -> list | ValueError:
            try:
                return list(served.model.predict(frame))
            except ValueError as exc:
                return exc

        if served.joins_requests:
            joined = pd.concat(frames, ignore_index=True)
            self.batch_rows.observe(len(joined))
            predictions = await asyncio.to_thread(predict, joined)
            if not isinstance(predictions, ValueError):
                bounds = np.cumsum([0] + [len(frame) for frame in frames])
                return [(predictions[a:b], served.version) for a, b in zip(bounds[:-1], bounds[1:])]
        answers = []
        for frame in frames:
            self.batch_rows.observe(len(frame))
            answers.append((await asyncio.to_thread(predict, frame), served.version))
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
        if len(body) > self.limits.body_bytes:
            return _error(413, f"request body over {self.limits.body_bytes} bytes: send fewer rows per request")
        try:
            frame = as_frame(infer_and_parse_data(json.loads(body)))
        except Exception as exc:  # what the client sent, never the server's state
            return _error(400, f"malformed input: {exc}")
        if not 1 <= len(frame) <= self.limits.rows:
            return _error(400, f"{len(frame)} rows: send between 1 and {self.limits.rows} per request")
        longest = max((len(v) for v in frame.to_numpy().ravel() if isinstance(v, str)), default=0)
        if longest > self.limits.input_chars:
            return _error(400, f"an input of {longest} characters: at most {self.limits.input_chars} per input")
        predictions, version = await self.predict_batch(frame)
        if isinstance(predictions, ValueError):  # the family's own check: a code-search model needs query and code
            return _error(400, str(predictions))
        if self.inputs_log:
            log_inputs(self.inputs_log, input_texts(frame), version)
        return JSONResponse({"predictions": predictions, "model_version": version})

    @serve.batch
    async def generate_batch(self, jobs: list[CompletionJob]) -> list[tuple[list[list[Completion]] | ValueError, str]]:
        """The OpenAI routes' generation: one call per group of jobs that sample alike, all on one version."""
        served = self.served
        model = served.model.unwrap_python_model()
        answers: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.route, job.sampling), []).append(i)
        for (route, sampling), members in groups.items():
            prompts = [p for i in members for p in jobs[i].prompts]
            try:
                done = await asyncio.to_thread(model.generate, route, prompts, sampling)
            except ValueError as exc:
                for i in members:
                    answers[i] = exc
                continue
            self.batch_rows.observe(len(prompts))
            start = 0
            for i in members:
                answers[i] = done[start : start + len(jobs[i].prompts)]
                start += len(jobs[i].prompts)
        return [(answer, served.version) for answer in answers]

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "codetune", "created": 0}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._openai(request, completion_job)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, chat_job)

    async def _openai(self, request: Request, parse) -> Response:
        started = time.perf_counter()
        try:
            body = await request.body()
            if len(body) > self.limits.body_bytes:
                raise OpenAIError(413, f"request body over {self.limits.body_bytes} bytes", "body")
            job = parse(body, self.name, self.limits)
            answer, version = await self.generate_batch(job)
            if isinstance(answer, ValueError):
                raise OpenAIError(400, str(answer), None)
        except OpenAIError as exc:
            response = JSONResponse(exc.body(), exc.status)
        else:
            if self.inputs_log and job.route == "completions":
                log_inputs(self.inputs_log, [prefix + suffix for prefix, suffix in job.prompts], version)
            body = response_body(job, answer, self.name, version)
            response = (
                StreamingResponse(events(job, body), media_type="text/event-stream")
                if job.stream
                else JSONResponse(body)
            )
        self.latency.labels(str(response.status_code)).observe(time.perf_counter() - started)
        return response

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
    model_uri: str, host: str, port: int, limits: Limits, alias_poll_s: float = 5.0, inputs_log: str | None = None
) -> None:
    """Start Ray (local) and Serve, deploy the model, and serve until interrupted."""
    import ray
    from ray.serve.config import BackpressureConfig

    name, alias = parse_model_uri(model_uri)
    try:
        mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(
            f"{model_uri} does not resolve in the registry at {without_credentials(mlflow.get_tracking_uri())} "
            f"({exc.message}): set MLFLOW_TRACKING_URI, or register a model first (`codetune run`)"
        ) from None
    # The replicas are other processes: they find the registry through the environment.
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}})
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": limits.request_timeout_s})
    deployment = ModelServer.options(
        # Ray gives an actor one thread for torch unless it asks for more; the one replica gets every core.
        ray_actor_options={"num_cpus": os.cpu_count()},
        max_ongoing_requests=limits.batch_requests * 2,  # one batch running, the next one filling
        max_queued_requests=limits.queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
    )
    serve.run(
        deployment.bind(model_uri, limits, alias_poll_s, inputs_log), name="codetune", route_prefix="/", blocking=True
    )
