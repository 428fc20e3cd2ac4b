"""sample.py: greedy sampling equals evaluate.py's decoding, top-k and temperature sample from
the right set, a seed repeats a sample, the text streams as generated, the chat template, and the
compact vocabulary's clear error."""

import io

import pytest
import torch

import sample
from data.chat import generation_prompt
from data.formats import Tokenizer
from model import Llama, LlamaConfig
from nanowso import scoring
from nanowso.checkpoint import save_checkpoint
from nanowso.common import parse_args


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tokenizer = Tokenizer.covering(["Alice was born in Lisbon.", "Where was Alice born?", "<|user|> <|assistant|>\n"])
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=32, ffn_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size + 3,
                      max_seq_len=24)
    path = str(tmp_path_factory.mktemp("sample") / "ckpt.pt")
    save_checkpoint(path, {"model": Llama(cfg).state_dict(), "model_config": cfg.to_dict(),
                           "tokenizer": tokenizer.to_dict(), "config": {}, "step": 0})
    return path, tokenizer


def run(ckpt, *args):
    out = io.StringIO()
    texts = sample.main(parse_args(sample.SampleConfig, [f"--ckpt={ckpt[0]}", "--device=cpu", *args]), out)
    return texts, out.getvalue()


def test_greedy_equals_evaluate_decoding_and_streams(ckpt):
    path, tokenizer = ckpt
    texts, shown = run(ckpt, "--prompt=Alice was born in", "--temperature=0", "--max_new_tokens=30")
    model = sample.load_model(torch.load(path, weights_only=False))
    ids = [tokenizer.eot] + tokenizer.encode("Alice was born in")  # 30 new tokens: past max_seq_len 24
    want = scoring.greedy_generate_batch(model, [ids], 30, tokenizer.eot, tokenizer.vocab_size, use_cache=False)[0]
    assert texts == [tokenizer.decode(want)]
    assert shown == "Alice was born in" + texts[0] + "\n"  # what streamed is the prompt and the sample
    assert run(ckpt, "--prompt=Alice was born in", "--top_k=1", "--max_new_tokens=30")[0] == texts  # top-1 is greedy


def test_samples_repeat_with_a_seed_and_stay_in_the_top_k(ckpt, monkeypatch):
    path, tokenizer = ckpt
    a = run(ckpt, "--prompt=Alice", "--num_samples=3", "--seed=1", "--temperature=1.5", "--top_k=5")[0]
    assert a == run(ckpt, "--prompt=Alice", "--num_samples=3", "--seed=1", "--temperature=1.5", "--top_k=5")[0]
    assert len(set(a)) > 1  # different samples from one generator
    model = sample.load_model(torch.load(path, weights_only=False))
    prompt = [tokenizer.eot] + tokenizer.encode("Alice")
    tokens = list(sample.sample(model, prompt, 12, 1.5, 3, torch.Generator().manual_seed(0),
                                vocab_size=tokenizer.vocab_size))
    ids = list(prompt)
    for token in tokens:  # every sampled token is among the 3 most likely after what came before
        logits = model(torch.tensor([ids]))[0][0, -1, :tokenizer.vocab_size]
        assert token in logits.topk(3).indices.tolist()
        ids.append(token)


def test_chat_prompt_and_unknown_words(ckpt, monkeypatch):
    path, tokenizer = ckpt
    seen = []
    real = sample.sample

    def record(model, prompt_ids, *args, **kwargs):
        seen.append(prompt_ids)
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(sample, "sample", record)
    run(ckpt, "--prompt=Where was Alice born?", "--chat=true", "--max_new_tokens=3")
    assert seen[0] == generation_prompt([{"role": "user", "content": "Where was Alice born?"}], tokenizer)
    with pytest.raises(SystemExit, match="has no token for ' Bob'"):
        run(ckpt, "--prompt=Where was Bob born?")
