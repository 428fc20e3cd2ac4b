"""
lm-evaluation-harness on this project's checkpoints: any task in lm-eval's registry (GSM8K,
DROP, AGIEval, BBH, MMLU, ...: the suites of the paper's Tables 15 and 18) run with lm-eval's
own task configs, prompts, few-shot samples, filters and metrics, through HarnessLM, a
TemplateLM (lm_eval/api/model.py) over model.Llama and data.formats.Tokenizer (compact
vocabularies included). evaluate.py --harness calls run(); this file does not run on its own.

    python evaluate.py --ckpt=out/sft/lr_0.001/ckpt.pt --harness=gsm8k_cot,drop,agieval_en,bbh --harness_fewshot=drop=5
    python evaluate.py --ckpt=out/ckpt.pt --harness=arc_easy --harness_files=arc_easy=arc.jsonl

lm_eval is an optional extra, imported only here: `pip install "lm-eval[hf]>=0.4.13,<0.5"`
(requirements.txt lists it for the tests). evaluate.py's hand-written scorer (nanowso/scoring.py)
stays what readers learn from; tests/test_harness.py checks that both give the same
log-likelihoods and acc/acc_norm per item.

How HarnessLM answers lm-eval's three request types, as HFLM (lm_eval/models/huggingface.py)
does for a Hugging Face model:
  loglikelihood          TemplateLM splits (context, continuation) into ids; scoring.loglikelihoods
                         scores them batched (left-cut to max_seq_len, right-padded), with
                         whether greedy decoding would produce the continuation
  loglikelihood_rolling  lm-eval's disjoint rolling windows of max_seq_len, end-of-text first
  generate_until         greedy decoding (tasks asking for sampling are refused), the context
                         left-cut to max_seq_len - max_gen_toks, stopped at end-of-text or once
                         the text holds a stop string, then cut at it (lm_eval.models.utils).
                         The model takes no attention mask, so a batch holds prompts of one length
Offline, --harness_files=task=path (the split the task scores) or task:split=path (another
split it reads, such as the one its few-shot examples come from) points a task at local
.jsonl/.json/.parquet files in its Hub schema: an include-file over lm-eval's own YAML with
`dataset_path: json`, as `lm_eval --tasks my_task.yaml` takes it. --harness_fewshot=task=N sets
a task's number of shots the same way (the paper's DROP is 5-shot, lm-eval's default 0).
"""

import difflib
import functools
import hashlib
import json
import os
import tempfile
from collections import defaultdict

from data.chat import segments
from data.formats import EOT_TEXT
from nanowso.common import Eta
from nanowso.scoring import greedy_generate_batch, loglikelihoods

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # evaluate.py without --harness needs no lm_eval
    TemplateLM = object

INSTALL = 'pip install "lm-eval[hf]>=0.4.13,<0.5"'


def require_lm_eval():
    if TemplateLM is object:
        raise SystemExit(f"error: --harness needs lm-evaluation-harness, which is not installed: {INSTALL}")


