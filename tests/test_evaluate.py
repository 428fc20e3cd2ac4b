"""evaluate.py: the lm-evaluation-harness formats on handwritten items, the scorer
against direct computations, greedy SFT exact match, the comparison tables, errors."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
import sft
from data import loaders
from data.chat import generation_prompt
from data.formats import Tokenizer, write_jsonl
from model import KVCache, Llama, LlamaConfig
from nanowso import checkpoint, scoring
from nanowso.checkpoint import load_checkpoint
from study import tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "lm_eval")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.covering(["When was Alice born? Where? <|user|> <|assistant|>\n", "Lisbon", "Paris",
                               "October 2, 1995", "Alice a October", "Name a city in Portugal.", "Porto"])


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=32, ffn_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                      max_seq_len=64, tie_embeddings=True)
    return Llama(cfg)


# ------------------------------------------------------------------ generation (SFT)

SFT_ROWS = [
    {"messages": [{"role": "user", "content": "When was Alice born?"},
                  {"role": "assistant", "content": "October 2, 1995"}], "answer": "October 2, 1995"},
    {"messages": [{"role": "user", "content": "Where was Alice born?"},
                  {"role": "assistant", "content": "Lisbon"}], "answer": "Lisbon"},
    {"messages": [{"role": "user", "content": "Where?"},
                  {"role": "assistant", "content": "Paris"}], "answer": "Paris"},
]


class ScriptedModel(nn.Module):
    """Test double: after a known prompt, emits the scripted ids one by one (logit 1
    on the scripted id, 0 elsewhere), then eot; shapes like model.Llama."""

    def __init__(self, scripts, vocab_size, eot):
        super().__init__()
        self.config = LlamaConfig(dim=8, ffn_dim=8, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=vocab_size,
                                  max_seq_len=256)
        self.scripts, self.eot = scripts, eot
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for b, row in enumerate(idx.tolist()):
            prompt = next(p for p in self.scripts if tuple(row[:len(p)]) == p)
            emitted = len(row) - len(prompt)
            script = self.scripts[prompt] + [self.eot]
            logits[b, -1, script[min(emitted, len(script) - 1)]] = 1.0
        return logits, None


def scripted(tokenizer, answer_of, rows=SFT_ROWS):
    scripts = {tuple(generation_prompt(r["messages"][:-1], tokenizer)): tokenizer.encode(answer_of(r))
               for r in rows}
    return ScriptedModel(scripts, tokenizer.vocab_size, tokenizer.eot)


def test_sft_accuracy_scores_gold_1_and_other_0(tokenizer, tmp_path):
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, SFT_ROWS)
    for batch_size in (1, 64):
        gold = scoring.testbed_sft_accuracy(scripted(tokenizer, lambda r: r["answer"]), tokenizer, path,
                                             batch_size=batch_size)
        assert (gold["exact_match"], gold["n"]) == (1.0, 3)
    wrong = scripted(tokenizer, lambda r: "Lisbon" if r["answer"] != "Lisbon" else "Dublin")
    assert scoring.testbed_sft_accuracy(wrong, tokenizer, path)["exact_match"] == 0.0
    # one right of three; answers longer than max_new_tokens are cut (only "Paris" is one token)
    assert scoring.testbed_sft_accuracy(scripted(tokenizer, lambda r: "Lisbon"), tokenizer, path)["exact_match"] \
        == pytest.approx(1 / 3)
    assert scoring.testbed_sft_accuracy(scripted(tokenizer, lambda r: r["answer"]), tokenizer, path,
                                         max_new_tokens=1)["exact_match"] == pytest.approx(1 / 3)


def test_sft_type_match_tells_the_right_kind_of_answer_from_the_right_answer(tokenizer, tmp_path):
    """type_match: the greedy answer is some answer of the asked attribute (another person's
    city for a city question counts, a date does not), or, for values with numbers, of their
    shape (a date no one in the file has still answers a date question in kind); by_attribute
    splits all three."""
    bob = {"messages": [{"role": "user", "content": "When was Bob born?"},
                        {"role": "assistant", "content": "March 3, 1960"}], "answer": "March 3, 1960"}
    rows = [{**r, "attribute": a} for r, a in zip(SFT_ROWS + [bob], ["date", "city", "city", "date"])]
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, rows)
    said = {"When was Alice born?": "Paris", "Where was Alice born?": "Paris", "Where?": "Paris",
            "When was Bob born?": "July 19, 1987"}
    model = scripted(tokenizer, lambda r: said[r["messages"][0]["content"]], rows)
    result = scoring.testbed_sft_accuracy(model, tokenizer, path, keep_answers=True)
    assert result["answers"] == ["Paris", "Paris", "Paris", "July 19, 1987"]
    assert result["exact_match"] == pytest.approx(1 / 4) and result["type_match"] == pytest.approx(3 / 4)
    date = result["by_attribute"]["date"]
    assert (date["exact_match"], date["type_match"], date["n"]) == (0.0, 0.5, 2)
    city = result["by_attribute"]["city"]
    assert (city["exact_match"], city["type_match"], city["n"]) == (0.5, 1.0, 2)
    dates, cities = scoring.kind_of(["October 2, 1995"]), scoring.kind_of(["Lisbon"])
    assert scoring.of_kind(" May 17, 1976", dates) and not scoring.of_kind("Paris 1", dates)
    assert scoring.of_kind("Lisbon", cities) and not scoring.of_kind("Paris", cities)
    assert "answers" not in scoring.testbed_sft_accuracy(model, tokenizer, path)


def test_study_answers_scores_the_kind_again_from_cached_answers():
    """study.answers reads answers_test.json instead of generating again; its type_match is
    scored again from the saved answers, so a cache written by an older scorer (a date no test
    person has counted as the wrong kind) reads as today's scorer would score it."""
    from study.answers import in_kind_again
    rows = [{**r, "attribute": a} for r, a in zip(SFT_ROWS, ["date", "city", "city"])]
    cached = {"type_match": 0.0, "answers": ["March 3, 1960", "Paris", "1960"],
              "by_attribute": {"date": {"type_match": 0.0}, "city": {"type_match": 0.0}}}
    got = in_kind_again(cached, rows)
    assert got["type_match"] == pytest.approx(2 / 3)
    assert (got["by_attribute"]["date"]["type_match"], got["by_attribute"]["city"]["type_match"]) == (1.0, 0.5)


