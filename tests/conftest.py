"""Fixtures shared by every test module.

- ``private_cache`` (autouse): ``ORTHO_MECHA_CACHE`` points at a fresh folder per test, so no test reads
  or writes the user's ``~/.cache/ortho-mecha`` (a module may override it with its own fixture of the
  same name).
- ``make_family`` / ``family``: a small planted model family (see :mod:`ortho_mecha.demo`) on disk.
- ``digests``: sha256 of every file under some paths, to show inputs were left untouched.
- ``cli`` / ``cli_error``: run ``ortho_mecha.cli.main`` in-process and capture what it printed;
  ``cli_error`` also checks the error contract (status 2, exactly one line on stderr, no traceback).

Hypothesis runs derandomized (the same examples every run), so a run of the suite is reproducible;
``HYPOTHESIS_PROFILE=explore`` searches new examples instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from tests.modelgen import write_family_files

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty cache folder for this test (outside ``tmp_path``, which stays the test's own)."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(cache))
    return cache


FamilyFactory = Callable[..., dict[str, Path]]


@pytest.fixture
def make_family(tmp_path: Path) -> FamilyFactory:
    """``make_family(layout="custom", dtype="fp16", members=None, seed=0)`` → {member: path}.

    Files go to ``tmp_path/<layout>-<dtype>-<seed>/``; ``members`` picks some of the family (default: all).
    """

    def make(layout: str = "custom", dtype: str = "fp16", members: list[str] | None = None,
             seed: int = 0) -> dict[str, Path]:
        folder = tmp_path / f"{layout}-{dtype}-{seed}"
        return write_family_files(folder, layout, dtype, seed=seed, members=members)

    return make


@pytest.fixture
def family(make_family: FamilyFactory) -> dict[str, Path]:
    """The whole planted family in the small ``custom`` layout, fp16."""
    return make_family()


def sha256_files(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every file at or under ``paths`` (folders walked recursively), keyed by path."""
    out: dict[str, str] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


@pytest.fixture
def digests() -> Callable[..., dict[str, str]]:
    """``digests(*paths)`` → {file: sha256} for every file at or under the paths."""
    return lambda *paths: sha256_files(Path(p) for p in paths)


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli(*argv)`` runs ``ortho_mecha.cli.main`` in-process and returns its status and output."""
    from ortho_mecha.cli import main

    def run(*argv: str | Path) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def cli_error(cli: Callable[..., CliResult]) -> Callable[..., str]:
    """``cli_error(*argv)`` runs a command that must fail; returns its one error line (checked)."""

    def run(*argv: str | Path) -> str:
        result = cli(*argv)
        assert result.code == 2, (result.code, result.out, result.err)
        lines = result.err.splitlines()
        assert len(lines) == 1, result.err
        assert lines[0].startswith("ortho-mecha: error: "), lines[0]
        assert "Traceback" not in result.err
        return lines[0]

    return run