class HarnessLM(TemplateLM):
    """This project's model and tokenizer behind lm-eval's model interface."""

    def __init__(self, model, tokenizer, batch_size=16, max_gen_toks=256):
        require_lm_eval()
        super().__init__()
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self):
        return self.tok.eot

    @property
    def max_length(self):
        return self.model.config.max_seq_len

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """Ids of the text, "<|endoftext|>" read as the end-of-text id (as a Hugging Face
        tokenizer reads its special tokens, and as a rendered chat needs it)."""
        pieces = [self.tok.encode(piece) for piece in string.split(EOT_TEXT)]
        return [i for k, piece in enumerate(pieces) for i in ([self.tok.eot] if k else []) + piece]

    def tok_decode(self, tokens, **kwargs):
        return self.tok.decode([tokens] if isinstance(tokens, int) else tokens)

    # ---------------------------------------------------------------- requests

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        answers = loglikelihoods(self.model, [(context, continuation) for _, context, continuation in requests],
                                 self.batch_size, None if disable_tqdm else "loglikelihood", with_greedy=True)
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        windows, owner = [], []
        for k, (string,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id,
                                                    self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[k] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
        groups = defaultdict(list)  # (gen_kwargs, context length) -> request indices
        prompts, settings = [], []
        for k, (context, gen_kwargs) in enumerate(request.args for request in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError(f"the task asks for sampling ({gen_kwargs}); HarnessLM decodes greedily only")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=EOT_TEXT)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"the task generates up to {max_gen_toks} tokens, which leaves no context in the "
                                 f"model's {self.max_length} positions (HFLM refuses it too)")
            prompts.append(self.tok_encode(context)[-(self.max_length - max_gen_toks):])
            settings.append((until, max_gen_toks))
            groups[json.dumps([until, max_gen_toks]), len(prompts[-1])].append(k)
        answers, done_count, eta = [None] * len(requests), 0, Eta(len(requests))
        report_every = max(1, len(requests) // 10)  # about ten progress lines, however many length groups
        eta(0)
        for indices in groups.values():
            until, max_gen_toks = settings[indices[0]]
            stops = [s for s in until if s and s != EOT_TEXT]

            def stopped(ids):
                return any(s in self.tok.decode(ids) for s in stops)

            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                outs = greedy_generate_batch(self.model, [prompts[i] for i in chunk], max_gen_toks, self.tok.eot,
                                             self.tok.vocab_size, done=stopped if stops else None)
                for i, out in zip(chunk, outs):
                    answers[i] = postprocess_generated_text(self.tok.decode(out), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, answers[i])
                before, done_count = done_count, done_count + len(chunk)
                if not disable_tqdm and (done_count // report_every > before // report_every
                                         or done_count == len(requests)):
                    print(f"  generate_until: {done_count}/{len(requests)} requests | ETA {eta(done_count)}",
                          flush=True)
        return answers

    # ---------------------------------------------------------------- chat (--harness_chat)

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """The tulu template of data/chat.py as text, end-of-text after each assistant turn;
        without a generation prompt a final assistant message is a prefix the model continues
        (lm-eval's gen_prefix), so it stays open, as HFLM's continue_final_message leaves it."""
        pieces = segments(chat_history, add_generation_prompt)
        text = "".join(piece + (EOT_TEXT if k % 2 else "") for k, piece in enumerate(pieces))
        if not add_generation_prompt and chat_history[-1]["role"] == "assistant":
            text = text.removesuffix(EOT_TEXT)
        return text

    @property
    def tokenizer_name(self):  # lm-eval's request caches are keyed by it
        vocab = hashlib.sha1(json.dumps(self.tok.compact_vocab).encode()).hexdigest()[:10]
        return f"{self.tok.name}-{self.tok.vocab_size}-{vocab}"

    def chat_template(self, chat_template=False):
        return "tulu" if chat_template else None


# ------------------------------------------------------------------ local files


def parse_files(text):
    """--harness_files=task=path[,task:split=path] -> {task: {split or None: path}}."""
    files = defaultdict(dict)
    for pair in filter(None, text.split(",")):
        key, sep, path = pair.partition("=")
        if not sep or not path:
            raise SystemExit(f"error: --harness_files={text}: expected task=path or task:split=path")
        task, _, split = key.partition(":")
        files[task][split or None] = os.path.abspath(path)
    return dict(files)


SPLITS = ("test_split", "validation_split", "training_split", "fewshot_split")


def local_task(name, splits, shots, task_manager, folder):
    """The path of a YAML in `folder` that includes lm-eval's config of task `name` and reads
    its splits from local files (splits: {None: the scored split's file, split name: file});
    shots: the number of few-shot examples it will take (None: its config's), to check that
    a local split holds them."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager uses
    entry = task_manager.task_index[name]
    if entry.kind.name not in ("TASK", "PY_TASK") or entry.yaml_path is None:
        raise SystemExit(f"error: --harness_files names {name!r}, a {entry.kind.name.lower()} of tasks: give "
                         f"files for its tasks (python -m lm_eval ls tasks lists them) and list those in --harness")
    config = load_yaml(entry.yaml_path, resolve_func=False)
    if "class" in config or config.get("custom_dataset"):
        raise SystemExit(f"error: {name} builds its data in Python (a class or custom_dataset), so --harness_files "
                         f"cannot replace it")
    scored = config.get("test_split") or config.get("validation_split")
    paths = {scored if split is None else split: path for split, path in splits.items()}
    for path in paths.values():
        if not os.path.isfile(path):
            raise SystemExit(f"error: --harness_files: {path} ({name}) does not exist")
    overrides = {"task": name, "include": str(entry.yaml_path), "dataset_name": None,
                 "dataset_path": "parquet" if any(p.endswith(".parquet") for p in paths.values()) else "json",
                 "dataset_kwargs": {"data_files": paths}}
    for key in SPLITS:  # a split with no local file is one the task cannot read
        if config.get(key) and config[key] not in paths:
            overrides[key] = None
    # where lm-eval takes the shots from (ConfigurableTask.fewshot_docs): samples in the config
    # (a list, or a !function), else the few-shot split, else the training, validation or test split
    shots = config.get("num_fewshot") if shots is None else shots
    given = (config.get("fewshot_config") or {}).get("samples") is not None
    shot_split = next(filter(None, (config.get(k) for k in ("fewshot_split", "training_split", "validation_split",
                                                           "test_split"))), None)
    if shots and not given and shot_split not in paths:
        raise SystemExit(f"error: {name} takes {shots} shots from its {shot_split!r} split: add "
                         f"--harness_files={name}:{shot_split}=path")
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(overrides, f)  # JSON is YAML
    return path


def parse_fewshot(text):
    """--harness_fewshot=task=N[,task=N] -> {task: N}."""
    try:
        return {task: int(n) for task, n in (pair.split("=") for pair in filter(None, text.split(",")))}
    except ValueError:
        raise SystemExit(f"error: --harness_fewshot={text}: expected task=N[,task=N]") from None


# ------------------------------------------------------------------ one run


@functools.cache
def registry():
    """lm-eval's TaskManager: indexing its task YAMLs takes seconds, so once per process."""
    from lm_eval.tasks import TaskManager
    return TaskManager()


def run(model, tokenizer, tasks, files="", fewshot="", limit=0, batch_size=16, chat=False, samples_path=None):
    """lm_eval.simple_evaluate on HarnessLM: {"results": per task and group, "n-samples",
    "versions", "lm_eval"}; every scored item (its requests, responses, filtered answer,
    target and metrics) goes to samples_path as JSON lines when given."""
    require_lm_eval()
    import lm_eval
    task_manager = registry()
    unknown = [t for t in tasks if t not in task_manager.task_index]
    if unknown:
        close = [m for t in unknown for m in difflib.get_close_matches(t, list(task_manager.task_index), 3)]
        raise SystemExit(f"error: --harness: {', '.join(unknown)} not in lm-eval's registry"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))
    local, shots = parse_files(files), parse_fewshot(fewshot)
    unused = sorted((set(local) | set(shots)) - set(tasks))
    if unused:
        raise SystemExit(f"error: --harness_files/--harness_fewshot name {', '.join(unused)}, not in --harness")
    with tempfile.TemporaryDirectory() as folder:
        specs = [local_task(t, local[t], shots.get(t), task_manager, folder) if t in local else t for t in tasks]
        loaded = task_manager.load(specs)
        chosen = []  # what simple_evaluate loads again: the built tasks and groups, shots set
        for name, spec in zip(tasks, specs):
            built = loaded["groups"].get(name) or loaded["tasks"].get(name)
            if name in shots:
                if built is None:
                    raise SystemExit(f"error: --harness_fewshot names {name!r}, a tag: name its tasks instead")
                for task in built.get_all_tasks() if hasattr(built, "get_all_tasks") else [built]:
                    # as lm_eval --num_fewshot does, but also where a config says 0: the user named the task
                    task.set_config(key="num_fewshot", value=shots[name])
            chosen.append(spec if built is None else built)
        out = lm_eval.simple_evaluate(model=HarnessLM(model, tokenizer, batch_size), tasks=chosen,
                                      task_manager=task_manager, limit=limit or None, log_samples=True,
                                      apply_chat_template=chat, fewshot_as_multiturn=chat)
    if samples_path:
        with open(samples_path + ".tmp", "w") as f:
            for task, items in out["samples"].items():
                for item in items:
                    f.write(json.dumps({"task": task, **item}, default=str) + "\n")
        os.replace(samples_path + ".tmp", samples_path)
    table = lm_eval.utils.make_table(out)
    return {"results": out["results"], "n-samples": out.get("n-samples"), "versions": out.get("versions"),
            "lm_eval": lm_eval.__version__, "chat": chat, "table": table}