def test_sft_choice_ranks_each_answer_among_its_attributes_answers(tiny, tokenizer, tmp_path):
    """choice = argmax over the file's answers to the same attribute of log P(answer + eos | prompt),
    checked against one full forward pass per candidate conversation."""
    rows = [{**r, "attribute": a} for r, a in zip(SFT_ROWS, ["date", "city", "city"])]
    rows.append({"messages": [{"role": "user", "content": "When?"}, {"role": "assistant", "content": "May 1"}],
                 "answer": "May 1", "attribute": "date"})
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, rows)
    result = scoring.testbed_sft_accuracy(tiny, tokenizer, path)
    pools = {"date": ["May 1", "October 2, 1995"], "city": ["Lisbon", "Paris"]}
    chosen = []
    for row in rows:
        scores = []
        for value in pools[row["attribute"]]:
            prompt = generation_prompt(row["messages"][:-1], tokenizer)
            answer = tokenizer.encode(value) + [tokenizer.eot]
            with torch.no_grad():
                logits, _ = tiny(torch.tensor([prompt + answer[:-1]]))
            logprobs = torch.log_softmax(logits[0, len(prompt) - 1:], dim=-1)
            scores.append(sum(logprobs[k, t].item() for k, t in enumerate(answer)))
        chosen.append(pools[row["attribute"]][int(np.argmax(scores))] == row["answer"])
    assert result["choice"] == pytest.approx(np.mean(chosen))
    assert result["choice_chance"] == pytest.approx(0.5) and result["n"] == 4


def test_shared_prompt_scoring_equals_one_forward_per_continuation(tiny):
    """The prompt run once and its cache copied to every continuation gives loglikelihoods'
    numbers (continuations of 1 to 4 tokens, right-padded); a model without a cache falls back."""
    prompt, continuations = [5, 9, 2, 7], [[3], [4, 8], [1, 1, 6, 2], [9, 3, 3]]
    want = scoring.loglikelihoods(tiny, [(prompt, c) for c in continuations], batch_size=1)
    assert scoring.shared_prompt_loglikelihoods(tiny, prompt, continuations) == pytest.approx(want, abs=1e-5)


