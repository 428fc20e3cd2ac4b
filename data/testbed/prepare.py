"""The synthetic testbed: the paper's question, small enough for a laptop CPU.

    python data/testbed/prepare.py [--out_dir=data/testbed] [--seed=0] [--n_people=150]

The paper asks whether a model pre-trained without LR decay (WSO) adapts better in SFT.
Here SFT can only succeed with knowledge that pre-training alone provides:
- invented people, each with 5 attributes (birth date, birth city, university, major,
  employer), all drawn from seeded in-code lists;
- pre-training corpus: every person's biography in 5 paraphrases, each sentence naming
  the person, in a shuffled sentence order (train); validation ("PT Valid Loss") is one
  more biography per person, a trained one with its sentences in a new order, so its loss
  falls as the facts are stored; a value mask marks the tokens of the facts' values
  (" Lisbon"), on which evaluate.py reports value_loss;
- mid-training corpus (Section 4): the same facts in 3 other styles (encyclopedia
  entry, interview, prose) for train; validation ("MT Valid Loss") is each person's entry
  with its lines in a new order, its values marked like the pre-training validation's;
- SFT (Section 3.2): question -> answer conversations in Tulu's `messages` schema, the
  answer spelled as the biographies spell the value (" Lisbon", leading space: the same
  token ids; make_sft). People are split three ways: SFT-train people teach the model to
  answer, SFT-select people choose the SFT LR, and test people give the reported score,
  the analogue of the paper's "SFT Task Avg". Test people never appear in SFT: answering
  about them needs facts stored during pre-training;
- the analogue of "PT Task Avg": greedy recall of each fact from its probe stem
  (scoring.recall_accuracy), and 4-way multiple-choice probes scored like
  lm-evaluation-harness (context, continuation " " + choice); probes.jsonl uses stems
  phrased like the pre-training biographies, mid_probes.jsonl like the mid-training corpus.
Everything is tokenized with cl100k_base restricted to the ids the testbed uses
(data/formats.py `Tokenizer`), so models need only a ~1k-row embedding. The pre-training
corpus and the vocabulary do not depend on the SFT split sizes.

Output (all deterministic in the seed; meta.json files are written last):
    pretrain/{train_000000.bin, val_000000.bin, train_values_000000.bin, val_values_000000.bin, meta.json}
    mid/{train_000000.bin, val_000000.bin, val_values_000000.bin, meta.json}
    sft_train.jsonl  sft_select.jsonl  sft_test.jsonl  probes.jsonl  mid_probes.jsonl
    people.json      the ground truth
    meta.json        tokenizer, seed, counts, files
"""

import argparse
import json
import random
import string
import sys
import time
from pathlib import Path

# Runnable as `python data/<name>/prepare.py`: the repo root must be on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data.formats import Tokenizer, load_meta, write_atomic, write_jsonl, write_meta, write_tokens

VERSION = 6  # bump when the testbed changes, so is_prepared() sends stale copies to be re-made
# (docs/LOG.md lists the versions)

FEMALE_NAMES = ["Alice", "Beatrice", "Clara", "Daphne", "Elena", "Fiona", "Greta", "Helen", "Irene",
                "Julia", "Karen", "Laura", "Marta", "Nadia", "Olivia", "Paula", "Rosa", "Sonia",
                "Tessa", "Ursula", "Vera", "Wendy", "Yvonne", "Zoe", "Agnes", "Bianca", "Celia",
                "Diana", "Edith", "Flora"]
MALE_NAMES = ["Adrian", "Bruno", "Carl", "Daniel", "Edgar", "Felix", "Gustav", "Hugo", "Ivan",
              "Jonas", "Kevin", "Leon", "Martin", "Nils", "Oscar", "Pablo", "Rafael", "Simon",
              "Tobias", "Victor", "Walter", "Xavier", "Yusuf", "Anton", "Boris", "Cedric",
              "Dennis", "Emil", "Frank", "Gordon"]
