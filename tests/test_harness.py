"""The harness backend over edgekd's runtimes, against lm-evaluation-harness's own Hugging Face
backend (`hf`) on the same tiny model and a shipped task, and the checks before any task runs."""

import time

import numpy as np
import pytest

from edgekd import harness, tasks
from edgekd.errors import EdgekdError
from edgekd.formats.registry import open_runtime

LIMIT = 8


def _samples(lm, task: str, limit: int = LIMIT, chat: bool = False) -> tuple[dict, list[dict]]:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        limit=limit,
        task_manager=harness.task_manager([task]),
        log_samples=True,
        apply_chat_template=chat,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    return out["results"][task], out["samples"][task]


def _loglikelihoods(samples: list[dict]) -> np.ndarray:
    """Every request's log-likelihood (one per choice per question), in the harness's order."""
    return np.array([float(r[0][0]) for s in samples for r in s["resps"]])


@pytest.fixture(scope="module")
def hf_choice(tiny_llama_gguf):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tiny_llama_gguf[0]), device="cpu", batch_size=4)
    return _samples(lm, "edgekd_choice"), _samples(lm, "edgekd_answer", 3), lm


@pytest.mark.slow
def test_torch_backend_gives_the_hf_backends_loglikelihoods(tiny_llama_gguf, hf_choice):
    (hf_result, hf_samples), (hf_gen, hf_gen_samples), _ = hf_choice
    lm = harness.RuntimeLM(open_runtime(tiny_llama_gguf[0], threads=1))
    result, samples = _samples(lm, "edgekd_choice")
    assert [s["arguments"] for s in samples] == [s["arguments"] for s in hf_samples]
    ours, theirs = _loglikelihoods(samples), _loglikelihoods(hf_samples)
    assert len(ours) == 4 * LIMIT
    assert np.abs(ours - theirs).max() < 1e-4
    assert result["acc,none"] == hf_result["acc,none"]
    assert result["acc_norm,none"] == hf_result["acc_norm,none"]
    # generation: the same greedy answers up to the same stop strings
    gen, gen_samples = _samples(lm, "edgekd_answer", 3)
    assert [s["resps"] for s in gen_samples] == [s["resps"] for s in hf_gen_samples]
    assert gen["exact_match,none"] == hf_gen["exact_match,none"]


@pytest.mark.slow
def test_gguf_f16_in_llama_cpp_agrees_with_torch(tiny_llama_gguf, hf_choice):
    (_, hf_samples), _, _ = hf_choice
    lm = harness.RuntimeLM(open_runtime(tiny_llama_gguf[1], threads=1))
    _, samples = _samples(lm, "edgekd_choice")
    ours = _loglikelihoods(samples)
    assert np.abs(ours - _loglikelihoods(hf_samples)).max() < 1e-2


@pytest.mark.slow
def test_chat_template_prompts_match_the_hf_backend(tiny_llama_gguf, hf_choice):
    """With the chat template on, the few-shot examples become turns rendered by the model's
    own template, in torch as in the hf backend, and in llama.cpp from the GGUF's template."""
    hf = hf_choice[2]
    _, theirs = _samples(hf, "edgekd_choice", 3, chat=True)
    for path in tiny_llama_gguf:
        lm = harness.RuntimeLM(open_runtime(path, threads=1))
        _, ours = _samples(lm, "edgekd_choice", 3, chat=True)
        assert [s["arguments"] for s in ours] == [s["arguments"] for s in theirs]
        assert "<|im_start|>user" in ours[0]["arguments"][0][0]
        gap = np.abs(_loglikelihoods(ours) - _loglikelihoods(theirs)).max()
        assert gap < (1e-4 if path.is_dir() else 1e-2)


@pytest.mark.slow
def test_rolling_loglikelihoods_match_the_hf_backend_across_windows(tiny_llama_gguf):
    """A text longer than max_length, cut into the hf backend's disjoint windows."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    text = "The quick brown fox jumps over the lazy dog. " * 6
    requests = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in (text, "Hello there.")]
    hf = HFLM(pretrained=str(tiny_llama_gguf[0]), device="cpu", batch_size=2, max_length=16)
    theirs = hf.loglikelihood_rolling(requests, disable_tqdm=True)
    for path, tolerance in zip(tiny_llama_gguf, (1e-4, 1e-2), strict=True):
        lm = harness.RuntimeLM(open_runtime(path, threads=1), max_length=16)
        ours = lm.loglikelihood_rolling(requests)
        # a sum over its ~60 tokens: the per-token bound times 100
        assert np.abs(np.array(ours) - np.array(theirs)).max() < tolerance * 100


@pytest.mark.slow
def test_run_tasks_reports_the_first_metric_its_stderr_and_time(tiny_llama_gguf):
    runtime = open_runtime(tiny_llama_gguf[1], threads=1)
    [score] = harness.run_tasks(runtime, ["edgekd_choice"], limit=4, fewshot=0)
    assert (score.task, score.metric, score.n) == ("edgekd_choice", "acc", 4)
    assert 0 <= score.score <= 1 and score.stderr is not None and score.seconds > 0


def test_share_of_teacher():
    assert harness.share_of_teacher(0.3, 0.4) == pytest.approx(0.75)
    assert harness.share_of_teacher(0.3, 0.0) is None
    rows = [
        {"role": "teacher", "tasks": {"t": {"score": 0.5}}},
        {"role": "export", "tasks": {"t": {"score": 0.25}, "u": {"score": 0.1}}},
    ]
    harness.add_shares(rows)
    assert rows[0]["tasks"]["t"]["share"] == 1.0
    assert rows[1]["tasks"]["t"]["share"] == 0.5 and rows[1]["tasks"]["u"]["share"] is None


def test_bad_task_settings_fail_before_any_model_runs():
    with pytest.raises(EdgekdError, match="scores none"):
        harness.check_tasks(["edgekd_choice"], limit=0, fewshot=None)
    with pytest.raises(EdgekdError, match="negative"):
        harness.check_tasks(["edgekd_choice"], limit=None, fewshot=-1)
    with pytest.raises(EdgekdError, match="no task given"):
        harness.check_tasks([], limit=None, fewshot=None)


@pytest.mark.slow
def test_unknown_task_lists_close_matches_and_the_shipped_ones():
    with pytest.raises(EdgekdError) as err:
        harness.check_tasks(["edgekd_choise"], limit=None, fewshot=None)
    message = str(err.value)
    assert "unknown task 'edgekd_choise': did you mean edgekd_choice" in message
    assert all(name in message for name in tasks.SHIPPED)


@pytest.mark.slow
def test_standard_task_without_its_dataset_is_one_line_not_a_wait():
    """arc_easy's dataset is not on this machine (and no test reaches the network)."""
    start = time.monotonic()
    with pytest.raises(EdgekdError) as err:
        harness.check_tasks(["arc_easy"], limit=None, fewshot=None)
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert "task arc_easy: its dataset allenai/ai2_arc is not on this machine" in message
    assert "load_dataset('allenai/ai2_arc', 'ARC-Easy')" in message and "\n" not in message
