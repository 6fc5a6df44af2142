"""Alpha sweep: merge a plan at several global alphas, preview each with the same seed, lay out a grid.

Every method takes a global ``alpha`` (0 returns the base). For each alpha the plan is saved as
``<stem>_alpha<a>.plan.json`` and merged to ``<stem>_alpha<a>.safetensors`` in the output folder — a
merge already there from the same plan is reused, any other file of that name is an error (nothing is
overwritten) — then previewed through ComfyUI with one seed. With ``compare`` the base and each enabled
row's model are previewed too; a LoRA row, which ComfyUI cannot load as a model, is previewed as the model
it stands for, the base plus the LoRA (merged beside the others as ``<stem>_<lora>.safetensors``). The
images are saved beside the merges and combined into one labelled grid (``<stem>_sweep.png``,
:func:`sweep_stem`; the stem of ``mix.json`` or ``mix.plan.json`` is ``mix``): one column per alpha (then base
and models), one row per image of a batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ortho_mecha.comfy import ComfyClient, PreviewImage, preflight, run_preview, save_images
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import atomic_write_bytes, output_folder, require_folder, short_names
from ortho_mecha.lora_rows import is_lora_file
from ortho_mecha.merge import merge_plan
from ortho_mecha.plan import Plan, Row, save_plan
from ortho_mecha.workflows import DEFAULT_ALPHAS, PreviewSettings

logger = logging.getLogger(__name__)

LABEL_SHARE = 0.045  # a label's text height over its column's width: readable when the grid is shown screen-wide
Progress = Callable[[dict[str, Any]], None]


@dataclass
class Cell:
    """One column of the grid: what was previewed and the images it gave."""

    label: str
    model: Path
    images: list[Path] = field(default_factory=list)
    plan: Path | None = None
    alpha: float | None = None


def parse_alphas(text: str) -> list[float]:
    """``"0.5,1,1.5"`` → [0.5, 1.0, 1.5]; each within the global alpha range 0–2."""
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise OrthoMechaError(f"alphas are numbers separated by commas, e.g. 0.5,1,1.5; got '{text}'") from exc
    if not alphas or any(not 0.0 <= a <= 2.0 for a in alphas):
        raise OrthoMechaError(f"alphas must be one or more values between 0 and 2; got '{text}'")
    return list(dict.fromkeys(alphas))


def _merged(plan: Plan, folder: Path, name: str, progress: Progress | None) -> tuple[Path, Path]:
    """``plan`` saved as ``name.plan.json`` and merged to ``name.safetensors`` in ``folder`` (an identical earlier
    merge is reused)."""
    plan_path = folder / f"{name}.plan.json"
    out = folder / f"{name}.safetensors"
    if out.exists():
        if _plan_of(out) != json.loads(plan.to_json()):
            raise OrthoMechaError("exists and was not merged from this sweep's plan; move it away", out)
        logger.info("reusing %s", out)
    else:
        merge_plan(plan, out, progress=progress)
    if not plan_path.exists():
        save_plan(plan, plan_path)
    return out, plan_path


def _compared(plan: Plan) -> tuple[list[Cell], list[tuple[Row, str]]]:
    """(the base's and each enabled model row's cells, the enabled LoRA rows with their labels): a LoRA row's cell
    needs a merge. Rows whose files share a name are labelled with their folders (``a/lora``, ``b/lora``)."""
    enabled = [row for row in plan.rows if row.enabled]
    cells = [Cell("base", plan.base)]
    loras = []
    for row, label in zip(enabled, short_names([row.model for row in enabled]), strict=True):
        if is_lora_file(row.model):
            loras.append((row, label))
        else:
            cells.append(Cell(label, row.model))
    return cells, loras


def _lora_cell(plan: Plan, row: Row, label: str, folder: Path, stem: str, progress: Progress | None) -> Cell:
    """The cell of a LoRA row: the base plus the LoRA at its row's alpha (and block alphas), merged."""
    on_base = replace(plan, method="add_difference", rows=(replace(row, repeat=1),), options={"alpha": 1.0},
                      texture=None, source=None)
    model, plan_path = _merged(on_base, folder, f"{stem}_{_file_part(label)}", progress)
    return Cell(f"{label}+base", model, plan=plan_path)


