"""Plan → sd-mecha recipe → ``.mecha`` text and a standalone Python script that re-runs the merge.

The recipe uses only sd-mecha's own nodes and the methods ortho-mecha registers, so any sd-mecha user
can write it by hand. Every file is a ``sd_mecha.model`` node bound to the config derived from the
base's header (:mod:`ortho_mecha.mecha_config`), wrapped in ``read_once`` (sd-mecha reads and casts a
model node again for each node that uses it: the base of four rows was read five times per key). Row i's
delta is ``scale_delta(fallback(subtract(model_i, base), subtract(base, base)), c_i)``, zero on a key the row's
file lacks; with a delta-from, ``scale_delta(subtract(fallback(model_i, base), fallback(delta_from_i, base)), c_i)``:
a key a file lacks is read as the base's value there, as the analysis reads it (its figures are exact for the
merge) — for a kohya LoRA row
``scale_delta(fallback(convert(lora_i, base config), subtract(base, base)), c_i)``, its product on the keys
it touches and zero elsewhere (:func:`ortho_mecha.lora_rows.lora_delta_node`); what the coefficient c_i
is and how often the row is listed depends on the method (``MethodSpec.repeat``):

================  ==================================================================================
method            recipe (α_i, r_i: the row's alpha and repeat; ``alpha``: the global option)
================  ==================================================================================
ortho_project     ``ortho_project(base, *δ, alpha)``, c_i = α_i·r_i
ortho_superpose   ``ortho_superpose(base, *δ, alpha, granularity, rcond, noise_scale[, noise_unit])``,
                  c_i = α_i·r_i, noise_scale = max_i |c_i| (per key with block alphas), noise_unit the rows'
                  files' unit roundoff where coarser than the base's (:func:`ortho_mecha.gram.noise_unit`)
orthomerge        ``orthomerge(base, *δ, …)``, c_i = α_i, row listed r_i times
weighted_sum      ``add_difference(base, n_average(*δ), alpha)``, c_i = n·α_i·r_i / Σ α_j·r_j
                  (a weighted mean of the deltas; with every delta-from the base, Σ w_i M_i / Σ w_i)
add_difference    ``add_difference(base, n_average(*δ), alpha)``, c_i = n·α_i·r_i (the sum of the deltas)
ties              ``add_difference(base, ties_sum(*δ, k, vote_sgn), alpha)``, c_i = α_i, listed r_i times
dare              ``add_difference(base, ties_sum_with_dropout(*δ, probability, rescale, della_eps, k,
                  vote_sgn, seed), alpha)``, c_i = α_i, listed r_i times
model_stock       ``add_difference(base, model_stock_rows(*δ, cos_eps), alpha)``, c_i = α_i, listed r_i times
geometric_median  ``add_difference(base, geometric_median_rows(*δ, eps, maxiter, ftol), alpha)``, c_i = α_i,
                  listed r_i times
================  ==================================================================================

(n = the number of deltas.) A row with ``block_alphas`` (:mod:`ortho_mecha.blocks`) has a coefficient per block
group: in group g every row takes its block alpha for g where it lists one, its alpha otherwise, and the
coefficients of that group follow the table from those alphas. So what couples the rows couples them within
each group: weighted_sum stays a weighted mean in every block (a row with ``out`` 0 leaves the out blocks to
the other rows; if every row's weight there is 0 they get the base), add_difference and the ortho methods
scale each row's delta per block. model_stock and geometric_median leave out a delta that is zero on a key
(:mod:`ortho_mecha.methods.stock`), so a row at 0 in a group is absent there too. The per-key coefficient is
sd-mecha's own per-key value, a
``sd_mecha.literal`` dict of the base config's keys whose coefficient differs from the row's, with
sd-mecha's ``fallback`` to the row's plain coefficient for every other key::

    scale_delta(δ, alpha=fallback(literal({"output_blocks.0.0.weight": 0.0, …}, config), c_i))

(sd-mecha 1.1.8 has no key patterns in literals, so the group's keys are listed one by one.) A row
without block alphas, or whose coefficients equal its plain one everywhere, keeps the plain float.

A texture boost wraps the result:
``texture_boost(merged, base, fallback(subtract(texture, base), subtract(base, base)), beta, mode)``
(zero on a key the texture's file lacks). A checkpoint's text encoders and
VAE chosen in the plan's ``components`` are put in front with ``pick_component(source, id) | merged``
(:mod:`ortho_mecha.components`).

``add_difference`` above is sd-mecha's registered merge method: the public wrapper
``sd_mecha.add_difference(base, delta)`` of sd-mecha 1.1.8 raises on a delta node, so the method is
resolved by name instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sd_mecha
from sd_mecha.extensions import merge_methods

from ortho_mecha import __version__, blocks, components
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import atomic_write_text, refuse_existing, refuse_text_output, require_folder
from ortho_mecha.gram import noise_unit
from ortho_mecha.lora_rows import is_lora_file, lora_delta_node
from ortho_mecha.mecha_config import model_node, register_base_config
from ortho_mecha.plan import METHODS, Plan, Row, load_plan

logger = logging.getLogger(__name__)

ORTHO_METHODS = ("ortho_project", "ortho_superpose", "orthomerge")
# plan method → the sd-mecha merge method that combines the deltas before add_difference
CLASSIC_COMBINERS = {
    "weighted_sum": "n_average",
    "add_difference": "n_average",
    "ties": "ties_sum",
    "dare": "ties_sum_with_dropout",
    "model_stock": "model_stock_rows",  # ortho-mecha's: sd-mecha's divides by zero on 1×1 convs
    "geometric_median": "geometric_median_rows",  # sd-mecha's, over the deltas not zero on the key
}


def _method(name: str) -> merge_methods.MergeMethod:
    return merge_methods.resolve(name)


def _coefficients(plan: Plan, method: str, alphas: list[float] | None = None) -> list[float]:
    """Each enabled row's delta coefficient under ``method`` (see the module docstring), from the rows'
    alphas or ``alphas``."""
    rows = plan.enabled_rows
    alphas = [float(row.alpha) for row in rows] if alphas is None else alphas
    if METHODS[method].repeat == "list":
        return [float(alpha) for alpha in alphas]
    weights = [float(alpha) * row.repeat for alpha, row in zip(alphas, rows, strict=True)]
    if method == "weighted_sum":
        total = sum(weights)
        return [len(rows) * w / total if total else 0.0 for w in weights]
    if method == "add_difference":
        return [len(rows) * w for w in weights]
    return weights


@dataclass(frozen=True)
class _Zones:
    """Each enabled row's plain coefficient and its per-group ones (:func:`ortho_mecha.blocks.zone_coefficients`),
    with the base's block layout when some row has group coefficients."""

    plain: list[float]
    overrides: list[dict[str, float]]
    layout: blocks.BlockLayout | None


