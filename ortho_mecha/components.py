"""Text encoders and VAE inside full checkpoints: which a base carries, and the plan's choice for each.

A checkpoint (more than 5 keys under ``model.diffusion_model.``, ComfyUI's rule) can carry its text
encoders and VAE beside the diffusion model. Each is recognised by the prefix of its keys, in one table,
:data:`COMPONENTS`:

============  ======================================  =================================================
id            what                                    key prefixes
============  ======================================  =================================================
clip_l        CLIP ViT-L text encoder (SD1.x, SDXL,   ``cond_stage_model.transformer.``,
              Flux.1)                                 ``conditioner.embedders.0.transformer.``,
                                                      ``text_encoders.clip_l.``
clip_g        OpenCLIP ViT-bigG text encoder (SDXL)   ``conditioner.embedders.1.model.``,
                                                      ``conditioner.embedders.0.model.`` (SDXL refiner),
                                                      ``text_encoders.clip_g.``
clip_h        OpenCLIP ViT-H text encoder (SD2.x)     ``cond_stage_model.model.``
t5xxl         T5-XXL text encoder (Flux.1, Chroma)    ``text_encoders.t5xxl.``, ``cond_stage_model.t5xxl.``
qwen3_4b      Qwen3-4B (Flux.2 Klein 4B, Z-Image)     ``text_encoders.qwen3_4b.``
qwen3_8b      Qwen3-8B (Flux.2 Klein 9B)              ``text_encoders.qwen3_8b.``
mistral3_24b  Mistral-3 24B (Flux.2 dev)              ``text_encoders.mistral3_24b.``
vae           the VAE                                 ``first_stage_model.``, ``vae.``
============  ======================================  =================================================

The ``text_encoders.`` and ``vae.`` prefixes are those of ComfyUI's all-in-one checkpoints of DiT models
(Chroma's keep the SD names).

Every other key (the diffusion model, and odd keys such as ``alphas_cumprod``) is in no component.
Diffusion-only files carry no components.

A plan may choose, per component, where the merged file's tensors of that component come from::

    "components": {"clip_l": {"source": "base"},
                   "clip_g": {"source": "model", "model": "x.safetensors"},
                   "vae": {"source": "merge", "method": "weighted_sum", "alpha": 0.5}}

- ``base``: the base's tensors as stored;
- ``model``: that model's tensors as stored (bit-identical in the output when the output dtype is the
  file's; the model must carry every key of the component, with the base's shapes);
- ``merge``: the enabled rows' deltas on the component, each ``alpha_i × (model_i − delta_from_i)`` as for
  the diffusion model, merged with ``method`` (default: the plan's) and ``alpha``. Its other options are
  the plan's when the method is the plan's, else the method's defaults; ``alpha`` left out takes the same
  rule. No texture boost.

A component the plan does not name is merged with everything else, exactly as without ``components``
(the plan's method, options and texture).

In the recipe each choice is sd-mecha's own ``pick_component`` of the chosen source, put in front of the
main merge with sd-mecha's ``fallback`` (``a | b``: a's value for the keys a has, else b's)::

    pick_component(x, "clip_g") | (pick_component(base, "vae") | merged)

``pick_component`` works on the components of the model config, so the config derived from the base's
header (:mod:`ortho_mecha.mecha_config`) groups the base's keys by :func:`split`. The keys of a picked
component never reach the main merge: sd-mecha's ``fallback`` reads its second input only for the keys
its first lacks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.io import Model
from ortho_mecha.plan import METHODS, _allowed, _option_ok, _resolve, _suggest, _unknown_fields
from ortho_mecha.validate import is_checkpoint

if TYPE_CHECKING:
    import sd_mecha

    from ortho_mecha.plan import Plan


@dataclass(frozen=True)
class ComponentSpec:
    """One component a checkpoint can carry: its id, a label, and the prefixes of its keys."""

    id: str
    label: str
    prefixes: tuple[str, ...]


COMPONENTS: tuple[ComponentSpec, ...] = (
    ComponentSpec(
        "clip_l",
        "CLIP-L text encoder",
        ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", "text_encoders.clip_l."),
    ),
    ComponentSpec(
        "clip_g",
        "CLIP-G text encoder",
        ("conditioner.embedders.1.model.", "conditioner.embedders.0.model.", "text_encoders.clip_g."),
    ),
    ComponentSpec("clip_h", "CLIP-H text encoder", ("cond_stage_model.model.",)),
    ComponentSpec("t5xxl", "T5-XXL text encoder", ("text_encoders.t5xxl.", "cond_stage_model.t5xxl.")),
    ComponentSpec("qwen3_4b", "Qwen3-4B text encoder", ("text_encoders.qwen3_4b.",)),
    ComponentSpec("qwen3_8b", "Qwen3-8B text encoder", ("text_encoders.qwen3_8b.",)),
    ComponentSpec("mistral3_24b", "Mistral-3 24B text encoder", ("text_encoders.mistral3_24b.",)),
    ComponentSpec("vae", "VAE", ("first_stage_model.", "vae.")),
)
LABELS = {spec.id: spec.label for spec in COMPONENTS}
SOURCES = ("base", "model", "merge")
FIELDS = ("source", "model", "method", "alpha")
PLAN = "plan"  # the Mixer's choice meaning "not in the plan's components": merged with everything else
SOURCE_LABELS = {PLAN: "merge with the plan", "base": "take from the base", "model": "take from a model",
                 "merge": "own merge"}


@dataclass(frozen=True)
class Component:
    """The plan's choice for one component (see the module docstring). ``model`` only with source
    ``model``; ``method`` and ``alpha`` only with source ``merge``, None meaning the plan's."""

    source: str
    model: Path | None = None
    method: str | None = None
    alpha: float | None = None