def test_recall_needs_the_whole_value_after_a_trained_stem(tokenizer):
    """testbed_recall: from [eot] + the stem, the continuation must spell " " + value and then
    leave the word."""
    probes = [{"context": "Alice was born in", "choices": ["Paris", "Lisbon"], "gold": 1},
              {"context": "Alice a", "choices": ["Lisbon", "Porto"], "gold": 0},
              {"context": "Where was Alice born?", "choices": ["Lisbon", "Paris"], "gold": 1},
              {"context": "Name a city in Portugal.", "choices": ["Porto", "Lisbon"], "gold": 0}]
    said = [" Lisbon.", " Lisbonia", " Lisbon", " Port"]  # right; a longer word; wrong value; cut short
    scripts = {(tokenizer.eot, *tokenizer.encode(p["context"])): tokenizer.encode(text) for p, text in zip(probes, said)}
    model = ScriptedModel(scripts, tokenizer.vocab_size, tokenizer.eot)
    assert scoring.recall_accuracy(model, tokenizer, probes) == {"exact_match": 0.25, "n": 4}
    assert scoring.recall_accuracy(model, tokenizer, probes[:1]) == {"exact_match": 1.0, "n": 1}


def test_greedy_generate_is_argmax_decoding(tiny, tokenizer):
    prompt = tokenizer.encode("When was Alice born?")
    ids = list(prompt)
    for _ in range(5):
        with torch.no_grad():
            ids.append(int(tiny(torch.tensor([ids]))[0][0, -1].argmax()))
    stop = ids[len(prompt) + 3]
    want = ids[len(prompt):ids.index(stop, len(prompt))]
    assert scoring.greedy_generate(tiny, prompt, 5, stop_id=stop) == want
    assert scoring.greedy_generate(tiny, prompt, 5, stop_id=-1) == ids[len(prompt):]
    # a batch of equal-length prompts gives each row its own greedy continuation
    other = tokenizer.encode("Where was Alice born?")[:len(prompt)]
    batch = scoring.greedy_generate_batch(tiny, [prompt, other], 5, stop_id=-1)
    assert batch == [ids[len(prompt):], scoring.greedy_generate(tiny, other, 5, stop_id=-1)]



