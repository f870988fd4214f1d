"""Checks that run before any expensive work, each failing with one clear line.

`make_plan` has already resolved the teacher and checked that the student fits the profile; this
adds what needs more than a config: weights present and whole, room on disk for the stages still
to run, each stage's own check (its spec's: an exportable architecture and tokenizer, the quant type
qat_kd imitates), usable data, a shared tokenizer, a chat template that renders.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from edgekd import data, device, logit_cache, models, pipeline, served, teacher_data
from edgekd.chat_template import TemplateRefused
from edgekd.config import Profile, Recipe
from edgekd.errors import EdgekdError, EdgekdWarning
from edgekd.feature_kd import layer_pairs
from edgekd.on_policy import self_distilling
from edgekd.plan import GB, Plan
from edgekd.stages import SPECS, of_kind
from edgekd.train import check_strategy


def check_data(recipe: Recipe) -> None:
    """The user's corpus is readable, non-empty and big enough for a held-out slice and a batch."""
    if recipe.data.source is None:
        return
    rows = data.load_corpus(recipe.data.source)
    if recipe.data.cot.enabled and not recipe.data.regenerate:
        raise EdgekdError(
            f"data.cot.enabled=true with data.source {recipe.data.source}: the teacher must "
            "write the answers; set data.regenerate=true too"
        )
    if recipe.data.regenerate:
        teacher_data.prompt_rows(rows, recipe.data.source)
    train, heldout = data.split_heldout(rows, recipe.data.heldout_fraction, recipe.data.max_heldout)
    if not heldout:
        raise EdgekdError(
            f"data {recipe.data.source}: {len(rows)} examples leave none for the held-out slice "
            f"at data.heldout_fraction={recipe.data.heldout_fraction}; add examples or raise it"
        )
    if len(train) < recipe.distill.batch_size:
        raise EdgekdError(
            f"data {recipe.data.source}: {len(train)} training examples cannot fill one batch of "
            f"distill.batch_size={recipe.distill.batch_size}; add examples or lower it"
        )


def check_layer_maps(recipe: Recipe, plan: Plan) -> None:
    """Every feature/attention layer map fits the student's and the teacher's layer counts."""
    if plan.teacher_config is None:
        return  # a served teacher: check_served refuses the layer-matching methods
    n_s = plan.student_config.num_hidden_layers
    n_t = plan.teacher_config.num_hidden_layers
    for stage in of_kind("train", plan.stages):
        settings = getattr(recipe, stage)
        for name, group, on in (
            ("feature", settings.feature, settings.feature.weight),
            ("attention", settings.attention, settings.attention.weight
             or settings.attention.value_weight),
        ):  # fmt: skip
            if not on:
                continue
            try:
                layer_pairs(n_s, n_t, group.layers, group.last_k)
            except ValueError as e:
                raise EdgekdError(
                    f"{stage}.{name}.layers: {e}; fix {stage}.{name}.layers or .last_k"
                ) from None


def check_cache_folder(recipe: Recipe, tokenizer) -> None:
    """A cache folder given by logit_cache.path is whole and made for this tokenizer and top_k
    (its corpus is compared when the build has tokenized it, before training)."""
    if recipe.logit_cache.path is None:
        return
    folder = Path(recipe.logit_cache.path)
    manifest = logit_cache.read_manifest(folder)
    for what, want, key in (
        ("tokenizer", logit_cache.tokenizer_hash(tokenizer), "tokenizer"),
        ("logit_cache.top_k", recipe.logit_cache.top_k, "top_k"),
    ):
        if manifest[key] != want:
            raise EdgekdError(
                f"logit cache {folder} was made for another {what} ({manifest[key]!s:.12} there, "
                f"{want!s:.12} here); make it again with `edgekd teacher-cache` for this build"
            )
    logit_cache.refuse_bad_shards(folder, manifest)
    reference = folder / logit_cache.REFERENCE_DIR
    if (reference / logit_cache.CACHE_MANIFEST).is_file():
        logit_cache.refuse_bad_shards(reference, logit_cache.read_manifest(reference))