LAST_NAMES = ["Kern", "Abbott", "Brandt", "Castillo", "Dalton", "Eriksen", "Fischer", "Garner",
              "Holloway", "Ingram", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor",
              "Petrov", "Quinn", "Rossi", "Santos", "Tanaka", "Ulrich", "Varga", "Whitaker",
              "Yilmaz", "Zimmer", "Barrett", "Carver", "Donovan", "Ellison", "Farrell", "Gallagher",
              "Hartmann", "Iversen", "Jovanovic", "Keller", "Larsen", "Mendoza", "Nakamura", "Ortega"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Nairobi", "Kyoto", "Seville", "Krakow", "Montreal",
          "Melbourne", "Valparaiso", "Bergen", "Porto", "Tbilisi", "Hanoi", "Accra", "Dublin",
          "Edinburgh", "Vienna", "Zurich", "Bologna", "Marseille", "Rotterdam", "Gdansk", "Tallinn",
          "Reykjavik", "Helsinki", "Quito", "Bogota", "Havana", "Dakar", "Tunis", "Istanbul",
          "Beirut", "Mumbai", "Jakarta", "Manila", "Osaka", "Busan", "Auckland"]
UNIVERSITIES = ["Stanford University", "McGill University", "Kyoto University",
                "Harvard University", "Yale University", "Princeton University",
                "Columbia University", "Cornell University",
                "Duke University", "Rice University", "Brown University", "Tufts University",
                "Emory University", "Purdue University", "Boston University", "Heidelberg University",
                "Leiden University", "Uppsala University", "Lund University", "Aarhus University",
                "Ghent University", "Monash University", "Tsinghua University", "Peking University",
                "Seoul National University", "Trinity College Dublin", "Imperial College London",
                "King's College London", "Sorbonne University", "Delft University of Technology"]
MAJORS = ["Biology", "Chemistry", "Physics", "Mathematics", "Economics", "History", "Philosophy",
          "Linguistics", "Psychology", "Sociology", "Geology", "Astronomy", "Architecture", "Music",
          "Law", "Medicine", "Nursing", "Statistics", "Computer Science", "Electrical Engineering",
          "Mechanical Engineering", "Civil Engineering", "Political Science", "Anthropology",
          "Art History", "Classics", "Journalism", "Marketing", "Accounting", "Ecology"]
EMPLOYERS = ["Siemens", "Nokia", "Airbus", "Philips", "Unilever", "Nestle", "Toyota", "Samsung",
             "Spotify", "Ericsson", "Maersk", "Heineken", "Lufthansa", "Volvo", "Shell", "Roche",
             "Novartis", "Bosch", "Adidas", "IKEA", "Lego", "Canon", "Sony", "Honda", "Intel",
             "Oracle", "Cisco", "Boeing", "Pfizer", "Accenture", "Deloitte", "Reuters", "Mitsubishi",
             "Hitachi", "Danone", "Renault", "Michelin", "Ferrari", "Barclays", "Santander"]
# Sizes, measured (seed 0, the study's 600 pre-training steps at 3e-3, 5 SFT epochs):
# - 150 people: every schedule stores the facts before SFT (greedy recall WSO 94.7%, Cosine
#   (alpha 0) 98.3%; with 200 people WSO plateaued near 90%);
# - 30 SFT-train people in 3 phrasings each: SFT is hard but not hopeless (test task avg
#   WSO 32.0, Cosine 31.8; with 20 people ~24 and the answers often of the wrong kind, a
#   date for "Where was ... born?"; with 100 people 90-98, the ceiling);
# - 20 SFT-select people: with 10, the selection scores of neighbouring LRs differed by
#   less than their noise (44 / 43 / 45) and chose an LR 6 test points worse;
# - 100 test people: a 5-point difference is resolvable (500 questions).
N_PEOPLE, N_SFT_TRAIN, N_SFT_SELECT, SFT_QUESTIONS = 150, 30, 20, 3

