"""codetune's training and evaluation path against the plain Trainer recipe, on the same data sample and model, in one run.

    python bench/run.py          # writes bench/results/<machine>.json and prints the table

Every measurement runs in a process of its own, so its peak memory (RSS on CPU,
max_memory_allocated on GPU) is its own. Training and evaluation need only torch, transformers and
peft (a GPU image has no more); the flow-overhead row needs prefect and mlflow and is skipped,
with the reason, where they are missing.
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

from codetune.config import Config, DataConfig, ModelInit, ScratchArchitecture  # noqa: E402

# Model shapes (CodeT5's published sizes), built from scratch: the Hub is not reachable here.
SHAPES = {
    "default": ScratchArchitecture(),
    "codet5-small": ScratchArchitecture(d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, vocab_size=32100),
    "codet5-base": ScratchArchitecture(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, vocab_size=32100),
}
# CodeT5-small-size training speed on a CPU: enough steps to time, not to converge. 50 batches are one
# whole length-grouped "megabatch" of the Trainer's sampler; fewer would see only its longest examples.
SMALL_STEPS = 50
TARGETS = {"train_speedup": 2.0, "loss_gap": 0.02, "eval_speedup": 2.0, "lora_memory_ratio": 0.6, "data_rerun_speedup": 10.0, "flow_overhead": 0.10}


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_config(workdir: Path, shape: str, **training) -> Config:
    cfg = Config()
    cfg.model.scratch = SHAPES[shape]
    cfg.data.cache_dir = str(workdir / "data")
    cfg.training.output_dir = str(workdir / "runs")
    cfg.training.num_train_epochs = 1
    cfg.training.logging_steps = 25
    cfg.training.save_steps = 10**6  # a checkpoint's write time is not training throughput
    for key, value in training.items():
        setattr(cfg.training, key, value)
    return cfg


def model_flops_per_token(model) -> tuple[int, int]:
    """(FLOPs per source token, per target token): 6 x the weights each passes through (nanoGPT's estimate).
    Embedding lookups are no matmuls; the tied output projection is, on the decoder side."""
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.") and "embed" not in n)
    decoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.") and "embed" not in n)
    return 6 * encoder, 6 * (decoder + model.shared.weight.numel())


def token_counts(rows, tokenizer, cfg: Config) -> tuple[int, int]:
    """Non-padding source and target tokens of one pass over rows, as both recipes truncate them."""
    t = cfg.training
    source = tokenizer([r["code"] for r in rows], max_length=t.max_source_length, truncation=True)["input_ids"]
    target = tokenizer(text_target=[r["summary"] for r in rows], max_length=t.max_target_length, truncation=True)["input_ids"]
    return sum(map(len, source)), sum(map(len, target))


# --- workers: each runs in its own process and prints one JSON line ---------------------------------


def train_codetune(workdir: Path, shape: str, steps: int) -> dict:
    """The training stage exactly as the flow calls it."""
    from codetune.data import prepare_data
    from codetune.model import load_exported
    from codetune.training import train_model

    cfg = bench_config(workdir, shape, max_steps=steps)
    data = prepare_data(cfg.data)
    trained = train_model(cfg, data)
    model, tokenizer = load_exported(trained.run_dir)
    return _training_figures(trained.train_seconds, trained.global_step, cfg, data.load("train"), model, tokenizer,
                             trained.train_loss, trained.validation_loss) | {"run_dir": trained.run_dir}


def train_baseline(workdir: Path, shape: str, steps: int) -> dict:
    """The recipe most scripts follow: every example padded to max_length, random batches, the Trainer's defaults."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, default_data_collator, set_seed

    from codetune.data import prepare_data
    from codetune.model import load_model
    from codetune.training import final_train_loss

    cfg = bench_config(workdir, shape, max_steps=steps)
    t = cfg.training
    data = prepare_data(cfg.data)
    rows, validation = data.load("train"), data.load("validation")
    set_seed(t.seed)
    model, tokenizer = load_model(cfg.model, (r["code"] + "\n" + r["summary"] for r in rows), t.seed)  # the same model

    def padded(examples):
        source = tokenizer([r["code"] for r in examples], max_length=t.max_source_length, truncation=True, padding="max_length")
        target = tokenizer(text_target=[r["summary"] for r in examples], max_length=t.max_target_length, truncation=True, padding="max_length")
        labels = [[i if i != tokenizer.pad_token_id else -100 for i in ids] for ids in target["input_ids"]]
        return [{"input_ids": s, "attention_mask": m, "labels": l} for s, m, l in zip(source["input_ids"], source["attention_mask"], labels)]

    args = Seq2SeqTrainingArguments(
        output_dir=str(workdir / "baseline"), num_train_epochs=t.num_train_epochs, max_steps=t.max_steps, learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size, per_device_eval_batch_size=t.per_device_eval_batch_size,
        warmup_steps=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler_type, logging_steps=t.logging_steps,
        save_strategy="no", seed=t.seed, report_to="none", disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=padded(rows), eval_dataset=padded(validation),
                             data_collator=default_data_collator, processing_class=tokenizer)
    started = time.perf_counter()
    outcome = trainer.train()
    seconds = time.perf_counter() - started
    train_loss = final_train_loss(trainer, outcome)
    return _training_figures(seconds, trainer.state.global_step, cfg, rows, model, tokenizer, train_loss, trainer.evaluate()["eval_loss"])


def _training_figures(seconds, steps, cfg, rows, model, tokenizer, train_loss, validation_loss) -> dict:
    # Both recipes see the same examples: one epoch, or (max_steps) the same number of batches.
    samples = min(len(rows), steps * cfg.training.per_device_train_batch_size)
    source, target = token_counts(rows, tokenizer, cfg)
    source, target = source * samples / len(rows), target * samples / len(rows)
    per_source, per_target = model_flops_per_token(model)
    return {
        "seconds": round(seconds, 2),
        "samples_per_second": round(samples / seconds, 2),
        "tokens_per_second": round((source + target) / seconds, 1),
        "flops_per_second": (per_source * source + per_target * target) / seconds,
        "steps": steps,
        "train_loss": round(float(train_loss), 4),
        "validation_loss": round(float(validation_loss), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }


def evaluate_both(workdir: Path, run_dir: str) -> dict:
    """Generation on the test split: one example at a time (the naive loop) and codetune's batched, length-sorted path."""
    import torch

    from codetune.data import prepare_data
    from codetune.evaluation import generate
    from codetune.model import load_exported

    cfg = bench_config(workdir, "default")
    codes = [r["code"] for r in prepare_data(cfg.data).load("test")]
    model, tokenizer = load_exported(run_dir)
    model = model.to(device()).eval()
    new_tokens = cfg.generation.max_new_tokens

    started = time.perf_counter()
    one_by_one = []
    with torch.inference_mode():
        for code in codes:
            batch = tokenizer(code, max_length=cfg.training.max_source_length, truncation=True, return_tensors="pt").to(model.device)
            out = model.generate(**batch, max_new_tokens=new_tokens)
            one_by_one.append(" ".join(tokenizer.decode(out[0], skip_special_tokens=True).split()))
    baseline_seconds = time.perf_counter() - started

    started = time.perf_counter()
    batched = generate(model, tokenizer, codes, cfg.generation, cfg.training.max_source_length)
    codetune_seconds = time.perf_counter() - started
    return {
        "examples": len(codes),
        "baseline_examples_per_second": round(len(codes) / baseline_seconds, 2),
        "codetune_examples_per_second": round(len(codes) / codetune_seconds, 2),
        "same_predictions": sum(a == b for a, b in zip(one_by_one, batched)) / len(codes),
    }


def train_memory(workdir: Path, method: str) -> dict:
    """A few training steps of a CodeT5-small-size model through codetune: all weights ("full"), LoRA adapters as
    codetune trains them ("lora", activation checkpointing on), or LoRA without checkpointing ("lora-plain")."""
    from codetune.data import prepare_data
    from codetune.model import load_model
    from codetune.training import train_model

    cfg = bench_config(workdir, "codet5-small", max_steps=8, logging_steps=4, per_device_train_batch_size=16)
    data = prepare_data(cfg.data)
    base = workdir / "codet5-small-init"
    if not (base / "config.json").exists():
        model, tokenizer = load_model(cfg.model, (r["code"] + "\n" + r["summary"] for r in data.load("train")), seed=0)
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    cfg.model.name, cfg.model.init = str(base), ModelInit.pretrained
    cfg.peft.use_peft = method.startswith("lora")
    if method == "lora-plain":
        cfg.training.gradient_checkpointing = False
    cfg.training.run_name = f"memory-{method}"
    before = peak_memory_mb()
    trained = train_model(cfg, data)
    return {"peak_memory_mb": round(peak_memory_mb(), 1), "before_training_mb": round(before, 1), "train_seconds": trained.train_seconds,
            "trainable_parameters": trained.trainable_parameters, "total_parameters": trained.total_parameters}


def matmul_peak() -> dict:
    """The machine's peak matrix-multiply rate, measured: the denominator of every FLOP/s fraction."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device() == "cuda" else (2048, torch.float32)
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
    return {"flops_per_second": 2 * n**3 / best, "dtype": str(dtype).removeprefix("torch."), "size": n}


def data_stage(workdir: Path) -> dict:
    """prepare_data on an empty cache, then again on unchanged data."""
    from codetune.data import prepare_data

    cfg = DataConfig(cache_dir=str(workdir / "data-cold"))
    started = time.perf_counter()
    prepare_data(cfg)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    prepare_data(cfg)
    warm = time.perf_counter() - started
    return {"first_seconds": round(cold, 3), "rerun_seconds": round(warm, 3)}


def flow_overhead(workdir: Path) -> dict:
    """The default flow (one epoch) on a real temporary Prefect server: flow wall time minus its task runs' own time."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.finetune import finetune

    os.chdir(workdir)
    with prefect_test_harness(server_startup_timeout=120):
        started = time.perf_counter()
        state = finetune(overrides=["training.num_train_epochs=1", f"data.cache_dir={workdir / 'flow-data'}",
                                    f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"], return_state=True)
        wall = time.perf_counter() - started

        async def task_seconds() -> float:
            async with get_client() as client:
                runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
                return sum(r.total_run_time.total_seconds() for r in runs)

        stages = asyncio.run(task_seconds())
    return {"flow_seconds": round(wall, 2), "stage_seconds": round(stages, 2), "overhead_fraction": round((wall - stages) / wall, 4)}


WORKERS = {
    "train-codetune": lambda w, arg, steps: train_codetune(w, arg, steps),
    "train-baseline": lambda w, arg, steps: train_baseline(w, arg, steps),
    "evaluate": lambda w, arg, steps: evaluate_both(w, arg),
    "memory": lambda w, arg, steps: train_memory(w, arg),
    "matmul": lambda w, arg, steps: matmul_peak(),
    "data": lambda w, arg, steps: data_stage(w),
    "flow": lambda w, arg, steps: flow_overhead(w),
}


def run_worker(name: str, workdir: Path, arg: str = "", steps: int = -1) -> dict:
    """One measurement in a fresh process; its last stdout line is the result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--workdir", str(workdir), "--arg", arg, "--steps", str(steps)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker '{name} {arg}' failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--steps", type=int, default=-1, help="training steps of a worker; -1 trains one epoch")
    parser.add_argument("--output", type=Path, help="results file (default: bench/results/<machine>.json)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.workdir, args.arg, args.steps)))
        return

    import torch

    shape = "codet5-base" if torch.cuda.is_available() else "default"
    with tempfile.TemporaryDirectory(prefix="codetune-bench-") as tmp:
        workdir = Path(tmp)
        results = {"machine": machine_name(), "device": device(), "model_shape": shape, "torch": torch.__version__}
        results["matmul_peak"] = run_worker("matmul", workdir)
        results["data_stage"] = run_worker("data", workdir)
        results["train_baseline"] = run_worker("train-baseline", workdir, shape)
        results["train_codetune"] = run_worker("train-codetune", workdir, shape)
        results["evaluation"] = run_worker("evaluate", workdir, results["train_codetune"].pop("run_dir"))
        if not torch.cuda.is_available():  # where per-step overhead weighs less than on the small default model
            results["train_baseline_codet5_small"] = run_worker("train-baseline", workdir, "codet5-small", SMALL_STEPS)
            results["train_codetune_codet5_small"] = run_worker("train-codetune", workdir, "codet5-small", SMALL_STEPS)
            results["train_codetune_codet5_small"].pop("run_dir")
        results["memory_full"] = run_worker("memory", workdir, "full")
        results["memory_lora"] = run_worker("memory", workdir, "lora")
        results["memory_lora_plain"] = run_worker("memory", workdir, "lora-plain")
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
    base, ours, peak = r["train_baseline"], r["train_codetune"], r["matmul_peak"]["flops_per_second"]
    s = {
        "train_speedup": round(ours["samples_per_second"] / base["samples_per_second"], 2),
        "loss_gap": round(abs(ours["validation_loss"] - base["validation_loss"]) / base["validation_loss"], 4),
        "eval_speedup": round(r["evaluation"]["codetune_examples_per_second"] / r["evaluation"]["baseline_examples_per_second"], 2),
        "lora_memory_ratio": round(r["memory_lora"]["peak_memory_mb"] / r["memory_full"]["peak_memory_mb"], 3),
        "data_rerun_speedup": round(r["data_stage"]["first_seconds"] / r["data_stage"]["rerun_seconds"], 1),
        "baseline_flops_fraction": round(base["flops_per_second"] / peak, 4),
        **({"train_speedup_codet5_small": round(r["train_codetune_codet5_small"]["samples_per_second"] / r["train_baseline_codet5_small"]["samples_per_second"], 2)}
           if "train_codetune_codet5_small" in r else {}),
        "codetune_flops_fraction": round(ours["flops_per_second"] / peak, 4),
    }
    if "overhead_fraction" in r["flow"]:
        s["flow_overhead"] = r["flow"]["overhead_fraction"]
    return s


def table(r: dict) -> str:
    s, base, ours, ev = r["summary"], r["train_baseline"], r["train_codetune"], r["evaluation"]
    rows = [
        ("training samples/s", base["samples_per_second"], ours["samples_per_second"], f"{s['train_speedup']}x", verdict(s["train_speedup"] >= TARGETS["train_speedup"],
            "the small default model is bound by per-op costs that padding does not shrink (CPU dropout RNG is ~28% of a step)")),
        ("training non-padding tokens/s", base["tokens_per_second"], ours["tokens_per_second"], "", ""),
        *([("training samples/s, CodeT5-small size (%d steps)" % SMALL_STEPS, r["train_baseline_codet5_small"]["samples_per_second"],
            r["train_codetune_codet5_small"]["samples_per_second"], f"{s['train_speedup_codet5_small']}x", "")] if "train_speedup_codet5_small" in s else []),
        ("final validation loss", base["validation_loss"], ours["validation_loss"], f"gap {100 * s['loss_gap']:.2f}%", verdict(s["loss_gap"] <= TARGETS["loss_gap"], "loss differs")),
        ("final training loss (last window)", base["train_loss"], ours["train_loss"], "", ""),
        ("achieved FLOP/s / measured matmul peak", f"{100 * s['baseline_flops_fraction']:.1f}%", f"{100 * s['codetune_flops_fraction']:.1f}%", "", ""),
        ("peak memory, training (MB)", base["peak_memory_mb"], ours["peak_memory_mb"], "", ""),
        ("evaluation examples/s", ev["baseline_examples_per_second"], ev["codetune_examples_per_second"], f"{s['eval_speedup']}x", verdict(s["eval_speedup"] >= TARGETS["eval_speedup"])),
        ("peak memory, CodeT5-small full vs LoRA (MB)", r["memory_full"]["peak_memory_mb"], r["memory_lora"]["peak_memory_mb"], f"{s['lora_memory_ratio']}x", verdict(s["lora_memory_ratio"] <= TARGETS["lora_memory_ratio"])),
        ("  LoRA without activation checkpointing (MB)", "", r["memory_lora_plain"]["peak_memory_mb"],
         f"{r['memory_lora_plain']['peak_memory_mb'] / r['memory_full']['peak_memory_mb']:.3f}x", ""),
        ("  8 steps: full vs LoRA (s)", r["memory_full"]["train_seconds"], r["memory_lora"]["train_seconds"], "", ""),
        ("data stage, first vs unchanged re-run (s)", r["data_stage"]["first_seconds"], r["data_stage"]["rerun_seconds"], f"{s['data_rerun_speedup']}x", verdict(s["data_rerun_speedup"] >= TARGETS["data_rerun_speedup"])),
    ]
    if "flow_overhead" in s:
        rows.append(("flow wall vs stages' own time (s)", r["flow"]["flow_seconds"], r["flow"]["stage_seconds"], f"{100 * s['flow_overhead']:.1f}% overhead", verdict(s["flow_overhead"] < TARGETS["flow_overhead"])))
    else:
        rows.append(("flow overhead", "", "", r["flow"]["skipped"], "not measured"))
    header = ("measure", "baseline", "codetune", "ratio", "target")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(5)]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))
    return "\n".join([f"{r['machine']} ({r['device']}, {r['model_shape']} model, {ours['parameters']:,} parameters)", line(header), *map(line, rows)])


if __name__ == "__main__":
    main()
