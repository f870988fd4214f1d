"""The machine-wide cache of a GGUF teacher's answers: its place, its key, a damaged entry, and two
builds' contexts, the second reusing the first's answers."""

import shutil

from edgekd import answer_cache
from edgekd.config import load_profile, load_recipe
from edgekd.context import Context
from edgekd.data import read_jsonl, write_jsonl_atomic
from edgekd.effective import resolve


def test_root_follows_edgekd_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "mine"))
    assert answer_cache.root() == tmp_path / "mine"
    monkeypatch.delenv("EDGEKD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert answer_cache.root() == tmp_path / "xdg" / "edgekd"


def test_entry_is_keyed_on_the_teacher_bytes_prompts_and_generation(tmp_path):
    a, moved, other = tmp_path / "a.gguf", tmp_path / "elsewhere.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"weights")
    moved.write_bytes(b"weights")
    other.write_bytes(b"other weights")
    gen = {"gen_max_tokens": 128}
    base = answer_cache.entry(a, "prompts", gen)
    assert answer_cache.entry(moved, "prompts", gen) == base  # the file's bytes, not its path
    assert base.parent == answer_cache.root() / "answers"
    changed = [
        answer_cache.entry(other, "prompts", gen),
        answer_cache.entry(a, "other prompts", gen),
        answer_cache.entry(a, "prompts", {"gen_max_tokens": 64}),
    ]
    assert len({base, *changed}) == 4


def test_a_damaged_entry_is_a_miss_that_says_so(tmp_path, capsys):
    assert answer_cache.load(tmp_path / "none.jsonl") is None
    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messa')
    assert answer_cache.load(cut) is None
    assert f"{cut} is unreadable" in capsys.readouterr().out
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "not an answer"}\n')
    assert answer_cache.load(text) is None
    assert "holds no chat rows" in capsys.readouterr().out


def test_an_unwritable_cache_costs_only_the_reuse(tmp_path, capsys):
    blocker = tmp_path / "answers"
    blocker.write_text("a file where the folder should be")
    answer_cache.store(blocker / "x.jsonl", [{"messages": []}])
    assert "could not write" in capsys.readouterr().out


def _context(run, gguf, *sets):
    profile = load_profile("phone-1gb")
    sets = ["data.num_prompts=3", "data.generation.max_tokens=4", *sets]
    recipe = load_recipe(None, sets, teacher=str(gguf))
    return Context(run, profile, recipe, resolve(profile, recipe, ["distill"]))


def test_a_second_build_reuses_the_answers_and_the_setting_bypasses_them(
    tmp_path, tiny_llama_gguf, capsys
):
    # The teacher file moved between the builds: the answers still belong to its bytes.
    first_teacher = shutil.copy(tiny_llama_gguf[1], tmp_path / "first.gguf")
    first = _context(tmp_path / "run1", first_teacher).rows
    assert len(first) == 3 and "reused" not in capsys.readouterr().out
    [entry] = (answer_cache.root() / "answers").iterdir()
    assert read_jsonl(entry) == first

    # The reused answers are the cache's (marked here so the test cannot pass on a re-answer).
    marked = [{**row, "cached": True} for row in first]
    write_jsonl_atomic(entry, marked)
    second = _context(tmp_path / "run2", tiny_llama_gguf[1]).rows
    assert second == marked
    assert f"teacher answers: 3 reused from {entry}" in capsys.readouterr().out

    fresh = _context(tmp_path / "run3", tiny_llama_gguf[1], "data.answer_cache=false").rows
    assert fresh == first and "reused" not in capsys.readouterr().out
