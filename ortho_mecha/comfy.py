"""Previewing a model through the user's running ComfyUI.

Configuration: ``COMFYUI_API`` (default ``http://127.0.0.1:8188``) is the server, ``COMFYUI_DIR`` its
install folder (the one holding ``models/``). With ``COMFYUI_DIR`` set, the model file is made visible
to ComfyUI by a hard link under its name tagged with its size and time (:func:`link_name`, so a file
written again is loaded again) in ``models/diffusion_models`` (UNETLoader families)
or ``models/checkpoints`` (SD1.5, SDXL) — a symbolic link across file systems (replaced by a copy when
ComfyUI cannot follow it), a copy where links are not allowed — and the user's file is never moved or
changed; :func:`model_linked` removes it again once the last preview using it (in any process) is done.

A preview is: ``GET /object_info`` (every node class and every file name the graph uses is checked
against it, both combo encodings understood), ``POST /prompt``, polling ``/history/{id}`` and
``/queue`` under a time limit, then ``/view`` for the images. Every failure — server down, slow, gone
mid-job, a refused graph, an execution error — is one :class:`OrthoMechaError` naming the server and
the cause. :class:`ComfyClient` is the thin HTTP layer; :func:`run_preview` is the whole job for one
model file and returns the image bytes with what was run, for the CLI, the dashboard and sweeps.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from filelock import FileLock

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import atomic_write_bytes, file_stamp, output_folder, partial_path, place, process_exists
from ortho_mecha.security import READ_SUFFIXES
from ortho_mecha.workflows import (
    BUILTIN_ARCHS,
    FILE_FOLDERS,
    FOLDER_ALIASES,
    MODEL_INPUTS,
    ArchSpec,
    Bindings,
    Graph,
    ModelFacts,
    PreviewSettings,
    Resolved,
    apply_bindings,
    arch_id,
    bound_seed,
    file_spec,
    find_bindings,
    load_workflow,
    named_file_doubts,
    parse_size,
    resolve,
    unused_negative,
)

logger = logging.getLogger(__name__)

DEFAULT_API = "http://127.0.0.1:8188"
HTTP_TIMEOUT = 30.0
DEFAULT_TIME_LIMIT = 600.0
LIST_LIMIT = 12  # options quoted in a message
LINK_USERS = ".ortho-mecha-previews"  # in ComfyUI's models/<folder>: the previews using each link (not a model)
MADE = "made-by-ortho-mecha"  # in a link's bookkeeping folder: ortho-mecha made the link (and removes it)


def comfy_api(override: str | None = None) -> str:
    """The ComfyUI URL: ``override``, else ``$COMFYUI_API``, else the local default."""
    return (override or os.environ.get("COMFYUI_API", "").strip() or DEFAULT_API).rstrip("/")


def comfy_dir(override: str | Path | None = None) -> Path | None:
    """ComfyUI's install folder: ``override``, else ``$COMFYUI_DIR``, else None (no linking)."""
    configured = str(override) if override else os.environ.get("COMFYUI_DIR", "").strip()
    if not configured:
        return None
    path = Path(configured).expanduser()
    _require_models(path)
    return path


def _require_models(comfy: Path) -> None:
    if not (comfy / "models").is_dir():
        if comfy.name == "models" and any((comfy / folder).is_dir() for folder in ("checkpoints", "diffusion_models")):
            raise OrthoMechaError(f"is ComfyUI's models folder itself; set COMFYUI_DIR (or --comfy-dir) to the "
                                  f"folder that holds it: {comfy.parent}", comfy)
        raise OrthoMechaError(
            "is not a ComfyUI folder (it has no models/ folder); set COMFYUI_DIR (or --comfy-dir) to the folder that "
            "holds ComfyUI's main.py and models/",
            comfy,
        )


# --------------------------------------------------------------------------------------------------
# HTTP


class ComfyUnreachable(OrthoMechaError):
    """No connection to ComfyUI (refused, reset, name not found)."""

    def __init__(self, url: str, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"ComfyUI at {url} is not reachable ({reason}); start ComfyUI, or point ortho-mecha at it (COMFYUI_API, "
            "--api, or the Preview page's server address)"
        )


@dataclass(frozen=True)
class ImageRef:
    """One image an output node produced, as ``/history`` lists it."""

    node: str
    filename: str
    subfolder: str
    kind: str  # "output" (SaveImage) or "temp" (PreviewImage)


@dataclass(frozen=True)
class QueuePlace:
    """Where a prompt is: ``running``, or ``pending`` with ``ahead`` jobs before it."""

    state: str
    ahead: int


def _shown(address: str) -> str:
    """``address`` as messages show it: a password in it (``http://user:secret@host``) replaced by ``***``."""
    parts = urlsplit(address)
    if parts.password is None:
        return address
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