# -- which components a file carries --------------------------------------------------------------


def component_of(key: str) -> str | None:
    """The id of the component ``key`` belongs to (by prefix), or None."""
    return next((spec.id for spec in COMPONENTS if key.startswith(spec.prefixes)), None)


def split(keys: Iterable[str]) -> dict[str, list[str]]:
    """The keys of each component a file with ``keys`` carries, in table order (none for a diffusion-only file)."""
    keys = list(keys)
    if not is_checkpoint(keys):
        return {}
    found: dict[str, list[str]] = {}
    for key in keys:
        name = component_of(key)
        if name is not None:
            found.setdefault(name, []).append(key)
    return {spec.id: found[spec.id] for spec in COMPONENTS if spec.id in found}


def base_components(path: str | Path) -> dict[str, list[str]]:
    """The components the file at ``path`` carries (from its header), each with its keys."""
    with Model(path) as model:
        return split(model.tensors)


# -- the plan's field -------------------------------------------------------------------------------


def parse(raw: Any, folder: Path, fail: Callable[[str], OrthoMechaError]) -> dict[str, Component]:
    """The plan JSON's ``components`` (null or absent: none); relative model paths are taken against ``folder``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise fail(f'\'components\' must be an object like {{"vae": {{"source": "base"}}}}; ids: {_ids()}')
    choices = {}
    for name, choice in raw.items():
        where = f"component '{name}'"
        if not isinstance(choice, Mapping) or "source" not in choice:
            raise fail(f"{where} must be an object with a 'source' ({', '.join(SOURCES)})")
        _unknown_fields(choice, FIELDS, where, fail)
        model = choice.get("model")
        choices[str(name)] = Component(
            source=choice["source"],
            model=None if model is None else _resolve(model, folder, f"{where} 'model'", fail),
            method=choice.get("method"),
            alpha=choice.get("alpha"),
        )
    return choices


def to_dict(choices: Mapping[str, Component], show: Callable[[Path], str | None]) -> dict[str, dict[str, Any]]:
    """``choices`` as plan JSON (fields left at None are left out); ``show`` writes a path."""
    out = {}
    for name, choice in choices.items():
        data: dict[str, Any] = {"source": choice.source}
        if choice.model is not None:
            data["model"] = show(choice.model)
        if choice.method is not None:
            data["method"] = choice.method
        if choice.alpha is not None:
            data["alpha"] = choice.alpha
        out[name] = data
    return out


def check(plan: Plan, fail: Callable[[str], OrthoMechaError], check_file: Callable[[Path, str], None]) -> None:
    """Check ``plan.components`` against its base, its models and its methods; raise ``fail(message)``."""
    if not plan.components:
        return
    if not isinstance(plan.components, Mapping) or not all(isinstance(c, Component) for c in plan.components.values()):
        raise fail(f"'components' must map component ids ({_ids()}) to choices")
    present = base_components(plan.base)
    for name, choice in plan.components.items():
        where = f"component '{name}'"
        if name not in present:
            raise fail(f"{where}: the base {plan.base} has no such component; it has: {_carried(plan.base, present)}")
        if choice.source not in SOURCES:
            raise fail(f"{where}: unknown source {json.dumps(choice.source)}; {_suggest(str(choice.source), SOURCES)}")
        if (choice.model is not None) != (choice.source == "model"):
            raise fail(f"{where}: 'model' goes with source 'model' (and only with it)")
        if choice.source != "merge" and (choice.method is not None or choice.alpha is not None):
            raise fail(f"{where}: 'method' and 'alpha' go with source 'merge' only")
        if choice.source == "model":
            check_file(choice.model, f"{where}: model")
            _check_carries(plan.base, choice.model, name, present[name], fail)
        if choice.source == "merge":
            _check_merge(plan, name, choice, fail)


def _carried(base: Path, present: Mapping[str, list[str]]) -> str:
    """The components the base carries, as said in an error."""
    if present:
        return ", ".join(present)
    with Model(base) as model:
        checkpoint = is_checkpoint(model.tensors)
    return f"none of {_ids()}" if checkpoint else "none (it is a diffusion-only file)"


def _prefix(name: str, key: str) -> str:
    """The prefix of component ``name`` that ``key`` starts with."""
    spec = next(spec for spec in COMPONENTS if spec.id == name)
    return next(prefix for prefix in spec.prefixes if key.startswith(prefix))


def _check_carries(base: Path, path: Path, name: str, keys: list[str], fail: Callable[[str], OrthoMechaError]) -> None:
    """Raise unless the model at ``path`` has every key of component ``name`` with the base's shape."""
    with Model(base) as base_model, Model(path) as model:
        missing = [key for key in keys if key not in model.tensors]
        theirs = split(model.tensors).get(name) if len(missing) == len(keys) else None
        if theirs:
            raise fail(
                f"component '{name}': the model {path} carries its {LABELS[name]} under '{_prefix(name, theirs[0])}', "
                f"the base {base} under '{_prefix(name, keys[0])}' (checkpoints of different layouts); choose a "
                "checkpoint laid out like the base"
            )
        if missing:
            raise fail(
                f"component '{name}': the model {path} lacks {len(missing)} of its {len(keys)} keys "
                f"(e.g. '{missing[0]}'); choose a checkpoint that carries a {LABELS[name]}"
            )
        for key in keys:
            shape, expected = model.tensors[key].shape, base_model.tensors[key].shape
            if tuple(shape) != tuple(expected):
                raise fail(
                    f"component '{name}': key '{key}' of the model {path} has shape {list(shape)}, the base "
                    f"{base} has {list(expected)}: a different {LABELS[name]}"
                )


