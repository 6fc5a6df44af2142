"""Texture boost: add a texture model's delta on top of a merge, in full or only where it is new.

The seed tool's "add difference" finishing step: ``merged + β (T − C)``. The ``orthogonal`` mode adds only
the part of T − C orthogonal to what the merge already changed (``merged − base``), per key, so a texture
model that repeats the merge's own direction does not amplify it.
"""

# No `from __future__ import annotations`: sd-mecha reads the Parameter(...) annotations as objects.

import torch
from sd_mecha import Parameter, Return, merge_method
from torch import Tensor

from ortho_mecha.methods.deltas import OptionSpec, add_to_base, check_options, finite_deltas, mark_nonfinite
from ortho_mecha.methods.parallel import match_threads

BETA = OptionSpec("beta", 0.2, "strength of the texture delta: 0 leaves the merge unchanged", minimum=0.0, maximum=0.5)
TEXTURE_MODE = OptionSpec(
    "mode",
    "add",
    "add the whole texture delta, or only its part orthogonal to the merged delta",
    choices=("add", "orthogonal"),
)
TEXTURE_OPTIONS = (BETA, TEXTURE_MODE)


def orthogonal_part(vector: Tensor, direction: Tensor) -> Tensor:
    """``vector`` minus its projection on ``direction`` (both flattened); ``vector`` itself if direction is 0."""
    squared = torch.sum(direction * direction)
    if squared == 0:
        return vector
    return vector - (torch.sum(vector * direction) / squared) * direction


@merge_method
def texture_boost(
    merged: Parameter(Tensor, "weight"),
    base: Parameter(Tensor, "weight"),
    texture: Parameter(Tensor, "delta"),
    beta: Parameter(float) = BETA.default,
    mode: Parameter(str) = TEXTURE_MODE.default,
) -> Return(Tensor, "weight"):
    """merged + β · t, with t the texture delta T − C (build it with ``subtract(texture_model, base)``).

    mode ``"add"``: t as it is (the seed tool's add difference). mode ``"orthogonal"``: t minus its
    projection on the merged delta ``merged − base``, per key (all of t where the merge left the key
    unchanged). β ∈ [0, 0.5]: 0 returns ``merged`` unchanged. Float64 inside, the merge's dtype out.
    """
    match_threads()
    options = check_options("texture_boost", TEXTURE_OPTIONS, {"beta": beta, "mode": mode})
    if options["beta"] == 0:
        return merged
    t = texture.to(torch.float64)
    if options["mode"] == "add":
        return add_to_base(merged, t, options["beta"])
    # the projection sums over the key: a NaN or Inf element stays that element, not the whole key
    (t, direction), bad = finite_deltas([t, merged.to(torch.float64) - base.to(torch.float64)])
    return mark_nonfinite(add_to_base(merged, orthogonal_part(t, direction), options["beta"]), bad)
