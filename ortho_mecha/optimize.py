"""From analysis figures to a proposed mix: auto-fill, the optimizer and a plan from a report (DESIGN §4, §6).

Everything works on the file Gram H (no file is read): a row's delta against any delta-from comes from
:func:`ortho_mecha.gram.delta_gram`. Both proposals share their rules:

1. near-duplicates first (:func:`ortho_mecha.lineage.duplicates`): the lower-quality copy is disabled and
   never becomes a delta-from; a null delta (no change from the base) is disabled;
2. each row starts from its parent (:func:`ortho_mecha.lineage.parent`) as delta-from;
3. (optimizer only) a local search over the delta-froms, ≤ 50 rounds: for each row, every other allowed
   delta-from is tried and the one that raises the orthogonality of the enabled rows (mean over pairs of
   ``1 − cos²``) the most is kept; then delta-from cycles (A ← B ← A) are broken by resetting the weakest
   link (the largest ``D_AB / D_AC``) to the base;
4. rows visited in descending quality: a row with cos > 0.8 to an already kept row is disabled (alpha 0); then
   a row the lineage finds to be a merge of kept rows (all from the base) is disabled: it adds no direction;
5. a kept row with new information ``1 − cos² > 0.85`` against every other kept row gets repeat 2.

Every row carries a one-line reason. Results are deterministic: ties go to the lower file index.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import short_names
from ortho_mecha.gram import cosine, delta_gram, selection_matrix, squared_distances
from ortho_mecha.lineage import (
    DUPLICATE_RATIO,
    lineage,
    other_lineage,
    other_lineage_note,
    parent,
)
from ortho_mecha.metrics import quality, survival_plain

LORA_INFO = "LoRA: its product is its delta, from the base"  # a kohya LoRA row's reason / info mark

logger = logging.getLogger(__name__)

REDUNDANT_COS = 0.8  # cos above this to an already kept row: disabled
REPEAT_NEW_INFO = 0.85  # new information above this against every other kept row: repeat 2
OPPOSED_COS = -0.8  # cos below this to a kept row: flagged (the two deltas largely cancel)
MAX_ROUNDS = 50
# A file B is a delta-from candidate of model M only where M's delta from it does not point against B's own
# delta: cos(δ_M − δ_B, δ_B) ≥ this. A child of B (B plus its own change) sits at ≈ 0; an unrelated file, or
# one ingredient of a merge, far below (the row would cancel B's change, which another row may carry).
ANCESTOR_COS = -0.05
SAME_DIRECTION_COS = 0.99  # a file this parallel to a merge's ingredient (a scaled copy) counts as that ingredient
INCOMPLETE_PENALTY = 0.05  # off the quality score of a model whose file lacks base keys (a grade step is 0.15)
GAIN_TOLERANCE = 1e-12  # an orthogonality gain must exceed this (per pair) to count as a rise


@dataclass(frozen=True)
class RowChoice:
    """One proposed mixer row for model i: delta-from (file index, None for the base), alpha, repeat, enabled
    and the reason, one line."""

    delta_from: int | None
    alpha: float
    repeat: int
    enabled: bool
    info: str


@dataclass(frozen=True)
class _Family:
    h: np.ndarray
    n: int
    quality: np.ndarray
    null: np.ndarray
    names: list[str]
    dups: dict[int, int]
    d: np.ndarray
    lora: np.ndarray  # per model: a kohya LoRA row (delta from the base only, never a delta-from)
    merges_of: dict[int, set[int]]  # per file: the models the lineage finds to be merges made from it (or a copy)
    mixes: dict[int, dict[int, float]]  # per model the lineage finds to be a merge: its ingredients (file → weight)
    parallel: np.ndarray  # files × files: deltas within SAME_DIRECTION_COS of each other (scaled copies)

    @property
    def active(self) -> list[int]:
        """Models that take part: not null, not a duplicate."""
        return [i for i in range(self.n) if not self.null[i] and i not in self.dups]

    def allowed_from(self, i: int) -> list[int | None]:
        """Delta-froms allowed for model i: the base, then every other file B that is not a duplicate, not a null
        model, not a LoRA, not a merge the lineage finds was made from i (a 50/50 merge of i and j looks like i's
        parent in the Gram: i's delta from it would be half of i minus half of j), that i's delta contains (i's
        delta from B does not point against B's: see ``ANCESTOR_COS``; an unrelated file would add its own delta,
        negated, to i's row), and not so close to i that ``D_iB < 0.01 · D_iC`` (that would leave a near-null
        delta). A LoRA row's only delta-from is the base."""
        if self.lora[i]:
            return [None]
        files = [
            f
            for f in range(len(self.h))
            if f != i
            and f not in self.dups
            and f not in self.merges_of.get(i, set())
            and not (f < self.n and (self.null[f] or self.lora[f]))
            and self.d[i, f] >= DUPLICATE_RATIO * self.h[i, i]
            and self.h[i, f] - self.h[f, f] >= ANCESTOR_COS * np.sqrt(self.d[i, f] * self.h[f, f])
        ]
        return [None, *files]

    def start(self, i: int) -> int | None:
        """Model i's parent as the lineage finds it: the parent rule, leaving out merges made from i (a merge of
        i sits nearer the base than i and can be as near to i as its real parent)."""
        return parent(self.h, i, [f for f in self.allowed_from(i) if f is not None])

    def name(self, f: int | None) -> str:
        return "the base" if f is None else self.names[f]


def _family(
    h: np.ndarray, n_models: int, quality: Sequence[float], null: Sequence[bool], names: Sequence[str] | None,
    lora: Sequence[bool] | None = None,
) -> _Family:
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] < n_models:
        raise ValueError(f"H must be square with at least {n_models} files, got shape {h.shape}")
    if len(quality) != n_models or len(null) != n_models:
        raise ValueError(f"{len(quality)} quality scores and {len(null)} null flags for {n_models} models")
    labels = [f"file {f}" for f in range(len(h))] if names is None else list(names)
    if len(labels) != len(h):
        raise ValueError(f"{len(labels)} names for {len(h)} files")
    q = np.asarray(quality, dtype=np.float64)
    lora_rows = np.zeros(n_models, dtype=bool) if lora is None else np.asarray(lora, dtype=bool)
    if len(lora_rows) != n_models:
        raise ValueError(f"{len(lora_rows)} LoRA flags for {n_models} models")
    found = lineage(h, n_models, q)  # its duplicates are duplicates(h, q)
    dups = {i: item["duplicate_of"] for i, item in enumerate(found) if item["duplicate_of"] is not None}
    # the lineage names one of equivalent ingredients (i, or a scaled copy of i: 0.15 × 2δ_i is 0.3 δ_i)
    parallel = cosine(h) >= SAME_DIRECTION_COS
    merges_of: dict[int, set[int]] = {}
    for m, item in enumerate(found):
        for ingredient in item["mix"] or {}:
            for f in np.nonzero(parallel[ingredient])[0]:
                merges_of.setdefault(int(f), set()).add(m)
    mixes = {m: dict(item["mix"]) for m, item in enumerate(found) if item["mix"]}
    return _Family(h, n_models, q, np.asarray(null, dtype=bool), labels, dups, squared_distances(h), lora_rows,
                   merges_of, mixes, parallel)


