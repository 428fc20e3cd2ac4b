"""
Sample from a checkpoint (nanoGPT's sample.py): temperature and top-k sampling with a KV
cache, the text streamed to the terminal as it is generated.

    python sample.py --ckpt=out/ckpt.pt --prompt="Alice Lindqvist was born in"
    python sample.py --ckpt=out-sft/lr_0.00056/ckpt.pt --chat=true --prompt="Where was Alice born?"
    python sample.py --ckpt=out/ckpt.pt --num_samples=3 --temperature=0.8 --top_k=50 --seed=1
    python sample.py --ckpt=out/ckpt.pt --temperature=0     # greedy, as evaluate.py decodes

--chat=true renders the prompt as one user turn with the tulu chat template (data/chat.py) and
stops at the end-of-text token, as an SFT checkpoint answers; without it the prompt is plain
text continued for max_new_tokens (or to end-of-text).
"""

import sys
from dataclasses import dataclass

import torch

from data.chat import generation_prompt
from data.formats import Tokenizer
from model import KVCache
from nanowso.checkpoint import load_checkpoint, load_model
from nanowso.common import parse_args
from nanowso.runtime import resolve_device


@dataclass
class SampleConfig:
    ckpt: str = "out/ckpt.pt"  # a checkpoint of train.py, sft.py or tools/merge.py
    prompt: str = ""  # the text to continue (with --chat: the user's message)
    chat: bool = False  # the tulu chat template around the prompt; stop at end-of-text
    num_samples: int = 1
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0: greedy (the most likely token each step)
    top_k: int = 200  # sample among the k most likely tokens; 0: all
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("temperature and top_k must be >= 0, num_samples and max_new_tokens >= 1")


def check_encodable(text, tokenizer):
    """A compact vocabulary (the testbed's) spells a token it lacks in bytes the model never saw
    in that order: refuse such a prompt and name the words."""
    if tokenizer.compact_vocab is None:
        return
    known = set(tokenizer.compact_vocab)
    unknown = [tokenizer.enc.decode([t]) for t in tokenizer.enc.encode_ordinary(text) if t not in known]
    if unknown:
        raise SystemExit(f"error: the checkpoint's vocabulary (its training data's {tokenizer.vocab_size} tokens) "
                         f"has no token for {', '.join(repr(u) for u in dict.fromkeys(unknown))}; use words of "
                         f"its training text (the testbed's biographies and questions)")


@torch.no_grad()
def sample(model, prompt_ids, max_new_tokens, temperature, top_k, generator, stop_id=None, vocab_size=None):
    """Yield new token ids one at a time: the prompt once through the model into a KVCache,
    then one position per token. Past max_seq_len the most recent tokens are recomputed."""
    model.eval()
    device, max_len = next(model.parameters()).device, model.config.max_seq_len
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache(model.config.n_layers, max_len) if ids.shape[1] < max_len else None
    logits, _ = model(ids[:, -max_len:], cache=cache)
    for _ in range(max_new_tokens):
        last = logits[0, -1, :vocab_size].float()  # the embedding's padding rows are no tokens
        if temperature == 0:
            token = int(last.argmax())
        else:
            last = last / temperature
            if top_k:
                kth = torch.topk(last, min(top_k, last.numel())).values[-1]
                last = last.masked_fill(last < kth, float("-inf"))
            token = int(torch.multinomial(last.softmax(-1), 1, generator=generator))
        if token == stop_id:
            return
        yield token
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        if cache is not None and ids.shape[1] <= max_len:
            logits, _ = model(ids[:, -1:], cache=cache)
        else:
            cache = None
            logits, _ = model(ids[:, -max_len:])


def main(cfg, out=sys.stdout):
    ckpt = load_checkpoint(cfg.ckpt)
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    check_encodable(cfg.prompt, tokenizer)
    if cfg.chat:
        prompt_ids = generation_prompt([{"role": "user", "content": cfg.prompt}], tokenizer)
    else:
        prompt_ids = [tokenizer.eot] + tokenizer.encode(cfg.prompt)  # documents follow end-of-text in training
    model = load_model(ckpt, resolve_device(cfg.device))
    generator = torch.Generator(next(model.parameters()).device).manual_seed(cfg.seed)
    texts = []
    for i in range(cfg.num_samples):
        out.write(("" if i == 0 else "\n---------------\n") + cfg.prompt)
        new, shown = [], ""
        for token in sample(model, prompt_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator,
                            stop_id=tokenizer.eot, vocab_size=tokenizer.vocab_size):
            new.append(token)
            text = tokenizer.decode(new)
            if not text.endswith("\ufffd"):  # a character split over tokens waits for its last byte
                out.write(text[len(shown):])
                out.flush()
                shown = text
        text = tokenizer.decode(new)
        out.write(text[len(shown):] + "\n")
        out.flush()
        texts.append(text)
    return texts


if __name__ == "__main__":
    main(parse_args(SampleConfig, description=__doc__))