def check_logit_cache(recipe: Recipe, plan: Plan) -> None:
    """The logit cache holds the teacher's view of the corpus: it cannot score other text."""
    for stage in of_kind("train", plan.stages):
        s = getattr(recipe, stage)
        if s.teacher_logits != "cache":
            continue
        if s.on_policy.fraction > 0 or self_distilling(s):
            raise EdgekdError(
                f"{stage}.teacher_logits=cache: the cache scores the corpus only, not the samples "
                f"that on-policy KD or self-distillation train on; set {stage}.teacher_logits=live"
            )


# What runs the teacher in this process (refused with a served teacher), by setting.
_IN_PROCESS = (
    ("on_policy.fraction", lambda s: s.on_policy.fraction > 0),
    ("self_distill.enabled", self_distilling),
    ("feature.weight", lambda s: s.feature.weight > 0),
    ("attention.weight", lambda s: s.attention.weight > 0 or s.attention.value_weight > 0),
    ("relation.weight", lambda s: s.relation.weight > 0),
)


def cache_needs_no_teacher(recipe: Recipe) -> bool:
    """Whether the build reads everything of the teacher from a cache folder (made elsewhere by
    `edgekd teacher-cache`): its corpus given, its cache and held-out reference in the folder."""
    path, d = recipe.logit_cache.path, recipe.data
    return (
        path is not None
        and d.source is not None
        and not d.regenerate
        and (Path(path) / logit_cache.REFERENCE_DIR / logit_cache.CACHE_MANIFEST).is_file()
    )


def check_served(recipe: Recipe, plan: Plan, tokenizer) -> list[str]:
    """A served teacher: what it cannot do here refused, the API key present, the model served,
    its tokenizer the student's where logit KD needs it; returns what the probe found (lines)."""
    where = plan.teacher.describe()
    for stage in of_kind("train", plan.stages):
        s = getattr(recipe, stage)
        for key, on in _IN_PROCESS:
            if on(s):
                raise EdgekdError(
                    f"{stage}.{key} needs the teacher in this process, but it is the {where}; "
                    f"turn it off, or use a local teacher (a .gguf file or model folder)"
                )
    if recipe.data.generation.strategy == "beam":
        raise EdgekdError(
            f"data.generation.strategy=beam: the {where} answers through chat completions, which "
            "have no beam search; use greedy or sample"
        )
    if cache_needs_no_teacher(recipe):
        return [
            f"teacher: the {where} is not asked: the corpus is given and the logit cache "
            f"{recipe.logit_cache.path} holds its log-probs and the held-out reference"
        ]
    teacher = served.Served.open(plan.teacher.ref, recipe.teacher)
    teacher.check_model()
    top_k = recipe.logit_cache.top_k
    found = served.probe(teacher, tokenizer, top_k)
    if not found.same_tokenizer:
        kd = [
            f"{stage}.kd.alpha"
            for stage in of_kind("train", plan.stages)
            if getattr(recipe, stage).kd.alpha > 0
        ]
        if kd:
            differs = (
                "gives no way to compare its tokenizer with the student's (no tokenize endpoint, "
                "no echo)"
                if found.how.startswith("nothing")
                else f"tokenizes differently from the student (compared through {found.how})"
            )
            raise EdgekdError(
                f"logit KD needs the student to share the teacher's tokenizer, and the {where} "
                f"{differs}; set "
                f"{'=0, '.join(kd)}=0 to train on the teacher's answers alone (sequence-level or "
                "CoT distillation), or use a student of the teacher's family"
            )
    if found.pairing_unknown:
        served.check_bos(found, tokenizer, sample_sequences(recipe, tokenizer), teacher.where)
    answers = recipe.data.source is None or recipe.data.regenerate
    return found.lines(teacher.where, answers, top_k=top_k, settings=recipe.teacher)


def sample_sequences(recipe: Recipe, tokenizer, n: int = 8) -> list[list[int]]:
    """Token sequences like those the build will score: the first rows of the user's corpus, or
    (the teacher answers the prompts) a conversation through the chat template."""
    s = recipe.data
    if s.source is not None and not s.regenerate:
        rows = data.load_corpus(s.source)[:n]
    else:
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
        rows = [{"messages": turns}]
    return [ex.input_ids for ex in data.tokenize_rows(rows, tokenizer, max_len=s.max_seq_len)]


