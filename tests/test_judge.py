"""nanowso/judge.py: AlpacaEval-style pairwise judging. Both orders cancel a judge's position
preference; a local Hugging Face judge reads its next-token mass on "A" / "B" after the prompt
in its chat template (checked against model.py on data/chat.py's rendering); an
OpenAI-compatible judge sends the documented request and reads log-probabilities or the
letter; evaluate.py's alpaca_eval task writes every verdict."""

import http.server
import json
import math
import os
import threading

import pytest
import torch

import evaluate
from data.chat import generation_prompt
from data.formats import Tokenizer, read_jsonl
from model import Llama, LlamaConfig
from nanowso import judge
from nanowso.checkpoint import save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPACA = os.path.join(REPO, "tests", "fixtures", "lm_eval", "alpaca_eval.jsonl")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tests/conftest.py


def test_both_orders_cancel_a_judge_that_always_prefers_the_second():
    calls = []

    def second_is_better(instruction, a, b):
        calls.append((a, b))
        return 1.0

    result, items = judge.pairwise(second_is_better, ["q1", "q2"], ["mine1", "mine2"], ["ref1", "ref2"])
    assert result == {"win_rate": 0.5, "stderr": 0.0, "position_bias": 0.5, "n": 2}
    assert calls == [("ref1", "mine1"), ("mine1", "ref1"), ("ref2", "mine2"), ("mine2", "ref2")]
    assert items[0] == {"instruction": "q1", "output": "mine1", "reference": "ref1", "p_b_model_second": 1.0,
                        "p_b_model_first": 1.0, "win": 0.5}


def test_unreadable_answers_are_reported():
    class Shrugs:
        unreadable = 0

        def __call__(self, instruction, a, b):
            self.unreadable += 1
            return 0.5

    result, _ = judge.pairwise(Shrugs(), ["q"], ["a"], ["b"])
    assert result["win_rate"] == 0.5 and result["unreadable"] == 2


def test_win_rate_and_its_standard_error():
    def longer(instruction, a, b):
        return 1.0 if len(b) > len(a) else 0.0 if len(b) < len(a) else 0.5

    result, _ = judge.pairwise(longer, ["q"] * 4, ["a long answer", "short", "a long answer", "same"],
                               ["ref", "a long reference", "ref", "same"])
    wins = [1.0, 0.0, 1.0, 0.5]
    assert result["win_rate"] == pytest.approx(0.625) and result["position_bias"] == 0.0
    mean = sum(wins) / 4
    assert result["stderr"] == pytest.approx(math.sqrt(sum((w - mean) ** 2 for w in wins) / 3 / 4))


@pytest.fixture(scope="module")
def local_judge_dir(tmp_path_factory):
    """A small SFT model on the full cl100k vocabulary, exported with its tulu chat template."""
    pytest.importorskip("transformers")
    from tools import export_hf
    root = tmp_path_factory.mktemp("judge")
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=16, ffn_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=100288, max_seq_len=512,
                      tie_embeddings=True)
    model = Llama(cfg)
    for stage in ("sft", "pre"):  # with the tulu chat template, and without one
        save_checkpoint(root / f"{stage}.pt", {"model": model.state_dict(), "model_config": cfg.to_dict(),
                                               "tokenizer": Tokenizer().to_dict(), "config": {"stage": stage}})
        export_hf.export(str(root / f"{stage}.pt"), str(root / stage))
    return root / "sft", model


def test_local_judge_reads_the_mass_on_a_and_b_after_its_chat_template(local_judge_dir):
    path, model = local_judge_dir
    local = judge.LocalJudge(str(path))
    tokenizer = Tokenizer()
    ids = generation_prompt(judge.messages("Name a city.", "Porto", "Lisbon"), tokenizer)
    assert local.prompt_ids("Name a city.", "Porto", "Lisbon") == ids  # the tulu template, as data/chat.py renders
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids]))[0][0, -1], -1)
    a, b = (p[tokenizer.encode(letter)[0]].item() for letter in "AB")
    a += p[tokenizer.encode(" A")[0]].item()  # either spelling of the letter counts
    b += p[tokenizer.encode(" B")[0]].item()
    assert local("Name a city.", "Porto", "Lisbon") == pytest.approx(b / (a + b), rel=1e-4)
    assert judge.load_judge(str(path)).letters == local.letters


def test_local_judge_without_a_chat_template_reads_the_letter_after_answer(local_judge_dir):
    path, model = local_judge_dir
    plain = judge.LocalJudge(str(path.parent / "pre"))
    tokenizer = Tokenizer()
    ids = plain.prompt_ids("Name a city.", "Porto", "Lisbon")
    assert tokenizer.decode(ids).endswith("Answer with a single letter: A or B.\n\nAnswer:")
    assert tokenizer.encode("Answer: B")[-1] in plain.letters[1]  # " B", the token that follows "Answer:"
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids]))[0][0, -1], -1)
    a, b = (sum(p[tokenizer.encode(t)[0]].item() for t in (letter, " " + letter)) for letter in "AB")
    assert plain("Name a city.", "Porto", "Lisbon") == pytest.approx(b / (a + b), rel=1e-4)


