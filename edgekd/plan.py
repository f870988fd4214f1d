"""The build plan: teacher and student shapes, sizes against the profile's budget, token budgets and
time estimates, all from model configs alone (no weights), so it runs before any expensive work and
for `--dry-run` on configs of models too large for this machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from edgekd import architectures, models, train_memory
from edgekd import student as student_shape
from edgekd.config import Profile, Recipe
from edgekd.effective import Effective, resolve
from edgekd.errors import EdgekdError
from edgekd.stages import get as spec_of
from edgekd.stages import of_kind
from edgekd.stages.spec import SizeInputs
from edgekd.student import MB

GB = 1024 * MB


@dataclass
class Plan:
    stages: list[str]
    effective: Effective
    teacher: models.ModelSource
    teacher_config: object
    student_config: object
    student_source: models.ModelSource | None
    student_layers_note: str
    student_q_bytes: int
    kv_bytes: int
    budget_bytes: int
    candidates: list = field(default_factory=list)  # student.Candidate, when pruned
    tokens: dict[str, int] = field(default_factory=dict)
    estimates: dict[str, float] = field(default_factory=dict)  # seconds, labelled as estimates
    host_gflops: float = 0.0
    disk_bytes: dict[str, int] = field(default_factory=dict)  # per stage, an estimate
    memory: list[str] = field(default_factory=list)  # the training step's per-GPU estimate
    host_memory: dict[str, int] = field(default_factory=dict)  # per stage peak RSS, an estimate

    @property
    def fits(self) -> bool:
        return self.student_q_bytes + self.kv_bytes <= self.budget_bytes

    def lines(self, profile: Profile) -> list[str]:
        t, s = self.teacher_config, self.student_config
        need = (self.student_q_bytes + self.kv_bytes) / MB
        quant = self.effective.gguf_quant
        lines = [
            f"profile   {profile.name}: {profile.description}",
            f"stages    {' -> '.join(self.stages)}",
            f"teacher   {self.teacher.describe()}: {models.param_count(t) / 1e6:.1f}M params, "
            f"{t.num_hidden_layers} layers"
            if t is not None
            else f"teacher   {self.teacher.describe()}: its weights are not on this machine",
            f"student   {models.param_count(s) / 1e6:.1f}M params, {s.num_hidden_layers} layers, "
            f"hidden {s.hidden_size} "
            f"({self.student_layers_note})",
            f"size      {quant} ~{self.student_q_bytes / MB:.0f} MB (estimate) + KV "
            f"cache {self.kv_bytes / MB:.0f} MB at {profile.context_length} tokens = {need:.0f} MB "
            f"of {profile.memory_budget_mb} MB budget: {'fits' if self.fits else 'DOES NOT FIT'}",
        ]
        if len(self.candidates) > 1:
            lines.append("candidates (student.prune=auto: each healed, lowest held-out kld kept)")
        for c in self.candidates:
            lines.append(
                f"  {c.method:<11} {c.shape.describe()}: {c.params / 1e6:.1f}M params, {quant} "
                f"~{c.gguf_bytes / MB:.0f} MB + KV {c.kv_bytes / MB:.0f} MB (estimate)"
            )
            fallbacks = student_shape.row_fallbacks(c.config, quant)
            if fallbacks:
                lines.append(
                    "              rows not a multiple of the block, written as: "
                    + ", ".join(f"{k} {t}" for k, t in sorted(fallbacks.items()))
                )
        if self.disk_bytes:
            lines.append(
                f"disk      ~{sum(self.disk_bytes.values()) / GB:.1f} GB for the run folder "
                "(estimate: weights, checkpoints, exports, teacher log-probs)"
            )
        if self.host_memory:
            lines.append(
                "host RAM  peak resident memory per stage on this host (estimate): "
                + ", ".join(f"{s} {b / GB:.1f} GB" for s, b in self.host_memory.items())
            )
        lines += self.memory
        for stage, n in self.tokens.items():
            eta = self.estimates.get(stage)
            when = f", estimated {_duration(eta)} on this host" if eta is not None else ""
            lines.append(f"tokens    {stage}: up to {n:,} training tokens{when}")
        if self.host_gflops:
            lines.append(
                f"estimate  from this host's measured {self.host_gflops:.0f} GFLOP/s fp32 "
                "matmul and 6N+2N_teacher FLOPs per training token; a projection, not a measurement"
            )
        return lines


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds / 60:.1f} min"


def _host_gflops(seconds: float = 0.3) -> float:
    # Time a square fp32 matmul: the same kind of work a training step is made of.
    a = torch.randn(512, 512)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - start) / 1e9


def fit_error(plan: Plan, profile: Profile) -> EdgekdError:
    """What to say when the student does not fit the profile's budget."""
    s = plan.student_config
    fix = "lower student.num_layers" if plan.student_source is None else "pick a smaller student"
    return EdgekdError(
        f"the student ({s.num_hidden_layers} layers, {plan.student_layers_note}) needs about "
        f"{(plan.student_q_bytes + plan.kv_bytes) / MB:.0f} MB ({plan.effective.gguf_quant} "
        f"weights + KV cache at {profile.context_length} tokens) but {profile.name} allows "
        f"{profile.memory_budget_mb} MB; {fix} or pick a larger profile"
    )


