"""Values a build takes from more than one place, resolved once.

A recipe may leave a choice to the device profile (the GGUF and ONNX quant types, bench threads) or
to the host (eval threads), and the profile's formats decide which export stages run. Every reader
(the planner's size and layer choice, preflight, the stages) takes them from one `Effective`,
carried by the Context, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgekd.benchmark import bench_threads
from edgekd.config import Profile, Recipe
from edgekd.errors import EdgekdError
from edgekd.stages import FORMATS, SPECS
from edgekd.stages.spec import StageSpec


@dataclass(frozen=True)
class Effective:
    gguf_quant: str  # export_gguf.quant, else the profile's gguf_quant
    onnx_quant: tuple[str, ...]  # export_onnx.quant, else the profile's onnx_quant
    eval_threads: int  # eval.threads, else torch's threads on this host
    bench_threads: int  # bench.threads, else the profile's, at most this host's cores
    chain: tuple[StageSpec, ...]  # every stage of the build, in order
    # export_gguf.imatrix when the chain exports GGUF: qat_kd then trains against the weighted
    # search too.
    gguf_imatrix: bool = False
    # Examples the longest training stage of the chain draws in one process (max_steps x
    # batch_size x grad_accum); None without one. The shipped prompts answered are that many
    # besides the held-out slice's.
    train_examples: int | None = None


def build_chain(profile: Profile, recipe: Recipe, requested: list[str]) -> tuple[StageSpec, ...]:
    """Every stage of this build: less the stages the recipe turns off and the exports to formats
    the profile does not want (unless asked for by name)."""

    def included(spec: StageSpec) -> bool:
        if spec.name in requested:
            return True
        if spec.kind == "export":
            return spec.produces in profile.formats
        return getattr(getattr(recipe, spec.name), "enabled", True)

    return tuple(s for s in SPECS if included(s))


def check_formats(profile: Profile) -> None:
    """Every format the profile asks for is written by an export stage."""
    unknown = [f for f in profile.formats if f not in FORMATS]
    if unknown:
        raise EdgekdError(
            f"profile {profile.name!r}: formats lists {unknown[0]!r}, which no export stage "
            f"writes; use {', '.join(FORMATS)}"
        )


def resolve(profile: Profile, recipe: Recipe, requested: list[str]) -> Effective:
    """The effective values of a build of `requested` stages (all of the chain when empty)."""
    check_formats(profile)
    onnx_quant = recipe.export_onnx.quant
    chain = build_chain(profile, recipe, requested)
    return Effective(
        gguf_quant=recipe.export_gguf.quant or profile.gguf_quant,
        onnx_quant=tuple(onnx_quant if onnx_quant is not None else profile.onnx_quant),
        eval_threads=recipe.eval.threads or torch.get_num_threads(),
        bench_threads=bench_threads(profile.threads, recipe.bench.threads),
        chain=chain,
        gguf_imatrix=recipe.export_gguf.imatrix and any(s.produces == "gguf" for s in chain),
        train_examples=max(
            (
                t.max_steps * t.batch_size * t.grad_accum
                for t in (getattr(recipe, s.name) for s in chain if s.kind == "train")
            ),
            default=None,
        ),
    )