def _check_merge(plan: Plan, name: str, choice: Component, fail: Callable[[str], OrthoMechaError]) -> None:
    where = f"component '{name}'"
    if choice.method is not None and choice.method not in METHODS:
        hint = _suggest(str(choice.method), list(METHODS))
        raise fail(f"{where}: unknown method {json.dumps(choice.method)}; {hint}")
    method = METHODS[choice.method or plan.method]
    if choice.alpha is not None:
        spec = method.option("alpha")
        if not _option_ok(method.name, spec, choice.alpha):
            raise fail(f"{where}: alpha {json.dumps(choice.alpha)} is not allowed; allowed: {_allowed(spec)}")
    if len(plan.enabled_rows) < method.min_rows:
        raise fail(f"{where}: method '{method.name}' needs at least {method.min_rows} enabled rows")


def merge_settings(plan: Plan, choice: Component) -> tuple[str, dict[str, Any]]:
    """The method and complete options a ``merge`` choice merges its component with (module docstring)."""
    method = choice.method or plan.method
    options = dict(plan.options) if method == plan.method else METHODS[method].defaults()
    if choice.alpha is not None:
        options["alpha"] = float(choice.alpha)
    return method, options


def _ids() -> str:
    return ", ".join(spec.id for spec in COMPONENTS)


# -- the recipe -------------------------------------------------------------------------------------


def choose(
    plan: Plan,
    merged: sd_mecha.RecipeNode,
    base: sd_mecha.RecipeNode,
    node: Callable[[Path], sd_mecha.RecipeNode],
    combine: Callable[[str, dict[str, Any]], sd_mecha.RecipeNode],
) -> sd_mecha.RecipeNode:
    """``merged`` with each of ``plan.components`` taken from its source instead (module docstring).

    ``node(path)`` is the model node of a file, ``combine(method, options)`` the rows' deltas merged onto
    the base with that method. Components go in table order, so the recipe does not depend on the JSON's.
    """
    import sd_mecha

    result = merged
    for spec in reversed(COMPONENTS):
        choice = plan.components.get(spec.id)
        if choice is None:
            continue
        if choice.source == "base":
            source = base
        elif choice.source == "model":
            source = node(choice.model)
        else:
            source = combine(*merge_settings(plan, choice))
        result = sd_mecha.pick_component(source, spec.id) | result
    return result


# -- the Mixer --------------------------------------------------------------------------------------


def from_table(table: Mapping[str, Mapping[str, Any]] | None, choices: Any) -> dict[str, Component]:
    """The plan's ``components`` from the Mixer's state: per id ``{"source", "model", "method", "alpha"}``
    with ``model`` a file label (``choices``: a ``workspace.ModelChoices``); source ``plan`` is left out."""
    out = {}
    for name, entry in (table or {}).items():
        source = entry.get("source") or PLAN
        if source == PLAN:
            continue
        model = entry.get("model") if source == "model" else None
        if source == "model" and not model:
            raise OrthoMechaError(f"{LABELS.get(name, name)}: pick the model to take it from")
        alpha = entry.get("alpha") if source == "merge" else None
        out[name] = Component(
            source=source,
            model=None if model is None else choices.path(model),
            method=(entry.get("method") or None) if source == "merge" else None,
            alpha=None if alpha is None or alpha != alpha else float(alpha),  # an empty number box: NaN or None
        )
    return out


def to_table(components: Mapping[str, Component], choices: Any) -> dict[str, dict[str, Any]]:
    """The Mixer's state of a plan's ``components`` (the inverse of :func:`from_table`)."""
    return {
        name: {
            "source": choice.source,
            "model": None if choice.model is None else choices.label(choice.model),
            "method": choice.method,
            "alpha": choice.alpha,
        }
        for name, choice in components.items()
    }
