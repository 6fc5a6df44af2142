"""The dashboard's workspace: its folders, the first-run demo models, saved plans and the Mixer table.

The workspace (``security.workspace_dir()``) holds ``models/`` (the demo family is written to
``models/demo`` on first start), ``plans/`` (Mixer presets, one JSON plan per name), ``merges/``
(merge outputs), ``loras/`` (LoRAs extracted by the Mixer) and ``previews/`` (the Preview page's images of
models that are not merges). Model files are shown in the dashboard by
a label — their path relative to the root they lie in — and every label a browser sends back is turned
into a path through :class:`ModelChoices`, which re-checks it with ``security.resolve_model_path``, so a
page can only name files inside the allowed roots.

The Mixer edits a table of rows (``enabled``, ``model``, ``delta_from``, ``alpha``, ``repeat``,
``block_alphas`` as text ``"in=1, out=0"``, ``info``) with labels for files; :func:`plan_from_table`
builds the validated :class:`~ortho_mecha.plan.Plan` from it and :func:`table_from_plan` goes back. When the
base is a full checkpoint, the Mixer's choices for its text encoders and VAE travel with them
(:func:`ortho_mecha.components.from_table` / ``to_table``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ortho_mecha import security
from ortho_mecha.errors import OrthoMechaError, shown_path
from ortho_mecha.optimize import LORA_INFO  # a kohya LoRA row's mark in the info column, as the optimizer writes it

logger = logging.getLogger(__name__)

DEMO_FOLDER = "demo"
BASE_LABEL = "(base)"  # the delta-from choice meaning "the plan's base"
PRESET_SUFFIX = ".json"
MAX_PRESET_NAME = 80
TABLE_COLUMNS = ("enabled", "model", "delta_from", "alpha", "repeat", "block_alphas", "info")
LORA_RANK = 32  # the Mixer's default rank for "Extract LoRA"
MAX_CHANGES_SAID = 8  # mix_changes names this many changes, then counts the rest

_PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_ -]*")


def models_dir(workspace: Path | None = None) -> Path:
    return (workspace or security.workspace_dir()) / "models"


def plans_dir(workspace: Path | None = None) -> Path:
    return (workspace or security.workspace_dir()) / "plans"


def merges_dir(workspace: Path | None = None) -> Path:
    return (workspace or security.workspace_dir()) / "merges"


def previews_dir(workspace: Path | None = None) -> Path:
    return (workspace or security.workspace_dir()) / "previews"


def loras_dir(workspace: Path | None = None) -> Path:
    return (workspace or security.workspace_dir()) / "loras"


def ensure_demo(workspace: Path | None = None) -> dict[str, Path]:
    """Write the demo family into ``models/demo`` the first time (the folder's existence marks it done).

    Returns {member name: path} of the demo files present, empty when the user removed the folder's files,
    and empty (nothing written) when the folder lies outside the allowed roots (``ORTHO_MECHA_ROOTS`` names
    other folders): the dashboard then offers, and analyses, only the user's models.
    """
    folder = models_dir(workspace) / DEMO_FOLDER
    if not any(folder.absolute().is_relative_to(root) for root in security.allowed_roots()):
        return {}
    if not folder.exists():
        from ortho_mecha.demo import write_family  # imports torch: only on the first start

        logger.info("first start: writing the demo models into %s", folder)
        return write_family(folder)
    return {path.stem: path for path in sorted(folder.glob("*.safetensors"))}


# --- model labels ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoices:
    """The model files under the allowed roots, each with a short label for select boxes."""

    roots: tuple[Path, ...]
    by_label: Mapping[str, Path]
    unnamed: tuple[str, ...] = ()  # files left out: their names are not valid UTF-8 (shown with U+FFFD)
    outside: tuple[Path, ...] = ()  # links under the roots to files or folders outside them: left out

    @classmethod
    def scan(cls, roots: Iterable[Path] | None = None) -> ModelChoices:
        """The model files under ``roots`` (default: the allowed roots). A file whose name is not valid UTF-8
        (a Latin-1 name from an old archive, say) cannot be shown in a browser nor sent back from it: it is
        left out and listed in ``unnamed``, its undecodable bytes shown as U+FFFD."""
        roots = tuple(security.allowed_roots() if roots is None else roots)
        named: list[Path] = []
        unnamed: list[str] = []
        models, outside = security.scan_models(roots)
        for path in models:
            if security.utf8_name(path):
                named.append(path)
            else:
                unnamed.append(shown_path(path))
        return cls(roots, _labels(named, roots), tuple(unnamed), tuple(outside))

    @property
    def labels(self) -> list[str]:
        return list(self.by_label)

    def path(self, label: str) -> Path:
        """The real path of a labelled file, re-checked against the roots (a label is text a browser sent)."""
        if label not in self.by_label:
            raise OrthoMechaError(
                f"{label!r} is not one of the model files under the allowed folders "
                f"({', '.join(str(r) for r in self.roots)}); pick one from the list"
            )
        return security.resolve_model_path(self.by_label[label], self.roots)

    def with_folder(self, folder: Path) -> ModelChoices:
        """These choices with ``folder``'s files too (the dashboard's own merges): themselves when ``folder`` lies
        under one of the roots already, else a scan of the roots and ``folder``."""
        if any(folder.absolute().is_relative_to(root.absolute()) for root in self.roots):
            return self
        return ModelChoices.scan((*self.roots, folder))

    def holds(self, *paths: str | Path) -> bool:
        """Whether every one of ``paths`` is a model file under the roots (a job's files, say)."""
        try:
            for path in paths:
                self.label(path)
        except OrthoMechaError:
            return False
        return True

    def default_base(self) -> str | None:
        """The label a base picker starts on: the first whose file name says "base", else the first."""
        named = [label for label in self.labels if "base" in Path(label).stem.lower()]
        return (named or self.labels or [None])[0]

    def label(self, path: str | Path) -> str:
        """The label of a file (compared by real path); an error when it is not under the roots."""
        real = security.resolve_model_path(path, self.roots)
        for label, candidate in self.by_label.items():
            if candidate.resolve() == real:
                return label
        raise OrthoMechaError("is not among the model files under the allowed folders; rescan or move it", path)


def unreadable(paths: Iterable[Path]) -> dict[Path, str]:
    """The files among ``paths`` whose safetensors header cannot be read or does not fit the file (truncated,
    corrupt, another format), each with the error naming it; reads only the headers."""
    from ortho_mecha.io import parse_header  # imports torch: only when a page checks files

    problems: dict[Path, str] = {}
    for path in paths:
        try:
            parse_header(Path(path))
        except OrthoMechaError as error:
            problems[Path(path)] = str(error)
    return problems


def changed_files(fingerprints: Mapping[str, str], seen: dict[str, tuple[list, str]]) -> list[str]:
    """The files of ``fingerprints`` (path → fingerprint when an analysis read them) that are not the same now:
    changed, replaced, gone or unreadable. ``seen`` (kept by the caller, e.g. per session) remembers the size, mtime
    and inode of each model's files with its fingerprint then, so a model is hashed again only when those move."""
    from ortho_mecha.io import fingerprint_now, model_files  # imports torch: only when a page checks files

    changed = []
    for path, then in fingerprints.items():
        try:
            stamp = [(s.st_size, s.st_mtime_ns, s.st_ino) for s in (f.stat() for f in model_files(Path(path)))]
        except (OSError, OrthoMechaError):  # gone, or no longer a model file
            changed.append(path)
            continue
        if path not in seen or seen[path][0] != stamp:
            seen[path] = (stamp, fingerprint_now(path))
        if seen[path][1] != then:
            changed.append(path)
    return changed


def analysis_params(choices: ModelChoices, base: str, models: Sequence[str],
                    delta_from: Mapping[str, str]) -> dict[str, Any]:
    """The ``analyse`` job's parameters for the Analyse page's picks (labels). Models whose files cannot be read
    (:func:`unreadable`) or that do not fit the base (:func:`unfitting`: another architecture) are left out, with
    their problems under ``left_out`` for the page to show beside the job. An unreadable base or delta-from, or no
    model left, is an error naming the files. Reads only headers, each once."""
    if broken := unreadable([choices.path(label) for label in {base, *delta_from.values()}]):
        raise OrthoMechaError("; ".join(broken.values()) + ": choose files that can be read")
    broken = unfitting(choices.path(base), [choices.path(m) for m in models])
    kept = [m for m in models if choices.path(m) not in broken]
    if not kept:
        raise OrthoMechaError("; ".join(broken.values()) + ": choose readable models of the base's architecture")
    return {
        "base": str(choices.path(base)),
        "models": [str(choices.path(m)) for m in kept],
        "delta_from": {str(choices.path(m)): str(choices.path(d)) for m, d in delta_from.items() if m in kept},
        "left_out": [broken[choices.path(m)] for m in models if m not in kept],
    }


def unfitting(base: Path, paths: Iterable[Path]) -> dict[Path, str]:
    """The files among ``paths`` that the analysis would refuse against ``base``: unreadable (as
    :func:`unreadable`, or a format the analysis refuses) or sharing under half its keys (another architecture),
    each with the error naming it; reads only the headers."""
    from ortho_mecha.io import Model  # imports torch: only when a page checks files
    from ortho_mecha.validate import align

    base_model = Model(base)
    problems: dict[Path, str] = {}
    for path in paths:
        try:
            align(base_model, [Model(path)])
        except OrthoMechaError as error:
            problems[Path(path)] = str(error)
    return problems


def _labels(paths: Sequence[Path], roots: Sequence[Path]) -> dict[str, Path]:
    """Label each path by its path inside the first root holding it, prefixed by the root's name on a clash."""
    relative: list[tuple[str, Path, Path]] = []
    for path in paths:
        root = next((r for r in roots if path.absolute().is_relative_to(r.absolute())), None)
        relative.append((path.name if root is None else path.absolute().relative_to(root.absolute()).as_posix(),
                         path, root or path.parent))
    counts: dict[str, int] = {}
    for text, _, _ in relative:
        counts[text] = counts.get(text, 0) + 1
    return {text if counts[text] == 1 else f"{root.name}/{text}": path for text, path, root in relative}


# --- the Mixer table <-> a plan --------------------------------------------------------------------


def table_rows_from_report(report: Mapping[str, Any], choices: ModelChoices) -> list[dict[str, Any]]:
    """Mixer rows for an analysis report: every model enabled, its analysed delta-from, alpha 1, repeat 1."""
    rows = []
    lora = report.get("lora") or [False] * len(report["models"])  # reports before LoRA rows have no such field
    for model, delta_from, is_lora in zip(report["models"], report["delta_from"], lora, strict=True):
        rows.append({
            "enabled": True,
            "model": choices.label(model),
            "delta_from": BASE_LABEL if delta_from is None else choices.label(delta_from),
            "alpha": 1.0,
            "repeat": 1,
            "block_alphas": "",
            "info": LORA_INFO if is_lora else "",
        })
    return rows


def table_frame(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The Mixer's rows as the editable table: every :data:`TABLE_COLUMNS` column, the text columns as text
    (rows from older state or presets may lack ``block_alphas``)."""
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(TABLE_COLUMNS))
    for column in ("block_alphas", "info"):
        frame[column] = pd.Series([value if isinstance(value, str) else "" for value in frame[column]],
                                  index=frame.index, dtype="string")  # text even with no row at all
    return frame


def lora_labels(rows: Sequence[Mapping[str, Any]], choices: ModelChoices) -> list[str]:
    """The models of ``rows`` that are kohya LoRA files (read from their headers), in row order, once each."""
    from ortho_mecha.lora_rows import is_lora_file

    labels = dict.fromkeys(str(row["model"]) for row in rows if row.get("model"))
    return [label for label in labels if is_lora_file(choices.path(label))]


def _mark_lora(rows: list[dict[str, Any]], choices: ModelChoices) -> list[dict[str, Any]]:
    """Mark every LoRA row in its info column (``LoRA: …``) unless its info already says so."""
    lora = set(lora_labels(rows, choices))
    for row in rows:
        info = str(row.get("info") or "")
        if row.get("model") in lora and "LoRA" not in info:
            row["info"] = f"{LORA_INFO}; {info}" if info else LORA_INFO
    return rows


def plan_from_table(
    base: str,
    rows: Sequence[Mapping[str, Any]],
    method: str,
    options: Mapping[str, Any],
    texture: Mapping[str, Any] | None,
    choices: ModelChoices,
    components: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """The validated plan of the Mixer's state; ``base``, row models, delta-froms and texture are labels;
    ``components`` is the text-encoder / VAE state of :func:`ortho_mecha.components.from_table`."""
    from ortho_mecha import components as components_mod
    from ortho_mecha.blocks import parse_cell
    from ortho_mecha.plan import Plan, Row, Texture

    plan_rows = []
    for number, row in enumerate(rows, start=1):
        if not row.get("model"):
            raise OrthoMechaError(f"row {number} has no model; pick one or remove the row")
        delta_from = row.get("delta_from") or BASE_LABEL
        plan_rows.append(
            Row(
                model=choices.path(row["model"]),
                delta_from=None if delta_from == BASE_LABEL else choices.path(delta_from),
                alpha=_number(row.get("alpha"), 1.0),
                repeat=int(_number(row.get("repeat"), 1)),
                enabled=bool(row.get("enabled", True)),
                info=str(row.get("info") or ""),
                block_alphas=parse_cell(row.get("block_alphas"), f"row {number} block alphas"),
            )
        )
    plan_texture = None
    if texture is not None and texture.get("model"):
        plan_texture = Texture(choices.path(texture["model"]), float(texture.get("alpha", 0.2)),
                               str(texture.get("mode", "add")))
    from ortho_mecha.plan import default_output_dtype

    base_path = choices.path(base)
    plan = Plan(base=base_path, method=method, rows=tuple(plan_rows), options=dict(options), texture=plan_texture,
                output_dtype=default_output_dtype(base_path), components=components_mod.from_table(components, choices))
    if broken := unreadable(plan.input_files()):  # what merge would fail on, said now (the headers only)
        raise OrthoMechaError("; ".join(broken.values()) + ": remove or disable that row, or choose another file")
    return plan


def table_from_plan(plan: Any, choices: ModelChoices) -> dict[str, Any]:
    """The Mixer's state for a plan: base label, rows, method, options, texture and components."""
    from ortho_mecha import components
    from ortho_mecha.blocks import format_cell

    rows = [
        {
            "enabled": row.enabled,
            "model": choices.label(row.model),
            "delta_from": BASE_LABEL if row.delta_from is None else choices.label(row.delta_from),
            "alpha": float(row.alpha),
            "repeat": int(row.repeat),
            "block_alphas": format_cell(row.block_alphas),
            "info": row.info,
        }
        for row in plan.rows
    ]
    rows = _mark_lora(rows, choices)
    texture = None
    if plan.texture is not None:
        texture = {"model": choices.label(plan.texture.model), "alpha": plan.texture.alpha, "mode": plan.texture.mode}
    return {"base": choices.label(plan.base), "rows": rows, "method": plan.method, "options": dict(plan.options),
            "texture": texture, "components": components.to_table(plan.components, choices)}


def optimized_mix(report: Mapping[str, Any], method: str, mix: Mapping[str, Any], choices: ModelChoices,
                  search: bool = True) -> dict:
    """The Mixer's state with the optimizer's rows for ``report`` (:func:`ortho_mecha.optimize.plan_from_report`;
    without ``search``, the auto-fill's).

    Base and rows come from the proposal (each row's reason in ``info``); the method, its options, the
    texture, the components and each model's block alphas stay as ``mix`` has them (they were dropped without a
    word). Deterministic: the same report gives the same rows.
    """
    from ortho_mecha.optimize import plan_from_report
    from ortho_mecha.plan import plan_from_dict

    proposed = plan_from_dict(plan_from_report(report, method, search=search), Path(report["base"]).parent)
    table = table_from_plan(proposed, choices)
    kept = {row.get("model"): row["block_alphas"] for row in mix.get("rows") or () if row.get("block_alphas")}
    for row in table["rows"]:
        row["block_alphas"] = kept.get(row["model"], row["block_alphas"])
    return {**table, "method": method, "options": dict(mix["options"]), "texture": mix["texture"],
            "components": dict(mix.get("components") or {})}


def mix_changes(before: Mapping[str, Any], after: Mapping[str, Any], what: str) -> str:
    """One line saying what ``what`` (Auto-fill, Optimize rows) changed from the Mixer state ``before`` to ``after``:
    the base, and per model the rows it turned on or off, their delta-from, alpha and repeat; rows added or
    dropped. Without a change it says so, as the table alone would not show that the button did anything."""
    changes = [f"base {before.get('base')} → {after.get('base')}"] if before.get("base") != after.get("base") else []
    old = _rows_by_model(before.get("rows") or ())
    new = _rows_by_model(after.get("rows") or ())
    for model, row in new.items():
        if model not in old:
            changes.append(f"{model[0]}: added{'' if row.get('enabled', True) else ' (off)'}")
            continue
        was = old[model]
        parts = []
        if bool(was.get("enabled", True)) != bool(row.get("enabled", True)):
            parts.append("on" if row.get("enabled", True) else "off")
        source, target = (r.get("delta_from") or BASE_LABEL for r in (was, row))
        if source != target:
            parts.append(f"delta-from {source} → {target}")
        for column in ("alpha", "repeat"):
            old_value, new_value = (_number(r.get(column), 1.0) for r in (was, row))
            if old_value != new_value:
                parts.append(f"{column} {old_value:g} → {new_value:g}")
        if parts:
            changes.append(f"{model[0]}: {', '.join(parts)}")
    changes += [f"{model[0]}: dropped" for model in old if model not in new]
    if not changes:
        return f"{what}: no change, the rows already are what it proposes."
    shown = changes if len(changes) <= MAX_CHANGES_SAID else [*changes[:MAX_CHANGES_SAID - 1],
                                                               f"and {len(changes) - MAX_CHANGES_SAID + 1} more"]
    return f"{what} changed {len(changes)} thing{'s' if len(changes) > 1 else ''}: {'; '.join(shown)}."


def _rows_by_model(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    """The rows keyed by (model, how many rows of that model came before): a model listed twice is two rows."""
    seen: dict[str, int] = {}
    keyed = {}
    for row in rows:
        model = str(row.get("model"))
        keyed[model, seen.get(model, 0)] = row
        seen[model] = seen.get(model, 0) + 1
    return keyed


def _number(value: Any, default: float) -> float:
    """A table cell as a number: an empty cell (None / NaN) takes ``default``."""
    if value is None or (isinstance(value, float) and value != value):
        return default
    return float(value)


# --- presets -----------------------------------------------------------------------------------------


def validate_preset_name(name: str, what: str = "preset", example: str = "my-mix") -> str:
    """A name for a saved ``what`` (a preset, a sweep): letters, digits, ``_ -`` and spaces, starting with a
    letter or digit (it becomes a file or folder name)."""
    name = name.strip()
    if not name:
        raise OrthoMechaError(f"the {what} needs a name, e.g. {example}")
    if len(name) > MAX_PRESET_NAME:
        raise OrthoMechaError(f"{what} name {name!r} is {len(name)} characters long; use at most {MAX_PRESET_NAME}")
    if not _PRESET_NAME.fullmatch(name):
        raise OrthoMechaError(
            f"{what} name {name!r} may only use letters A-Z a-z, digits, '_', '-' and spaces, "
            "starting with a letter or a digit"
        )
    return name


def list_presets(workspace: Path | None = None) -> list[str]:
    folder = plans_dir(workspace)
    return sorted(p.stem for p in folder.glob(f"*{PRESET_SUFFIX}")) if folder.is_dir() else []


def save_preset(name: str, plan: Any, overwrite: bool = False, workspace: Path | None = None) -> Path:
    """Save ``plan`` as ``plans/<name>.json`` (paths inside the workspace written relative to it)."""
    from ortho_mecha.plan import save_plan

    path = plans_dir(workspace) / f"{validate_preset_name(name)}{PRESET_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise OrthoMechaError(f"a preset named {name!r} exists; choose another name or tick 'Replace a preset of "
                              "that name'")
    return save_plan(plan, path, overwrite=overwrite)


def load_preset(name: str, choices: ModelChoices, workspace: Path | None = None) -> Any:
    """Load the preset ``name``; every file it names must lie inside the allowed roots."""
    from ortho_mecha.plan import load_plan

    path = plans_dir(workspace) / f"{validate_preset_name(name)}{PRESET_SUFFIX}"
    if not path.is_file():
        saved = ", ".join(list_presets(workspace)) or "none"
        raise OrthoMechaError(f"no preset named {name!r}; saved presets: {saved}")
    return _inside_roots(load_plan(path), choices)


def _inside_roots(plan: Any, choices: ModelChoices) -> Any:
    """``plan``, once every file it names is checked to lie inside the allowed roots."""
    for file in plan.input_files():
        security.resolve_model_path(file, choices.roots)
    return plan


# --- the Mixer's plan across reloads: kept in the cache under its content's hash, named in the URL ----------

MIX_DAYS = 30  # how long a Mixer plan is kept after it was last shown
_MIX_ID = re.compile(r"[0-9a-f]{32}")


def remember_mix(plan: Any) -> str:
    """Keep ``plan`` in the ``mixes`` cache; its id (32 hex digits of its JSON's SHA-256) for the URL."""
    import hashlib

    from ortho_mecha.cache import open_cache

    text = plan.to_json()
    mix_id = hashlib.sha256(text.encode()).hexdigest()[:32]
    with open_cache("mixes") as cache:
        if not cache.touch(mix_id, expire=MIX_DAYS * 86400):
            cache.set(mix_id, text, expire=MIX_DAYS * 86400)
    return mix_id


def recall_mix(mix_id: str, choices: ModelChoices) -> Any:
    """The plan :func:`remember_mix` kept under ``mix_id``; its files must still lie inside the allowed roots."""
    import json

    from ortho_mecha.cache import open_cache
    from ortho_mecha.plan import plan_from_dict

    if not _MIX_ID.fullmatch(mix_id):
        raise OrthoMechaError(f"{mix_id!r} is not a Mixer plan id (32 hexadecimal digits); the Mixer starts afresh")
    with open_cache("mixes") as cache:
        text = cache.get(mix_id)
    if text is None:
        raise OrthoMechaError(f"no Mixer plan {mix_id} is kept (not shown for {MIX_DAYS} days, or the cache was "
                              "cleared); the Mixer starts afresh")
    return _inside_roots(plan_from_dict(json.loads(text), security.workspace_dir()), choices)



# --- figures of the Mixer's rows, from the cached analysis ------------------------------------------


@dataclass(frozen=True)
class RowGram:
    """The delta Grams of the Mixer's enabled rows (their delta-froms as chosen), from an analysis's H."""

    labels: list[str]  # the rows' models, in table order
    key_grams: Any  # np.ndarray (keys, rows, rows): each key's delta Gram
    alphas: list[float]
    repeats: list[int]
    missing: list[str]  # enabled rows left out: their model or delta-from was not analysed
    keys: list[str] = field(default_factory=list)  # the canonical keys of ``key_grams``
    block_alphas: list[dict[str, float]] = field(default_factory=list)
    layout: Any = None  # blocks.BlockLayout of the base when a row has block alphas, else None
    floors: Any = 0.0  # per key: ortho_superpose's rounding-noise floor (Analysis.noise_floors)
    rotation_shares: Any = 1.0  # per key: what orthomerge's rotation carries (Analysis.rotation_shares)

    @property
    def gram(self) -> Any:
        return self.key_grams.sum(axis=0)

    def key_alphas(self) -> Any:
        """(keys, rows) alphas: each row's block alpha on the keys of its listed groups (None without any)."""
        from ortho_mecha.blocks import key_alphas

        return None if self.layout is None else key_alphas(self.keys, self.layout, self.alphas, self.block_alphas)


def row_gram(analysis: Any, rows: Sequence[Mapping[str, Any]], choices: ModelChoices) -> RowGram:
    """The enabled rows' Grams from ``analysis`` (no file read); rows naming files it did not read are listed."""
    import numpy as np

    from ortho_mecha import blocks
    from ortho_mecha.gram import delta_gram

    index = {Path(f).resolve(): i for i, f in enumerate(analysis.files)}
    labels, models, froms, alphas, repeats, missing, listed = [], [], [], [], [], [], []
    for row in rows:
        if not row.get("enabled") or not row.get("model"):
            continue
        model = index.get(choices.path(row["model"]))
        delta_from = row.get("delta_from") or BASE_LABEL
        other = None if delta_from == BASE_LABEL else index.get(choices.path(delta_from))
        if model is None or (delta_from != BASE_LABEL and other is None):
            missing.append(row["model"])
            continue
        labels.append(row["model"])
        models.append(model)
        froms.append(other)
        alphas.append(_number(row.get("alpha"), 1.0))
        repeats.append(int(_number(row.get("repeat"), 1)))
        listed.append(blocks.parse_cell(row.get("block_alphas"), f"{row['model']} block alphas"))
    n = len(models)
    grams = [delta_gram(h, models, froms) for h in analysis.h_key.values()] if n else []
    layout = blocks.base_layout(analysis.base) if any(listed) else None
    return RowGram(labels, np.stack(grams) if grams else np.zeros((0, n, n)), alphas, repeats, missing,
                   list(analysis.h_key), listed, layout, analysis.noise_floors, analysis.rotation_shares)


def mix_predictions(rows: RowGram, method: str, options: Mapping[str, Any], texture: bool = False) -> tuple[Any, Any]:
    """(survival table, interference matrix) of the rows under ``method``: the predicted survival (and the
    plain-average survival, for comparison) and the weighted pairwise interference (``metrics.interference``).
    With a ``texture`` boost in the plan the survival is labelled as before it, as the Merge page labels it."""
    import numpy as np
    import pandas as pd

    from ortho_mecha import metrics
    from ortho_mecha.compare import row_weights

    repeats = np.asarray(rows.repeats)
    per_key = rows.key_alphas()
    weights, listed = row_weights(method, np.asarray(rows.alphas) if per_key is None else per_key, repeats)
    predicted = metrics.predicted_survival(rows.key_grams, method, weights, options, listed, rows.floors,
                                           rows.rotation_shares)
    survival = pd.DataFrame({
        "model": rows.labels,
        "alpha": rows.alphas,
        "repeat": rows.repeats,
        f"survival ({metrics.survival_label(method, options)}{', before the texture boost' if texture else ''})":
            predicted,
        "survival (plain average)": metrics.survival_plain(rows.gram),
    })
    if per_key is None:
        return survival, metrics.interference(rows.gram, np.asarray(rows.alphas) * repeats)
    scaled = per_key * repeats  # per key: the Gram of the rows' deltas as weighted there, summed over the keys
    weighted = np.einsum("kij,ki,kj->ij", rows.key_grams, scaled, scaled)
    return survival, metrics.interference(weighted, np.ones(len(rows.labels)))


LOST_SURVIVAL = 0.01  # a row whose predicted survival is below this carries (almost) nothing into the merge


def lost_rows(survival: Any) -> list[tuple[str, float, float]]:
    """(model, predicted survival, alpha) of the rows of :func:`mix_predictions`' survival table that the merge
    would carry almost nothing of, or the opposite of: at alpha 0, or cancelled by an opposite row."""
    predicted = next(column for column in survival.columns if column.startswith("survival (") and "plain" not in column)
    return [(model, float(value), float(alpha))
            for model, value, alpha in zip(survival["model"], survival[predicted], survival["alpha"], strict=True)
            if value < LOST_SURVIVAL]


def survival_frame(survival: Mapping[str, Any]) -> Any:
    """The merge job's ``survival`` (rows, predicted, measured, label) as a table: one line per enabled row."""
    import pandas as pd

    predicted, measured = survival["predicted"], survival["measured"]
    return pd.DataFrame({
        "model": [Path(row).name for row in survival["rows"]],
        f"predicted ({survival['label']})": predicted,
        "measured": measured,
        "measured − predicted": [m - p for p, m in zip(predicted, measured, strict=True)],
    })


def free_output_name(folder: Path, stem: str = "merged") -> str:
    """``<stem>.safetensors``, or ``<stem>-2.safetensors``, ``-3`` … : the first name no file in ``folder`` has."""
    number = 1
    while True:
        name = f"{stem}{'' if number == 1 else f'-{number}'}.safetensors"
        if not (folder / name).exists():
            return name
        number += 1


def merge_job_params(plan: Any, output_name: str, overwrite: bool = False, workspace: Path | None = None) -> dict:
    """The ``merge`` job's parameters for ``plan`` into ``merges/<output_name>``: the plan itself travels with the
    job, which writes it beside the output (``<name>.plan.json``) once the merge is written, so a plan beside a
    merge always describes that file (a cancelled or failed replacement leaves the old pair as it was).

    The name is checked with ``security.validate_output_name``; an existing output is refused unless
    ``overwrite``.
    """
    name = security.validate_output_name(output_name)
    folder = merges_dir(workspace)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    if out.exists() and not overwrite:
        raise OrthoMechaError("already exists; choose another output name or allow replacing it", out)
    return {"plan_data": plan.to_dict(), "out": str(out), "overwrite": overwrite,
            "plan_beside": str(folder / f"{Path(name).stem}.plan.json")}


def lora_job_params(model: str, base: str, rank: int, output_name: str, choices: ModelChoices,
                    workspace: Path | None = None) -> dict:
    """The ``extract-lora`` job's parameters: ``model`` − ``base`` (labels, re-checked against the roots) at
    ``rank`` into ``loras/<output_name>``; the name is checked with ``security.validate_output_name`` and an
    existing file is refused (the job never overwrites)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise OrthoMechaError(f"the LoRA rank must be a whole number ≥ 1, got {rank!r}")
    model_path, base_path = choices.path(model), choices.path(base)
    if model_path == base_path:
        raise OrthoMechaError(f"{model!r} is the base itself: choose the merged model to extract and its base")
    from ortho_mecha.lora_rows import is_lora_file

    for label, path in ((model, model_path), (base, base_path)):
        if is_lora_file(path):  # said before a job starts (the job refused it once running)
            raise OrthoMechaError(f"{label!r} is a kohya LoRA, not a full model: extract-lora takes the merged model "
                                  "and its base")
    folder = loras_dir(workspace)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / security.validate_output_name(output_name)
    if out.exists():
        raise OrthoMechaError("already exists; choose another output name", out)
    return {"model": str(model_path), "base": str(base_path), "rank": rank, "out": str(out)}


def lora_key_frame(result: Mapping[str, Any]) -> Any:
    """The ``extract-lora`` job's per-key results as a table: key, shape, written rank, kept energy, tail error."""
    import pandas as pd

    return pd.DataFrame(
        [{"key": k["key"], "shape": " × ".join(map(str, k["shape"])), "rank": k["rank"],
          "energy kept": k["energy_kept"], "delta norm": k["delta_norm"], "error": k["error"]}
         for k in result["keys"]],
        columns=["key", "shape", "rank", "energy kept", "delta norm", "error"],
    )


# --- per-block alphas in the Mixer ----------------------------------------------------------------------


def with_block_alphas(mix: Mapping[str, Any], index: int, block_alphas: Mapping[str, float]) -> dict[str, Any]:
    """The Mixer's state with row ``index``'s block alphas replaced (kept as the table's text form)."""
    from ortho_mecha.blocks import format_cell

    rows = [dict(row) for row in mix["rows"]]
    rows[index]["block_alphas"] = format_cell({g: float(v) for g, v in block_alphas.items()})
    return {**mix, "rows": rows}


def with_block_preset(mix: Mapping[str, Any], index: int, preset: str, layout: Any) -> dict[str, Any]:
    """The Mixer's state with row ``index``'s block alphas set by ``preset`` (``blocks.preset_alphas`` of its alpha)."""
    from ortho_mecha.blocks import preset_alphas

    alpha = _number(mix["rows"][index].get("alpha"), 1.0)
    return with_block_alphas(mix, index, preset_alphas(preset, layout, alpha))


def block_alpha_frame(rows: Sequence[Mapping[str, Any]], layout: Any) -> Any:
    """Each enabled row's alpha per block group of ``layout`` (a long table for ``blocks.alpha_chart``); rows are
    labelled by their number and model file's stem."""
    from ortho_mecha import blocks

    numbered = [(n, row) for n, row in enumerate(rows, start=1) if row.get("enabled") and row.get("model")]
    return blocks.alpha_frame(
        [f"{n}: {Path(row['model']).stem}" for n, row in numbered],
        [_number(row.get("alpha"), 1.0) for _, row in numbered],
        [blocks.parse_cell(row.get("block_alphas"), f"row {n} block alphas") for n, row in numbered],
        layout,
    )