class ComfyClient:
    """A small client for ComfyUI's HTTP API; ``timeout`` bounds each request, in seconds."""

    def __init__(self, base_url: str | None = None, timeout: float = HTTP_TIMEOUT) -> None:
        self._address = comfy_api(base_url)  # requests go here; messages show base_url, without a password
        self.base_url = _shown(self._address)
        if not self._address.startswith(("http://", "https://")):
            raise OrthoMechaError(f"ComfyUI address '{self.base_url}' must start with http:// or https://")
        if timeout <= 0:
            raise OrthoMechaError(f"the request timeout must be positive, got {timeout}")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self.session = requests.Session()

    @property
    def address(self) -> str:
        """The server's address as given, credentials included (``base_url`` is the one messages show)."""
        return self._address

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self._address + path
        try:
            return self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.Timeout:
            raise OrthoMechaError(
                f"ComfyUI at {self.base_url} did not answer {method} {path} within {self.timeout:g} s; it may be busy "
                "(loading a model) or stuck"
            ) from None
        except requests.ConnectionError as exc:
            text = str(exc).lower()
            reason = "connection refused" if "refused" in text else "connection failed"
            if "remotedisconnected" in text or "reset" in text or "aborted" in text:
                reason = "connection dropped"
            raise ComfyUnreachable(self.base_url, reason) from None
        except requests.RequestException as exc:
            raise OrthoMechaError(f"ComfyUI at {self.base_url}: {method} {path} failed ({exc})") from None

    def _json(self, method: str, path: str, expect: type = dict, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code != 200:
            raise self._http_error(method, path, response)
        return self._payload(response, method, path, expect)

    def _payload(self, response: requests.Response, method: str, path: str, expect: type) -> Any:
        """The response's JSON, which must be an ``expect`` (a dict, or a list): ComfyUI's shape for ``path``."""
        try:
            payload = response.json()
        except ValueError:
            raise OrthoMechaError(
                f"ComfyUI at {self.base_url} sent something that is not JSON for {method} {path}; is that address "
                "a ComfyUI server?"
            ) from None
        if not isinstance(payload, expect):
            raise OrthoMechaError(
                f"ComfyUI at {self.base_url} answered {method} {path} with a JSON {type(payload).__name__} where "
                f"ComfyUI sends {'an object' if expect is dict else 'a list'}; is that address a ComfyUI server?"
            )
        return payload

    def _post(self, path: str, body: Mapping[str, Any]) -> None:
        response = self._request("POST", path, json=body)
        if response.status_code != 200:
            raise self._http_error("POST", path, response)

    def _http_error(self, method: str, path: str, response: requests.Response) -> OrthoMechaError:
        first_line = response.text.strip().splitlines()[0][:200] if response.text.strip() else "no body"
        return OrthoMechaError(
            f"ComfyUI at {self.base_url} answered {response.status_code} to {method} {path} ({first_line})"
        )

    def object_info(self) -> dict[str, Any]:
        """Every node class with its input specs (file lists included)."""
        return self._json("GET", "/object_info")

    def node_info(self, class_type: str) -> dict[str, Any] | None:
        """One node class's spec, or None when the server has no such class."""
        return self._json("GET", f"/object_info/{class_type}").get(class_type)

    def models(self, folder: str) -> list[str]:
        """The files ComfyUI lists in one models folder (``checkpoints``, ``diffusion_models``, ...)."""
        return self._json("GET", f"/models/{folder}", expect=list)

    def system_stats(self) -> dict[str, Any]:
        return self._json("GET", "/system_stats")

    def queue_prompt(self, graph: Graph) -> str:
        """Queue an API-format graph; return its prompt id. A refused graph raises with ComfyUI's reasons."""
        response = self._request("POST", "/prompt", json={"prompt": graph, "client_id": self.client_id})
        if response.status_code == 400:
            try:
                payload = response.json()
            except ValueError:
                raise self._http_error("POST", "/prompt", response) from None
            if not isinstance(payload, dict):
                raise self._http_error("POST", "/prompt", response)
            raise OrthoMechaError(describe_prompt_error(payload, self.base_url))
        if response.status_code != 200:
            raise self._http_error("POST", "/prompt", response)
        payload = self._payload(response, "POST", "/prompt", dict)
        if "prompt_id" not in payload:
            raise OrthoMechaError(
                f"ComfyUI at {self.base_url} accepted POST /prompt but sent no prompt_id; is that address a ComfyUI "
                "server?"
            )
        if payload.get("node_errors"):
            logger.warning("ComfyUI runs only part of the workflow: %s", _node_errors(payload["node_errors"]))
        return str(payload["prompt_id"])

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The finished prompt's history entry, or None while it is queued, running or unknown."""
        return self._json("GET", f"/history/{prompt_id}").get(prompt_id)

    def place(self, prompt_id: str) -> QueuePlace | None:
        """Where ``prompt_id`` is in ComfyUI's queue, or None when it is not there."""
        queue = self._json("GET", "/queue")
        running = queue.get("queue_running", [])
        if any(item[1] == prompt_id for item in running):
            return QueuePlace("running", 0)
        pending = queue.get("queue_pending", [])
        mine = [item[0] for item in pending if item[1] == prompt_id]
        if not mine:
            return None
        return QueuePlace("pending", len(running) + sum(1 for item in pending if item[0] < mine[0]))

    def view(self, image: ImageRef) -> bytes:
        """The bytes of one output image."""
        params = {"filename": image.filename, "subfolder": image.subfolder, "type": image.kind}
        response = self._request("GET", "/view", params=params)
        if response.status_code != 200:
            raise OrthoMechaError(
                f"ComfyUI at {self.base_url} listed the image {image.filename} but /view answered "
                f"{response.status_code}; was its {image.kind} folder cleared?"
            )
        return response.content

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop the running prompt (only ``prompt_id``, when given and the server supports that)."""
        self._post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def cancel(self, prompt_id: str) -> None:
        """Take ``prompt_id`` out of the queue, or interrupt it if it is running."""
        place = self.place(prompt_id)
        if place is None:
            return
        if place.state == "pending":
            self._post("/queue", {"delete": [prompt_id]})
        else:
            self.interrupt(prompt_id)


def _node_errors(node_errors: Mapping[str, Any]) -> str:
    parts = []
    for node_id, entry in node_errors.items():
        class_type = entry.get("class_type", "?")
        for error in entry.get("errors", []):
            details = error.get("details") or ""
            parts.append(
                f"node {node_id} ({class_type}): {error.get('message', 'invalid')}{': ' if details else ''}{details}"
            )
    return "; ".join(parts)


def missing_node_message(url: str, class_type: str, node: str | None) -> str:
    used_by = f"workflow node {node}" if node is not None else "the built-in workflow uses it"
    return (
        f"ComfyUI at {url} has no node '{class_type}' ({used_by}); install the custom node that provides it, or "
        "update ComfyUI"
    )


def describe_prompt_error(payload: Mapping[str, Any], url: str) -> str:
    """One readable sentence from ComfyUI's 400 envelope ``{"error": {...}, "node_errors": {...}}``."""
    error = payload.get("error") or {}
    if isinstance(error, str):
        return f"ComfyUI at {url} refused the workflow: {error}"
    kind = error.get("type")
    extra = error.get("extra_info") or {}
    if kind == "missing_node_type":
        return missing_node_message(url, extra.get("class_type", "?"), extra.get("node_id", "?"))
    if kind == "prompt_no_outputs":
        return f"ComfyUI at {url} refused the workflow: it has no output node; add a SaveImage or PreviewImage node"
    described = _node_errors(payload.get("node_errors") or {})
    if described:
        return f"ComfyUI at {url} refused the workflow: {described}"
    details = error.get("details") or ""
    return f"ComfyUI at {url} refused the workflow: {error.get('message', 'no reason given')}" + (
        f" ({details})" if details else ""
    )


# --------------------------------------------------------------------------------------------------
# /object_info


def input_spec(info: Mapping[str, Any], class_type: str, name: str) -> list[Any] | None:
    """The spec of one input (required or optional) of a node class, or None."""
    inputs = info.get(class_type, {}).get("input", {})
    for group in ("required", "optional"):
        spec = (inputs.get(group) or {}).get(name)
        if spec is not None:
            return spec
    return None


def combo_options(spec: object) -> list[str] | None:
    """The options of a combo input in either encoding: legacy ``[[...], {...}]`` or V3 ``["COMBO", {"options"}]``."""
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return [str(option) for option in spec[0]]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return [str(option) for option in spec[1].get("options", [])]
    return None


def _listing(options: Sequence[str]) -> str:
    shown = ", ".join(options[:LIST_LIMIT]) or "nothing"
    return shown + (f", ... ({len(options)} in all)" if len(options) > LIST_LIMIT else "")


@dataclass(frozen=True)
class Problem:
    """Something in a graph the server cannot run."""

    kind: str  # missing_class | missing_input | dangling_link | not_in_list | not_a_number | below_min | above_max
    node: str
    class_type: str
    input: str = ""
    value: object = None
    options: tuple[str, ...] = ()  # not_in_list: what ComfyUI offers; the others: the bound or type broken


def _run_nodes(graph: Graph, info: Mapping[str, Any]) -> set[str]:
    """The nodes ComfyUI runs, so validates: the output nodes (``output_node`` in /object_info) and every node
    they depend on. Every node when the graph has no output node ComfyUI knows."""
    stack = [n for n, node in graph.items() if (info.get(node["class_type"]) or {}).get("output_node") is True]
    if not stack:
        return set(graph)
    needed: set[str] = set()
    while stack:
        node_id = stack.pop()
        if node_id in needed or node_id not in graph:
            continue
        needed.add(node_id)
        stack += [str(v[0]) for v in graph[node_id].get("inputs", {}).values() if isinstance(v, list) and v]
    return needed


def find_problems(graph: Graph, info: Mapping[str, Any]) -> list[Problem]:
    """What ComfyUI would refuse: a node class it lacks (anywhere in the graph), and, in the nodes it runs, a
    required input left out, a link to no node, a combo value it does not offer (a file it does not list), or a
    number that is not one or lies outside the input's range."""
    problems = [Problem("missing_class", n, node["class_type"]) for n, node in graph.items()
                if node["class_type"] not in info]
    run = _run_nodes(graph, info)
    for node_id, node in graph.items():
        class_type = node["class_type"]
        if class_type not in info or node_id not in run:
            continue
        inputs = node.get("inputs", {})
        for name in info[class_type].get("input", {}).get("required", {}):
            if name not in inputs:
                problems.append(Problem("missing_input", node_id, class_type, name))
        for name, value in inputs.items():
            if isinstance(value, list):
                if value and str(value[0]) not in graph:
                    problems.append(Problem("dangling_link", node_id, class_type, name, value[0]))
                continue
            spec = input_spec(info, class_type, name)
            options = combo_options(spec)
            if options is not None and str(value) not in options:
                problems.append(Problem("not_in_list", node_id, class_type, name, value, tuple(options)))
            elif options is None and (kind := _number_problem(value, spec)) is not None:
                problems.append(Problem(kind[0], node_id, class_type, name, value, (kind[1],)))
    return problems


def _number_problem(value: object, spec: object) -> tuple[str, str] | None:
    """(kind, the bound or type it breaks) when an INT or FLOAT input of this ``spec`` refuses ``value`` as ComfyUI
    validates it (converted with int() or float(), then held to the spec's min and max), else None."""
    if not (isinstance(spec, list) and spec and spec[0] in ("INT", "FLOAT")):
        return None
    limits = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    try:
        number = int(value) if spec[0] == "INT" else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return "not_a_number", spec[0]
    low, high = limits.get("min"), limits.get("max")
    if isinstance(low, int | float) and number < low:
        return "below_min", f"{low:g}"
    if isinstance(high, int | float) and number > high:
        return "above_max", f"{high:g}"
    return None


def describe_problem(problem: Problem, url: str, model_hint: str, own_workflow: bool = False) -> str:
    """A sentence for one problem; ``model_hint`` says how to make a missing model file visible. In the user's
    ``own_workflow`` a file name is fixed in the workflow (the --clip/--vae choices are the built-in ones')."""
    p = problem
    where = f"node {p.node} ({p.class_type})"
    if p.kind == "missing_class":
        return missing_node_message(url, p.class_type, p.node if own_workflow else None)
    if p.kind == "missing_input":
        return f"{where} lacks its required input '{p.input}'"
    if p.kind == "dangling_link":
        return f"{where} input '{p.input}' links to node {p.value}, which is not in the workflow"
    if p.kind == "not_a_number":
        wanted = "a whole number" if p.options[0] == "INT" else "a number"
        return f"{where} input '{p.input}' is {p.value!r}, which is not {wanted}"
    if p.kind in ("below_min", "above_max"):
        side = "below its minimum" if p.kind == "below_min" else "above its maximum"
        return f"{where} input '{p.input}' is {p.value}, {side} of {p.options[0]} in this ComfyUI"
    folder = FILE_FOLDERS.get(p.input)
    if p.input in ("unet_name", "ckpt_name"):
        return f"model '{p.value}' is not in ComfyUI's {folder} list (ComfyUI at {url}); {model_hint}"
    if folder is not None:
        role, flag = {
            "text_encoders": ("text encoder", " or choose another with --clip"),
            "vae": ("VAE", " or choose another with --vae"),
        }.get(folder, (folder, ""))
        if own_workflow:
            flag = f", or set {where}'s {p.input} to one it has in your workflow and export it again"
        return (
            f"{role} '{p.value}' is not in ComfyUI's {folder} list (it has: {_listing(p.options)}); put it in "
            f"ComfyUI's models/{folder}{flag}"
        )
    if not own_workflow:  # a value of the built-in workflow: this ComfyUI is older than the architecture
        return (
            f"the built-in workflow sets {where} input '{p.input}' to '{p.value}', which this ComfyUI does not offer "
            f"(it has: {_listing(p.options)}); update ComfyUI: this architecture needs a newer one"
        )
    return (
        f"{where} input '{p.input}' is '{p.value}', which ComfyUI does not offer (choose one of: {_listing(p.options)})"
    )


def _options(info: Mapping[str, Any], class_type: str, name: str) -> list[str]:
    """The files ComfyUI offers in one loader input; none where it lacks the loader (a problem of the graph)."""
    return combo_options(input_spec(info, class_type, name)) or []


# --------------------------------------------------------------------------------------------------
# Making the model file visible to ComfyUI


@dataclass(frozen=True)
class LinkResult:
    """How ComfyUI sees the model: the name it lists, the entry in its folder, and how it got there."""

    name: str
    path: Path
    method: str  # symlink | hardlink | copy | in place
    created: bool  # made by this call (and so to be removed after the preview)


def _inside(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def _models_folder(comfy: Path, folder: str) -> Path:
    """ComfyUI's ``models/<folder>``, or the older name it has instead (``unet`` for ``diffusion_models``);
    created only when neither exists."""
    _require_models(comfy)
    target = comfy / "models" / folder
    if not target.is_dir():
        older = [comfy / "models" / alias for alias in FOLDER_ALIASES.get(folder, ())]
        target = next((path for path in older if path.is_dir()), target)
    target.mkdir(exist_ok=True)
    return target


def link_name(model: Path) -> str:
    """The name a model is linked under: its own, tagged with its size and modification time
    (``merge.3f9a0c1d.safetensors``). ComfyUI keeps a loaded model while the loader's file name stays the same,
    so a file written again under the same name (a re-merge, a sweep of another plan) gets a new name, and its
    preview shows the new file. A copy made where links are not allowed keeps both, so it has the same tag."""
    size, mtime = file_stamp(model)
    tag = hashlib.blake2b(f"{size}:{mtime}".encode(), digest_size=4).hexdigest()
    return f"{model.stem}.{tag}{model.suffix}"


def _in_place_name(model: Path, root: Path) -> str | None:
    """The name ComfyUI already lists ``model`` under, when the file (or its real target) lies in ``root``."""
    root = root.resolve()
    return _inside(model.parent.resolve() / model.name, root) or _inside(model.resolve(), root)


def _links_to(entry: Path, model: Path) -> str | None:
    """How ``entry`` (in ComfyUI's folder) gives ``model``: symlink, hardlink, copy, or None when it does not."""
    if entry.is_symlink():
        return "symlink" if entry.resolve() == model.resolve() else None
    if not entry.is_file():
        return None
    if os.path.samefile(entry, model):
        return "hardlink"
    a, b = entry.stat(), model.stat()
    return "copy" if (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns) else None


def link_model(model: str | Path, comfy: str | Path, folder: str) -> LinkResult:
    """Make ``model`` appear in ComfyUI's ``models/<folder>`` under its :func:`link_name`, without moving it.

    A hard link first: it is a file of ComfyUI's own folder, so a ComfyUI in a container or on another machine
    that mounts the folder reads it too. A symbolic link where the two folders are on different file systems (a
    ComfyUI that cannot follow it gets a copy instead, see :func:`run_preview`); a copy (same size and
    modification time, so it is recognised later) where links are not allowed. A file already there under that
    name is reused when it is this model (link, hard link or such a copy) and refused otherwise.
    """
    model, comfy = Path(model).absolute(), Path(comfy)
    if not model.is_file():
        raise OrthoMechaError("no such model file", model)
    folder_dir = _models_folder(comfy, folder)
    in_place = _in_place_name(model, folder_dir)
    if in_place is not None:
        return LinkResult(in_place, model, "in place", created=False)
    entry = folder_dir / link_name(model)
    if entry.is_symlink() or entry.exists():
        method = _links_to(entry, model)
        if method is None:
            raise OrthoMechaError(
                f"ComfyUI's {folder} folder already has a different '{entry.name}' ({entry}); rename your model or "
                "remove that file",
                model,
            )
        return LinkResult(entry.name, entry, method, created=False)
    for method, make in (("hardlink", os.link), ("symlink", os.symlink), ("copy", _copied)):
        try:
            make(model, entry)
        except (OSError, NotImplementedError) as exc:
            logger.info("cannot %s %s into %s (%s); trying the next way", method, model, folder_dir, exc)
            continue
        logger.info("%s %s → %s", method, model, entry)
        return LinkResult(entry.name, entry, method, created=True)
    raise OrthoMechaError(f"cannot link or copy the model into {folder_dir}; check its permissions", model)


def _copied(model: Path, entry: Path, overwrite: bool = False) -> None:
    """Copy ``model`` (its modification time too, by which :func:`_links_to` knows the copy) to ``entry``: written
    under a temporary name beside it (:func:`~ortho_mecha.fsutil.partial_path`) and moved into place, so ComfyUI
    never lists a half file."""
    temp = partial_path(entry)
    try:
        shutil.copy2(model, temp)
        place(temp, entry, overwrite)
    finally:
        temp.unlink(missing_ok=True)


def copy_in_place_of(link: LinkResult, model: Path) -> LinkResult:
    """Replace the symbolic link ``link`` (made by ortho-mecha) by a copy of ``model`` under the same name."""
    try:
        _copied(model, link.path, overwrite=True)
    except OSError as exc:
        raise OrthoMechaError(f"cannot copy the model into {link.path.parent} ({exc.strerror or exc})", model) from None
    logger.info("copied %s → %s in place of the symbolic link", model, link.path)
    return replace(link, method="copy")


def _cannot_open(link: LinkResult | None, error: OrthoMechaError) -> bool:
    """Whether ComfyUI failed to open the model through a symbolic link ortho-mecha made: its error names the
    linked file as missing. A ComfyUI in a container, or on another machine that mounts its models folder, lists
    the link but cannot follow it to the model's own path."""
    text = str(error)
    return (
        link is not None
        and link.method == "symlink"
        and link.created
        and link.name in text
        and any(word in text for word in ("FileNotFoundError", "No such file", "not found"))
    )


@contextmanager
def model_linked(model: str | Path, comfy: str | Path, folder: str, keep_link: bool = False) -> Iterator[LinkResult]:
    """:func:`link_model` for as long as a preview needs it.

    Previews of the same model at the same time (in other processes too, e.g. two dashboard jobs) share
    its link; the last one to finish removes it, if ortho-mecha made it and none asked to ``keep_link`` (a
    kept link is the user's from then on). Each preview using a link is an empty file named after its
    process in ``models/<folder>/.ortho-mecha-previews/<link name>/``, and one whose process is gone no longer
    counts: a killed preview's link goes with the next preview in that folder, and the bookkeeping folder
    goes with the last preview. One file lock per models folder keeps one process's linking and another's
    unlinking apart. A model ComfyUI lists in place is neither linked nor tracked.
    """
    model, comfy = Path(model).absolute(), Path(comfy)
    folder_dir = _models_folder(comfy, folder)
    if _in_place_name(model, folder_dir) is not None:
        yield link_model(model, comfy, folder)
        return
    tracking = folder_dir / LINK_USERS
    tracking.mkdir(exist_ok=True)
    lock = FileLock(tracking / "lock")
    me_name = f"preview-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with lock:
        link = link_model(model, comfy, folder)
        _remove_dead_links(tracking, keep=link.name)
        users = tracking / link.name
        users.mkdir(exist_ok=True)
        if link.created:
            (users / MADE).touch()
        (users / me_name).touch()
    try:
        yield link
    finally:
        with lock:
            (users / me_name).unlink(missing_ok=True)
            if keep_link:
                (users / MADE).unlink(missing_ok=True)
            _forget_if_unused(users, link.path)


def _forget_if_unused(users: Path, entry: Path) -> None:
    """With no live preview left in ``users``: remove the link ``entry`` if ortho-mecha made it, then ``users``."""
    if not users.is_dir() or _live_users(users):  # gone already (another preview found it unused), or in use
        return
    if (users / MADE).exists():
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
            logger.info("removed the preview link %s", entry)
        (users / MADE).unlink()
    if not any(users.iterdir()):
        users.rmdir()


def _remove_dead_links(tracking: Path, keep: str) -> None:
    """The links of previews whose processes are gone (killed), other than ``keep``, and their bookkeeping."""
    for users in tracking.iterdir():
        if users.is_dir() and users.name != keep:
            _forget_if_unused(users, tracking.parent / users.name)


def _live_users(users: Path) -> list[Path]:
    """The previews still using a link (files ``preview-<pid>-<id>``); those of gone processes are removed."""
    live = []
    for entry in users.glob("preview-*"):
        pid = entry.name.split("-")[1]
        if pid.isdigit() and process_exists(int(pid)):
            live.append(entry)
        else:
            entry.unlink(missing_ok=True)
    return live


# --------------------------------------------------------------------------------------------------
# Running one preview


@dataclass(frozen=True)
class Progress:
    """A poll's view of the job: ``pending`` (with jobs ahead) or ``running``, and seconds since queueing."""

    prompt_id: str
    state: str
    ahead: int
    elapsed: float

    @property
    def where(self) -> str:
        """The job's place for a person: "running", or "queued, 2 job(s) ahead"."""
        return "running" if self.state == "running" else f"queued, {self.ahead} job(s) ahead"


@dataclass(frozen=True)
class PreviewImage:
    """One image, as bytes, and where ComfyUI keeps it."""

    data: bytes
    ref: ImageRef

    @property
    def suffix(self) -> str:
        return Path(self.ref.filename).suffix or ".png"


@dataclass(frozen=True)
class PreviewResult:
    """What was run and what came out."""

    model: Path
    model_name: str  # the name ComfyUI knows the model by
    arch: str
    prompt_id: str
    graph: Graph
    seed: int | None  # None: the user's workflow sets its own noise
    resolved: Resolved | None  # None for the user's own workflow
    images: list[PreviewImage]
    link: LinkResult | None  # None when COMFYUI_DIR is not set


def _finished(entry: Mapping[str, Any], prompt_id: str, url: str) -> Mapping[str, Any]:
    """Return a successful history entry; raise with ComfyUI's own reason for a failed one."""
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return entry
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            message = " ".join(str(data.get("exception_message", "")).split())
            raise OrthoMechaError(
                f"ComfyUI at {url} failed running node {data.get('node_id', '?')} ({data.get('node_type', '?')}): "
                f"{data.get('exception_type', 'error')}: {message or 'no message'}"
            )
        if kind == "execution_interrupted":
            raise OrthoMechaError(
                f"ComfyUI at {url} interrupted prompt {prompt_id} (cancelled in ComfyUI or by /interrupt)"
            )
    raise OrthoMechaError(f"ComfyUI at {url} reports prompt {prompt_id} failed, without saying why; see its console")


def wait_for(
    client: ComfyClient,
    prompt_id: str,
    time_limit: float = DEFAULT_TIME_LIMIT,
    progress: Callable[[Progress], None] | None = None,
    poll_interval: float = 0.5,
) -> Mapping[str, Any]:
    """Poll until ``prompt_id`` is in the history; cancel it and raise after ``time_limit`` seconds. Whatever
    else stops the wait — Ctrl-C, or ``progress`` raising (a dashboard job being cancelled) — cancels the prompt
    in ComfyUI too (:func:`cancel_quietly`), so it does not go on blocking the queue."""
    url = client.base_url
    start = time.monotonic()
    try:
        while True:
            entry = client.history(prompt_id)
            if entry is not None:
                return _finished(entry, prompt_id, url)
            place = client.place(prompt_id)
            if place is None:
                entry = client.history(prompt_id)  # it may have finished between the two requests
                if entry is not None:
                    return _finished(entry, prompt_id, url)
                raise OrthoMechaError(
                    f"ComfyUI at {url} lost prompt {prompt_id}: it is neither queued nor in the history (was ComfyUI "
                    "restarted or its queue cleared?)"
                )
            elapsed = time.monotonic() - start
            if progress is not None:
                progress(Progress(prompt_id, place.state, place.ahead, elapsed))
            if elapsed > time_limit:
                client.cancel(prompt_id)
                waiting = (f"it never started: {place.ahead} job(s) of ComfyUI's queue were still ahead of it; "
                           if place.state == "pending" else "")
                raise OrthoMechaError(
                    f"ComfyUI at {url} did not finish prompt {prompt_id} within {time_limit:g} s, so it was cancelled; "
                    f"{waiting}allow more time with --timeout"
                )
            time.sleep(poll_interval)
    except ComfyUnreachable as exc:
        raise OrthoMechaError(
            f"ComfyUI at {url} stopped answering while prompt {prompt_id} was queued or running ({exc.reason}); it "
            "may have crashed or been restarted, see its console"
        ) from None
    except OrthoMechaError:
        raise  # ComfyUI's own failure, or the time limit's (cancelled already)
    except BaseException:
        cancel_quietly(client, prompt_id)
        raise


def cancel_quietly(client: ComfyClient, prompt_id: str) -> None:
    """Take ``prompt_id`` off ComfyUI's queue (or interrupt it); a server that does not answer is only logged."""
    try:
        client.cancel(prompt_id)
    except OrthoMechaError as error:
        logger.warning("could not cancel prompt %s in ComfyUI: %s", prompt_id, error)
    else:
        logger.info("cancelled prompt %s in ComfyUI at %s", prompt_id, client.base_url)


def image_refs(entry: Mapping[str, Any]) -> list[ImageRef]:
    """The images a finished prompt produced, by output node id."""
    refs = []
    outputs = entry.get("outputs") or {}
    for node_id in sorted(outputs, key=lambda n: (len(n), n)):
        for image in outputs[node_id].get("images", []):
            refs.append(ImageRef(node_id, image["filename"], image.get("subfolder", ""), image.get("type", "output")))
    return refs


def header_tensors(model: Path) -> Mapping[str, Any] | None:
    """The tensors a model file's safetensors header lists (None for another kind of file). ``.sft`` is the
    name some Flux releases gave their safetensors files; ComfyUI lists it too."""
    if model.suffix.lower() not in READ_SUFFIXES:
        return None
    from ortho_mecha.io import parse_header  # imports torch; only needed here

    return parse_header(model)[0]


def refuse_lora(tensors: Mapping[str, Any] | None, model: Path) -> None:
    """Raise if ``model`` (its header ``tensors``) is a LoRA: a built-in workflow loads a model, which a LoRA is not."""
    from ortho_mecha.lora_rows import is_lora  # imports torch; only needed here

    if tensors is not None and is_lora(tensors):
        raise OrthoMechaError(
            "is a LoRA, which the built-in workflows cannot load as a model; to see it on its base, sweep a plan "
            "that holds it as a row, comparing the base and each model (`ortho-mecha preview --plan PLAN.json "
            "--alphas 1 --compare`; on the Preview page: Alpha sweep, \"Also preview the base and each model\")",
            model,
        )


ALL_IN_ONE_PARTS = (("text_encoders.", "cond_stage_model."), ("vae.", "first_stage_model."))  # COMFYUI.md
OTHER_PARTS = (*ALL_IN_ONE_PARTS[0], *ALL_IN_ONE_PARTS[1], "conditioner.")  # SDXL's text encoders: conditioner.
# the key prefixes of each text encoder an SD1.5/SDXL checkpoint carries (COMFYUI.md; components.COMPONENTS)
SD_TEXT_PARTS = {"sd1": ("cond_stage_model.",), "sdxl": ("conditioner.embedders.0.", "conditioner.embedders.1.")}


def model_facts(tensors: Mapping[str, Any] | None, arch: str) -> ModelFacts:
    """The variant hints the built-in workflows use (Flux.2 text width, Flux.1 guidance, an all-in-one checkpoint
    holding its text encoders and VAE), from the file's header tensors (:func:`header_tensors`)."""
    if tensors is None:
        return ModelFacts()
    from ortho_mecha.validate import is_checkpoint  # imports torch; only needed here

    all_in_one = is_checkpoint(tensors) and all(
        any(name.startswith(prefixes) for name in tensors) for prefixes in ALL_IN_ONE_PARTS)
    if arch in SD_TEXT_PARTS:  # a checkpoint lacking a text encoder or its VAE (pruned, "no-VAE") needs the files
        return ModelFacts(
            all_in_one=all_in_one,
            diffusion_only=not all(any(name.startswith(part) for name in tensors) for part in SD_TEXT_PARTS[arch]),
            no_vae=not any(name.startswith("first_stage_model.") for name in tensors),
        )
    diffusion_only = not any(name.startswith(OTHER_PARTS) for name in tensors)
    if arch not in ("flux1", "flux2-klein"):
        return ModelFacts(all_in_one=all_in_one, diffusion_only=diffusion_only)

    def find(key: str) -> Any:  # a bare diffusion model, or a checkpoint's
        return tensors.get(key) or tensors.get(f"model.diffusion_model.{key}")

    txt_in = find("txt_in.weight") or find("context_embedder.weight")  # diffusers names the text input so
    text_dim = txt_in.shape[1] if txt_in is not None and len(txt_in.shape) == 2 else None
    guidance = (find("guidance_in.in_layer.weight") is not None
                or any(".guidance_embedder." in name for name in tensors))  # diffusers: time_text_embed.guidance_…
    return ModelFacts(text_dim=text_dim, guidance=guidance, all_in_one=all_in_one, diffusion_only=diffusion_only)


def _user_workflow_check(settings: PreviewSettings) -> None:
    overridden = [
        flag
        for flag, value in (("--steps", settings.steps), ("--cfg", settings.cfg), ("--size", settings.size),
                            ("--vae", settings.vae))
        if value is not None
    ]
    overridden += ["--clip"] if settings.clip else []
    if overridden:
        raise OrthoMechaError(
            f"{', '.join(overridden)} cannot be applied to your own workflow; set those values in ComfyUI and "
            'export it again with "Save (API)"'
        )


def check_arch(model: Path, tensors: Mapping[str, Any] | None, arch: str) -> None:
    """Refuse to render ``model`` (its header ``tensors``) with the built-in workflow of another architecture
    than its keys show."""
    if tensors is None:
        return
    from ortho_mecha.validate import file_arch  # imports torch; only needed here

    found = file_arch(tensors)
    if found == "custom" and any(name.endswith("img_in_patch.weight") for name in tensors):
        raise OrthoMechaError(
            f"its keys are those of a pixel-space model (Chroma Radiance: img_in_patch, nerf blocks), which the "
            f"built-in {arch} workflow cannot run (it decodes latents with a VAE): preview it with your own workflow "
            "(--workflow, or the Preview page's 'Your own workflow')", model)
    if found not in ("custom", arch):
        raise OrthoMechaError(
            f"its keys are those of a {found} model, not {arch}: preview it as {found} (or with your own workflow)",
            model,
        )


def _builtin_files(tensors: Mapping[str, Any] | None, arch: str) -> tuple[ModelFacts, ArchSpec]:
    """(the variant hints of a file of these header ``tensors``, ``arch``'s built-in files and loaders for it)."""
    facts = model_facts(tensors, arch_id(arch))
    return facts, file_spec(arch, facts)


def _builtin_graph(model: Path, model_name: str, tensors: Mapping[str, Any] | None, files: tuple[ModelFacts, ArchSpec],
                   settings: PreviewSettings, info: Mapping[str, Any], url: str) -> tuple[Graph, Resolved]:
    """The built-in graph of ``files`` (:func:`_builtin_files`) for ``model`` (listed as ``model_name``; its header
    ``tensors``, for the checks), its text encoders and VAE chosen from ``info``."""
    facts, spec = files
    check_arch(model, tensors, spec.arch)
    te_options: list[str] = []
    if len(spec.text_encoders) == 2:
        te_options = _options(info, "DualCLIPLoader", "clip_name1")
    elif spec.text_encoders:
        te_options = _options(info, "CLIPLoader", "clip_name")
    vae_options = _options(info, "VAELoader", "vae_name") if spec.vae or settings.vae else []
    try:
        resolved = resolve(spec, settings, te_options, vae_options, facts, f"ComfyUI at {url}")
    except OrthoMechaError as error:  # said together with the nodes ComfyUI lacks, so one run names everything
        missing = _missing_classes(spec, model_name, info)
        if not missing:
            raise
        raise OrthoMechaError("; ".join([*(missing_node_message(url, c, None) for c in missing), str(error)])) from None
    for doubt in named_file_doubts(spec, settings, facts):
        logger.warning("%s", doubt)  # a warning: the names may mislead, ComfyUI's answer decides
    if (why := unused_negative(resolved)) is not None:
        logger.warning("%s", why)
    return spec.build(model_name, resolved), resolved


def named_files_doubts(model: Path, arch: str, settings: PreviewSettings) -> list[str]:
    """:func:`~ortho_mecha.workflows.named_file_doubts` of the text encoders and VAE ``settings`` name, for
    ``model`` rendered with ``arch``'s built-in workflow."""
    facts, spec = _builtin_files(header_tensors(model), arch)
    return named_file_doubts(spec, settings, facts)


def _missing_classes(spec: ArchSpec, model_name: str, info: Mapping[str, Any]) -> list[str]:
    """The node classes of ``spec``'s built-in graph that ComfyUI (its ``info``) lacks, in graph order."""
    placeholder = Resolved("", "", 0, 1, 1.0, 64, 64, ("",) * len(spec.text_encoders),
                           "" if spec.vae else None)
    classes = [node["class_type"] for node in spec.build(model_name, placeholder).values()]
    return [c for c in dict.fromkeys(classes) if c not in info]


def _as_listed(name: str, options: Sequence[str]) -> str:
    """``name``, a path under a models folder (``flux/x.safetensors``), as ComfyUI spells it in its ``options``: a
    ComfyUI on Windows lists ``flux\\x.safetensors``."""
    return next((option for option in options if option.replace("\\", "/") == name), name)


def _listed_name(model: Path, folder: str | None, options: Sequence[str]) -> str | None:
    """The name ComfyUI lists ``model`` under when the file lies in a ``models/<folder>`` tree (a subfolder
    name such as ``flux/x.safetensors``), found without COMFYUI_DIR: the listed name must be the path's tail,
    after ``models/<folder>/``."""
    if folder is None:
        return None
    tail = model.absolute().as_posix()
    for option in sorted(options, key=len, reverse=True):
        name = option.replace("\\", "/")
        if any(tail.endswith(f"/models/{where}/{name}") for where in (folder, *FOLDER_ALIASES.get(folder, ()))):
            return option
    return None


def _name_without_comfy_dir(model: Path, folder: str | None, options: Sequence[str], url: str) -> str | None:
    """:func:`_listed_name`, or None when ComfyUI lists ``model`` nowhere; an error when it lists a file of the
    same name that is not this one's path: ComfyUI lists no sizes or dates, so nothing tells that it is this
    file, and a preview of it could show other weights."""
    listed = _listed_name(model, folder, options)
    namesakes = [option for option in options if option.replace("\\", "/").rsplit("/", 1)[-1] == model.name]
    if listed is None and namesakes:
        raise OrthoMechaError(
            f"ComfyUI at {url} lists a '{namesakes[0]}' in its {folder} folder, but this file does not lie in a "
            f"ComfyUI models/{folder} folder, so that may be another file: set COMFYUI_DIR to your ComfyUI folder "
            "so that ortho-mecha links this one (on the Preview page: the ComfyUI folder field)",
            model,
        )
    return listed


def preflight(arch: str, settings: PreviewSettings, *, client: ComfyClient, comfy: Path | None, model: Path,
              out: Path | None = None, listed: Sequence[Path] = ()) -> None:
    """Check, before any merge is written, that ComfyUI answers and can run ``arch``'s built-in graph: its node
    classes, text encoders and VAE (the model itself, not made yet, is left out). ``model`` is a file of the
    same variant (the plan's base) for the choices that depend on it.

    Without ``comfy`` (COMFYUI_DIR) nothing can be linked: the merges to be written in ``out`` must land in
    ComfyUI's models folder for the loader, and the existing models ``listed`` (a sweep's base and rows) must
    be ones ComfyUI lists already.
    """
    if comfy is not None:
        _require_models(comfy)
    info = client.object_info()
    tensors = header_tensors(model)
    files = _builtin_files(tensors, arch)  # the merges are laid out as the base is
    graph, _ = _builtin_graph(model, model.name, tensors, files, settings, info, client.base_url)
    problems = [p for p in find_problems(graph, info) if not (p.kind == "not_in_list" and p.input in MODEL_INPUTS)]
    if problems:
        raise OrthoMechaError("; ".join(describe_problem(p, client.base_url, "") for p in problems))
    if comfy is None:
        spec = files[1]
        folder = FILE_FOLDERS[spec.model_input]
        where = (folder, *FOLDER_ALIASES.get(folder, ()))
        if out is not None and not any(f"/models/{w}/" in f"{out.absolute().as_posix()}/" for w in where):
            raise OrthoMechaError(
                f"ComfyUI only sees the sweep's merges in its models/{folder} folder: set COMFYUI_DIR to your "
                "ComfyUI folder (each merge is linked there while it is previewed; on the Preview page: the "
                "ComfyUI folder field), or write the sweep into that folder with --out",
                out,
            )
        options = combo_options(input_spec(info, spec.loader, spec.model_input)) or []
        for path in listed:
            if _name_without_comfy_dir(path, folder, options, client.base_url) is None:
                raise OrthoMechaError(
                    f"is not in ComfyUI's {folder} list at {client.base_url}, so it cannot be previewed beside the "
                    "sweep: set COMFYUI_DIR to your ComfyUI folder so ortho-mecha can link it",
                    path,
                )


def run_preview(
    model: str | Path,
    arch: str,
    settings: PreviewSettings,
    *,
    client: ComfyClient,
    comfy: Path | None = None,
    workflow: Graph | None = None,
    bindings: Bindings | None = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
    progress: Callable[[Progress], None] | None = None,
    keep_link: bool = False,
    poll_interval: float = 0.5,
) -> PreviewResult:
    """Render ``model`` with ``arch``'s built-in workflow, or with the user's own ``workflow``.

    With ``comfy`` (ComfyUI's folder) the model is linked into its models folder first and, unless
    ``keep_link``, unlinked afterwards (see :func:`model_linked`), whatever fails in between.
    Without it, the model must lie in ComfyUI's models folder, where ComfyUI lists it already (a file elsewhere
    that has the name of one ComfyUI lists is refused). Returns the image bytes.
    """
    model = Path(model)
    if not model.is_file():
        raise OrthoMechaError("no such model file", model)
    arch = arch_id(arch)
    url = client.base_url
    tensors = header_tensors(model) if workflow is None else None  # read once, for the loader and the graph
    if workflow is None:
        refuse_lora(tensors, model)
        files = _builtin_files(tensors, arch)  # an all-in-one checkpoint: its loader
        model_class, model_input = files[1].loader, files[1].model_input
    else:
        _user_workflow_check(settings)
        bindings = bindings or find_bindings(workflow)
        model_class, model_input = workflow[bindings.model.node]["class_type"], bindings.model.input
    folder = FILE_FOLDERS.get(model_input)
    if comfy is not None and folder is None:
        raise OrthoMechaError(
            f"cannot tell which ComfyUI models folder {model_class}.{model_input} reads; put the model there "
            "yourself and unset COMFYUI_DIR"
        )
    info = client.object_info()
    link: LinkResult | None = None
    with ExitStack() as linked:
        if comfy is not None:
            link = linked.enter_context(model_linked(model, comfy, folder, keep_link))
            if link.created:
                info = client.object_info()  # the file lists changed
            model_name = _as_listed(link.name, _options(info, model_class, model_input))
            where = "lies in ComfyUI's folder as" if link.method == "in place" else "is linked as"
            model_hint = (
                f"it {where} {link.path}, yet ComfyUI does not list it: is COMFYUI_DIR ({comfy}) the folder of "
                f"the ComfyUI at {url}?"
            )
        else:
            options = _options(info, model_class, model_input)
            model_name = _name_without_comfy_dir(model, folder, options, url) or model.name  # not listed: said below
            model_hint = (
                "set COMFYUI_DIR so ortho-mecha can link it, or copy it to <ComfyUI folder>/models/"
                f"{folder or '<the loader folder>'}"
            )
        resolved: Resolved | None = None
        if workflow is None:
            graph, resolved = _builtin_graph(model, model_name, tensors, files, settings, info, url)
            seed: int | None = resolved.seed
        else:
            graph = apply_bindings(workflow, bindings, model_name, settings)
            seed = bound_seed(graph, bindings)
        problems = find_problems(graph, info)
        if problems:
            own = workflow is not None
            raise OrthoMechaError("; ".join(describe_problem(p, url, model_hint, own) for p in problems))
        while True:
            prompt_id = client.queue_prompt(graph)
            logger.info("queued prompt %s on %s", prompt_id, url)
            try:
                entry = wait_for(client, prompt_id, time_limit, progress, poll_interval)
            except OrthoMechaError as error:
                if not _cannot_open(link, error):
                    raise
                logger.warning("ComfyUI at %s cannot follow the symbolic link %s (a ComfyUI in a container or on "
                               "another machine?); copying the model there instead and trying again", url, link.path)
                link = copy_in_place_of(link, model.absolute())
                continue
            break
        refs = image_refs(entry)
        if not refs:
            raise OrthoMechaError(
                f"ComfyUI at {url} finished prompt {prompt_id} without images; does the workflow end in SaveImage or "
                "PreviewImage?"
            )
        images = [PreviewImage(client.view(ref), ref) for ref in refs]
    return PreviewResult(model, model_name, arch, prompt_id, graph, seed, resolved, images, link)


def save_images(images: Sequence[PreviewImage], out_dir: str | Path, stem: str) -> list[Path]:
    """Write the images as ``<stem>_<n>.png`` in ``out_dir``, never over an existing file, each atomically
    (:func:`~ortho_mecha.fsutil.atomic_write_bytes`: a hidden partial file moved into place, so a full disk leaves
    no half image under the name); a failure is an error naming the image's file."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OrthoMechaError(f"cannot create the output folder ({exc.strerror or exc})", out_dir) from None
    written: list[Path] = []
    number = 1
    for image in images:
        while True:
            path = out_dir / f"{stem}_{number:03d}{image.suffix}"
            number += 1
            try:
                written.append(atomic_write_bytes(path, image.data))
                break
            except OrthoMechaError:
                if os.path.lexists(path):  # the name is taken (an earlier image, or one written meanwhile)
                    continue
                raise
    return written


# --------------------------------------------------------------------------------------------------
# CLI


def _print_progress() -> Callable[[Progress], None] | None:
    """Progress lines for a person at a terminal; none otherwise (a failing command prints one line only)."""
    if not sys.stderr.isatty():
        return None
    last: list[tuple[str, int]] = []

    def show(p: Progress) -> None:
        now = (p.state, p.ahead)
        if last and last[-1] == now:
            return
        last.append(now)
        print(f"ortho-mecha: prompt {p.prompt_id} {p.where}", file=sys.stderr)

    return show


def settings_from_args(args: argparse.Namespace) -> PreviewSettings:
    """The preview settings the ``preview`` command's options ask for."""
    if args.timeout <= 0:
        raise OrthoMechaError(f"--timeout must be positive, got {args.timeout}")
    return PreviewSettings(
        prompt=args.prompt,
        negative=args.negative,
        seed=args.seed,
        steps=args.steps,
        cfg=args.cfg,
        size=parse_size(args.size) if args.size else None,
        clip=tuple(args.clip or ()),
        vae=args.vae,
    )


def builtin_arch_of(model: str | Path, tensors: Mapping[str, Any] | None = None) -> str | None:
    """The built-in architecture whose keys ``model`` has (its header ``tensors``, read when not given), or None
    (``custom``). A Flux.1 transformer in diffusers' layout is ``flux1``: UNETLoader loads it as one."""
    from ortho_mecha.arch import is_diffusers_flux
    from ortho_mecha.io import refuse_unsupported
    from ortho_mecha.validate import file_arch

    tensors = header_tensors(Path(model)) if tensors is None else tensors
    if tensors is None:
        refuse_unsupported(Path(model))  # says what the file is and what to do instead
    detected = file_arch(tensors)
    if detected == "custom" and is_diffusers_flux(tensors):  # ComfyUI's UNETLoader converts it to its Flux.1
        return "flux1"
    return None if detected == "custom" else detected


def detected_arch(model: str | Path, workflow: bool, choose: str) -> str:
    """:func:`builtin_arch_of` ``model``; with none, ``custom`` for the user's own ``workflow``, else an error
    saying how to ``choose`` one (a LoRA, which only a user's workflow can load, is refused without one)."""
    tensors = header_tensors(Path(model))
    if not workflow:
        refuse_lora(tensors, Path(model))
    detected = builtin_arch_of(model, tensors)
    if detected is not None:
        return detected
    if workflow:
        return "custom"
    raise OrthoMechaError(
        f"its keys match none of the built-in architectures ({', '.join(BUILTIN_ARCHS)}); {choose}", model
    )


def preview_arch(arch: str | None, model: str | Path, workflow: bool = False) -> str:
    """``arch`` as given, or the one :func:`detected_arch` finds in ``model``'s keys (said on stderr)."""
    if arch:
        return arch
    detected = detected_arch(model, workflow, "give --arch, or your own workflow with --workflow FILE.json")
    print(f"ortho-mecha: architecture {detected} (detected from {Path(model).name}; --arch to choose)",
          file=sys.stderr)
    return detected


def _apply(flags: Sequence[str]) -> str:
    return "applies" if len(flags) == 1 else "apply"


def workflow_marks(args: argparse.Namespace) -> dict[str, str | None]:
    """The NODE.INPUT places the user marked for their own workflow (``--set-model`` …), by role."""
    return {"model": args.set_model, "prompt": args.set_prompt, "negative": args.set_negative, "seed": args.set_seed}


def cli_preview(args: argparse.Namespace) -> int:
    """``ortho-mecha preview``: render one preview through ComfyUI and write the images to ``--out``."""
    if args.plan:
        from ortho_mecha.sweep import cli_sweep

        return cli_sweep(args)
    if not args.model:
        raise OrthoMechaError("preview needs a MODEL to render, or --plan PLAN.json for an alpha sweep")
    if sweep_only := [flag for flag, given in (("--alphas", args.alphas is not None), ("--compare", args.compare))
                      if given]:
        raise OrthoMechaError(f"{', '.join(sweep_only)} {_apply(sweep_only)} only to an alpha sweep "
                              "(--plan PLAN.json), not to one MODEL")
    settings = settings_from_args(args)
    marks = workflow_marks(args)
    workflow = bindings = None
    if args.workflow:
        workflow = load_workflow(args.workflow)
        bindings = find_bindings(workflow, **marks, path=Path(args.workflow))
    elif any(marks.values()):
        given = [f"--set-{role}" for role, mark in marks.items() if mark]
        raise OrthoMechaError(f"{', '.join(given)} {_apply(given)} only to your own workflow (--workflow FILE.json)")
    arch = preview_arch(args.arch, args.model, workflow=workflow is not None)
    client = ComfyClient(args.api, timeout=min(HTTP_TIMEOUT, args.timeout))
    with output_folder(args.out) as out:  # made first: a folder that cannot be made fails before the render
        result = run_preview(
            args.model,
            arch,
            settings,
            client=client,
            comfy=comfy_dir(args.comfy_dir),
            workflow=workflow,
            bindings=bindings,
            time_limit=args.timeout,
            progress=_print_progress(),
            keep_link=args.keep_link,
        )
        seed = "" if result.seed is None else f"_seed{result.seed}"
        written = save_images(result.images, out, f"{result.model.stem}{seed}")
    if result.resolved is not None:
        r = result.resolved
        files = ", ".join([*r.text_encoders, *([r.vae] if r.vae else [])]) or "from the checkpoint"
        print(
            f"ortho-mecha: {result.arch} {r.width}x{r.height}, {r.steps} steps, {'guidance' if r.guided else 'cfg'} "
            f"{r.cfg:g}, seed {r.seed}; "
            f"text encoders/VAE: {files}",
            file=sys.stderr,
        )
    for path in written:
        print(path)
    return 0
