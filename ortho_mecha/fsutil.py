"""Writing files safely: atomically, never over an existing file unless asked, never leaving a half file."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.security import MODEL_SUFFIX, OTHER_MODEL_SUFFIXES, utf8_name

logger = logging.getLogger(__name__)


def read_json(path: Path, what: str, missing: str) -> object:
    """The JSON document in ``path`` (a ``what``: "plan", "report"); ``missing`` is the message when there is
    no such file. Unreadable, non-UTF-8 (a model file given by mistake) or invalid JSON: one clear error. A
    byte-order mark (Windows editors write one) is skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise OrthoMechaError(missing, path) from exc
    except UnicodeDecodeError as exc:
        suffix = f" (a {path.suffix} file?)" if path.suffix and path.suffix != ".json" else ""
        raise OrthoMechaError(f"not a {what}: not JSON text{suffix}", path) from exc
    except OSError as exc:
        raise OrthoMechaError(f"cannot read the {what}: {exc.strerror or exc}", path) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OrthoMechaError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", path) from exc
    except RecursionError as exc:  # thousands of nested brackets: no plan or report is built so
        raise OrthoMechaError(f"not a {what}: its JSON is nested too deeply", path) from exc


MODEL_LIKE = (MODEL_SUFFIX, *OTHER_MODEL_SUFFIXES)  # names a text output must not take


def require_folder(folder: Path, what: str = "the folder for this output") -> None:
    """Raise unless ``folder`` (where an output goes) is an existing folder, saying whether it is missing or a file."""
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise OrthoMechaError(f"{what} {problem}", folder)


def refuse_input(output: Path, inputs: Iterable[Path], what: str) -> None:
    """Raise if ``output`` is one of the ``inputs`` (the file read, the models it names): an output never replaces
    an input, even with --overwrite."""
    if output.resolve() in {Path(p).resolve() for p in inputs}:
        raise OrthoMechaError(f"is one of the inputs (the file read, or a model it names); write {what} to another "
                              "file", output)


def refuse_text_output(output: Path, inputs: Iterable[Path], what: str) -> None:
    """Raise unless a text output (a plan, a recipe, a report) may go to ``output``: not one of the ``inputs``
    (:func:`refuse_input`), and not named like a model file."""
    refuse_input(output, inputs, what)
    if output.suffix.lower() in MODEL_LIKE:
        raise OrthoMechaError(f"is named like a model file; {what} is text (choose another name)", output)


def file_stamp(path: Path) -> tuple[int, int]:
    """(size, modification time in ns) of ``path``: what changes when a file is written again."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def refuse_unencodable(path: Path) -> None:
    """Raise if ``path`` is not valid UTF-8 (:func:`ortho_mecha.security.utf8_name`): reports, plans and merged
    files' metadata name their files, so such a name could be neither written nor read back."""
    if not utf8_name(path):
        raise OrthoMechaError("the path is not valid UTF-8 (shown here with U+FFFD for its other bytes); reports, "
                              "plans and merged files name their files in UTF-8: rename it", path)


def refuse_existing(path: Path, overwrite: bool, remedy: str = "choose another name or pass --overwrite") -> None:
    """Raise if ``path`` exists and the user did not ask to overwrite it; ``remedy`` says how to go on. Also
    refuses a folder, overwrite or not, and a path that is not UTF-8 (:func:`refuse_unencodable`): every output
    passes through here."""
    refuse_unencodable(path)
    if path.is_dir():  # no --overwrite replaces a folder (and finding out after the work would waste it)
        raise OrthoMechaError("is a folder; name a file", path)
    if os.path.lexists(path) and not overwrite:  # a link to a missing file is the user's too
        raise OrthoMechaError(f"already exists; {remedy}", path)


_PARTIAL = re.compile(r"\.partial-(\d+)(?:-[0-9a-f]+)?$")  # its pid (and, from this version on, a random part)
PARTIALS_ENV = "ORTHO_MECHA_PARTIALS"  # a file listing each temporary file this process makes (a job worker's)
PARTIAL_NAME_BYTES = 200  # of the output's name in its temporary file's: a name near the 255-byte limit still fits


def _partial_prefix(out: Path) -> str:
    name = os.fsencode(out.name)[:PARTIAL_NAME_BYTES].decode("utf-8", errors="ignore")
    return f".{name}.partial-"


def short_names(paths: Sequence[str | Path], keep_suffix: bool = False) -> list[str]:
    """File stems (file names, ``keep_suffix``), with the parent folder added where two are the same (``lA/lora``,
    ``lB/lora``: every HF repo's ``diffusion_pytorch_model``, every trainer's ``pytorch_lora_weights``)."""
    names = [Path(p).name if keep_suffix else Path(p).stem for p in paths]
    return [
        f"{Path(p).parent.name}/{name}" if names.count(name) > 1 else name for p, name in zip(paths, names, strict=True)
    ]


def partial_path(out: Path) -> Path:
    """A temporary name beside ``out`` for writing it: ``.OUT.partial-<pid>-<random>`` (hidden, never a model
    name; the pid lets :func:`remove_stale_partials` tell a killed writer's leftover from a running one's).

    With ``ORTHO_MECHA_PARTIALS`` set (a dashboard job's worker), the name is also listed in that file, so that
    whoever kills the process removes what it was writing (:func:`remove_listed_partials`)."""
    temp = out.with_name(f"{_partial_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}")
    if listing := os.environ.get(PARTIALS_ENV):
        with open(listing, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(os.fsdecode(temp)) + "\n")
    return temp


