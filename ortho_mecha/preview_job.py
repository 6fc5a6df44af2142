"""Previews as background jobs: one merged model rendered through ComfyUI, or an alpha sweep of a plan.

Two job kinds (``jobs.JOB_KINDS``): ``preview`` (:func:`run_job`, light: it waits on ComfyUI, so it runs
beside a merge) and ``sweep`` (:func:`sweep_job`, heavy: it merges the plan at every alpha). Their
parameters are plain JSON made by :func:`preview_params` / :func:`sweep_params`, which check everything a
user can get wrong — the server address, the ComfyUI folder, the architecture, the alphas, the sweep's
name — before a job is queued; :func:`connect` also asks the server once, so a ComfyUI that is down is
reported at once rather than as a failed job.

A preview's images (``<stem>_seed<seed>_NNN.png``) are saved beside the model when it is one of the workspace's
merges, else in the workspace's ``previews/`` (:func:`image_folder`); a sweep writes its
merges, images and grid into ``merges/sweeps/<name>/`` (see :mod:`ortho_mecha.sweep`). Cancelling a
preview job also takes its prompt off ComfyUI's queue (or interrupts it when it already runs): the job
notices the cancel request at its next poll of ComfyUI. A sweep stops at the next key of a merge, or at
the next poll of a preview, whose prompt it takes off ComfyUI's queue (or interrupts) likewise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ortho_mecha import comfy, security, workspace
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.jobs import Progress
from ortho_mecha.workflows import (
    BUILTIN_ARCHS,
    PreviewSettings,
    apply_bindings,
    arch_id,
    check_api_format,
    find_bindings,
    parse_size,
    parse_workflow,
)

logger = logging.getLogger(__name__)

SWEEPS_FOLDER = "sweeps"  # under the workspace's merges/
CONNECT_TIMEOUT = 15.0  # seconds the up-front check of the server may take (one loading a model answers late)


def comfy_settings(server_address: str | None, api: str, folder: str) -> tuple[str, str]:
    """The ComfyUI address and folder a preview uses: the page's fields when the dashboard serves this machine
    only; on a LAN, the server's own ``COMFYUI_API`` and ``COMFYUI_DIR`` whatever a browser sends, since a
    typed address would let any LAN user make the server send requests anywhere, and a typed folder would
    have it write links (or copies) outside the allowed folders."""
    if security.is_lan_address(server_address):
        return comfy.comfy_api(), os.environ.get(security.COMFYUI_VARIABLE, "")
    return api, folder


def connect(api: str, folder: str) -> tuple[str, str | None]:
    """Check the ComfyUI address (and that the server answers) and its folder; return both, normalised.

    An empty ``folder`` means "do not link models into ComfyUI" (the user copies them there).
    """
    client = comfy.ComfyClient(api, timeout=CONNECT_TIMEOUT)
    directory = comfy.comfy_dir(folder.strip()) if folder.strip() else None
    client.system_stats()
    return client.address, None if directory is None else str(directory)


def page_size(text: str) -> tuple[int, int] | None:
    """The Preview page's Size field: None when empty (the architecture's default), else ``WIDTHxHEIGHT``."""
    return parse_size(text) if text.strip() else None


def settings_params(settings: PreviewSettings) -> dict[str, Any]:
    """``settings`` as JSON data for a job's parameters."""
    data = asdict(settings)
    data["size"] = None if settings.size is None else list(settings.size)
    data["clip"] = list(settings.clip)
    return data