def orthogonality(g: np.ndarray, rows: Sequence[int]) -> float:
    """Mean over pairs of ``rows`` of ``1 − cos²`` (1 with fewer than two rows: nothing overlaps)."""
    rows = list(rows)
    if len(rows) < 2:
        return 1.0
    cos = cosine(g)[np.ix_(rows, rows)]
    iu = np.triu_indices(len(rows), 1)
    return float(np.mean(1.0 - cos[iu] ** 2))


def _search(fam: _Family, delta_from: list[int | None], max_rounds: int) -> list[int]:
    """Coordinate ascent on the orthogonality of the active rows; changes ``delta_from`` in place and returns
    the rows whose delta-from it changed. Changing row i only moves the pairs (i, j), so each candidate is
    scored by ``Σ_j (1 − cos²_ij)`` over the other active rows, all candidates of a row in one product."""
    rows = fam.active
    if len(rows) < 2:
        return []
    n_files = len(fam.h)
    t = selection_matrix(n_files, list(range(fam.n)), delta_from)
    own = np.einsum("if,fg,ig->i", t, fam.h, t)
    changed: set[int] = set()
    for _ in range(max_rounds):
        moved = False
        for i in rows:
            others = [j for j in rows if j != i]
            candidates = fam.allowed_from(i)
            tc = np.zeros((len(candidates), n_files))
            tc[:, i] = 1.0
            for k, b in enumerate(candidates):
                if b is not None:
                    tc[k, b] -= 1.0
            hc = tc @ fam.h
            cand_own = np.einsum("kf,kf->k", hc, tc)
            cross = hc @ t[others].T
            denom = np.outer(cand_own, own[others])
            cos_sq = np.where(denom > 0, cross**2 / np.where(denom > 0, denom, 1.0), 0.0)
            score = np.sum(1.0 - np.minimum(cos_sq, 1.0), axis=1)
            current = candidates.index(delta_from[i])
            best = int(np.argmax(score))
            if score[best] > score[current] + GAIN_TOLERANCE * len(others):
                delta_from[i] = candidates[best]
                t[i] = tc[best]
                own[i] = cand_own[best]
                changed.add(i)
                moved = True
        if not moved:
            break
    return sorted(changed)


