"""`edgekd teacher-cache` with a teacher in this process: the same folder format a served teacher
fills, holding exactly what the build's own cache would."""

import torch
from typer.testing import CliRunner

from edgekd import logit_cache
from edgekd.cli import app
from edgekd.config import load_profile, load_recipe
from edgekd.context import Context
from edgekd.effective import resolve
from edgekd.teacher_cache import CORPUS


def test_in_process_teacher_cache_is_the_builds_own(tmp_path, tiny_teacher_dir, chat_jsonl):
    sets = ["data.max_seq_len=64", "logit_cache.top_k=8"]
    out = tmp_path / "cache"
    args = ["teacher-cache", "--teacher", str(tiny_teacher_dir), "--data", str(chat_jsonl)]
    result = CliRunner().invoke(
        app, [*args, "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    )
    assert result.exit_code == 0, result.output
    assert (out / CORPUS).is_file() and (out / logit_cache.CACHE_MANIFEST).is_file()

    profile = load_profile("phone-1gb")
    recipe = load_recipe(None, sets, teacher=str(tiny_teacher_dir), data=str(out / CORPUS))
    ctx = Context(tmp_path / "run", profile, recipe, resolve(profile, recipe, ["distill"]))
    own = ctx.logit_cache  # computed into the run's cache folder
    recipe = load_recipe(
        None,
        [*sets, f"logit_cache.path={out}"],
        teacher=str(tiny_teacher_dir),
        data=str(out / CORPUS),
    )
    shipped = Context(tmp_path / "run2", profile, recipe, resolve(profile, recipe, ["distill"]))
    for name, value in own.t.items():
        assert torch.equal(shipped.logit_cache.t[name], value), name
    assert logit_cache.read_manifest(out)["teacher"] == ctx.teacher_key
