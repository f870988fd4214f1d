"""lm-evaluation-harness over edgekd's runtimes: its `LM` interface (log-likelihoods, rolling
log-likelihoods, generation up to stop strings) on any `Runtime`, so a GGUF in llama.cpp, an ONNX
folder in onnxruntime and a Hugging Face folder in torch are scored by the same tasks the same way.

Tokenization follows the harness's own Hugging Face backend (`hf`) through its `TemplateLM`: the
context's trailing spaces move to the continuation, the pair is tokenized whole and split at the
context's length, an empty context is conditioned on BOS (else EOS), and a text that already
starts with BOS gets no second one. The tokens are the runtime's own (the GGUF's vocabulary in
llama.cpp), and a task that asks for the chat template gets the model's own.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lm_eval.api.model import TemplateLM

from edgekd import tasks
from edgekd.errors import EdgekdError

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from edgekd.benchmark import Artifact
    from edgekd.formats.runtime import Runtime

# The harness's own default context for a model that states none (its `hf` backend's).
DEFAULT_MAX_LENGTH = 2048


class RuntimeLM(TemplateLM):
    """The harness's model interface over one opened runtime."""

    def __init__(self, runtime: Runtime, *, max_length: int | None = None):
        """`max_length`: the longest sequence scored (the left is cut); default the context the
        runtime was opened with, else the harness's default."""
        super().__init__()
        self.runtime = runtime
        self._max_length = max_length or runtime.n_ctx or DEFAULT_MAX_LENGTH
        self._specials = runtime.specials()
        self._encoded: dict[str, list[int]] = {}
        # What the runtime's tokenizer adds around any text (BOS where the model adds it).
        self._added = runtime.tokenize([""])[0]

    # --- the vocabulary ---

    @property
    def eot_token_id(self) -> int:
        s = self._specials
        return s.eos_id if s.eos_id is not None else s.bos_id

    @property
    def prefix_token_id(self) -> int:
        s = self._specials
        return s.bos_id if s.bos_id is not None else s.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.runtime.path)

    def chat_template(self, chat_template: bool | str = False) -> str:
        return ""  # the runtime renders its own (apply_chat_template)

    def _encode(self, texts: list[str]) -> None:
        """Tokenize the texts not seen yet, in one call to the runtime."""
        missing = sorted({t for t in texts if t not in self._encoded})
        if missing:
            self._encoded.update(zip(missing, self.runtime.tokenize(missing), strict=True))

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """The runtime's tokens, with the specials it adds unless asked not to (or the text
        already starts with BOS), as the `hf` backend's tok_encode."""
        bos = self._specials.bos_text
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        self._encode([string])
        ids = self._encoded[string]
        n = len(self._added)
        if add_special_tokens is False and n and ids[:n] == self._added:
            ids = ids[n:]
        return list(ids)

    # --- scoring ---

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False):
        texts = []
        for context, continuation in (r.args for r in requests):
            stripped = context.rstrip()
            texts += [continuation, stripped, context + continuation]
        self._encode([t for t in texts if t])
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """Each (key, context ids, continuation ids) scored as the `hf` backend scores it: the
        joined ids cut to max_length + 1 from the left, the continuation's log-prob summed."""
        scored = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]
            scored.append((whole, max(1, len(whole) - len(continuation))))
        results = []
        for (key, _, _), c in zip(requests, self.runtime.continuations(scored), strict=True):
            result = (c.logprob, c.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False):
        """The whole text in disjoint windows of max_length, as the `hf` backend cuts it."""
        from lm_eval import utils

        self._encode([r.args[0] for r in requests])
        windows, counts = [], []
        for (text,) in (r.args for r in requests):
            rolling = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            mine = [(None, *utils.make_disjoint_window(w)) for w in rolling]
            windows += mine
            counts.append(len(mine))
        scores = iter(self._loglikelihood_tokens(windows))
        totals = [sum(next(scores)[0] for _ in range(n)) for n in counts]
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # --- generation ---

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations up to the task's stop strings (and the end token's text), the
        contexts cut from the left to leave room for max_gen_toks, grouped by their settings."""
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        self._encode([r.args[0] for r in requests])
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]))
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                raise EdgekdError(
                    "edgekd's harness backend decodes greedily; this task samples (do_sample "
                    "or temperature > 0): pick a task that decodes greedily"
                )
            until = handle_stop_sequences(kwargs.get("until"), eos=self._specials.eos_text)
            max_tokens = int(kwargs["max_gen_toks"])
            room = self.max_length - max_tokens
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in indices]
            texts = self.runtime.complete(prompts, max_tokens=max_tokens, stop=until)
            for i, text in zip(indices, texts, strict=True):
                out[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.runtime.chat_text(chat_history, add_generation_prompt=add_generation_prompt)


@dataclass(frozen=True)
class TaskScore:
    """One task's result on one model: its first metric, the harness's standard error, how many
    questions were scored and how long it took."""

    task: str
    metric: str
    score: float
    stderr: float | None
    n: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def share_of_teacher(score: float, teacher: float) -> float | None:
    """The share of the teacher's score an artifact keeps (1.0: all of it); None where the
    teacher scores nothing, since no share of nothing means anything."""
    return score / teacher if teacher > 0 else None


def _offline() -> None:
    """Never reach the network for a dataset or a file: a task whose data is not here fails at
    once instead of waiting on a connection."""
    import sys

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def task_manager(names: list[str] = ()):
    """The harness's task index with edgekd's shipped tasks added; the harness's own thousands
    of task files are read (seconds) only when a task outside the shipped ones is named."""
    return _task_manager(standard=any(n not in tasks.SHIPPED for n in names))


@functools.cache
def _task_manager(*, standard: bool):
    import logging

    from lm_eval.tasks import TaskManager

    _offline()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=str(tasks.FOLDER), include_defaults=standard)


def _unknown(name: str, known: list[str]) -> EdgekdError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return EdgekdError(
        f"unknown task {name!r}: {hint}edgekd ships {', '.join(tasks.SHIPPED)} (no download); "
        "any lm-evaluation-harness task name works where its dataset is on this machine"
    )


def check_tasks(names: list[str], *, limit: int | None, fewshot: int | None) -> None:
    """EdgekdError unless every task is known and its questions load here, before any model
    runs: a standard task whose dataset is not on this machine is one line saying how to get
    it, not a traceback or a wait on the network."""
    if limit is not None and limit < 1:
        raise EdgekdError(
            f"a limit of {limit} questions per task (--limit, bench.task_limit) scores none; "
            "pass a positive number, or leave it out to score every question"
        )
    if fewshot is not None and fewshot < 0:
        raise EdgekdError(
            f"{fewshot} few-shot examples (--fewshot, bench.task_fewshot) is negative; pass 0 "
            "or more"
        )
    if not names:
        raise EdgekdError(f"no task given; pass --tasks, e.g. {','.join(tasks.SHIPPED)}")
    manager = task_manager(names)
    known = manager.all_tasks
    for name in names:
        if name not in known:
            raise _unknown(name, known)
    for name in names:
        try:
            manager.load([name])
        except OSError as err:  # datasets' offline and not-found errors are all OSErrors
            # The index entry holds the task YAML's fields (the harness version is pinned).
            entry = manager.task_index.get(name)
            config = (entry.cfg if entry else None) or {}
            dataset, subset = config.get("dataset_path", name), config.get("dataset_name")
            load = f"datasets.load_dataset({dataset!r}" + (f", {subset!r})" if subset else ")")
            raise EdgekdError(
                f"task {name}: its dataset {dataset} is not on this machine and edgekd does not "
                f"download ({type(err).__name__}); on a machine with network run python -c "
                f'"import datasets; {load}" and copy ~/.cache/huggingface here (or set '
                "HF_HOME to a copy), or use a shipped task: " + ", ".join(tasks.SHIPPED)
            ) from None


def _primary(name: str, results: dict) -> tuple[str, float, float | None]:
    """The task's first metric (its YAML's first), its value and its standard error."""
    row = results["results"][name]
    for key, value in row.items():
        metric, _, flt = key.partition(",")
        if metric in ("alias", "samples") or metric.endswith("_stderr") or not flt:
            continue
        err = row.get(f"{metric}_stderr,{flt}")
        return metric, float(value), (float(err) if isinstance(err, int | float) else None)
    raise EdgekdError(f"task {name} reported no metric")


def run_tasks(
    runtime: Runtime,
    names: list[str],
    *,
    limit: int | None,
    fewshot: int | None,
    chat_template: bool = False,
) -> list[TaskScore]:
    """Every task on one runtime through the harness (one run per task, timed); with
    `chat_template`, each prompt (and its few-shot examples, as turns) goes through the model's
    own chat template, as the harness's --apply_chat_template does."""
    import lm_eval

    lm = RuntimeLM(runtime)
    scores = []
    for name in names:
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[name],
            num_fewshot=fewshot,
            limit=limit,
            task_manager=task_manager(names),
            bootstrap_iters=1000,
            apply_chat_template=chat_template,
            log_samples=False,
            verbosity="ERROR",
        )
        seconds = time.perf_counter() - start
        metric, score, stderr = _primary(name, results)
        n = results.get("n-samples", {}).get(name, {}).get("effective", 0)
        scores.append(TaskScore(name, metric, score, stderr, int(n), seconds))
    return scores


