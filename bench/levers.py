"""What a training step of the default costs under each speed lever, as a ratio to the previous default (source cut
at 128 tokens, LoRA on all 30 layers), measured in the same run on the same batches.

    python bench/levers.py            # this CPU's own path (bf16 autocast where it has AVX512-BF16 or AMX)
    python bench/levers.py --avx2     # an AVX2-only CPU's path: AVX2 kernels, fp32

Writes bench/results/levers-<path>.json and prints the table. --avx2 restarts itself with ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS set (they are read when torch loads) and records the kernel
capability torch then reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import AVX2_ENV, cpu_model  # noqa: E402
from codetune.core.data import Examples  # noqa: E402

# (source tokens, adapted layers); the first is the baseline every ratio is taken against.
LEVERS = [(128, 30), (64, 30), (128, 10), (96, 15), (64, 10), (64, 6)]
STEPS = 8  # after one warm-up step; the same 72 shuffled training pairs for every lever


def step_seconds(source_tokens: int, layers: int, rows: list[dict], bf16: bool) -> dict:
    import torch

    from codetune.core.config.loader import load_config
    from codetune.core.families import family_of
    from codetune.core.model import add_lora, load_pretrained

    cfg = load_config(None, [f"training.max_source_length={source_tokens}"])
    model, tokenizer = load_pretrained(cfg.model)
    family = family_of(cfg.model)
    adapted = layers if layers < model.config.num_hidden_layers else None
    model = add_lora(model, dataclasses.replace(cfg.peft, last_layers=adapted)).train()
    examples = family.tokenize(rows, tokenizer, cfg)
    collate = family.collator(tokenizer, model, None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.training.learning_rate)
    seconds, tokens = [], 0
    for i in range(STEPS + 1):
        batch = collate(examples[i * 8 : (i + 1) * 8])
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i:  # the first step warms kernels and caches up
            seconds.append(time.perf_counter() - started)
            tokens += int(batch["attention_mask"].sum())
    return {
        "max_source_length": source_tokens,
        "adapted_layers": layers,
        "seconds_per_step": round(sum(seconds) / STEPS, 3),
        "tokens_per_step": tokens / STEPS,
    }


def measure() -> dict:
    import torch

    from codetune.core.config.loader import load_config
    from codetune.core.data import prepare_data
    from codetune.core.precision import cpu_has_bf16

    bf16 = cpu_has_bf16()
    rows = prepare_data(load_config(None, []).data, Examples.pairs).load("train")
    random.Random(0).shuffle(rows)
    rows = rows[: (STEPS + 1) * 8]
    levers = [step_seconds(source, layers, rows, bf16) for source, layers in LEVERS]
    for lever in levers:
        lever["speedup"] = round(levers[0]["seconds_per_step"] / lever["seconds_per_step"], 2)
    return {
        "cpu": cpu_model(),
        "kernel_capability": torch.backends.cpu.get_cpu_capability(),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "levers": levers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--avx2", action="store_true", help="behave like an AVX2-only CPU: AVX2 kernels, fp32")
    args = parser.parse_args()
    if args.avx2 and "ATEN_CPU_CAPABILITY" not in os.environ:
        sys.exit(subprocess.call([sys.executable, __file__, "--avx2"], env={**os.environ, **AVX2_ENV}))
    results = measure()
    name = "avx2-fp32" if args.avx2 else results["precision"].split()[0]
    output = ROOT / "bench" / "results" / f"levers-{name}.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['cpu']}, {results['kernel_capability']} kernels, {results['precision']}, {results['date']}")
    print("| source tokens | adapted layers | s/step | tokens/step | speedup |\n|---|---|---|---|---|")
    for lever in results["levers"]:
        print(
            f"| {lever['max_source_length']} | {lever['adapted_layers']} | {lever['seconds_per_step']} "
            f"| {lever['tokens_per_step']:.0f} | {lever['speedup']}x |"
        )
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    main()
