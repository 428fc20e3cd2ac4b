"""tools/export_hf.py: a trained checkpoint loads in transformers' LlamaForCausalLM and gives
our logits; keys are renamed only, a tied matrix is written once."""

import json

import pytest
import torch
from safetensors.torch import load_file

from data.formats import Tokenizer
from model import Llama, LlamaConfig
from nanowso.checkpoint import save_checkpoint
from tools import export_hf

transformers = pytest.importorskip("transformers")


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    import train
    from data.testbed.prepare import prepare
    root = tmp_path_factory.mktemp("testbed")
    prepare(str(root), seed=0, n_people=40)
    train.main(train.TrainConfig(dataset=str(root / "pretrain"), out_dir=str(root / "run"), batch_size=4, seq_len=32,
                                 max_iters=3, warmup_iters=1, eval_interval=3, eval_tokens=256, compile=False,
                                 device="cpu"))
    return root / "run" / "ckpt.pt"


def hf_logits(out_dir, idx):
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out_dir), attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        return hf, hf(torch.tensor(idx)).logits


def our_logits(state, cfg, idx):
    model = Llama(cfg)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(idx))[0]


def test_trained_tied_checkpoint_matches_transformers(trained_ckpt, tmp_path):
    ckpt = torch.load(trained_ckpt, weights_only=False)
    cfg = LlamaConfig.from_dict(ckpt["model_config"])
    assert cfg.tie_embeddings
    export_hf.export(str(trained_ckpt), str(tmp_path))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in tensors and len(tensors) == 2 + 9 * cfg.n_layers
    assert torch.equal(tensors["model.layers.1.mlp.gate_proj.weight"], ckpt["model"]["layers.1.feed_forward.w1.weight"])
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], ckpt["model"]["layers.0.attention.wq.weight"])
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    assert config["tie_word_embeddings"] is True and config["head_dim"] == cfg.head_dim
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": cfg.rope_theta}
    assert config["eos_token_id"] == config["bos_token_id"] == tokenizer.eot
    with open(tmp_path / "nanowso_tokenizer.json") as f:
        side = json.load(f)
    assert side["compact_vocab"] == tokenizer.compact_vocab and "compact testbed ids" in side["note"]

    idx = [tokenizer.encode("Alice Santos was born on October 2, 1995 in Dublin."), list(range(14))]
    idx = [row[:14] for row in idx]
    hf, theirs = hf_logits(tmp_path, idx)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(theirs, our_logits(ckpt["model"], cfg, idx), rtol=1e-4, atol=1e-4)


def test_untied_gqa_checkpoint_matches_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=64, ffn_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, rope_theta=500000.0,
                      max_seq_len=64, tie_embeddings=False)
    model = Llama(cfg)
    with torch.no_grad():  # non-trivial norm gains, so a swapped norm would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_config": cfg.to_dict(),
                                           "tokenizer": Tokenizer(list(range(300))).to_dict()})
    export_hf.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(tensors["lm_head.weight"], model.output.weight)
    idx = torch.randint(0, 300, (2, 20)).tolist()
    _, theirs = hf_logits(tmp_path / "hf", idx)
    torch.testing.assert_close(theirs, our_logits(model.state_dict(), cfg, idx), rtol=1e-4, atol=1e-4)


def test_unknown_key_is_an_error():
    with pytest.raises(KeyError, match="no Hugging Face name"):
        export_hf.hf_key("layers.0.attention.wqkv.weight")


@pytest.fixture(scope="module")
def full_vocab_exports(tmp_path_factory):
    """A small model on the full cl100k vocabulary, exported as a pre-trained and as an SFT
    checkpoint."""
    root = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=16, ffn_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=100288, max_seq_len=64,
                      tie_embeddings=True)
    state = {"model": Llama(cfg).state_dict(), "model_config": cfg.to_dict(), "tokenizer": Tokenizer().to_dict()}
    for name, stage in (("pre", "pre"), ("sft", "sft")):
        save_checkpoint(root / f"{name}.pt", {**state, "config": {"stage": stage}})
        export_hf.export(str(root / f"{name}.pt"), str(root / name))
    return root


TEXTS = ["Cedric Nakamura was born in Krakow. He majored in Nursing.", "  two spaces,\n\nnew lines\n",
         "数字 123456 émigré naïve", "<|endoftext|>A document after the separator", "def f(x):\n    return x**2",
         "don't 'LL 've", "\t tabs\tand   runs   of spaces  "]


def test_full_vocab_export_has_a_tokenizer_that_equals_ours(full_vocab_exports):
    ours = Tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(str(full_vocab_exports / "pre"))
    assert hf.eos_token == hf.bos_token == "<|endoftext|>" and hf.eos_token_id == ours.eot
    for text in TEXTS:
        want = ours.enc.encode(text, allowed_special={"<|endoftext|>"})
        assert hf(text)["input_ids"] == want, text  # nothing added around the text
        assert hf.decode(want) == text
    assert hf.chat_template is None  # a pre-trained model has no chat format
    model = transformers.LlamaForCausalLM.from_pretrained(str(full_vocab_exports / "pre"))
    assert model.config.vocab_size == 100288


def test_sft_export_carries_the_tulu_chat_template(full_vocab_exports):
    from data.chat import generation_prompt, render
    ours = Tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(str(full_vocab_exports / "sft"))
    conversations = [
        [{"role": "user", "content": "Where was Cedric Nakamura born?"}, {"role": "assistant", "content": " Krakow"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a city."},
         {"role": "assistant", "content": "Lisbon"}]]
    for messages in conversations:
        ids, _ = render(messages, ours, max_len=1000)
        assert hf.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
        prompt = messages[:-1]
        assert hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                      return_dict=False) == generation_prompt(prompt, ours)


def test_compact_vocab_export_says_why_it_has_no_hf_tokenizer(trained_ckpt, tmp_path, capsys):
    export_hf.export(str(trained_ckpt), str(tmp_path))
    assert not (tmp_path / "tokenizer.json").exists()
    assert "no Hugging Face tokenizer is written" in capsys.readouterr().out