def page_fields(params: Mapping[str, Any], models: Any = None) -> dict[str, Any]:
    """The Preview page's fields (widget key → value) as the ``preview`` or ``sweep`` job of these ``params`` ran:
    shown beside its images on a reload, in a second tab or to another person. ``models``: the page's models
    (a :class:`~ortho_mecha.workspace.ModelChoices`), to select the one rendered when it is listed. What
    the job left to a user workflow (its own negative prompt and seed) stays as the page has it."""
    settings = params.get("settings") or {}
    size = settings.get("size")
    fields: dict[str, Any] = {
        "pv_arch": choice if (choice := params.get("arch_choice", params.get("arch"))) in (AUTO_ARCH, *BUILTIN_ARCHS)
        else None,  # as the user chose it ('auto' stays auto); not 'custom'
        "pv_prompt": settings.get("prompt"),
        "pv_negative": settings.get("negative"),
        "pv_seed": settings.get("seed"),
    }
    fields = {key: value for key, value in fields.items() if value is not None}
    fields |= {
        "pv_steps": settings.get("steps"),
        "pv_cfg": settings.get("cfg"),
        "pv_size": f"{size[0]}x{size[1]}" if size else "",
        "pv_clip": ", ".join(settings.get("clip") or ()),
        "pv_vae": settings.get("vae") or "",
    }
    if "alphas" in params:  # a sweep
        fields |= {"sw_alphas": ",".join(f"{alpha:g}" for alpha in params["alphas"]),
                   "sw_name": Path(params["out"]).name, "sw_compare": bool(params.get("compare"))}
    elif models is not None and params.get("model") and models.holds(params["model"]):
        fields["pv_model"] = models.label(params["model"])
    return fields