def remove_listed_partials(listing: Path) -> None:
    """Remove the temporary files listed in ``listing`` (:func:`partial_path`) whose writing process is gone and
    that are still there: what a killed job worker was writing, removed by whoever stopped it."""
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    for line in lines:
        try:
            temp = Path(json.loads(line))
        except (ValueError, TypeError):
            continue
        match = _PARTIAL.search(temp.name)
        if match is None or process_exists(int(match[1])) or not temp.exists():
            continue
        logger.info("removing %s, left by a writer that was stopped", temp)
        temp.unlink(missing_ok=True)


def discard(handle: Any, temp: Path) -> None:
    """Close ``handle`` and remove its temporary file ``temp``, the file also when closing fails (a full disk
    fails the flush of what is buffered: the half file must not stay there, holding the space)."""
    try:
        handle.close()
    except OSError:
        pass
    finally:
        temp.unlink(missing_ok=True)


def check_writable(out: Path) -> None:
    """Raise, before any work, unless a file can be made beside ``out`` (where its temporary file goes): a
    read-only folder or filesystem, or a name too long, fails at once rather than after the work."""
    probe = partial_path(out)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise OrthoMechaError(f"cannot write here ({exc.strerror or exc})", out) from None
    probe.unlink(missing_ok=True)


def remove_stale_partials(out: Path) -> None:
    """Remove the temporary files of ``out`` whose writing process is gone (left by a SIGKILL, the OOM killer,
    a dashboard job killed after its cancel grace): the next write of ``out`` cleans up after it."""
    for candidate in out.parent.glob(f"{glob.escape(_partial_prefix(out))}*"):
        match = _PARTIAL.search(candidate.name)
        if match is None or int(match[1]) == os.getpid() or process_exists(int(match[1])):
            continue
        logger.info("removing %s, left by a writer that was killed", candidate)
        candidate.unlink(missing_ok=True)


def place(temp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``temp`` to ``out``. Without ``overwrite`` this never replaces a file, not even one that
    appeared while ``temp`` was written (another merge into the same name): it links ``temp`` as ``out``, which
    fails if ``out`` exists, then removes ``temp``. Where the filesystem has no hard links, a check and a rename."""
    if overwrite:
        os.replace(temp, out)
        return
    try:
        os.link(temp, out)
    except FileExistsError:
        raise OrthoMechaError("already exists: it was written by something else meanwhile, and is kept; nothing "
                              "was replaced", out) from None
    except OSError:  # no hard links here (FAT, some network filesystems)
        if out.exists():
            raise OrthoMechaError("already exists: it was written by something else meanwhile, and is kept", out) \
                from None
        os.replace(temp, out)
        return
    temp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to a temporary file in the same folder (:func:`partial_path`), fsync it, then move it into
    place (:func:`place`: never over a file unless ``overwrite``)."""
    path = Path(path)
    refuse_existing(path, overwrite)
    require_folder(path.parent)
    remove_stale_partials(path)
    tmp = partial_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OrthoMechaError(f"cannot write here ({exc.strerror or exc})", path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        place(tmp, path, overwrite)
    except OSError as exc:  # said of the user's file, not the temporary one
        tmp.unlink(missing_ok=True)
        raise OrthoMechaError(f"cannot write ({exc.strerror or exc}); nothing was written", path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


INDENTED_UP_TO = 1 << 20  # bytes: a report this small is written indented for the eye; a larger one is compact


def json_bytes(data: object) -> bytes:
    """``data`` as UTF-8 JSON by orjson (a 200-model report of ~7 million figures in a fraction of a second, where
    the standard library took ten): NaN and ±Inf become null, paths text; indented by two spaces when the
    compact text is under ``INDENTED_UP_TO``, compact above it (a matrix indented is one figure a line)."""
    options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    text = orjson.dumps(data, default=_json_default, option=options)
    if len(text) < INDENTED_UP_TO:
        text = orjson.dumps(data, default=_json_default, option=options | orjson.OPT_INDENT_2)
    return text + b"\n"


def write_json(path: str | Path, data: object, overwrite: bool = False) -> Path:
    """Write ``data`` as JSON atomically (:func:`json_bytes`)."""
    return atomic_write_bytes(path, json_bytes(data), overwrite)


def process_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts), so a file it left is still in use."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def removed_on_failure() -> Iterator[list[Path]]:
    """A list for the block to add the files it writes to: when the block fails (or Ctrl-C), they are removed
    again, so a set of outputs (compress's LoRAs) lands whole or not at all, and a rerun finds none in its way."""
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


@contextmanager
def output_folder(path: str | Path) -> Iterator[Path]:
    """``path`` as a folder for a command's outputs, made (with its parents) before the work starts, so a folder
    that cannot be made fails at once; the folders made here are removed again, if still empty, when the work
    fails."""
    path = Path(path)
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OrthoMechaError(f"cannot create the output folder ({exc.strerror or exc})", path) from None
    try:
        yield path
    except BaseException:
        for folder in missing:  # the deepest first
            try:
                folder.rmdir()
            except OSError:  # holds something now (or never was made): kept
                break
        raise