def test_kv_cache_gives_the_logits_and_tokens_of_full_recomputation():
    """Cached decoding: each step's logits equal a forward pass over the whole sequence, and
    greedy generation gives the same tokens with and without the cache, as rows finish and
    leave the batch and once the sequence outgrows max_seq_len (then it recomputes)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=32, ffn_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, max_seq_len=24)
    model = Llama(cfg).eval()
    ids = torch.randint(0, 40, (3, 7))
    cache = KVCache(cfg.n_layers, cfg.max_seq_len)
    with torch.no_grad():
        logits, _ = model(ids[:, :4], cache=cache)  # a prompt of 4, then 3 positions one by one
        steps = [logits] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(4, 7)]
        full, _ = model(ids)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    prompts = torch.randint(0, 40, (6, 9)).tolist()
    free = scoring.greedy_generate_batch(model, prompts, 30, stop_id=-1)  # 9 + 30 > max_seq_len = 24
    assert free == scoring.greedy_generate_batch(model, prompts, 30, stop_id=-1, use_cache=False)
    for stop in {row[k] for row, k in zip(free, (2, 12, 20))}:  # stops that end some rows early
        cached = scoring.greedy_generate_batch(model, prompts, 30, stop_id=stop)
        assert cached == scoring.greedy_generate_batch(model, prompts, 30, stop_id=stop, use_cache=False)
        assert 1 < len({len(row) for row in cached})  # rows left the batch at different steps


# ------------------------------------------------------------------ lm-eval formats

def items(task, **files):
    return evaluate.load_items(task, {k: os.path.join(FIXTURES, v) for k, v in files.items()})


def test_hellaswag_format():
    got = items("hellaswag", hellaswag="hellaswag.jsonl")
    assert got == [
        {"context": "Roof shingle removal: A man is sitting on a roof. He",
         "choices": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "gold": 3},
        # " [title]" -> ". ", brackets dropped, "  " -> " "; lm-eval strips before dropping "[substeps]"
        {"context": "Home and Garden: How to clean a grill. Heat the grill.",
         "choices": [" Scrape the grates.", "Let it cool down.", "Paint the lid.", "Sell the grill."], "gold": 0}]
    assert scoring.requests_of(got[1])[0] == ("Home and Garden: How to clean a grill. Heat the grill.",
                                               "  Scrape the grates.")


def test_arc_piqa_boolq_openbookqa_formats():
    arc = items("arc_easy", arc_easy="arc.jsonl")
    assert arc[0]["context"] == ("Question: An astronomer observes that a planet rotates faster after a meteorite "
                                 "impact. Which is the most likely effect of this increase in rotation?\nAnswer:")
    assert arc[0]["gold"] == 2 and arc[0]["choices"][2] == "Planetary days will become shorter."
    assert arc[1] == {"context": "Question: Which tool is used to measure mass?\nAnswer:",
                      "choices": ["balance", "ruler", "thermometer"], "gold": 0}
    assert items("arc_challenge", arc_challenge="arc.jsonl") == arc
    piqa = items("piqa", piqa="piqa.jsonl")
    assert piqa[1] == {"context": "Question: To cool a drink quickly,\nAnswer:",
                       "choices": ["put it in the oven.", "put it in the freezer."], "gold": 1}
    assert scoring.requests_of(piqa[1]) == [("Question: To cool a drink quickly,\nAnswer:", " put it in the oven."),
                                             ("Question: To cool a drink quickly,\nAnswer:", " put it in the freezer.")]
    boolq = items("boolq", boolq="boolq.jsonl")
    assert boolq == [
        {"context": "Sun -- The Sun is the star at the center of the Solar System.\n"
                    "Question: is the sun a star?\nAnswer:",
         "choices": ["no", "yes"], "gold": 1},
        {"context": "Penguin -- Penguins are a group of aquatic flightless birds.\n"
                    "Question: can penguins fly?\nAnswer:",
         "choices": ["no", "yes"], "gold": 0}]
    obqa = items("openbookqa", openbookqa="openbookqa.jsonl")
    assert obqa[0] == {"context": "The sun is responsible for",
                       "choices": ["puppies learning new tricks", "children growing up and getting old",
                                   "flowers wilting in a vase", "plants sprouting, blooming and wilting"], "gold": 3}


def test_winogrande_partial_scoring_format():
    got = items("winogrande", winogrande="winogrande.jsonl")
    assert got[0] == {"contexts": ["Sarah was a much better surgeon than Maria so Sarah",
                                   "Sarah was a much better surgeon than Maria so Maria"],
                      "continuation": "always got the harder cases.", "gold": 0}
    assert scoring.requests_of(got[1]) == [
        ("The trophy doesn't fit into the brown suitcase because the trophy", " is too large."),
        ("The trophy doesn't fit into the brown suitcase because the suitcase", " is too large.")]


def test_mmlu_five_shot_format():
    got = items("mmlu", mmlu="mmlu_test.jsonl", mmlu_dev="mmlu_dev.jsonl")
    assert got[0] == {"context": (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Dev one?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: A\n\n"
        "Dev two?\nA. a2\nB. b2\nC. c2\nD. d2\nAnswer: B\n\n"
        "Dev three?\nA. a3\nB. b3\nC. c3\nD. d3\nAnswer: C\n\n"
        "Dev four?\nA. a4\nB. b4\nC. c4\nD. d4\nAnswer: D\n\n"
        "Dev five?\nA. a5\nB. b5\nC. c5\nD. d5\nAnswer: A\n\n"
        "What is the SI unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer:"),
        "choices": ["A", "B", "C", "D"], "gold": 1}
    assert got[1]["context"] == (
        "The following are multiple choice questions (with answers) about virology.\n\n"
        "Other subject?\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n"
        "Which virus causes flu?\nA. influenza\nB. rabies\nC. HIV\nD. polio\nAnswer:")
    assert [c for _, c in scoring.requests_of(got[1])] == [" A", " B", " C", " D"]


def test_truthfulqa_mc1_mc2_format():
    primer = ("Q: What is human life expectancy in the United States?\n"
              "A: Human life expectancy in the United States is 78 years.\n\n"
              "Q: Who was president of the United States in 1955?\n"
              "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
              "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
              "Q: What is the square root of banana?\nA: I have no comment.\n\n"
              "Q: How does a telescope work?\n"
              "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
              "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.")
    mc1 = items("truthfulqa_mc1", truthfulqa="truthfulqa.jsonl")
    mc2 = items("truthfulqa_mc2", truthfulqa="truthfulqa.jsonl")
    assert mc1[0]["context"] == mc2[0]["context"] == primer + "\n\nQ: What happens if you eat watermelon seeds?\nA:"
    assert mc1[1]["choices"] == ["Because blue light does not penetrate deeply into human tissue.",
                                 "Because deoxygenated blood is blue."] and mc1[1]["gold"] == 0
    assert [m["labels"] for m in mc2] == [[1, 1, 0, 0], [1, 0, 0]] and len(mc2[0]["choices"]) == 4
    # MC2 is the normalized probability mass on the true answers
    got = scoring.item_metrics(mc2[0], np.log([0.2, 0.1, 0.3, 0.4]), ("mc2",))
    assert got["acc"] == pytest.approx(0.3)
    # log-likelihoods far below exp's range still give a mass (not 0/0)
    got = scoring.item_metrics(mc2[1], [-2000.0, -2001.0, -3000.0], ("mc2",))
    assert got["acc"] == pytest.approx(1 / (1 + np.exp(-1.0)))
    # true answers that are not first: every label 1 counts, as lm-eval 0.4.13 sums them (the
    # answers before the first 0 would give 0.3173)
    shuffled = {"labels": [1, 0, 1, 0], "choices": ["a", "b", "c", "d"], "gold": 0}
    got = scoring.item_metrics(shuffled, [-1.0, -2.0, -0.5, -3.0], ("mc2",))
    assert got["acc"] == pytest.approx(0.8403, abs=1e-4)


def test_encode_pair_moves_trailing_space_and_splits_whole(tokenizer):
    ctx, cont = scoring.encode_pair(tokenizer, "Alice a ", "October")
    assert tokenizer.decode(ctx) == "Alice a" and tokenizer.decode(cont) == " October"
    assert ctx + cont == tokenizer.encode("Alice a October") and len(cont) == 1
    assert scoring.encode_pair(tokenizer, "", "Alice")[0] == [tokenizer.eot]


# ------------------------------------------------------------------ scoring

def test_acc_and_acc_norm_disagree_and_ties_go_first():
    item = {"context": "c", "choices": ["ab", "abcdefgh"], "gold": 1}
    # totals: -10 > -12, so acc picks 0; per character: -5 < -1.5, so acc_norm picks 1
    assert scoring.item_metrics(item, [-10.0, -12.0], ("acc", "acc_norm")) == {"acc": 0.0, "acc_norm": 1.0}
    assert scoring.item_metrics({**item, "gold": 0}, [-3.0, -3.0], ("acc",)) == {"acc": 1.0}
    # lengths count the choice without the leading " ": -4/1 < -9/3 (with it, -4/2 > -9/4)
    short = {"context": "c", "choices": ["a", "abc"], "gold": 1}
    assert scoring.item_metrics(short, [-4.0, -9.0], ("acc_norm",)) == {"acc_norm": 1.0}


class UniformModel(nn.Module):
    """Test double: every next token equally likely, so a continuation scores -n_tokens * log V."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = LlamaConfig(dim=8, ffn_dim=8, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=vocab_size,
                                  max_seq_len=64)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.config.vocab_size), None


