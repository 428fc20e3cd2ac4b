"""
Scoring a language model the way lm-evaluation-harness does, so numbers compare with the
paper's (Sections 3.1, 3.2; Appendix E): the log-likelihood of a continuation given a
context (lm_eval/api/model.py, TemplateLM.loglikelihood and _encode_pair), multiple-choice
acc and acc_norm (lm_eval/api/task.py, ConfigurableTask.process_results),
and greedy generation for the testbed's post-SFT questions. The task formats that build
the items are evaluate.py's; nothing here runs on its own.
"""

import inspect
import re

import numpy as np
import torch
import torch.nn.functional as F

from data.chat import generation_prompt
from data.formats import read_jsonl
from model import IGNORE_INDEX, KVCache
from nanowso.common import Eta

# ------------------------------------------------------------------ generation (SFT)


@torch.no_grad()
def greedy_generate_batch(model, prompts, max_new_tokens, stop_id, vocab_size=None, use_cache=True, done=None):
    """Greedy continuations of equally long prompts (lists of ids), each up to (not
    including) its stop_id, or up to the token after which done(ids so far) is true
    (lm-eval's stop strings, nanowso/harness.py). Equal lengths need no padding: the model takes no attention
    mask, so a padded prompt would attend to pad tokens. Finished rows leave the batch.
    vocab_size excludes the embedding's padding rows, which no tokenizer can decode.
    With use_cache (and a model whose forward takes one, as model.Llama's), a KVCache holds
    every position's keys and values, so each new token is one position through the model
    (linear in the output length, not quadratic); past max_seq_len the model sees the most
    recent max_seq_len tokens, recomputed each step."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("greedy_generate_batch needs prompts of one length; group them by length")
    model.eval()
    device, max_len = next(model.parameters()).device, model.config.max_seq_len
    ids = torch.tensor(prompts, dtype=torch.long, device=device)  # (B, T)
    use_cache = use_cache and ids.shape[1] < max_len and "cache" in inspect.signature(model.forward).parameters
    # sized to what this call can hold, not max_seq_len: keep() copies it as rows finish
    cache = KVCache(model.config.n_layers, min(max_len, ids.shape[1] + max_new_tokens)) if use_cache else None
    logits, _ = model(ids[:, -max_len:], **({"cache": cache} if use_cache else {}))  # the last tokens that fit
    outputs, active = [[] for _ in prompts], list(range(len(prompts)))
    for _ in range(max_new_tokens):
        next_id = logits[:, -1, :vocab_size].argmax(dim=-1)  # (B,)
        going = [row for row, token in enumerate(next_id.tolist()) if token != stop_id]
        for row in going:
            outputs[active[row]].append(int(next_id[row]))
        if done is not None:
            going = [row for row in going if not done(outputs[active[row]])]
        if not going:
            break
        active = [active[row] for row in going]
        ids = torch.cat([ids[going], next_id[going, None]], dim=1)
        if cache is not None and ids.shape[1] <= max_len:
            cache.keep(going)
            logits, _ = model(next_id[going, None], cache=cache)  # (B, 1, V): one new position
        else:
            logits, _ = model(ids[:, -max_len:])
    return outputs


def greedy_generate(model, prompt_ids, max_new_tokens, stop_id, vocab_size=None):
    """The greedy continuation of one prompt, up to (not including) stop_id."""
    return greedy_generate_batch(model, [list(prompt_ids)], max_new_tokens, stop_id, vocab_size)[0]


def generate_all(model, tokenizer, prompts, max_new_tokens, batch_size):
    """Decoded greedy answers to many prompts, batched among prompts of equal length."""
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    answers = [None] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            outs = greedy_generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, tokenizer.eot,
                                         tokenizer.vocab_size)
            for i, out in zip(chunk, outs):
                answers[i] = tokenizer.decode(out)
    return answers


def normalized(text):
    """Exact match compares texts with surrounding whitespace dropped and inner runs made one space."""
    return " ".join(text.split())


def shape(text):
    """A value's form with its words and numbers masked: "May 17, 1976" -> "A 0, 0"."""
    return re.sub(r"[^\W\d_]+", "A", re.sub(r"\d+", "0", normalized(text)))