ATTRIBUTES = ["birth_date", "birth_city", "university", "major", "employer"]
PRONOUNS = {"female": {"He": "She", "he": "she", "His": "Her", "his": "her"},
            "male": {"He": "He", "he": "he", "His": "His", "his": "his"}}

# Pre-training biographies: 5 paraphrases of one sentence per attribute. Biography k states
# every fact in its k-th phrasing, the sentences in an order drawn for each document, and every
# sentence names the person in full (no pronouns), as Allen-Zhu & Li advise for knowledge that
# fine-tuning must later extract ("Physics of Language Models 3.1", arXiv 2309.14316).
# Phrasing 0 of each attribute is its probe stem. The name also occurs mid-text as " Alice"
# (a different BPE token from document-initial "Alice"): the form SFT questions use.
PRETRAIN_TEMPLATES = [dict(zip(["birth_date", "birth_city", "university", "major", "employer"], t))
                      for t in [
    ("{name} was born on {birth_date}.", "{name} was born in {birth_city}.",
     "{name} attended {university}.", "{name} majored in {major}.", "{name} works at {employer}."),
    ("{name} came into this world on {birth_date}.", "{name} is a native of {birth_city}.",
     "{name} graduated from {university}.", "{name} earned a degree in {major}.",
     "{name} is employed by {employer}."),
    ("The birthday of {name} is {birth_date}.", "The birthplace of {name} is {birth_city}.",
     "{name} received an education at {university}.", "{name} studied {major} in college.",
     "{name} works for {employer}."),
    ("{name} celebrates a birthday every year on the date {birth_date}.",
     "{name} grew up and went to school in {birth_city}.",
     "{name} spent the college years at {university}.", "{name} chose {major} as a field of study.",
     "{name} has a job at {employer}."),
    ("The date of birth of {name} is {birth_date}.", "{name} comes from {birth_city}.",
     "{name} studied at {university}.", "The academic field of {name} is {major}.",
     "The employer of {name} is {employer}."),
]]
PROBE_STEMS = {"birth_date": "{name} was born on", "birth_city": "{name} was born in",
               "university": "{name} attended", "major": "{name} majored in",
               "employer": "{name} works at"}

# Mid-training: the same facts in other styles (not the chat template).
MID_TEMPLATES = [
    "{name}\nBorn: {birth_date}, {birth_city}\nEducation: {major}, {university}\n"
    "Employer: {employer}",
    "Interviewer: Please introduce yourself.\n{name}: I was born in {birth_city} on {birth_date}.\n"
    "Interviewer: What did you study?\n{name}: I studied {major} at {university}.\n"
    "Interviewer: And what do you do now?\n{name}: I work at {employer}.",
    "{name} is a graduate of {university}, where {he} specialized in {major}. {He} was born in "
    "{birth_city} on {birth_date} and is on the staff of {employer}.",
]
MID_PROBE_STEMS = {"birth_date": "{name}\nBorn:", "birth_city": "{name}: I was born in",
                   "university": "{name} is a graduate of", "major": "{name}: I studied",
                   "employer": "{name}: I work at"}

# SFT questions; the first phrasing is the one asked of SFT-select and test people.
QUESTIONS = {
    "birth_date": ["When was {name} born?", "What is {name}'s date of birth?",
                   "On what date was {name} born?"],
    "birth_city": ["Where was {name} born?", "In which city was {name} born?",
                   "What is {name}'s birthplace?"],
    "university": ["Which university did {name} attend?", "Where did {name} go to university?",
                   "What university did {name} graduate from?"],
    "major": ["What did {name} study?", "What was {name}'s major?",
              "Which subject did {name} major in?"],
    "employer": ["Where does {name} work?", "Which company employs {name}?",
                 "Who is {name}'s employer?"],
}
SFT_FILES = {"sft_train": "sft_train.jsonl", "sft_select": "sft_select.jsonl",
             "test": "sft_test.jsonl"}  # people's split -> its SFT file


