"""codetune against TRL's SFTTrainer on conversations, and packing against padding, in one run.

    python bench/sft.py          # this CPU's own path (bf16 autocast where it has AVX512-BF16 or AMX)
    python bench/sft.py --avx2   # an AVX2-only CPU's path: AVX2 kernels, fp32

The same model (configs/instruct.yaml: SmolLM2-135M-Instruct), the same stdlib conversations with the same system
prompt, the same LoRA (r, alpha, dropout, target modules), learning rate, schedule, seed and number of steps, each in
a process of its own (its peak RSS is its own). Padded variants take batches of 8 conversations; packed ones as many
512-token rows as hold about as many tokens (3 here), so that each step sees about the same conversations:

- codetune: the training stage as `codetune run` calls it, length-grouped padded batches;
- codetune, packed: the same with training.packing=true;
- TRL, documented: SFTTrainer with assistant_only_loss=True and SFTConfig's defaults (activation checkpointing on);
- TRL, padded: without activation checkpointing, batches grouped by length as codetune's;
- TRL, packed: without activation checkpointing, packing=True (best-fit packs, padding-free).

TRL's assistant_only_loss needs {% generation %} markers, which SmolLM2's template lacks (TRL refuses it and ships
marked templates only for the models it lists): it gets the same ChatML template with the markers, as its
documentation tells a user to write. Before training, the worker checks that TRL's tokens and masks equal
codetune's on the first conversations, so both train on the same thing.

Tokens/s counts the non-padding tokens each model's forward saw in training (between the Trainer's train begin
and end). Held-out loss is the same for every variant: the mean over assistant tokens of the first 64 validation
conversations, computed in this file after training. Writes bench/results/sft-<machine>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import AVX2_ENV, cpu_model, machine_name, peak_memory_mb  # noqa: E402

CONFIG = ROOT / "configs" / "instruct.yaml"
STEPS = 30  # TRL's documented configuration runs ~100 tokens/s here: 30 steps of 8 conversations take it 8 minutes
POOL = 1400  # conversations read: tokenizing all 5,600 twice per variant would take longer than the training
HELD_OUT = 64
VARIANTS = {
    "codetune": "codetune: length-grouped padded batches",
    "codetune-packed": "codetune: packing=true",
    "trl-documented": "TRL SFTTrainer: documented (assistant_only_loss, activation checkpointing)",
    "trl-padded": "TRL SFTTrainer: no checkpointing, length-grouped batches",
    "trl-packed": "TRL SFTTrainer: no checkpointing, packing=True",
}
# SmolLM2's ChatML with the {% generation %} markers TRL's assistant_only_loss needs: the assistant's content and
# its <|im_end|> carry loss, as codetune's mask derived from the unmarked template has them.
MARKED_CHATML = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bench_config(workdir: Path, *overrides: str):
    from codetune.core.config.loader import load_config

    return load_config(
        str(CONFIG),
        [
            f"data.cache_dir={workdir / 'data'}",
            f"training.output_dir={workdir / 'runs'}",
            f"data.max_examples={POOL}",
            f"training.max_steps={STEPS}",
            "training.save_steps=1000000",  # a checkpoint's write time is not training throughput
            *overrides,
        ],
    )


class Meter:
    """A TrainerCallback (duck-typed, so this file imports without transformers) that times training from its
    first step's start to the end, and counts the non-padding tokens the model's forward sees in training."""

    def __init__(self):
        self.tokens, self.started, self.seconds, self.hooked = 0, None, None, False

    def _count(self, module, args, kwargs):
        if module.training:
            mask = kwargs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.hooked:
            model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.hooked = True
        self.started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.started

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def held_out_loss(model, tokenizer, examples: list[dict], bf16: bool) -> float:
    """Mean loss over the assistant tokens of examples (padded batches of 8, the path's precision)."""
    import torch

    from codetune.core.families.causal_lm import CausalLMCollator

    collate = CausalLMCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(examples), 8):
            batch = collate(examples[i : i + 8])
            labels = batch.pop("labels")
            batch.pop("shift_labels")
            logits = model(**batch).logits.float()
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            total += float(losses)
            count += int((labels != -100).sum())
    return total / count


def conversations(cfg, split: str) -> list[list[dict]]:
    from codetune.core.data import prepare_data
    from codetune.core.families import family_of
    from codetune.core.families.templates import with_system

    rows = prepare_data(cfg.data, family_of(cfg.model).examples).load(split)
    return [with_system(r["messages"], cfg.chat.system_prompt) for r in rows]