def guidance(recipe: Recipe, plan: Plan) -> list[str]:
    """Warnings for training settings outside the ranges the literature found to work."""
    out = []
    if plan.teacher_config is None:  # a served teacher: its size is not known here
        ratio = None
    else:
        ratio = models.param_count(plan.student_config) / models.param_count(plan.teacher_config)
    for stage in of_kind("train", plan.stages):
        s = getattr(recipe, stage)
        if s.kd.alpha > 0 and not 1 <= s.kd.temperature <= 20:
            why = (
                "below 1 it sharpens the teacher toward its top token and hides the small "
                "probabilities that carry its 'dark knowledge'"
                if s.kd.temperature < 1
                else "above 20 the teacher's distribution is nearly uniform and carries no signal"
            )
            out.append(
                f"{stage}.kd.temperature={s.kd.temperature}: {why}; Hinton et al. 2015 (Distilling "
                "the Knowledge in a Neural Network) and LLM practice use 1-20, 2-5 to start"
            )
        if "alpha" not in s.kd.model_fields_set and not 0.5 <= s.kd.alpha <= 1:
            out.append(
                f"{stage}.kd.alpha={s.kd.alpha} (a default, not your choice) is outside 0.5-1, "
                "the usual weight of the soft targets against the hard labels (Hinton et al. 2015; "
                "DistilBERT, Sanh et al. 2019; LLM distillation often uses the soft targets "
                "alone); set it explicitly to silence this"
            )
        if s.feature.weight > 0 and ratio is not None and not 0.1 <= ratio <= 0.3:
            out.append(
                f"{stage}.feature.weight={s.feature.weight} with a student of {ratio:.2f}x the "
                "teacher's parameters: feature KD is reported to work best at 0.1x-0.3x (TinyBERT, "
                "Jiao et al. 2020, at 0.13x; a larger gap hurts, Mirzadeh et al. 2020); a "
                "student close to the teacher's size gains little from it over logit KD"
            )
    return out


def check_scale(recipe: Recipe, plan: Plan) -> None:
    """Mixed precision the host supports, one per build; a teacher quantization it can use."""
    precisions = {
        stage: getattr(recipe, stage).scale.mixed_precision
        for stage in plan.stages
        if hasattr(getattr(recipe, stage), "scale")
    }
    for stage, precision in precisions.items():
        if precision == "fp16" and not torch.cuda.is_available():
            raise EdgekdError(
                f"{stage}.scale.mixed_precision=fp16 needs a CUDA GPU and none is visible; "
                "set it to bf16 or no"
            )
    if len(set(precisions.values())) > 1:
        # accelerate fixes the precision once per process.
        given = ", ".join(f"{stage}.scale.mixed_precision={p}" for stage, p in precisions.items())
        raise EdgekdError(f"{given}: set the same value for every training stage of a build")
    load_in = recipe.teacher.load_in
    if load_in == "full":
        return
    if plan.teacher.kind == "gguf":
        raise EdgekdError(
            f"teacher.load_in={load_in} needs a Hugging Face model folder or hub id, but the "
            f"teacher is {plan.teacher.describe()}; set teacher.load_in=full"
        )
    if "distill" in plan.stages and plan.student_source is None:
        raise EdgekdError(
            f"teacher.load_in={load_in}: a student pruned from a quantized teacher would be "
            "quantized too; set student.source to a model, or teacher.load_in=full"
        )


def check_launch(recipe: Recipe, plan: Plan, environ: Mapping[str, str]) -> None:
    """The training stages can run under the `accelerate launch` setup in `environ`."""
    fsdp = environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    deepspeed = environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    for stage in of_kind("train", plan.stages):
        check_strategy(
            stage,
            getattr(recipe, stage),
            fsdp_version=int(environ.get("FSDP_VERSION", "1")) if fsdp else None,
            zero_stage=int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
            if deepspeed
            else None,
        )


def check_disk(run_dir: Path, need_bytes: int, stages: list[str]) -> None:
    """The file system that will hold `run_dir` has room for the estimated size of the run."""
    where = Path(run_dir).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        raise EdgekdError(
            f"disk: stages {', '.join(stages)} need about {need_bytes / GB:.1f} GB (estimate) in "
            f"{run_dir} but only {free / GB:.1f} GB is free on the file system of {where}; "
            "free some space or pass --out on a larger disk"
        )


