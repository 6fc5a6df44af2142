"""Checks of models against a base, and the key mapping that lines their keys up.

Validation never modifies an input: its "auto-fix" is a mapping from canonical keys to each file's
own keys, reported to the user. Canonical keys have the ``model.diffusion_model.`` prefix removed
(checkpoint text-encoder and VAE keys are set aside from diffusion analysis), and norm scales stored
as ``*.scale`` (original BFL / Chroma files) are renamed to ``*.weight`` as ComfyUI does. Keys whose
shapes differ from the base are reported and left out, never silently dropped. Fewer than 50 % of the
base's keys shared is a hard error naming both files.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ortho_mecha import arch as arch_mod
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import (
    check_writable,
    refuse_existing,
    refuse_input,
    refuse_text_output,
    require_folder,
    write_json,
)
from ortho_mecha.io import Model, expand_model_paths, model_files
from ortho_mecha.progress import counted
from ortho_mecha.security import unmergeable_name

logger = logging.getLogger(__name__)

DIFFUSION_PREFIX = "model.diffusion_model."
CHECKPOINT_MIN_PREFIXED = 5  # ComfyUI treats a file as a checkpoint when more than 5 keys carry the prefix
MIN_SHARED = 0.5
LISTED = 10  # how many key names a report lists before it only counts


def is_checkpoint(names: Iterable[str]) -> bool:
    """Whether a file's keys make it a full checkpoint (diffusion keys under the prefix, maybe text encoders
    and a VAE beside them): more than ``CHECKPOINT_MIN_PREFIXED`` keys carry the prefix, ComfyUI's rule."""
    return sum(name.startswith(DIFFUSION_PREFIX) for name in names) > CHECKPOINT_MIN_PREFIXED


def canonical_key(key: str) -> str:
    """The canonical spelling of a diffusion key (prefix already removed): ``*norm.scale`` → ``*norm.weight``."""
    stem, _, last = key.rpartition(".")
    if last == "scale" and "norm" in stem.rsplit(".", 1)[-1]:
        return f"{stem}.weight"
    return key


def file_arch(tensors: Mapping[str, Any]) -> str:
    """The architecture id of one file from its tensors (name → :class:`~ortho_mecha.io.TensorInfo`), its keys
    taken as the analysis takes them (prefix removed, canonical spelling)."""
    return arch_mod.detect({canonical_key(k.removeprefix(DIFFUSION_PREFIX)): t.shape for k, t in tensors.items()})


def other_family(base_arch: str, model_arch: str) -> str | None:
    """Why a full model whose keys are those of ``model_arch`` needs a second look over a ``base_arch`` base (Chroma
    and Flux.1 share most keys, so it passes the half-shared rule): its delta holds the whole difference between
    the two families. None for the same family, or where either is not known."""
    if "custom" in (base_arch, model_arch) or base_arch == model_arch:
        return None
    return (f"its keys are those of a {model_arch} model, but the base is {base_arch}: its delta holds the whole "
            "difference between the two families (is this the base you meant?)")


@dataclass
class KeyMap:
    """Canonical diffusion key → the file's own key, plus what the mapping did."""

    keys: dict[str, str]
    prefix_stripped: int = 0
    renamed: int = 0
    set_aside: list[str] = field(default_factory=list)  # a checkpoint's text-encoder / VAE keys
    non_float: list[str] = field(default_factory=list)

    @property
    def non_diffusion(self) -> int:
        return len(self.set_aside)


def key_map(model: Model) -> KeyMap:
    """Map a model's keys to canonical diffusion keys (see the module docstring)."""
    names = list(model.tensors)
    checkpoint = is_checkpoint(names)
    mapping = KeyMap(keys={})
    for name in names:
        if checkpoint:
            if not name.startswith(DIFFUSION_PREFIX):
                mapping.set_aside.append(name)
                continue
            bare = name[len(DIFFUSION_PREFIX) :]
            mapping.prefix_stripped += 1
        else:
            bare = name
        canon = canonical_key(bare)
        mapping.renamed += canon != bare
        if not model.tensors[name].is_float:
            mapping.non_float.append(name)
            continue
        if canon in mapping.keys:
            other = mapping.keys[canon]
            raise OrthoMechaError(f"keys '{other}' and '{name}' map to the same key '{canon}'", model.path)
        mapping.keys[canon] = name
    return mapping


def canonical_shapes(model: Model, mapping: KeyMap) -> dict[str, tuple[int, ...]]:
    return {canon: model.tensors[name].shape for canon, name in mapping.keys.items()}


