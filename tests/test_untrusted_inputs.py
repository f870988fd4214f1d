"""Untrusted inputs do bounded work and fail in one line: chat templates, YAML aliases, a config
that declares more than its weights, data files that are not text or hold nothing to train on,
and `edgekd bench` on a cut-short or corrupt file or a context the runtime cannot allocate.

The bombs here are sized so that the code before these bounds finished them (slowly, or with a
few hundred MB), never so large that a run of the old code could take the machine down.
"""

import json
import shutil
import time
from copy import deepcopy
from pathlib import Path

import pytest
from jinja2 import TemplateError

from edgekd import chat_template, data
from edgekd.errors import EdgekdError
from edgekd.testing import write_chat_jsonl

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]

# A template a model could ship: nothing the sandbox forbids, only work. 10**7 iterations of an
# empty loop (seconds) stand in for the 10**10 that hang for hours.
NESTED_LOOPS = (
    "{% for a in range(100000) %}{% for b in range(100) %}{% endfor %}{% endfor %}"
    "{{ messages[0]['content'] }}"
)
BOMBS = {
    "nested loops": (NESTED_LOOPS, "loop iterations and calls"),
    "a string repeated": ("{{ 'x' * 10**8 }}", "characters"),
    "a string doubled in a loop": (
        "{% set ns = namespace(s='x') %}{% for i in range(25) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}",
        "characters",
    ),
    "a block doubled in a loop": (
        "{% set ns = namespace(s='x') %}{% for i in range(25) %}{% set t %}{{ ns.s }}{{ ns.s }}"
        "{% endset %}{% set ns.s = t %}{% endfor %}{{ ns.s }}",
        "characters",
    ),
    "a width": ("{{ 'x'|center(10**8) }}", "characters"),
    "a method's width": ("{{ 'x'.rjust(10**8) }}", "characters"),
    "a format width": ("{{ '%0100000000d' % 1 }}", "characters"),
    "replace into every gap": ("{% set s = 'x' * 10000 %}{{ s|replace('', s) }}", "characters"),
    "a recursive macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    "Python internals": ("{{ ''.__class__.__mro__ }}", "stopped by the sandbox"),
}


