"""Training batches sampled during training: on-policy KD (GKD) and self-distillation.

On-policy KD (GKD, Agarwal et al. 2024): a share `on_policy.fraction` of the batches keep their
prompts but take the student's own samples (at `on_policy.temperature`) as answers, and the student
learns the teacher's distribution on them with the configured divergence. It trains the student on
the prefixes it will actually produce, which fixed teacher answers never show it.

Self-distillation (`distill.self_distill.enabled`): the teacher is a frozen copy of the starting
student; every batch's answers are that copy's samples at a high temperature, and its logits divided
by a low temperature are the targets, so the student learns a sharper version of itself on varied
text.

Sampled answers are scored by the divergence alone (alpha = 1): cross-entropy on a model's own
samples would train it towards what it already does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from edgekd.config import DistillSettings, TrainSettings
from edgekd.data import IGNORE, TokenizedExample
from edgekd.formats.hf_torch import decoding_options, generate_token_ids


def self_distilling(settings: TrainSettings) -> bool:
    """Whether these settings ask for self-distillation (only the distill stage offers it)."""
    return isinstance(settings, DistillSettings) and settings.self_distill.enabled


def training_teacher(
    load_teacher: Callable[[], torch.nn.Module], student: torch.nn.Module, settings: TrainSettings
) -> torch.nn.Module:
    """The model that scores the student: a frozen copy of the starting student when
    self-distilling (call before any training step), else the loaded teacher."""
    if not self_distilling(settings):
        return load_teacher()
    frozen = copy.deepcopy(student).eval()
    frozen.requires_grad_(False)
    return frozen


def teacher_targets(logits: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """The teacher logits the KD loss sees: divided by the target temperature when
    self-distilling (the student then converges to the copy's distribution at that temperature,
    whatever the KD temperature), else unchanged."""
    if not self_distilling(settings):
        return logits
    return logits / settings.self_distill.target_temperature


def is_on_policy(fraction: float, seed: int, micro_step: int) -> bool:
    """Whether a micro-batch takes the student's samples: a pure function of (seed, micro_step),
    so a resumed run samples exactly where the interrupted one would have."""
    if fraction in (0, 1):
        return fraction == 1
    g = torch.Generator().manual_seed(seed * 1_000_003 + micro_step)
    return torch.rand((), generator=g).item() < fraction


def prompt_part(example: TokenizedExample) -> list[int]:
    """The tokens before the first target; an example scored from its first token (plain text)
    keeps its first half as the prompt."""
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE)
    return example.input_ids[: first or max(1, len(example.input_ids) // 2)]


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]  # the end token is a target, as in chat examples
    return tokens


@torch.no_grad()
def _finite_logits(model: torch.nn.Module, prompts: list[list[int]], device) -> bool:
    """Whether `model`'s logits on every prompt are finite (asked only after a failed sample)."""
    return all(
        bool(torch.isfinite(model(input_ids=torch.tensor([p], device=device)).logits).all())
        for p in prompts
    )


def sampled_examples(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    *,
    temperature: float,
    max_tokens: int,
    max_len: int,
    pad_id: int,
    seed: int,
) -> list[TokenizedExample]:
    """Each example's prompt followed by a sample of `model` at `temperature` (at most
    max_tokens, the whole example at most max_len tokens); only the sample is a target.
    Examples whose prompt leaves no room are returned unchanged. FloatingPointError if `model`'s
    logits are not finite."""
    prompts = [prompt_part(e) for e in examples]
    room = min(max_tokens, max_len - max(len(p) for p in prompts))
    if room <= 0:
        return examples
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            samples = generate_token_ids(
                model,
                prompts,
                max_tokens=room,
                pad_id=pad_id,
                decoding=decoding_options(temperature=temperature, num_beams=1),
                batch_size=len(prompts),
            )
        except RuntimeError:
            # torch cannot sample from NaN or infinite probabilities: a student whose last update
            # broke it. Said as such (the training loop stops the stage); anything else goes on up.
            if _finite_logits(model, prompts, device):
                raise
            raise FloatingPointError("the sampled model's logits are not finite") from None
    model.train(was_training)
    out = []
    for prompt, sample in zip(prompts, samples, strict=True):
        sample = _until_eos(sample, eos)
        out.append(TokenizedExample(prompt + sample, [IGNORE] * len(prompt) + sample))
    return out


def training_examples(
    examples: list[TokenizedExample],
    settings: TrainSettings,
    *,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    micro_step: int,
    max_len: int,
    pad_id: int,
) -> tuple[list[TokenizedExample], bool]:
    """The micro-batch to train on, and whether its answers were sampled: the student's samples
    on on-policy batches, the frozen copy's when self-distilling, else the examples as they are."""
    seed = settings.seed * 1_000_003 + micro_step
    if is_on_policy(settings.on_policy.fraction, settings.seed, micro_step):
        model, temperature = student, settings.on_policy.temperature
    elif self_distilling(settings):
        model, temperature = teacher, settings.self_distill.sample_temperature
    else:
        return examples, False
    sampled = sampled_examples(
        model,
        examples,
        temperature=temperature,
        max_tokens=settings.on_policy.max_tokens,
        max_len=max_len,
        pad_id=pad_id,
        seed=seed,
    )
    return sampled, sampled is not examples