def _zones(plan: Plan, method: str) -> _Zones:
    rows = plan.enabled_rows
    plain, overrides = blocks.zone_coefficients(
        [float(row.alpha) for row in rows], [row.block_alphas for row in rows],
        lambda a: _coefficients(plan, method, a),
    )
    return _Zones(plain, overrides, blocks.base_layout(plan.base) if any(overrides) else None)


def _per_key(values: dict[str, float], default: float, config_id: str) -> float | sd_mecha.RecipeNode:
    """``values`` on their keys and ``default`` elsewhere, as a recipe value (the plain float without keys)."""
    return _method("fallback")(sd_mecha.literal(values, config=config_id), default) if values else default


def _row_coefficients(zones: _Zones, config_id: str) -> list[float | sd_mecha.RecipeNode]:
    """Each enabled row's coefficient: a float, or per key with block alphas (see the module docstring)."""
    if zones.layout is None:
        return list(zones.plain)
    return [
        _per_key({key: value for group, value in groups.items() for key in zones.layout.file_keys(group)},
                 coefficient, config_id)
        for coefficient, groups in zip(zones.plain, zones.overrides, strict=True)
    ]


def _noise_scale(zones: _Zones, config_id: str) -> float | sd_mecha.RecipeNode:
    """The rows' largest |coefficient|, per key with block alphas: ortho_superpose's ``noise_scale``."""
    largest = max(abs(c) for c in zones.plain)
    if zones.layout is None:
        return largest
    groups = dict.fromkeys(g for listed in zones.overrides for g in listed)
    per_key = {
        key: max(abs(listed.get(group, c)) for c, listed in zip(zones.plain, zones.overrides, strict=True))
        for group in groups
        for key in zones.layout.file_keys(group)
    }
    return _per_key(per_key, largest, config_id)


