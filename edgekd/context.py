"""What stages share: the teacher, its tokenizer, the corpus and the held-out reference.

Everything is loaded on first use and computed once per corpus: the teacher's answers to the shipped
prompts and its held-out log-probs are cached under `<run>/cache/`, keyed by what made them, so
every stage (and a resumed build) reuses them.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState

from edgekd import answer_cache, data, logit_cache, models, served, teacher_data
from edgekd.config import Profile, Recipe, settings_hash
from edgekd.console import console
from edgekd.errors import EdgekdError
from edgekd.evaluate import HeldOut, load_reference, save_reference, torch_logprobs

if TYPE_CHECKING:
    from edgekd.effective import Effective


def on_gpu() -> bool:
    # accelerate treats a process group without CUDA as one process unless told it runs on CPU.
    return torch.cuda.is_available()


@dataclass
class Context:
    run_dir: Path
    profile: Profile
    recipe: Recipe
    effective: Effective  # the build's quant types, threads and stage chain, resolved once
    state: PartialState = field(default_factory=lambda: PartialState(cpu=not on_gpu()))
    work_dir: Path | None = None  # the running stage's temporary folder, set by the pipeline
    stage_key: str | None = None  # the running stage's key, which its checkpoints carry
    stage_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def cache_path(self, name: str) -> Path:
        return self.run_dir / "cache" / name

    def output_of(self, stage: str) -> Path:
        """The finished folder of an earlier stage (read-only for later stages)."""
        return self.stage_dirs[stage]

    def latest_model(self) -> Path:
        """The student folder written by the last training stage finished before this one."""
        for stage_dir in reversed(self.stage_dirs.values()):
            if stage_dir != self.work_dir and (stage_dir / "model" / "config.json").is_file():
                return stage_dir / "model"
        raise FileNotFoundError("no earlier stage wrote a student model")

    @property
    def threads(self) -> int:
        return self.effective.eval_threads

    @cached_property
    def heldout_texts(self) -> list[str]:
        """The held-out rows as the text the tokenizer sees (chat rows through the template)."""
        return [data.row_text(row, self.tokenizer) for row in self._split[1]]

    @cached_property
    def teacher_source(self) -> models.ModelSource:
        return models.resolve_source(self.recipe.teacher.source, role="teacher")

    @property
    def teacher_key(self) -> str:
        return models.teacher_key(self.recipe.teacher, self.teacher_source)

    @property
    def is_served(self) -> bool:
        return self.teacher_source.kind == "served"

    @cached_property
    def served_teacher(self) -> served.Served:
        """The client of a teacher served over an OpenAI-compatible API."""
        return served.Served.open(self.teacher_source.ref, self.recipe.teacher)

    @cached_property
    def served_probe(self) -> served.Probe:
        """What the served teacher can give: its tokenizer against the student's, log-probs."""
        return served.probe(self.served_teacher, self.tokenizer, self.recipe.logit_cache.top_k)

    @cached_property
    def tokenizer(self):
        if self.is_served:
            # The served teacher's tokenizer is not here: the student's is checked against the
            # server's at preflight.
            return models.load_tokenizer(
                models.resolve_source(self.recipe.student.source, role="student")
            )
        return models.load_tokenizer(self.teacher_source)

    def release_teacher(self) -> None:
        """Let go of the in-process teacher (loaded again if asked for again): a stage that
        loads other models after its last use of it holds one model less."""
        self.__dict__.pop("teacher", None)
        gc.collect()

    @cached_property
    def teacher(self) -> torch.nn.Module:
        settings = self.recipe.teacher
        if self.is_served:
            raise EdgekdError(
                f"this step runs the teacher in this process, but it is the "
                f"{self.teacher_source.describe()}; see docs/served-teacher.md for what a served "
                "teacher supports"
            )
        model = models.load_model(
            self.teacher_source,
            dtype=getattr(torch, settings.dtype),
            allow_pickle=settings.allow_pickle,
            role="teacher",
            load_in=settings.load_in,
            device=self.state.device,
        )
        model.requires_grad_(False)
        return model

    @cached_property
    def rows(self) -> list[dict]:
        """The corpus: the user's data, or prompts (shipped, or the user's with data.regenerate)
        answered by the teacher."""
        settings = self.recipe.data
        if settings.source is not None and not settings.regenerate:
            return data.load_corpus(settings.source)
        if settings.source is not None:
            prompts = teacher_data.prompt_rows(data.load_corpus(settings.source), settings.source)
        else:
            shipped = data.default_prompts()[: settings.num_prompts]
            prompts = teacher_data.worth_answering(shipped, settings, self.effective.train_examples)
            if len(prompts) < len(shipped):
                console.print(
                    f"corpus: the teacher's answers to {len(prompts)} of the {len(shipped)} "
                    f"shipped prompts, the held-out slice's and the "
                    f"{self.effective.train_examples} examples the longest training stage draws",
                    highlight=False,
                )
        fingerprint, generation = data.fingerprint(prompts), teacher_data.generation_key(settings)
        key = settings_hash(self.teacher_key, fingerprint, generation)
        path = self.cache_path(f"corpus-{key[:16]}.jsonl")
        with self.state.main_process_first():
            if not path.exists() and self.is_main:
                data.write_jsonl_atomic(path, self._answered(prompts, fingerprint, generation))
        return data.read_jsonl(path)

    def _answered(self, prompts: list[dict], fingerprint: str, generation: dict) -> list[dict]:
        """The teacher's answers: from the machine's answer cache where a GGUF teacher answered
        the same prompts the same way before, else written now (and kept there)."""
        shared = None
        if self.recipe.data.answer_cache and teacher_data.answered_by_llama_cpp(self):
            shared = answer_cache.entry(self.teacher_source.path, fingerprint, generation)
            rows = answer_cache.load(shared)
            if rows is not None:
                console.print(
                    f"teacher answers: {len(rows)} reused from {shared} "
                    "(--set data.answer_cache=false answers again)",
                    highlight=False,
                    soft_wrap=True,
                )
                return rows
        rows = teacher_data.teacher_rows(self, prompts)
        if shared is not None:
            answer_cache.store(shared, rows)
        return rows

    @cached_property
    def _split(self) -> tuple[list[dict], list[dict]]:
        s = self.recipe.data
        return data.split_heldout(self.rows, s.heldout_fraction, s.max_heldout)

    @cached_property
    def train_examples(self) -> list[data.TokenizedExample]:
        s = self.recipe.data
        examples = data.tokenize_rows(self._split[0], self.tokenizer, max_len=s.max_seq_len)
        return data.pack(examples, s.max_seq_len) if s.pack else examples

    @cached_property
    def _heldout_examples(self) -> list[data.TokenizedExample]:
        examples = data.tokenize_rows(
            self._split[1], self.tokenizer, max_len=self.recipe.data.max_seq_len
        )
        # The examples HeldOut keeps: those with a scored position.
        return [ex for ex in examples if logit_cache.trained_positions(ex.labels)]

    @cached_property
    def heldout(self) -> HeldOut:
        return HeldOut.from_examples(self._heldout_examples)

    def _cached_reference_dir(self) -> Path | None:
        """The held-out reference inside the logit cache folder the build reads, if it has one."""
        path = self.recipe.logit_cache.path
        if path is None:
            return None
        folder = Path(path) / logit_cache.REFERENCE_DIR
        return folder if (folder / logit_cache.CACHE_MANIFEST).is_file() else None

    @property
    def reference_source(self) -> str:
        """Where the held-out reference comes from, for the reports."""
        if (folder := self._cached_reference_dir()) is not None:
            return f"logit cache {folder} (the teacher's top {self.recipe.logit_cache.top_k})"
        if self.is_served:
            return f"{self.teacher_source.describe()} (its top {self.recipe.logit_cache.top_k})"
        return f"{self.teacher_source.describe()} (whole vocabulary)"

    @cached_property
    def reference(self) -> list[torch.Tensor]:
        """The teacher's held-out log-probs at temperature 1, computed once per corpus; read from
        the logit cache folder instead when it holds them (its teacher need not be reachable)."""
        if (folder := self._cached_reference_dir()) is not None:
            meta = self.reference_meta()
            cache = logit_cache.load_dir(
                folder, corpus=meta["corpus"], tokenizer=meta["tokenizer"], top_k=meta["top_k"]
            )
            return logit_cache.dense_reference(cache.t)
        key = settings_hash(self.teacher_key, data.fingerprint(self._split[1]), self.recipe.data)
        path = self.cache_path(f"reference-{key[:16]}.safetensors")
        with self.state.main_process_first():
            if not path.exists() and self.is_main:
                if self.is_served:
                    save_reference(
                        path, logit_cache.dense_reference(self._served_scores(self.heldout))
                    )
                    self.scores_journal("held-out").unlink(missing_ok=True)
                else:
                    save_reference(path, torch_logprobs(self.teacher, self.heldout))
        return load_reference(path)

    def _served_scores(self, heldout: HeldOut) -> dict[str, torch.Tensor]:
        """The served teacher's top-k log-probs at the held-out positions, as cache tensors."""
        positions = [p.tolist() for p in heldout.positions]
        return self._served_cache(heldout.sequences, positions, "held-out")

    def _served_cache(
        self, sequences: list[list[int]], positions: list[list[int]], what: str
    ) -> dict[str, torch.Tensor]:
        top_k = self.recipe.logit_cache.top_k
        console.print(
            f"teacher: scoring {len(sequences)} {what} examples at {self.served_teacher.where} "
            f"(top {top_k} log-probs, {self.recipe.teacher.concurrency} at once)",
            highlight=False,
        )
        total = sum(len(p) for p in positions)
        targets = [[s[t + 1] for t in p] for s, p in zip(sequences, positions, strict=True)]
        probe = self.served_probe
        if not (probe.same_tokenizer and probe.prompt_logprobs):
            # Black-box: the teacher's text is all there is; each position holds its label.
            console.print(
                f"teacher: no log-probs usable for the student's tokens ({probe.how}); the "
                f"{what} positions hold their labels",
                highlight=False,
            )
            entries = [[None] * len(p) for p in positions]
            return logit_cache.from_entries(
                entries, targets, positions, top_k=top_k, vocab=len(self.tokenizer)
            )
        scored = served.score(
            self.served_teacher,
            self.tokenizer,
            sequences,
            positions,
            top_k=top_k,
            journal=self.scores_journal(what),
            answers=teacher_data.one_pass_answers(self),
            bosless_pairs=probe.bosless_pairs,
        )
        if scored.one_pass or scored.fallback:
            console.print(
                f"teacher: {scored.one_pass} of {len(sequences)} {what} examples took their "
                f"log-probs from the answers' own generation (one pass), {scored.fallback} were "
                "scored in a second pass (their tokens differ from the generated ones), "
                f"{scored.ends} turn ends train on their label",
                highlight=False,
            )
        console.print(
            f"teacher: {total - scored.missing} of {total} positions have the server's log-probs "
            f"({scored.missing} train on their label); {scored.unmapped} of "
            f"{scored.mapped + scored.unmapped} alternatives named no single token id and "
            "stay in the rest mass",
            highlight=False,
        )
        return logit_cache.from_entries(
            scored.entries, targets, positions, top_k=top_k, vocab=len(self.tokenizer)
        )

    def scores_journal(self, what: str) -> Path:
        """Where the served teacher's scores of `what` are journaled until they are written."""
        return self.cache_path(f"scores-{what}.jsonl")

    def logit_cache_meta(self) -> dict:
        """What the logit cache was made from, for its manifest (no secret: the URL is public)."""
        return {
            "corpus": logit_cache.examples_fingerprint(self.train_examples),
            "tokenizer": logit_cache.tokenizer_hash(self.tokenizer),
            "top_k": self.recipe.logit_cache.top_k,
            "teacher": self.teacher_key,
        }

    def reference_meta(self) -> dict:
        """The held-out reference's manifest fields: as the cache's, for the held-out examples."""
        return {
            **self.logit_cache_meta(),
            "corpus": logit_cache.examples_fingerprint(self._heldout_examples),
        }

    def write_reference(self, folder: Path) -> None:
        """The teacher's top-k log-probs at the held-out positions into `folder` (cache format)."""
        settings = self.recipe.logit_cache
        if self.is_served:
            tensors = self._served_scores(self.heldout)
        else:
            tensors = logit_cache.compute(
                self.teacher.to(self.state.device),
                self._heldout_examples,
                top_k=settings.top_k,
                batch_size=settings.batch_size,
                pad_id=data.padding_id(self.tokenizer),
            )
        logit_cache.write_dir(folder, tensors, self.reference_meta())
        self.scores_journal("held-out").unlink(missing_ok=True)

    def write_logit_cache(self, folder: Path) -> None:
        """Compute the teacher's top-k log-probs at the training positions into `folder`."""
        settings = self.recipe.logit_cache
        if self.is_served:
            examples = self.train_examples
            positions = [logit_cache.trained_positions(ex.labels) for ex in examples]
            tensors = self._served_cache([ex.input_ids for ex in examples], positions, "training")
        else:
            tensors = logit_cache.compute(
                self.teacher.to(self.state.device),
                self.train_examples,
                top_k=settings.top_k,
                batch_size=settings.batch_size,
                pad_id=data.padding_id(self.tokenizer),
            )
        logit_cache.write_dir(folder, tensors, self.logit_cache_meta())
        self.scores_journal("training").unlink(missing_ok=True)

    @cached_property
    def logit_cache(self) -> logit_cache.LogitCache:
        """The teacher's top-k log-probs at the training positions, computed once per corpus."""
        settings = self.recipe.logit_cache
        meta = self.logit_cache_meta()
        if settings.path is not None:
            folder = Path(settings.path)
        else:
            key = settings_hash(self.teacher_key, meta["corpus"], settings.top_k)
            folder = self.cache_path(f"logits-{key[:16]}")
            with self.state.main_process_first():
                if not (folder / logit_cache.CACHE_MANIFEST).exists() and self.is_main:
                    self.write_logit_cache(folder)
        return logit_cache.load_dir(
            folder,
            corpus=meta["corpus"],
            tokenizer=meta["tokenizer"],
            top_k=settings.top_k,
            teacher=meta["teacher"],
        )
