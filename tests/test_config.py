import pytest

from edgekd.config import Recipe, known_profiles, load_profile, load_recipe, settings_hash
from edgekd.errors import EdgekdError


def test_shipped_profiles_validate():
    names = set(known_profiles())
    assert {"phone-1gb", "phone-4gb", "sbc-8gb", "laptop-cpu"} <= names
    for name in names:
        p = load_profile(name)
        assert p.name == name
        assert p.memory_budget_mb <= p.ram_mb
        assert p.description


def test_unknown_profile_lists_known_ones():
    with pytest.raises(EdgekdError, match="unknown profile 'phone-2gb'.*phone-1gb"):
        load_profile("phone-2gb")


def test_user_profile_file_and_typo(tmp_path):
    good = tmp_path / "board.yaml"
    good.write_text(
        "description: my board\nram_mb: 2048\nmemory_budget_mb: 1000\nthreads: 2\n"
        "memory_bandwidth_gbs: 4\ncontext_length: 1024\nformats: [gguf]\n"
    )
    assert load_profile(str(good)).name == "board"
    bad = tmp_path / "typo.yaml"
    bad.write_text(good.read_text().replace("threads", "thread"))
    with pytest.raises(EdgekdError) as e:
        load_profile(str(bad))
    assert str(bad) in str(e.value)
    assert "unknown key 'thread'" in str(e.value)
    assert "missing key 'threads'" in str(e.value)


def test_budget_larger_than_ram_is_refused(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(
        "description: x\nram_mb: 512\nmemory_budget_mb: 1000\nthreads: 2\n"
        "memory_bandwidth_gbs: 4\ncontext_length: 1024\nformats: [gguf]\n"
    )
    with pytest.raises(EdgekdError, match="exceeds ram_mb"):
        load_profile(str(p))


def test_recipe_overrides_in_order(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("distill:\n  kd:\n    temperature: 3\n  max_steps: 7\n")
    r = load_recipe(f, ["distill.kd.temperature=4", "data.pack=true"], teacher="t.gguf")
    assert r.distill.kd.temperature == 4.0
    assert r.distill.max_steps == 7
    assert r.data.pack is True
    assert r.teacher.source == "t.gguf"
    assert load_recipe() == Recipe()


def test_recipe_typo_names_key_and_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("distill:\n  temperatur: 3\n")
    with pytest.raises(EdgekdError, match=rf"{f}: unknown key 'distill.temperatur'"):
        load_recipe(f)
    with pytest.raises(EdgekdError, match=r"--set: unknown key 'distil'"):
        load_recipe(None, ["distil.kd.temperature=4"])
    with pytest.raises(EdgekdError, match=r"'distill.kd.alpha' = 2"):
        load_recipe(None, ["distill.kd.alpha=2"])
    with pytest.raises(EdgekdError, match="expected stage.key=value"):
        load_recipe(None, ["distill.kd.alpha"])
    with pytest.raises(EdgekdError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_settings_hash_changes_with_settings():
    a = settings_hash(Recipe().distill)
    assert a == settings_hash(Recipe().distill)
    assert a != settings_hash(load_recipe(None, ["distill.lr=0.1"]).distill)


@pytest.mark.parametrize("name", ["../../outside", "/tmp/x", "a/b", "..", ".hidden", "a\\b"])
def test_profile_name_cannot_lead_the_run_folder_out_of_export(tmp_path, name):
    base = (known_profiles()["phone-1gb"]).read_text()
    path = tmp_path / "p.yaml"
    path.write_text(base + f"name: {name!r}\n")
    with pytest.raises(EdgekdError, match=r"'name'.*plain folder name"):
        load_profile(str(path))


def test_no_recipe_setting_names_an_output_path():
    """Output names a recipe can reach are closed sets (quant types), so none can leave the run
    folder; the run folder itself comes only from --out or the checked profile name."""
    for item in ("export_gguf.quant=../../x", "export_onnx.quant=[../x]"):
        with pytest.raises(EdgekdError, match="--set: 'export_"):
            load_recipe(None, [item])
