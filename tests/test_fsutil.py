"""Writing outputs safely (``ortho_mecha.fsutil``): atomic, never over a file unasked, no leftovers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.fsutil import (
    INDENTED_UP_TO,
    atomic_write_bytes,
    check_writable,
    partial_path,
    place,
    read_json,
    refuse_existing,
    write_json,
)


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_a_killed_writers_leftover_is_removed_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    stale = tmp_path / f".report.json.partial-{dead_pid()}-0a1b2c3d"
    running = tmp_path / f".report.json.partial-{os.getppid()}-0a1b2c3d"  # a live process's: left alone
    other = tmp_path / f".other.json.partial-{dead_pid()}-0a1b2c3d"  # another output's: left to its next write
    for path in (stale, running, other):
        path.write_bytes(b"half")
    atomic_write_bytes(out, b"{}")
    assert out.read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, running.name, other.name])


def test_place_never_replaces_a_file_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"first")
    temp = partial_path(out)
    temp.write_bytes(b"second")
    with pytest.raises(OrthoMechaError, match="already exists: it was written by something else meanwhile"):
        place(temp, out, overwrite=False)
    assert out.read_bytes() == b"first" and temp.exists()  # the caller removes its temporary file
    place(temp, out, overwrite=True)
    assert out.read_bytes() == b"second" and not temp.exists()
    fresh = tmp_path / "n.safetensors"
    temp = partial_path(fresh)
    temp.write_bytes(b"third")
    place(temp, fresh, overwrite=False)
    assert fresh.read_bytes() == b"third" and sorted(p.name for p in tmp_path.iterdir()) == [out.name, fresh.name]


def test_files_are_written_with_the_umask_applied(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        path = atomic_write_bytes(tmp_path / "x.json", b"{}")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_name_near_the_length_limit_is_written_and_checked_up_front(tmp_path: Path) -> None:
    long = tmp_path / ("m" * 240 + ".safetensors")  # 252 bytes: its temporary name must still fit 255
    check_writable(long)
    assert atomic_write_bytes(long, b"x").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == [long.name]  # the probe left nothing
    with pytest.raises(OrthoMechaError, match=r"cannot write here \(No such file or directory\)"):
        check_writable(tmp_path / "missing" / "x.json")


def test_a_link_to_a_missing_file_counts_as_an_existing_output(tmp_path: Path) -> None:
    link = tmp_path / "out.json"
    link.symlink_to(tmp_path / "unplugged" / "mine.json")
    with pytest.raises(OrthoMechaError, match="already exists"):
        atomic_write_bytes(link, b"{}")
    assert link.is_symlink()


def test_no_output_replaces_a_folder(tmp_path: Path, cli_error) -> None:
    """Found out before the work: 'analyse --json FOLDER --overwrite' ran the whole pass, then failed."""
    folder = tmp_path / "report.json"
    folder.mkdir()
    for overwrite in (False, True):
        with pytest.raises(OrthoMechaError, match=r"report\.json: is a folder; name a file"):
            refuse_existing(folder, overwrite)
    import torch
    from safetensors.torch import save_file

    for name, shift in (("base", 0.0), ("m", 0.1)):
        save_file({"w": torch.full((4, 4), shift)}, str(tmp_path / f"{name}.safetensors"))
    error = cli_error("analyse", "--base", tmp_path / "base.safetensors", tmp_path / "m.safetensors", "--json",
                      folder, "--overwrite", "--no-cache")
    assert error.endswith("report.json: is a folder; name a file")
    # an output whose folder is a file: said so, not "does not exist"
    (tmp_path / "notes").write_text("")
    error = cli_error("analyse", "--base", tmp_path / "base.safetensors", tmp_path / "m.safetensors", "--json",
                      tmp_path / "notes" / "r.json", "--no-cache")
    assert error.endswith("notes: the folder for the report is a file, not a folder")
    error = cli_error("extract-lora", tmp_path / "m.safetensors", tmp_path / "base.safetensors", "--rank", 2,
                      "--out", tmp_path / "notes" / "l.safetensors")
    assert error.endswith("notes: the folder for this output is a file, not a folder")


def test_json_reports_turn_non_finite_figures_to_null_and_stay_readable(tmp_path: Path) -> None:
    """A NaN or ±Inf figure is no JSON: it is written as null; paths as text, numpy figures as numbers; a small
    report is indented (one field a line), a large one compact, and both read back to the same data."""
    small = {"h": [[1.5, math.nan], [math.inf, -math.inf]], "file": tmp_path / "a.safetensors",
             "norm": np.float64(2.25), "row": np.arange(3)}
    path = write_json(tmp_path / "small.json", small)
    text = path.read_text()
    assert json.loads(text) == {"h": [[1.5, None], [None, None]], "file": str(tmp_path / "a.safetensors"),
                                "norm": 2.25, "row": [0, 1, 2]}
    assert text.count("\n") > 5 and text.endswith("\n")
    big = {"cos": np.random.default_rng(0).standard_normal((300, 300)).tolist()}
    path = write_json(tmp_path / "big.json", big)
    assert path.stat().st_size > INDENTED_UP_TO and path.read_text().count("\n") == 1
    assert json.loads(path.read_text()) == big
    with pytest.raises(OrthoMechaError, match="exists"):
        write_json(path, small)


def test_a_json_file_with_a_byte_order_mark_reads_as_without(tmp_path: Path) -> None:
    """Windows Notepad starts UTF-8 files with a byte-order mark: a plan saved there is read, not refused."""
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"method": "orthomerge"}).encode())
    assert read_json(path, "plan", "no such plan") == {"method": "orthomerge"}
    path.write_bytes(b"\xef\xbb\xbf{oops")
    with pytest.raises(OrthoMechaError, match="not valid JSON"):
        read_json(path, "plan", "no such plan")


def test_json_nested_too_deeply_is_one_clear_error(tmp_path: Path) -> None:
    """Python's parser gives up with a RecursionError that named no file (QA10)."""
    path = tmp_path / "plan.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(OrthoMechaError, match=r"plan\.json: not a plan: its JSON is nested too deeply"):
        read_json(path, "plan", "no such plan")