def kind_of(values):
    """What answers a question of these values' kind: the values, and, where they hold numbers
    (dates, of which a test file lists only a few of the many possible), any text of their shape."""
    values = set(values)
    return values, {shape(v) for v in values} if any(re.search(r"\d", v) for v in values) else set()


def of_kind(answer, kind):
    """The answer, normalized, is one of kind_of's values or has one of its shapes."""
    values, shapes = kind
    answer = normalized(answer)
    return answer in values or shape(answer) in shapes


def answered_in_kind(answers, rows):
    """type_match per row: each answer of the kind of the answers the rows give to its attribute."""
    values = {}
    for row in rows:
        values.setdefault(row.get("attribute"), set()).add(row["answer"])
    kinds = {attribute: kind_of(v) for attribute, v in values.items()}
    return [of_kind(a, kinds[row.get("attribute")]) for a, row in zip(answers, rows)]


def testbed_sft_accuracy(model, tokenizer, jsonl_path, batch_size=64, max_new_tokens=24, limit=None,
                         keep_answers=False):
    """The testbed's two post-SFT tasks on its questions (the analogue of the paper's post-SFT
    scores, Section 3.2), both after the chat template's `<|assistant|>\n`:
      exact_match  the greedy answer, normalized, equals row["answer"];
      type_match   the greedy answer, normalized, is an answer the file gives to the same
                   row["attribute"] (for anyone), or has their shape where they hold numbers
                   (any date for a date question: of_kind): the right kind of answer, true or
                   not, which tells format learning (a city asked, a city said) from recall;
      choice       the assistant's content + eos (the tokens SFT supervises) has the highest
                   log-likelihood among every answer the file gives to the same row["attribute"]
                   (~30-50 values: a graded score); choice_chance is the mean 1 / (number of
                   candidates).
    by_attribute holds the three per row["attribute"], with n; with keep_answers the result
    also holds every greedy answer (answers), to read the raw items behind the means.
    limit: first rows only."""
    rows = read_jsonl(jsonl_path)[:limit]
    if not rows:
        raise ValueError(f"{jsonl_path} has no rows")
    prompts = [generation_prompt(row["messages"][:-1], tokenizer) for row in rows]
    answers = generate_all(model, tokenizer, prompts, max_new_tokens, batch_size)
    correct = [normalized(a) == row["answer"] for a, row in zip(answers, rows)]

    pools = {}
    for row in rows:
        pools.setdefault(row.get("attribute"), set()).add(row["messages"][-1]["content"])
    pools = {attribute: sorted(values) for attribute, values in pools.items()}
    typed = answered_in_kind(answers, rows)
    encoded = {attribute: [tokenizer.encode(content) + [tokenizer.eot] for content in pool]
               for attribute, pool in pools.items()}
    chosen = []
    for prompt, row in zip(prompts, rows):  # every candidate after one prompt: the prompt runs once
        scores = shared_prompt_loglikelihoods(model, prompt, encoded[row.get("attribute")])
        chosen.append(bool(np.argmax(scores) == pools[row.get("attribute")].index(row["messages"][-1]["content"])))
    by_attribute = {}
    for row, *marks in zip(rows, correct, typed, chosen):
        by_attribute.setdefault(row.get("attribute"), []).append(marks)
    result = {"exact_match": float(np.mean(correct)), "choice": float(np.mean(chosen)),
              "choice_chance": float(np.mean([1 / len(pools[row.get("attribute")]) for row in rows])),
              "type_match": float(np.mean(typed)),
              "n": len(rows),
              "by_attribute": {attribute: {**dict(zip(("exact_match", "type_match", "choice"),
                                                      np.mean(marks, axis=0).tolist())), "n": len(marks)}
                               for attribute, marks in by_attribute.items()}}
    return {**result, "answers": answers} if keep_answers else result


