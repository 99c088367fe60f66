"""`codetune`: run the pipeline, list config keys. Heavy libraries load only inside the command that needs them.

It sits above the flows it starts, so the core never imports the orchestration layer; `codetune
train` uses the core alone and runs where Prefect and MLflow are not installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from codetune.core.errors import CodetuneError, ConfigError
from flows.temporary_server import prepare_temporary_server


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: the embedded offline default)")
    parser.add_argument(
        "--overrides", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. training.num_train_epochs=3"
    )
    parser.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help="more overrides, without --overrides")


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="codetune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"codetune {version('codetune')}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_config_args(commands.add_parser("run", help="the Prefect flow: data, training, evaluation, MLflow tracking"))
    _add_config_args(
        commands.add_parser(
            "train", help="data, training and evaluation only: no Prefect, no MLflow (for bare GPU boxes)"
        )
    )
    deploy = commands.add_parser("deploy", help="register and publish an already trained run directory")
    deploy.add_argument("--model-path", required=True, help="run directory, e.g. runs/<run name>")
    _add_config_args(deploy)
    pools = commands.add_parser(
        "deploy-flows", help="create the work pools and deploy everything in prefect.yaml (idempotent)"
    )
    pools.add_argument(
        "--gpu-pool-type", choices=["docker", "kubernetes"], default="docker", help="kind of GPU work pool"
    )
    pools.add_argument(
        "--no-gpu",
        action="store_true",
        help="the docker GPU pool's containers without a GPU (a laptop or CI trying the team stack on its CPU)",
    )
    pools.add_argument(
        "--s3-endpoint",
        default="http://minio:9000",
        help="the S3 endpoint flow runs reach, saved with the AWS_* credentials in the codetune-models block "
        "(default: docker/compose.yaml's MinIO; '' for AWS itself)",
    )
    sweeping = commands.add_parser("sweep", help="hyperparameter search (Optuna): --config configs/sweeps/<file>.yaml")
    _add_config_args(sweeping)
    sweeping.add_argument("--deployment", help="run each trial as this deployment on its pool (e.g. finetune/trial)")
    monitoring = commands.add_parser(
        "monitor", help="drift of a code source from the champion's training data; emits the retraining event"
    )
    _add_config_args(monitoring)
    monitoring.add_argument("--data-path", help="the source to check (data.path); default: the config's own")
    serving = commands.add_parser("serve", help="serve a registered model over HTTP (MLflow's scoring protocol)")
    serving.add_argument("--model", default="models:/codetune-code-summarizer@champion", help="models:/<name>@<alias>")
    serving.add_argument("--host", default="127.0.0.1")
    serving.add_argument("--port", type=int, default=8000)
    serving.add_argument("--alias-poll-seconds", type=float, default=5.0, help="how often the alias is checked")
    serving.add_argument("--max-batch-requests", type=int, default=32, help="requests joined into one predict call")
    serving.add_argument("--batch-wait-seconds", type=float, default=0.1, help="how long a batch waits to fill")
    serving.add_argument("--max-queued-requests", type=int, default=512, help="beyond these: 503 with Retry-After")
    serving.add_argument(
        "--log-inputs", metavar="DIR", help="append each served input to DIR/<date>.jsonl (codetune monitor reads it)"
    )
    benchmarking = commands.add_parser(
        "bench-eval", help="a model solves a code benchmark (humaneval), its programs run in the sandbox: pass@k"
    )
    benchmarking.add_argument(
        "--model", required=True, help="models:/<name>@<alias>, a run directory, or weights model.name would name"
    )
    benchmarking.add_argument("--benchmark", choices=["humaneval"], default="humaneval", help="default: humaneval")
    benchmarking.add_argument(
        "--mode",
        choices=["completion", "instruct"],
        default="completion",
        help="completion: the model continues the prompt; instruct: the prompt as a user's message through the chat "
        "template, the answer's fenced code run (any model with a chat template)",
    )
    benchmarking.add_argument("--output", help="write each problem's completions and verdicts to this jsonl file")
    _add_config_args(benchmarking)
    exporting = commands.add_parser(
        "export", help="a trained decoder-only run as a GGUF file and Ollama Modelfile (llama.cpp, Ollama, LM Studio)"
    )
    exporting.add_argument("--model", required=True, help="a run directory (runs/<run name>) or models:/<name>@<alias>")
    exporting.add_argument("--output", help="for models:/: the folder the GGUF goes to (default: gguf/)")
    exporting.add_argument("--format", choices=["gguf"], default="gguf")
    exporting.add_argument(
        "--precision",
        choices=["f16", "q8_0"],
        default="f16",
        help="f16: decodes as the export does; q8_0: about half the size",
    )
    _add_config_args(exporting)  # for models:/, mlflow.tracking_uri
    _add_config_args(commands.add_parser("config", help="validate and print the resolved config"))
    _add_config_args(
        commands.add_parser("check", help="pre-flight: config, model, data and disk, every mistake at once (no server)")
    )
    commands.add_parser("keys", help="list every config key with its type, default and meaning")
    return parser


def _checked(args):
    """The config, after the pre-flight check: a mistake is reported before Prefect or a model is loaded."""
    from codetune.core.config.loader import load_config
    from codetune.core.preflight import check

    cfg = load_config(args.config, args.overrides + args.assignments)
    check(cfg)
    return cfg


def _check(args) -> dict:
    from codetune.core.config.loader import load_config
    from codetune.core.preflight import fail_on, preflight_errors
    from tasks.preflight import publishing_errors

    cfg = load_config(args.config, args.overrides + args.assignments)
    fail_on(preflight_errors(cfg) + publishing_errors(cfg))  # S3 and Hub credentials too, where the config publishes
    return {"check": "passed", "model": cfg.model.name, "task": cfg.model.task.value}


def _run(args) -> dict:
    from codetune.core.config.loader import load_config

    # Read here too, so a typo is reported before Prefect starts.
    overrides = args.overrides + args.assignments
    load_config(args.config, overrides)
    prepare_temporary_server()
    from flows.finetune import DEFAULT_CONFIG, finetune

    return finetune(config=args.config or DEFAULT_CONFIG, overrides=overrides)


def _sweep(args) -> dict:
    from codetune.lifecycle.sweep import load_sweep

    if not args.config:
        raise ConfigError("codetune sweep needs --config configs/sweeps/<file>.yaml")
    load_sweep(args.config, args.overrides + args.assignments)  # a typo is reported before Prefect starts
    prepare_temporary_server()
    from flows.sweep import sweep

    return sweep(sweep_config=args.config, overrides=args.overrides + args.assignments, deployment=args.deployment)


def _monitor(args) -> dict:
    from codetune.core.config.loader import load_config

    load_config(args.config, args.overrides + args.assignments)  # a typo is reported before Prefect starts
    prepare_temporary_server()
    from flows.monitor import monitor

    return monitor(config=args.config, overrides=args.overrides + args.assignments, data_path=args.data_path)


def _deploy(args) -> dict:
    prepare_temporary_server()
    from flows.deploy import deploy

    return deploy(model_path=args.model_path, config=args.config, overrides=args.overrides + args.assignments)


def _deploy_flows(args) -> dict:
    """The pools prefect.yaml names, then `prefect deploy --all`; run from the repo root."""
    import os
    import subprocess

    # Where the repo is inside the GPU worker image (prefect.yaml's main deployment pulls it from there).
    env = {"CODETUNE_WORKDIR": "/opt/prefect", **os.environ}

    def prefect(*command: str) -> None:
        subprocess.run([sys.executable, "-m", "prefect", *command], check=True, env=env)

    if args.no_gpu and args.gpu_pool_type != "docker":
        raise ConfigError("--no-gpu is for the docker pool: a kubernetes pool takes GPUs from its nodes' resources")
    gpu_template = f"deployments/{args.gpu_pool_type}-{'cpu' if args.no_gpu else 'gpu'}-pool.json"
    prefect("work-pool", "create", "cpu-pool", "--type", "process", "--overwrite")
    prefect(
        "work-pool",
        "create",
        "gpu-pool",
        "--type",
        args.gpu_pool_type,
        "--base-job-template",
        gpu_template,
        "--overwrite",
    )
    prefect("--no-prompt", "deploy", "--all")

    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from codetune.lifecycle.destinations import DESTINATIONS
    from codetune.lifecycle.sweep import save_storage_block

    deployments = yaml.safe_load(Path("prefect.yaml").read_text())["deployments"]
    # Saved for the endpoint flow runs reach, which boto3 reads from AWS_ENDPOINT_URL_S3 (unset: AWS itself).
    credentials = {**os.environ, "AWS_ENDPOINT_URL_S3": args.s3_endpoint}
    return {
        "work_pools": ["cpu-pool", f"gpu-pool ({args.gpu_pool_type})"],
        "deployments": [f"{load_flow_from_entrypoint(d['entrypoint']).name}/{d['name']}" for d in deployments],
        "credential_blocks": [name for d in DESTINATIONS if (name := d.save_credentials(credentials))]
        + [name for name in [save_storage_block(os.environ)] if name],
    }


def _serve(args) -> dict:
    from server.app import Limits, run_server

    limits = Limits(
        batch_requests=args.max_batch_requests,
        batch_wait_s=args.batch_wait_seconds,
        queued_requests=args.max_queued_requests,
    )
    try:
        run_server(args.model, args.host, args.port, limits, args.alias_poll_seconds, args.log_inputs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return {"served": args.model}


def _bench_eval(args) -> dict:

    from codetune.core.config import Benchmark, BenchmarkMode
    from codetune.core.config.loader import load_config
    from codetune.core.evaluation import load_model_ref, solve_benchmark

    cfg = load_config(args.config, args.overrides + args.assignments)
    if args.model.startswith("models:/"):
        from codetune.lifecycle.registry import load_registered

        model, tokenizer = load_registered(cfg, args.model)
    else:
        model, tokenizer = load_model_ref(cfg, args.model)
    solved = solve_benchmark(cfg, model, tokenizer, Benchmark(args.benchmark), BenchmarkMode(args.mode))
    result = {"model": args.model} | solved
    problems = result.pop("problems")
    if args.output:
        Path(args.output).write_text("".join(json.dumps(p) + "\n" for p in problems))
    return result


def _export(args) -> dict:
    import tempfile
    from dataclasses import asdict

    from codetune.core.config import GGUFPrecision
    from codetune.core.config.loader import load_config
    from codetune.core.families import InferenceSettings
    from codetune.core.gguf_export import export_gguf

    precision = GGUFPrecision(args.precision)
    if args.model.startswith("models:/"):
        from codetune.lifecycle.registry import download_registered

        cfg = load_config(args.config, args.overrides + args.assignments)
        name = args.model.removeprefix("models:/").replace("@", "-").replace("/", "-")
        out_dir = Path(args.output or "gguf") / name
        with tempfile.TemporaryDirectory() as downloaded:
            model_dir, settings = download_registered(cfg, args.model, Path(downloaded))
            exported = export_gguf(
                model_dir, precision, settings.system_prompt, settings.generation.max_new_tokens, out_dir, name
            )
    else:
        run_dir = Path(args.model)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml): give runs/<run name> or models:/")
        settings = InferenceSettings.of(load_config(run_dir / "config.yaml"))
        exported = export_gguf(run_dir, precision, settings.system_prompt, settings.generation.max_new_tokens)
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(exported).items()} | {
        "ollama": f"cd {exported.path.parent} && ollama create {exported.path.stem} -f Modelfile",
    }


def _train(args) -> dict:
    from codetune.core.pipeline import run_pipeline

    outcome = run_pipeline(_checked(args))
    trained, report = outcome.trained, outcome.report
    return {
        "run_dir": trained.run_dir,
        "global_step": trained.global_step,
        "metrics": report.metrics,
        "baseline": report.baseline,
        "untuned": report.untuned,
        "warnings": report.warnings,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("codetune").setLevel(logging.INFO)
    try:
        if args.command == "keys":
            from codetune.core.config import SCHEMA_KEYS, Config
            from codetune.core.config.loader import _type_name, flatten, key_help

            defaults, docs = flatten(Config()), key_help()
            for key, annotation in SCHEMA_KEYS.items():
                print(f"{key}: {_type_name(annotation)} = {defaults[key]!r}")
                if docs[key]:
                    print(f"    {docs[key]}")
            return 0
        if args.command == "config":
            from codetune.core.config.loader import load_config, to_yaml

            print(to_yaml(load_config(args.config, args.overrides + args.assignments)), end="")
            return 0
        commands = {
            "run": _run,
            "check": _check,
            "train": _train,
            "deploy": _deploy,
            "deploy-flows": _deploy_flows,
            "serve": _serve,
            "sweep": _sweep,
            "monitor": _monitor,
            "bench-eval": _bench_eval,
            "export": _export,
        }
        result = commands[args.command](args)
    except CodetuneError as exc:
        print(f"codetune: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