def held_out_examples(cfg, tokenizer) -> list[dict]:
    from codetune.core.families import family_of

    rows = [{"messages": m} for m in conversations(cfg, "validation")[:HELD_OUT]]
    return family_of(cfg.model).tokenize(rows, tokenizer, cfg)


def packed_rows(cfg, tokenizer) -> int:
    """Packed rows per batch that hold about as many tokens as a padded batch's conversations: the same steps then
    see about the same conversations, and their held-out losses compare."""
    from codetune.core.families import family_of

    rows = [{"messages": m} for m in conversations(cfg, "train")[:400]]
    examples = family_of(cfg.model).tokenize(rows, tokenizer, cfg)
    mean = sum(len(e["input_ids"]) for e in examples) / len(examples)
    budget = cfg.training.max_source_length + cfg.training.max_target_length
    return max(1, round(cfg.training.per_device_train_batch_size * mean / budget))


def train_codetune(workdir: Path, packed: bool) -> dict:
    from codetune.core import pipeline
    from codetune.core.families import family_of
    from codetune.core.model import load_exported, load_pretrained
    from codetune.core.precision import resolve_precision
    from codetune.core.training import train_model

    cfg = bench_config(workdir)
    if packed:
        rows = packed_rows(cfg, load_pretrained(cfg.model)[1])
        cfg = bench_config(workdir, "training.packing=true", f"training.per_device_train_batch_size={rows}")
    family = family_of(cfg.model)
    meter = Meter()
    trained = train_model(cfg, pipeline.prepare(cfg, family), family, callbacks=[meter])
    model, tokenizer = load_exported(trained.run_dir)
    bf16 = resolve_precision(cfg)[0]
    result = figures(meter, held_out_loss(model, tokenizer, held_out_examples(cfg, tokenizer), bf16), bf16)
    return result | {"batch": cfg.training.per_device_train_batch_size}


def train_trl(workdir: Path, variant: str) -> dict:
    from datasets import Dataset
    from trl import SFTTrainer

    from codetune.core.families import family_of
    from codetune.core.model import load_pretrained
    from codetune.core.precision import resolve_precision

    cfg = bench_config(workdir)
    family = family_of(cfg.model)
    model, tokenizer = load_pretrained(cfg.model)
    family.add_tokens(model, tokenizer)
    held_out = held_out_examples(cfg, tokenizer)  # through SmolLM2's own template, before TRL's replaces it
    own_template, tokenizer.chat_template = tokenizer.chat_template, MARKED_CHATML
    bf16 = resolve_precision(cfg)[0]
    fast = variant != "trl-documented"
    args = trl_arguments(
        cfg,
        workdir / "trl",
        STEPS,
        assistant_only_loss=True,
        bf16=bf16,
        use_cpu=True,
        **({"per_device_train_batch_size": packed_rows(cfg, tokenizer)} if variant == "trl-packed" else {}),
        **({"gradient_checkpointing": False} if fast else {}),
        **({"train_sampling_strategy": "group_by_length"} if variant == "trl-padded" else {}),
        **({"packing": True} if variant == "trl-packed" else {}),
    )
    lora = trl_lora(cfg, family, model)
    train = Dataset.from_list([{"messages": m} for m in conversations(cfg, "train")])
    meter = Meter()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora, callbacks=[meter]
    )
    if variant != "trl-packed":  # packs are checked through the unpacked variants' rows, which they are made of
        same_as_codetune(trainer.train_dataset, cfg, tokenizer, own_template)
    trainer.train()
    return figures(meter, held_out_loss(trainer.model, tokenizer, held_out, bf16), bf16) | {
        "batch": args.per_device_train_batch_size
    }


def trl_arguments(cfg, output_dir: Path, steps: int, **variant):
    """SFTConfig sharing codetune's optimiser, schedule, batch, length and seed, with a variant's own settings."""
    from trl import SFTConfig

    t = cfg.training
    shared = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "learning_rate": t.learning_rate,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "warmup_steps": t.warmup_ratio,
        "lr_scheduler_type": t.lr_scheduler_type,
        "weight_decay": t.weight_decay,
        "max_length": t.max_source_length + t.max_target_length,
        "seed": t.seed,
        "data_seed": t.seed,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 10,
    }
    return SFTConfig(**(shared | variant))