class Server(http.server.BaseHTTPRequestHandler):
    replies, requests = [], []  # a reply: a JSON object, or (HTTP status, JSON object)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Server.requests.append((self.path, body, self.headers.get("Authorization")))
        reply = Server.replies.pop(0)
        status, reply = reply if isinstance(reply, tuple) else (200, reply)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_compatible_judge(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    top = [{"token": "A", "logprob": math.log(0.2)}, {"token": " B", "logprob": math.log(0.6)},
           {"token": "The", "logprob": math.log(0.1)}]
    other = [{"token": "The", "logprob": math.log(0.9)}]
    monkeypatch.setattr(judge.OpenAIJudge, "RETRIES", (0, 0, 0))
    Server.replies[:] = [{"choices": [{"message": {"content": "B"}, "logprobs": {"content": [{"top_logprobs": top}]}}]},
                         {"choices": [{"message": {"content": "A"}}]},  # a server without log-probabilities
                         {"choices": [{"message": {"content": "B."}, "logprobs": {"content": [{"top_logprobs": other}]}}]},
                         {"choices": [{"message": {"content": "Both"}}]},  # neither letter: a tie, counted
                         (503, {"error": "busy"}), {"choices": [{"message": {"content": "B"}}]},  # retried
                         (401, {"error": {"message": "bad key"}}), {"error": "no choices"}]
    remote = judge.load_judge(url, "llama-3-70b-instruct")
    assert remote("Name a city.", "Porto", "Lisbon") == pytest.approx(0.75)
    assert [remote("q", "a", "b") for _ in range(3)] == [0.0, 1.0, 0.5] and remote.unreadable == 1
    assert remote("q", "a", "b") == 1.0 and len(Server.requests) == 6
    with pytest.raises(SystemExit, match="HTTP 401.*bad key"):
        remote("q", "a", "b")
    with pytest.raises(SystemExit, match="without choices"):
        remote("q", "a", "b")
    path, body, auth = Server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "llama-3-70b-instruct" and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["messages"] == judge.messages("Name a city.", "Porto", "Lisbon")
    assert "# Response A\nPorto\n\n# Response B\nLisbon" in body["messages"][1]["content"]
    server.shutdown()
    server.server_close()
    with pytest.raises(SystemExit, match="did not answer"):
        remote("q", "a", "b")
    with pytest.raises(SystemExit, match="--judge_model"):
        judge.load_judge(url)


def prefers_porto(instruction, a, b):
    """A test judge (module:callable): "Porto" beats anything else."""
    return 0.5 if (a == "Porto") == (b == "Porto") else float(b == "Porto")


def test_evaluate_alpaca_eval_against_a_reference_checkpoint(tmp_path, monkeypatch):
    tokenizer = Tokenizer.covering(["Porto Lisbon", "Name a city in Portugal. When was Alice born?",
                                    "<|user|>\n<|assistant|>\n"])
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=16, ffn_dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                              vocab_size=tokenizer.vocab_size, max_seq_len=128))
    state = {"model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(),
             "config": {"stage": "sft"}, "step": 3}
    save_checkpoint(tmp_path / "mine.pt", state)
    save_checkpoint(tmp_path / "ref.pt", state)
    outputs = iter(["Lisbon", "Porto"])  # the reference checkpoint answers first (run_task), then the model
    monkeypatch.setattr(judge, "model_outputs", lambda model, tokenizer, rows, *a, **k: [next(outputs)] * len(rows))
    results = evaluate.main(evaluate.EvalConfig(ckpt=str(tmp_path / "mine.pt"), tasks="alpaca_eval",
                                                data_files=f"alpaca_eval={ALPACA}", judge="test_judge:prefers_porto",
                                                judge_reference=str(tmp_path / "ref.pt")))
    got = results["tasks"]["alpaca_eval"]
    assert got["win_rate"] == 1.0 and got["n"] == 2 and got["position_bias"] == 0.0
    items = read_jsonl(got["items"])
    assert [(i["output"], i["reference"]) for i in items] == [("Porto", "Lisbon")] * 2
    # without a judge: no number, and the reason
    results = evaluate.main(evaluate.EvalConfig(ckpt=str(tmp_path / "mine.pt"), tasks="alpaca_eval",
                                                out=str(tmp_path / "none.json")))
    assert results["tasks"]["alpaca_eval"] == {"win_rate": None, "n": 0, "note": "AlpacaEval was not scored: no --judge"}


def test_judge_is_loaded_from_module_and_name():
    import operator
    assert judge.load_judge("operator:add") is operator.add and judge.load_judge("") is None
    with pytest.raises(SystemExit, match="expected a model directory, an http"):
        judge.load_judge("operator:no_such_judge")


def test_references_from_a_file_must_cover_every_instruction(tmp_path):
    rows = read_jsonl(ALPACA)
    assert judge.reference_outputs("", rows) == ["Porto", "I do not know."]
    (tmp_path / "ref.jsonl").write_text(json.dumps({"instruction": rows[0]["instruction"], "output": "Braga"}) + "\n")
    with pytest.raises(SystemExit, match="no output for 1 of the 2 instructions"):
        judge.reference_outputs(str(tmp_path / "ref.jsonl"), rows)
    assert judge.reference_outputs(str(tmp_path / "ref.jsonl"), rows[:1]) == ["Braga"]
    with pytest.raises(SystemExit, match="does not exist"):
        judge.reference_outputs(str(tmp_path / "none.pt"), rows)
