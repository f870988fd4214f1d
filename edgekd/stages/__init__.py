"""The stages of a build, found in this package and put in the order they run.

A stage is a module here that declares `SPEC = StageSpec(...)` beside its `run`; that declaration is
its registration. The pipeline, the planner, preflight, bench and the reports know the stages from
`SPECS` and from nothing else. The order is by kind (training stages, then exports, then bench) and
within a kind by folder number, so a stage added later takes the next free number and still runs
where its kind belongs: a new export runs before bench, which measures it.
"""

import importlib
import pkgutil

from edgekd.stages.spec import KINDS, Kind, StageSpec


def _discover() -> tuple[StageSpec, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, StageSpec):
            found.append(spec)
    return tuple(sorted(found, key=lambda s: (KINDS.index(s.kind), s.folder)))


SPECS: tuple[StageSpec, ...] = _discover()
NAMES: tuple[str, ...] = tuple(s.name for s in SPECS)
FORMATS: tuple[str, ...] = tuple(s.produces for s in SPECS if s.kind == "export")
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
