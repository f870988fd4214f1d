"""The served teacher against llama-cpp-python's real OpenAI-compatible server on the loopback
(a tiny GGUF teacher), and behind a proxy that injects faults for the retry and timeout paths."""

import json

import pytest
import torch

from edgekd import logit_cache, served
from edgekd.config import TeacherSettings
from edgekd.data import tokenize_rows
from edgekd.errors import EdgekdError
from edgekd.models import load_model, resolve_source
from edgekd.testing import FaultProxy, llama_server, write_chat_jsonl


@pytest.fixture(scope="session")
def server(tiny_llama_gguf):
    with llama_server(tiny_llama_gguf[1], alias="tiny") as url:
        yield url


def teacher(url: str, **settings) -> served.Served:
    return served.Served.open(url, TeacherSettings(source=url, model="tiny", **settings))


@pytest.fixture
def proxy(server):
    p = FaultProxy(server)
    yield p
    p.close()


def test_model_name_is_checked_against_the_served_list(server):
    teacher(server).check_model()
    with pytest.raises(EdgekdError, match=r"teacher.model=nope is not served at .*it serves: tiny"):
        served.Served.open(server, TeacherSettings(source=server, model="nope")).check_model()
    with pytest.raises(EdgekdError, match="teacher.model is unset.*it serves: tiny"):
        served.Served.open(server, TeacherSettings(source=server)).check_model()


def test_probe_finds_the_same_tokenizer_and_prompt_logprobs(server, tokenizer, tmp_path):
    found = served.probe(teacher(server), tokenizer, 8)
    assert found.same_tokenizer and found.prompt_logprobs
    assert found.how == "the server's tokenize endpoint"
    assert found.lines("x") == []
    # llama-cpp-python's server gives any k with a generation: answers come in one pass.
    assert found.answer_logprobs >= 8 and found.one_pass(TeacherSettings(), 8)
    assert found.lines("x", answers=True, top_k=8) == []
    # It echoes a text without a leading BOS one position on, and the probe finds that out.
    assert found.bosless_pairs is False
    two = found.lines("x", answers=True, top_k=8, settings=TeacherSettings(one_pass=False))
    assert ["teacher.one_pass=false" in line and "second pass" in line for line in two] == [True]


def test_server_capping_top_logprobs_falls_back_in_one_line(proxy, tokenizer):
    """A server that gives fewer alternatives than logit_cache.top_k with a generation (OpenAI
    caps them at 20): the answers are scored in a second pass, said in one line."""
    proxy.fault = "cap:4"
    found = served.probe(teacher(proxy.url), tokenizer, 8)
    assert found.prompt_logprobs and found.answer_logprobs == 4
    assert not found.one_pass(TeacherSettings(), 8)
    [line] = found.lines("x", answers=True, top_k=8)
    assert (
        "returns 4 alternatives with a token it generates, fewer than logit_cache.top_k=8" in line
    )
    assert "second pass" in line and "logit_cache.top_k=4" in line


