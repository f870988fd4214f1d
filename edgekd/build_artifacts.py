"""The artifacts of a finished build, found through the stage specs as the bench stage finds
them: the teacher named in build.json, the latest student and every export stage's outputs, each
with the parameter count of the model it holds."""

from __future__ import annotations

from pathlib import Path

from edgekd import models, stages
from edgekd.benchmark import Artifact, export_artifacts, teacher_artifact
from edgekd.errors import EdgekdError
from edgekd.formats.registry import runtime_of
from edgekd.rundir import BUILD_FILE, read_done, read_json


def of_artifact(path: Path) -> list[tuple[Artifact, int | None]]:
    """One artifact alone, in the runtime its files need (an EdgekdError if none runs it)."""
    path = Path(path)
    if not path.exists():
        raise EdgekdError(f"{path} does not exist; pass a .gguf file, an ONNX or model folder")
    artifact = Artifact(path.name, runtime_of(path), path)
    return [(artifact, models.params_at(path))]


def of_run(run_dir: Path) -> list[tuple[Artifact, int | None]]:
    """The build's teacher, its latest student and every export, in build order."""
    build = read_json(Path(run_dir) / BUILD_FILE, "build file")
    done = {s.name: run_dir / s.folder for s in stages.SPECS if read_done(run_dir / s.folder)}
    teacher_src = models.resolve_source(build["teacher"], role="teacher")
    teacher = teacher_artifact(teacher_src)
    found = [(teacher, models.param_count(models.load_config(teacher_src)))]
    trained = [s for s in stages.SPECS if s.kind == "train" and s.name in done]
    if not trained:
        return found
    student = done[trained[-1].name] / "model"
    params = models.params_at(student)
    found.append((Artifact("student", "torch", student, role="student"), params))
    exports = [s for s in stages.SPECS if s.kind == "export" and s.name in done]
    found += [(a, params) for a in export_artifacts(exports, done)]
    return found


def find(path: Path) -> list[tuple[Artifact, int | None]]:
    """A run folder's artifacts, or the one artifact `path` is."""
    return of_run(path) if (Path(path) / BUILD_FILE).is_file() else of_artifact(path)
