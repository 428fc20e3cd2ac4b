"""FineWeb-Edu -> uint32 token shards: the paper's pre-training corpus (Section 3.1).

    python data/fineweb_edu/prepare.py --num_tokens=10_000_000
    python data/fineweb_edu/prepare.py --num_tokens=100_000 --data_files=docs.jsonl --num_proc=1

Streams `HuggingFaceFW/fineweb-edu` (sample-10BT) from the Hugging Face Hub, or the same
schema (a `text` field per row) from local .jsonl/.json/.parquet files. Each document
becomes [eot] + encode_ordinary(text) in the full cl100k_base vocabulary, tokenized by a
process pool. The token stream is cut into:
    val_000000.bin ...    the first `val_tokens` tokens (fixed held-out tokens)
    train_000000.bin ...  the rest, `shard_size` tokens per file, up to `num_tokens` in all
    meta.json             written last, so an interrupted run is visibly incomplete
The document cut by the val/train boundary is dropped, so train starts on a fresh
document and shares no text with val; the last train document is truncated so that the
data set holds exactly `num_tokens` tokens (val + train).
"""

import argparse
import itertools
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

# Runnable as `python data/<name>/prepare.py`: the repo root must be on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.formats import EOT_TEXT, Tokenizer, get_encoding, write_meta, write_tokens

HUB_DATASET = "HuggingFaceFW/fineweb-edu"
SCHEMA = "rows with a string field 'text' (FineWeb-Edu: text, id, dump, url, date, file_path, ...)"
DOCS_PER_CHUNK = 64  # documents per pool task: large enough to amortize pickling


