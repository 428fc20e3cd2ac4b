"""data/hmm/prepare.py: the language's likelihood equals brute force over hidden paths, its
entropy floor equals an exact enumeration and a Monte-Carlo estimate, and the prepared
testbed is deterministic, one token per filler word, its SFT answers spelled as the
biographies spell them."""

import itertools
import json
import math

import numpy as np
import pytest

from data.formats import Tokenizer, load_meta, load_split
from data.hmm import prepare as hmm
from data.testbed import prepare as testbed


def tiny_hmm():
    """2 states, 3 words: small enough to enumerate every hidden path and document."""
    transition = np.array([[0.7, 0.3], [0.4, 0.6]])
    emission = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    start = np.array([0.4, 0.6])
    return start, transition, emission


DOC = (2, 3)  # documents of 2 or 3 words, each length with probability 1/2


def brute_force_nats(model, words):
    """-log p([words] then the end) summed over every hidden path, with the length's chance."""
    start, transition, emission = model
    total = 0.0
    for path in itertools.product(range(len(start)), repeat=len(words)):
        p = start[path[0]] * emission[path[0], words[0]]
        for a, b, w in zip(path, path[1:], words[1:]):
            p *= transition[a, b] * emission[b, w]
        total += p
    return -math.log(total * 0.5)


def test_forward_algorithm_equals_the_sum_over_hidden_paths():
    model = tiny_hmm()
    for n in DOC:
        for words in itertools.product(range(3), repeat=n):
            if any(model[2][:, w].sum() == 0 for w in words):
                continue
            nats = hmm.document_nats(model, np.array(words), DOC)
            assert len(nats) == n + 1
            assert nats.sum() == pytest.approx(brute_force_nats(model, words), rel=1e-12)


def test_entropy_floor_equals_enumeration_and_a_monte_carlo_estimate():
    """Per token, the floor of sampled documents tends to E[-log p(doc)] / E[tokens per doc],
    both enumerated exactly; 20,000 documents land within 4 standard errors of it."""
    model = tiny_hmm()
    entropy, tokens = 0.0, 0.0
    for n in DOC:
        for words in itertools.product(range(3), repeat=n):
            nats = brute_force_nats(model, words)
            p = math.exp(-nats)
            entropy, tokens = entropy + p * nats, tokens + p * (n + 1)
    documents = hmm.sample_documents(model, 70_000, np.random.default_rng(0), DOC)
    per_doc = np.array([hmm.document_nats(model, d, DOC).sum() for d in documents])
    lengths = np.array([len(d) + 1 for d in documents])
    estimate = per_doc.sum() / lengths.sum()
    stderr = np.std(per_doc - estimate * lengths, ddof=1) / math.sqrt(len(documents)) / lengths.mean()
    assert hmm.entropy_floor(model, documents, DOC) == pytest.approx(estimate, rel=1e-12)
    assert abs(estimate - entropy / tokens) < 4 * stderr


def test_the_generated_language_is_a_proper_hmm():
    start, transition, emission = hmm.make_hmm(seed=3, n_words=50, n_states=6, words_per_state=5)
    assert np.allclose(transition.sum(1), 1) and np.allclose(emission.sum(1), 1)
    assert np.allclose(start @ transition, start) and start.min() > 0  # stationary
    assert ((emission > 0).sum(1) == 5).all()
    again = hmm.make_hmm(seed=3, n_words=50, n_states=6, words_per_state=5)
    assert all(np.array_equal(a, b) for a, b in zip((start, transition, emission), again))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("hmm")
    meta = hmm.prepare(root / "a", seed=0, train_tokens=30_000, val_tokens=6_000, exposures=3, n_people=40)
    hmm.prepare(root / "b", seed=0, train_tokens=30_000, val_tokens=6_000, exposures=3, n_people=40)
    return root, meta


def test_prepared_testbed_is_deterministic_and_holds_its_floor(small):
    root, meta = small
    files = {d: {str(p.relative_to(root / d)): p.read_bytes() for p in sorted((root / d).rglob("*")) if p.is_file()}
             for d in ("a", "b")}
    assert files["a"] == files["b"]
    assert {"pretrain/train_000000.bin", "pretrain/val_000000.bin", "sft_train.jsonl", "sft_test.jsonl",
            "probes.jsonl", "hmm.npz", "meta.json"} <= set(files["a"])
    # the floor in meta.json is the val split's, recomputed from its tokens and hmm.npz
    saved = np.load(root / "a" / "hmm.npz")
    model, words = (saved["start"], saved["transition"], saved["emission"]), list(saved["words"])
    tokenizer = Tokenizer.from_dict(load_meta(root / "a")["tokenizer"])
    text = tokenizer.decode(np.concatenate(load_split(root / "a" / "pretrain", "val")))
    index = {w: i for i, w in enumerate(words)}
    documents = [np.array([index[w] for w in doc.split()]) for doc in text.split("<|endoftext|>")[1:]]
    assert meta["entropy_floor"]["val"] == pytest.approx(hmm.entropy_floor(model, documents), rel=1e-12)
    assert 1.5 < meta["entropy_floor"]["val"] < math.log(len(words))


def test_filler_words_are_one_token_each_and_answers_are_spelled_as_biographies_spell_them(small):
    root, _ = small
    tokenizer = Tokenizer.from_dict(load_meta(root / "a")["tokenizer"])
    words = list(np.load(root / "a" / "hmm.npz")["words"])
    assert len(tokenizer.encode(" " + " ".join(words))) == len(words) == hmm.N_WORDS
    tokens = np.concatenate(load_split(root / "a" / "pretrain", "train")).tolist()
    people = json.loads((root / "a" / "people.json").read_text())
    for split in ("sft_train", "sft_select", "sft_test"):
        rows = [json.loads(line) for line in (root / "a" / f"{split}.jsonl").read_text().splitlines()]
        assert rows and {r["person"] for r in rows} <= {p["name"] for p in people}
        for row in rows[:20]:
            answer = tokenizer.encode(row["messages"][-1]["content"])
            assert any(tokens[i:i + len(answer)] == answer for i in range(len(tokens) - len(answer) + 1))
    text = tokenizer.decode(tokens)
    for person in people[:5]:  # each biography `exposures` times, each value in every one
        assert text.count(f"{person['name']} ") >= 3 * len(testbed.ATTRIBUTES)
