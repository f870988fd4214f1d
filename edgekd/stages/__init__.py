"""The stages of a build, in the order they run.

Listing a stage's SPEC in `SPECS` is its registration: the pipeline, the planner, preflight, bench
and the reports know the stages from this tuple and from nothing else.
"""

from edgekd.stages import bench, distill, export_gguf, export_onnx, qat_kd, qlora
from edgekd.stages.spec import Kind, StageSpec

SPECS: tuple[StageSpec, ...] = (
    distill.SPEC,
    qlora.SPEC,
    qat_kd.SPEC,
    export_gguf.SPEC,
    export_onnx.SPEC,
    bench.SPEC,
)
NAMES: tuple[str, ...] = tuple(s.name for s in SPECS)
_BY_NAME = {s.name: s for s in SPECS}


def get(name: str) -> StageSpec:
    """The spec of the stage called `name`."""
    return _BY_NAME[name]


def of_kind(kind: Kind, names: list[str]) -> list[str]:
    """The stages among `names` of this kind, in their order."""
    return [s for s in names if _BY_NAME[s].kind == kind]


def folders() -> dict[str, str]:
    """Stage name -> its run-folder name, in build order."""
    return {s.name: s.folder for s in SPECS}