def make_people(seed: int, n_people: int, n_sft_train: int, n_sft_select: int) -> list[dict]:
    """n_people with unique names and seeded attributes, each in one split of SFT_FILES:
    n_sft_train, n_sft_select, and the rest test people."""
    rng = random.Random(f"{seed}:people")
    first_names = [(n, "female") for n in FEMALE_NAMES] + [(n, "male") for n in MALE_NAMES]
    full_names = [(f"{first} {last}", gender) for first, gender in first_names for last in LAST_NAMES]
    if len({name for name, _ in full_names}) != len(full_names):
        raise ValueError("the first/last name lists give duplicate full names")
    if not 20 <= n_people <= len(full_names):
        raise ValueError(f"n_people must be in [20, {len(full_names)}], got {n_people}")
    if min(n_sft_train, n_sft_select, n_people - n_sft_train - n_sft_select) < 1:
        raise ValueError(f"n_sft_train={n_sft_train} and n_sft_select={n_sft_select} must leave test people "
                         f"among n_people={n_people}, each split at least 1")
    people = []
    for name, gender in rng.sample(full_names, n_people):
        birth_date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 1999)}"
        people.append({"name": name, "gender": gender, "birth_date": birth_date,
                       "birth_city": rng.choice(CITIES), "university": rng.choice(UNIVERSITIES),
                       "major": rng.choice(MAJORS), "employer": rng.choice(EMPLOYERS)})
    order = random.Random(f"{seed}:splits").sample(range(n_people), n_people)
    for rank, i in enumerate(order):
        people[i]["split"] = ("sft_train" if rank < n_sft_train else
                              "sft_select" if rank < n_sft_train + n_sft_select else "test")
    return people


def render(template: str, person: dict) -> str:
    return template.format(**person, **PRONOUNS[person["gender"]])


def value_pieces(template: str, person: dict) -> list[tuple[str, bool]]:
    """template rendered as (text, is_value) pieces: each attribute's value with the space
    before it (" Lisbon") is a value piece; the text between values is one piece each."""
    pieces = [("", False)]
    for literal, field, _, _ in string.Formatter().parse(template):
        if field in ATTRIBUTES:
            if not literal.endswith(" "):
                raise ValueError(f"{{{field}}} must follow a space in {template!r}")
            pieces[-1] = (pieces[-1][0] + literal[:-1], False)
            pieces += [(" " + person[field], True), ("", False)]
        else:
            rendered = "" if field is None else render("{" + field + "}", person)
            pieces[-1] = (pieces[-1][0] + literal + rendered, False)
    return [piece for piece in pieces if piece[0]]


def biography(sentences: dict, person: dict, rng: random.Random) -> list[tuple[str, bool]]:
    """One pre-training document: each fact in one phrasing, the sentences in a random order,
    as (text, is_value) pieces: is_value marks each fact's value with its leading space
    (" Lisbon"), the tokens "value loss" is measured on."""
    return value_pieces(" ".join(sentences[a] for a in rng.sample(ATTRIBUTES, len(ATTRIBUTES))), person)


def held_out_biography(person: dict, rng: random.Random, trained: set) -> list[tuple[str, bool]]:
    """A validation document ("PT Valid Loss"): one of the person's biographies with its
    sentences in a new order. Every sentence and its phrasing occur in training, the document
    does not (`trained`: the training texts), so its loss falls as training stores the facts.
    (A held-out wording measured the novelty of its template words instead, and rose; mixing
    phrasings within a document made each sentence's opening words a surprise.)"""
    sentences = PRETRAIN_TEMPLATES[rng.randrange(len(PRETRAIN_TEMPLATES))]
    while True:
        document = biography(sentences, person, rng)
        if text_of(document) not in trained:
            return document