def _break_cycles(fam: _Family, delta_from: list[int | None]) -> dict[int, str]:
    """Reset the weakest link of every delta-from cycle among the models to the base; returns the reasons."""
    notes: dict[int, str] = {}
    while True:
        cycle = _find_cycle(delta_from, fam.n)
        if not cycle:
            return notes
        weakest = max(cycle, key=lambda i: (fam.d[i, delta_from[i]] / max(fam.h[i, i], 1e-300), -i))
        loop = " ← ".join(fam.names[i] for i in [*cycle, cycle[0]])
        notes[weakest] = f"delta from the base: from {fam.names[delta_from[weakest]]} would close the cycle {loop}"
        delta_from[weakest] = None


def _find_cycle(delta_from: Sequence[int | None], n: int) -> list[int]:
    """The first delta-from cycle among the models (in index order of its lowest member's discovery), or []."""
    for start in range(n):
        chain = [start]
        node = delta_from[start]
        while node is not None and node < n and node not in chain:
            chain.append(node)
            node = delta_from[node]
        if node is not None and node in chain:
            return chain[chain.index(node) :]
    return []


def _rank(fam: _Family, dropped: int, kept: int) -> str:
    """Why ``dropped`` gives way to ``kept``: its lower quality score, or, on a tie, its later place in the list."""
    if fam.quality[dropped] == fam.quality[kept]:
        return "the same quality (the one listed first is kept)"
    return "lower quality"


def _finish(fam: _Family, delta_from: list[int | None], notes: Mapping[int, str]) -> list[RowChoice]:
    """Redundancy and repeat rules on G from the chosen delta-froms; a reason per row."""
    g = delta_gram(fam.h, list(range(fam.n)), delta_from)
    cos = cosine(g)
    kept: list[int] = []
    disabled: dict[int, str] = {}
    for i in range(fam.n):
        if fam.null[i]:
            disabled[i] = ("disabled: null delta (no change from the base beyond rounding noise in the analysed keys: "
                           "a checkpoint's text encoders and VAE are not among them)")
        elif i in fam.dups:
            k = fam.dups[i]
            share = math.sqrt(fam.d[i, k] / fam.h[k, k]) if fam.h[k, k] > 0 else 0.0
            how = f"differs by {100 * share:.2g} % of its delta" if share > 0 else "identical"
            disabled[i] = f"disabled: duplicate of {fam.names[k]} ({how}), {_rank(fam, i, k)}"
    for i in sorted(fam.active, key=lambda i: (-fam.quality[i], i)):
        twin = max(kept, key=lambda k: (cos[i, k], -k), default=None)
        if twin is not None and cos[i, twin] > REDUNDANT_COS:
            disabled[i] = f"disabled: cos {cos[i, twin]:.2f} with {fam.names[twin]}, {_rank(fam, i, twin)}"
        else:
            kept.append(i)
    for i, why in _merges_of_kept(fam, kept, delta_from).items():
        kept.remove(i)
        disabled[i] = why
    choices = []
    for i in range(fam.n):
        origin = _origin(fam, i, delta_from[i], notes.get(i))
        if i in disabled:
            choices.append(RowChoice(delta_from[i], 0.0, 1, False, f"{disabled[i]}; {origin}"))
            continue
        others = [j for j in kept if j != i]
        new_info = [1.0 - cos[i, j] ** 2 for j in others]
        parts = [origin]
        repeat = 1
        if others and min(new_info) > REPEAT_NEW_INFO:
            repeat = 2
            least = math.floor(min(new_info) * 100) / 100  # a bound: 0.999 reads "≥ 0.99", not "≥ 1.00"
            parts.append(f"new info ≥ {least:.2f} against every other enabled row → repeat 2")
        opposed = [j for j in others if cos[i, j] < OPPOSED_COS]
        parts += [f"opposes {fam.names[j]} (cos {cos[i, j]:.2f}): their deltas largely cancel" for j in opposed]
        choices.append(RowChoice(delta_from[i], 1.0, repeat, True, "enabled: " + "; ".join(parts)))
    return choices