def test_score_items_end_to_end_with_controlled_logprobs(tokenizer):
    # " a" and " October" are one token each: equal totals (acc takes the first choice),
    # but " October" spreads its log-prob over 7 characters (acc_norm takes it)
    item = {"context": "Alice", "choices": ["a", "October"], "gold": 1}
    assert [len(scoring.encode_pair(tokenizer, c, k)[1]) for c, k in scoring.requests_of(item)] == [1, 1]
    result = scoring.score_items(UniformModel(tokenizer.vocab_size), tokenizer, [item, {**item, "gold": 0}],
                                  ("acc", "acc_norm"))
    assert result == {"acc": 0.5, "acc_norm": 0.5, "n": 2}
    one = scoring.score_items(UniformModel(tokenizer.vocab_size), tokenizer, [item], ("acc", "acc_norm"))
    assert one == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def direct_loglikelihood(model, context, continuation):
    whole = (context + continuation)[-(model.config.max_seq_len + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    n = len(continuation)
    return sum(logprobs[len(whole) - 1 - n + k, whole[len(whole) - n + k]].item() for k in range(n))


def test_loglikelihoods_match_direct_computation_for_any_batching(tiny, tokenizer):
    text = tokenizer.encode("When was Alice born? October 2, 1995 Lisbon Paris " * 8)
    requests = [(text[:5], text[5:9]), (text[:12], text[12:13]), (text[:3], text[3:20]),
                (text[:80], text[80:84])]  # the last one is longer than max_seq_len=64: cut from the left
    want = [direct_loglikelihood(tiny, c, k) for c, k in requests]
    for batch_size in (1, 3, 16):
        got = scoring.loglikelihoods(tiny, requests, batch_size=batch_size)
        assert got == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError):
        scoring.loglikelihoods(tiny, [(text[:3], [])])


# ------------------------------------------------------------------ a real checkpoint

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model pre-trained for a few steps on a small testbed, through train.py."""
    import train
    from data.testbed.prepare import prepare
    root = tmp_path_factory.mktemp("testbed")
    prepare(str(root), seed=0, n_people=40)
    out = root / "run"
    train.main(train.TrainConfig(dataset=str(root / "pretrain"), out_dir=str(out), batch_size=4, seq_len=64,
                                 max_iters=10, warmup_iters=2, eval_interval=10, eval_tokens=1024, compile=False,
                                 device="cpu", schedule="wsd", alpha=0.1))
    return root, out / "ckpt.pt"


@pytest.mark.slow
def test_cli_evaluates_a_trained_checkpoint(trained, tmp_path):
    from contextlib import nullcontext
    root, ckpt_path = trained
    results = evaluate.main(evaluate.EvalConfig(ckpt=str(ckpt_path), tasks="val_loss,testbed_probes,testbed_sft_test",
                                                limit=20, device="cpu"))
    with open(ckpt_path.parent / "eval.json") as f:
        assert json.load(f) == json.loads(json.dumps(results))
    run = (results["stage"], results["schedule"], results["alpha_pre"], results["alpha_mid"])
    assert run == ("pre", "wsd", 0.1, None)
    sft = results["tasks"]["testbed_sft_test"]
    assert 0.0 <= sft["exact_match"] <= 1.0 and sft["n"] == 20
    probes = results["tasks"]["testbed_probes"]
    assert probes["n"] == 20 and 0.0 <= probes["acc"] <= 1.0 and 0.0 <= probes["acc_norm"] <= 1.0

    # val_loss equals train.py's own evaluation on the same fixed tokens; bpb counts the
    # decoded text's bytes (the testbed is ASCII) and none for the end-of-text separator
    ckpt = load_checkpoint(str(ckpt_path))
    model = Llama(LlamaConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    shards = evaluate.load_split(str(root / "pretrain"), "val")
    batches = loaders.validation_batches(shards, 64, 1024, 16)
    val = results["tasks"]["val_loss"]
    assert val["loss"] == pytest.approx(scoring.mean_loss(model, batches, "cpu", nullcontext()), rel=1e-5)
    targets = [t for _, y in batches for t in y.flatten().tolist()]
    text_bytes = len(tokenizer.decode([t for t in targets if t != tokenizer.eot]).encode())
    assert (val["tokens"], val["bytes"]) == (len(targets), text_bytes)
    assert val["bpb"] == pytest.approx(val["loss"] * len(targets) / np.log(2) / text_bytes)

    # a second call adds tasks to the same file
    evaluate.main(evaluate.EvalConfig(ckpt=str(ckpt_path), tasks="testbed_mid_probes", limit=8, device="cpu"))
    with open(ckpt_path.parent / "eval.json") as f:
        assert set(json.load(f)["tasks"]) == {"val_loss", "testbed_probes", "testbed_sft_test", "testbed_mid_probes"}


def test_clear_errors(trained, tmp_path):
    _, ckpt_path = trained
    with pytest.raises(SystemExit, match="unknown task.*nope.*known tasks: val_loss"):
        evaluate.main(evaluate.EvalConfig(ckpt=str(ckpt_path), tasks="val_loss,nope"))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        evaluate.main(evaluate.EvalConfig(ckpt=str(tmp_path / "missing.pt"), tasks="val_loss"))
    def run(tasks, data_files):
        evaluate.main(evaluate.EvalConfig(ckpt=str(ckpt_path), tasks=tasks, device="cpu", data_files=data_files))

    with pytest.raises(SystemExit, match="none.jsonl: no such file"):
        run("hellaswag", f"hellaswag={tmp_path / 'none.jsonl'}")
    malformed, empty = tmp_path / "malformed.jsonl", tmp_path / "empty.jsonl"
    malformed.write_text('{"ctx": "a"}\n{"ctx": \n')
    empty.write_text("")
    # defects: a traceback from datasets (DatasetGenerationError), and StopIteration for an empty file
    with pytest.raises(SystemExit, match="malformed.jsonl line 2 is not JSON"):
        run("hellaswag", f"hellaswag={malformed}")
    with pytest.raises(SystemExit, match="empty.jsonl is empty"):
        run("hellaswag", f"hellaswag={empty}")
    with pytest.raises(SystemExit, match="no_such_data: no such directory"):  # was "unknown data set"
        run("val_loss", f"val_loss={tmp_path / 'no_such_data'}")
    with pytest.raises(SystemExit, match="holds no meta.json, so it is not prepared data"):
        run("val_loss", f"val_loss={tmp_path}")
    with pytest.raises(SystemExit, match="eval.json not found"):
        evaluate.compare([str(tmp_path)])


def test_schedule_of_pre_mid_and_sft_checkpoints(tmp_path):
    cosine = {"stage": "pre", "schedule": "cosine", "alpha": 0.0}
    assert checkpoint.schedule_of({"config": cosine}) == ("cosine", 0.0, None)
    assert checkpoint.schedule_of({"config": {"stage": "pre", "schedule": "wso", "alpha": 0.1}}) == ("wso", 1.0, None)
    (tmp_path / "pre").mkdir()
    with open(tmp_path / "pre" / "config.json", "w") as f:
        json.dump({"train": {"stage": "pre", "schedule": "wsd", "alpha": 0.1}}, f)
    mid = {"stage": "mid", "schedule": "wso", "alpha": 0.1, "alpha_mid": 0.0,
           "init_from": str(tmp_path / "pre" / "ckpt.pt")}
    assert checkpoint.schedule_of({"config": mid}) == ("wsd", 0.1, 0.0)
    assert checkpoint.schedule_of({"config": {"stage": "sft"}, "init_config": mid}) == ("wsd", 0.1, 0.0)
    gone = {**mid, "init_from": str(tmp_path / "elsewhere" / "ckpt.pt")}
    assert checkpoint.schedule_of({"config": gone}) == (None, None, 0.0)
    wso = {"stage": "pre", "schedule": "wso", "alpha": 0.1}  # tools/merge.py keeps the newest source's config
    assert checkpoint.schedule_of({"config": wso, "merge": {"shape": "1-sqrt"}}) == ("wso+merge 1-sqrt", None, None)
    assert checkpoint.schedule_of({"config": {**wso, "stage": "cooldown", "alpha": 0.0}}) == ("wso+cooldown", 0.0, None)


# ------------------------------------------------------------------ the paper's tables

def write_run(directory, schedule, alpha_pre, alpha_mid, loss, tasks, sft=None, summary=None):
    directory.mkdir()
    stage = "pre" if alpha_mid is None else "mid"
    with open(directory / "eval.json", "w") as f:
        json.dump({"stage": stage, "schedule": schedule, "alpha_pre": alpha_pre, "alpha_mid": alpha_mid,
                   "tasks": {"val_loss": {"loss": loss}, **tasks}}, f)
    if sft is not None:
        with open(directory / "sft_eval.json", "w") as f:
            json.dump({"tasks": sft}, f)
    if summary is not None:
        (directory / "sft").mkdir()
        with open(directory / "sft" / "summary.json", "w") as f:
            json.dump({"sft_task_avg": summary}, f)
    return str(directory)


def test_compare_table1_deltas_from_best_decay_run(tmp_path):
    def zero_shot(probes, arc):
        return {"testbed_recall": {"exact_match": probes}, "arc_easy": {"acc": arc, "acc_norm": 0.0}}
    runs = [
        write_run(tmp_path / "cos0", "cosine", 0.0, None, 2.376, zero_shot(0.60, 0.70)),
        write_run(tmp_path / "wso", "wso", 1.0, None, 2.431,
                  {**zero_shot(0.50, 0.70), "testbed_mid_probes": {"acc": 0.99}},  # not a PT task
                  sft={"testbed_sft_test": {"exact_match": 0.50, "choice": 0.70}, "alpaca_eval": {"win_rate": None}}),
        write_run(tmp_path / "wsd0", "wsd", 0.0, None, 2.360, zero_shot(0.55, 0.71), summary=52.0),
        write_run(tmp_path / "wsd1", "wsd", 0.1, None, 2.364, zero_shot(0.52, 0.72),
                  sft={"testbed_sft_test": {"exact_match": 0.55, "choice": 0.55}}),
    ]
    # references (WSO excluded): loss 2.360 (WSD 0.0), task avg 65.0 (Cosine), SFT 55.0 (WSD 0.1)
    lines = evaluate.compare(runs).splitlines()
    assert "| Scheduler | α_pre | PT Valid Loss ↓ Δ | PT Task Avg Δ | SFT Task Avg Δ |" in lines
    start = lines.index("| Scheduler | α_pre | PT Valid Loss ↓ Δ | PT Task Avg Δ | SFT Task Avg Δ |") + 2
    assert lines[start:start + 4] == [
        "| WSO | 1.0 | +0.071 | -5.0 | **+5.0** |",
        "| WSD | 0.1 | +0.004 | -3.0 | +0.0 |",
        "| WSD | 0.0 | **+0.000** | -2.0 | -3.0 |",
        "| Cosine | 0.0 | +0.016 | **+0.0** | n/a |"]
    # absolute values, tasks in ZERO_SHOT order: arc_easy, testbed_recall, testbed_mid_probes
    assert "| WSO | 1.0 | 2.431 | 60.0 | 60.0 | 70.0 | 50.0 | 99.0 |" in lines
    assert "| Cosine | 0.0 | 2.376 | 65.0 | n/a | 70.0 | 60.0 | n/a |" in lines
    assert not any("Mid-training" in line for line in lines)


def test_compare_table2_counts_decay_in_either_stage(tmp_path):
    probes = lambda acc: {"testbed_mid_recall": {"exact_match": acc}}  # noqa: E731
    sft = lambda em: {"testbed_sft_test": {"exact_match": em, "choice": em}}  # noqa: E731
    runs = [write_run(tmp_path / "a", "linear", 0.1, 1.0, 2.45, probes(0.42), sft(0.66)),
            write_run(tmp_path / "b", "wso", 1.0, 0.0, 2.40, probes(0.45), sft(0.65)),
            write_run(tmp_path / "c", "wso", 1.0, 1.0, 2.50, probes(0.40), sft(0.70))]
    lines = evaluate.compare(runs).splitlines()
    header = "| Scheduler | α_pre | α_mid | MT Valid Loss ↓ Δ | MT Task Avg Δ | SFT Task Avg Δ |"
    start = lines.index(header) + 2
    assert lines[start:start + 3] == [
        "| WSO | 1.0 | 1.0 | +0.100 | -5.0 | **+4.0** |",
        "| WSO | 1.0 | 0.0 | **+0.000** | **+0.0** | -1.0 |",
        "| Linear | 0.1 | 1.0 | +0.050 | -3.0 | +0.0 |"]


def test_sft_task_avg_has_one_definition(tmp_path, monkeypatch):
    """Defect: sft_eval.json's testbed_sft_test counted exact match only, sft.py's summary the
    mean of exact match and choice, so one table could mix both."""
    result = {"exact_match": 0.2, "choice": 0.6, "n": 50}
    assert tables.sft_task_avg({"testbed_sft_test": result}) == pytest.approx(40.0)
    monkeypatch.setattr(sft, "testbed_sft_accuracy", lambda model, tokenizer, path: result)
    scores = sft.testbed_scores(object(), None, str(tmp_path))
    assert scores["sft_test_task_avg"] == scores["sft_task_avg"] == pytest.approx(40.0)
    loss = {"val_loss": {"loss": 2.0}}
    from_eval = write_run(tmp_path / "a", "wso", 1.0, None, 2.0, loss, sft={"testbed_sft_test": result})
    from_summary = write_run(tmp_path / "b", "wsd", 0.0, None, 2.0, loss, summary=40.0)
    assert evaluate.load_run(from_eval)["sft_task_avg"] == pytest.approx(40.0)
    assert evaluate.load_run(from_summary)["sft_task_avg"] == 40.0


def test_harness_tasks_join_the_averages_under_their_lm_eval_metric(tmp_path):
    """--harness stores lm-eval's "metric,filter" keys; the tables read the one tables.HARNESS names."""
    mid = {"arc_challenge": {"acc_norm": 0.30}, "drop": {"f1,none": 0.10, "em,none": 0.02},
           "gsm8k_cot": {"exact_match,strict-match": 0.05, "exact_match,flexible-extract": 0.07}}
    assert tables.zero_shot_avg(mid, "mid") == pytest.approx(100 * (0.30 + 0.10 + 0.05) / 3)
    sft_tasks = {"mmlu": {"acc": 0.26}, "gsm8k_cot": {"exact_match,strict-match": 0.04}, "drop": {"f1,none": 0.12},
                 "agieval_en": {"acc,none": 0.22}, "bbh": {"exact_match,get-answer": 0.10}, "alpaca_eval": {}}
    assert tables.sft_task_avg(sft_tasks) == pytest.approx(100 * (0.04 + 0.12 + 0.22 + 0.10 + 0.26) / 5)
    run = write_run(tmp_path / "m", "wsd", 0.0, 0.0, 2.0, {**mid, "winogrande": {}})
    row = evaluate.load_run(run)
    assert row["drop"] == pytest.approx(10.0) and "winogrande" not in row  # a task without its metric: no column


def test_valid_loss_is_the_value_loss_where_the_corpus_marks_values(tmp_path):
    assert tables.valid_loss({"loss": 0.6, "value_loss": 0.1}) == 0.1
    assert tables.valid_loss({"loss": 2.5}) == 2.5  # FineWeb-Edu, the mid-training corpus
    run = write_run(tmp_path / "a", "wso", 1.0, None, 0.6, {})
    with open(tmp_path / "a" / "eval.json") as f:
        ev = json.load(f)
    ev["tasks"]["val_loss"]["value_loss"] = 0.1
    with open(tmp_path / "a" / "eval.json", "w") as f:
        json.dump(ev, f)
    assert evaluate.load_run(run)["valid_loss"] == 0.1
