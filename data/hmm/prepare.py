"""A testbed in the paper's regime: text with irreducible entropy, facts as a long tail.

    python data/hmm/prepare.py [--out_dir=data/hmm] [--seed=0] [--train_tokens=2600000] [--exposures=50]

The biography testbed (data/testbed) is a memorization regime: 41.5k tokens seen ~59 times,
loss near zero, and there the Hessian trace shrinks as facts are memorized. Pre-training in
the paper is the opposite: natural text, seen about once, its loss far above zero. Here:
- the filler text is sampled from a random hidden Markov model (HMM) over N_WORDS single-token
  words (cl100k's " word" tokens of 3-10 lowercase letters; some are word pieces: " particip"):
  N_STATES hidden states, each emitting WORDS_PER_STATE words with Zipf weights 1/rank, moving
  between states by a sparse random transition matrix (Dirichlet(TRANSITION_CONCENTRATION)
  rows). Documents of DOC_WORDS words (uniform) start from the stationary distribution. No
  model predicts the next token better than the HMM's own forward algorithm: that floor, in
  nats per token, is computed exactly for the validation text (entropy_floor, in meta.json),
  so a validation loss reads as the floor plus what the model has not learned;
- the facts are the biography testbed's people (data/testbed/prepare.py), each person's
  biography appearing `exposures` times among the filler documents (cycling through the 5
  phrasings, sentences in new orders): long-tail knowledge with a controlled count;
- SFT asks about them with the testbed's questions, answers spelled as the biographies spell
  them (the same token ids), with the testbed's people splits; probes.jsonl and mid/ as the
  testbed's.
The sizes (language C of docs/LOG.md's pilots, the tiny model, the study's 600 updates of
32 x 128 tokens = 2.46M tokens, one thread):

    language                                   floor   WSO val  WSD val  recall  what it gave
    A: 96 states, 40 words, Dirichlet 0.05,    5.22    5.98     5.99     2%      still learning fast at
       10 exposures                                                               the end: no premise
    B: 64 states, 12 words, 0.02, 10 exp.      3.18    3.27     3.23     -       0.09 above the floor:
                                                                                  premise, facts not stored
    C: 80 states, 20 words, 0.03, 50 exp.      4.18    4.38     4.31     24-38%  premise on every seed,
       (the defaults)                                                             facts partly stored

C's held-out loss stays 4.3 nats above zero and 0.12-0.20 above its floor, the corpus (3.0M
tokens: 2.6M of HMM text, 150 people x 50 biographies) is seen 0.82 times, decay lowers the
loss by 0.072 on each of 3 seeds, and greedy recall (24-38%) and the 4-way probes (68-86%) sit
between floor and ceiling, so SFT has something to bring out and room to show it. The
defaults write exactly what `--n_states=80 --words_per_state=20 --concentration=0.03
--exposures=50` wrote for the pilots.

Output (deterministic in the seed; meta.json files last):
    pretrain/{train_000000.bin, val_000000.bin, meta.json}  val: HMM text only
    mid/...  sft_train.jsonl  sft_select.jsonl  sft_test.jsonl  probes.jsonl  mid_probes.jsonl
    people.json  hmm.npz (start, transition, emission, words)  meta.json (entropy_floor, ...)
"""

import argparse
import io
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

# Runnable as `python data/<name>/prepare.py`: the repo root must be on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.formats import get_encoding, load_meta, write_atomic, write_jsonl, write_meta  # noqa: E402
from data.testbed import prepare as testbed  # noqa: E402

VERSION = 2  # 2: language C's sizes (1: language A's)
N_WORDS = 1500  # the vocabulary of the filler text
N_STATES = 80
WORDS_PER_STATE = 20
TRANSITION_CONCENTRATION = 0.03  # Dirichlet parameter of each state's row: a few likely successors
DOC_WORDS = (64, 512)  # document lengths in words, uniform (inclusive)
TRAIN_TOKENS = 2_600_000
VAL_TOKENS = 131_072  # 2 x train.py's default eval_tokens
EXPOSURES = 50  # documents per person: its biography phrasings, cycled


# ------------------------------------------------------------------ the language

def english_words(n=N_WORDS):
    """The n lowest cl100k ids whose token is a space and 3-10 lowercase letters (" house"):
    each is one token wherever it stands after a space, so text of them has one id per word."""
    enc, words = get_encoding(), []
    for i in range(enc.n_vocab):
        try:
            piece = enc.decode_single_token_bytes(i)
        except KeyError:
            continue
        if re.fullmatch(rb" [a-z]{3,10}", piece) and enc.encode_ordinary(piece.decode()) == [i]:  # BPE makes it
            words.append(piece.decode()[1:])
            if len(words) == n:
                return words
    raise ValueError(f"cl100k has fewer than {n} such words")