def test_probe_sees_another_tokenizer(server, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A word-level tokenizer: no text of the probe tokenizes the same.
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["the", "quick", "brown", "fox"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert not served.probe(teacher(server), other).same_tokenizer


def test_another_tokenizer_refuses_logit_kd_not_answers(server, tiny_teacher_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from edgekd.config import load_profile, load_recipe
    from edgekd.plan import make_plan
    from edgekd.preflight import check_served

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    sets = ["teacher.model=tiny", f"student.source={tiny_teacher_dir}"]
    profile = load_profile("phone-1gb")
    recipe = load_recipe(None, sets, teacher=server)
    plan = make_plan(profile, recipe, ["distill"], timing=False)
    with pytest.raises(EdgekdError, match=r"tokenizes differently.*set distill.kd.alpha=0"):
        check_served(recipe, plan, other)
    # The black-box path: the teacher's answers alone.
    recipe = load_recipe(None, [*sets, "distill.kd.alpha=0"], teacher=server)
    assert check_served(recipe, plan, other) == []


def test_missing_api_key_variable_is_one_line(server, monkeypatch):
    monkeypatch.delenv("EDGEKD_TEST_KEY", raising=False)
    with pytest.raises(EdgekdError, match="teacher.api_key_env=EDGEKD_TEST_KEY: .* not set"):
        served.Served.open(server, TeacherSettings(source=server, api_key_env="EDGEKD_TEST_KEY"))


def test_generate_journals_answers_and_resumes(proxy, tmp_path):
    t = teacher(proxy.url, concurrency=2)
    convs = [[{"role": "user", "content": f"Say {i}."}] for i in range(5)]
    journal = tmp_path / "answers.jsonl"
    first = t.generate(convs[:3], max_tokens=4, temperature=0, seed=0, journal=journal)
    assert len(journal.read_text().splitlines()) == 3
    asked = proxy.requests["/v1/chat/completions"]
    # A kill mid-write leaves a torn last line: it is skipped, and only the rest is asked.
    with journal.open("a") as f:
        f.write('{"key": "torn')
    again = t.generate(convs, max_tokens=4, temperature=0, seed=0, journal=journal)
    assert again[:3] == first
    assert proxy.requests["/v1/chat/completions"] - asked == 2


def test_one_pass_answers_journal_their_logprobs_and_resume(proxy, tokenizer, tmp_path):
    """Answers written in one pass are journaled with their prompt ids, tokens and top-k
    log-probs as they arrive; a rerun asks only for the answers missing."""
    from edgekd.data import render_ids

    t = teacher(proxy.url, concurrency=2)
    convs = [[{"role": "user", "content": f"Say {i}."}] for i in range(4)]
    ids = [render_ids(tokenizer, c, add_generation_prompt=True) for c in convs]
    rendered = [(i, served.decode(tokenizer, i)) for i in ids]
    journal = tmp_path / "answers.jsonl"
    kw = {"max_tokens": 3, "temperature": 0, "seed": 0, "journal": journal, "top_k": 5}
    first = t.generate(convs[:2], rendered=rendered[:2], **kw)
    rows = list(served.read_journal(journal, None).values())
    # Two requests at once: the journal is in the order the answers arrived.
    assert sorted(r["prompt_ids"] for r in rows) == sorted(ids[:2])
    assert all(1 <= len(r["tokens"]) == len(r["tops"]) <= 3 for r in rows)
    assert all(len(top) >= 5 for r in rows for top in r["tops"])
    asked = proxy.requests["/v1/completions"]
    again = t.generate(convs, rendered=rendered, **kw)
    assert again[:2] == first and proxy.requests["/v1/completions"] - asked == 2
    assert "/v1/chat/completions" not in proxy.requests


def _chat_rows(tmp_path):
    return [json.loads(line) for line in write_chat_jsonl(tmp_path / "c.jsonl", 3).open()]


def _text_rows(tmp_path):
    # Plain text: whether it starts with BOS is the tokenizer's choice, not the template's.
    return [{"text": "the quick brown fox jumps over the lazy dog " * (i + 1)} for i in range(3)]


def test_text_without_bos_is_refused_when_the_pairing_is_unknown(server, tokenizer):
    """The tiny tokenizer adds no BOS to plain text, and llama-cpp-python's server echoes such a
    text one position on: without the probe's finding (`bosless_pairs`) the scores could be one
    position off, so the sequences are refused in one line."""
    examples = tokenize_rows(_text_rows(None), tokenizer, max_len=64)
    assert examples[0].input_ids[0] != tokenizer.bos_token_id
    positions = [logit_cache.trained_positions(ex.labels) for ex in examples]
    with pytest.raises(EdgekdError, match="do not start with the tokenizer's BOS token"):
        served.score(
            teacher(server), tokenizer, [ex.input_ids for ex in examples], positions, top_k=8
        )


def _text_rows_with_bos(tmp_path, tokenizer):
    return [{"text": tokenizer.bos_token + r["text"]} for r in _text_rows(tmp_path)]


@pytest.mark.parametrize(
    "rows_of",
    [
        lambda tmp, tok: _chat_rows(tmp),
        _text_rows_with_bos,
        lambda tmp, tok: _text_rows(tmp),
    ],
    ids=["chat", "text with bos", "text without bos"],
)
def test_scores_match_the_in_process_teacher(server, tiny_llama_gguf, tokenizer, tmp_path, rows_of):
    """The server's top-k log-probs land at the same logit indices, with the same values, as the
    teacher's own forward pass in torch (the GGUF is F16 of the same weights), for chat rows and
    for plain text rows with and without a leading BOS (the last read one position on, as the
    probe found the server echoes them)."""
    _check_scores(server, tiny_llama_gguf[0], tokenizer, rows_of(tmp_path, tokenizer))


def _check_scores(url: str, model_dir, tokenizer, rows: list[dict]) -> None:
    examples = tokenize_rows(rows, tokenizer, max_len=64)
    positions = [logit_cache.trained_positions(ex.labels) for ex in examples]
    t = teacher(url)
    found = served.probe(t, tokenizer, 8)
    assert found.bosless_pairs is False  # llama-cpp-python: one position on
    scored = served.score(
        t,
        tokenizer,
        [ex.input_ids for ex in examples],
        positions,
        top_k=8,
        bosless_pairs=found.bosless_pairs,
    )
    # llama.cpp's echo gives nothing for the first token: a text row's first scored position.
    assert scored.missing == sum(0 in p for p in positions)
    assert scored.mapped > 0
    model = load_model(resolve_source(str(model_dir), role="teacher"))
    checked = 0
    for ex, pos, rows_ in zip(examples, positions, scored.entries, strict=True):
        with torch.no_grad():
            logp = model(torch.tensor([ex.input_ids])).logits[0].float().log_softmax(-1)
        for t, pairs in zip(pos, rows_, strict=True):
            for token, lp in pairs or []:
                assert abs(logp[t, token].item() - lp) < 0.02, (t, token)
                checked += 1
    assert checked >= 8 * (sum(len(p) for p in positions) - scored.missing) * 0.9


@pytest.mark.slow
def test_a_tokenizer_without_bos_is_scored_right(no_bos_gguf, tmp_path):
    """A Qwen2-style model whose tokenizer has no BOS token: llama-cpp-python's server echoes
    every text of it one position on; the probe finds that and the scores land where the
    model's own forward pass in torch puts them, for chat and text rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(no_bos_gguf[0])
    assert tok.bos_token_id is None
    rows = _chat_rows(tmp_path) + _text_rows(tmp_path)
    with llama_server(no_bos_gguf[1], alias="tiny") as url:
        _check_scores(url, no_bos_gguf[0], tok, rows)


def test_bosless_text_is_refused_at_preflight_where_the_pairing_is_unknown(tokenizer, tmp_path):
    """Where the probe could not find how a server echoes a text without a leading BOS, text
    rows the tokenizer adds no BOS to, and any row of a tokenizer with none, are refused in one
    line before any work; rows that start with BOS pass."""
    import copy

    unknown = served.Probe(True, True, "x", answer_logprobs=8, bosless_pairs=None)
    text = [ex.input_ids for ex in tokenize_rows(_text_rows(tmp_path), tokenizer, max_len=64)]
    with pytest.raises(EdgekdError, match="3 of the 3 sequences checked .*do not start with the "
                       "tokenizer's BOS token.*one position off; use chat rows"):  # fmt: skip
        served.check_bos(unknown, tokenizer, text, "http://h/v1")
    chat = [ex.input_ids for ex in tokenize_rows(_chat_rows(tmp_path), tokenizer, max_len=64)]
    served.check_bos(unknown, tokenizer, chat, "http://h/v1")
    none = copy.deepcopy(tokenizer)
    none.bos_token = None
    with pytest.raises(EdgekdError, match="the student's tokenizer has no BOS token"):
        served.check_bos(unknown, none, chat, "http://h/v1")
    # A server whose pairing the probe found is not refused.
    found = served.Probe(True, True, "x", answer_logprobs=8, bosless_pairs=False)
    served.check_bos(found, none, text, "http://h/v1")


def test_preflight_probes_bosless_text_rows(server, tiny_teacher_dir, tmp_path):
    """check_served runs the BOS check on the user's rows at preflight: llama-cpp-python's
    server is found to echo them one position on, so they are scored, not refused."""
    from edgekd.config import load_profile, load_recipe
    from edgekd.plan import make_plan
    from edgekd.preflight import check_served, sample_sequences

    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in _text_rows(tmp_path)))
    sets = ["teacher.model=tiny", f"student.source={tiny_teacher_dir}", f"data.source={corpus}"]
    recipe = load_recipe(None, sets, teacher=server)
    plan = make_plan(load_profile("phone-1gb"), recipe, ["distill"], timing=False)
    from edgekd.models import load_tokenizer

    tok = load_tokenizer(resolve_source(str(tiny_teacher_dir), role="student"))
    assert sample_sequences(recipe, tok)[0][0] != tok.bos_token_id
    assert check_served(recipe, plan, tok) == []


def test_server_refusing_top_k_logprobs_is_one_line(proxy, tokenizer):
    """A server that refuses more log-probs than its cap (vLLM's --max-logprobs) but gives one:
    neither pass could ask for top_k, so the probe says to lower it."""
    proxy.fault = "max:4"
    with pytest.raises(EdgekdError, match=r"logit_cache.top_k=8: the teacher server at .* "
                       r"refuses that many log-probs .*lower logit_cache.top_k"):  # fmt: skip
        served.probe(teacher(proxy.url), tokenizer, 8)
    assert served.probe(teacher(proxy.url), tokenizer, 4).answer_logprobs >= 4


def test_server_without_generation_logprobs_refuses_bosless_text_at_preflight(
    proxy, tiny_teacher_dir, tmp_path
):
    """A server that gives log-probs for prompts (echo) but none with a generation: the answers
    need a second pass (one line), and the probe cannot find how it pairs a text without a
    leading BOS, so text rows the tokenizer adds no BOS to are refused at preflight."""
    from edgekd.config import load_profile, load_recipe
    from edgekd.models import load_tokenizer
    from edgekd.plan import make_plan
    from edgekd.preflight import check_served

    proxy.fault = "nogen"
    tok = load_tokenizer(resolve_source(str(tiny_teacher_dir), role="student"))
    found = served.probe(teacher(proxy.url), tok, 8)
    assert found.prompt_logprobs and found.answer_logprobs == 0 and found.bosless_pairs is None
    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in _text_rows(tmp_path)))
    sets = ["teacher.model=tiny", f"student.source={tiny_teacher_dir}"]
    profile = load_profile("phone-1gb")
    recipe = load_recipe(None, [*sets, f"data.source={corpus}"], teacher=proxy.url)
    plan = make_plan(profile, recipe, ["distill"], timing=False)
    with pytest.raises(EdgekdError, match="do not start with the tokenizer's BOS token"):
        check_served(recipe, plan, tok)
    # Chat rows start with the BOS the template writes; their answers need a second pass.
    recipe = load_recipe(None, sets, teacher=proxy.url)
    [line] = check_served(recipe, plan, tok)
    assert "returns 0 alternatives with a token it generates" in line


def _answers(t: served.Served, tokenizer, prompts: list[str], journal, one_pass: bool):
    from edgekd.data import render_ids
    from edgekd.teacher_data import answered_row

    convs = [[{"role": "user", "content": p}] for p in prompts]
    rendered = None
    if one_pass:
        ids = [render_ids(tokenizer, c, add_generation_prompt=True) for c in convs]
        rendered = [(i, served.decode(tokenizer, i)) for i in ids]
    got = t.generate(
        convs, max_tokens=6, temperature=1.0, seed=3, journal=journal, rendered=rendered, top_k=8
    )
    return [answered_row({"prompt": p}, a) for p, a in zip(prompts, got, strict=True)]


def test_one_pass_cache_agrees_with_the_second_pass(proxy, tokenizer, tmp_path):
    """Answers written with their log-probs (completions with logprobs=k on the student's own
    rendering of the prompt) give the cache the second pass gives for the same answers: the same
    top-k ids, log-probs within llama.cpp's batch-size noise. Examples whose tokens differ from the
    generated ones (a stripped answer, a merge at the seam) are counted and scored in the second
    pass; the turn's end token, which no generation returns, trains on its label."""
    t = teacher(proxy.url, concurrency=2)
    journal = tmp_path / "answers.jsonl"
    prompts = [f"Tell me about {w}." for w in ["cats", "the sea", "rain", "Rome", "maths", "tea"]]
    rows = _answers(t, tokenizer, prompts, journal, one_pass=True)
    answers = [r for r in served.read_journal(journal, None).values() if r.get("tops")]
    assert len(answers) == len(prompts)
    examples = tokenize_rows(rows, tokenizer, max_len=96)
    seqs = [ex.input_ids for ex in examples]
    positions = [logit_cache.trained_positions(ex.labels) for ex in examples]
    before = proxy.requests.get("/v1/completions", 0)
    one = served.score(t, tokenizer, seqs, positions, top_k=8, answers=answers)
    asked = proxy.requests["/v1/completions"] - before
    two = served.score(t, tokenizer, seqs, positions, top_k=8)
    assert one.one_pass >= 2 and one.one_pass + one.fallback == len(seqs)
    assert asked == one.fallback  # only the examples the generation does not cover were asked
    assert one.ends == one.one_pass  # one turn end per one-pass example
    compared = 0
    for rows_one, rows_two in zip(one.entries, two.entries, strict=True):
        for a, b in zip(rows_one, rows_two, strict=True):
            if a is None:
                continue
            da, db = dict(a), dict(b)
            assert all(abs(da[i] - db[i]) < 0.02 for i in set(da) & set(db))
            # The same top k, but for ids within the noise of the k-th (a random model's
            # distribution is nearly flat, full of near-ties at the boundary).
            for mine, other in ((da, db), (db, da)):
                assert all(i in other for i, v in mine.items() if v > min(other.values()) + 0.02)
            compared += 1
    assert compared >= 2 * 3


@pytest.mark.slow
def test_scoring_killed_midway_asks_only_for_the_rest(proxy, tokenizer, tmp_path):
    """Each example's scores are journaled as they arrive: a run stopped after two examples
    keeps them, and the rerun asks the server for the others alone, with the same result."""
    rows = [json.loads(line) for line in write_chat_jsonl(tmp_path / "c.jsonl", 5).open()]
    examples = tokenize_rows(rows, tokenizer, max_len=64)
    seqs = [ex.input_ids for ex in examples]
    positions = [logit_cache.trained_positions(ex.labels) for ex in examples]
    journal = tmp_path / "scores.jsonl"
    one_at_a_time = teacher(proxy.url, concurrency=1)

    def killed(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        served.score(
            one_at_a_time, tokenizer, seqs, positions, top_k=4, on_done=killed, journal=journal
        )
    # The one worker may have taken the next example before the stop reached it.
    kept = len(journal.read_text().splitlines())
    assert 2 <= kept < len(seqs)
    asked = proxy.requests.get("/v1/completions", 0)
    resumed = served.score(one_at_a_time, tokenizer, seqs, positions, top_k=4, journal=journal)
    assert proxy.requests["/v1/completions"] - asked == len(seqs) - kept
    whole = served.score(one_at_a_time, tokenizer, seqs, positions, top_k=4)
    assert resumed.entries == whole.entries


def test_from_entries_rebuilds_the_given_distribution():
    entries = [[[(3, -0.5), (7, -1.5)], None]]
    tensors = logit_cache.from_entries(entries, [[3, 5]], [[0, 1]], top_k=4, vocab=10)
    dense = logit_cache.dense_reference(tensors)[0]
    assert torch.allclose(dense.exp().sum(-1), torch.ones(2), atol=1e-3)
    assert dense[0, 3].item() == pytest.approx(-0.5, abs=1e-3)
    assert dense[0, 7].item() == pytest.approx(-1.5, abs=1e-3)
    assert dense[1].argmax().item() == 5 and dense[1, 5].exp().item() > 0.999


@pytest.mark.parametrize(
    ("fault", "times", "match"),
    [
        ("429", 2, None),  # Retry-After honoured, then answered
        ("drop", 1, None),  # a dropped connection is retried
        ("500", 99, "answered a chat completion with HTTP 500"),
        ("malformed", 99, "malformed JSON"),
        ("401", 99, "HTTP 401"),
    ],
)
def test_faults_are_retried_or_one_line(proxy, tmp_path, fault, times, match):
    proxy.fault, proxy.times = fault, times
    t = teacher(proxy.url, max_retries=2)
    conv = [[{"role": "user", "content": "Hi"}]]
    if match is None:
        t.generate(conv, max_tokens=2, temperature=0, seed=0, journal=tmp_path / "j.jsonl")
        assert proxy.times == 0
    else:
        with pytest.raises(EdgekdError, match=match):
            t.generate(conv, max_tokens=2, temperature=0, seed=0, journal=tmp_path / "j.jsonl")


def test_slow_server_times_out_in_one_line(proxy, tmp_path):
    proxy.fault, proxy.stall_s = "stall", 5
    t = teacher(proxy.url, max_retries=0, timeout_s=1)
    with pytest.raises(
        EdgekdError, match="did not answer a chat completion within teacher.timeout_s=1 s"
    ):
        t.chat([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0, seed=0)


def test_server_down_is_one_line(tmp_path):
    from edgekd.testing import free_port

    t = teacher(f"http://127.0.0.1:{free_port()}/v1", max_retries=0)
    with pytest.raises(EdgekdError, match="cannot be reached for the model list.*start the server"):
        t.check_model()


def test_key_never_in_an_error(proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_TEST_KEY", "sk-secret-123")
    proxy.fault = "401"
    t = served.Served.open(
        proxy.url.replace("http://", "http://user:pw@"),
        TeacherSettings(source=proxy.url, model="tiny", api_key_env="EDGEKD_TEST_KEY"),
    )
    with pytest.raises(EdgekdError) as err:
        t.chat([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0, seed=0)
    assert "sk-secret-123" not in str(err.value) and "pw" not in str(err.value)


@pytest.mark.slow
def test_build_and_teacher_cache_with_a_served_teacher(server, tiny_llama_gguf, tmp_path):
    """`edgekd build --teacher URL` end to end (answers, cache and reference from the server);
    then `edgekd teacher-cache` writes a cache another build uses, and refuses what differs."""
    import subprocess
    import sys

    from edgekd.testing import Build, set_args

    student = str(tiny_llama_gguf[0])
    common = [
        "teacher.model=tiny",
        f"student.source={student}",
        "data.num_prompts=16",
        "data.generation.max_tokens=8",
        "data.max_seq_len=64",
        "distill.max_steps=2",
        "distill.batch_size=2",
        "logit_cache.top_k=8",
        "eval.sample_max_tokens=4",
    ]
    run = tmp_path / "run"
    bench = ["qlora.enabled=false", "qat_kd.enabled=false", "export_onnx.genai=false",
             "bench.runs=1", "bench.warmup_runs=0", "bench.questions=2", "bench.prompt_tokens=16",
             "bench.decode_tokens=4", "bench.answer_max_tokens=4", "bench.bandwidth_mib=16",
             "bench.threads=1"]  # fmt: skip
    stages = ["--stages", "distill,export_gguf,export_onnx,bench"]
    out = Build(run, ["--teacher", server, *stages, *set_args([*common, *bench])]).finish()
    assert "positions have the server's log-probs" in out
    assert json.loads((run / "build.json").read_text())["teacher"] == server
    report = json.loads((run / "01-distill" / "report.json").read_text())
    assert report["teacher"] == f"served teacher at {server} model tiny"
    assert "student after" in report["quality"]
    measured = json.loads((run / "06-bench" / "report.json").read_text())
    # The teacher is not on this machine: the student and its exports are measured alone.
    assert "teacher" not in [r["role"] for r in measured["artifacts"]]
    assert (
        "student" in [r["role"] for r in measured["artifacts"]] and len(measured["artifacts"]) > 1
    )

    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "edgekd.cli", "teacher-cache", "--teacher", server]
    made = subprocess.run(
        [*cmd, "--out", str(cache), *set_args(common)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stdout + made.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["teacher"] == f"served teacher at {server} model tiny"
    assert manifest["top_k"] == 8 and manifest["shards"]

    used = [*common, f"logit_cache.path={cache}"]
    data = ["--data", str(cache / "corpus.jsonl")]
    args = ["--teacher", server, "--stages", "distill", *data]
    Build(tmp_path / "run2", [*args, *set_args(used)]).finish()

    other = Build(
        tmp_path / "run3", [*args, *set_args([*used, "data.heldout_fraction=0.3"])]
    ).fail()
    assert "was made for another training corpus" in other

    shard = cache / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    cut = Build(tmp_path / "run4", [*args, *set_args(used)]).fail()
    assert "truncated or replaced" in cut
    verified = subprocess.run(
        [sys.executable, "-m", "edgekd.cli", "verify", str(cache)], capture_output=True, text=True
    )
    assert verified.returncode == 1 and "truncated or replaced" in verified.stdout


@pytest.mark.slow
def test_build_killed_during_answers_asks_only_for_the_rest(proxy, tiny_llama_gguf, tmp_path):
    from edgekd.testing import Build, set_args

    run = tmp_path / "run"
    sets = [
        "teacher.model=tiny",
        f"student.source={tiny_llama_gguf[0]}",
        "teacher.concurrency=1",
        "teacher.one_pass=false",  # answers through chat completions, counted by the proxy
        "data.num_prompts=24",
        "data.generation.max_tokens=48",
        "data.max_seq_len=64",
        "distill.max_steps=1",
        "distill.batch_size=2",
        "logit_cache.top_k=4",
    ]
    args = ["--teacher", proxy.url, "--stages", "distill", *set_args(sets)]

    def answers() -> list[str]:
        return [line for p in (run / "cache").glob("answers-*.jsonl") for line in p.open()]

    Build(run, args).kill_when(lambda: len(answers()) >= 3, timeout=300)
    kept = len(answers())
    asked = proxy.requests["/v1/chat/completions"]
    assert 3 <= kept < 24
    Build(run, args).finish()
    assert len(answers()) == 24
    # Only the answers missing at the kill were asked again (one may have been in flight).
    assert proxy.requests["/v1/chat/completions"] - asked <= 24 - kept + 1


def test_plan_and_preflight_refuse_what_a_served_teacher_cannot_do(tiny_teacher_dir):
    from edgekd.config import load_profile, load_recipe
    from edgekd.plan import make_plan
    from edgekd.preflight import check_served

    url = "http://127.0.0.1:9/v1"  # nothing is asked of it: each refusal comes first
    profile = load_profile("phone-1gb")
    with pytest.raises(EdgekdError, match="its layers are not here to prune.*student.source"):
        make_plan(profile, load_recipe(None, [], teacher=url), ["distill"], timing=False)
    for extra, match in [
        ("distill.on_policy.fraction=0.5", "distill.on_policy.fraction needs the teacher"),
        ("distill.feature.weight=1", "distill.feature.weight needs the teacher in this process"),
        ("data.generation.strategy=beam", "have no beam search"),
    ]:
        recipe = load_recipe(None, [f"student.source={tiny_teacher_dir}", extra], teacher=url)
        plan = make_plan(profile, recipe, ["distill"], timing=False)
        assert plan.teacher_config is None and plan.teacher.kind == "served"
        with pytest.raises(EdgekdError, match=match):
            check_served(recipe, plan, None)


def test_reports_never_hold_credentials():
    from edgekd.models import public_url, resolve_source

    url = "https://user:pw@api.example.com:8443/v1?key=sk-1#x"
    assert public_url(url) == "https://api.example.com:8443/v1"
    assert "pw" not in resolve_source(url, role="teacher").describe()
    with pytest.raises(EdgekdError, match="only the teacher may be served"):
        resolve_source(url, role="student")


@pytest.mark.slow
def test_cache_made_elsewhere_trains_with_the_server_stopped(tiny_llama_gguf, tmp_path):
    """The cache folder holds the answered corpus, the training log-probs and the held-out
    reference: a build given it trains and measures held-out kld with the server gone."""
    import subprocess
    import sys

    from edgekd.testing import Build, set_args

    common = [
        "teacher.model=tiny",
        f"student.source={tiny_llama_gguf[0]}",
        "data.num_prompts=12",
        "data.generation.max_tokens=8",
        "data.max_seq_len=64",
        "distill.max_steps=2",
        "distill.batch_size=2",
        "logit_cache.top_k=8",
        "eval.sample_max_tokens=4",
    ]
    cache = tmp_path / "cache"
    with llama_server(tiny_llama_gguf[1], alias="tiny") as url:
        cmd = [sys.executable, "-m", "edgekd.cli", "teacher-cache", "--teacher", url]
        made = subprocess.run(
            [*cmd, "--out", str(cache), *set_args(common)], capture_output=True, text=True
        )
        assert made.returncode == 0, made.stdout + made.stderr
    reference = json.loads((cache / "reference" / "manifest.json").read_text())
    assert reference["examples"] > 0 and all(s["sha256"] for s in reference["shards"])
    run = tmp_path / "run"
    args = ["--teacher", url, "--stages", "distill", "--data", str(cache / "corpus.jsonl")]
    out = Build(run, [*args, *set_args([*common, f"logit_cache.path={cache}"])]).finish()
    assert "is not asked" in out
    report = json.loads((run / "01-distill" / "report.json").read_text())
    assert report["reference"].startswith(f"logit cache {cache / 'reference'}")
    assert report["quality"]["student after"]["kld"] > 0
    shard = cache / "reference" / reference["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    verified = subprocess.run(
        [sys.executable, "-m", "edgekd.cli", "verify", str(cache)], capture_output=True, text=True
    )
    assert verified.returncode == 1 and "reference/shard-00000" in verified.stdout
