"""The student's shape before any weight is loaded: how many teacher layers it keeps.

Read by the planner (to size and fit-check the student) and by distill (to prune the teacher), so
that both choose the same count for the same build.
"""

from __future__ import annotations

from edgekd import models
from edgekd.config import Profile, Recipe
from edgekd.errors import EdgekdError

MB = 1024 * 1024


def layer_count(teacher_config, recipe: Recipe, profile: Profile, quant: str) -> tuple[int, str]:
    """How many teacher layers the student keeps, and why; `quant` is the GGUF type the build
    exports, whose size decides what fits the profile's budget."""
    budget = profile.memory_budget_mb * MB
    fit = models.layers_that_fit(teacher_config, budget, profile.context_length, quant)
    s = recipe.student
    if s.num_layers is not None:
        if s.num_layers > teacher_config.num_hidden_layers:
            raise EdgekdError(
                f"student.num_layers={s.num_layers} exceeds the teacher's "
                f"{teacher_config.num_hidden_layers} layers; set a smaller value"
            )
        return s.num_layers, "student.num_layers"
    wanted = max(1, round(s.layer_fraction * teacher_config.num_hidden_layers))
    if fit < wanted:
        return max(fit, 0), f"largest count that fits {profile.name}'s budget"
    return wanted, f"student.layer_fraction={s.layer_fraction:.2f} of the teacher"
