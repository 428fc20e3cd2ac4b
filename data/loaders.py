"""From prepared data to the batches a model sees: where a data set lives, the training
windows, the fixed held-out tokens, and padded batches of chat-rendered conversations.

    resolve_dataset("testbed")        # a name or a directory -> its prepared directory
    testbed_of(data_dir)              # the testbed folder (probes, SFT files) it belongs to
    TokenWindows(shards, T, seed)     # training samples, a pure function of (seed, k)
    validation_batches(...)           # the first eval_tokens of the val split, in order
    pretrain_batches(...)             # the same, as the fixed sequences sharpness is measured on
    sft_batches(...), pad_collate(...)  # conversations -> right-padded (x, y), y = IGNORE_INDEX off the answer

The formats themselves (meta.json, token files, the tokenizer) are data/formats.py's; the
chat template and its loss mask are data/chat.py's. Nothing here runs on its own: train.py,
sft.py, evaluate.py and sharpness.py import it.
"""

import importlib
import os

import numpy as np
import torch

from data.chat import has_supervision, render
from data.formats import load_split, read_jsonl
from model import IGNORE_INDEX

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
NAMED = {"testbed": "testbed/pretrain", "testbed_mid": "testbed/mid", "hmm": "hmm/pretrain", "hmm_mid": "hmm/mid",
         "fineweb_edu": "fineweb_edu"}
GENERATED = {"testbed": "data.testbed.prepare", "hmm": "data.hmm.prepare"}  # made on first use


# ------------------------------------------------------------------- where data lives

def resolve_dataset(name):
    """A data set name -> its prepared directory; the testbed is generated on first use."""
    if name in NAMED:
        path = os.path.join(DATA_DIR, NAMED[name])
        generator = GENERATED.get(name.split("_")[0])
        if generator:
            module, folder = importlib.import_module(generator), os.path.join(DATA_DIR, name.split("_")[0])
            if not module.is_prepared(folder):
                module.prepare(folder)
        if not os.path.exists(os.path.join(path, "meta.json")):
            raise SystemExit(f"error: data set {name!r} is not prepared; run python data/{name}/prepare.py --help")
        return path
    if os.path.exists(os.path.join(name, "meta.json")):
        return name
    if os.path.isdir(name):
        raise SystemExit(f"error: {name} holds no meta.json, so it is not prepared data; make it with "
                         f"data/<name>/prepare.py --out_dir={name} (or pass the folder that has the meta.json)")
    if os.sep in name or name.startswith("."):
        raise SystemExit(f"error: data set {name}: no such directory")
    raise SystemExit(f"error: unknown data set {name!r}: use one of {sorted(NAMED)} "
                     f"or a directory holding a prepared meta.json")


def testbed_of(dataset):
    """The testbed folder made by data/testbed/prepare.py that `dataset` belongs to, or None:
    for "testbed", "hmm" or their _mid the default one (prepared on first use); for a directory,
    itself or its parent, whichever holds the SFT and probe files (they sit beside the
    pretrain/ and mid/ corpora)."""
    if dataset in ("testbed", "testbed_mid", "hmm", "hmm_mid"):
        return os.path.dirname(resolve_dataset(dataset))
    if not os.path.isdir(dataset):
        return None
    for directory in (dataset, os.path.dirname(os.path.abspath(dataset))):
        if os.path.isfile(os.path.join(directory, "sft_train.jsonl")):
            return directory
    return None


# ------------------------------------------------------------------ pre-training text

