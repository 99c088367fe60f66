"""`codetune export --format gguf`: a trained decoder-only run as one GGUF file for llama.cpp, Ollama and LM Studio,
with a Modelfile, checked by loading the file back.

Written with gguf-py's GGUFWriter and SpecialVocab (llama.cpp's own writer; SpecialVocab reads merges, special token
ids and the chat template from the run directory as llama.cpp's converter does). What the converter adds for the
architectures codetune trains (Llama-style and Qwen2) is here: the tensor names (gguf's TensorNameMap), Llama's
rotary permutation of q and k, the pre-tokenizer name, and the end-of-turn token the run's generation config stops
at, so that llama.cpp stops where `codetune serve` does. The input is the run's merged export: base + adapter,
the weights evaluation scored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from codetune.core.config import GGUFPrecision
from codetune.core.errors import ModelError
from codetune.core.families.fill_in_middle import FimIds

log = logging.getLogger(__name__)


# llama.cpp's check of which pre-tokenizer (the regex split before BPE) a tokenizer uses: the sha256 of its ids for
# this text. Text and hashes from llama.cpp's convert_hf_to_gguf.py (MIT), for the tokenizers of the families
# codetune ships; another tokenizer is refused rather than written with a split llama.cpp would get wrong.
PRE_TOKENIZER_CHECK = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 to Qwen2.5(-Coder)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # StarCoder2
}


@dataclass(frozen=True)
class Architecture:
    gguf_name: str
    rotary_permuted: bool
    """Llama's q and k rows interleaved as llama.cpp's rotary embedding expects (Qwen2's are not)."""


ARCHITECTURES = {"llama": Architecture("llama", True), "qwen2": Architecture("qwen2", False)}


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    modelfile: Path
    precision: GGUFPrecision
    size_mb: float
    reload: dict
    """What loading the file back gave: logits against the export's, tokens and the end-of-turn token."""


def pre_tokenizer(tokenizer) -> str:
    found = sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK)).encode()).hexdigest()
    if found not in PRE_TOKENIZERS:
        raise ModelError(
            f"no llama.cpp pre-tokenizer is known for this tokenizer (check hash {found}); GGUF export supports the "
            f"tokenizers of {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
        )
    return PRE_TOKENIZERS[found]


def _permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary halves -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token and type, ids the tokenizer lacks (a padded embedding) as unused."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def end_of_turn(run_dir: Path) -> int:
    """The token generation stops at (generation_config.json: the chat template's end-of-turn token)."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(run_dir).eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def write_gguf(run_dir: Path, out: Path, precision: GGUFPrecision, name: str) -> None:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise ModelError(
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} decoders; this run is a {config.model_type}, "
            f"whose formats are the safetensors export in {run_dir} (transformers' from_pretrained) and the "
            "registered MLflow model"
        )
    arch = ARCHITECTURES[config.model_type]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(out, arch.gguf_name)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = {GGUFPrecision.f16: gguf.LlamaFileType.MOSTLY_F16, GGUFPrecision.q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_type[precision])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _tokens(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(run_dir, load_merges=True, n_vocab=config.vocab_size)
    # The end of the assistant's turn, as the run stops generating: a base whose EOS is another token would
    # otherwise never stop in llama.cpp (the eos token id is what it stops at; eot marks the turn's end too).
    special.special_token_ids["eos"] = special.special_token_ids["eot"] = end_of_turn(run_dir)
    special.add_to_gguf(writer, quiet=True)
    fim = FimIds.of(tokenizer)
    if fim:  # a completion model's fill-in-the-middle tokens: llama.cpp's infill endpoint reads them from here
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, fim.prefix)
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, fim.suffix)
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, fim.middle)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name.upper()], config.num_hidden_layers)
    quantized = {GGUFPrecision.f16: gguf.GGMLQuantizationType.F16, GGUFPrecision.q8_0: gguf.GGMLQuantizationType.Q8_0}
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the tied output from token_embd
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"no GGUF name for tensor {name} of a {config.model_type} model")
        if arch.rotary_permuted and name.endswith("q_proj.weight"):
            weight = _permute_rotary(weight, heads)
        elif arch.rotary_permuted and name.endswith("k_proj.weight"):
            weight = _permute_rotary(weight, kv_heads)
        data = weight.numpy()
        qtype = quantized[precision] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype is gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 wide
        writer.add_tensor(gguf_name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def modelfile(gguf_file: Path, tokenizer, system_prompt: str | None, max_new_tokens: int, eot: int) -> str:
    """Ollama's Modelfile: the weights, the stop token, the system prompt training used. Ollama takes the chat
    template from the GGUF's tokenizer.chat_template."""
    lines = [f"FROM ./{gguf_file.name}", f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(eot)}"']
    lines += [f"PARAMETER num_predict {max_new_tokens}", "PARAMETER temperature 0"]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"


def reload_check(run_dir: Path, gguf_file: Path) -> dict:
    """The GGUF loaded back by transformers' own GGUF reader beside the run's export: the same tokens for a chat
    turn (special tokens whole), the end-of-turn token, and the next-token choices on it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported, tokenizer = AutoModelForCausalLM.from_pretrained(run_dir), AutoTokenizer.from_pretrained(run_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    turn = [{"role": "user", "content": "Write a Python function that returns the larger of two numbers."}]
    text = (
        tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template
        else turn[0]["content"]
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = exported(ids).logits[0].float(), reloaded(ids).logits[0].float()
    return {
        "same_tokens": reloaded_tokenizer(text).input_ids == ids[0].tolist(),
        "end_of_turn": reloaded.generation_config.eos_token_id,
        "top1_agreement": round((want.argmax(-1) == got.argmax(-1)).float().mean().item(), 4),
        "max_logit_difference": round((want - got).abs().max().item(), 4),
    }


def gguf_path(run_dir: Path, precision: GGUFPrecision) -> Path:
    """Where a run directory's GGUF export is: runs/<run>/gguf/<run>-<precision>.gguf."""
    return run_dir / "gguf" / f"{run_dir.name}-{precision.value}.gguf"


def export_gguf(
    model_dir: Path,
    precision: GGUFPrecision,
    system_prompt: str | None,
    max_new_tokens: int,
    out_dir: Path | None = None,
    name: str | None = None,
) -> GGUFExport:
    """<out_dir>/<name>-<precision>.gguf and its Modelfile, written and loaded back; a run directory's go to
    runs/<run>/gguf/, under the run's name."""
    from transformers import AutoTokenizer

    out_dir, name = out_dir or model_dir / "gguf", name or model_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{precision.value}.gguf"  # gguf_path's, for a run directory
    partial = path.with_suffix(".gguf.partial")
    write_gguf(model_dir, partial, precision, name)
    partial.replace(path)  # a file llama.cpp finds is a whole one
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    modelfile_path = out_dir / "Modelfile"
    modelfile_path.write_text(modelfile(path, tokenizer, system_prompt, max_new_tokens, end_of_turn(model_dir)))
    reload = reload_check(model_dir, path)
    log.info("wrote %s (%.0f MB); loaded back: %s", path, path.stat().st_size / 1e6, reload)
    return GGUFExport(path, modelfile_path, precision, round(path.stat().st_size / 1e6, 1), reload)