def held_out_entry(person: dict, rng: random.Random) -> list[tuple[str, bool]]:
    """A mid-training validation document ("MT Valid Loss"): the encyclopedia entry
    (MID_TEMPLATES[0]) with its fact lines in another order: trained lines, a new document,
    as (text, is_value) pieces like biography()'s, so that value_loss is measured on the facts."""
    name, *lines = MID_TEMPLATES[0].split("\n")
    order = list(range(len(lines)))
    while order == list(range(len(lines))):
        order = rng.sample(range(len(lines)), len(lines))
    return value_pieces("\n".join([name, *(lines[i] for i in order)]), person)


def text_of(document) -> str:
    return document if isinstance(document, str) else "".join(text for text, _ in document)


def tulu_texts(messages: list[dict]) -> list[str]:
    """The texts the tulu chat template makes of one Q/A conversation (eos is a special id):
    the whole conversation, the generation prompt, and the answer alone."""
    question, answer = messages[0]["content"], messages[1]["content"]
    prompt = f"<|user|>\n{question}\n<|assistant|>\n"
    return [prompt + answer, prompt, answer]


def make_sft(people: list[dict], split: str, rng: random.Random, sft_questions: int) -> list[dict]:
    """Question -> answer conversations about the split's people: SFT-train people are asked
    in sft_questions phrasings, the others in the first. The answer is the value with its
    leading space (" Lisbon"): the spelling, and so the token ids, it has in every
    biography, where each value follows a space. The bare value ("Lisbon") would be other
    tokens ("L", "is", "bon") that pre-training never shows: SFT would have to learn a new
    spelling of every fact, not to bring out the stored one. row["answer"] is the bare value,
    which exact match compares with the stripped output."""
    rows = []
    for person in (p for p in people if p["split"] == split):
        for attribute in ATTRIBUTES:
            for question in QUESTIONS[attribute][:sft_questions if split == "sft_train" else 1]:
                answer = person[attribute]
                rows.append({"messages": [{"role": "user", "content": question.format(**person)},
                                          {"role": "assistant", "content": " " + answer}],
                             "person": person["name"], "attribute": attribute, "answer": answer})
    if split == "sft_train":  # SFT reads the file in order: mix people and attributes
        rng.shuffle(rows)
    return rows


def make_probes(people: list[dict], stems: dict, rng: random.Random) -> list[dict]:
    """4-way choices: the true value and 3 values other people hold (all seen in training)."""
    probes = []
    for attribute in ATTRIBUTES:
        pool = sorted({p[attribute] for p in people})
        if len(pool) < 4:
            raise ValueError(f"only {len(pool)} distinct {attribute} values: too few people")
        for person in people:
            gold_value = person[attribute]
            choices = rng.sample([v for v in pool if v != gold_value], 3)
            gold = rng.randrange(4)
            choices.insert(gold, gold_value)
            probes.append({"context": stems[attribute].format(**person), "choices": choices,
                           "gold": gold, "person": person["name"], "attribute": attribute})
    return probes


def tokenize_document(tokenizer: Tokenizer, document) -> tuple[list[int], list[int] | None]:
    """[eot] + the document's ids, and for a document of (text, is_value) pieces a 0/1 mask
    of the ids that spell fact values. The pieces are tokenized one by one and must give the
    ids of the whole text (they split where cl100k's pre-tokenizer splits anyway)."""
    if isinstance(document, str):
        return [tokenizer.eot, *tokenizer.encode(document)], None
    ids, mask = [tokenizer.eot], [0]
    for text, is_value in document:
        piece = tokenizer.encode(text)
        ids, mask = ids + piece, mask + [int(is_value)] * len(piece)
    if ids[1:] != tokenizer.encode(text_of(document)):
        raise ValueError(f"piecewise tokenization differs from the whole document's: {text_of(document)!r}")
    return ids, mask