def make_hmm(seed, n_words=N_WORDS, n_states=N_STATES, words_per_state=WORDS_PER_STATE,
             concentration=TRANSITION_CONCENTRATION):
    """(start, transition, emission): the stationary distribution (n_states,), the row-stochastic
    transition matrix (n_states, n_states) and emission matrix (n_states, n_words)."""
    rng = np.random.default_rng([seed, 1729])
    transition = rng.dirichlet(np.full(n_states, concentration), size=n_states)
    transition = (transition + 1e-6) / (transition + 1e-6).sum(1, keepdims=True)  # irreducible
    zipf = 1.0 / np.arange(1, words_per_state + 1)
    emission = np.zeros((n_states, n_words))
    for s in range(n_states):
        emission[s, rng.choice(n_words, words_per_state, replace=False)] = zipf / zipf.sum()
    values, vectors = np.linalg.eig(transition.T)
    start = np.abs(np.real(vectors[:, np.argmin(np.abs(values - 1))]))
    return start / start.sum(), transition, emission


def sample_documents(hmm, n_tokens, rng, doc_words=DOC_WORDS):
    """Documents (arrays of word indices) until they hold n_tokens tokens, each counted with
    its separator: a document of n words is n + 1 tokens."""
    start, transition, emission = hmm
    cum_t, cum_e = transition.cumsum(1), emission.cumsum(1)
    documents, total = [], 0
    while total < n_tokens:
        n = int(rng.integers(doc_words[0], doc_words[1] + 1))
        u = rng.random((n, 2))
        states = np.empty(n, dtype=np.int64)
        states[0] = min(np.searchsorted(start.cumsum(), u[0, 0]), len(start) - 1)
        for t in range(1, n):
            states[t] = min(np.searchsorted(cum_t[states[t - 1]], u[t, 0]), len(start) - 1)
        words = np.minimum((cum_e[states] < u[:, 1:]).sum(1), emission.shape[1] - 1)
        documents.append(words)
        total += n + 1
    return documents


def document_nats(hmm, words, doc_words=DOC_WORDS):
    """-log p of each token the model predicts in [eot] + document, under the true process:
    each word given the words before it (the forward algorithm, scaled), times the chance
    that the document goes on; then the eot that ends it. Returns len(words) + 1 values."""
    start, transition, emission = hmm
    low, high = doc_words
    nats, belief = np.empty(len(words) + 1), start
    for k, w in enumerate(words):  # k words seen so far
        joint = (belief if k == 0 else belief @ transition) * emission[:, w]
        p_word = joint.sum()
        go_on = 1.0 if k < low else 1 - 1 / (high - k + 1)  # the length is uniform on [low, high]
        nats[k] = -np.log(p_word * go_on)
        belief = joint / p_word
    n = len(words)
    nats[n] = -np.log(1 / (high - n + 1))  # the document ends after n words
    return nats


def entropy_floor(hmm, documents, doc_words=DOC_WORDS):
    """Mean nats per predicted token of the documents under the generator: the loss of a
    model that knows the HMM and sees every document from its start."""
    return float(np.concatenate([document_nats(hmm, d, doc_words) for d in documents]).mean())


# ------------------------------------------------------------------ the testbed

def corpus(hmm_documents, words, people, exposures, rng):
    """Filler documents (strings) and each person's biography `exposures` times, shuffled."""
    documents = [" " + " ".join(words[i] for i in doc) for doc in hmm_documents]
    for person in people:
        for k in range(exposures):
            template = testbed.PRETRAIN_TEMPLATES[k % len(testbed.PRETRAIN_TEMPLATES)]
            documents.append(testbed.text_of(testbed.biography(template, person, rng)))
    rng.shuffle(documents)
    return documents


