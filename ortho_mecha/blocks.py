"""Block groups per architecture, per-block alphas of a plan's rows, and their presets.

A row's alpha may vary by *block group* (issue 9): the plan row carries ``"block_alphas": {"<group>": α, …}``
and a key in a listed group takes that α instead of the row's ``alpha``; keys in no listed group (and
keys in no group at all) keep the row's alpha. The groups depend on the base's architecture
(:mod:`ortho_mecha.arch` ids), all on canonical keys (prefix stripped, ``.scale`` norms read as ``.weight``):

==========================  ===========================================================================
architecture                groups, in depth order
==========================  ===========================================================================
``sd1``, ``sdxl`` (UNet)    ``in`` (``input_blocks.*``), ``mid`` (``middle_block.*``), ``out``
                            (``output_blocks.*``); ``time_embed``, ``label_emb``, ``out.*`` are in none
``flux1``, ``chroma``,      ``double`` (``double_blocks.*``), ``single`` (``single_blocks.*``); the
``flux2-klein``             embedders, modulation and final layer are in none
``custom``: Flux.1 in       ``double`` (``transformer_blocks.*``), ``single``
diffusers' layout           (``single_transformer_blocks.*``), as above
``zimage``                  up to :data:`LAYER_RANGES` contiguous ranges of the base's ``layers.N``, named
                            ``layers.0-9`` …, as even as the layer count allows (30 layers: 0-9, 10-19,
                            20-29); refiners and embedders are in none
``custom``                  every top-level block :func:`ortho_mecha.arch.block_of` gives
                            (``layers.3``, ``embed``, …): every key is in a group
==========================  ===========================================================================

Presets (:data:`PRESETS`) are named curves over the groups, weights w_g ∈ [0, 1] multiplied by the row's
alpha (:func:`preset_alphas`): ``flat`` lists no group (every key at the row's alpha); ``structure`` keeps the
early blocks and drops the late ones — UNet ``in`` 1, ``mid`` 1, ``out`` 0; Flux ``double`` 1, ``single`` 0;
layer ranges and numbered custom blocks ramp linearly from 1 (first) to 0 (last) along each numbered
family — and ``style`` is its complement (1 − w_g). Unnumbered custom groups (embeddings, heads) are left
at the row's alpha by both. "Structure from A, style from B" is row A with ``structure`` and row B with
``style``: A's delta fills the early blocks, B's the late ones.

The Mixer table keeps a row's block alphas as text, ``"in=1, mid=1, out=0"`` (:func:`format_cell`,
:func:`parse_cell`).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ortho_mecha import arch as arch_mod
from ortho_mecha.errors import OrthoMechaError

LAYER_RANGES = 3  # how many ranges Z-Image-style ``layers.N`` are split into
UNET_GROUPS = {"in": "input_blocks.", "mid": "middle_block.", "out": "output_blocks."}
FLUX_GROUPS = {"double": "double_blocks.", "single": "single_blocks."}
DIFFUSERS_FLUX_GROUPS = {"double": "transformer_blocks.", "single": "single_transformer_blocks."}
NAMED_GROUPS = {"unet": UNET_GROUPS, "flux": FLUX_GROUPS, "flux-diffusers": DIFFUSERS_FLUX_GROUPS}
KIND_OF_ARCH = {
    "sd1": "unet",
    "sdxl": "unet",
    "flux1": "flux",
    "chroma": "flux",
    "flux2-klein": "flux",
    "zimage": "layers",
    "custom": "custom",
}
PRESETS: dict[str, str] = {
    "flat": "no block alphas: every key at the row's alpha",
    "structure": "early blocks at the row's alpha, fading to 0 in the late ones (UNet in + mid, Flux double blocks)",
    "style": "late blocks at the row's alpha, early ones at 0 (UNet out, Flux single blocks): structure's complement",
}
# Fixed preset weights of the named group kinds; ordered kinds ramp instead (see the module docstring).
_STRUCTURE = {"unet": {"in": 1.0, "mid": 1.0, "out": 0.0}, "flux": {"double": 1.0, "single": 0.0},
              "flux-diffusers": {"double": 1.0, "single": 0.0}}

_LAYER = re.compile(r"^layers\.(\d+)\.")
_NUMBERED = re.compile(r"^(?P<family>.+)\.(?P<index>\d+)$")
_CELL_ITEM = re.compile(r"^\s*(?P<group>[^=\s,]+)\s*=\s*(?P<value>[^=\s,]+)\s*$")


@dataclass(frozen=True)
class BlockLayout:
    """The block groups of one base: its architecture, group kind, groups in depth order, and (read from a
    file) each canonical diffusion key's name in that file, for the recipe's per-key values."""

    arch: str
    kind: str
    groups: tuple[str, ...]
    layer_ranges: tuple[tuple[int, int], ...] = ()  # kind "layers": (first, last) layer of each group
    names: Mapping[str, str] = field(default_factory=dict, compare=False)  # canonical key → the file's key

    def group_of(self, key: str) -> str | None:
        """The group of a canonical key, or None when it is in no group (it keeps the row's alpha)."""
        if self.kind in NAMED_GROUPS:
            return next((g for g, prefix in NAMED_GROUPS[self.kind].items() if key.startswith(prefix)), None)
        if self.kind == "layers":
            match = _LAYER.match(key)
            if match is None:
                return None
            return self._range_of(int(match[1]))
        block = arch_mod.block_of(key)
        return block if block in self.groups else None

    def file_keys(self, group: str) -> list[str]:
        """The base file's own names of the keys in ``group`` (a layout read from a file only)."""
        return [name for canon, name in self.names.items() if self.group_of(canon) == group]

    def _range_of(self, layer: int) -> str | None:
        """The layer-range group holding ``layer``, if any."""
        return next((g for g, (a, b) in zip(self.groups, self.layer_ranges, strict=True) if a <= layer <= b), None)

    def _nearest(self, given: str) -> str | None:
        """The group a misspelt ``given`` most likely means: for layer ranges, the range holding its first layer
        (``layers.0-10`` → ``layers.0-9``, where the spelling alone is closer to ``layers.10-19``); else the
        closest spelling."""
        match = re.match(r"^layers\.(\d+)", given) if self.kind == "layers" else None
        if match is not None:
            held = self._range_of(int(match[1]))
            if held is not None:
                return held
        close = difflib.get_close_matches(given, self.groups, n=1)
        return close[0] if close else None

    def check(self, block_alphas: Any, where: str, low: float, high: float) -> dict[str, float]:
        """``block_alphas`` as {group: alpha} if every name is a group of this layout (in any case: ``IN`` is ``in``)
        and every value a number in [low, high]; otherwise an :class:`OrthoMechaError` message (without a path)
        saying what is allowed."""
        if not isinstance(block_alphas, Mapping):
            raise OrthoMechaError(
                f"{where}: 'block_alphas' must be an object of block group → alpha, e.g. "
                f'{{"{self.groups[0] if self.groups else "group"}": 0.5}}'
            )
        out = {}
        spelled = {name.lower(): name for name in self.groups}  # IN/MID/OUT, as supermerger users write them
        for given, value in block_alphas.items():
            group = spelled.get(str(given).lower(), given)
            if group not in self.groups:
                close = self._nearest(str(group))
                hint = f"did you mean '{close}'? " if close else ""
                valid = ", ".join(self.groups) or "none"
                raise OrthoMechaError(
                    f"{where}: unknown block group '{group}' for the {self.arch} base; {hint}valid groups: {valid}"
                )
            if group in out:
                raise OrthoMechaError(f"{where}: block group '{group}' is given twice (names are read in any case); "
                                      "keep one")
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise OrthoMechaError(
                    f"{where}: block alpha {group}={value!r} must be a number in {low:g}–{high:g}"
                )
            out[group] = float(value)
        return out


def layout_for_keys(arch: str, keys: Sequence[str], names: Mapping[str, str] | None = None) -> BlockLayout:
    """The block layout of a model with these canonical keys and architecture id (see the module docstring)."""
    arch = arch_mod.canonical_arch(arch)
    kind = KIND_OF_ARCH[arch]
    if kind == "custom" and arch_mod.is_diffusers_flux(keys):
        kind = "flux-diffusers"
    named = NAMED_GROUPS.get(kind)
    ranges: tuple[tuple[int, int], ...] = ()
    if named is not None:
        groups = tuple(g for g, prefix in named.items() if any(k.startswith(prefix) for k in keys))
    elif kind == "layers":
        indices = [int(m[1]) for k in keys if (m := _LAYER.match(k))]
        ranges = split_layers(max(indices) + 1) if indices else ()
        groups = tuple(f"layers.{a}" if a == b else f"layers.{a}-{b}" for a, b in ranges)
    else:
        groups = tuple(sorted({arch_mod.block_of(k) for k in keys}, key=arch_mod.block_sort_key))
    return BlockLayout(arch, kind, groups, ranges, dict(names or {}))


def split_layers(count: int, parts: int = LAYER_RANGES) -> tuple[tuple[int, int], ...]:
    """``count`` layers as up to ``parts`` contiguous (first, last) ranges, the first ones one longer when
    ``count`` does not divide evenly (10 layers: 0-3, 4-6, 7-9)."""
    parts = min(parts, count)
    size, extra = divmod(count, parts) if parts else (0, 0)
    ranges, start = [], 0
    for part in range(parts):
        length = size + (part < extra)
        ranges.append((start, start + length - 1))
        start += length
    return tuple(ranges)


def base_layout(base: str | Path) -> BlockLayout:
    """The block layout of a base file, from its header (cached per file path, size and modification time)."""
    path = Path(base).resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise OrthoMechaError(f"cannot read the base: {exc.strerror or exc}", path) from exc
    return _read_layout(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_layout(path: Path, _size: int, _mtime_ns: int) -> BlockLayout:
    from ortho_mecha.io import Model
    from ortho_mecha.validate import canonical_shapes, key_map

    with Model(path) as model:
        mapping = key_map(model)
        shapes = canonical_shapes(model, mapping)
    return layout_for_keys(arch_mod.detect(shapes), list(mapping.keys), mapping.keys)


# --- presets -------------------------------------------------------------------------------------------


def preset_weights(preset: str, layout: BlockLayout) -> dict[str, float]:
    """The weight w_g ∈ [0, 1] a preset gives each group it sets (``flat`` sets none)."""
    if preset not in PRESETS:
        raise OrthoMechaError(f"unknown block preset '{preset}'; valid: {', '.join(PRESETS)}")
    if preset == "flat":
        return {}
    if layout.kind in _STRUCTURE:
        structure = {g: w for g, w in _STRUCTURE[layout.kind].items() if g in layout.groups}
    else:
        structure = _ramps(layout.groups, ordered=layout.kind == "layers")
    return structure if preset == "structure" else {g: 1.0 - w for g, w in structure.items()}


def _ramps(groups: Sequence[str], ordered: bool) -> dict[str, float]:
    """1 → 0 linearly along the groups' order (``ordered``), or along each numbered family's index."""
    if ordered:
        families = {"": [(i, g) for i, g in enumerate(groups)]}
    else:
        families = {}
        for group in groups:
            match = _NUMBERED.match(group)
            if match:
                families.setdefault(match["family"], []).append((int(match["index"]), group))
    weights = {}
    for members in families.values():
        first, last = min(i for i, _ in members), max(i for i, _ in members)
        for index, group in members:
            weights[group] = 1.0 if last == first else (last - index) / (last - first)
    return weights


def preset_alphas(preset: str, layout: BlockLayout, alpha: float) -> dict[str, float]:
    """A row's block alphas under ``preset``: each set group's weight times the row's ``alpha``, rounded to 6
    decimals (a ramp's thirds read 0.333333 in the table, not 0.3333333333333333)."""
    return {g: round(w * alpha, 6) for g, w in preset_weights(preset, layout).items()}


# --- the Mixer table's text form -------------------------------------------------------------------------


def format_cell(block_alphas: Mapping[str, float]) -> str:
    """``{"in": 1, "out": 0.25}`` → ``"in=1, out=0.25"`` (empty text for none); each value reads back exactly."""
    return ", ".join(f"{group}={_exact_text(float(value))}" for group, value in block_alphas.items())


def _exact_text(value: float) -> str:
    """The short form (``1``, ``0.8``) when it reads back as the same float, else the full repr."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def parse_cell(text: Any, where: str = "block alphas") -> dict[str, float]:
    """The block alphas of a table cell ``"in=1, out=0"``; empty or missing text is none."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
        return {}
    out: dict[str, float] = {}
    for item in str(text).split(","):
        if not item.strip():  # a trailing or doubled comma
            continue
        match = _CELL_ITEM.match(item)
        value = None
        if match:
            try:
                value = float(match["value"])
            except ValueError:
                value = None
        if match is None or value is None or not math.isfinite(value):
            raise OrthoMechaError(f"{where}: cannot read {item.strip()!r}; write group=alpha pairs, e.g. in=1, out=0")
        if any(group.lower() == match["group"].lower() for group in out):
            raise OrthoMechaError(f"{where}: group '{match['group']}' is given twice; give each group once")
        out[match["group"]] = value
    return out


# --- per-key alphas ------------------------------------------------------------------------------------


def zone_coefficients(
    alphas: Sequence[float],
    block_alphas: Sequence[Mapping[str, float]],
    coefficients: Callable[[list[float]], list[float]],
) -> tuple[list[float], list[dict[str, float]]]:
    """Each row's plain coefficient and, per group, the coefficient where it differs from the plain one.

    ``coefficients`` maps the rows' alphas to their delta coefficients (``recipe._coefficients``: it may
    couple the rows, e.g. weighted_sum normalises over them). In a group every row takes its block alpha
    there or its alpha, and the rows' coefficients are computed from those, so a coupling holds within
    each group: weighted_sum stays a weighted mean in every block.
    """
    plain = list(coefficients(list(alphas)))
    groups = list(dict.fromkeys(g for listed in block_alphas for g in listed))
    overrides: list[dict[str, float]] = [{} for _ in alphas]
    for group in groups:
        zone = coefficients([listed.get(group, a) for a, listed in zip(alphas, block_alphas, strict=True)])
        for i, value in enumerate(zone):
            if value != plain[i]:
                overrides[i][group] = value
    return plain, overrides


def key_alphas(
    keys: Sequence[str], layout: BlockLayout, alphas: Sequence[float], block_alphas: Sequence[Mapping[str, float]]
) -> Any:
    """(keys, rows) float64 array: each row's alpha on each canonical key (its block alpha where listed)."""
    import numpy as np

    out = np.tile(np.asarray(alphas, dtype=np.float64), (len(keys), 1))
    for k, key in enumerate(keys):
        group = layout.group_of(key)
        if group is None:
            continue
        for i, listed in enumerate(block_alphas):
            if group in listed:
                out[k, i] = listed[group]
    return out


def alpha_frame(labels: Sequence[str], alphas: Sequence[float], block_alphas: Sequence[Mapping[str, float]],
                layout: BlockLayout) -> Any:
    """Long table (row, group, alpha, set) of each row's alpha per group, for :func:`alpha_chart`."""
    import pandas as pd

    records = [
        {"row": label, "group": group, "alpha": listed.get(group, alpha), "set": group in listed}
        for label, alpha, listed in zip(labels, alphas, block_alphas, strict=True)
        for group in layout.groups
    ]
    return pd.DataFrame(records, columns=["row", "group", "alpha", "set"])


def alpha_chart(frame: Any, groups: Sequence[str]) -> Any:
    """Each row's alpha per block group (groups in depth order), a line per row; filled points mark set groups."""
    import altair as alt

    base = alt.Chart(frame, title="alpha per block group").encode(
        x=alt.X("group:N", sort=list(groups), title=None, axis=alt.Axis(labelAngle=0)),
        y=alt.Y("alpha:Q", scale=alt.Scale(domain=[0, 2]), title="alpha"),
        # one per line, in the table's order ("10: …" after "9: …", not after "1: …")
        color=alt.Color("row:N", title=None, sort=list(dict.fromkeys(frame["row"])),
                        legend=alt.Legend(orient="right", labelLimit=240)),
        tooltip=["row:N", "group:N", alt.Tooltip("alpha:Q", format=".2f"), alt.Tooltip("set:N", title="block alpha")],
    )
    # rows of equal alphas draw the same line: a dash per row keeps each of them in sight
    lines = base.mark_line(strokeWidth=2).encode(strokeDash=alt.StrokeDash("row:N", legend=None))
    points = base.mark_point(size=60).encode(fill=alt.condition("datum.set", alt.Color("row:N"), alt.value("white")))
    # "pad": the plot keeps its size and the legend is added around it (Streamlit otherwise fits both into it)
    return alt.layer(lines, points).properties(width=max(320, 60 * len(groups)), height=180,
                                               autosize=alt.AutoSizeParams(type="pad"))
