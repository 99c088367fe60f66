"""codetune's training and evaluation path against the plain recipe, on the default model (LoRA on SmolLM2-135M), in
one run.

    python bench/run.py          # writes bench/results/<machine>.json and prints the table
    python bench/run.py --avx2   # an AVX2-only CPU's path (AVX2 kernels, fp32): bench/results/<machine>-avx2-fp32.json

The plain recipe is what most fine-tuning scripts do: every example padded to max_length, random
batches, fp32, the LM head over every position, one example at a time in generation. Every
measurement runs in a process of its own, so its peak memory (RSS on CPU, max_memory_allocated on
GPU) is its own. Training and evaluation need codetune's core (torch, transformers, peft, omegaconf; bench/gpu.py
carries what a GPU image lacks); the flow-overhead row needs prefect and mlflow and is skipped, with the reason,
where they are missing.

--avx2 measures the path of a CPU without AVX-512 (most laptops, many cloud CPUs) on this one: it
restarts itself with ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS set (read
when torch loads), records the kernel capability torch then reports, and measures only what the path
changes: the matmul peak, training and evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

from codetune.core.config import Config, DataConfig
from codetune.core.config.loader import load_config  # noqa: E402
from codetune.core.data import Examples  # noqa: E402
from codetune.core.families import family_of  # noqa: E402

# Enough steps for a loss to compare, few enough that the fp32 padded baseline ends in minutes on 2 cores.
# 50 batches are one whole length-grouped "megabatch" of the Trainer's sampler; fewer would see only its longest
# examples.
CPU_STEPS, GPU_STEPS = 50, 200
EVAL_EXAMPLES = 64  # one-at-a-time generation of the whole test split would take the baseline ~10 minutes here
TARGETS = {
    "train_speedup": 2.0,
    "loss_gap": 0.02,
    "eval_speedup": 2.0,
    "data_rerun_speedup": 10.0,
    "flow_overhead": 0.10,
    "gpu_mfu": 0.40,
}


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_config(workdir: Path, steps: int, *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"data.cache_dir={workdir / 'data'}",
            f"training.output_dir={workdir / 'runs'}",
            f"training.max_steps={steps}",
            "training.save_steps=1000000",  # a checkpoint's write time is not training throughput
            "training.logging_steps=10",
            *overrides,
        ],
    )


def useful_flops(model, rows, tokenizer, cfg: Config) -> tuple[float, int, int]:
    """(FLOPs, prompt tokens, target tokens) of one pass of LoRA training over rows, non-padding tokens only.

    Frozen weights cost a forward and an input-gradient matmul (4 x weights per token), not a weight
    gradient; the LM head is needed only where a target token is predicted. Both recipes are measured
    on this same useful work, so padding and wasted head projections show up as lower FLOP/s.
    """
    from codetune.core.families import family_of

    examples = family_of(cfg.model).tokenize(rows, tokenizer, cfg)
    targets = sum(sum(1 for label in e["labels"] if label != -100) for e in examples)
    prompts = sum(len(e["input_ids"]) for e in examples) - targets
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters() if not any(k in n for k in ("embed", "lm_head", "lora_")))
    return 4 * body * (prompts + targets) + 4 * head * targets, prompts, targets


# --- workers: each runs in its own process and prints one JSON line ---------------------------------


def train_codetune(workdir: Path, steps: int, *overrides: str) -> dict:
    """The training stage exactly as the flow calls it."""
    from codetune.core import pipeline
    from codetune.core.model import load_exported
    from codetune.core.precision import resolve_precision

    cfg = bench_config(workdir, steps, *overrides)
    family = family_of(cfg.model)
    data = pipeline.prepare(cfg, family)
    trained = pipeline.train(cfg, family, data)
    model, tokenizer = load_exported(trained.run_dir)
    figures = training_figures(
        trained.train_seconds,
        trained.global_step,
        cfg,
        data.load("train"),
        model,
        tokenizer,
        trained.train_loss,
        trained.validation_loss,
    )
    return figures | {"run_dir": trained.run_dir, "dtype": "bfloat16" if resolve_precision(cfg)[0] else "float32"}


def train_baseline(workdir: Path, steps: int, *overrides: str) -> dict:
    """The plain recipe on the same model, data, LoRA and optimiser settings."""
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    from codetune.core.data import prepare_data
    from codetune.core.families import family_of
    from codetune.core.model import add_lora, load_pretrained
    from codetune.core.training import final_train_loss

    cfg = bench_config(workdir, steps, *overrides)
    t = cfg.training
    data = prepare_data(cfg.data, Examples.pairs)
    rows, validation = data.load("train"), data.load("validation")
    set_seed(t.seed)
    base, tokenizer = load_pretrained(cfg.model)
    model = add_lora(base, cfg.peft)
    length = t.max_source_length + t.max_target_length

    def padded(examples):
        return [
            {
                "input_ids": e["input_ids"] + [tokenizer.pad_token_id] * (length - len(e["input_ids"])),
                "attention_mask": e["attention_mask"] + [0] * (length - len(e["input_ids"])),
                "labels": e["labels"] + [-100] * (length - len(e["input_ids"])),
            }
            for e in family_of(cfg.model).tokenize(examples, tokenizer, cfg)
        ]

    # Only what the recipe shares with codetune's run comes from the config; the rest is the Trainer's defaults.
    shared = ["max_steps", "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size"]
    shared += ["lr_scheduler_type", "logging_steps", "seed"]
    args = TrainingArguments(
        output_dir=str(workdir / "baseline"),
        warmup_steps=t.warmup_ratio,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        prediction_loss_only=True,
        **{key: getattr(t, key) for key in shared},
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=padded(rows),
        eval_dataset=padded(validation),
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    outcome = trainer.train()
    seconds = time.perf_counter() - started
    train_loss = final_train_loss(trainer, outcome)
    figures = training_figures(
        seconds, trainer.state.global_step, cfg, rows, base, tokenizer, train_loss, trainer.evaluate()["eval_loss"]
    )
    return figures | {"dtype": "float32"}


def training_figures(seconds, steps, cfg, rows, model, tokenizer, train_loss, validation_loss) -> dict:
    # Both recipes see as many examples: the FLOPs of the average example times the examples seen.
    samples = steps * cfg.training.per_device_train_batch_size
    flops, prompts, targets = useful_flops(model, rows, tokenizer, cfg)
    per_sample = samples / len(rows)
    return {
        "seconds": round(seconds, 2),
        "samples_per_second": round(samples / seconds, 2),
        "tokens_per_second": round((prompts + targets) * per_sample / seconds, 1),
        "flops_per_second": flops * per_sample / seconds,
        "steps": steps,
        "train_loss": round(float(train_loss), 4),
        "validation_loss": round(float(validation_loss), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }


def evaluate_both(workdir: Path, run_dir: str) -> dict:
    """Generation on test examples: one at a time (the naive loop) and codetune's batched, length-sorted path."""
    import torch

    from codetune.core.data import prepare_data
    from codetune.core.families.base import InferenceSettings
    from codetune.core.families.generative import encode_prompt, generate
    from codetune.core.model import load_exported

    cfg = bench_config(workdir, 1)
    codes = [r["code"] for r in prepare_data(cfg.data, Examples.pairs).load("test")][:EVAL_EXAMPLES]
    model, tokenizer = load_exported(run_dir)
    model = model.to(device()).eval()
    new_tokens, length, prompt = cfg.generation.max_new_tokens, cfg.training.max_source_length, cfg.model.prompt

    started = time.perf_counter()
    one_by_one = []
    with torch.inference_mode():
        for code in codes:
            ids = torch.tensor([encode_prompt(tokenizer, prompt, code, length)], device=model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            one_by_one.append(" ".join(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split()))
    baseline_seconds = time.perf_counter() - started

    started = time.perf_counter()
    batched = generate(model, tokenizer, codes, InferenceSettings.of(cfg))
    codetune_seconds = time.perf_counter() - started
    return {
        "examples": len(codes),
        "baseline_examples_per_second": round(len(codes) / baseline_seconds, 2),
        "codetune_examples_per_second": round(len(codes) / codetune_seconds, 2),
        "same_predictions": sum(a == b for a, b in zip(one_by_one, batched)) / len(codes),
    }


def train_memory(workdir: Path, checkpointing: str) -> dict:
    """A few steps of the default with activation checkpointing on or off: what it saves and what it costs."""
    from codetune.core.data import prepare_data
    from codetune.core.training import train_model

    cfg = bench_config(
        workdir, 8, f"training.gradient_checkpointing={checkpointing}", f"training.run_name=memory-{checkpointing}"
    )
    before = peak_memory_mb()
    trained = train_model(cfg, prepare_data(cfg.data, Examples.pairs), family_of(cfg.model))
    return {
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "before_training_mb": round(before, 1),
        "train_seconds": trained.train_seconds,
    }


def matmul_peak(dtype_name: str) -> dict:
    """The machine's peak matrix-multiply rate in a dtype, measured: the denominator of every FLOP/s fraction."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = 8192 if device() == "cuda" else 2048
    a = torch.randn(n, n, dtype=dtype, device=device())
    b = torch.randn(n, n, dtype=dtype, device=device())
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        if device() == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device() == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return {"flops_per_second": 2 * n**3 / best, "dtype": dtype_name, "size": n}


def data_stage(workdir: Path) -> dict:
    """prepare_data on an empty cache, then again on unchanged data."""
    from codetune.core.data import prepare_data

    cfg = DataConfig(cache_dir=str(workdir / "data-cold"))
    started = time.perf_counter()
    prepare_data(cfg, Examples.pairs)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    prepare_data(cfg, Examples.pairs)
    warm = time.perf_counter() - started
    return {"first_seconds": round(cold, 3), "rerun_seconds": round(warm, 3)}


def flow_overhead(workdir: Path) -> dict:
    """The seq2seq twin's flow (one epoch) on a real temporary Prefect server: flow wall time minus its task runs' own
    time."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.finetune import finetune

    twin = str(ROOT / "configs" / "tiny-seq2seq.yaml")
    os.chdir(workdir)
    with prefect_test_harness(server_startup_timeout=120):
        started = time.perf_counter()
        state = finetune(
            config=twin,
            overrides=[
                "training.num_train_epochs=1",
                f"data.cache_dir={workdir / 'flow-data'}",
                f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
            ],
            return_state=True,
        )
        wall = time.perf_counter() - started

        async def task_seconds() -> float:
            async with get_client() as client:
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )
                return sum(r.total_run_time.total_seconds() for r in runs)

        stages = asyncio.run(task_seconds())
    return {
        "flow_seconds": round(wall, 2),
        "stage_seconds": round(stages, 2),
        "overhead_fraction": round((wall - stages) / wall, 4),
    }