def _merges_of_kept(fam: _Family, kept: list[int], delta_from: Sequence[int | None]) -> dict[int, str]:
    """The kept rows the lineage finds to be merges of other kept rows (each ingredient, or a scaled copy of it,
    kept with its delta from the base, as the merge's): such a row adds no direction its ingredients lack and
    only counts their share of it again (a 0.5/0.5 merge beside both took survival from them). With the reason."""
    from_base = [k for k in kept if delta_from[k] is None]
    found = {}
    for i in list(from_base):
        mix = fam.mixes.get(i)
        if mix and all(any(k != i and fam.parallel[f, k] for k in from_base) for f in mix):
            from_base.remove(i)  # a merge of merges is judged by what stays
            parts = " + ".join(f"{weight:.2f} {fam.names[f]}" for f, weight in mix.items())
            found[i] = f"disabled: a merge of {parts} (its lineage), which are enabled: it adds nothing they lack"
    return found


def _origin(fam: _Family, i: int, b: int | None, note: str | None) -> str:
    """Why row i takes its delta from b."""
    if note:
        return note
    if fam.lora[i]:
        return LORA_INFO
    if b is None:
        return "delta from the base"
    return f"delta from {fam.names[b]}"


def autofill(
    h: np.ndarray,
    n_models: int,
    quality: Sequence[float],
    null: Sequence[bool],
    names: Sequence[str] | None = None,
    lora: Sequence[bool] | None = None,
) -> list[RowChoice]:
    """The Mixer's auto-fill (DESIGN §4): every model's parent as delta-from, then the redundancy and repeat
    rules. ``h``: F×F file Gram (models first); ``quality``, ``null``, ``lora`` (kohya LoRA rows): per model;
    ``names``: per file."""
    fam = _family(h, n_models, quality, null, names, lora)
    delta_from: list[int | None] = [fam.start(i) if i in fam.active else None for i in range(fam.n)]
    notes = {i: f"delta from {fam.names[b]} (its parent)" for i, b in enumerate(delta_from) if b is not None}
    return _finish(fam, delta_from, notes)


def optimize(
    h: np.ndarray,
    n_models: int,
    quality: Sequence[float],
    null: Sequence[bool],
    names: Sequence[str] | None = None,
    max_rounds: int = MAX_ROUNDS,
    lora: Sequence[bool] | None = None,
) -> list[RowChoice]:
    """The optimizer (DESIGN §4): parent rule start, local search over delta-froms maximising the enabled rows'
    orthogonality (≤ ``max_rounds`` rounds), cycle elimination, then the redundancy and repeat rules. LoRA
    rows (``lora``) keep the base as delta-from and are never another row's."""
    fam = _family(h, n_models, quality, null, names, lora)
    delta_from: list[int | None] = [fam.start(i) if i in fam.active else None for i in range(fam.n)]
    notes = {i: f"delta from {fam.names[b]} (its parent)" for i, b in enumerate(delta_from) if b is not None}
    rows = fam.active
    before = orthogonality(delta_gram(fam.h, list(range(fam.n)), delta_from), rows)
    moved = _search(fam, delta_from, max_rounds)
    after = orthogonality(delta_gram(fam.h, list(range(fam.n)), delta_from), rows)
    for i in moved:
        notes[i] = (
            f"delta from {fam.name(delta_from[i])}, chosen by the optimizer "
            f"(orthogonality of the rows {before:.3f} → {after:.3f})"
        )
    notes.update(_break_cycles(fam, delta_from))
    return _finish(fam, delta_from, notes)


