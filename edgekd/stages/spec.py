"""What the rest of edgekd knows about a stage, declared by the stage beside its `run`.

The pipeline (order, keys, resume), the planner (disk estimate), preflight (the stage's own check),
bench (the artifacts an export left) and the reports read a stage through its `StageSpec` only;
`edgekd.stages.SPECS` lists them in build order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from pydantic import BaseModel

    from edgekd.config import Recipe
    from edgekd.context import Context
    from edgekd.effective import Effective
    from edgekd.plan import Plan
    from edgekd.rundir import StageResult

Kind = Literal["train", "export", "bench"]
KINDS: tuple[Kind, ...] = ("train", "export", "bench")  # the order a build runs them in


@dataclass(frozen=True)
class SizeInputs:
    """What a disk or memory estimate is computed from: configs and settings, no weights.

    fp32 weights are 4 bytes a parameter; a training checkpoint adds the weights again and
    AdamW's two moments (12)."""

    student_config: object
    params: int
    gguf_bytes: int  # the student's GGUF at the build's effective quant type
    recipe: Recipe
    effective: Effective
    teacher_config: object | None = None  # None: a served teacher, not on this machine


class Output(NamedTuple):
    """A device artifact an export stage left in its folder, for bench to measure."""

    name: str
    path: Path
    shipped: bool  # what the build exports for the profile (not only a reference like F16)
    # Its held-out scores as the stage measured them, on the run's slice against its reference:
    # bench reports them rather than measuring the same thing again.
    quality: dict | None = None


@dataclass(frozen=True)
class StageSpec:
    """A stage's contract.

    name: the stage's name in --stages, in the recipe (its settings section) and in reports.
    settings: the pydantic model of its recipe section.
    kind: "train" writes a student model folder that later stages start from; "export" turns the
        latest student into device files of `produces`; "bench" measures everything before it.
    folder: its run-folder name, "NN-name"; written here, never derived from a position, so that
        inserting a stage renames nothing.
    produces: the format of what it writes ("hf" model folder, "gguf", "onnx"), or None. An export
        stage is in the build when the profile's `formats` lists it, or when asked for by name.
    disk_bytes: its peak size in the run folder, estimated before the build.
    host_bytes: its peak resident memory on the host (its process and the children it runs),
        estimated before the build.
    run: run(ctx, settings) -> StageResult, in its partial folder `ctx.work_dir`.
    check: check(plan, tokenizer), what the stage needs of the student before any work; raises
        EdgekdError with one clear line.
    outputs: export stages: outputs(folder, report) lists the device artifacts bench measures.
    main_only: run on the main process only (the others get an empty result).
    keyed_with: other recipe sections that change its output; they join its key.
    needs: the architecture feature it needs of the student ('gguf', 'onnx', 'qat': see
        edgekd.architectures), checked by the planner before any work.
    """

    name: str
    settings: type[BaseModel]
    kind: Kind
    folder: str
    produces: str | None
    disk_bytes: Callable[[SizeInputs], int]
    host_bytes: Callable[[SizeInputs], int]
    run: Callable[[Context, BaseModel], StageResult]
    check: Callable[[Plan, object], None] | None = None
    outputs: Callable[[Path, dict], list[Output]] | None = None
    main_only: bool = False
    keyed_with: tuple[str, ...] = ()
    needs: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d\d-[a-z0-9-]+", self.folder):
            raise ValueError(f"stage {self.name}: folder {self.folder!r} is not 'NN-name'")
        if self.kind == "export" and (self.produces is None or self.outputs is None):
            raise ValueError(f"export stage {self.name} must name its format and its outputs")