def trl_lora(cfg, family, model):
    """codetune's LoRA (rank, alpha, dropout, target modules) as TRL takes it."""
    from peft import LoraConfig

    p = cfg.peft
    return LoraConfig(
        task_type=family.peft_task_type,
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=family.lora_targets(model),
    )


def same_as_codetune(tokenized, cfg, tokenizer, own_template: str) -> None:
    """TRL's tokens and assistant masks on the first conversations are codetune's (SmolLM2's own template, mask
    derived by rendering): otherwise the comparison would train on different things."""
    from codetune.core.families import family_of

    marked, tokenizer.chat_template = tokenizer.chat_template, own_template
    rows = [{"messages": m} for m in conversations(cfg, "train")[:16]]
    ours = family_of(cfg.model).tokenize(rows, tokenizer, cfg)
    tokenizer.chat_template = marked
    for mine, theirs in zip(ours, tokenized):
        masked = theirs["labels"]  # TRL 1.16 turns the assistant mask into labels, -100 elsewhere
        if (
            theirs["input_ids"][: len(mine["input_ids"])] != mine["input_ids"]
            or masked[: len(mine["labels"])] != mine["labels"]
        ):
            raise SystemExit("TRL's tokens or assistant mask differ from codetune's: the comparison would be unfair")


def figures(meter: Meter, loss: float, bf16: bool) -> dict:
    return {
        "seconds": round(meter.seconds, 2),
        "tokens": meter.tokens,
        "tokens_per_second": round(meter.tokens / meter.seconds, 1),
        "held_out_loss": round(loss, 4),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "dtype": "bfloat16" if bf16 else "float32",
    }


def run_worker(variant: str, workdir: Path) -> dict:
    """One variant in a fresh process; its last stdout line is the result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker '{variant}' failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(r: dict) -> str:
    trl_speeds = [v["tokens_per_second"] for k, v in r["variants"].items() if k.startswith("trl")]
    lines = [
        f"{r['cpu']} ({r['kernel_capability']}, {r['variants']['codetune']['dtype']}), {r['date']}: "
        f"{STEPS} steps, the same LoRA, learning rate and seed",
        "",
        "| variant | batch | tokens/s | vs TRL's fastest | held-out loss | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in r["variants"].items():
        ratio = v["tokens_per_second"] / max(trl_speeds)
        lines.append(
            f"| {VARIANTS[name]} | {v['batch']} | {v['tokens_per_second']:.1f} | {ratio:.2f}x "
            f"| {v['held_out_loss']:.4f} | {v['peak_memory_mb']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=VARIANTS)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--avx2", action="store_true", help="behave like an AVX2-only CPU: AVX2 kernels, fp32")
    args = parser.parse_args()
    if args.worker:
        if args.worker.startswith("codetune"):
            result = train_codetune(args.workdir, packed=args.worker == "codetune-packed")
        else:
            result = train_trl(args.workdir, args.worker)
        print(json.dumps(result))
        return
    if args.avx2 and "ATEN_CPU_CAPABILITY" not in os.environ:
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **AVX2_ENV}))

    import torch
    import trl

    from codetune.core.config.loader import load_config

    cfg = load_config(str(CONFIG), [])
    results = {
        "machine": machine_name() + ("-avx2-fp32" if args.avx2 else ""),
        "cpu": cpu_model(),
        "kernel_capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "model": cfg.model.name,
        "steps": STEPS,
        "batch": cfg.training.per_device_train_batch_size,
        "max_length": cfg.training.max_source_length + cfg.training.max_target_length,
        "held_out_conversations": HELD_OUT,
        "variants": {},
    }
    output = ROOT / "bench" / "results" / f"sft-{results['machine']}.json"
    if args.variants != list(VARIANTS) and output.exists():  # measuring some variants again: keep the others' figures
        earlier = json.loads(output.read_text())
        if (earlier["cpu"], earlier["date"], earlier["steps"]) == (results["cpu"], results["date"], STEPS):
            results["variants"] = earlier["variants"]
    with tempfile.TemporaryDirectory(prefix="codetune-sft-") as tmp:
        for variant in args.variants:
            results["variants"][variant] = run_worker(variant, Path(tmp))
            print(variant, results["variants"][variant], flush=True)
            output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    main()