# -- plan from an analysis report ---------------------------------------------------------------------


def _field(report: Mapping[str, Any], path: str, fail: Any) -> Any:
    value: Any = report
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise fail(f"the report has no '{path}'; re-run `ortho-mecha analyse --json` to write a complete report")
        value = value[part]
    return value


def _checks(report: Mapping[str, Any], files: list[str]) -> dict[int, Mapping[str, Any]]:
    """file index → its check in the report's validation (whose models come in the report's file order, as the
    user named them): what ``merge`` would refuse (``merge_refusals``) and what needs a second look (``family``)."""
    checks = (report.get("validation") or {}).get("models") or []
    return {
        i: check for i, check in enumerate(checks[: len(files)])
        if isinstance(check, Mapping) and Path(str(check.get("path"))).name == Path(files[i]).name
    }


def plan_from_report(
    report: Mapping[str, Any], method: str = "ortho_superpose", source: str | Path | None = None,
    search: bool = True,
) -> dict[str, Any]:
    """A plan (DESIGN §6 JSON format) proposed by :func:`optimize` (``search``) or :func:`autofill` from an
    ``ortho-mecha analyse --json`` report. Paths are kept as the report has them; each row carries its reason in
    ``info``; options are the method's defaults. ``source`` names the report in error messages."""
    from ortho_mecha import plan as plan_mod  # imports the methods (torch); only when a plan is made

    def fail(message: str) -> OrthoMechaError:
        return OrthoMechaError(message if source else f"report: {message}", source)

    if method not in plan_mod.METHODS:
        raise fail(f"unknown method '{method}'; allowed: {', '.join(plan_mod.METHODS)}")
    models = list(_field(report, "models", fail))
    files = list(_field(report, "files", fail))
    n = len(models)
    if files[:n] != models:
        raise fail("'files' must list the models first, in 'models' order")
    h = np.asarray(_field(report, "h", fail), dtype=np.float64)
    if h.shape != (len(files), len(files)):
        raise fail(f"'h' must be {len(files)}×{len(files)} (one row per file), got shape {h.shape}")
    per_model = {
        name: list(_field(report, name, fail))
        for name in ("signal.effective_rank", "signal.snr", "outliers.max_outlier", "null", "delta_from")
    }
    for name, values in per_model.items():
        if len(values) != n:
            raise fail(f"'{name}' has {len(values)} entries for {n} models")
    analysed_from = [None if b is None else files.index(b) for b in per_model["delta_from"]]
    g = delta_gram(h, list(range(n)), analysed_from)
    null = [bool(x) for x in per_model["null"]]
    scores, _ = quality(
        per_model["signal.effective_rank"],
        per_model["signal.snr"],
        survival_plain(g, include=[not x for x in null]),
        per_model["outliers.max_outlier"],
        null,
    )
    # a null flag means "no change against the analysed delta-from"; only against the base is the model null
    null_model = [x and (b is None or h[i, i] <= 0) for i, (x, b) in enumerate(zip(null, analysed_from, strict=True))]
    lora = [bool(x) for x in report.get("lora") or [False] * n]  # reports before LoRA rows have no such field
    if len(lora) != n:
        raise fail(f"'lora' has {len(lora)} entries for {n} models")
    checks = _checks(report, files)
    refused = {i: list(check["merge_refusals"]) for i, check in checks.items() if check.get("merge_refusals")}
    # reports before the models' 'change' have none: no lineage check
    other = {i: other_lineage_note(change) for i, change in other_lineage(report).items() if not lora[i]}
    noted = {i: f"; {check['family']}" for i, check in checks.items() if check.get("family")}
    # a file merge refuses takes no part: never the kept twin of a duplicate it can read, nor another's delta-from
    # nor does a model of another lineage than the base: its "delta" is another model, not a fine-tune's change
    unusable = [x or bool(refused.get(i)) or i in other for i, x in enumerate(null_model)]
    left_out = set(refused) | set(other)
    # a file lacking base keys ranks below a complete one of about its quality: of two duplicates the complete one
    # is kept (else the merge gets no change from that model on the keys its copy lacks)
    incomplete = {i for i, check in checks.items() if i < n and check.get("missing")}
    ranked = [-1.0 if i in left_out else score - INCOMPLETE_PENALTY * (i in incomplete)
              for i, score in enumerate(scores)]  # below every quality score
    propose = optimize if search else autofill
    choices = propose(h, n, ranked, unusable, names=short_names(files, keep_suffix=True), lora=lora)
    if not any(c.enabled and i not in left_out for i, c in enumerate(choices)):
        raise fail("every model is null, a duplicate, of another lineage than the base or refused by merge: there "
                   "is nothing to merge")

    def info(i: int, choice: RowChoice) -> str:
        if refused.get(i):
            return f"disabled: merge refuses it ({'; '.join(refused[i])})"
        if i in other:
            return f"disabled: {other[i]}; enable it by hand if it is meant to be merged"
        if null_model[i] and any(str(dtype).startswith("F8") for dtype in (checks.get(i) or {}).get("dtypes") or {}):
            return ("disabled: null delta: its change from the base is within the rounding noise of its fp8 storage "
                    "(a change of a few % cannot be told from fp8 rounding; a bf16/fp16 copy of the model can)")
        if i in incomplete:
            return f"{choice.info}; its file lacks {checks[i]['missing']} base key(s) (ranked below a complete one)"
        return choice.info

    spec = plan_mod.METHODS[method]
    return {
        "base": _field(report, "base", fail),
        "method": method,
        "rows": [
            {
                "model": models[i],
                "delta_from": None if c.delta_from is None else files[c.delta_from],
                "alpha": c.alpha,
                "repeat": c.repeat,
                "enabled": c.enabled and i not in left_out,
                "info": info(i, c) + noted.get(i, ""),
            }
            for i, c in enumerate(choices)
        ],
        "options": spec.defaults(),
        "texture": None,
        "output_dtype": plan_mod.default_output_dtype(Path(_field(report, "base", fail))),
        "merge_dtype": plan_mod.DEFAULT_MERGE_DTYPE,
    }