def recall_accuracy(model, tokenizer, probes, batch_size=64):
    """Greedy recall of facts (the testbed's "PT Task Avg"): from [eot] + a probe's stem in a
    trained phrasing ("Alice Kern was born in", as a document starts), the greedy
    continuation must spell the true value with its leading space (" Lisbon") and then leave
    the word (the next character is no letter or digit). Exact, so it does not saturate like
    the 4-way probes. probes: rows of probes.jsonl. Returns exact_match and n."""
    if not probes:
        raise ValueError("no probes to recall")
    truths = [" " + row["choices"][row["gold"]] for row in probes]
    prompts = [[tokenizer.eot, *tokenizer.encode(row["context"])] for row in probes]
    longest = max(len(tokenizer.encode(truth)) for truth in truths)
    continuations = generate_all(model, tokenizer, prompts, longest + 1, batch_size)
    recalled = [text.startswith(truth) and not text[len(truth):len(truth) + 1].isalnum()
                for text, truth in zip(continuations, truths)]
    return {"exact_match": float(np.mean(recalled)), "n": len(probes)}


# ------------------------------------------------------------ log-likelihood scoring


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=16, desc=None, with_greedy=False):
    """log P(continuation | context) for each (context_ids, continuation_ids), as
    lm-evaluation-harness computes it: the input is context + continuation without its
    last token, cut from the left to max_seq_len; batches are right-padded (a causal model
    never looks right, so padding changes nothing) and run longest first. with_greedy:
    (log P, whether greedy decoding would produce the continuation) pairs, lm-eval's
    loglikelihood answer (HFLM._loglikelihood_tokens)."""
    model.eval()
    device = next(model.parameters()).device
    window = model.config.max_seq_len + 1
    sequences = []
    for context, continuation in requests:
        if not context or not continuation or len(continuation) >= window:
            raise ValueError(f"need a context and a continuation of 1..{window - 1} tokens, "
                             f"got {len(context)} and {len(continuation)}")
        sequences.append((list(context) + list(continuation))[-window:])
    order = sorted(range(len(requests)), key=lambda i: -len(sequences[i]))
    results, eta = [0.0] * len(requests), Eta(len(requests))
    report_every = max(1, len(order) // batch_size // 10)  # about ten progress lines
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        x = torch.zeros(len(chunk), len(sequences[chunk[0]]) - 1, dtype=torch.long)  # (B, T), right-padded
        for b, i in enumerate(chunk):
            x[b, :len(sequences[i]) - 1] = torch.tensor(sequences[i][:-1])
        logits, _ = model(x.to(device))  # (B, T, V)
        for b, i in enumerate(chunk):
            n, end = len(requests[i][1]), len(sequences[i]) - 1
            logprobs = F.log_softmax(logits[b, end - n:end].float(), dim=-1)  # (n, V)
            targets = torch.tensor(sequences[i][-n:], device=device)
            results[i] = logprobs.gather(-1, targets[:, None]).sum().item()
            if with_greedy:
                results[i] = (results[i], bool((logprobs.argmax(dim=-1) == targets).all()))
        done = start + len(chunk)
        if desc and (done == len(order) or (start // batch_size) % report_every == 0):
            print(f"  {desc}: {done}/{len(order)} requests | ETA {eta(done)}", flush=True)
    return results


@torch.no_grad()
def shared_prompt_loglikelihoods(model, prompt, continuations):
    """log P(continuation | prompt) for many continuations of one prompt, as loglikelihoods
    computes each, but with the prompt run once: its keys and values are cached (KVCache) and
    copied to each continuation, which runs only its own tokens (right-padded: padding after a
    continuation changes none of its positions). Falls back to loglikelihoods where the whole
    would not fit max_seq_len, or for a model whose forward takes no cache."""
    if (len(prompt) + max(map(len, continuations)) > model.config.max_seq_len or not all(continuations)
            or "cache" not in inspect.signature(model.forward).parameters):
        return loglikelihoods(model, [(prompt, c) for c in continuations], batch_size=len(continuations))
    model.eval()
    device = next(model.parameters()).device
    longest = max(map(len, continuations))
    cache = KVCache(model.config.n_layers, len(prompt) + longest - 1)  # just what is scored: cheap to copy
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache)
    first = F.log_softmax(logits[0, -1].float(), dim=-1)  # (V,): each continuation's first token
    scores = [first[c[0]].item() for c in continuations]
    if longest > 1:
        cache.expand(len(continuations))
        x = torch.zeros(len(continuations), longest - 1, dtype=torch.long)  # (K, L - 1): all but the last token
        for k, c in enumerate(continuations):
            x[k, :len(c) - 1] = torch.tensor(c[:-1])
        logits, _ = model(x.to(device), cache=cache)  # (K, L - 1, V)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for k, c in enumerate(continuations):
            rest = torch.tensor(c[1:], device=device)
            scores[k] += logprobs[k, :len(c) - 1].gather(-1, rest[:, None]).sum().item()
    return scores


def encode_pair(tokenizer, context, continuation):
    """lm-evaluation-harness's context/continuation split: trailing whitespace of the
    context moves to the continuation, and the continuation's ids are those of the whole
    string after the context's, so both tokenize as they would in running text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    # lm-eval scores an empty context after the end-of-text token
    return (context_ids or [tokenizer.eot]), whole[len(context_ids):]


def requests_of(item):
    """The (context, continuation) strings of one item, target delimiter " ". Winogrande
    items have one context per option and a shared continuation (partial scoring)."""
    if "contexts" in item:
        return [(c, " " + item["continuation"]) for c in item["contexts"]]
    return [(item["context"], " " + choice) for choice in item["choices"]]


def item_metrics(item, scores, metrics):
    """acc: the highest log-likelihood is gold; acc_norm: the same per character of the
    choice; mc2: TruthfulQA's probability mass on the true answers (item["labels"] == 1).
    np.argmax breaks ties to the first index, as lm-eval does."""
    scores = np.asarray(scores, dtype=np.float64)
    out = {}
    if "acc" in metrics:
        out["acc"] = float(np.argmax(scores) == item["gold"])
    if "acc_norm" in metrics:
        lengths = np.array([len(choice) for choice in item["choices"]], dtype=np.float64)
        out["acc_norm"] = float(np.argmax(scores / lengths) == item["gold"])
    if "mc2" in metrics:
        p = np.exp(scores - scores.max())  # lm-eval's exp(scores), normalized; shifted so it cannot underflow to 0/0
        out["acc"] = float(p[np.asarray(item["labels"]) == 1].sum() / p.sum())
    return out


def score_items(model, tokenizer, items, metrics, batch_size=16, desc=None):
    """Mean of each metric over multiple-choice items, plus their count n."""
    if not items:
        raise ValueError("no items to score")
    pairs = [requests_of(item) for item in items]
    flat = [encode_pair(tokenizer, c, k) for item_pairs in pairs for c, k in item_pairs]
    scores = loglikelihoods(model, flat, batch_size, desc)
    per_item, start = [], 0
    for item, item_pairs in zip(items, pairs):
        per_item.append(item_metrics(item, scores[start:start + len(item_pairs)], metrics))
        start += len(item_pairs)
    means = {name: float(np.mean([m[name] for m in per_item])) for name in per_item[0]}
    return {**means, "n": len(items)}



@torch.no_grad()
def mean_loss(model, batches, device, autocast):
    """The mean next-token loss over every target token (label != IGNORE_INDEX) of fixed batches
    [(x, y), ...]: each batch's mean weighted by its token count. The model is evaluated
    in eval mode and left in the mode it came in."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        n = int((y != IGNORE_INDEX).sum())
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count