def _with_template(tokenizer, template: str):
    tok = deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_template_is_refused_at_a_limit_naming_the_tokenizer(tokenizer, name):
    template, limit = BOMBS[name]
    tok = _with_template(tokenizer, template)
    start = time.monotonic()
    with pytest.raises(EdgekdError, match="chat template of tokenizer .* was refused") as err:
        data.render_chat(tok, MESSAGES, add_generation_prompt=False)
    assert limit in str(err.value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    assert time.monotonic() - start < chat_template.MAX_SECONDS + 5


def test_preflight_refuses_a_looping_template_once(tokenizer, chat_jsonl):
    from edgekd.config import load_recipe
    from edgekd.preflight import check_chat_template

    tok = _with_template(tokenizer, NESTED_LOOPS)
    with pytest.raises(EdgekdError, match="1,000,000 loop iterations"):
        check_chat_template(tok, load_recipe(None, [], data=str(chat_jsonl)))
    # Text rows need no template, but one the exports will run is still refused.
    text = chat_jsonl.with_name("text.jsonl")
    text.write_text('{"text": "a"}\n')
    with pytest.raises(EdgekdError, match="was refused"):
        check_chat_template(tok, load_recipe(None, [], data=str(text)))


# Real templates in the shapes models ship: the bounded renderer must write what transformers
# writes, character for character (the corpus, hence the build, is unchanged).
RICH_TEMPLATE = """{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}
{%- endif -%}{%- endfor -%}
{%- macro turn(role, text) -%}<|{{ role }}|>{{ text | trim }}{{ eos_token }}{%- endmacro -%}
{{ bos_token }}{% for m in messages %}
{%- if m['role'] == 'assistant' %}{% generation %}{{ turn(m['role'], m['content']) }}
{% endgeneration %}{% else %}{{ turn(m['role'], m['content'] ~ ' #' ~ loop.index) }}
{% endif %}{% if loop.last and loop.index0 == ns.last_user %}{{ '(last: {})'.format(ns.last_user) }}
{% endif %}{% endfor %}{{ {'n': messages|length, 'roles': messages|map(attribute='role')|list}
| tojson(indent=2) }}{{ '%s-%03d' | format('x', messages|length) }}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""


def _llama_cpp_templates() -> list[str]:
    from llama_cpp import llama_chat_format as f

    return [
        f.CHATML_CHAT_TEMPLATE,
        f.MISTRAL_INSTRUCT_CHAT_TEMPLATE,
        f.LLAMA3_INSTRUCT_CHAT_TEMPLATE,
    ]


@pytest.mark.parametrize("which", ["SmolLM2", "rich", "chatml", "mistral", "llama3"])
def test_bounded_rendering_writes_what_transformers_writes(tokenizer, which):
    templates = [tokenizer.chat_template, RICH_TEMPLATE, *_llama_cpp_templates()]
    names = ["SmolLM2", "rich", "chatml", "mistral", "llama3"]
    tok = _with_template(tokenizer, templates[names.index(which)])
    convo = [{"role": "system", "content": "Be brief."}, *MESSAGES, MESSAGES[0]]
    for messages in (convo, convo[1:2], convo[1:3], convo[1:]):
        for gen, ids in ((False, False), (True, False), (True, True)):
            kw = {"add_generation_prompt": gen, "tokenize": ids}
            try:
                want = tok.apply_chat_template(messages, **kw)
            except TemplateError:  # Mistral's refuses a system turn: so must edgekd
                with pytest.raises(EdgekdError, match="failed to render a conversation"):
                    data.render_chat(tok, messages, **kw)
                continue
            assert data.render_chat(tok, messages, **kw) == want


def test_teacher_prompts_from_a_gguf_are_what_llama_cpp_python_writes():
    from llama_cpp import Llama, llama_chat_format

    from edgekd.formats.llama_cpp import _chat_prompts
    from edgekd.models import embedded_teacher_gguf

    path = embedded_teacher_gguf()
    llm = Llama(str(path), vocab_only=True, verbose=False)
    convos = [[{"role": "user", "content": "Hi"}], [{"role": "system", "content": "S"}, *MESSAGES]]
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()),
    )
    want = [
        llm.tokenize(formatter(messages=c).prompt.encode(), add_bos=False, special=True)
        for c in convos
    ]
    assert _chat_prompts(llm, path, convos) == want


def set_chat_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of a GGUF with another chat template, written by gguf-py's own metadata tool (edgekd's
    exporter refuses such templates)."""
    import subprocess
    import sys

    cmd = ["-m", "gguf.scripts.gguf_new_metadata", str(src), str(dst), "--force"]
    subprocess.run(
        [sys.executable, *cmd, "--chat-template", template], check=True, capture_output=True
    )
    return dst


@pytest.fixture(scope="module")
def evil_gguf(tmp_path_factory, tiny_teacher_dir):
    """GGUF files of the tiny teacher whose chat templates a model could ship."""
    from edgekd.formats.gguf import write_gguf

    root = tmp_path_factory.mktemp("evil-gguf")
    good = write_gguf(tiny_teacher_dir, root / "good.gguf", dtype="F16")
    templates = {
        # Folded while llama-cpp-python compiles it, at every model load.
        "folded": "{{ 'x' * 10**8 }}{{ messages[0]['content'] }}",
        # Harmless on the probe conversation; the export's sample question trips it.
        "question": "{% if 'capital' in messages[0]['content'] %}{{ ''.__class__.__mro__ }}"
        "{% endif %}{{ messages[0]['content'] }}",
        "loops": NESTED_LOOPS,
    }
    return {n: set_chat_template(good, root / f"{n}.gguf", t) for n, t in templates.items()}


def test_a_gguf_whose_template_jinja_would_fold_unbounded_is_refused_before_loading(evil_gguf):
    from edgekd.formats.llama_cpp import LlamaCpp

    with pytest.raises(EdgekdError, match=r"folded.gguf \(tokenizer.chat_template\) was refused"):
        LlamaCpp(evil_gguf["folded"], threads=1).tokenize(["Hi"])


@pytest.mark.parametrize("name", ["question", "loops"])
def test_an_export_says_its_chat_template_was_refused_and_why(evil_gguf, name):
    from edgekd.formats.llama_cpp import LlamaCpp

    question = [[{"role": "user", "content": "What is the capital of France?"}]]
    runtime = LlamaCpp(evil_gguf[name], threads=1, n_ctx=64)
    with pytest.raises(EdgekdError, match=f"{name}.gguf was refused") as err:
        runtime.chat(question, max_tokens=2)
    assert ("sandbox" if name == "question" else "loop iterations") in str(err.value)
    with pytest.raises(EdgekdError, match="was refused"):
        runtime.generate(question, max_tokens=2, temperature=0.0, seed=0, parallel=1)


# --- YAML ---------------------------------------------------------------------------------------

LAUGHS = "".join(
    f"{x}: &{x} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n"
    for p, x in zip(["", "a", "b", "c", "d"], "abcde", strict=True)
)


@pytest.mark.parametrize(
    "text",
    [LAUGHS + "distill:\n  lr: *e\n", "distill: &x\n  kd: *x\n"],
    ids=["nested aliases", "a recursive alias"],
)
def test_yaml_aliases_that_expand_without_bound_are_refused(tmp_path, text):
    from edgekd.config import load_profile, load_recipe

    path = tmp_path / "laughs.yaml"
    path.write_text(text)
    start = time.monotonic()
    for load in (lambda: load_recipe(path, []), lambda: load_profile(str(path))):
        with pytest.raises(EdgekdError, match=r"laughs.yaml: its aliases \(\*name\) expand") as e:
            load()
        assert len(str(e.value)) < 300
    assert time.monotonic() - start < 5


def test_a_few_yaml_aliases_still_load(tmp_path):
    from edgekd.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("distill: {lr: &lr 0.0002}\nqat_kd: {lr: *lr}\n")
    recipe = load_recipe(path, [])
    assert recipe.distill.lr == recipe.qat_kd.lr == 0.0002


def test_yaml_that_is_not_utf8_names_the_byte(tmp_path):
    from edgekd.config import load_recipe

    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"distill:\n  lr: 0.0001 # caf\xe9\n")
    with pytest.raises(EdgekdError, match=r"latin1.yaml: not UTF-8 text \(byte 27"):
        load_recipe(path, [])


