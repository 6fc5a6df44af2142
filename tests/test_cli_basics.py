"""The command line frame: help, version, staying light to import, the error contract, ``demo``, ``cache``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ortho_mecha
from ortho_mecha.io import Model
from ortho_mecha.validate import align

PYTHON = sys.executable
CONSOLE_SCRIPT = Path(PYTHON).parent / "ortho-mecha"
HEAVY = ("torch", "sd_mecha", "safetensors", "numpy", "streamlit")
DEMO_MEMBERS = {"base", "anime", "photo", "anime_v2", "anime_photo_merge", "photo_copy", "unrelated", "anime_opposite"}

# Runs in a fresh interpreter: import the CLI, run --help and every subcommand's --help, report what got imported.
PROBE = f"""
import contextlib, io, json, sys
from ortho_mecha import cli
commands = sorted(cli.build_parser()._subparsers._group_actions[0].choices)
codes = {{}}
for argv in [["--help"]] + [[name, "--help"] for name in commands]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit as exc:
            codes[" ".join(argv)] = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(json.dumps({{"commands": commands, "codes": codes, "heavy": heavy}}))
"""


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)


def test_console_script_help() -> None:
    result = run(CONSOLE_SCRIPT, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ortho-mecha")
    for command in ("demo", "validate", "analyse", "cache"):
        assert command in result.stdout


def test_help_imports_neither_torch_nor_sd_mecha() -> None:
    result = run(PYTHON, "-c", PROBE)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.splitlines()[-1])
    assert {"demo", "validate", "analyse", "analyze", "cache"} <= set(probe["commands"])
    assert set(probe["codes"].values()) == {0}
    assert len(probe["codes"]) == len(probe["commands"]) + 1
    assert probe["heavy"] == []


def test_python_dash_m_version() -> None:
    result = run(PYTHON, "-m", "ortho_mecha", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ortho_mecha.__version__


def test_no_command_prints_help_and_fails(cli) -> None:
    result = cli()
    assert result.code == 2
    assert "usage: ortho-mecha" in result.out


def test_debug_shows_the_traceback(cli, tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    plain = cli("validate", "--base", missing, missing)
    assert plain.code == 2 and "Traceback" not in plain.err
    debug = cli("--debug", "validate", "--base", missing, missing)
    assert debug.code == 2
    assert "Traceback (most recent call last)" in debug.err
    assert f"OrthoMechaError: {missing}: no such file" in debug.err
    after = cli("validate", "--debug", "--base", missing, missing)  # after the command too
    assert after.code == 2 and "Traceback (most recent call last)" in after.err


def test_other_libraries_warnings_stay_out_of_the_terminal(cli, capsys) -> None:
    import logging

    assert cli("cache", "show").code == 0  # any command sets the terminal's logging up
    logging.warning("a library's warning on the root logger")  # what sd-mecha does about keys and memory
    logging.getLogger("ortho_mecha.test").warning("our own")
    logging.getLogger("sd_mecha").error("a library's error")
    err = capsys.readouterr().err
    assert "a library's warning" not in err
    assert "ortho-mecha: WARNING: our own" in err and "a library's error" in err


# -- demo ----------------------------------------------------------------------------------------------------


def test_demo_writes_the_family(cli, tmp_path: Path) -> None:
    folder = tmp_path / "new" / "demo"
    result = cli("demo", folder)
    assert result.code == 0, result.err
    files = {p.stem for p in folder.glob("*.safetensors")}
    assert files == DEMO_MEMBERS
    for member in DEMO_MEMBERS:
        assert f"{folder / member}.safetensors  (" in result.out
    assert f"next: ortho-mecha analyse --base {folder / 'base.safetensors'} {folder}" in result.out
    with Model(folder / "base.safetensors") as base, Model(folder / "anime.safetensors") as anime:
        alignment = align(base, [anime])
        assert alignment.arch == "flux1"
        assert alignment.checks[0].shared_fraction == 1.0
        assert base.metadata == {"ortho_mecha_demo": "1"}


def test_demo_refuses_a_file_as_its_folder(cli_error, tmp_path: Path, digests) -> None:
    target = tmp_path / "demo"
    target.write_text("a file, not a folder")
    before = digests(target)
    line = cli_error("demo", target)
    assert f"{target}: exists and is not a folder" in line
    assert digests(target) == before


def test_demo_twice_keeps_existing_files(cli, tmp_path: Path, digests) -> None:
    folder = tmp_path / "demo"
    assert cli("demo", folder).code == 0
    first = digests(folder)
    mine = folder / "anime.safetensors"
    mine.write_bytes(b"the user's own file")  # a file the demo would write, changed by the user
    (folder / "photo.safetensors").unlink()  # and one missing

    refused = cli("demo", folder)  # a file the demo did not write would break the planted relations
    assert refused.code == 2 and "already holds anime.safetensors, not written by the demo" in refused.err
    assert mine.read_bytes() == b"the user's own file" and not (folder / "photo.safetensors").exists()

    mine.unlink()
    again = cli("demo", folder)  # its own files are kept, and said so; the missing ones written
    assert again.code == 0 and "(the base every delta is taken against; kept from an earlier run)" in again.out
    assert digests(folder) == first

    mine.write_bytes(b"the user's own file")
    assert cli("demo", folder, "--overwrite").code == 0
    assert digests(folder) == first


# -- cache location ------------------------------------------------------------------------------------------


def test_cache_lives_where_ORTHO_MECHA_CACHE_says(
    cli, private_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    shown = cli("cache", "show")
    assert shown.code == 0, shown.err
    assert shown.out.startswith(f"cache: {private_cache} (")
    cleared = cli("cache", "clear")
    assert cleared.code == 0, cleared.err
    assert str(private_cache) in cleared.out
    assert not home.exists()  # nothing under ~/.cache


def test_cache_show_names_each_base_with_its_files_and_older_records(cli, private_cache: Path, tmp_path: Path) -> None:
    """``cache show`` says which base each analysis was against (it listed fingerprints only), how many files and
    deltas it holds figures of, and that records of another version are there for ``cache clear``."""
    from ortho_mecha.cache import open_cache
    from tests.modelgen import write_family_files

    paths = write_family_files(tmp_path / "m", "custom", "fp16", members=["base", "anime", "photo"])
    assert cli("analyse", "--base", paths["base"], paths["anime"], paths["photo"]).code == 0
    with open_cache("analysis") as cache:
        cache.set(("gram", "0.0.1", 4, "f" * 40, False), {"keys": [], "fps": [], "h": None})
    shown = cli("cache", "show")
    assert shown.code == 0, shown.err
    assert f"base {paths['base'].absolute()} (" in shown.out
    assert "default: 2 files, 2 analysed deltas" in shown.out
    assert "1 record of another version of ortho-mecha ('ortho-mecha cache clear' removes them)" in shown.out
    current = f"base {paths['base'].absolute()} ("
    line = next(line for line in shown.out.splitlines() if current in line)
    assert line.endswith("), default: 2 files, 2 analysed deltas")  # the file as it is: no remark
    # the base rewritten: the old records are said to be of the file as it was; a new analysis has its own
    paths["base"].write_bytes(paths["photo"].read_bytes())
    assert cli("analyse", "--base", paths["base"], paths["anime"]).code == 0
    lines = [line for line in cli("cache", "show").out.splitlines() if current in line]
    assert len(lines) == 2 and sum("; the file has changed since), default: 2 files" in line for line in lines) == 1
    paths["base"].unlink()
    shown = cli("cache", "show").out
    assert all("; no such file now)" in line for line in shown.splitlines() if current in line)
    assert "'ortho-mecha cache clear --stale' removes only what no analysis can use again" in shown
    assert cli("cache", "show", "--stale").code == 2  # --stale goes with clear


def test_cache_clear_stale_keeps_the_analyses_that_can_still_be_used(cli, private_cache: Path, tmp_path: Path) -> None:
    """``cache clear --stale`` removes the records of a base that has changed or is gone, and of another version of
    the tool; an analysis against a base as it is stays cached (its second run reads no delta again)."""
    from ortho_mecha.cache import open_cache
    from tests.modelgen import write_family_files

    kept = write_family_files(tmp_path / "kept", "custom", "fp16", members=["base", "anime", "photo"])
    changed = write_family_files(tmp_path / "changed", "custom", "fp16", members=["base", "anime"])
    gone = write_family_files(tmp_path / "gone", "custom", "fp16", members=["base", "photo"])
    for family in (kept, changed, gone):
        models = [str(path) for name, path in family.items() if name != "base"]
        assert cli("analyse", "--base", family["base"], *models).code == 0
    with open_cache("analysis") as cache:
        cache.set(("gram", "0.0.1", 4, "f" * 40, False), {"keys": [], "fps": [], "h": None})
        before = len(cache)
    changed["base"].write_bytes(kept["photo"].read_bytes())
    gone["base"].unlink()
    cleared = cli("cache", "clear", "--stale")
    assert cleared.code == 0, cleared.err
    assert str(changed["base"].absolute()) in cleared.out and str(gone["base"].absolute()) in cleared.out
    shown = cli("cache", "show").out
    assert f"base {kept['base'].absolute()} (" in shown and "default: 2 files, 2 analysed deltas" in shown
    assert str(changed["base"].absolute()) not in shown and str(gone["base"].absolute()) not in shown
    assert "another version" not in shown and "--stale" not in shown
    with open_cache("analysis") as cache:
        assert f"removed {before - len(cache)} stale records" in cleared.out
    again = cli("analyse", "--base", kept["base"], kept["anime"], kept["photo"])
    assert again.code == 0 and "keys, from cache" in again.out
    assert cli("cache", "clear").code == 0
    assert "(empty: nothing analysed yet)" in cli("cache", "show").out  # not "0.0 MiB of analyses"


def test_looking_at_a_cache_that_is_not_there_makes_none_and_a_read_only_one_is_not_called_corrupt(
    cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sqlite3

    from ortho_mecha.cache import CacheUnusable

    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(tmp_path / "none"))
    for action in ("show", "clear"):
        result = cli("cache", action)
        assert result.code == 0 and "(empty: nothing analysed yet)" in result.out
    assert not (tmp_path / "none").exists()
    (tmp_path / "a file").write_text("")  # a file where the folder should be: said, as analyse says it
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(tmp_path / "a file"))
    shown = cli("cache", "show")
    assert shown.code == 2 and "is not a folder" in shown.err
    # another user's cache, or a read-only mount: its database is fine, and clearing it is not the remedy
    error = CacheUnusable(sqlite3.OperationalError("attempt to write a readonly database"), tmp_path)
    assert error.read_only and "cannot be written here" in str(error) and "cache clear" not in str(error)
    corrupt = CacheUnusable(sqlite3.DatabaseError("file is not a database"), tmp_path)
    assert not corrupt.read_only and "cache clear` removes it" in str(corrupt)


def test_a_corrupt_cache_is_named_with_its_remedy_and_cache_clear_removes_it(
    cli, cli_error, private_cache: Path, tmp_path: Path
) -> None:
    assert cli("demo", tmp_path / "d").code == 0
    analyse = ["analyse", "--base", tmp_path / "d" / "base.safetensors", tmp_path / "d" / "anime.safetensors",
               tmp_path / "d" / "photo.safetensors"]
    assert cli(*analyse).code == 0
    database = private_cache / "analysis" / "cache.db"
    database.write_bytes(database.read_bytes()[:16] + bytes(range(256)) * 64)  # garbled by a crash or a sync tool
    (private_cache / "hashes").mkdir(exist_ok=True)
    (private_cache / "hashes" / "cache.db").write_bytes(b"not a database" * 1000)
    line = cli_error(*analyse)
    assert f"{private_cache}/analysis: the cache database is unusable" in line and "cache clear" in line
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"base": str(tmp_path / "d" / "base.safetensors"), "method": "weighted_sum",
                                "rows": [{"model": str(tmp_path / "d" / "anime.safetensors")}]}))
    merged = cli("merge", plan, "--out", tmp_path / "m.safetensors")  # file hashes: computed without the cache
    assert merged.code == 0, merged.err
    assert cli("cache", "clear").code == 0
    assert cli(*analyse).code == 0


def test_options_may_come_between_a_commands_models(cli, tmp_path: Path) -> None:
    assert cli("demo", tmp_path).code == 0
    base, anime, v2, photo = (tmp_path / f"{n}.safetensors" for n in ("base", "anime", "anime_v2", "photo"))
    report = tmp_path / "r.json"
    result = cli("analyse", "--base", base, anime, "--delta-from", f"{v2}={anime}", v2, "--no-cache", photo,
                 "--json", report)
    assert result.code == 0, result.err
    data = json.loads(report.read_text())
    assert [Path(m).name for m in data["models"]] == ["anime.safetensors", "anime_v2.safetensors", "photo.safetensors"]
    assert [d and Path(d).name for d in data["delta_from"]] == [None, "anime.safetensors", None]
    with pytest.raises(SystemExit) as refused:  # an unknown option stays argparse's usage error
        cli("validate", "--base", base, anime, "--bogus", photo)
    assert refused.value.code == 2
    # one delta-from per model, however its path is spelt; the same one twice is no conflict
    twice = cli("analyse", "--base", base, anime, v2, "--delta-from", f"{v2}={anime}", "--delta-from",
                f"{tmp_path}/./anime_v2.safetensors={photo}")
    assert twice.code == 2 and "two delta-froms" in twice.err and f"'{v2}={anime}'" in twice.err
    assert cli("analyse", "--base", base, anime, v2, "--no-cache", "--delta-from", f"{v2}={anime}", "--delta-from",
               f"{v2}={tmp_path}/./anime.safetensors").code == 0


def test_a_usage_mistake_is_one_line_with_status_2() -> None:
    for argv, said in ((["merge", "plan.json"], "the following arguments are required: --out"),
                       (["merge", "p.json", "--out", "x.safetensors", "--threads", "abc"], "invalid int value: 'abc'"),
                       (["cache", "bogus"], "invalid choice: 'bogus'")):
        result = run(CONSOLE_SCRIPT, *argv)
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"ortho-mecha {argv[0]}: error: ") and said in lines[0]
        assert lines[0].endswith(f"(see ortho-mecha {argv[0]} --help)")
