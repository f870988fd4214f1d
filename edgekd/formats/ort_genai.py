"""The onnxruntime-genai runtime for folders from its model builder (genai_config.json + model),
the runtime that ships on devices: its generator picks the greedy token itself.

onnxruntime_genai is imported inside the methods (the benchmark's child measures its own peak
memory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.formats.ort import check_onnx, model_files, onnx_cost
from edgekd.formats.runtime import Runtime, TokenCost, cut_at_stop

if TYPE_CHECKING:
    import torch

CONFIG = "genai_config.json"


class OrtGenai(Runtime):
    """An onnxruntime-genai folder."""

    name = "onnxruntime-genai"

    @classmethod
    def holds(cls, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG).is_file()

    @classmethod
    def weight_files(cls, path: Path) -> list[Path]:
        return model_files(path)

    @classmethod
    def check_files(cls, path: Path) -> None:
        check_onnx(path)

    @classmethod
    def token_cost(cls, path: Path) -> TokenCost:
        # Its graphs leave the head size symbolic; its config states it.
        d = json.loads((Path(path) / CONFIG).read_text())["model"]["decoder"]
        per_layer = d["num_key_value_heads"] * d["head_size"]
        return onnx_cost(Path(path), lambda past, itemsize: sum(per_layer * s for s in itemsize))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts)["input_ids"]

    def load(self) -> None:
        import onnxruntime_genai as og

        trained = json.loads((self.path / CONFIG).read_text())["model"]["context_length"]
        # It refuses a longer max_length than the model's context (tiny test models).
        self._og, self._max_length = og, min(self.n_ctx or trained, trained)
        config = og.Config(str(self.path))
        options = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self._model = og.Model(config)

    def _start(self, ids: list[int]):
        """A generator that has run `ids` (its logits cover every position)."""
        if not hasattr(self, "_model"):
            self.load()
        params = self._og.GeneratorParams(self._model)
        # max_length sizes its shared KV buffer: the profile's context, as on the device.
        params.set_search_options(max_length=self._max_length, do_sample=False)
        generator = self._og.Generator(self._model, params)
        generator.append_tokens(ids)
        return generator

    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        import torch

        return [
            torch.from_numpy(np.asarray(self._start(s).get_output("logits"))[0]).float()
            for s in sequences
        ]

    def complete(self, prompts: list[list[int]], *, max_tokens: int, stop: list[str]) -> list[str]:
        """Its generator's greedy tokens after each raw prompt, until a stop string shows."""
        tok, out = self.tokenizer, []
        for prompt in prompts:
            generator = self._start(list(prompt))
            new: list[int] = []
            while not generator.is_done() and len(new) < max_tokens:
                generator.generate_next_token()
                new.append(int(generator.get_next_tokens()[0]))
                _, stopped = cut_at_stop(tok.decode(new, skip_special_tokens=True), stop)
                if stopped:
                    break
            out.append(cut_at_stop(tok.decode(new, skip_special_tokens=True), stop)[0])
        return out

    def chat(self, conversations: list[list[dict]], *, max_tokens: int) -> list[str]:
        import onnxruntime_genai as og

        from edgekd.data import render_chat

        model, tok = og.Model(str(self.path)), self.tokenizer
        replies = []
        for messages in conversations:
            prompt = render_chat(tok, messages, add_generation_prompt=True, tokenize=True)
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + max_tokens, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(prompt)
            new: list[int] = []
            while not generator.is_done() and len(new) < max_tokens:
                generator.generate_next_token()
                new.append(int(generator.get_next_tokens()[0]))
            replies.append(tok.decode(new, skip_special_tokens=True))
        return replies

    def generate(
        self,
        conversations: list[list[dict]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        parallel: int,
        beams: int = 1,
    ) -> list[str]:
        """Greedy only: its own sampler draws otherwise than edgekd's other runtimes."""
        if temperature > 0 or beams > 1:
            raise EdgekdError(
                "onnxruntime-genai generates greedily here; sample or run beam search in "
                "llama.cpp or transformers"
            )
        return self.chat(conversations, max_tokens=max_tokens)

    def first(self, ids: list[int]) -> int:
        self._generator = self._start(ids)
        self._generator.generate_next_token()
        return int(self._generator.get_next_tokens()[0])

    def next(self, token: int) -> int:
        self._generator.generate_next_token()
        return int(self._generator.get_next_tokens()[0])