@dataclass
class ModelCheck:
    """What validation found for one model against the base."""

    path: str
    arch: str
    keys: int
    shared: int
    shared_fraction: float
    missing: int
    extra: int
    shape_mismatch: list[str]
    prefix_stripped: int
    renamed: int
    non_diffusion: int
    non_float: int
    dtypes: dict[str, int]
    scaled_fp8: bool
    missing_examples: list[str]
    missing_components: int = 0  # the base's float text-encoder / VAE keys this file lacks (checkpoints)
    missing_component_examples: list[str] = field(default_factory=list)
    lora: dict | None = None  # a kohya LoRA row: how its modules map (lora_rows.Binding.summary)
    shards: int = 1
    family: str | None = None  # why its architecture, unlike the base's, needs a second look (other_family)

    @property
    def merge_refusals(self) -> list[str]:
        """Why ``ortho-mecha merge`` would refuse this file although the analysis reads it (empty: it would not)."""
        reasons = []
        if self.shape_mismatch:
            count = len(self.shape_mismatch)
            reasons.append(f"{counted(count, 'key')} {'has' if count == 1 else 'have'} a shape unlike the base's")
        if self.scaled_fp8:
            reasons.append("scaled fp8 (sd-mecha reads fp8 without its scales): merge the copy "
                           "'ortho-mecha convert' writes")
        if self.shards > 1:
            reasons.append(f"sharded in {self.shards} files: merge the single file 'ortho-mecha convert' writes")
        elif (named := unmergeable_name(Path(self.path))) is not None:
            reasons.append(named)
        return reasons

    @property
    def messages(self) -> list[str]:
        from ortho_mecha.lora_rows import summary_notes

        notes = summary_notes(self.lora) if self.lora else []
        if self.family:
            notes.append(self.family)
        if self.prefix_stripped:
            notes.append(f"'{DIFFUSION_PREFIX}' prefix removed from {self.prefix_stripped} keys")
        if self.non_diffusion:
            notes.append(f"{self.non_diffusion} text-encoder/VAE/other keys set aside (diffusion analysis)")
        if self.renamed:
            notes.append(f"{self.renamed} '.scale' norm keys read as '.weight'")
        if self.scaled_fp8:
            notes.append("scaled fp8: dequantised with its per-key scales")
        if self.missing:
            examples = ", ".join(self.missing_examples)
            notes.append(f"{self.missing} base keys missing (delta taken as 0), e.g. {examples}")
        if self.missing_components:
            examples = ", ".join(self.missing_component_examples)
            notes.append(f"{self.missing_components} of the base's text-encoder/VAE keys missing (merge takes this "
                         f"row's delta there as 0), e.g. {examples}")
        if self.extra:
            notes.append(f"{self.extra} keys not in the base (ignored)")
        if self.shape_mismatch:
            shown = ", ".join(self.shape_mismatch[:LISTED])
            keys = counted(len(self.shape_mismatch), "key")
            notes.append(f"{keys} with a shape unlike the base's (left out): {shown}")
        return notes


@dataclass
class Alignment:
    """Models lined up against a base: the keys analysed and each file's own name for them."""

    base: Model
    models: list[Model]
    maps: list[KeyMap]  # base first, then models in order
    keys: list[str]  # canonical keys of the base that are analysed (float, in base order)
    arch: str
    checks: list[ModelCheck]

    def file_key(self, file_index: int, canon: str) -> str | None:
        """The actual key of ``canon`` in file ``file_index`` (0 = base), or None when absent/mismatched."""
        return self.maps[file_index].keys.get(canon)

    def report(self) -> dict:
        return {
            "base": str(self.base.path),
            "arch": self.arch,
            "keys": len(self.keys),
            "models": [asdict(c) | {"notes": c.messages, "merge_refusals": c.merge_refusals} for c in self.checks],
        }


