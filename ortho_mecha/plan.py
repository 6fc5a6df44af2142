"""The merge plan: a typed, validated description of one merge (DESIGN §6), read from and written to JSON.

A plan names the base, the method with its options, the mixer rows (model, delta-from, alpha, repeat,
enabled), an optional texture boost and the dtypes::

    {"base": "base.safetensors", "method": "orthomerge",
     "rows": [{"model": "a.safetensors", "delta_from": null, "alpha": 1.0, "repeat": 1, "enabled": true,
               "block_alphas": {"out": 0.0}}],
     "options": {"alpha": 1.0, "theta_agg": "mean"},
     "texture": {"model": "t.safetensors", "alpha": 0.2, "mode": "add"},
     "output_dtype": "bf16", "merge_dtype": "fp32"}

A full checkpoint's text encoders and VAE may get their own choice in an optional ``"components"``
object (take them from the base, from a model, or merge them with their own method and alpha; see
:mod:`ortho_mecha.components`). A row's optional ``block_alphas`` gives some block groups of the base's
architecture their own alpha (:mod:`ortho_mecha.blocks`); without it the row's alpha holds for every key,
as before.

A plan without ``output_dtype`` writes bf16 for a base stored in bf16, fp16 otherwise (:func:`default_output_dtype`).
Relative paths are resolved against the plan file's folder; options left out take the method's
defaults (:data:`METHODS`, which also carries the bounds and help text the Mixer builds its widgets
from). A :class:`Plan` is checked when it is built — every error names the plan file, the bad value
and how to fix it — and is immutable afterwards; the recipe builder and the executor only read it.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ortho_mecha import blocks
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import atomic_write_text, read_json
from ortho_mecha.io import SHARD_RE, refuse_unsupported
from ortho_mecha.lora_rows import is_lora_file, refuse_lora_delta_from
from ortho_mecha.methods import METHOD_OPTIONS, OptionError, OptionSpec
from ortho_mecha.methods.deltas import ALPHA
from ortho_mecha.methods.stock import MEDIAN_OPTIONS, STOCK_OPTIONS
from ortho_mecha.methods.texture import BETA, TEXTURE_MODE
from ortho_mecha.security import unmergeable_name

if TYPE_CHECKING:
    from ortho_mecha.components import Component

ALPHA_RANGE = (0.0, 2.0)
REPEAT_RANGE = (1, 3)
MERGE_DTYPES = ("fp16", "bf16", "fp32", "fp64")
OUTPUT_DTYPES = (*MERGE_DTYPES, "fp8_e4m3fn")
DEFAULT_OUTPUT_DTYPE = "fp16"  # sd-mecha's own default
DEFAULT_MERGE_DTYPE = "fp32"


@dataclass(frozen=True)
class MethodSpec:
    """A merge method a plan can name, with its options (the same :class:`OptionSpec` the ortho-mecha
    methods check themselves with, so bounds and help live in one place).

    ``repeat`` says what a row's repeat does: ``"scale"`` multiplies the row's delta by it (methods where a
    copy of a delta adds nothing but magnitude), ``"list"`` lists the row that many times (methods that
    aggregate or vote, where a copy weighs the result).
    """

    name: str
    summary: str
    options: tuple[OptionSpec, ...]
    repeat: str
    min_rows: int = 1

    def __post_init__(self) -> None:
        # a plan's global alpha is bounded as a row's (0–2); the methods themselves take any alpha ≥ 0
        bounded = tuple(replace(spec, maximum=ALPHA_RANGE[1]) if spec.name == ALPHA.name else spec
                        for spec in self.options)
        object.__setattr__(self, "options", bounded)

    def option(self, name: str) -> OptionSpec | None:
        return next((spec for spec in self.options if spec.name == name), None)

    def defaults(self) -> dict[str, Any]:
        return {spec.name: spec.default for spec in self.options}


def _is_lora(path: Path) -> bool:
    """Whether a plan's file is a kohya LoRA (from its header). A plan checks paths, not contents: a file
    whose header cannot be read counts as no LoRA here, and reading it for the merge reports why."""
    try:
        return is_lora_file(path)
    except OrthoMechaError:
        return False


def _unit(name: str, default: float, help_text: str) -> OptionSpec:
    return OptionSpec(name, default, help_text, minimum=0.0, maximum=1.0)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "ortho_project",
            "orthogonal projection in row order (the seed tool's method): each row adds what the rows above it "
            "do not already span",
            METHOD_OPTIONS["ortho_project"],
            repeat="scale",
        ),
        MethodSpec(
            "ortho_superpose",
            "order-free superposition: every delta keeps its own magnitude along its own direction, overlaps are "
            "not double counted",
            METHOD_OPTIONS["ortho_superpose"],
            repeat="scale",
        ),
        MethodSpec(
            "orthomerge",
            "rotation merge (OrthoMerge): Procrustes rotations combined in skew-symmetric space plus the mean residual",
            METHOD_OPTIONS["orthomerge"],
            repeat="list",
        ),
        MethodSpec(
            "weighted_sum",
            "weighted average of the rows' deltas, the row alphas (× repeat) as weights, added to the base "
            "(sd-mecha n_average + add_difference); the weights are relative, so one row gives its whole delta "
            "whatever its alpha: scale the result with the global alpha",
            (ALPHA,),
            repeat="scale",
        ),
        MethodSpec(
            "add_difference",
            "sum of the rows' deltas (alpha × repeat each) added to the base, i.e. task arithmetic "
            "(sd-mecha n_average + add_difference)",
            (ALPHA,),
            repeat="scale",
        ),
        MethodSpec(
            "ties",
            "TIES: keep each delta's top-k entries, elect a sign per element, average the agreeing deltas "
            "(sd-mecha ties_sum + add_difference)",
            (
                ALPHA,
                _unit("k", 1.0, "fraction of each delta's largest entries kept"),
                OptionSpec("vote_sgn", False, "elect signs by summed values instead of counted signs"),
            ),
            repeat="list",
        ),
        MethodSpec(
            "dare",
            "DARE: drop delta entries at random and rescale, then TIES (sd-mecha ties_sum_with_dropout + "
            "add_difference)",
            (
                ALPHA,
                OptionSpec("probability", 0.9, "probability of dropping an entry", minimum=0.0, maximum=0.99),
                OptionSpec("rescale", True, "divide the kept entries by 1 − probability"),
                _unit("della_eps", 0.0, "DELLA: magnitude-ranked drop rates (0 = plain DARE)"),
                _unit("k", 1.0, "TIES: fraction of each delta's largest entries kept"),
                OptionSpec("vote_sgn", False, "TIES: elect signs by summed values instead of counted signs"),
                OptionSpec(
                    "seed", 0, "random seed, fixed so the recipe reproduces the merge", minimum=0, maximum=2**31 - 1
                ),
            ),
            repeat="list",
        ),
        MethodSpec(
            "model_stock",
            "Model Stock: the average delta scaled by how much the rows agree, per output row (as sd-mecha's "
            "model_stock, conv kernels flattened) + add_difference",
            (ALPHA, *STOCK_OPTIONS),
            repeat="list",
            min_rows=2,
        ),
        MethodSpec(
            "geometric_median",
            "geometric median of the rows' deltas by Weiszfeld iterations (sd-mecha geometric_median + add_difference)",
            (ALPHA, *MEDIAN_OPTIONS),
            repeat="list",
        ),
    )
}


def _option_ok(method: str, spec: OptionSpec, value: Any) -> bool:
    """Whether a JSON value is valid for ``spec``: the right JSON type (a bool is not a number) and allowed."""
    if isinstance(spec.default, bool) or isinstance(value, bool):
        return isinstance(spec.default, bool) and isinstance(value, bool)
    if spec.choices:
        return value in spec.choices
    if isinstance(spec.default, int) and not isinstance(value, int):
        return False
    if not isinstance(value, int | float) or not math.isfinite(value):
        return False
    try:
        spec.check(method, value)
    except OptionError:
        return False
    return True


def _number_in(value: Any, low: float, high: float) -> bool:
    """A JSON number (not a bool) within [low, high]."""
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def _out_of_range(value: Any, low: float, high: float) -> str:
    """How a value failing ``_number_in(value, low, high)`` fails: ``"1.5 is outside 0–1"``, or for what is no
    number at all ``"\"a\" must be a number in 0–1"``."""
    problem = "is outside" if _number_in(value, -math.inf, math.inf) else "must be a number in"
    return f"{json.dumps(value)} {problem} {low:g}–{high:g}"


def _allowed(spec: OptionSpec) -> str:
    if isinstance(spec.default, bool):
        return "true, false"
    if spec.choices:
        return ", ".join(json.dumps(c) for c in spec.choices)
    kind = "an integer" if isinstance(spec.default, int) else "a number"
    return f"{kind} in {spec.range_text()}"


_TOP_FIELDS = ("base", "method", "rows", "options", "texture", "output_dtype", "merge_dtype", "components")
_ROW_FIELDS = ("model", "delta_from", "alpha", "repeat", "enabled", "block_alphas", "info")
_TEXTURE_FIELDS = ("model", "alpha", "mode")


def _suggest(value: str, valid: tuple[str, ...] | list[str]) -> str:
    same = [name for name in valid if name.lower() == str(value).lower()]  # "TIES": names are lower case
    close = same or difflib.get_close_matches(value, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}valid: {', '.join(valid)}"


@dataclass(frozen=True)
class Row:
    """One mixer row: its delta is ``alpha × (model − delta_from)`` (delta_from None: the plan's base);
    ``block_alphas`` {group: alpha} replaces ``alpha`` on the keys of those block groups."""

    model: Path
    delta_from: Path | None = None
    alpha: float = 1.0
    repeat: int = 1
    enabled: bool = True
    info: str = ""
    block_alphas: Mapping[str, float] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Texture:
    """Texture boost: add ``alpha × (model − base)`` to the result (mode ``orthogonal``: only its part
    orthogonal to the merged delta)."""

    model: Path
    alpha: float = 0.2
    mode: str = "add"


@dataclass(frozen=True)
class Plan:
    """A validated merge plan (paths absolute, options complete). Build it with :func:`plan_from_dict`,
    :func:`load_plan` or directly; every construction runs the checks."""

    base: Path
    method: str
    rows: tuple[Row, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    texture: Texture | None = None
    output_dtype: str = DEFAULT_OUTPUT_DTYPE
    merge_dtype: str = DEFAULT_MERGE_DTYPE
    source: Path | None = field(default=None, compare=False)  # the plan file, for messages
    components: Mapping[str, Component] = field(default_factory=dict)  # text encoders / VAE of a checkpoint

    def __post_init__(self) -> None:
        # A delta-from naming the base itself is the default, written out: the same row (and the same plan).
        base = self.base.resolve()
        object.__setattr__(self, "rows", tuple(
            replace(row, delta_from=None) if row.delta_from is not None and row.delta_from.resolve() == base else row
            for row in self.rows))
        method = self._check_method()
        object.__setattr__(self, "options", self._check_options(method))
        self._check_dtypes()
        self._check_rows(method)
        self._check_block_alphas()
        self._check_texture()
        from ortho_mecha import components  # it imports this module's METHODS and helpers

        components.check(self, self._fail, self._check_file)

    # -- checks ----------------------------------------------------------------------------------

    def _fail(self, message: str) -> OrthoMechaError:
        return OrthoMechaError(message if self.source else f"plan: {message}", self.source)

    def _check_method(self) -> MethodSpec:
        if self.method not in METHODS:
            raise self._fail(f"unknown method '{self.method}'; {_suggest(str(self.method), list(METHODS))}")
        return METHODS[self.method]

    def _check_options(self, method: MethodSpec) -> dict[str, Any]:
        if not isinstance(self.options, Mapping):
            raise self._fail("'options' must be a JSON object of option names and values")
        options = method.defaults()
        for name, value in self.options.items():
            spec = method.option(name)
            if spec is None:
                names = [s.name for s in method.options]
                raise self._fail(f"method '{self.method}' has no option '{name}'; {_suggest(name, names)}")
            if not _option_ok(self.method, spec, value):
                raise self._fail(
                    f"option '{name}' of method '{self.method}' is {json.dumps(value)}; allowed: {_allowed(spec)}"
                )
            options[name] = float(value) if isinstance(spec.default, float) else value
        return options

    def _check_dtypes(self) -> None:
        if self.merge_dtype not in MERGE_DTYPES:
            raise self._fail(
                f"unknown merge_dtype '{self.merge_dtype}'; {_suggest(str(self.merge_dtype), MERGE_DTYPES)}"
            )
        if self.output_dtype not in OUTPUT_DTYPES:
            raise self._fail(
                f"unknown output_dtype '{self.output_dtype}'; {_suggest(str(self.output_dtype), OUTPUT_DTYPES)}"
            )

    def _check_file(self, path: Path, what: str) -> None:
        if SHARD_RE.match(path.name) or path.name.lower().endswith(".safetensors.index.json"):
            raise self._fail(f"{what} {path} is a sharded model; merge needs one file: write it with 'ortho-mecha "
                             "convert MODEL --out COPY.safetensors' and name the copy in the plan")
        try:
            refuse_unsupported(path)
        except OrthoMechaError as exc:
            raise self._fail(f"{what} {path}: {str(exc).removeprefix(f'{exc.path}: ')}") from exc
        if (named := unmergeable_name(path)) is not None:
            raise self._fail(f"{what} {path}: {named}, and name that in the plan")
        if not path.is_file():
            remedy = "fix the path" if what == "base" else "fix the path or remove it from the plan"
            problem = "is a folder, not a model file" if path.is_dir() else "does not exist"
            raise self._fail(f"{what} {path} {problem}; {remedy}")

    def _check_rows(self, method: MethodSpec) -> None:
        self._check_file(self.base, "base")
        if _is_lora(self.base):
            raise self._fail(f"base {self.base} is a LoRA; the base must be a full model (a LoRA can be a row)")
        enabled = [row for row in self.rows if row.enabled]
        if not enabled:
            raise self._fail("no enabled rows; enable at least one model")
        if len(enabled) < method.min_rows:
            raise self._fail(
                f"method '{self.method}' needs at least {method.min_rows} enabled rows, got {len(enabled)}"
            )
        for number, row in enumerate(self.rows, start=1):
            label = f"row {number} ({row.model.name})"
            if not _number_in(row.alpha, *ALPHA_RANGE):
                raise self._fail(f"{label}: alpha {_out_of_range(row.alpha, *ALPHA_RANGE)}")
            if not isinstance(row.repeat, int) or not _number_in(row.repeat, *REPEAT_RANGE):
                raise self._fail(f"{label}: repeat {row.repeat!r} must be an integer 1, 2 or 3")
            if not isinstance(row.block_alphas, Mapping):
                raise self._fail(f"{label}: 'block_alphas' must be an object of block group → alpha")
            if not row.enabled:
                continue
            self._check_file(row.model, f"{label}: model")
            if row.model.resolve() == self.base.resolve():
                raise self._fail(f"{label}: the model is the plan's base itself, so its delta is zero; disable the "
                                 "row or choose another model")
            if row.delta_from is not None:
                self._check_file(row.delta_from, f"{label}: delta_from")
            self._check_lora_row(label, row)
        self._check_cycles(enabled)

    def _check_lora_row(self, label: str, row: Row) -> None:
        """A kohya LoRA row's delta is its product, from the base; a LoRA is nobody's delta-from."""
        from_lora = row.delta_from is not None and _is_lora(row.delta_from)
        try:
            refuse_lora_delta_from(row.model, row.delta_from, _is_lora(row.model), from_lora)
        except OrthoMechaError as exc:
            raise self._fail(f"{label}: {str(exc).removeprefix(f'{exc.path}: ')}") from exc

    def _check_block_alphas(self) -> None:
        """Block alphas name block groups of the base's architecture (read from its header only when a row
        has some), each in the alpha range; stored as floats."""
        if not any(row.block_alphas for row in self.rows):
            return
        layout = blocks.base_layout(self.base)
        rows = []
        for number, row in enumerate(self.rows, start=1):
            try:
                checked = layout.check(row.block_alphas, f"row {number} ({row.model.name})", *ALPHA_RANGE)
            except OrthoMechaError as exc:
                raise self._fail(str(exc)) from exc
            rows.append(replace(row, block_alphas=checked))
        object.__setattr__(self, "rows", tuple(rows))

    def _check_cycles(self, enabled: list[Row]) -> None:
        """Refuse delta-from chains through the rows' models that come back to where they started."""
        parent = {row.model: row.delta_from for row in enabled if row.delta_from is not None}
        for start in parent:
            chain = [start]
            node = parent[start]
            while node is not None and node in parent and node not in chain:
                chain.append(node)
                node = parent[node]
            if node in chain:
                loop = " ← ".join(p.name for p in [*chain[chain.index(node) :], node])
                raise self._fail(
                    f"delta-from cycle {loop}: a row's delta cannot be taken against a model whose own delta is "
                    "taken against it; set one of them to the base"
                )

    def _check_texture(self) -> None:
        if self.texture is None:
            return
        alpha = self.texture.alpha
        if not _option_ok("texture", BETA, alpha):
            raise self._fail(f"texture alpha {_out_of_range(alpha, BETA.minimum, BETA.maximum)}")
        if self.texture.mode not in TEXTURE_MODE.choices:
            choices = list(TEXTURE_MODE.choices)
            raise self._fail(f"unknown texture mode '{self.texture.mode}'; {_suggest(str(self.texture.mode), choices)}")
        self._check_file(self.texture.model, "texture model")
        if _is_lora(self.texture.model):
            raise self._fail(f"texture model {self.texture.model} is a LoRA; add it as a row instead")

    # -- derived -----------------------------------------------------------------------------------

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def enabled_rows(self) -> tuple[Row, ...]:
        return tuple(row for row in self.rows if row.enabled)

    def input_files(self) -> list[Path]:
        """Every file the merge reads, base first, each once, in plan order."""
        files = [self.base]
        for row in self.enabled_rows:
            files += [row.model] + ([row.delta_from] if row.delta_from is not None else [])
        if self.texture is not None:
            files.append(self.texture.model)
        files += [choice.model for choice in self.components.values() if choice.model is not None]
        return list(dict.fromkeys(files))

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The plan as JSON-ready data; paths inside ``relative_to`` are written relative to it."""

        def show(path: Path | None) -> str | None:
            if path is None:
                return None
            if relative_to is not None and path.is_relative_to(relative_to):
                return path.relative_to(relative_to).as_posix()
            return str(path)

        rows = []
        for row in self.rows:
            data = {
                "model": show(row.model),
                "delta_from": show(row.delta_from),
                "alpha": row.alpha,
                "repeat": row.repeat,
                "enabled": row.enabled,
            }
            if row.block_alphas:
                data["block_alphas"] = dict(row.block_alphas)
            rows.append(data | ({"info": row.info} if row.info else {}))
        texture = None
        if self.texture is not None:
            texture = {"model": show(self.texture.model), "alpha": self.texture.alpha, "mode": self.texture.mode}
        data = {
            "base": show(self.base),
            "method": self.method,
            "rows": rows,
            "options": dict(self.options),
            "texture": texture,
            "output_dtype": self.output_dtype,
            "merge_dtype": self.merge_dtype,
        }
        if not self.components:  # a plan without them reads exactly as before the field existed
            return data
        from ortho_mecha import components

        return data | {"components": components.to_dict(self.components, show)}

    def to_json(self, relative_to: Path | None = None) -> str:
        return json.dumps(self.to_dict(relative_to), indent=1) + "\n"


def _resolve(value: Any, folder: Path, what: str, fail: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise fail(f"{what} must be a file path (a non-empty string), got {json.dumps(value)}")
    path = Path(value).expanduser()
    return (path if path.is_absolute() else folder / path).resolve()


def _unknown_fields(data: Mapping[str, Any], valid: tuple[str, ...], where: str, fail: Any) -> None:
    for name in data:
        if name not in valid:
            raise fail(f"unknown field '{name}' in {where}; {_suggest(str(name), list(valid))}")


def plan_from_dict(data: Any, folder: str | Path, source: str | Path | None = None) -> Plan:
    """Build and check a :class:`Plan` from JSON data; relative paths are taken against ``folder``."""
    source_path = Path(source) if source is not None else None
    folder = Path(folder)

    def fail(message: str) -> OrthoMechaError:
        return OrthoMechaError(message if source_path else f"plan: {message}", source_path)

    if not isinstance(data, Mapping):
        raise fail("a plan must be a JSON object with 'base', 'method' and 'rows'")
    _unknown_fields(data, _TOP_FIELDS, "the plan", fail)
    for required in ("base", "method", "rows"):
        if required not in data:
            raise fail(f"missing '{required}'")
    if not isinstance(data["rows"], list):
        raise fail("'rows' must be a list of rows")
    rows = []
    for number, raw in enumerate(data["rows"], start=1):
        if not isinstance(raw, Mapping) or "model" not in raw:
            raise fail(f"row {number} must be an object with at least a 'model'")
        _unknown_fields(raw, _ROW_FIELDS, f"row {number}", fail)
        delta_from = raw.get("delta_from")
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            raise fail(f"row {number}: 'enabled' must be true or false, got {json.dumps(enabled)}")
        rows.append(
            Row(
                model=_resolve(raw["model"], folder, f"row {number} 'model'", fail),
                delta_from=None
                if delta_from is None
                else _resolve(delta_from, folder, f"row {number} 'delta_from'", fail),
                alpha=raw.get("alpha", 1.0),
                repeat=raw.get("repeat", 1),
                enabled=enabled,
                info=str(raw.get("info") or ""),
                block_alphas={} if raw.get("block_alphas") is None else raw["block_alphas"],
            )
        )
    texture = None
    if data.get("texture") is not None:
        raw = data["texture"]
        if not isinstance(raw, Mapping) or "model" not in raw:
            raise fail("'texture' must be null or an object with 'model', 'alpha' and 'mode'")
        _unknown_fields(raw, _TEXTURE_FIELDS, "texture", fail)
        texture = Texture(
            _resolve(raw["model"], folder, "texture 'model'", fail), raw.get("alpha", 0.2), raw.get("mode", "add")
        )
    from ortho_mecha import components

    base = _resolve(data["base"], folder, "'base'", fail)
    return Plan(
        base=base,
        method=data["method"],
        rows=tuple(rows),
        options=data.get("options") or {},
        texture=texture,
        output_dtype=data["output_dtype"] if "output_dtype" in data else default_output_dtype(base),
        merge_dtype=data.get("merge_dtype", DEFAULT_MERGE_DTYPE),
        source=source_path,
        components=components.parse(data.get("components"), folder, fail),
    )


def default_output_dtype(base: Path) -> str:
    """The output dtype a plan gets when it names none: ``bf16`` for a base stored mostly in bf16 (Flux, Chroma,
    Z-Image: fp16's range, ±65504, would turn their larger weights into Inf), else :data:`DEFAULT_OUTPUT_DTYPE`.
    Reads only the base's header; an unreadable base gets the default (its error comes from the checks)."""
    from ortho_mecha.io import parse_header

    try:
        tensors = parse_header(base)[0]
    except (OrthoMechaError, OSError):
        return DEFAULT_OUTPUT_DTYPE
    elements: dict[str, int] = {}
    for info in tensors.values():
        elements[info.dtype] = elements.get(info.dtype, 0) + info.numel
    return "bf16" if elements and max(elements, key=elements.__getitem__) == "BF16" else DEFAULT_OUTPUT_DTYPE


def load_plan(path: str | Path) -> Plan:
    """Read a plan file; relative paths inside it are resolved against its folder."""
    path = Path(path)
    data = read_json(path, "plan", "no such plan file")
    return plan_from_dict(data, path.resolve().parent, path)


def save_plan(plan: Plan, path: str | Path, overwrite: bool = False) -> Path:
    """Write the plan atomically; paths under the plan's folder are written relative to it."""
    path = Path(path)
    return atomic_write_text(path, plan.to_json(relative_to=path.resolve().parent), overwrite)
