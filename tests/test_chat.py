"""data/chat.py: the tulu template and its loss mask, token by token, against a rendering
written out here independently (the whole template string tokenized in one go, the
supervised tokens located by byte offsets of the assistant contents)."""

import pytest

from data.chat import generation_prompt, has_supervision, render
from data.formats import Tokenizer
from model import IGNORE_INDEX

EOS = "\x00EOS\x00"  # stands for the eos id in the reference string


@pytest.fixture(scope="module", params=["full", "compact"])
def tokenizer(request):
    if request.param == "full":
        return Tokenizer()
    # a compact vocabulary missing most of the test texts' tokens: encode spells them in bytes
    return Tokenizer.covering(["<|user|>\n<|assistant|>\n"])


def token_bytes(tokenizer, token):
    cl100k = token if tokenizer.compact_vocab is None else tokenizer.compact_vocab[token]
    return tokenizer.enc.decode_single_token_bytes(cl100k)


def reference(messages, tokenizer):
    """The template written out as one string, tokenized whole (eos as the special id);
    a token is supervised when its bytes lie inside an assistant content, or it is
    the eos that closes one."""
    text, spans = "", []
    for i, m in enumerate(messages):
        text += f"<|{m['role']}|>\n"
        if m["role"] == "assistant":
            start = len(text.encode())
            text += m["content"]
            spans.append((start, len(text.encode())))
            text += EOS + ("\n" if i < len(messages) - 1 else "")
        else:
            text += m["content"] + "\n"
    ids, labels, offset = [], [], 0
    parts = text.split(EOS)
    for k, part in enumerate(parts):
        for token in tokenizer.encode(part):
            start, offset = offset, offset + len(token_bytes(tokenizer, token))
            inside = any(a <= start and offset <= b for a, b in spans)
            straddles = any(start < a < offset or start < b < offset for a, b in spans)
            assert not straddles, f"token {token} crosses the mask boundary"
            ids.append(token)
            labels.append(token if inside else IGNORE_INDEX)
        if k < len(parts) - 1:
            ids.append(tokenizer.eot)
            labels.append(tokenizer.eot)
            offset += len(EOS.encode())
    return ids, labels


SINGLE = [{"role": "user", "content": "Where was Ada born?"},
          {"role": "assistant", "content": "In London, 1815."}]
MULTI = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris"},
         {"role": "user", "content": "And of Peru? Answer in one word, please."},
         {"role": "assistant", "content": "Lima – the City of Kings."}]


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "system+multi"])
def test_render_matches_the_template_token_by_token(messages, tokenizer):
    ids, labels = render(messages, tokenizer)
    assert (ids, labels) == reference(messages, tokenizer)
    # the supervised tokens spell the assistant contents, each closed by eos
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    eot = tokenizer.eot
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    pieces, current = [], []
    for token in supervised:
        if token == eot:
            pieces.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert pieces == answers and not current
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))


def test_render_string_and_mask_details(tokenizer):
    ids, labels = render(MULTI, tokenizer)
    first_eos = ids.index(tokenizer.eot)
    assert tokenizer.decode(ids[:first_eos]) == ("<|system|>\nYou are terse.\n<|user|>\nCapital of France?\n"
                                                 "<|assistant|>\nParis")
    # the header before the answer is masked; the "\n" after a non-final eos is masked
    header = tokenizer.encode("<|assistant|>\n")
    answer = tokenizer.encode("Paris")
    assert ids[first_eos - len(answer) - len(header):first_eos - len(answer)] == header
    assert labels[first_eos - len(answer) - len(header):first_eos - len(answer)] == [IGNORE_INDEX] * len(header)
    assert labels[first_eos - len(answer):first_eos + 1] == answer + [tokenizer.eot]
    assert labels[first_eos + 1] == IGNORE_INDEX and tokenizer.decode(ids[first_eos + 1:first_eos + 2]).startswith("\n")
    # the final assistant turn ends with eos, no trailing "\n"
    assert ids[-1] == tokenizer.eot and labels[-1] == tokenizer.eot


def test_truncation_inside_and_before_the_answer(tokenizer):
    ids, labels = render(SINGLE, tokenizer)
    first_supervised = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    cut = first_supervised + 2  # two tokens of the answer survive
    short_ids, short_labels = render(SINGLE, tokenizer, max_len=cut)
    assert short_ids == ids[:cut] and short_labels == labels[:cut]
    assert has_supervision(short_labels) and sum(label != IGNORE_INDEX for label in short_labels) == 2
    prompt_only_ids, prompt_only_labels = render(SINGLE, tokenizer, max_len=first_supervised)
    assert prompt_only_ids == ids[:first_supervised]
    assert not has_supervision(prompt_only_labels)
    assert render(SINGLE, tokenizer, max_len=10_000) == (ids, labels)
    with pytest.raises(ValueError, match="max_len"):
        render(SINGLE, tokenizer, max_len=0)


def test_answer_starting_with_a_line_break_keeps_an_exact_mask(tokenizer):
    messages = [{"role": "user", "content": "List two."}, {"role": "assistant", "content": "\n- a\n- b"}]
    ids, labels = render(messages, tokenizer)
    supervised = [label for label in labels if label != IGNORE_INDEX]
    assert supervised == tokenizer.encode("\n- a\n- b") + [tokenizer.eot]
    assert tokenizer.decode(ids[:-1]) == "<|user|>\nList two.\n<|assistant|>\n\n- a\n- b"


def test_generation_prompt(tokenizer):
    prompt = generation_prompt(MULTI[:4], tokenizer)
    ids, labels = render(MULTI, tokenizer)
    last_answer_start = max(i for i, label in enumerate(labels) if label == IGNORE_INDEX) + 1
    assert prompt == ids[:last_answer_start]
    assert tokenizer.decode(prompt).endswith("And of Peru? Answer in one word, please.\n<|assistant|>\n")
    assert generation_prompt(SINGLE[:1], tokenizer) == tokenizer.encode("<|user|>\nWhere was Ada born?\n<|assistant|>\n")


@pytest.mark.parametrize("messages", [
    [], None, "hello", [{"role": "tool", "content": "x"}], [{"role": "user"}],
    [{"role": "user", "content": 3}], [{"content": "hi"}], ["user: hi"],
])
def test_bad_messages_say_what_schema_is_expected(messages, tokenizer):
    with pytest.raises(ValueError, match="role.*system.*user.*assistant"):
        render(messages, tokenizer)
    with pytest.raises(ValueError, match="role"):
        generation_prompt(messages, tokenizer)