FILE_PART_MAX = 60  # characters of a cell's label in its files' names (a model's own name may be 200 and more)


def _file_part(label: str) -> str:
    """A cell's label as part of a file name (no spaces, no folder separators); a long one (a model's long name)
    cut to FILE_PART_MAX characters, with a hash of the whole, so that the sweep's names stay under the file
    system's limit and distinct."""
    part = label.replace(" ", "").replace("/", "_")
    if len(part) <= FILE_PART_MAX:
        return part
    return f"{part[:FILE_PART_MAX - 9]}-{hashlib.sha256(part.encode()).hexdigest()[:8]}"


def _plan_of(model: Path) -> Any:
    from ortho_mecha.io import Model

    text = Model(model).metadata.get("ortho_mecha_plan")
    return None if text is None else json.loads(text)


def grid(columns: Sequence[tuple[str, Sequence[bytes]]]) -> bytes:
    """A PNG with one labelled column per (label, images); images of a column stacked top to bottom. The labels'
    size follows the images' (:data:`LABEL_SHARE` of a column's width, at least 10 px)."""
    from PIL import Image, ImageDraw, ImageFont

    opened = [(label, [Image.open(io.BytesIO(b)).convert("RGB") for b in images]) for label, images in columns]
    width = max((im.width for _, ims in opened for im in ims), default=64)
    height = max((im.height for _, ims in opened for im in ims), default=64)
    rows = max((len(ims) for _, ims in opened), default=1)
    size = max(10, round(width * LABEL_SHARE))
    font = ImageFont.load_default(size=size)
    label_height, margin = round(size * 1.6), max(4, size // 3)
    sheet = Image.new("RGB", (width * len(opened), label_height + height * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (label, images) in enumerate(opened):
        draw.text((c * width + margin, margin), _fitted(draw, label, font, width - 2 * margin), fill="black", font=font)
        for r, image in enumerate(images):
            sheet.paste(image, (c * width, label_height + r * height))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _fitted(draw: Any, label: str, font: Any, room: float) -> str:
    """``label`` as drawn in ``room`` pixels: whole when it fits, else cut and ended with '…' (a model's long file
    name ran over the next column's label)."""
    if draw.textlength(label, font=font) <= room:
        return label
    while label and draw.textlength(label + "…", font=font) > room:
        label = label[:-1]
    return label + "…"


def _step(progress: Progress | None, done: int, steps: int, message: str) -> Progress:
    """The progress callback of one step (a merge, a preview) of a sweep of ``steps``, ``done`` before it: the
    step's own ``fraction`` (a merge's keys) scaled into the sweep's, said as ``message`` (with a preview's
    ``detail``: its place in ComfyUI's queue). A cancelled job stops where ``progress`` raises."""

    def report(info: dict[str, Any]) -> None:
        if progress is not None:
            detail = f": {info['detail']}" if "detail" in info else ""
            progress({**info, "fraction": (done + info.get("fraction", 0.0)) / steps, "message": message + detail})

    return report


def sweep_stem(name: str) -> str:
    """The stem of a sweep's files for a plan named ``name``: ``<name>_sweep``, or ``name`` itself when it already
    ends in "sweep" (a sweep named "sweep" writes ``sweep.png``, not ``sweep_sweep.png``)."""
    return name if name.lower().endswith("sweep") else f"{name}_sweep"


def alpha_sweep(
    plan: Plan,
    alphas: Sequence[float],
    folder: str | Path,
    arch: str,
    settings: PreviewSettings,
    *,
    client: ComfyClient,
    comfy: Path | None = None,
    compare: bool = False,
    time_limit: float = 600.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the sweep (see the module docstring); returns the cells and the grid's path."""
    folder = Path(folder)
    require_folder(folder, "the sweep's output folder")
    stem = sweep_stem(plan.source.stem.removesuffix(".plan") if plan.source else plan.base.stem)  # x.plan.json: x
    grid_path = folder / f"{stem}.png"
    if grid_path.exists():
        raise OrthoMechaError("already exists; choose another folder or move it away", grid_path)
    compared, loras = _compared(plan)
    preflight(arch, settings, client=client, comfy=comfy, model=plan.base, out=folder,
              listed=[cell.model for cell in compared] if compare else ())  # before any merge is written
    loras = loras if compare else []
    merges = len(alphas) + len(loras)
    steps = merges + len(alphas) + (len(compared) + len(loras) if compare else 0)  # merges, then previews
    cells: list[Cell] = []
    for alpha in alphas:
        at_alpha = replace(plan, options={**plan.options, "alpha": alpha}, source=None)
        step = _step(progress, len(cells), steps, f"merging alpha {alpha:g}")
        model, plan_path = _merged(at_alpha, folder, f"{stem}_alpha{alpha:g}", step)
        cells.append(Cell(f"alpha {alpha:g}", model, plan=plan_path, alpha=alpha))
    if compare:
        cells += compared + [_lora_cell(plan, row, label, folder, stem,
                                        _step(progress, len(alphas) + n, steps, f"merging {label}+base"))
                             for n, (row, label) in enumerate(loras)]
    columns: list[tuple[str, list[bytes]]] = []
    seed = None
    for n, cell in enumerate(cells):
        step = _step(progress, merges + n, steps, f"previewing {cell.label}")
        step({})
        result = run_preview(cell.model, arch, settings, client=client, comfy=comfy, time_limit=time_limit,
                             progress=lambda state, step=step: step({"detail": state.where}))
        images: list[PreviewImage] = result.images
        cell.images = save_images(images, folder, f"{stem}_{_file_part(cell.label)}_seed{result.seed}")
        seed = result.seed
        columns.append((cell.label, [image.data for image in images]))
    atomic_write_bytes(grid_path, grid(columns))
    return {
        "grid": str(grid_path),
        "seed": seed,
        "cells": [
            {"label": c.label, "model": str(c.model), "alpha": c.alpha, "plan": None if c.plan is None else str(c.plan),
             "images": [str(p) for p in c.images]}
            for c in cells
        ],
    }


def cli_sweep(args: Any) -> int:  # argparse.Namespace of the ``preview`` command
    """``ortho-mecha preview --plan PLAN.json --alphas A,B,... --out DIR``: the alpha sweep."""
    from ortho_mecha.comfy import HTTP_TIMEOUT, comfy_dir, preview_arch, settings_from_args, workflow_marks
    from ortho_mecha.plan import load_plan
    from ortho_mecha.progress import TqdmProgress

    if args.model:
        raise OrthoMechaError("give either a MODEL to preview or --plan for a sweep, not both")
    if args.workflow or any(workflow_marks(args).values()):
        raise OrthoMechaError("--workflow and --set-… are not supported with --plan yet; sweeps use the built-in "
                              "workflows")
    settings = settings_from_args(args)
    plan = load_plan(args.plan)
    alphas = parse_alphas(DEFAULT_ALPHAS if args.alphas is None else args.alphas)  # "" is a mistake, not the default
    arch = preview_arch(args.arch, plan.base)
    with output_folder(args.out) as out, TqdmProgress("sweep", messages=True) as bar:
        result = alpha_sweep(
            plan,
            alphas,
            out,
            arch,
            settings,
            client=ComfyClient(args.api, timeout=min(HTTP_TIMEOUT, args.timeout)),
            comfy=comfy_dir(args.comfy_dir),
            compare=args.compare,
            time_limit=args.timeout,
            progress=bar.update,
        )
    for cell in result["cells"]:
        print(f"{cell['label']}: {', '.join(cell['images'])}")
    print(f"grid: {result['grid']}")
    return 0
