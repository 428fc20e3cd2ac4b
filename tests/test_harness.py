"""nanowso/harness.py: lm-evaluation-harness's own task configs on this project's model. Per item,
its log-likelihoods and acc/acc_norm equal evaluate.py's scorer (nanowso/scoring.py); generation
equals greedy decoding cut at lm-eval's stop strings; rolling log-likelihoods equal direct
computation; the chat template equals open-instruct's; and lm-eval's HFLM on the Hugging Face
export gives the same log-likelihoods and the same generations. Offline:
local files in the Hub schemas (tests/fixtures/lm_eval)."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
from data.chat import generation_prompt
from data.formats import EOT_TEXT, Tokenizer, load_rows, read_jsonl, write_jsonl
from model import Llama, LlamaConfig
from nanowso import scoring
from nanowso.checkpoint import save_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: " + 'pip install "lm-eval[hf]"')
from lm_eval.api.instance import Instance  # noqa: E402

from nanowso import harness  # noqa: E402  (after the skip: it subclasses lm-eval's TemplateLM)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "lm_eval")
MC = {"arc_easy": "arc.jsonl", "hellaswag": "hellaswag.jsonl", "winogrande": "winogrande.jsonl",
      "piqa": "piqa.jsonl", "boolq": "boolq.jsonl", "openbookqa": "openbookqa.jsonl"}
GSM8K = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
          "answer": f"Tom has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a, b in ((3, 4), (10, 5), (7, 8), (2, 9))]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    texts = [json.dumps(row) for name in os.listdir(FIXTURES) for row in load_rows(os.path.join(FIXTURES, name))]
    return Tokenizer.covering(texts + [json.dumps(GSM8K), "Question: Answer: <|user|> <|assistant|>\n"])


def tiny_llama(vocab_size, max_seq_len=320):
    torch.manual_seed(0)
    return Llama(LlamaConfig(dim=32, ffn_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                             max_seq_len=max_seq_len, tie_embeddings=True))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama(tokenizer.vocab_size)


@pytest.fixture(scope="module")
def mc_run(tiny, tokenizer, tmp_path_factory):
    samples = str(tmp_path_factory.mktemp("harness") / "samples.jsonl")
    files = ",".join(f"{task}={os.path.join(FIXTURES, name)}" for task, name in MC.items())
    out = harness.run(tiny, tokenizer, list(MC), files=files, batch_size=3, samples_path=samples)
    with open(samples) as f:
        return out, [json.loads(line) for line in f]


def test_loglikelihoods_and_acc_per_item_equal_evaluate_scorer(mc_run, tiny, tokenizer):
    out, samples = mc_run
    for task, name in MC.items():
        items = evaluate.load_items(task, {task: os.path.join(FIXTURES, name)})
        ours = [scoring.loglikelihoods(tiny, [scoring.encode_pair(tokenizer, c, k) for c, k in
                                              scoring.requests_of(item)]) for item in items]
        theirs = sorted((s for s in samples if s["task"] == task), key=lambda s: s["doc_id"])
        assert len(theirs) == len(items) > 0
        for item, mine, sample in zip(items, ours, theirs):
            lls = [resp[0][0] for resp in sample["resps"]]
            np.testing.assert_allclose(lls, mine, rtol=1e-6, atol=1e-5)
            metrics = scoring.item_metrics(item, mine, evaluate.MC_METRICS[task])
            for metric, value in metrics.items():
                assert sample[metric] == value, (task, sample["doc_id"], metric)
        mean = scoring.score_items(tiny, tokenizer, items, evaluate.MC_METRICS[task])
        assert out["results"][task]["acc,none"] == pytest.approx(mean["acc"])
    # the samples are what a reader checks: the prompt lm-eval built and the answer scored
    arc = next(s for s in samples if s["task"] == "arc_easy" and s["doc_id"] == 1)
    assert arc["arguments"][0] == ["Question: Which tool is used to measure mass?\nAnswer:", " balance"]


def test_generate_until_is_greedy_decoding_cut_at_the_stop_strings(tiny, tokenizer, tmp_path):
    write_jsonl(tmp_path / "test.jsonl", GSM8K[2:])
    write_jsonl(tmp_path / "train.jsonl", GSM8K[:2])
    samples = str(tmp_path / "samples.jsonl")
    harness.run(tiny, tokenizer, ["gsm8k"], files=f"gsm8k={tmp_path}/test.jsonl,gsm8k:train={tmp_path}/train.jsonl",
                fewshot="gsm8k=2", batch_size=2, samples_path=samples)
    with open(samples) as f:
        got = [json.loads(line) for line in f]
    got = [sample for sample in got if sample["filter"] == "strict-match"]  # each item once per filter
    assert len(got) == 2
    for sample in got:
        [(context, gen_kwargs)] = sample["arguments"]
        assert context.count("Question:") == 3 and context.endswith(GSM8K[2 + sample["doc_id"]]["question"] +
                                                                     "\nAnswer:")  # two shots, then the question
        prompt = tokenizer.encode(context)[-(tiny.config.max_seq_len - 256):]
        text = tokenizer.decode(scoring.greedy_generate(tiny, prompt, 256, tokenizer.eot, tokenizer.vocab_size))
        for stop in gen_kwargs["until"]:
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text


class Scripted(nn.Module):
    """Emits the ids of `text` after any prompt, then repeats its last id; counts forwards."""

    def __init__(self, tokenizer, text):
        super().__init__()
        self.config = LlamaConfig(dim=8, ffn_dim=8, n_layers=1, n_heads=1, n_kv_heads=1,
                                  vocab_size=tokenizer.vocab_size, max_seq_len=512)
        self.script, self.start, self.calls = tokenizer.encode(text), None, 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None):
        self.calls += 1
        self.start = idx.shape[1] if self.start is None else self.start
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        logits[:, -1, self.script[min(idx.shape[1] - self.start, len(self.script) - 1)]] = 1.0
        return logits, None


def test_generation_stops_once_the_text_holds_a_stop_string(tokenizer):
    model = Scripted(tokenizer, "Tom has 15 apples.\n\nQuestion: Tom has Tom has Tom has Tom has Tom has")
    lm = harness.HarnessLM(model, tokenizer)
    request = Instance("generate_until", {}, ("Question: Tom?\nAnswer:", {"until": ["Question:"],
                                                                           "do_sample": False}), 0)
    assert lm.generate_until([request], disable_tqdm=True) == ["Tom has 15 apples.\n\n"]
    assert model.calls <= len(tokenizer.encode("Tom has 15 apples.\n\nQuestion:")) + 1  # not 256
    sampling = Instance("generate_until", {}, ("Q", {"until": ["x"], "do_sample": True, "temperature": 1.0}), 0)
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([sampling])


def test_loglikelihood_rolling_equals_direct_computation(tokenizer):
    model = tiny_llama(tokenizer.vocab_size, max_seq_len=16)
    lm = harness.HarnessLM(model, tokenizer, batch_size=2)
    texts = ["Tom has 3 apples.", " ".join(row["answer"] for row in GSM8K)]  # one window; several of 16 tokens
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts],
                                   disable_tqdm=True)
    model.eval()
    for text, value in zip(texts, got):
        tokens, want, predicted = tokenizer.encode(text), 0.0, 0
        while predicted < len(tokens):  # lm-eval's disjoint windows of 16 predictions each, one token at a time
            end = min(len(tokens), predicted + 16)
            for j in range(predicted, end):
                context = [tokenizer.eot] + tokens[:j] if predicted == 0 else tokens[end - 17:j]
                with torch.no_grad():
                    logits, _ = model(torch.tensor([context]))
                want += torch.log_softmax(logits[0, -1], -1)[tokens[j]].item()
            predicted = end
        assert value == pytest.approx(want, abs=1e-4)
    assert len(tokenizer.encode(texts[1])) > 40


def test_chat_template_text_encodes_to_the_generation_prompt(tiny, tokenizer):
    import jinja2

    from tools.export_hf import TULU_TEMPLATE
    lm = harness.HarnessLM(tiny, tokenizer)
    chat = [{"role": "user", "content": "Question: 3 + 4?"}, {"role": "assistant", "content": "Answer: 7"},
            {"role": "user", "content": "Question: 2 + 9?"}]
    text = lm.apply_chat_template(chat)
    assert text == "<|user|>\nQuestion: 3 + 4?\n<|assistant|>\nAnswer: 7<|endoftext|>\n<|user|>\nQuestion: 2 + 9?\n" \
                   "<|assistant|>\n"
    assert lm.tok_encode(text) == generation_prompt(chat, tokenizer)
    # open-instruct's template, and a final assistant message left open for the model to continue
    # (lm-eval's gen_prefix; transformers' continue_final_message cuts after its content)
    template = jinja2.Environment().from_string(TULU_TEMPLATE)
    assert text == template.render(messages=chat, add_generation_prompt=True, eos_token=EOT_TEXT)
    prefilled = chat + [{"role": "assistant", "content": "Answer:"}]
    rendered = template.render(messages=prefilled, add_generation_prompt=False, eos_token=EOT_TEXT)
    assert lm.apply_chat_template(prefilled, add_generation_prompt=False) == rendered[:rendered.rindex("Answer:") + 7]


def test_clear_errors(tiny, tokenizer, tmp_path):
    with pytest.raises(SystemExit, match="did you mean.*gsm8k"):
        harness.run(tiny, tokenizer, ["gsm8kk"])
    with pytest.raises(SystemExit, match="a group of tasks"):
        harness.run(tiny, tokenizer, ["mmlu"], files=f"mmlu={FIXTURES}/mmlu_test.jsonl")
    write_jsonl(tmp_path / "test.jsonl", GSM8K)
    with pytest.raises(SystemExit, match="shots from its 'train' split: add --harness_files=gsm8k:train=path"):
        harness.run(tiny, tokenizer, ["gsm8k"], files=f"gsm8k={tmp_path}/test.jsonl")
    with pytest.raises(SystemExit, match="not in --harness"):
        harness.run(tiny, tokenizer, ["arc_easy"], files=f"gsm8k={tmp_path}/test.jsonl")
    with pytest.raises(SystemExit, match="does not exist"):
        harness.run(tiny, tokenizer, ["arc_easy"], files=f"arc_easy={tmp_path}/none.jsonl")


def test_evaluate_cli_writes_harness_results_and_items(tiny, tokenizer, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, {"model": tiny.state_dict(), "model_config": tiny.config.to_dict(), "step": 7,
                           "tokenizer": tokenizer.to_dict(), "config": {"stage": "pre", "schedule": "wso"}})
    results = evaluate.main(evaluate.EvalConfig(ckpt=str(ckpt), harness="arc_easy",
                                                harness_files=f"arc_easy={FIXTURES}/arc.jsonl"))
    assert list(results["tasks"]) == ["arc_easy"]  # --harness alone runs no --tasks
    assert set(results["tasks"]["arc_easy"]) >= {"acc,none", "acc_norm,none"}
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["harness"]["lm_eval"] == lm_eval.__version__
    with open(tmp_path / "eval_harness_samples.jsonl") as f:
        assert len(f.readlines()) == 2


def test_hflm_on_the_export_scores_and_generates_as_harness_lm(tmp_path):
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (lm-eval[hf])")
    from lm_eval.models.huggingface import HFLM

    from tools import export_hf
    full = Tokenizer()
    model = tiny_llama(100288, max_seq_len=320)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                           "tokenizer": full.to_dict(), "config": {"stage": "pre"}})
    export_hf.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    write_jsonl(tmp_path / "test.jsonl", GSM8K[2:])
    write_jsonl(tmp_path / "train.jsonl", GSM8K[:2])
    tasks = ["arc_easy", "hellaswag", "gsm8k"]
    files = (f"arc_easy={FIXTURES}/arc.jsonl,hellaswag={FIXTURES}/hellaswag.jsonl,"
             f"gsm8k={tmp_path}/test.jsonl,gsm8k:train={tmp_path}/train.jsonl")
    ours = harness.run(model, full, tasks, files=files, fewshot="gsm8k=2", samples_path=str(tmp_path / "a.jsonl"))
    hf = HFLM(pretrained=str(tmp_path / "hf"), batch_size=4, device="cpu", dtype="float32")
    with pytest.MonkeyPatch.context() as mp:  # the same local files, lm-eval's own model class
        mp.setattr(harness, "HarnessLM", lambda *args, **kwargs: hf)
        theirs = harness.run(model, full, tasks, files=files, fewshot="gsm8k=2", samples_path=str(tmp_path / "b.jsonl"))
    for task in ("arc_easy", "hellaswag"):
        assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    a, b = (read_jsonl(tmp_path / name) for name in ("a.jsonl", "b.jsonl"))
    assert len(a) == len(b) == 2 + 2 + 2 * 2  # gsm8k: each item once per filter
    for mine, hf_item in zip(a, b, strict=True):
        assert mine["arguments"] == hf_item["arguments"]
        if mine["task"] == "gsm8k":  # 256 greedy tokens of a random model: the same text
            assert mine["resps"] == hf_item["resps"] and len(mine["resps"][0][0]) > 0
        else:
            np.testing.assert_allclose([r[0][0] for r in mine["resps"]], [r[0][0] for r in hf_item["resps"]],
                                       rtol=1e-5, atol=1e-4)


def test_fewshot_on_a_group_reaches_each_of_its_tasks(tiny, tokenizer, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager
    arc = harness.registry().task_index["arc_easy"].yaml_path
    write_jsonl(tmp_path / "train.jsonl", load_rows(os.path.join(FIXTURES, "arc.jsonl")))
    for name in ("arc_local_a", "arc_local_b"):  # two local tasks in a group of their own
        with open(tmp_path / f"{name}.yaml", "w") as f:
            json.dump({"task": name, "include": str(arc), "dataset_path": "json", "dataset_name": None,
                       "dataset_kwargs": {"data_files": {"test": f"{FIXTURES}/arc.jsonl",
                                                         "train": str(tmp_path / "train.jsonl")}},
                       "validation_split": None}, f)
    with open(tmp_path / "arc_local.yaml", "w") as f:
        json.dump({"group": "arc_local", "task": ["arc_local_a", "arc_local_b"],
                   "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}, f)
    monkeypatch.setattr(harness, "registry", lambda: TaskManager(include_path=str(tmp_path)))
    samples = str(tmp_path / "samples.jsonl")
    out = harness.run(tiny, tokenizer, ["arc_local"], fewshot="arc_local=1", samples_path=samples)
    assert {"arc_local", "arc_local_a", "arc_local_b"} <= set(out["results"])
    assert "acc,none" in out["results"]["arc_local"]  # the group's aggregate
    with open(samples) as f:
        contexts = [json.loads(line)["arguments"][0][0] for line in f]
    assert len(contexts) == 4 and all(c.count("Question:") == 2 for c in contexts)  # one shot, then the question