def cli_plan(args: argparse.Namespace) -> int:
    """``ortho-mecha plan REPORT.json --json PLAN.json [--method NAME] [--autofill] [--overwrite]``."""
    from ortho_mecha.fsutil import read_json, refuse_existing, refuse_text_output, write_json
    from ortho_mecha.plan import METHODS, plan_from_dict

    if args.method not in METHODS:  # the option's fault, not the report's
        raise OrthoMechaError(f"--method: unknown method '{args.method}'; allowed: {', '.join(METHODS)}")
    report_path = Path(args.report)
    out = Path(args.json)
    refuse_text_output(out, [report_path], "the plan")
    refuse_existing(out, args.overwrite)
    report = read_json(report_path, "report", "no such report; write one with `ortho-mecha analyse --json`")
    if not isinstance(report, dict):
        raise OrthoMechaError("a report must be a JSON object", report_path)
    refuse_text_output(out, [Path(f) for f in (report.get("base"), *(report.get("files") or report.get("models") or []))
                             if isinstance(f, str)], "the plan")
    plan = plan_from_report(report, args.method, source=report_path, search=not args.autofill)
    # the same checks a plan file gets when it is loaded; what fails came from the report (a base since removed)
    plan_from_dict(plan, out.resolve().parent, report_path)
    write_json(out, plan, overwrite=args.overwrite)
    for row, name in zip(plan["rows"], short_names([row["model"] for row in plan["rows"]], keep_suffix=True),
                         strict=True):
        print(f"{name}: {row['info']}")
    print(f"plan written to {out}")
    return 0
