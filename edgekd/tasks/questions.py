"""The shipped tasks' dataset, read from the JSONL beside this file (no download): lm-evaluation-
harness imports this file by path from the task YAMLs (`custom_dataset: !function`)."""

import json
from pathlib import Path

QUESTIONS = Path(__file__).with_name("questions.jsonl")


def load(**kwargs):
    """The questions as a DatasetDict with a `test` split (scored) and a `dev` split (few-shot)."""
    import datasets

    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list([r for r in rows if r["split"] == split])
            for split in ("test", "dev")
        }
    )