def load_documents(files=None, name="sample-10BT"):
    """A streaming dataset of rows: the Hub's FineWeb-Edu, or local files in its schema."""
    from datasets import load_dataset  # imported here: the testbed never needs `datasets`

    if files is None:
        return load_dataset(HUB_DATASET, name=name, split="train", streaming=True)
    builders = {"parquet" if f.endswith(".parquet") else "json" if f.endswith((".json", ".jsonl"))
                else None for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(f"data_files must all be .jsonl/.json or all .parquet, got {files}")
    return load_dataset(builders.pop(), data_files=files, split="train", streaming=True)


def iter_texts(rows):
    """The `text` of each row, checked against the expected schema; empty texts are skipped."""
    for row in rows:
        if "text" not in row:
            raise ValueError(f"expected {SCHEMA}; got a row with fields {sorted(row)}")
        if not isinstance(row["text"], str):
            raise ValueError(f"expected {SCHEMA}; got text of type {type(row['text']).__name__}")
        if row["text"]:
            yield row["text"]


def batched(iterable, n):
    """Lists of n items (the last may be shorter); itertools.batched needs Python 3.12."""
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


def tokenize_documents(texts: list[str]) -> np.ndarray:
    """[eot] + encode_ordinary(text) for each document, concatenated (runs in a pool worker)."""
    enc = get_encoding()
    eot = enc.encode_single_token(EOT_TEXT)
    return np.array([t for ids in enc.encode_ordinary_batch(texts, num_threads=1)
                     for t in [eot, *ids]], dtype=np.uint32)


class ShardWriter:
    """Collects tokens and writes them as `{split}_000000.bin`, ... of `shard_size` tokens."""

    def __init__(self, out_dir: Path, split: str, shard_size: int, eot: int):
        self.out_dir, self.split, self.shard_size, self.eot = out_dir, split, shard_size, eot
        self.buffer, self.buffered, self.files = [], 0, []
        self.num_tokens = self.num_documents = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self.num_tokens += len(tokens)
        self.num_documents += int(np.count_nonzero(tokens == self.eot))
        while self.buffered >= self.shard_size:
            self.write(self.shard_size)

    def write(self, n: int) -> None:
        tokens = np.concatenate(self.buffer)
        name = f"{self.split}_{len(self.files):06d}.bin"
        write_tokens(self.out_dir / name, tokens[:n])
        self.files.append(name)
        self.buffer, self.buffered = [tokens[n:]], len(tokens) - n

    def close(self) -> None:
        if self.buffered:
            self.write(self.buffered)


def fill(token_chunks, val, val_tokens, train, train_tokens, eot):
    """Write the tokenized documents: the first val_tokens to val, then, from the next
    document's start on, up to train_tokens to train. Prints progress every 5 s."""
    num_tokens, seeking_document_start = val_tokens + train_tokens, False
    start = last_print = time.time()
    for tokens in token_chunks:
        if val.num_tokens < val_tokens:
            take = min(val_tokens - val.num_tokens, len(tokens))
            val.add(tokens[:take])
            tokens = tokens[take:]
            seeking_document_start = val.num_tokens == val_tokens
        if seeking_document_start:  # drop the rest of the document cut by the val boundary
            starts = np.flatnonzero(tokens == eot)
            if len(starts) == 0:
                continue
            tokens, seeking_document_start = tokens[starts[0]:], False
        train.add(tokens[:train_tokens - train.num_tokens])
        done = val.num_tokens + train.num_tokens
        if time.time() - last_print > 5 or train.num_tokens == train_tokens:
            last_print = time.time()
            rate = done / max(last_print - start, 1e-6)
            print(f"{done:,}/{num_tokens:,} tokens ({100 * done / num_tokens:.1f}%), "
                  f"{rate:,.0f} tokens/s, ETA {(num_tokens - done) / rate:.0f} s", flush=True)
        if train.num_tokens == train_tokens:
            break


def check_filled(val, val_tokens, train, train_tokens):
    if val.num_documents == 0:
        raise ValueError(f"no documents with text found; expected {SCHEMA}")
    if val.num_tokens < val_tokens or train.num_tokens == 0:
        raise ValueError(f"the source ran out after {val.num_tokens + train.num_tokens:,} tokens: "
                         f"not enough for {val_tokens:,} val tokens and a train split")
    if train.num_tokens < train_tokens:
        print(f"warning: the source ran out; train has {train.num_tokens:,} tokens, "
              f"not {train_tokens:,}")


def prepare(out_dir, num_tokens: int, *, data_files=None, val_tokens: int = 1_000_000,
            shard_size: int = 100_000_000, num_proc: int = os.cpu_count(),
            name: str = "sample-10BT") -> dict:
    """Tokenize FineWeb-Edu into `out_dir`; returns the meta.json it wrote."""
    if not 0 < val_tokens < num_tokens:
        raise ValueError(f"need 0 < val_tokens < num_tokens, got {val_tokens} and {num_tokens}")
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    files = None if data_files is None else [str(f) for f in data_files]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a previous run's files must not pass for this run's: meta.json goes first, shards too
    for old in [out_dir / "meta.json", *out_dir.glob("train_*.bin"), *out_dir.glob("val_*.bin")]:
        old.unlink(missing_ok=True)

    eot = get_encoding().encode_single_token(EOT_TEXT)
    val = ShardWriter(out_dir, "val", shard_size, eot)
    train = ShardWriter(out_dir, "train", shard_size, eot)
    train_tokens = num_tokens - val_tokens
    chunks = batched(iter_texts(load_documents(files, name)), DOCS_PER_CHUNK)
    pool = Pool(num_proc) if num_proc > 1 else None
    start = time.time()
    try:
        fill(pool.imap(tokenize_documents, chunks) if pool else map(tokenize_documents, chunks),
             val, val_tokens, train, train_tokens, eot)
    finally:
        if pool:
            pool.terminate()
    val.close()
    train.close()
    check_filled(val, val_tokens, train, train_tokens)

    tokenizer = Tokenizer()
    meta = {
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "splits": {"train": train.files, "val": val.files},
        "num_tokens": {"train": train.num_tokens, "val": val.num_tokens},
        "num_documents": {"train": train.num_documents, "val": val.num_documents},
        "dtype": "uint32",
        "documents": "each is [eot] + encode_ordinary(text); the last train document is truncated",
        "made_by": {
            "script": "data/fineweb_edu/prepare.py",
            "source": HUB_DATASET if files is None else files,
            "name": name if files is None else None,
            "args": {"num_tokens": num_tokens, "val_tokens": val_tokens, "shard_size": shard_size},
            "seed": None,  # nothing random: documents are taken in the dataset's order
        },
    }
    write_meta(out_dir, meta)
    print(f"wrote {out_dir}: {val.num_tokens:,} val tokens, {train.num_tokens:,} train tokens "
          f"in {len(train.files)} shard(s), {time.time() - start:.1f} s")
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_tokens", type=int, required=True, help="tokens in all (val + train)")
    parser.add_argument("--val_tokens", type=int, default=1_000_000,
                        help="held-out tokens (the first ones)")
    parser.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per .bin file")
    parser.add_argument("--data_files", nargs="+", default=None,
                        help="local .jsonl/.json/.parquet files in FineWeb-Edu's schema "
                             "(default: stream the Hub)")
    parser.add_argument("--name", default="sample-10BT", help="FineWeb-Edu config on the Hub")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent),
                        help="output directory")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes")
    args = parser.parse_args()
    prepare(args.out_dir, args.num_tokens, data_files=args.data_files, val_tokens=args.val_tokens,
            shard_size=args.shard_size, num_proc=args.num_proc, name=args.name)


if __name__ == "__main__":
    main()
