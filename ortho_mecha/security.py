"""Serving the dashboard safely: the password gate, the folders models may come from, output names.

The dashboard binds to 127.0.0.1 (``.streamlit/config.toml``). Bound to any other address it is
reachable from other machines, so it then refuses to run without a password (``ORTHO_MECHA_PASSWORD``
in the environment or in ``.streamlit/secrets.toml``). Whatever the binding, a browser only picks
model files inside the allowed roots (``ORTHO_MECHA_ROOTS``, else the workspace and ComfyUI's model
folders), resolved with symlinks followed, and only names plain ``.safetensors`` outputs.

Nothing here imports streamlit: the app reads ``server.address`` and ``st.secrets`` and passes them in.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ortho_mecha.errors import OrthoMechaError

logger = logging.getLogger(__name__)

PASSWORD_VARIABLE = "ORTHO_MECHA_PASSWORD"
ROOTS_VARIABLE = "ORTHO_MECHA_ROOTS"
WORKSPACE_VARIABLE = "ORTHO_MECHA_WORKSPACE"
COMFYUI_VARIABLE = "COMFYUI_DIR"
MODEL_SUFFIX = ".safetensors"
READ_SUFFIXES = (MODEL_SUFFIX, ".sft")  # model files read, in any case (".sft": an early Flux name)
MAX_OUTPUT_NAME = 200

_OUTPUT_CHARACTERS = re.compile(r"[A-Za-z0-9._ -]")


# --- binding and password ------------------------------------------------------------------------


def is_lan_address(address: str | None) -> bool:
    """Whether a server bound to ``address`` is reachable from other machines.

    Unset, empty, ``0.0.0.0`` and ``::`` mean every interface; any address or host name other than a
    loopback one (``127.x.y.z``, ``::1``, ``localhost``) counts as reachable.
    """
    host = (address or "").strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost" or host.endswith(".localhost"):
        return False
    if not host:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True  # a host name: it resolves to some interface of this machine, which we cannot vouch for
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_loopback


def password_required(address: str | None) -> bool:
    """Whether the dashboard may only run with a password: when bound to ``address`` it serves other machines."""
    return is_lan_address(address)


def require_password_for_lan(address: str | None, password: str | None) -> None:
    """Refuse to serve other machines without a password; ``address`` is Streamlit's ``server.address``."""
    if password_required(address) and password is None:
        where = f"address {address}" if address else "every network interface"
        raise OrthoMechaError(
            f"the dashboard is bound to {where}, so other machines can reach it, but no password is set; "
            f"set {PASSWORD_VARIABLE} (environment variable or .streamlit/secrets.toml) "
            'or bind it to this machine only with server.address = "127.0.0.1" in .streamlit/config.toml'
        )


def configured_password(secrets: Mapping[str, Any] | None = None) -> str | None:
    """The dashboard password: ``$ORTHO_MECHA_PASSWORD``, else that key of ``secrets`` (``st.secrets``).

    An empty or blank value counts as unset; None when neither gives one.
    """
    from_environment = os.environ.get(PASSWORD_VARIABLE, "")
    if from_environment.strip():
        return from_environment
    if secrets is None:
        return None
    try:
        value = secrets.get(PASSWORD_VARIABLE)
    except FileNotFoundError as error:
        # Streamlit raises a FileNotFoundError both when there is no secrets file (fine: no password)
        # and when one cannot be read (which must not pass for "no password").
        if getattr(error, "error_id", None) == "no-secrets-found":
            return None
        raise OrthoMechaError(f"cannot read the Streamlit secrets: {error}; fix or remove the file") from error
    if value is None:
        return None
    if not isinstance(value, str):
        raise OrthoMechaError(
            f"{PASSWORD_VARIABLE} in the Streamlit secrets must be text, got a {type(value).__name__}; "
            f'write it in quotes, e.g. {PASSWORD_VARIABLE} = "..."'
        )
    return value if value.strip() else None


