"""
AlpacaEval-style pairwise evaluation (the paper's Appendix E; AlpacaEval, Li et al. 2023):
a judge model reads an instruction and two responses and says which is better. As in the
paper, the reference responses are those of a model of the same size (the WSO model
fine-tuned with the sweep's lowest LR), not GPT-4's, so that win rates spread instead of all
sitting near 0; the paper's judge is Llama-3-70B-Instruct. Each pair is judged in both orders
and the two verdicts averaged, which cancels a judge's preference for a position.
evaluate.py (task alpaca_eval) and sft.py (--select_by=alpaca_eval) use it.

    --judge=path/to/hf_model_dir            a local Hugging Face causal LM (transformers)
    --judge=http://host:8000/v1             an OpenAI-compatible server (vLLM, llama.cpp, OpenAI)
                                            with --judge_model=<its model name>; $OPENAI_API_KEY if set
    --judge=module:callable                 any Judge below, for tests and other judges

A Judge returns its preference for response B over response A in [0, 1]: the probability
mass its next token puts on "B" against "A" after PROMPT (AlpacaEval 2's weighted judges use
such token probabilities too); a server that returns no log-probabilities gives 1, 0 or 0.5
from the letter it wrote. Per item, the model's win is the mean of its preference when shown
second and one minus it when shown first; the win rate is the mean over items, with its
standard error (std / sqrt(n)). position_bias is the judge's mean preference for whichever
response came second, less 0.5: what the two orders cancel.
"""

import importlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import Protocol

import numpy as np

from data.chat import generation_prompt
from data.formats import Tokenizer, load_rows
from nanowso.scoring import generate_all

SYSTEM = "You are a careful evaluator of AI assistants. You judge which of two responses follows the instruction better."
PROMPT = """Below is an instruction given to two AI assistants, followed by their responses.
Decide which response is better: more helpful, more accurate, and more closely following the
instruction. Judge the content, not the length, and do not let the order of the responses sway you.

# Instruction
{instruction}

# Response A
{output_a}

# Response B
{output_b}

Which response is better? Answer with a single letter: A or B."""


class Judge(Protocol):
    def __call__(self, instruction: str, output_a: str, output_b: str) -> float:
        """Preference for output_b over output_a: 1 b is better, 0 a is, 0.5 a tie."""


def messages(instruction, output_a, output_b):
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPT.format(instruction=instruction, output_a=output_a, output_b=output_b)}]


def letter_preference(p_a, p_b):
    """P(B) / (P(A) + P(B)); a tie when the judge put no mass on either."""
    return 0.5 if p_a + p_b == 0 else p_b / (p_a + p_b)


class LocalJudge:
    """A Hugging Face causal LM directory as the judge: its next-token probabilities of "A"
    and "B" after PROMPT, rendered with the model's chat template (plain text without one;
    a template that refuses a system message gets it at the top of the user's)."""

    def __init__(self, path, device="cpu"):
        import torch
        import transformers
        self.torch, self.device = torch, device
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        # the letter's ids: "A" after a chat template's assistant header, " A" after "Answer:"
        self.letters = [sorted({ids[0] for text in (letter, " " + letter)
                                if len(ids := self.tokenizer.encode(text, add_special_tokens=False)) == 1})
                        for letter in ("A", "B")]
        if not all(self.letters):
            raise SystemExit(f"error: judge {path}: its tokenizer spells 'A' or 'B' in several tokens; the judge "
                             f"reads one token's probability")

    def prompt_ids(self, instruction, output_a, output_b):
        chat = messages(instruction, output_a, output_b)
        if not self.tokenizer.chat_template:
            return self.tokenizer.encode("\n\n".join(m["content"] for m in chat) + "\n\nAnswer:")
        import jinja2
        try:
            return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)
        except jinja2.TemplateError:  # no system role (HFLM.apply_chat_template retries the same way)
            merged = [{"role": "user", "content": chat[0]["content"] + "\n\n" + chat[1]["content"]}]
            return self.tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)

    def __call__(self, instruction, output_a, output_b):
        ids = self.prompt_ids(instruction, output_a, output_b)
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids], device=self.device)).logits[0, -1].float()
        p = self.torch.softmax(logits, dim=-1)
        return letter_preference(*(p[letter].sum().item() for letter in self.letters))