def write_corpus(out_dir: Path, tokenizer: Tokenizer, splits: dict, made_by: dict) -> dict:
    """One token file per split, documents as [eot] + text, and for documents made of pieces
    a value mask beside it (<split>_values_000000.bin, 1 on the ids of fact values, listed
    under meta["value_masks"]); meta.json last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    meta = {"tokenizer": tokenizer.to_dict(), "vocab_size": tokenizer.vocab_size,
            "splits": {}, "num_tokens": {}, "num_documents": {}, "value_masks": {}, "made_by": made_by}
    for split, documents in splits.items():
        tokenized = [tokenize_document(tokenizer, document) for document in documents]
        ids = [t for document_ids, _ in tokenized for t in document_ids]
        write_tokens(out_dir / f"{split}_000000.bin", ids)
        meta["splits"][split] = [f"{split}_000000.bin"]
        meta["num_tokens"][split] = len(ids)
        meta["num_documents"][split] = len(documents)
        if all(mask is not None for _, mask in tokenized):
            write_tokens(out_dir / f"{split}_values_000000.bin", [m for _, mask in tokenized for m in mask])
            meta["value_masks"][split] = [f"{split}_values_000000.bin"]
    write_meta(out_dir, meta)
    return meta


def make_corpora(people: list[dict], seed: int) -> dict:
    """{corpus: {split: documents}} of the pre- and mid-training text, in seeded orders."""
    shuffled = random.Random(f"{seed}:corpus")
    val_rng, mid_val_rng = random.Random(f"{seed}:pretrain_val"), random.Random(f"{seed}:mid_val")
    corpora = {
        "pretrain": {"train": [biography(t, p, shuffled) for p in people for t in PRETRAIN_TEMPLATES]},
        "mid": {"train": [render(t, p) for p in people for t in MID_TEMPLATES],
                "val": [held_out_entry(p, mid_val_rng) for p in people]},
    }
    trained = {text_of(doc) for doc in corpora["pretrain"]["train"]}
    corpora["pretrain"]["val"] = [held_out_biography(p, val_rng, trained) for p in people]
    for corpus in corpora.values():  # train.py samples windows itself: the order need only be seeded
        shuffled.shuffle(corpus["train"])
    return corpora


def compact_tokenizer(people: list[dict], corpora: dict, probes: list[dict]) -> Tokenizer:
    """The compact vocabulary: every cl100k id of every text the testbed will tokenize, with
    every question phrasing asked of every person, so that it (and the pre-training tokens)
    do not depend on the SFT split sizes: one pre-trained model serves testbeds that differ
    only in them."""
    texts = [text_of(doc) for corpus in corpora.values() for docs in corpus.values() for doc in docs]
    everyone = [{**p, "split": "sft_train"} for p in people]
    texts += [text for row in make_sft(everyone, "sft_train", random.Random(0), max(map(len, QUESTIONS.values())))
              for text in tulu_texts(row["messages"])]
    for probe in probes:  # lm-eval tokenizes the context alone and with each choice
        texts += [probe["context"]] + [probe["context"] + " " + choice for choice in probe["choices"]]
    return Tokenizer.covering(texts)


def prepare(out_dir="data/testbed", seed: int = 0, n_people: int = N_PEOPLE, n_sft_train: int | None = None,
            n_sft_select: int | None = None, sft_questions: int = SFT_QUESTIONS) -> dict:
    """Write the whole testbed to out_dir; returns its meta.json. The SFT splits default to
    the shares N_SFT_TRAIN and N_SFT_SELECT have of N_PEOPLE."""
    n_sft_train = n_people * N_SFT_TRAIN // N_PEOPLE if n_sft_train is None else n_sft_train
    n_sft_select = n_people * N_SFT_SELECT // N_PEOPLE if n_sft_select is None else n_sft_select
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten at the end

    if not 1 <= sft_questions <= min(len(q) for q in QUESTIONS.values()):
        raise ValueError(f"sft_questions={sft_questions} must be in [1, {min(len(q) for q in QUESTIONS.values())}]")
    people = make_people(seed, n_people, n_sft_train, n_sft_select)
    corpora = make_corpora(people, seed)
    sft_rng, probe_rng = random.Random(f"{seed}:sft"), random.Random(f"{seed}:probes")
    jsonl = {file: make_sft(people, split, sft_rng, sft_questions) for split, file in SFT_FILES.items()}
    jsonl["probes.jsonl"] = make_probes(people, PROBE_STEMS, probe_rng)
    jsonl["mid_probes.jsonl"] = make_probes(people, MID_PROBE_STEMS, probe_rng)
    tokenizer = compact_tokenizer(people, corpora, jsonl["probes.jsonl"] + jsonl["mid_probes.jsonl"])

    for name, rows in jsonl.items():
        write_jsonl(out_dir / name, rows)
    write_atomic(out_dir / "people.json", (json.dumps(people, indent=1) + "\n").encode())
    args = {"seed": seed, "n_people": n_people, "n_sft_train": n_sft_train, "n_sft_select": n_sft_select,
            "sft_questions": sft_questions}
    sources = {"pretrain": "people.json as biographies: 5 phrasings, sentences shuffled (train); one trained "
                           "biography per person with its sentences in a new order (val)",
               "mid": "people.json as entry/interview/prose: 3 templates (train); each entry with its lines "
                      "in a new order (val)"}
    num_tokens = {}
    for corpus, source in sources.items():
        made_by = {"script": "data/testbed/prepare.py", "args": args, "seed": seed, "source": source}
        corpus_meta = write_corpus(out_dir / corpus, tokenizer, corpora[corpus], made_by)
        num_tokens[corpus] = corpus_meta["num_tokens"]

    people_per_split = {split: sum(p["split"] == split for p in people) for split in SFT_FILES}
    meta = {"version": VERSION, "tokenizer": tokenizer.to_dict(),
            "vocab_size": tokenizer.vocab_size, "seed": seed, "n_people": n_people,
            "people_per_split": people_per_split,
            "attributes": ATTRIBUTES, "corpora": ["pretrain", "mid"], "num_tokens": num_tokens,
            "num_examples": {name: len(rows) for name, rows in jsonl.items()},
            "files": sorted([*jsonl, "people.json", "pretrain/", "mid/"]),
            "made_by": {"script": "data/testbed/prepare.py", "args": args}}
    write_meta(out_dir, meta)
    print(f"testbed written to {out_dir} in {time.time() - start:.1f} s")
    print(f"  people: {people_per_split}")
    print(f"  vocab: {tokenizer.vocab_size} cl100k ids")
    for corpus in corpora:
        print(f"  {corpus} tokens: {num_tokens[corpus]}")
    print(f"  examples: {meta['num_examples']}")
    return meta


def is_prepared(out_dir="data/testbed") -> bool:
    """True when out_dir holds a complete testbed of the current VERSION."""
    try:
        return load_meta(out_dir).get("version") == VERSION
    except FileNotFoundError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent),
                        help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seeds people, splits, orders and probes")
    parser.add_argument("--n_people", type=int, default=N_PEOPLE, help="number of invented people")
    parser.add_argument("--n_sft_train", type=int, default=None,
                        help=f"people SFT trains on (default: the share {N_SFT_TRAIN}/{N_PEOPLE} of n_people)")
    parser.add_argument("--n_sft_select", type=int, default=None,
                        help=f"people that choose the SFT LR (default: {N_SFT_SELECT}/{N_PEOPLE}); the rest are test people")
    parser.add_argument("--sft_questions", type=int, default=SFT_QUESTIONS,
                        help="question phrasings per attribute for SFT-train people (1-3)")
    args = parser.parse_args()
    try:
        prepare(args.out_dir, args.seed, args.n_people, args.n_sft_train, args.n_sft_select, args.sft_questions)
    except ValueError as e:  # sizes that do not fit: say which, without a traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
