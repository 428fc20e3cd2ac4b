"""SFT conversations, from where they live to tokenized examples: Tulu 3 on the Hub or a local
file in its schema (a `messages` column of {role, content} turns), read with Hugging Face
`datasets` and split 9:1 as the paper does (Appendix D); or a testbed's SFT files (data/testbed);
then rendered with the tulu chat template (data/chat.py) into (ids, labels) by
`datasets.Dataset.map` over worker processes. sft.py trains on them; the seeded order of every
update is update_batches'. Tulu 3 stays a `datasets.Dataset` (Arrow, memory-mapped) until its
tokens are numpy arrays: its 939k conversations are never a Python list.
"""

import hashlib
import json
import os

import numpy as np
from datasets import Dataset, load_dataset

from data.chat import has_supervision, render
from data.formats import Tokenizer, load_meta, load_rows, read_jsonl
from data.loaders import testbed_of

TULU3 = "allenai/tulu-3-sft-olmo-2-mixture"


def load_messages(name):
    """The `messages` column of Tulu 3 or of a local file, through Hugging Face `datasets`."""
    kinds = (".jsonl", ".json", ".parquet")
    if name != "tulu3" and not (name.endswith(kinds) and os.path.isfile(name)):
        raise SystemExit(f"error: unknown data set {name!r}: use testbed, tulu3, a testbed folder, "
                         f"or an existing {'/'.join(kinds)} file with a `messages` column")
    if name != "tulu3":
        rows = load_rows(name)  # a malformed file: its own error, with the line
        columns = sorted({key for row in rows for key in row})
    else:
        try:
            rows = load_dataset(TULU3, split="train")  # no official split: the paper makes its own 9:1
        except Exception as e:  # offline (the Hub): say which data set and what to do
            raise SystemExit(f"error: cannot load data set {TULU3} ({type(e).__name__}: {e}); offline, "
                             f"pass a local copy: --dataset=path/to/file.parquet") from None
        columns = rows.column_names
    if "messages" not in columns:
        raise SystemExit(f"error: data set {name!r} has no `messages` column (it has {columns})")
    if name == "tulu3":
        return rows.select_columns(["messages"])
    for i, row in enumerate(rows):
        check_messages(row.get("messages"), f"{name}, row {i + 1}")
    return [row["messages"] for row in rows]


def check_messages(messages, where):
    """Exit naming `where` unless `messages` is a list of {"role": str, "content": str}."""
    bad = not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if bad:
        raise SystemExit(f"error: {where}: `messages` must be a list of {{\"role\": ..., \"content\": ...}} objects "
                         f"with text values, as Tulu 3's; it is {json.dumps(messages)[:80]}")


def take(conversations, indices):
    """The conversations at `indices`: of a list, or of a Dataset (Dataset.select, no copy)."""
    if isinstance(conversations, Dataset):
        return conversations.select(indices)
    return [conversations[i] for i in indices]


def message_lists(conversations):
    """Each conversation's list of messages, from a list or a Dataset."""
    return conversations["messages"] if isinstance(conversations, Dataset) else conversations


def split_train_val(conversations, seed):
    """The paper's own 9:1 train/validation split (Appendix D), seeded."""
    order = np.random.default_rng(seed).permutation(len(conversations))
    n_val = max(1, len(conversations) // 10)
    return take(conversations, order[n_val:]), take(conversations, order[:n_val])


def load_data(cfg, tokenizer):
    """(train conversations, val conversations, testbed folder or None). Tulu 3 or a file may be
    any text: the checkpoint's tokenizer encodes it (a compact one spells unknown tokens in bytes).
    A testbed must have been tokenized with the checkpoint's own vocabulary."""
    testbed = testbed_of(cfg.dataset)
    if testbed is None:
        conversations = load_messages(cfg.dataset)
        if len(conversations) < 2:
            raise SystemExit(f"error: data set {cfg.dataset!r} has {len(conversations)} conversation(s); the 9:1 "
                             f"train/validation split needs at least 2 (10 or more to train on 9 in 10)")
        train, val = split_train_val(conversations, cfg.seed)
        return (take(train, range(min(cfg.max_train or len(train), len(train)))),
                take(val, range(min(cfg.max_val or len(val), len(val)))), None)
    try:
        testbed_tokenizer = Tokenizer.from_dict(load_meta(testbed)["tokenizer"])
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if testbed_tokenizer != tokenizer:
        raise SystemExit(f"error: the testbed at {testbed} uses a different tokenizer/vocabulary than "
                         f"--init_from={cfg.init_from}; fine-tune a checkpoint pre-trained on this testbed")
    train, val = (read_jsonl(os.path.join(testbed, f)) for f in ("sft_train.jsonl", "sft_select.jsonl"))
    if not train or not val:
        raise SystemExit(f"error: the testbed at {testbed} has an empty SFT file; re-run data/testbed/prepare.py")
    return [r["messages"] for r in train], [r["messages"] for r in val], testbed


def tokenize(conversations, tokenizer, seq_len, split, num_proc=0):
    """([(ids, labels)] of the conversations that keep supervision after the cut, the number
    of those whose answers the cut removes, the number without an assistant turn): the last
    two would add nothing to the loss, so they are left out of the batches, and counted so
    that nothing is dropped silently. The rendering runs
    as Dataset.map over num_proc processes (0: one per CPU core from 10,000 conversations on;
    fewer run in this process)."""
    rows = conversations if isinstance(conversations, Dataset) else Dataset.from_dict({"messages": conversations})
    if num_proc == 0:
        num_proc = min(os.cpu_count() or 1, 32) if len(rows) >= 10_000 else None

    def render_row(row, index):
        answered = any(isinstance(m, dict) and m.get("role") == "assistant" for m in row["messages"] or [])
        try:
            ids, labels = render(row["messages"], tokenizer, max_len=seq_len)
        except ValueError as e:
            return {"ids": [], "labels": [], "supervised": False, "answered": answered,
                    "error": f"{split} conversation {index}: {e}"}
        # labels[0] has no token before it to predict it from
        return {"ids": ids, "labels": labels, "supervised": has_supervision(labels[1:]), "answered": answered,
                "error": ""}

    # The fingerprint names the result for datasets' cache; hashing render_row's closure (the
    # tokenizer) would not be stable, and would warn.
    key = f"{getattr(rows, '_fingerprint', '')} {tokenizer.to_dict()} {seq_len} {split}"
    rendered = rows.map(render_row, with_indices=True, num_proc=num_proc, remove_columns=rows.column_names,
                        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32], desc=f"tokenizing {split}")
    errors = [e for e in rendered["error"] if e]
    if errors:
        raise SystemExit(f"error: {errors[0]}")
    examples, cut, unanswered = [], 0, 0
    for batch in rendered.iter(batch_size=1024):
        for ids, labels, supervised, answered in zip(batch["ids"], batch["labels"], batch["supervised"],
                                                     batch["answered"]):
            if supervised:
                examples.append((np.array(ids, dtype=np.int32), np.array(labels, dtype=np.int32)))  # Tulu 3: GBs
            elif answered:
                cut += 1
            else:
                unanswered += 1
    return examples, cut, unanswered


def update_batches(num_examples, cfg):
    """The example indices of each update: `epochs` seeded permutations one after another,
    cut into global batches (the last one may be smaller). The same for every LR."""
    order = np.concatenate([np.random.default_rng([cfg.seed, epoch]).permutation(num_examples)
                            for epoch in range(cfg.epochs)])
    return [order[i:i + cfg.global_batch_size].tolist() for i in range(0, len(order), cfg.global_batch_size)]
