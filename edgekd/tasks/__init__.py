"""The evaluation tasks edgekd ships: lm-evaluation-harness task files (one YAML per task) over
the questions beside them, which need no network. `scripts/make_tasks.py` writes the questions."""

from pathlib import Path

FOLDER = Path(__file__).parent
SHIPPED: tuple[str, ...] = tuple(sorted(p.stem for p in FOLDER.glob("*.yaml")))
