"""
Export a checkpoint as a Hugging Face `LlamaForCausalLM` directory, so transformers,
lm-evaluation-harness and vLLM can load the paper's models (transformers'
LlamaConfig and modeling_llama.py name the keys written here).

    python tools/export_hf.py --ckpt=out/ckpt.pt --out_dir=hf/
    python -c "from transformers import LlamaForCausalLM; LlamaForCausalLM.from_pretrained('hf/')"

Writes out_dir/config.json, out_dir/model.safetensors and out_dir/nanowso_tokenizer.json, and
for a model on the full cl100k vocabulary a Hugging Face tokenizer (tokenizer.json,
tokenizer_config.json: <|endoftext|> as bos and eos, and for an SFT checkpoint the tulu chat
template), so `AutoTokenizer.from_pretrained(out_dir)`, `lm_eval --model hf` and vLLM load the
export as it is. A compact (testbed) vocabulary has no exact Hugging Face form: its tokenizer
runs cl100k's BPE and spells the tokens it lacks in bytes, which a BPE restricted to the
compact tokens would merge differently; nanowso_tokenizer.json describes it instead.
model.py already rotates halves (`rotate_half`) as Hugging Face does, so the export only
renames keys: no weight is permuted. A tied output matrix is written once, as the
embedding, and lm_head is left out (tie_word_embeddings). Token ids are the checkpoint's
own: cl100k_base ids, or for the testbed's compact vocabulary compact ids, whose cl100k
ids nanowso_tokenizer.json lists (`compact_vocab`, position = HF id).
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# Runnable as `python tools/<name>.py` (or `python -m tools.<name>`): the repo root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.formats import Tokenizer
from model import LlamaConfig
from nanowso.checkpoint import load_checkpoint
from nanowso.common import parse_args

# Meta's Llama names (model.py) -> Hugging Face's, per layer and for the whole model
LAYER_KEYS = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
MODEL_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


@dataclass
class ExportConfig:
    ckpt: str = "out/ckpt.pt"  # checkpoint from train.py or sft.py
    out_dir: str = "hf"  # written: config.json, model.safetensors, nanowso_tokenizer.json
    dtype: str = "float32"  # float32 | bfloat16 (the paper trains in bf16; checkpoints hold fp32)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; choose float32 or bfloat16")


def hf_key(key):
    if key in MODEL_KEYS:
        return MODEL_KEYS[key]
    parts = key.split(".", 2)  # layers, N, <module>.weight
    if len(parts) == 3 and parts[0] == "layers" and parts[2].removesuffix(".weight") in LAYER_KEYS:
        return f"model.layers.{parts[1]}.{LAYER_KEYS[parts[2].removesuffix('.weight')]}.weight"
    raise KeyError(f"no Hugging Face name for checkpoint key {key!r}")


def hf_state_dict(state_dict, cfg: LlamaConfig, dtype):
    """Renamed tensors; with tied embeddings the shared matrix appears once."""
    return {hf_key(k): v.to(dtype).contiguous() for k, v in state_dict.items()
            if not (cfg.tie_embeddings and k == "output.weight")}


def hf_config(cfg: LlamaConfig, tokenizer: Tokenizer, dtype):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        # documents start with <|endoftext|> and end with it (data/formats.py): it is both
        "bos_token_id": tokenizer.eot, "eos_token_id": tokenizer.eot, "torch_dtype": dtype,
    }


# open-instruct's CHAT_TEMPLATES["tulu"] (open_instruct/dataset_transformation.py), which
# data/chat.py renders by hand.
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}")


def bytes_to_unicode():
    """GPT-2's byte-level alphabet: each byte as a printable character (Hugging Face's
    ByteLevel pre-tokenizer and decoder use the same table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tokenizer_json(enc):
    """tiktoken's encoding as a Hugging Face tokenizer.json: byte-level BPE whose vocabulary is
    the ranks and whose merges are, for each token, its splits into two tokens, in rank order
    (transformers' convert_slow_tokenizer.TikTokenConverter builds them the same way); the
    encoding's own split regex; its special tokens as added tokens."""
    ranks = enc._mergeable_ranks  # bytes -> id
    to_text = bytes_to_unicode()

    def text(b):
        return "".join(to_text[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(ranks[left], ranks[right], rank, left, right) for left, right in splits]
    merges.sort(key=lambda m: (m[2], m[0], m[1]))
    special = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  # the special tokens too, at their ids: added tokens outside the vocabulary
                  # would be numbered after it (100256, ...) instead
                  "vocab": {**{text(t): i for t, i in ranks.items()}, **dict(special)},
                  "merges": [[text(left), text(right)] for *_, left, right in merges]},
    }


def tokenizer_config(sft):
    """tokenizer_config.json: documents start and end with <|endoftext|> (data/formats.py), so it
    is bos, eos and the padding id; nothing is added around a text (the harness adds nothing,
    and evaluate.py scores as it does)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
    if sft:
        config["chat_template"] = TULU_TEMPLATE
    return config


def export(ckpt_path, out_dir, dtype="float32"):
    ckpt = load_checkpoint(ckpt_path)
    cfg = LlamaConfig.from_dict(ckpt["model_config"])
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    os.makedirs(out_dir, exist_ok=True)
    tensors = hf_state_dict(ckpt["model"], cfg, getattr(torch, dtype))
    weights = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; as its siblings (and open()) would
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg, tokenizer, dtype), f, indent=2)
    compact = tokenizer.compact_vocab is not None
    note = ("token ids are compact testbed ids, not cl100k ids: HF id i is cl100k id compact_vocab[i]"
            if compact else "token ids are cl100k_base ids")
    with open(os.path.join(out_dir, "nanowso_tokenizer.json"), "w") as f:
        json.dump({"note": note, **tokenizer.to_dict()}, f)
    if not compact:
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            json.dump(tokenizer_json(tokenizer.enc), f, ensure_ascii=False)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config(ckpt.get("config", {}).get("stage") == "sft"), f, indent=2)
    else:
        note += ("; no Hugging Face tokenizer is written: a compact vocabulary spells the cl100k tokens it lacks "
                 "in bytes, which no BPE over its tokens reproduces exactly")
    print(f"wrote {out_dir}: {len(tensors)} tensors ({dtype}), vocab_size {cfg.vocab_size} "
          f"(tokenizer {tokenizer.vocab_size}; rows beyond it are padding)")
    print(f"note: {note} (see {os.path.join(out_dir, 'nanowso_tokenizer.json')})")
    return tensors


if __name__ == "__main__":
    cfg = parse_args(ExportConfig, description=__doc__)
    export(cfg.ckpt, cfg.out_dir, cfg.dtype)