def _combine(
    plan: Plan, method: str, options: dict[str, Any], node: Callable[[Path], sd_mecha.RecipeNode], config_id: str
) -> sd_mecha.RecipeNode:
    """The plan's enabled rows' deltas merged onto its base with ``method`` and its complete ``options``."""
    base = node(plan.base)
    rows = plan.enabled_rows

    def delta(row: Row) -> sd_mecha.RecipeNode:
        if is_lora_file(row.model):  # its delta is its product (plan checks: delta-from is the base)
            return lora_delta_node(row.model, base, config_id)
        # a key a file lacks is read as the base's value there, as the analysis reads it
        if row.delta_from is None:
            return _delta_from_base(node(row.model), base)
        return sd_mecha.subtract(_method("fallback")(node(row.model), base),
                                 _method("fallback")(node(row.delta_from), base))

    zones = _zones(plan, method)
    row_deltas = [
        _method("scale_delta")(delta(row), alpha=coefficient)
        for row, coefficient in zip(rows, _row_coefficients(zones, config_id), strict=True)
    ]
    if METHODS[method].repeat == "list":
        deltas = [delta for row, delta in zip(rows, row_deltas, strict=True) for _ in range(row.repeat)]
    else:
        deltas = row_deltas
    options = dict(options)
    if method == "ortho_superpose":
        options["noise_scale"] = _noise_scale(zones, config_id)
        unit = noise_unit(plan.base, [p for row in rows if not is_lora_file(row.model)
                                      for p in (row.model, row.delta_from) if p is not None])
        if unit:
            options["noise_unit"] = unit
    if method in ORTHO_METHODS:
        return _method(method)(base, *deltas, **options)
    alpha = options.pop("alpha")
    if method == "dare":
        # sd-mecha 1.1.8's ties_sum_extended reads its flag the wrong way round (``t = 1.0 if apply_stock else
        # model_stock_t``): True is what gives plain DARE-TIES, the dropped deltas' TIES mean with no model-stock
        # factor (which, near 0 for dropped deltas, took most of the merge away, and failed on one row)
        options["apply_stock"] = True
    combined = _method(CLASSIC_COMBINERS[method])(*deltas, **options)
    return _method("add_difference")(base, combined, alpha=alpha)


def _delta_from_base(model: sd_mecha.RecipeNode, base: sd_mecha.RecipeNode) -> sd_mecha.RecipeNode:
    """``fallback(subtract(model, base), subtract(base, base))``: the model's delta, zero on a key its file lacks."""
    return _method("fallback")(sd_mecha.subtract(model, base), sd_mecha.subtract(base, base))


def build_recipe(plan: Plan) -> sd_mecha.RecipeNode:
    """The sd-mecha recipe of ``plan`` (registers the base's derived config first)."""
    config_id = register_base_config(plan.base)
    nodes: dict[Path, sd_mecha.RecipeNode] = {}

    def node(path: Path) -> sd_mecha.RecipeNode:
        if path not in nodes:
            nodes[path] = _method("read_once")(model_node(path, config_id))
        return nodes[path]

    base = node(plan.base)
    merged = _combine(plan, plan.method, dict(plan.options), node, config_id)
    if plan.texture is not None:
        texture = _delta_from_base(node(plan.texture.model), base)  # zero where it lacks a key: the rows' merge stays
        merged = _method("texture_boost")(merged, base, texture, beta=plan.texture.alpha, mode=plan.texture.mode)

    def combine(method: str, options: dict[str, Any]) -> sd_mecha.RecipeNode:
        return _combine(plan, method, options, node, config_id)

    return components.choose(plan, merged, base, node, combine)


