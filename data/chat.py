"""The open-instruct "tulu" chat template and the SFT loss mask (Section 3.2; open-instruct's
open_instruct/dataset_transformation.py, CHAT_TEMPLATES["tulu"]).

    <|system|>\\n{content}\\n
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}{eos}\\n       (the final assistant turn has no trailing \\n)
    generation prompt: <|assistant|>\\n

The loss covers assistant content + eos only; every other token, including the
`<|assistant|>\\n` header, gets label IGNORE_INDEX (-100). Labels are aligned with the ids, as in
Hugging Face (labels[i] belongs to ids[i]); a next-token model takes
x = ids[:-1], y = labels[1:].

Tokenized piecewise, so that no token straddles the mask boundary: each assistant
content is encoded on its own and followed by the eos id, and the template text
between two assistant contents ("\\n<|user|>\\n{question}\\n<|assistant|>\\n") is
encoded as one string. The boundaries are natural ones: eos is a special id, and the
text before an assistant content ends with the header's "\\n", after which cl100k's
pre-tokenizer always starts a new piece unless the content itself starts with a line
break (then whole-string tokenization would merge "\\n\\n" across the boundary; here
the header's "\\n" stays masked and the content's own tokens stay supervised).
Everywhere else the ids equal those of tokenizing the rendered string in one go.

Nothing here runs on its own; data/conversations.py and data/loaders.py (for sft.py and
sharpness.py), sample.py and nanowso's scoring, harness and judge import it.
"""

from model import IGNORE_INDEX

HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
SCHEMA = ('messages must be a non-empty list of {"role": "system" | "user" | "assistant", '
          '"content": str} (the Tulu 3 SFT `messages` field)')


def check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{SCHEMA}; got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in HEADERS \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{SCHEMA}; message {i} is {message!r}")


def segments(messages, add_generation_prompt=False):
    """The rendered conversation as [text, answer, text, answer, ..., text]: the even
    entries are template text (masked), the odd ones assistant contents, each of
    which is followed by eos."""
    check_messages(messages)
    pieces, text = [], ""
    for i, message in enumerate(messages):
        text += HEADERS[message["role"]]
        if message["role"] == "assistant":
            pieces += [text, message["content"]]
            text = "" if i == len(messages) - 1 else "\n"
        else:
            text += message["content"] + "\n"
    if add_generation_prompt:
        text += HEADERS["assistant"]
    return pieces + [text]


def _tokenize(pieces, tokenizer):
    ids, labels = [], []
    for k, piece in enumerate(pieces):
        piece_ids = tokenizer.encode(piece) if piece else []
        if k % 2:  # assistant content: supervised, eos included
            piece_ids = piece_ids + [tokenizer.eot]
            labels += piece_ids
        else:
            labels += [IGNORE_INDEX] * len(piece_ids)
        ids += piece_ids
    return ids, labels


def render(messages, tokenizer, max_len=None):
    """(ids, labels) of a conversation, cut to the first max_len tokens. Labels are the
    ids on assistant content + eos and IGNORE_INDEX elsewhere; check has_supervision(labels)
    for conversations whose assistant part the cut removed entirely."""
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1 (or None for no cut)")
    ids, labels = _tokenize(segments(messages), tokenizer)
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def has_supervision(labels):
    """Whether any token is in the loss (a truncated conversation may have none left)."""
    return any(label != IGNORE_INDEX for label in labels)


def generation_prompt(messages, tokenizer):
    """Ids of the rendered conversation followed by `<|assistant|>\\n`: what the model
    continues at evaluation."""
    return _tokenize(segments(messages, add_generation_prompt=True), tokenizer)[0]