def file_list(text: str) -> tuple[str, ...]:
    """File names typed as one text, separated by commas (blanks dropped)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


MARK_ROLES = ("model", "prompt", "negative", "seed")  # what a user's workflow takes, each at one NODE.INPUT


@dataclass(frozen=True)
class UserWorkflow:
    """An uploaded API-format workflow, the user's ``NODE.INPUT`` marks (role → mark, None: detected), and whether
    it keeps its own seed and negative prompt (as ``preview --workflow`` does without ``--seed``/``--negative``)."""

    graph: dict[str, Any]
    marks: dict[str, str | None]
    keep_own: bool = True


def user_workflow(data: bytes, name: str, marks: Mapping[str, str | None] | None = None,
                  keep_own: bool = True) -> UserWorkflow:
    """Check an uploaded workflow now, on the page, as ``preview --workflow`` checks its file: JSON, API format,
    and where the model name, prompts and seed go (the marks given, else detected; several model loaders or a
    mark that names no input are errors naming the upload)."""
    graph = parse_workflow(data, name)
    unknown = sorted(set(marks or {}) - set(MARK_ROLES))
    if unknown:
        raise OrthoMechaError(f"unknown input role(s) {', '.join(unknown)}; allowed: {', '.join(MARK_ROLES)}")
    clean = {role: ((marks or {}).get(role) or "").strip() or None for role in MARK_ROLES}
    find_bindings(graph, **clean, path=Path(name))
    return UserWorkflow(graph, clean, keep_own)


AUTO_ARCH = "auto"  # the Preview page's Architecture choice: the built-in one the model's keys are those of


def page_arch(choice: str, model: Path, workflow: bool = False) -> str:
    """The architecture to render ``model`` with: ``choice``, or with :data:`AUTO_ARCH` the one detected from its
    keys (``custom`` for the user's own ``workflow``; with neither, an error saying what to choose)."""
    if choice != AUTO_ARCH:
        return arch_id(choice)
    return comfy.detected_arch(model, workflow, "choose one under Architecture, or use your own workflow")


@dataclass(frozen=True)
class ArchNote:
    """What the Preview page says under its Architecture choice for a model: a warning, or a caption."""

    text: str
    warning: bool


def arch_note(model: Path, choice: str, keys: str = "its keys") -> ArchNote | None:
    """With ``auto``: the architecture ``model``'s ``keys`` give, or a warning that they give none. With a chosen
    one: a warning when the model has the keys of another built-in architecture (its workflow would not load
    it), else nothing."""
    detected = comfy.builtin_arch_of(model)
    if choice == AUTO_ARCH:
        if detected is None:
            return ArchNote(f"{model.name}: {keys} match none of the built-in architectures; choose one under "
                            "Architecture, or use your own workflow", warning=True)
        return ArchNote(f"Architecture: {detected}, from {keys}", warning=False)
    if detected in (None, arch_id(choice)):
        return None
    return ArchNote(f"{model.name} has the keys of {detected}, but Architecture is {arch_id(choice)}: its built-in "
                    f"workflow would not load it; choose {detected} (or auto)", warning=True)


def file_doubts(model: Path, choice: str, settings: PreviewSettings) -> list[str]:
    """Warnings on the text encoders and VAE named under Files that look like another model's
    (:func:`ortho_mecha.comfy.named_files_doubts`) for ``model`` with the Architecture ``choice``; none when
    nothing is named or no built-in workflow applies."""
    if not settings.clip and not settings.vae:
        return []
    arch = comfy.builtin_arch_of(model) if choice == AUTO_ARCH else arch_id(choice)
    if arch not in BUILTIN_ARCHS:
        return []
    return comfy.named_files_doubts(model, arch, settings)


def preview_params(model: Path, arch: str, settings: PreviewSettings, api: str, folder: str | None,
                   workflow: UserWorkflow | None = None, choice: str | None = None) -> dict[str, Any]:
    """The ``preview`` job's parameters: render ``model`` with ``arch``'s built-in workflow, or with the user's
    own ``workflow`` (its prompt is set where it takes it, and so are the negative prompt and seed unless it
    keeps its own; a negative prompt or seed it has no input for is left out). ``choice``: the page's
    Architecture field (:data:`AUTO_ARCH` or ``arch``), shown again with the job's images."""
    params = {"model": str(model), "arch": arch_id(arch), "settings": settings_params(settings), "api": api,
              "comfy_dir": folder, "arch_choice": choice or arch_id(arch)}
    if workflow is not None:
        if settings.steps is not None or settings.cfg is not None or settings.size or settings.clip or settings.vae:
            raise OrthoMechaError("steps, CFG, size, text encoders and VAE come from your own workflow: clear them "
                                  'here, or set them in ComfyUI and export the workflow again with "Save (API)"')
        bindings = find_bindings(workflow.graph, **workflow.marks)
        given = not workflow.keep_own
        params["settings"] |= {"negative": settings.negative if given and bindings.negative else None,
                               "seed": settings.seed if given and bindings.seed else None}
        apply_bindings(workflow.graph, bindings, model.name, _settings(params["settings"], "preview"))  # checked now
        params |= {"workflow": workflow.graph, "marks": workflow.marks}
    return params


def sweep_folder(name: str, workspace_dir: Path | None = None) -> Path:
    """Where the sweep ``name`` writes: ``merges/sweeps/<name>/`` (a name follows the preset-name rules)."""
    folder = workspace.validate_preset_name(name, "sweep", "alpha-sweep")
    return workspace.merges_dir(workspace_dir) / SWEEPS_FOLDER / folder


def check_sweep_form(alphas: str, name: str) -> None:
    """Raise on alphas or a sweep name :func:`sweep_params` would refuse, before anything else (ComfyUI) is asked."""
    from ortho_mecha.sweep import parse_alphas  # imports the merge machinery (torch)

    parse_alphas(alphas)
    sweep_folder(name)


def sweep_params(
    plan: Any,
    name: str,
    alphas: str,
    arch: str,
    settings: PreviewSettings,
    api: str,
    folder: str | None,
    compare: bool,
    workspace_dir: Path | None = None,
    choice: str | None = None,
) -> dict[str, Any]:
    """The ``sweep`` job's parameters; the plan is saved as ``<name>.json`` in the sweep's folder. ``choice`` as
    in :func:`preview_params`.

    ``alphas`` is the user's text ("0.5,1,1.5"). A sweep whose grid already exists is refused; a sweep
    of that name that stopped half-way is continued (its merges are reused when they come from the same plan).
    """
    from ortho_mecha.plan import save_plan
    from ortho_mecha.sweep import parse_alphas, sweep_stem  # imports the merge machinery (torch)

    values = parse_alphas(alphas)
    out = sweep_folder(name, workspace_dir)
    grid = out / f"{sweep_stem(out.name)}.png"
    if grid.exists():
        raise OrthoMechaError("a sweep of that name is done already; choose another name", grid)
    out.mkdir(parents=True, exist_ok=True)
    plan_path = save_plan(plan, out / f"{out.name}.json", overwrite=True)
    return {
        "plan": str(plan_path),
        "alphas": values,
        "out": str(out),
        "arch": arch_id(arch),
        "arch_choice": choice or arch_id(arch),
        "settings": settings_params(settings),
        "api": api,
        "comfy_dir": folder,
        "compare": bool(compare),
    }


# --- the jobs --------------------------------------------------------------------------------------


def _text(params: Mapping[str, Any], name: str, kind: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise OrthoMechaError(f"{kind} job: '{name}' must be a non-empty string, got {value!r}")
    return value


def _settings(data: Any, kind: str) -> PreviewSettings:
    if not isinstance(data, Mapping) or not isinstance(data.get("prompt"), str):
        raise OrthoMechaError(f"{kind} job: 'settings' must be an object with at least a 'prompt' text")
    known = set(PreviewSettings.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise OrthoMechaError(
            f"{kind} job: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )
    values = dict(data)
    if values.get("size") is not None:
        values["size"] = tuple(values["size"])
    values["clip"] = tuple(values.get("clip") or ())
    return PreviewSettings(**values)


def _client(params: Mapping[str, Any], kind: str) -> tuple[comfy.ComfyClient, Path | None]:
    folder = params.get("comfy_dir")
    if folder is not None and not isinstance(folder, str):
        raise OrthoMechaError(f"{kind} job: 'comfy_dir' must be a folder path or null, got {folder!r}")
    return comfy.ComfyClient(_text(params, "api", kind)), comfy.comfy_dir(folder) if folder else None


def image_folder(model: Path, workspace_dir: Path | None = None) -> Path:
    """Where a preview job saves ``model``'s images: beside it when it is one of the workspace's merges, else in the
    workspace's ``previews/`` — never in ComfyUI's models folder or another model folder (read-only, maybe)."""
    if model.resolve().is_relative_to(workspace.merges_dir(workspace_dir).resolve()):
        return model.parent
    return workspace.previews_dir(workspace_dir)


def run_job(params: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Job ``preview``: render the model, save the images (:func:`image_folder`); cancelling also cancels it in
    ComfyUI."""
    model = Path(_text(params, "model", "preview"))
    arch = _text(params, "arch", "preview")
    settings = _settings(params.get("settings"), "preview")
    client, comfy_folder = _client(params, "preview")
    workflow = bindings = None
    if params.get("workflow") is not None:
        workflow = check_api_format(params["workflow"], "the preview job's workflow")
        marks = params.get("marks") or {}
        bindings = find_bindings(workflow, **{role: marks.get(role) for role in MARK_ROLES})

    def report(place: comfy.Progress) -> None:  # a cancel raises here, and comfy.wait_for cancels the prompt
        where = "rendering in ComfyUI" if place.state == "running" else f"queued in ComfyUI, {place.ahead} ahead"
        progress({"message": f"{where} ({place.elapsed:.0f} s)"})

    progress({"message": f"sending {model.name} to ComfyUI at {client.base_url}"})
    result = comfy.run_preview(model, arch, settings, client=client, comfy=comfy_folder, workflow=workflow,
                               bindings=bindings, progress=report)
    paths = comfy.save_images(result.images, image_folder(model), f"{model.stem}_seed{result.seed}")
    return {
        "images": [str(path) for path in paths],
        "model": str(model),
        "model_name": result.model_name,
        "arch": result.arch,
        "seed": result.seed,
        "prompt_id": result.prompt_id,
    }


def sweep_job(params: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Job ``sweep``: :func:`ortho_mecha.sweep.alpha_sweep` of the saved plan; returns the grid and the cells."""
    from ortho_mecha.plan import load_plan
    from ortho_mecha.sweep import alpha_sweep

    alphas = params.get("alphas")
    if not isinstance(alphas, list) or not alphas or not all(isinstance(a, (int, float)) for a in alphas):
        raise OrthoMechaError(f"sweep job: 'alphas' must be a non-empty list of numbers, got {alphas!r}")
    client, comfy_folder = _client(params, "sweep")
    return alpha_sweep(
        load_plan(_text(params, "plan", "sweep")),
        [float(a) for a in alphas],
        _text(params, "out", "sweep"),
        _text(params, "arch", "sweep"),
        _settings(params.get("settings"), "sweep"),
        client=client,
        comfy=comfy_folder,
        compare=bool(params.get("compare", False)),
        progress=progress,
    )
