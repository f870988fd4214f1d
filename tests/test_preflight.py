"""Preflight checks of the teacher-written data settings."""

import json

import pytest

from edgekd.config import load_recipe
from edgekd.errors import EdgekdError
from edgekd.preflight import check_data


def test_cot_and_regenerate_on_user_data(chat_jsonl):
    with pytest.raises(EdgekdError, match="data.cot=true .* set data.regenerate=true"):
        check_data(load_recipe(None, ["data.cot=true"], data=str(chat_jsonl)))
    check_data(load_recipe(None, ["data.cot=true", "data.regenerate=true"], data=str(chat_jsonl)))
    rows = chat_jsonl.read_text().splitlines()
    rows[3] = json.dumps({"text": "plain text"})
    chat_jsonl.write_text("\n".join(rows) + "\n")
    with pytest.raises(EdgekdError, match="row 4 is not one user turn"):
        check_data(load_recipe(None, ["data.regenerate=true"], data=str(chat_jsonl)))