def prepare(out_dir="data/hmm", seed=0, train_tokens=TRAIN_TOKENS, val_tokens=VAL_TOKENS, exposures=EXPOSURES,
            n_people=testbed.N_PEOPLE, n_states=N_STATES, words_per_state=WORDS_PER_STATE,
            concentration=TRANSITION_CONCENTRATION):
    """Write the corpus, the testbed's SFT and probe files and meta.json; returns meta."""
    begin, out_dir = time.time(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    words, hmm = english_words(), make_hmm(seed, N_WORDS, n_states, words_per_state, concentration)
    rng = np.random.default_rng([seed, 1])
    train_docs, val_docs = sample_documents(hmm, train_tokens, rng), sample_documents(hmm, val_tokens, rng)
    floor = entropy_floor(hmm, val_docs)
    people = testbed.make_people(seed, n_people, n_people * testbed.N_SFT_TRAIN // testbed.N_PEOPLE,
                                 n_people * testbed.N_SFT_SELECT // testbed.N_PEOPLE)
    mid = testbed.make_corpora(people, seed)["mid"]
    pretrain = {"train": corpus(train_docs, words, people, exposures, random.Random(f"{seed}:hmm")),
                "val": [" " + " ".join(words[i] for i in doc) for doc in val_docs]}
    sft_rng, probe_rng = random.Random(f"{seed}:sft"), random.Random(f"{seed}:probes")
    jsonl = {file: testbed.make_sft(people, split, sft_rng, testbed.SFT_QUESTIONS)
             for split, file in testbed.SFT_FILES.items()}
    jsonl["probes.jsonl"] = testbed.make_probes(people, testbed.PROBE_STEMS, probe_rng)
    jsonl["mid_probes.jsonl"] = testbed.make_probes(people, testbed.MID_PROBE_STEMS, probe_rng)
    every_word = {"all": [" " + " ".join(words)]}  # so the vocabulary does not depend on the sample
    tokenizer = testbed.compact_tokenizer(people, {"pretrain": pretrain, "mid": mid, "words": every_word},
                                          jsonl["probes.jsonl"] + jsonl["mid_probes.jsonl"])
    for name, rows in jsonl.items():
        write_jsonl(out_dir / name, rows)
    write_atomic(out_dir / "people.json", (testbed.json.dumps(people, indent=1) + "\n").encode())
    buffer = io.BytesIO()
    np.savez(buffer, start=hmm[0], transition=hmm[1], emission=hmm[2], words=np.array(words))
    write_atomic(out_dir / "hmm.npz", buffer.getvalue())
    args = {"seed": seed, "train_tokens": train_tokens, "val_tokens": val_tokens, "exposures": exposures,
            "n_people": n_people, "n_states": n_states, "words_per_state": words_per_state,
            "concentration": concentration}
    made_by = {"script": "data/hmm/prepare.py", "args": args, "seed": seed}
    written = {"pretrain": testbed.write_corpus(out_dir / "pretrain", tokenizer, pretrain, made_by),
               "mid": testbed.write_corpus(out_dir / "mid", tokenizer, mid, made_by)}
    check_one_token_per_word(tokenizer, words)
    meta = {"version": VERSION, "tokenizer": tokenizer.to_dict(), "vocab_size": tokenizer.vocab_size, "seed": seed,
            "n_people": n_people, "exposures": exposures, "attributes": testbed.ATTRIBUTES,
            "entropy_floor": {"val": floor}, "num_tokens": {k: v["num_tokens"] for k, v in written.items()},
            "hmm": {"n_words": N_WORDS, "n_states": n_states, "words_per_state": words_per_state,
                    "transition_concentration": concentration, "doc_words": list(DOC_WORDS)},
            "num_examples": {name: len(rows) for name, rows in jsonl.items()},
            "made_by": {"script": "data/hmm/prepare.py", "args": args}}
    write_meta(out_dir, meta)
    print(f"hmm testbed written to {out_dir} in {time.time() - begin:.1f} s: {meta['num_tokens']['pretrain']} "
          f"tokens, entropy floor of val {floor:.4f} nats/token, vocab {tokenizer.vocab_size}")
    return meta


def is_prepared(out_dir="data/hmm") -> bool:
    """True when out_dir holds a complete hmm testbed of the current VERSION."""
    try:
        return load_meta(out_dir).get("version") == VERSION
    except FileNotFoundError:
        return False


def check_one_token_per_word(tokenizer, words):
    """The filler text has one id per word, so the HMM's floor is per token."""
    text = " " + " ".join(words)
    if len(tokenizer.encode(text)) != len(words):
        raise ValueError("a filler word is not a single token")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_tokens", type=int, default=TRAIN_TOKENS)
    parser.add_argument("--val_tokens", type=int, default=VAL_TOKENS)
    parser.add_argument("--exposures", type=int, default=EXPOSURES, help="documents per person")
    parser.add_argument("--n_people", type=int, default=testbed.N_PEOPLE)
    parser.add_argument("--n_states", type=int, default=N_STATES)
    parser.add_argument("--words_per_state", type=int, default=WORDS_PER_STATE)
    parser.add_argument("--concentration", type=float, default=TRANSITION_CONCENTRATION,
                        help="Dirichlet parameter of the transition rows (smaller: more predictable)")
    a = parser.parse_args()
    prepare(a.out_dir, a.seed, a.train_tokens, a.val_tokens, a.exposures, a.n_people, a.n_states,
            a.words_per_state, a.concentration)


if __name__ == "__main__":
    main()