def check_chat_template(tokenizer, recipe: Recipe) -> None:
    """A chat corpus (the shipped prompts, or the user's chat rows) renders in the template; any
    template the exports will run is not refused (it loops or builds without end, or reaches for
    Python internals)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    if recipe.data.source is not None and not any(
        "messages" in row for row in data.load_corpus(recipe.data.source)
    ):
        if getattr(tokenizer, "chat_template", None):
            # Text rows need no template, and one may reject this conversation: only a refusal
            # stops the build.
            try:
                data.render_chat(tokenizer, probe, add_generation_prompt=False)
            except TemplateRefused:
                raise
            except EdgekdError:
                pass
        return
    data.render_chat(tokenizer, probe, add_generation_prompt=False)


def check_trainable(tokenizer, recipe: Recipe) -> None:
    """Some training row of the user's corpus keeps a target token once tokenized and cut to
    data.max_seq_len (the teacher writes the answers of a regenerated corpus)."""
    s = recipe.data
    if s.source is None or s.regenerate:
        return
    train, _ = data.split_heldout(data.load_corpus(s.source), s.heldout_fraction, s.max_heldout)
    if not data.any_trainable(train, tokenizer, max_len=s.max_seq_len):
        raise EdgekdError(
            f"data {s.source}: none of its {len(train)} training rows has a token to train on "
            f"within data.max_seq_len={s.max_seq_len} (chat rows train on their assistant turns, "
            "text rows on their text); add assistant replies, raise data.max_seq_len, or set "
            "data.regenerate=true to have the teacher answer the prompts"
        )


def preflight(profile: Profile, recipe: Recipe, plan: Plan, run_dir: Path) -> None:
    """Every check that can fail before the build starts, in the order they cost; the
    guidance on settings is printed as warnings."""
    for message in guidance(recipe, plan):
        warnings.warn(message, EdgekdWarning, stacklevel=2)
    check_scale(recipe, plan)
    check_layer_maps(recipe, plan)
    check_logit_cache(recipe, plan)
    check_launch(recipe, plan, os.environ)
    is_served = plan.teacher.kind == "served"
    if not is_served:
        models.check_weights(plan.teacher, allow_pickle=recipe.teacher.allow_pickle, role="teacher")
        models.check_weights_match_config(plan.teacher, plan.teacher_config, role="teacher")
    pending = pipeline.pending_stages(profile, recipe, run_dir, plan.stages, plan.teacher)
    check_disk(run_dir, sum(plan.disk_bytes.get(s, 0) for s in pending), pending)
    if profile.device is not None and "bench" in pending:
        device.check_device(profile.device, profile.formats)  # reachable, with the runtimes
    if "bench" in pending and recipe.bench.tasks:
        from edgekd.harness import check_tasks

        b = recipe.bench
        check_tasks(b.tasks, limit=b.task_limit, fewshot=b.task_fewshot)
    if is_served:
        models.check_weights(
            plan.student_source, allow_pickle=recipe.student.allow_pickle, role="student"
        )
        tokenizer = models.load_tokenizer(plan.student_source)
        for message in check_served(recipe, plan, tokenizer):
            warnings.warn(message, EdgekdWarning, stacklevel=2)
    else:
        tokenizer = models.load_tokenizer(plan.teacher)
    if plan.student_source is not None and not is_served:
        models.check_weights(
            plan.student_source, allow_pickle=recipe.student.allow_pickle, role="student"
        )
        models.check_weights_match_config(plan.student_source, plan.student_config, role="student")
        models.check_same_tokenizer(
            tokenizer,
            models.load_tokenizer(plan.student_source),
            teacher_name=plan.teacher.describe(),
            student_name=plan.student_source.describe(),
        )
    for spec in SPECS:
        if spec.check is not None and spec.name in plan.stages:
            spec.check(plan, tokenizer)
    check_data(recipe)
    check_chat_template(tokenizer, recipe)
    check_trainable(tokenizer, recipe)
    check_cache_folder(recipe, tokenizer)