def recipe_text(plan: Plan) -> str:
    """The plan's recipe in sd-mecha's ``.mecha`` format."""
    return sd_mecha.serialize(build_recipe(plan))


def _lines_literal(text: str) -> str:
    """``text`` as a Python expression joining one repr per line, readable in the script."""
    lines = "".join(f"    {line!r},\n" for line in text.split("\n"))
    return "\n".join(["'\\n'.join([", lines.rstrip("\n"), "])"])


def script_text(plan: Plan) -> str:
    """A standalone Python script that re-registers the config, deserializes the recipe and merges it."""
    mecha = recipe_text(plan)
    return f'''#!/usr/bin/env python3
"""Re-run an ortho-mecha merge ({plan.method}, {len(plan.enabled_rows)} rows) with sd-mecha.

Generated by ortho-mecha {__version__}. Usage: python {{this file}} OUT.safetensors [--overwrite]
The recipe below is sd-mecha's own .mecha format; the inputs must be at the paths it names.
"""

import argparse
import json
import sys

import sd_mecha

import ortho_mecha  # registers ortho-mecha's merge methods with sd-mecha
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.mecha_config import register_base_config
from ortho_mecha.merge import execute

BASE = {str(plan.base)!r}
MERGE_DTYPE = {plan.merge_dtype!r}
OUTPUT_DTYPE = {plan.output_dtype!r}
PLAN = {_lines_literal(plan.to_json())}
RECIPE = {_lines_literal(mecha)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the merged .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--threads", type=int, default=None, help="sd-mecha worker threads")
    parser.add_argument("--device", default=None, help="merge device, e.g. cuda:0 (default cpu)")
    args = parser.parse_args()
    register_base_config(BASE)  # the model config every model node of the recipe names
    recipe = sd_mecha.deserialize(RECIPE)
    report = execute(
        recipe,
        args.out,
        base=BASE,
        merge_dtype=MERGE_DTYPE,
        output_dtype=OUTPUT_DTYPE,
        plan_json=PLAN,
        recipe_text=RECIPE,  # recorded as written: sd-mecha re-serializes a loaded true as the 1.0 beside it
        overwrite=args.overwrite,
        threads=args.threads,
        device=args.device,
    )
    print(json.dumps({{"output": report["output"], "repairs": report["repairs"]}}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except OrthoMechaError as error:  # a problem to fix (an input moved, OUT exists): one line, as ortho-mecha says it
        print(f"error: {{error}}", file=sys.stderr)
        raise SystemExit(2) from None
'''


def write_recipe(plan: Plan, mecha: Path | None, script: Path | None, overwrite: bool = False) -> list[Path]:
    """Write the ``.mecha`` file and/or the script (atomically; existing files only with ``overwrite``).

    Both outputs are checked before either is written, so a refusal leaves nothing behind."""
    if mecha is not None and script is not None and mecha.resolve() == script.resolve():
        raise OrthoMechaError("given for both --mecha and --script; the recipe and the script need two files", mecha)
    inputs = [*([plan.source] if plan.source else []), *plan.input_files(), *(row.model for row in plan.rows)]
    for path, what in ((mecha, "the recipe"), (script, "the script")):
        if path is not None:
            refuse_text_output(path, inputs, what)
            refuse_existing(path, overwrite)
            require_folder(path.parent)
    written = []
    if mecha is not None:
        written.append(atomic_write_text(mecha, recipe_text(plan), overwrite))
    if script is not None:
        path = atomic_write_text(script, script_text(plan), overwrite)
        umask = os.umask(0)
        os.umask(umask)
        path.chmod((stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO) & ~umask)
        written.append(path)
    return written


def cli_recipe(args: argparse.Namespace) -> int:
    if args.mecha is None and args.script is None:
        raise OrthoMechaError("nothing to write: give --mecha OUT.mecha and/or --script OUT.py", args.plan)
    plan = load_plan(args.plan)
    for path in write_recipe(plan, args.mecha and Path(args.mecha), args.script and Path(args.script), args.overwrite):
        print(path)
    return 0
