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

import json
from typing import TYPE_CHECKING

from lm_eval.api.model import TemplateLM

from edgekd.errors import EdgekdError

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from edgekd.formats.runtime import Runtime

# The harness's own default context for a model that states none (its `hf` backend's).
DEFAULT_MAX_LENGTH = 2048


class RuntimeLM(TemplateLM):
    """The harness's model interface over one opened runtime."""

    def __init__(self, runtime: Runtime, *, max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        self.runtime = runtime
        self._max_length = max_length
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

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
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
            scored.append((whole, len(whole) - len(continuation)))
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
                    "or temperature > 0): pass --gen-kwargs do_sample=false or another task"
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