def score_artifacts(
    found: list[tuple[Artifact, int | None]],
    names: list[str],
    *,
    limit: int | None,
    fewshot: int | None,
    threads: int,
    chat_template: bool = False,
    say=print,
) -> list[dict]:
    """Each artifact (with its parameter count) scored on every task in its own runtime, with
    its share of the teacher's score where a teacher is among them. Every file is checked
    before the first task runs, so a broken one fails at once."""
    from edgekd.benchmark import size_on_disk
    from edgekd.formats.registry import open_runtime, runtime_class

    for artifact, _ in found:
        runtime_class(artifact.runtime).check_files(Path(artifact.path))
    rows = []
    for artifact, params in found:
        say(f"  eval: {artifact.name} ({artifact.runtime}, {threads} threads): {', '.join(names)}")
        runtime = open_runtime(Path(artifact.path), threads=threads)
        try:
            scores = run_tasks(
                runtime, names, limit=limit, fewshot=fewshot, chat_template=chat_template
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise EdgekdError(
                f"{artifact.path}: {artifact.runtime} could not run it "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "re-export it or pass another artifact"
            ) from None
        rows.append(
            {
                "name": artifact.name,
                "runtime": artifact.runtime,
                "role": artifact.role,
                "path": str(artifact.path),
                "size_bytes": size_on_disk(Path(artifact.path)),
                "params": params,
                "tasks": {s.task: s.as_dict() for s in scores},
            }
        )
    add_shares(rows)
    return rows


def add_shares(rows: list[dict]) -> None:
    """Each row's share of the teacher's score per task (None without a teacher row)."""
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    for row in rows:
        for task, s in row["tasks"].items():
            t = teacher["tasks"].get(task) if teacher else None
            s["share"] = share_of_teacher(s["score"], t["score"]) if t else None