def check_password(given: str, expected: str) -> bool:
    """Whether ``given`` is the password, compared in constant time; an empty expected password never matches."""
    if not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class SignInLimiter:
    """Slows password guessing down, per client (its IP address): the first ``free`` wrong passwords in a row
    cost nothing; from then on each attempt must wait ``first_wait`` seconds, doubling with every further
    wrong one, up to ``max_wait``. A right password clears the client's count; so does ``forget_after``
    seconds without an attempt. At most ``max_clients`` clients are remembered (the longest quiet dropped
    first), so a flood of addresses cannot grow the server's memory. Thread-safe: sessions run on their
    own threads.
    """

    def __init__(self, free: int = 5, first_wait: float = 2.0, max_wait: float = 300.0,
                 forget_after: float = 3600.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.first_wait, self.max_wait = free, first_wait, max_wait
        self.forget_after, self.max_clients, self.clock = forget_after, max_clients, clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client → (count, last failure)
        self._lock = threading.Lock()

    def wait_seconds(self, client: str) -> float:
        """How long ``client`` must wait before its next attempt is checked (0: it may try now)."""
        with self._lock:
            count, last = self._current(client)
            if count < self.free:
                return 0.0
            wait = min(self.max_wait, self.first_wait * 2 ** (count - self.free))
            return max(0.0, last + wait - self.clock())

    def failed(self, client: str) -> None:
        """Count a wrong password from ``client``."""
        with self._lock:
            count, _ = self._current(client)
            self._failures[client] = (count + 1, self.clock())
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        """A right password from ``client``: its count starts over."""
        with self._lock:
            self._failures.pop(client, None)

    def _current(self, client: str) -> tuple[int, float]:
        count, last = self._failures.get(client, (0, 0.0))
        if count and self.clock() - last > self.forget_after:
            del self._failures[client]
            return 0, 0.0
        return count, last


SIGN_IN_LIMITER = SignInLimiter()  # the dashboard server's, shared by all its sessions


def attempt_sign_in(given: str, expected: str, client: str, limiter: SignInLimiter | None = None) -> str | None:
    """Check a password typed by ``client`` (its IP address) against ``limiter`` (default: the server's
    :data:`SIGN_IN_LIMITER`): None when it is let in, else the message to show. While the client must wait,
    even the right password is not checked."""
    limiter = SIGN_IN_LIMITER if limiter is None else limiter
    wait = limiter.wait_seconds(client)
    if wait > 0:
        return f"too many wrong passwords from this address: try again in {math.ceil(wait)} s"
    if check_password(given, expected):
        limiter.succeeded(client)
        return None
    limiter.failed(client)
    logger.warning("wrong dashboard password from %s", client)
    return "wrong password"


# --- model folders -------------------------------------------------------------------------------


def workspace_dir() -> Path:
    """The workspace: ``$ORTHO_MECHA_WORKSPACE`` or ``~/ortho-mecha-workspace``; demo models live in its ``models/``."""
    configured = os.environ.get(WORKSPACE_VARIABLE, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / "ortho-mecha-workspace"


def allowed_roots() -> list[Path]:
    """The folders model files may be chosen from.

    ``$ORTHO_MECHA_ROOTS`` (folders separated by ``os.pathsep``) when set, exactly those; otherwise the
    workspace plus, when ``$COMFYUI_DIR`` is set, its ``models/diffusion_models`` and ``models/checkpoints``.
    """
    configured = [entry.strip() for entry in os.environ.get(ROOTS_VARIABLE, "").split(os.pathsep)]
    roots = [Path(entry).expanduser() for entry in configured if entry]
    if not roots:
        roots = [workspace_dir()]
        comfyui = os.environ.get(COMFYUI_VARIABLE, "").strip()
        if comfyui:
            models = Path(comfyui).expanduser() / "models"
            roots += [models / "diffusion_models", models / "checkpoints"]
    unique: list[Path] = []
    for root in roots:
        if root.absolute() not in unique:
            unique.append(root.absolute())
    return unique


def resolve_model_path(user_path: str | Path, roots: Iterable[Path]) -> Path:
    """The real path of a model file a user named, which must lie inside one of ``roots``.

    Symlinks are followed and ``..`` collapsed before the check, so neither can lead outside; the
    real file must be a ``.safetensors`` file. A relative path is looked up in each root in turn.
    """
    roots = list(roots)
    real_roots = [real for real in map(_real, roots) if real is not None]
    text = str(user_path).strip()
    if not text:
        raise OrthoMechaError(f"no model file given; choose a {MODEL_SUFFIX} file under {_listing(roots)}")
    if "\0" in text:
        raise OrthoMechaError(f"{text!r} is not a file path (it contains a NUL character)")
    given = Path(text).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    resolved = [_real(candidate) for candidate in candidates]
    inside = [real for real in resolved if real is not None and _inside(real, real_roots)]
    if not inside and None in resolved:
        raise OrthoMechaError("cannot be resolved: a symlink loop or an unreadable link; point it at a real file", text)
    if not inside:
        raise OrthoMechaError(
            f"outside the allowed model folders: {_listing(roots)}; choose a file under one of them "
            f"or add its folder to {ROOTS_VARIABLE}",
            text,
        )
    existing = [real for real in inside if real.is_file()]
    if not existing:
        raise OrthoMechaError(f"no such model file in the allowed model folders ({_listing(roots)})", text)
    real = existing[0]
    if real.suffix.lower() not in READ_SUFFIXES:
        shown = "" if real.name == given.name else f" (it links to {real.name})"
        raise OrthoMechaError(
            f"not a {MODEL_SUFFIX} file{shown}; only safetensors models are read "
            "(pickle checkpoints such as .ckpt, .pt or .bin are never opened)",
            text,
        )
    return real


def unmergeable_name(path: Path) -> str | None:
    """Why sd-mecha, which merges, will not open a model file named so (``.sft``, ``.SAFETENSORS``: the analysis
    reads them), with the remedy; None for a name it opens."""
    if path.suffix == MODEL_SUFFIX:
        return None
    return (f"sd-mecha, which merges, opens only files named *{MODEL_SUFFIX}: rename or link it as "
            f"{path.stem}{MODEL_SUFFIX}")


def utf8_name(path: str | Path) -> bool:
    """Whether ``path`` is valid UTF-8 text: names that are not (Latin-1 names from old archives) cannot go into a
    JSON report, a browser or a merged file's metadata."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def list_models(roots: Iterable[Path]) -> list[Path]:
    """Every ``.safetensors`` file under ``roots`` that ``resolve_model_path`` accepts, sorted (:func:`scan_models`)."""
    return scan_models(roots)[0]


def scan_models(roots: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(every ``.safetensors`` file under ``roots`` that ``resolve_model_path`` accepts, sorted; the symbolic links
    under ``roots`` to model files or folders outside every root, sorted: not listed, so that a page can say why).

    Linked folders are not entered; a linked file is listed only when its target is inside a root; a
    file reachable by several paths is listed once, by its own path when that is under a root.
    """
    roots = list(roots)
    real_roots = [real for real in map(_real, roots) if real is not None]
    by_target: dict[Path, list[Path]] = {}
    outside: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        for folder, folders, names in os.walk(root):
            for name in folders:  # a linked folder is not entered; one leading outside the roots is said
                path = Path(folder) / name
                if path.is_symlink() and ((real := _real(path)) is None or not _inside(real, real_roots)):
                    outside.append(path)
            for name in names:
                if not name.lower().endswith(READ_SUFFIXES):
                    continue
                path = Path(folder) / name
                real = _real(path)
                if real is None or not real.is_file():
                    continue
                if not _inside(real, real_roots):
                    outside.append(path)  # only a link leads outside the roots it is under
                elif real.suffix.lower() in READ_SUFFIXES:
                    by_target.setdefault(real, []).append(path)
    # One entry per file: the file's own path when it is listed, else the first of the links to it.
    models = sorted(min(paths, key=lambda path: (path != real, str(path))) for real, paths in by_target.items())
    return models, sorted(set(outside))


def inside_roots(path: str | Path, roots: Iterable[Path]) -> bool:
    """Whether ``path`` (symlinks followed, ``..`` collapsed) lies under one of ``roots``, whether or not it exists."""
    real = _real(Path(path).expanduser())
    return real is not None and _inside(real, [r for r in map(_real, roots) if r is not None])


def _real(path: Path) -> Path | None:
    """``path`` with symlinks followed and ``..`` collapsed; None for a symlink loop or an unreadable link."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python before 3.13 reports a symlink loop so
        return None


def _inside(real: Path, real_roots: list[Path]) -> bool:
    return any(real.is_relative_to(root) for root in real_roots)


def _listing(roots: list[Path]) -> str:
    return ", ".join(str(root) for root in roots) if roots else f"(none configured; set {ROOTS_VARIABLE})"


# --- output names --------------------------------------------------------------------------------


OTHER_MODEL_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")  # a name meant for another format


def validate_output_name(name: str) -> str:
    """A safe output file name: plain (no folders), letters, digits, ``._ -``, ending in ``.safetensors``.

    The suffix is appended when missing (and written in lower case when given in another); anything else wrong
    raises an error saying what to change.
    """
    if not name:
        raise OrthoMechaError(f"the output needs a file name, e.g. merged{MODEL_SUFFIX}")
    if "/" in name or "\\" in name:
        raise OrthoMechaError(f"output name {name!r} must be a file name, not a path: remove the / and \\ characters")
    if ".." in name:
        raise OrthoMechaError(f"output name {name!r} must not contain '..'")
    bad = sorted({character for character in name if not _OUTPUT_CHARACTERS.fullmatch(character)})
    if bad:
        raise OrthoMechaError(
            f"output name {name!r} contains {' '.join(repr(character) for character in bad)}; "
            "use only letters A-Z a-z, digits, '.', '_', '-' and spaces"
        )
    if not name[0].isalnum():
        raise OrthoMechaError(f"output name {name!r} must start with a letter or a digit (no leading dot or dash)")
    if name[-1] in ". ":
        raise OrthoMechaError(f"output name {name!r} must not end with a dot or a space")
    suffix = Path(name).suffix.lower()
    if suffix in OTHER_MODEL_SUFFIXES:
        raise OrthoMechaError(f"output name {name!r}: merges are written as safetensors; name it "
                              f"{Path(name).stem}{MODEL_SUFFIX}")
    if name.lower().endswith(MODEL_SUFFIX):
        name = name[: -len(MODEL_SUFFIX)] + MODEL_SUFFIX  # "x.SAFETENSORS" is written as x.safetensors
    else:
        name += MODEL_SUFFIX
    if len(name) > MAX_OUTPUT_NAME:
        raise OrthoMechaError(f"output name {name!r} is {len(name)} characters long; use at most {MAX_OUTPUT_NAME}")
    return name