class TokenWindows:
    """Training batches: the token stream cut into windows of seq_len + 1 tokens, each
    epoch in a new seeded order (and a seeded shift of the window grid, so boundaries
    move). Sample k is a pure function of (seed, k): the data position is just the
    number of samples consumed, which makes resuming and DDP splitting exact."""

    def __init__(self, shards, seq_len, seed):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        # (len - T) // T windows fit in a shard whatever the shift in [0, T).
        counts = np.array([max((len(s) - seq_len) // seq_len, 0) for s in shards])
        self.first_window = np.concatenate([[0], np.cumsum(counts)])
        self.num_windows = int(counts.sum())
        if self.num_windows == 0:
            total = sum(len(s) for s in shards)
            raise SystemExit(f"error: the training split has {total} tokens, too few for one window of "
                             f"seq_len={seq_len} (need >= {2 * seq_len}); lower --seq_len or prepare more data")
        self._epoch, self._order, self._shift = None, None, None

    def _start_epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        self._epoch, self._order, self._shift = epoch, rng.permutation(self.num_windows), int(rng.integers(self.seq_len))

    def batch(self, first_sample, batch_size):
        rows = []
        for k in range(first_sample, first_sample + batch_size):
            epoch, i = divmod(k, self.num_windows)
            if epoch != self._epoch:
                self._start_epoch(epoch)
            w = int(self._order[i])
            shard = int(np.searchsorted(self.first_window, w, side="right")) - 1
            start = self._shift + (w - self.first_window[shard]) * self.seq_len
            rows.append(self.shards[shard][start:start + self.seq_len + 1])
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        return xy[:, :-1], xy[:, 1:]


def first_tokens(shards, n):
    """The first n tokens of a split (fewer if it is shorter), reading no more than that."""
    return np.concatenate([np.asarray(s[:n]) for s in shards])[:n]


def windows(tokens, seq_len, batch_size, num_windows):
    """[(x, y)] of consecutive windows of seq_len + 1 tokens, y = x shifted by one."""
    ids = torch.from_numpy(tokens[:num_windows * seq_len + 1].astype(np.int64))
    x, y = ids[:-1].view(-1, seq_len), ids[1:].view(-1, seq_len)  # (windows, T)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, num_windows, batch_size)]


def validation_batches(shards, seq_len, eval_tokens, batch_size):
    """Fixed held-out tokens: the first eval_tokens of the val split, in order."""
    tokens = first_tokens(shards, eval_tokens + 1)
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        raise SystemExit(f"error: the val split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
    return windows(tokens, seq_len, batch_size, n)


def pretrain_batches(data_dir, seq_len, batch_size, num_batches, split="val"):
    """The first num_batches * batch_size windows of seq_len + 1 tokens of the split
    (val: held out, as the paper; train: where training sought a minimum), in order
    (the same tokens for every checkpoint)."""
    tokens = first_tokens(load_split(data_dir, split), num_batches * batch_size * seq_len + 1)
    num_windows = min((len(tokens) - 1) // seq_len, num_batches * batch_size) // batch_size * batch_size
    if num_windows == 0:
        raise ValueError(f"the {split} split of {data_dir} has {len(tokens)} tokens, too few for one batch of "
                         f"{batch_size} x {seq_len + 1}; lower --seq_len or --batch_size")
    return windows(tokens, seq_len, batch_size, num_windows)


# ---------------------------------------------------------------------- conversations

def pad_collate(examples, pad_id):
    """Right-padded (x, y) of [(ids, labels)] with y = next token's label, IGNORE_INDEX on padding.
    The causal mask keeps real tokens from attending to the padding after them, so no
    attention mask is needed."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels) in enumerate(examples):
        x[row, :len(ids) - 1] = torch.as_tensor(ids[:-1])
        y[row, :len(ids) - 1] = torch.as_tensor(labels[1:])
    return x, y


def sft_batches(sft_jsonl, tokenizer, seq_len, batch_size, num_batches):
    """The first conversations of sft_jsonl rendered with the tulu template (data/chat.py),
    cut to seq_len + 1 tokens, in batches padded with eot (pad_collate). Conversations whose
    answer the cut removes are skipped, and counted."""
    batches, rows, skipped = [], [], 0
    conversations = read_jsonl(sft_jsonl)
    if not conversations:
        raise ValueError(f"{sft_jsonl} has no rows")
    for row in conversations:
        if len(batches) == num_batches:
            break
        if "messages" not in row:
            raise ValueError(f"{sft_jsonl}: a row without a \"messages\" field (it has {sorted(row)})")
        if not any(m.get("role") == "assistant" for m in row["messages"]):
            raise ValueError(f"{sft_jsonl}: a conversation without an assistant turn; the Hessian is of the loss on "
                             f"assistant answers, so each conversation needs one")
        ids, labels = render(row["messages"], tokenizer, max_len=seq_len + 1)
        if not has_supervision(labels[1:]):
            skipped += 1
            continue
        rows.append((ids, labels))
        if len(rows) == batch_size:
            batches.append(pad_collate(rows, tokenizer.eot))
            rows = []
    if skipped:
        print(f"note: {skipped} conversations of {sft_jsonl} had no answer token within seq_len={seq_len}; skipped")
    if not batches:
        raise ValueError(f"{sft_jsonl} has no conversation with an answer within seq_len={seq_len} "
                         f"(or fewer than batch_size={batch_size} such conversations)")
    return batches