class OpenAIJudge:
    """An OpenAI-compatible /chat/completions endpoint as the judge: one token, temperature 0,
    with its top log-probabilities (else the letter it wrote). Rate limits and server errors
    (429, 5xx) are retried; `unreadable` counts answers that were neither letter (a tie)."""

    RETRIES = (2, 8, 30)  # seconds before each retry

    def __init__(self, url, model, timeout=120):
        if not model:
            raise SystemExit(f"error: --judge={url} needs --judge_model=<the server's model name>")
        self.url, self.model, self.timeout, self.unreadable = url.rstrip("/") + "/chat/completions", model, timeout, 0

    def request(self, instruction, output_a, output_b):
        return {"model": self.model, "messages": messages(instruction, output_a, output_b), "max_tokens": 1,
                "temperature": 0, "logprobs": True, "top_logprobs": 5}

    def post(self, body):
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        for wait in (*self.RETRIES, None):
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, body, headers), timeout=self.timeout) as r:
                    return json.load(r)
            except urllib.error.HTTPError as e:
                if e.code in (429, 500, 502, 503, 504) and wait is not None:
                    time.sleep(wait)
                    continue
                detail = e.read().decode(errors="replace")[:300]
                raise SystemExit(f"error: the judge at {self.url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, OSError) as e:
                raise SystemExit(f"error: the judge at {self.url} did not answer ({e}); is the server running?") \
                    from None

    def __call__(self, instruction, output_a, output_b):
        reply = self.post(json.dumps(self.request(instruction, output_a, output_b)).encode())
        if "choices" not in reply:
            raise SystemExit(f"error: the judge at {self.url} replied without choices: {json.dumps(reply)[:300]}")
        choice = reply["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or [{}]
        mass = {"A": 0.0, "B": 0.0}
        for entry in content[0].get("top_logprobs") or []:
            token = entry["token"].strip()
            if token in mass:
                mass[token] += math.exp(entry["logprob"])
        if mass["A"] + mass["B"] > 0:
            return letter_preference(mass["A"], mass["B"])
        answer = ((choice.get("message") or {}).get("content") or "").strip().strip(".:*()[]\"' ")
        if answer not in ("A", "B"):
            self.unreadable += 1
            return 0.5
        return float(answer == "B")


def load_judge(spec, model_name="", device="cpu"):
    """--judge: "" -> None; a URL -> OpenAIJudge; a directory -> LocalJudge; module:callable."""
    if not spec:
        return None
    if spec.startswith(("http://", "https://")):
        return OpenAIJudge(spec, model_name)
    if os.path.isdir(spec):
        return LocalJudge(spec, device)
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"error: --judge={spec}: {e}; expected a model directory, an http(s) URL "
                         f"or module:callable") from None


def pairwise(judge, instructions, outputs, references):
    """The model's win rate over the references, each pair judged in both orders; and every
    item's verdicts, to look at. position_bias: the mean preference for whichever response
    came second, less a tie's 0.5 (0 for a judge that ignores the order)."""
    items = []
    for instruction, output, reference in zip(instructions, outputs, references):
        model_second = judge(instruction, reference, output)  # preference for B, the model
        model_first = judge(instruction, output, reference)  # preference for B, the reference
        items.append({"instruction": instruction, "output": output, "reference": reference,
                      "p_b_model_second": model_second, "p_b_model_first": model_first,
                      "win": (model_second + 1 - model_first) / 2})
    wins = np.array([item["win"] for item in items])
    bias = np.mean([(item["p_b_model_second"] + item["p_b_model_first"]) / 2 for item in items]) - 0.5
    result = {"win_rate": float(wins.mean()),
              "stderr": float(wins.std(ddof=1) / math.sqrt(len(wins))) if len(wins) > 1 else None,
              "position_bias": float(bias), "n": len(items)}
    if getattr(judge, "unreadable", 0):
        result["unreadable"] = judge.unreadable  # answers that were neither letter, counted as ties
    return result, items


# ------------------------------------------------------------------ AlpacaEval on a checkpoint

HUB = ("tatsu-lab/alpaca_eval", "alpaca_eval", "eval")  # 805 instructions, GPT-4's outputs as "output"


def alpaca_rows(path=""):
    """AlpacaEval's rows ({"instruction", "output", ...}) from a local file in its schema, else the Hub."""
    if path:
        rows = load_rows(path)
    else:
        from datasets import load_dataset
        try:
            rows = list(load_dataset(HUB[0], HUB[1], split=HUB[2]))
        except Exception as e:  # offline, or the Hub changed
            raise SystemExit(f"error: cannot load {HUB[0]} from the Hub ({type(e).__name__}); pass a local copy "
                             f"(--data_files=alpaca_eval=path.jsonl for evaluate.py, --judge_data for sft.py)") from None
    if not rows or any("instruction" not in r for r in rows):
        raise SystemExit(f"error: {path or HUB[0]}: expected rows with an 'instruction' field")
    return rows


def model_outputs(model, tokenizer, rows, max_new_tokens=256, batch_size=16):
    """The model's greedy answers to each row's instruction, in the chat template."""
    prompts = [generation_prompt([{"role": "user", "content": r["instruction"]}], tokenizer) for r in rows]
    return [out.strip() for out in generate_all(model, tokenizer, prompts, max_new_tokens, batch_size)]


def reference_outputs(spec, rows, max_new_tokens=256, batch_size=16, device="cpu"):
    """The responses the model is compared with: "" -> each row's own "output" (AlpacaEval's
    GPT-4 responses); a .jsonl/.json of {"instruction", "output"} rows (an earlier run's
    alpaca_eval.jsonl, say); a checkpoint -> its greedy answers (the paper: WSO fine-tuned
    with the sweep's lowest LR)."""
    if not spec:
        if any("output" not in r for r in rows):
            raise SystemExit("error: the AlpacaEval rows have no 'output' to compare with: pass a reference")
        return [r["output"] for r in rows]
    if not os.path.exists(spec):
        raise SystemExit(f"error: reference {spec} does not exist")
    if spec.endswith((".jsonl", ".json")):
        given = {r["instruction"]: r["output"] for r in load_rows(spec)}
        missing = [r["instruction"] for r in rows if r["instruction"] not in given]
        if missing:
            raise SystemExit(f"error: reference {spec} has no output for {len(missing)} of the {len(rows)} "
                             f"instructions (the first: {missing[0][:80]!r})")
        return [given[r["instruction"]] for r in rows]
    from nanowso.checkpoint import load_checkpoint, load_model
    ckpt = load_checkpoint(spec)
    return model_outputs(load_model(ckpt, device), Tokenizer.from_dict(ckpt["tokenizer"]), rows, max_new_tokens,
                         batch_size)


def alpaca_eval(model, tokenizer, rows, judge, references, max_new_tokens=256, batch_size=16):
    """(result, items): the model's AlpacaEval-style win rate over `references` (pairwise).
    Without a judge there is no number, only the reason."""
    if judge is None:
        return {"win_rate": None, "n": 0, "note": "AlpacaEval was not scored: no --judge"}, []
    outputs = model_outputs(model, tokenizer, rows, max_new_tokens, batch_size)
    return pairwise(judge, [r["instruction"] for r in rows], outputs, references)