WORKERS = {
    "train-codetune": lambda w, arg, steps: train_codetune(w, steps),
    "train-baseline": lambda w, arg, steps: train_baseline(w, steps),
    "evaluate": lambda w, arg, steps: evaluate_both(w, arg),
    "memory": lambda w, arg, steps: train_memory(w, arg),
    "matmul": lambda w, arg, steps: matmul_peak(arg),
    "data": lambda w, arg, steps: data_stage(w),
    "flow": lambda w, arg, steps: flow_overhead(w),
}


def run_worker(name: str, workdir: Path, arg: str = "", steps: int = -1) -> dict:
    """One measurement in a fresh process; its last stdout line is the result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--workdir", str(workdir), "--arg", arg, "--steps", str(steps)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker '{name} {arg}' failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{os.cpu_count()}core-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def verdict(ok: bool, reason: str = "") -> str:
    return "met" if ok else f"MISSED: {reason}" if reason else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=WORKERS)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--arg", default="")
    parser.add_argument("--steps", type=int, default=-1, help="training steps of a worker")
    parser.add_argument("--output", type=Path, help="results file (default: bench/results/<machine>.json)")
    parser.add_argument("--avx2", action="store_true", help="behave like an AVX2-only CPU: AVX2 kernels, fp32")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.workdir, args.arg, args.steps)))
        return
    if args.avx2 and "ATEN_CPU_CAPABILITY" not in os.environ:
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **AVX2_ENV}))

    import torch

    steps = GPU_STEPS if torch.cuda.is_available() else CPU_STEPS
    with tempfile.TemporaryDirectory(prefix="codetune-bench-") as tmp:
        workdir = Path(tmp)
        results = {
            "machine": machine_name() + ("-avx2-fp32" if args.avx2 else ""),
            "cpu": cpu_model(),
            "kernel_capability": torch.backends.cpu.get_cpu_capability(),
            "date": time.strftime("%Y-%m-%d"),
            "device": device(),
            "model": Config().model.name,
            "torch": torch.__version__,
        }
        dtypes = ("float32",) if args.avx2 else ("float32", "bfloat16")
        results["matmul_peak"] = {dtype: run_worker("matmul", workdir, dtype) for dtype in dtypes}
        if not args.avx2:
            results["data_stage"] = run_worker("data", workdir)
        results["train_baseline"] = run_worker("train-baseline", workdir, steps=steps)
        results["train_codetune"] = run_worker("train-codetune", workdir, steps=steps)
        results["evaluation"] = run_worker("evaluate", workdir, results["train_codetune"].pop("run_dir"))
        if not args.avx2:
            results["memory_checkpointing"] = run_worker("memory", workdir, "true")
            results["memory_plain"] = run_worker("memory", workdir, "false")
            try:
                import mlflow  # noqa: F401
                import prefect  # noqa: F401
            except ImportError as exc:
                results["flow"] = {"skipped": f"needs the orchestration extra ({exc.name} is not installed)"}
            else:
                results["flow"] = run_worker("flow", workdir)
    results["summary"] = summarise(results)
    output = args.output or ROOT / "bench" / "results" / f"{results['machine']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {output}")


def summarise(r: dict) -> dict:
    base, ours, peaks = r["train_baseline"], r["train_codetune"], r["matmul_peak"]
    s = {
        "train_speedup": round(ours["samples_per_second"] / base["samples_per_second"], 2),
        "loss_gap": round(abs(ours["validation_loss"] - base["validation_loss"]) / base["validation_loss"], 4),
        "eval_speedup": round(
            r["evaluation"]["codetune_examples_per_second"] / r["evaluation"]["baseline_examples_per_second"], 2
        ),
        # MFU: useful FLOP/s against the measured matmul peak of the dtype each recipe computes in.
        "baseline_mfu": round(base["flops_per_second"] / peaks[base["dtype"]]["flops_per_second"], 4),
        "codetune_mfu": round(ours["flops_per_second"] / peaks[ours["dtype"]]["flops_per_second"], 4),
    }
    if "memory_plain" in r:
        memory, plain = r["memory_checkpointing"], r["memory_plain"]
        s["checkpointing_memory_ratio"] = round(memory["peak_memory_mb"] / plain["peak_memory_mb"], 3)
        s["checkpointing_time_ratio"] = round(memory["train_seconds"] / plain["train_seconds"], 2)
    if "data_stage" in r:
        s["data_rerun_speedup"] = round(r["data_stage"]["first_seconds"] / r["data_stage"]["rerun_seconds"], 1)
    if "overhead_fraction" in r.get("flow", {}):
        s["flow_overhead"] = r["flow"]["overhead_fraction"]
    return s


def table(r: dict) -> str:
    s, base, ours, ev = r["summary"], r["train_baseline"], r["train_codetune"], r["evaluation"]
    mfu_target = verdict(s["codetune_mfu"] >= TARGETS["gpu_mfu"]) if r["device"] == "cuda" else "GPU target only"
    rows = [
        (
            f"training samples/s ({ours['steps']} steps)",
            base["samples_per_second"],
            ours["samples_per_second"],
            f"{s['train_speedup']}x",
            verdict(s["train_speedup"] >= TARGETS["train_speedup"]),
        ),
        ("training non-padding tokens/s", base["tokens_per_second"], ours["tokens_per_second"], "", ""),
        (
            "final validation loss",
            base["validation_loss"],
            ours["validation_loss"],
            f"gap {100 * s['loss_gap']:.2f}%",
            verdict(s["loss_gap"] <= TARGETS["loss_gap"], "loss differs"),
        ),
        ("final training loss (last window)", base["train_loss"], ours["train_loss"], "", ""),
        ("compute dtype", base["dtype"], ours["dtype"], "", ""),
        (
            "MFU: useful FLOP/s / that dtype's matmul peak",
            f"{100 * s['baseline_mfu']:.1f}%",
            f"{100 * s['codetune_mfu']:.1f}%",
            "",
            mfu_target,
        ),
        ("peak memory, training (MB)", base["peak_memory_mb"], ours["peak_memory_mb"], "", ""),
        (
            f"evaluation examples/s ({ev['examples']} examples)",
            ev["baseline_examples_per_second"],
            ev["codetune_examples_per_second"],
            f"{s['eval_speedup']}x",
            verdict(s["eval_speedup"] >= TARGETS["eval_speedup"]),
        ),
        ("  same predictions as one at a time", "", f"{100 * ev['same_predictions']:.0f}%", "", ""),
    ]
    if "memory_plain" in r:
        rows += [
            (
                "activation checkpointing off vs on: peak MB",
                r["memory_plain"]["peak_memory_mb"],
                r["memory_checkpointing"]["peak_memory_mb"],
                f"{s['checkpointing_memory_ratio']}x",
                "",
            ),
            (
                "  8 steps (s)",
                r["memory_plain"]["train_seconds"],
                r["memory_checkpointing"]["train_seconds"],
                f"{s['checkpointing_time_ratio']}x",
                "",
            ),
        ]
    if "data_stage" in r:
        rows.append(
            (
                "data stage, first vs unchanged re-run (s)",
                r["data_stage"]["first_seconds"],
                r["data_stage"]["rerun_seconds"],
                f"{s['data_rerun_speedup']}x",
                verdict(s["data_rerun_speedup"] >= TARGETS["data_rerun_speedup"]),
            )
        )
    if "flow_overhead" in s:
        rows.append(
            (
                "flow wall vs stages' own time, twin (s)",
                r["flow"]["flow_seconds"],
                r["flow"]["stage_seconds"],
                f"{100 * s['flow_overhead']:.1f}% overhead",
                verdict(s["flow_overhead"] < TARGETS["flow_overhead"]),
            )
        )
    elif "flow" in r:  # the --avx2 path measures only what the kernels change, not the flow's overhead
        rows.append(("flow overhead", "", "", r["flow"]["skipped"], "not measured"))
    header = ("measure", "plain recipe", "codetune", "ratio", "target")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(5)]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))
    return "\n".join(
        [
            f"{r['machine']} ({r['cpu']}, {r['kernel_capability']} kernels, {r['date']}; {r['device']}, "
            f"{r['model']}, {ours['parameters']:,} parameters)",
            line(header),
            *map(line, rows),
        ]
    )


if __name__ == "__main__":
    main()