def check_architecture(student_config, stage_names: list[str]) -> None:
    """EdgekdError in one line, naming the first stage whose needs the student's architecture
    lacks."""
    for name in stage_names:
        if (feature := spec_of(name).needs) is not None:
            architectures.check(student_config, feature)


def make_plan(
    profile: Profile,
    recipe: Recipe,
    stages: list[str],
    *,
    timing: bool = True,
    strict: bool = True,
) -> Plan:
    """Shapes and sizes from configs; raises EdgekdError if the student cannot fit the budget
    (unless not `strict`: a dry run shows the whole plan, then says so)."""
    effective = resolve(profile, recipe, stages)
    teacher = models.resolve_source(recipe.teacher.source, role="teacher")
    served = teacher.kind == "served"
    if served and recipe.student.source is None:
        raise EdgekdError(
            f"the teacher is a {teacher.describe()}: its layers are not here to prune a student "
            "from; set student.source to a model folder or hub id"
        )
    # A served teacher's config is not here; nothing below needs it but the estimates.
    teacher_config = None if served else models.load_config(teacher)
    student_source = None
    if recipe.student.source is not None:
        student_source = models.resolve_source(recipe.student.source, role="student")
        student_config = models.load_config(student_source)
        note = f"given: {student_source.describe()}"
    else:
        candidates = student_shape.candidates(teacher_config, recipe, profile, effective.gguf_quant)
        # The plan sizes the largest candidate: whichever auto keeps then fits too.
        chosen = max(candidates, key=lambda c: c.gguf_bytes + c.kv_bytes)
        student_config, note = chosen.config, chosen.note
        if len(candidates) > 1:
            note = f"student.prune=auto: sized as its largest candidate, {chosen.method}"
    check_architecture(student_config, stages)
    budget = profile.memory_budget_mb * MB
    plan = Plan(
        stages=stages,
        effective=effective,
        teacher=teacher,
        teacher_config=teacher_config,
        student_config=student_config,
        student_source=student_source,
        student_layers_note=note,
        student_q_bytes=models.gguf_bytes_estimate(student_config, effective.gguf_quant),
        kv_bytes=models.kv_cache_bytes(student_config, profile.context_length),
        budget_bytes=budget,
        candidates=[] if student_source is not None else candidates,
    )
    if strict and not plan.fits:
        raise fit_error(plan, profile)
    if "distill" in stages and not served:
        plan.memory = train_memory.estimate_lines(
            "distill",
            student_config,
            teacher_config,
            recipe.teacher,
            recipe.distill,
            recipe.data.max_seq_len,
        )
    # Bytes each stage leaves in the run folder at its peak, from the student's config alone.
    sizes = SizeInputs(
        student_config=student_config,
        params=models.param_count(student_config),
        gguf_bytes=plan.student_q_bytes,
        recipe=recipe,
        effective=effective,
        teacher_config=teacher_config,
    )
    plan.disk_bytes = {s: spec_of(s).disk_bytes(sizes) for s in stages}
    plan.host_memory = {s: spec_of(s).host_bytes(sizes) for s in stages}
    # A served teacher's passes run on its server, not here.
    teacher_flops = 0 if served else 2 * models.param_count(teacher_config)
    train_flops = 6 * models.param_count(student_config) + teacher_flops
    if timing:
        plan.host_gflops = _host_gflops()
    for stage in of_kind("train", stages):
        settings = getattr(recipe, stage)
        n = settings.max_steps * settings.batch_size * settings.grad_accum
        plan.tokens[stage] = n * recipe.data.max_seq_len
        if plan.host_gflops:
            plan.estimates[stage] = plan.tokens[stage] * train_flops / (plan.host_gflops * 1e9)
    return plan