def _dtype_counts(model: Model, names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        dtype = model.tensors[name].dtype
        counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def align(base: Model, models: list[Model], arch: str | None = None) -> Alignment:
    """Line every model up against the base; raise on a model sharing fewer than half the base's keys.

    A kohya LoRA among ``models`` is replaced by a :class:`~ortho_mecha.lora_rows.LoraModel` bound to the
    base (its keys: the base keys it touches, read as its product); the half-shared rule does not apply to it.
    """
    from ortho_mecha import lora_rows  # lora_rows → lora → validate: imported here, not at the top

    if lora_rows.is_lora(base.tensors):
        raise OrthoMechaError("is a LoRA; the base must be a full model (a LoRA can be one of the models)", base.path)
    base_map = key_map(base)
    if not base_map.keys:
        raise OrthoMechaError("holds no floating-point tensors to analyse", base.path)
    base_shapes = canonical_shapes(base, base_map)
    detected = arch_mod.detect(base_shapes)
    arch = arch_mod.canonical_arch(arch) if arch else detected
    if arch != detected and detected != "custom":
        logger.warning("%s: --arch %s given, but its keys and shapes are those of %s; the report, plans and "
                       "previews will use %s", base.path, arch, detected, arch)
    maps, checks, bound = [base_map], [], []
    for model in models:
        lora = lora_rows.LoraModel(model, base_shapes, base.path) if lora_rows.is_lora(model.tensors) else None
        model = lora or model
        bound.append(model)
        mapping = key_map(model)
        shapes = canonical_shapes(model, mapping)
        mismatched = [k for k, s in shapes.items() if k in base_shapes and base_shapes[k] != s]
        for k in mismatched:
            logger.info("%s: %s has shape %s, base has %s", model.path, k, shapes[k], base_shapes[k])
            del mapping.keys[k]
        shared = [k for k in base_shapes if k in mapping.keys]
        missing = [k for k in base_shapes if k not in shapes]
        own = set(mapping.set_aside if is_checkpoint(model.tensors) else model.tensors)
        missing_components = [] if lora else [
            k for k in base_map.set_aside if k not in own and base.tensors[k].is_float]
        fraction = len(shared) / len(base_shapes)
        if fraction < MIN_SHARED and lora is None:
            lora_rows.refuse_other_adapters(model.tensors, model.path)  # says what such a file is
            integers = [t.dtype for t in model.tensors.values() if not t.is_float]
            if len(integers) > len(model.tensors) / 2:
                raise OrthoMechaError(
                    f"most of its tensors are stored as {', '.join(sorted(set(integers)))}, not as floating point: "
                    "such weights (an integer-quantised export?) are neither analysed nor merged; use a "
                    "fp32/fp16/bf16/fp8 file",
                    model.path,
                )
            if len(mismatched) > len(missing):  # most keys are there, in other shapes
                k = mismatched[0]
                why = (f"{len(mismatched)} of its keys have other shapes than the base's, e.g. '{k}' "
                       f"{list(shapes[k])} vs {list(base_shapes[k])}: a model of another size or variant?")
            else:
                why = f"is it the same architecture? (base: {detected}, this file: {arch_mod.detect(shapes)})"
            raise OrthoMechaError(
                f"shares only {len(shared)} of the {len(base_shapes)} diffusion keys of the base {base.path} "
                f"({fraction:.0%} < 50%): {why}",
                model.path,
            )
        model_arch = arch_mod.detect(shapes)
        family = None if lora else other_family(detected, model_arch)  # said by each command, once
        checks.append(
            ModelCheck(
                path=str(model.path),
                arch=model_arch,
                keys=len((lora.file if lora else model).tensors),
                shared=len(shared),
                shared_fraction=round(fraction, 6),
                missing=len(missing),
                extra=sum(k not in base_shapes for k in shapes),
                shape_mismatch=mismatched,
                prefix_stripped=mapping.prefix_stripped,
                renamed=mapping.renamed,
                non_diffusion=mapping.non_diffusion,
                non_float=len(mapping.non_float),
                dtypes=_dtype_counts(lora.file, list(lora.file.tensors)) if lora else _dtype_counts(
                    model, list(mapping.keys.values())),
                scaled_fp8=model.scaled_fp8,
                missing_examples=missing[:3],
                missing_components=len(missing_components),
                missing_component_examples=missing_components[:3],
                lora=lora.binding.summary() if lora else None,
                shards=len(model.files),
                family=family,
            )
        )
        maps.append(mapping)
    analysed = [k for k, name in base_map.keys.items() if base.tensors[name].numel > 0]  # an empty key adds nothing
    return Alignment(base, bound, maps, analysed, arch, checks)


def scan_finite(model: Model, keys: list[str], chunk: int = 1 << 20) -> None:
    """Stream every element of ``keys``; raise naming the file and key at the first NaN or Inf."""
    for name in keys:
        numel = model.tensors[name].numel
        for start in range(0, numel, chunk):
            values = model.read(name, start, min(numel, start + chunk))
            if not torch.isfinite(values).all():
                bad = int((~torch.isfinite(values)).sum())
                message = f"tensor '{name}' holds {bad} NaN/Inf values (elements from {start})"
                raise OrthoMechaError(message, model.path)


def open_models(
    base: str | Path, models: list[str | Path], strict: bool = True
) -> tuple[Model, list[Model], list[str]]:
    """Open the base and models (folders expanded, shards grouped), with clear errors: (base, models, problems).
    Not ``strict``, a model that cannot be opened is left out and its error's text is among the problems (the
    others are still opened); ``strict``, it raises."""
    base_path = Path(base)
    if base_path.is_dir():
        raise OrthoMechaError("--base must be one model file, not a folder", base_path)
    base_model = Model(base_path)
    paths = []
    named = {Path(m).absolute() for m in models if not Path(m).is_dir()}  # files given one by one, not found in folders
    for path in expand_model_paths(list(models)):
        if Path(path).resolve() != base_path.resolve():
            paths.append(path)
        elif Path(path).absolute() != base_path.absolute():
            logger.warning("%s: is the base %s itself (a link to it, or another name); left out", path, base_path)
    if not paths:
        raise OrthoMechaError("no models to compare with the base (only the base itself was given)", base_path)
    if base_path.absolute() in named:  # named again among the models (the base's own folder lists it: no news)
        logger.warning("%s: is the base; left out of the models", base_path)
    opened: list[Model] = []
    problems: list[str] = []
    for path in paths:
        try:
            opened.append(Model(path))
        except OrthoMechaError as error:
            if strict:
                raise
            problems.append(str(error))
    return base_model, opened, problems


def _files(models: Sequence[Model | str | Path]) -> list[Path]:
    """Every file of ``models`` (opened, or paths whose headers are not read), shards included."""
    return [p for m in models
            for p in ((m.path, *m.files) if isinstance(m, Model) else (Path(m), *model_files(Path(m))))]


def refuse_input_as_output(output: Path, models: Sequence[Model | str | Path], what: str = "the report") -> None:
    """Raise if ``output`` is one of the models' files (:func:`ortho_mecha.fsutil.refuse_input`)."""
    refuse_input(output, _files(models), what)


def check_report_output(output: Path, models: Sequence[Model | str | Path], overwrite: bool,
                        remedy: str | None = None) -> None:
    """Raise, before any work, unless the JSON report can be written to ``output``: not an input, not named like
    a model file, in an existing folder that can be written, and not an existing file unless ``overwrite``
    (``remedy``: what to do then, when the command has no --overwrite)."""
    refuse_text_output(output, _files(models), "the report")
    require_folder(output.parent, "the folder for the report")
    if remedy is None:
        refuse_existing(output, overwrite)
    else:
        refuse_existing(output, overwrite, remedy)
    check_writable(output)


def cli_validate(args: argparse.Namespace) -> int:
    """Check every model against the base; a file that cannot be used is listed with its problem and the others are
    still checked (the exit status is then 2)."""
    base, models, problems = open_models(args.base, args.models, strict=False)
    if args.json:
        check_report_output(Path(args.json), [base, *models], args.overwrite)
    scan_finite(base, list(key_map(base).keys.values()))
    usable = []
    for model in models:
        try:
            alone = align(base, [model], args.arch)  # a LoRA: its products are scanned
            scan_finite(alone.models[0], [alone.maps[1].keys[k] for k in alone.keys if k in alone.maps[1].keys])
        except OrthoMechaError as error:
            problems.append(str(error))
        else:
            usable.append(model)
    if not usable:
        raise OrthoMechaError("; ".join(problems))
    alignment = align(base, usable, args.arch)
    report = alignment.report() | {"problems": problems}
    print(f"base {base.path}: {alignment.arch}, {len(alignment.keys)} diffusion keys")
    for check in alignment.checks:
        refusals = check.merge_refusals
        verdict = f"OK for analysis; merge refuses it: {'; '.join(refusals)}" if refusals else "OK"
        shared = f"{check.shared}/{len(alignment.keys)} keys shared ({check.shared_fraction:.0%})"
        print(f"  {check.path}: {shared}, {verdict}")
        for note in check.messages:
            print(f"    - {note}")
    for problem in problems:
        print(f"  cannot be used: {problem}")
    if args.json:
        write_json(Path(args.json), report, overwrite=args.overwrite)
    if problems:
        # the files named on stderr too: with stdout piped or redirected, the one line is all a user sees
        raise OrthoMechaError(f"{len(problems)} of {len(problems) + len(usable)} models cannot be used: "
                              f"{'; '.join(problems)}")
    return 0