# --- data files ---------------------------------------------------------------------------------


def test_a_data_file_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(EdgekdError, match=r"bad.jsonl:2: not UTF-8 text \(byte 28 is b'\\xe9'\)"):
        data.load_corpus(str(path))


def test_binary_content_in_a_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"one paragraph\n\n" + bytes(range(128)) * 4)
    with pytest.raises(EdgekdError, match=r"notes.txt:3: binary content \(a NUL byte at byte 15\)"):
        data.load_corpus(str(path))


def _plan(tiny_teacher_dir, tmp_path, rows=None, teacher=None, profile="phone-1gb"):
    from edgekd.config import load_profile, load_recipe
    from edgekd.plan import make_plan

    corpus = tmp_path / "corpus.jsonl"
    if rows is None:
        write_chat_jsonl(corpus)
    else:
        data.write_jsonl_atomic(corpus, rows)
    profile = load_profile(profile)
    sets = ["student.num_layers=1", "distill.batch_size=2"]
    recipe = load_recipe(None, sets, teacher=str(teacher or tiny_teacher_dir), data=str(corpus))
    return profile, recipe, make_plan(profile, recipe, ["distill"])


def test_preflight_says_when_no_row_has_anything_to_train_on(tiny_teacher_dir, tmp_path):
    from edgekd.preflight import preflight

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(40)]
    profile, recipe, plan = _plan(tiny_teacher_dir, tmp_path, rows)
    with pytest.raises(EdgekdError, match="none of its .* training rows has a token to train on"):
        preflight(profile, recipe, plan, tmp_path / "run")


def test_preflight_compares_the_config_with_the_weights_present(tiny_teacher_dir, tmp_path):
    from edgekd.preflight import preflight

    teacher = tmp_path / "huge-config"
    shutil.copytree(tiny_teacher_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config.update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40)
    config.update(num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False)
    (teacher / "config.json").write_text(json.dumps(config))
    profile, recipe, plan = _plan(tiny_teacher_dir, tmp_path, teacher=teacher, profile="laptop-cpu")
    declared = r"its config declares 9,\d{3},\d{3},\d{3} parameters \(19.0 GB in 16 bits\)"
    with pytest.raises(EdgekdError, match=f"folder {teacher}: {declared}") as err:
        preflight(profile, recipe, plan, tmp_path / "run")
    assert "weight files hold 3,293,760 values" in str(err.value)


# --- edgekd bench ---------------------------------------------------------------------------


def _bench(path: Path, **profile_changes):
    from edgekd.benchmark import bench_file
    from edgekd.config import load_profile, load_recipe

    profile = load_profile("phone-1gb").model_copy(update=profile_changes)
    settings = load_recipe(None, ["bench.runs=1", "bench.questions=1"]).bench
    return bench_file(path, profile, settings)


def _cut(src: Path, dst: Path, fraction: float) -> Path:
    dst.write_bytes(src.read_bytes()[: int(src.stat().st_size * fraction)])
    return dst


@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.95])
def test_bench_on_a_cut_short_gguf_is_one_line(evil_gguf, tmp_path, fraction):
    # The tiny teacher's own template is fine; the "loops" GGUF is only used as a real file.
    cut = _cut(evil_gguf["loops"], tmp_path / "cut.gguf", fraction)
    with pytest.raises(EdgekdError, match=f"{cut}.* truncated"):
        _bench(cut)


@pytest.mark.parametrize("damage", ["random", "truncated", "missing data"])
def test_bench_on_a_corrupt_onnx_is_one_line(tiny_teacher_dir, tmp_path_factory, damage):
    import os

    from edgekd.formats.onnx import export_onnx

    folder = export_onnx(tiny_teacher_dir, tmp_path_factory.mktemp("onnx") / "fp32")
    model = folder / "model.onnx"
    if damage == "random":
        model.write_bytes(os.urandom(65536))
    elif damage == "truncated":
        _cut(model, model, 0.5)
    else:
        import onnx

        proto = onnx.load(model)
        onnx.save(proto, model, save_as_external_data=True, location="model.onnx.data")
        _cut(folder / "model.onnx.data", folder / "model.onnx.data", 0.5)
    with pytest.raises(
        EdgekdError, match=f"{folder}/model.onnx.* (is|are) .*(truncated|malformed)"
    ):
        _bench(folder)


def test_bench_refuses_a_context_llama_cpp_cannot_allocate(tiny_teacher_dir, tmp_path):
    from edgekd.formats.gguf import write_gguf

    gguf = write_gguf(tiny_teacher_dir, tmp_path / "m.gguf", dtype="F16")
    with pytest.raises(EdgekdError, match=r"allocates the whole 4000000000-token context") as e:
        _bench(gguf, context_length=4_000_000_000)
    assert "lower the profile's context_length" in str(e.value)
