"""Inputs: the safetensors reader, its refusals, scaled fp8, shards, key mapping and ``ortho-mecha validate``.

Every bad input goes through the real command line (``ortho_mecha.cli.main``) and must give status 2,
exactly one line on stderr that names the file and says what is wrong, no traceback, and leave every
input file byte-for-byte as it was.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.io import Model, expand_model_paths
from ortho_mecha.validate import DIFFUSION_PREFIX, align, key_map
from tests.modelgen import stored, write_scaled_fp8, write_sharded

# -- small files --------------------------------------------------------------------------------------


def state(seed: int = 0, keys: int = 6) -> dict[str, torch.Tensor]:
    """A tiny model: ``layers.N`` matrices and norms, float32."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(keys // 2):
        out[f"layers.{i}.attn.qkv.weight"] = torch.randn(6, 4, generator=generator)
        out[f"layers.{i}.norm.weight"] = 1 + 0.1 * torch.randn(4, generator=generator)
    return out


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def raw_file(path: Path, header: str, data: bytes = b"", claimed_length: int | None = None) -> Path:
    """A safetensors-like file with a hand-written header (so it can lie)."""
    encoded = header.encode()
    length = len(encoded) if claimed_length is None else claimed_length
    path.write_bytes(struct.pack("<Q", length) + encoded + data)
    return path


def entry(name: str, dtype: str, shape: list[int], begin: int, end: int) -> str:
    return f'"{name}": {{"dtype": "{dtype}", "shape": {json.dumps(shape)}, "data_offsets": [{begin}, {end}]}}'


class Armed:
    """Unpickling this creates ``marker``: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def write_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": Armed(marker)}))
    return path


# -- every bad input: one line, exit 2, file named, inputs untouched -----------------------------------


@dataclass
class Bad:
    argv: list[str | Path]  # after "validate"
    named: list[Path]  # files the message must name
    problem: str  # the exact problem, as the message words it


def _base(folder: Path) -> Path:
    return save(folder / "base.safetensors", state(0))


def _with_base(bad: Path, problem: str) -> Bad:
    return Bad(["--base", bad.parent / "base.safetensors", bad], [bad], problem)


def bad_pickle_model(folder: Path, suffix: str) -> Bad:
    path = write_pickle(folder / f"model{suffix}", folder / "UNPICKLED")
    return _with_base(path, f"'{suffix}' is a pickle checkpoint; ortho-mecha never unpickles files")


def bad_pickle_base(folder: Path) -> Bad:
    path = write_pickle(folder / "base.ckpt", folder / "UNPICKLED")
    return Bad(["--base", path, folder / "base.safetensors"], [path], "'.ckpt' is a pickle checkpoint")


def bad_pickle_named_safetensors(folder: Path) -> Bad:
    path = write_pickle(folder / "renamed.safetensors", folder / "UNPICKLED")
    return _with_base(path, "not a safetensors file (it is a Python pickle); is it another format renamed?")


def bad_png_named_safetensors(folder: Path) -> Bad:
    path = folder / "picture.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return _with_base(path, "not a safetensors file (it is a PNG image)")


def bad_truncated_data(folder: Path) -> Bad:
    path = save(folder / "cut.safetensors", state(1))
    path.write_bytes(path.read_bytes()[:-10])
    return _with_base(path, "truncated: 'layers.2.norm.weight' ends at byte")


def bad_truncated_header(folder: Path) -> Bad:
    path = folder / "stub.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    return _with_base(path, "truncated: 3 bytes is too short for a safetensors header")


def bad_empty_file(folder: Path) -> Bad:
    path = folder / "empty.safetensors"
    path.write_bytes(b"")
    return _with_base(path, "truncated: 0 bytes is too short")


def bad_header_length_lies(folder: Path) -> Bad:
    path = raw_file(folder / "long.safetensors", "{" + entry("w", "F32", [2], 0, 8) + "}", bytes(8), 10_000)
    return _with_base(path, "corrupt or truncated: the header claims 10000 bytes")


def bad_entry_size_lies(folder: Path) -> Bad:
    path = raw_file(folder / "sizes.safetensors", "{" + entry("w", "F32", [4], 0, 8) + "}", bytes(16))
    return _with_base(path, "corrupt header: 'w' is F32[4] (16 bytes) but its offsets span 8 bytes")


def bad_negative_size(folder: Path) -> Bad:
    path = raw_file(folder / "negative.safetensors", "{" + entry("w", "F32", [-2], 8, 0) + "}", bytes(8))
    return _with_base(path, "corrupt header: 'w' has a negative size")


def bad_duplicate_key(folder: Path) -> Bad:
    header = "{" + entry("w", "F32", [2], 0, 8) + ", " + entry("w", "F32", [2], 8, 16) + "}"
    path = raw_file(folder / "dup.safetensors", header, bytes(16))
    return _with_base(path, "corrupt header: key 'w' appears twice")


def bad_not_json(folder: Path) -> Bad:
    path = raw_file(folder / "garbage.safetensors", '{"w": {"dtype": ', bytes(8))
    return _with_base(path, "corrupt header (not valid JSON")


def bad_overlap(folder: Path) -> Bad:
    header = "{" + entry("a", "F32", [4], 0, 16) + ", " + entry("b", "F32", [4], 8, 24) + "}"
    path = raw_file(folder / "overlap.safetensors", header, bytes(24))
    return _with_base(path, "corrupt header: 'a' and 'b' overlap")


def bad_unknown_dtype(folder: Path) -> Bad:
    path = raw_file(folder / "int4.safetensors", "{" + entry("w", "I4", [4], 0, 2) + "}", bytes(2))
    return _with_base(path, "tensor 'w' has dtype I4, which ortho-mecha cannot read")


def bad_nan_in_model(folder: Path) -> Bad:
    tensors = state(1)
    tensors["layers.1.attn.qkv.weight"][2, 3] = float("nan")
    path = save(folder / "nan.safetensors", tensors)
    return _with_base(path, "tensor 'layers.1.attn.qkv.weight' holds 1 NaN/Inf values")


def bad_inf_in_base(folder: Path) -> Bad:
    tensors = state(0)
    tensors["layers.0.norm.weight"][1] = float("-inf")
    base = save(folder / "inf_base.safetensors", tensors)
    return Bad(["--base", base, folder / "base.safetensors"], [base], "tensor 'layers.0.norm.weight' holds 1 NaN/Inf")


def bad_few_shared_keys(folder: Path) -> Bad:
    own = {f"other.{i}.weight": torch.ones(3, 3) for i in range(4)}
    path = save(folder / "stranger.safetensors", {"layers.0.norm.weight": torch.ones(4)} | own)
    return Bad(
        ["--base", folder / "base.safetensors", path],
        [path, folder / "base.safetensors"],
        "shares only 1 of the 6 diffusion keys of the base",
    )


def bad_missing_model(folder: Path) -> Bad:
    return _with_base(folder / "nowhere.safetensors", "no such file")


def bad_missing_base(folder: Path) -> Bad:
    missing = folder / "gone.safetensors"
    return Bad(["--base", missing, folder / "base.safetensors"], [missing], "no such file")


def bad_base_is_folder(folder: Path) -> Bad:
    sub = folder / "models"
    sub.mkdir()
    save(sub / "m.safetensors", state(1))
    return Bad(["--base", sub, folder / "base.safetensors"], [sub], "--base must be one model file, not a folder")


def bad_empty_folder(folder: Path) -> Bad:
    sub = folder / "nothing_here"
    sub.mkdir()
    (sub / "notes.txt").write_text("no models")
    (sub / "model.ckpt").write_bytes(b"not read")
    return _with_base(sub, "folder holds no .safetensors files")


def bad_gguf_magic(folder: Path) -> Bad:
    path = folder / "quant.safetensors"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + bytes(64))
    return _with_base(path, "this is a GGUF file (quantised)")


def bad_gguf_suffix(folder: Path) -> Bad:
    path = folder / "model-Q4_K_M.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    return _with_base(path, "GGUF files are quantised; use a .safetensors model")


def bad_nf4(folder: Path) -> Bad:
    tensors = {
        "layers.0.attn.qkv.weight": torch.zeros(12, 1, dtype=torch.uint8),
        "layers.0.attn.qkv.weight.absmax": torch.ones(1),
        "layers.0.attn.qkv.weight.quant_map": torch.ones(16),
        "layers.0.attn.qkv.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8),
    }
    path = save(folder / "nf4.safetensors", tensors)
    return _with_base(path, "bitsandbytes/NF4-quantised model (key 'layers.0.attn.qkv.weight.absmax')")


def bad_comfy_int8(folder: Path) -> Bad:
    # ComfyUI's mixed-precision layout with int8_tensorwise weights: its integers were read as weights
    tensors = state(1) | {
        "layers.0.attn.qkv.weight": torch.ones(6, 4, dtype=torch.int8),
        "layers.0.attn.qkv.weight_scale": torch.ones(()),
        "layers.0.attn.qkv.comfy_quant": torch.tensor(list(b'{"format": "int8_tensorwise"}'), dtype=torch.uint8),
    }
    path = save(folder / "int8mixed.safetensors", tensors)
    return _with_base(path, "quantised weights of ComfyUI's mixed-precision kind (key 'layers.0.attn.qkv.weight' is I8")


def bad_other_suffix(folder: Path) -> Bad:
    path = save(folder / "model.onnx", state(1))
    return _with_base(path, "not a .safetensors file")


def bad_only_the_base(folder: Path) -> Bad:
    base = folder / "base.safetensors"
    return Bad(["--base", base, base], [base], "no models to compare with the base")


def bad_no_float_tensors(folder: Path) -> Bad:
    base = save(folder / "ints.safetensors", {"ids": torch.arange(4)})
    return Bad(["--base", base, folder / "base.safetensors"], [base], "holds no floating-point tensors")


def bad_colliding_spellings(folder: Path) -> Bad:
    tensors = state(1) | {"layers.0.norm.scale": torch.ones(4)}
    path = save(folder / "twice.safetensors", tensors)
    problem = "keys 'layers.0.norm.scale' and 'layers.0.norm.weight' map to the same key 'layers.0.norm.weight'"
    return _with_base(path, problem)


def bad_scale_length(folder: Path) -> Bad:
    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in state(1).items()}
    tensors["layers.0.attn.qkv.scale_weight"] = torch.ones(3)
    path = save(folder / "scaled.safetensors", tensors)
    return _with_base(path, "scale 'layers.0.attn.qkv.scale_weight' has 3 values; expected 1 or one per row (6)")


def bad_index_missing_shard(folder: Path) -> Bad:
    index = write_sharded(folder, "big", state(1))
    (folder / "big-00002-of-00002.safetensors").unlink()
    return _with_base(index, "sharded model is incomplete: missing big-00002-of-00002.safetensors")


def bad_shard_without_index_missing(folder: Path) -> Bad:
    write_sharded(folder, "big", state(1), shards=3).unlink()
    (folder / "big-00003-of-00003.safetensors").unlink()
    first = folder / "big-00001-of-00003.safetensors"
    return _with_base(first, "sharded model is incomplete: missing big-00003-of-00003.safetensors")


def bad_folder_with_missing_shard(folder: Path) -> Bad:
    sub = folder / "sharded"
    sub.mkdir()
    index = write_sharded(sub, "big", state(1))
    (sub / "big-00001-of-00002.safetensors").unlink()
    return Bad(["--base", folder / "base.safetensors", sub], [index], "missing big-00001-of-00002.safetensors")


def bad_index_json(folder: Path) -> Bad:
    path = folder / "model.safetensors.index.json"
    path.write_text('{"metadata": {}}')
    return _with_base(path, "not a valid sharded-model index (expected a JSON 'weight_map')")


def bad_json_report_over_input(folder: Path) -> Bad:
    model = save(folder / "a.safetensors", state(1))
    return Bad(
        ["--base", folder / "base.safetensors", model, "--json", model], [model], "is one of the inputs (the file read"
    )


BAD_INPUTS: dict[str, Callable[[Path], Bad]] = {
    "pickle-ckpt": lambda f: bad_pickle_model(f, ".ckpt"),
    "pickle-pt": lambda f: bad_pickle_model(f, ".pt"),
    "pickle-bin": lambda f: bad_pickle_model(f, ".bin"),
    "pickle-as-base": bad_pickle_base,
    "pickle-named-safetensors": bad_pickle_named_safetensors,
    "png-named-safetensors": bad_png_named_safetensors,
    "truncated-data": bad_truncated_data,
    "truncated-header": bad_truncated_header,
    "empty-file": bad_empty_file,
    "header-length-lies": bad_header_length_lies,
    "entry-size-lies": bad_entry_size_lies,
    "negative-size": bad_negative_size,
    "duplicate-key": bad_duplicate_key,
    "header-not-json": bad_not_json,
    "overlapping-offsets": bad_overlap,
    "unknown-dtype": bad_unknown_dtype,
    "nan-in-model": bad_nan_in_model,
    "inf-in-base": bad_inf_in_base,
    "few-shared-keys": bad_few_shared_keys,
    "missing-model": bad_missing_model,
    "missing-base": bad_missing_base,
    "base-is-folder": bad_base_is_folder,
    "folder-without-safetensors": bad_empty_folder,
    "gguf-magic": bad_gguf_magic,
    "gguf-suffix": bad_gguf_suffix,
    "nf4-bitsandbytes": bad_nf4,
    "comfy-int8-mixed": bad_comfy_int8,
    "other-suffix": bad_other_suffix,
    "only-the-base": bad_only_the_base,
    "no-float-tensors": bad_no_float_tensors,
    "colliding-spellings": bad_colliding_spellings,
    "scale-length": bad_scale_length,
    "index-missing-shard": bad_index_missing_shard,
    "shard-without-index-missing": bad_shard_without_index_missing,
    "folder-with-missing-shard": bad_folder_with_missing_shard,
    "index-json-invalid": bad_index_json,
    "json-report-over-input": bad_json_report_over_input,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case: str, tmp_path: Path, cli_error, digests) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _base(folder)
    bad = BAD_INPUTS[case](folder)
    before = digests(folder)

    line = cli_error("validate", *bad.argv)

    assert bad.problem in line
    for path in bad.named:
        assert str(path) in line
    assert digests(folder) == before  # nothing changed, nothing written
    assert not (folder / "UNPICKLED").exists()


def test_validate_lists_every_file_it_cannot_use_and_checks_the_others(tmp_path: Path, cli, cli_error,
                                                                       digests) -> None:
    base, good = _base(tmp_path), save(tmp_path / "a.safetensors", state(1))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-40])
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model")
    report = tmp_path / "report.json"
    before = digests(tmp_path)
    result = cli("validate", "--base", base, cut, good, text, "--json", report)
    assert result.code == 2
    assert f"{good}: 6/6 keys shared (100%), OK" in result.out  # checked although a file before it is broken
    assert f"cannot be used: {cut}: truncated" in result.out
    assert f"cannot be used: {text}: not a safetensors file" in result.out
    assert result.err.startswith(f"ortho-mecha: error: 2 of 3 models cannot be used: {cut}: truncated")
    assert f"; {text}: not a safetensors file" in result.err and len(result.err.strip().splitlines()) == 1
    written = json.loads(report.read_text())
    assert [m["path"] for m in written["models"]] == [str(good)] and len(written["problems"]) == 2
    report.unlink()
    assert digests(tmp_path) == before
    line = cli_error("analyse", "--base", base, cut, good, text)  # every file analyse cannot use, in one run
    assert f"2 files cannot be analysed: {cut}: truncated" in line and f"; {text}: not a safetensors file" in line


@pytest.mark.parametrize("command", ["validate", "analyse"])
def test_a_report_never_replaces_a_file_unasked(command: str, tmp_path: Path, cli, cli_error, digests) -> None:
    base, model = _base(tmp_path), save(tmp_path / "a.safetensors", state(1))
    other = save(tmp_path / "other.safetensors", state(2))  # not an input: a model all the same
    existing = tmp_path / "notes.json"
    existing.write_text('{"mine": true}')
    common = [command, "--base", base, model] + (["--no-cache"] if command == "analyse" else [])
    before = digests(tmp_path)

    line = cli_error(*common, "--json", existing)
    assert f"{existing}: already exists; choose another name or pass --overwrite" in line
    line = cli_error(*common, "--json", other, "--overwrite")
    assert f"{other}: is named like a model file; the report is text" in line
    assert digests(tmp_path) == before

    assert cli(*common, "--json", existing, "--overwrite").code == 0
    assert json.loads(existing.read_text())["models"]


def test_metadata_values_that_are_not_text_are_kept_as_json_and_a_non_object_is_refused(tmp_path: Path) -> None:
    data = {"w": torch.ones(2, 2)}
    path = save(tmp_path / "m.safetensors", data)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])

    def rewrite(metadata: object) -> Path:
        text = json.dumps(header | {"__metadata__": metadata}).encode()
        text += b" " * (-len(text) % 8)
        out = tmp_path / "odd.safetensors"
        out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + header_len:])
        return out

    assert Model(rewrite({"nested": {"a": [1, 2]}, "none": None, "text": "x"})).metadata == {
        "nested": '{"a": [1, 2]}', "none": "null", "text": "x"}
    with pytest.raises(OrthoMechaError, match=r"odd.safetensors: corrupt header \('__metadata__' is not a JSON object"):
        Model(rewrite("a string"))


def test_a_model_of_integer_weights_is_told_its_dtype(tmp_path: Path, cli_error) -> None:
    base = _base(tmp_path)
    ints = save(tmp_path / "int8ish.safetensors", {k: (v * 100).to(torch.int32) for k, v in state(1).items()})
    line = cli_error("analyse", "--base", base, ints)
    assert f"{ints}: most of its tensors are stored as I32, not as floating point" in line


def test_a_path_that_is_not_utf8_is_one_clear_line(tmp_path: Path, cli_error, digests) -> None:
    base = _base(tmp_path)
    latin1 = save(Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.safetensors")), state(1))
    good = save(tmp_path / "good.safetensors", state(1))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"base": str(base), "method": "ortho_superpose", "rows": [{"model": str(good)}]}))
    before = digests(tmp_path)
    line = cli_error("analyse", "--base", base, latin1, "--json", tmp_path / "r.json")
    assert f"{tmp_path}/caf\ufffd.safetensors: the path is not valid UTF-8" in line
    line = cli_error("analyse", "--base", base, good, "--rank-samples", "0")  # grades on made-up signal figures
    assert "--rank-samples must be 1 or more" in line
    line = cli_error("merge", plan, "--out", Path(os.fsdecode(bytes(tmp_path) + b"/m\xe9.safetensors")))
    assert f"{tmp_path}/m\ufffd.safetensors: the path is not valid UTF-8" in line
    assert digests(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
@pytest.mark.parametrize("role", ["base", "model"])
def test_unreadable_file_is_one_clear_line(role: str, tmp_path: Path, cli_error, digests) -> None:
    base = _base(tmp_path)
    locked = save(tmp_path / "locked.safetensors", state(1))
    before, mode = digests(tmp_path), locked.stat().st_mode
    locked.chmod(0)
    try:
        argv = ["--base", locked, base] if role == "base" else ["--base", base, locked]
        line = cli_error("validate", *argv)
    finally:
        locked.chmod(mode)
    assert f"{locked}: permission denied (cannot read the file)" in line
    assert digests(tmp_path) == before


# -- pickles are never unpickled -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_is_refused_without_unpickling(suffix: str, tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    path = write_pickle(tmp_path / f"model{suffix}", marker)
    with pytest.raises(OrthoMechaError, match="never unpickles"):
        Model(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the file was armed: unpickling it does create the marker
    assert marker.exists()


# -- dtypes and chunked reads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_every_float_dtype_reads_as_stored(dtype: torch.dtype, tmp_path: Path) -> None:
    path = save(tmp_path / "m.safetensors", {k: v.to(dtype) for k, v in state(3).items()})
    expected = stored(path)
    with Model(path) as model:
        assert set(model.tensors) == set(expected)
        for key, value in expected.items():
            assert torch.equal(model.read_tensor(key, torch.float64), value)


@pytest.fixture(scope="module")
def read_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """One plain bf16 file and two scaled-fp8 files (per-row and scalar scales), with what they represent."""
    folder = tmp_path_factory.mktemp("read")
    generator = torch.Generator().manual_seed(11)
    tensors = {
        "wide.weight": torch.randn(7, 13, generator=generator) * 3.0,
        "conv.weight": torch.randn(5, 3, 2, 2, generator=generator),
        "bias": torch.randn(9, generator=generator),
    }
    plain = save(folder / "plain.safetensors", {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    return {
        "plain": (plain, stored(plain)),
        "per_row": (folder / "row.safetensors", write_scaled_fp8(folder / "row.safetensors", tensors, per_row=True)),
        "scalar": (folder / "one.safetensors", write_scaled_fp8(folder / "one.safetensors", tensors, per_row=False)),
    }


@settings(max_examples=40, deadline=None)
@given(
    which=st.sampled_from(["plain", "per_row", "scalar"]),
    key=st.sampled_from(["wide.weight", "conv.weight", "bias"]),
    bounds=st.tuples(st.integers(0, 91), st.integers(0, 91)),
)
def test_chunked_reads_are_slices_of_the_whole(read_files, which: str, key: str, bounds: tuple[int, int]) -> None:
    path, expected = read_files[which]
    flat = expected[key].flatten()
    start, stop = sorted(b % (flat.numel() + 1) for b in bounds)
    with Model(path) as model:
        assert torch.equal(model.read(key, start, stop, torch.float64), flat[start:stop])


@pytest.mark.parametrize("which", ["per_row", "scalar"])
def test_scaled_fp8_reads_back_dequantised(read_files, which: str) -> None:
    path, expected = read_files[which]
    with Model(path) as model:
        assert model.scaled_fp8
        assert set(model.tensors) == set(expected)  # scale tensors and the scaled_fp8 marker are not weights
        assert model.tensors["wide.weight"].scale == "wide.scale_weight"
        for key, value in expected.items():
            assert torch.equal(model.read_tensor(key, torch.float64), value)
            assert torch.allclose(model.read_tensor(key), value.float(), rtol=2**-23, atol=0)
        raw = stored(path)["wide.weight"]
        assert not torch.allclose(raw, expected["wide.weight"])  # a plain fp8 read would be wrong


def test_scaled_fp8_validates_against_an_fp16_base(read_files, tmp_path: Path, cli) -> None:
    path, expected = read_files["per_row"]
    base = save(tmp_path / "base.safetensors", {k: v.to(torch.float16) for k, v in expected.items()})
    result = cli("validate", "--base", base, path)
    assert result.code == 0, result.err
    assert "scaled fp8: dequantised with its per-key scales" in result.out
    assert (f"{path}: 3/3 keys shared (100%), OK for analysis; merge refuses it: scaled fp8 (sd-mecha reads fp8 "
            "without its scales): merge the copy 'ortho-mecha convert' writes") in result.out


def test_a_scaled_fp8_file_without_its_scales_is_refused(read_files, tmp_path: Path, cli) -> None:
    """The scaled_fp8 marker with no scale key: read as plain fp8, its weights are off by their lost scales, and a
    merge with it came out at ±448 without a word (QA10)."""
    path, expected = read_files["per_row"]
    kept = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".scale_weight")}  # fp8 as stored
    broken = save(tmp_path / "noscale.safetensors", kept)
    base = save(tmp_path / "base.safetensors", {k: v.to(torch.float16) for k, v in expected.items()})
    with pytest.raises(OrthoMechaError, match=r"noscale\.safetensors: marked scaled_fp8 .* holds no scale key"):
        Model(broken)
    result = cli("validate", "--base", base, broken)
    assert result.code == 2 and "holds no scale key" in result.err
    plain_fp8 = save(tmp_path / "plain_fp8.safetensors", {k: v for k, v in kept.items() if k != "scaled_fp8"})
    with Model(plain_fp8) as model:  # the same weights without the marker: fp8 as it is, as before
        assert not model.scaled_fp8


# -- shards ------------------------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, Path]:
    """The same tensors as one file and as three shards with an index; returns (single file, shard folder)."""
    tensors = state(5, keys=10)
    single = save(tmp_path / "single.safetensors", tensors)
    folder = tmp_path / "shards"
    folder.mkdir()
    write_sharded(folder, "model", tensors, shards=3)
    return single, folder


@pytest.mark.parametrize(
    ("given", "drop_index"),
    [
        ("model.safetensors.index.json", False),
        ("model-00002-of-00003.safetensors", False),
        ("model-00003-of-00003.safetensors", True),
        ("folder", False),
        ("folder", True),
    ],
)
def test_sharded_model_reads_as_the_single_file(sharded: tuple[Path, Path], given: str, drop_index: bool) -> None:
    single, folder = sharded
    if drop_index:
        (folder / "model.safetensors.index.json").unlink()
    if given == "folder":
        first = "model-00001-of-00003.safetensors" if drop_index else "model.safetensors.index.json"
        assert expand_model_paths([folder]) == [folder / first]  # the shards are one model
        path = folder / first
    else:
        path = folder / given
    expected = stored(single)
    with Model(path) as model:
        assert len(model.files) == 3
        assert set(model.tensors) == set(expected)
        for key, value in expected.items():
            assert torch.equal(model.read_tensor(key, torch.float64), value)


def test_folder_of_shards_counts_as_one_model(sharded: tuple[Path, Path], cli) -> None:
    single, folder = sharded
    save(folder / "other.safetensors", state(6, keys=10))
    assert expand_model_paths([folder]) == [folder / "model.safetensors.index.json", folder / "other.safetensors"]
    result = cli("validate", "--base", single, folder)
    assert result.code == 0, result.err
    assert result.out.count("10/10 keys shared (100%), OK") == 2
    assert result.out.count("merge refuses it: sharded in 3 files: merge the single file 'ortho-mecha convert' "
                            "writes") == 1


def test_key_in_two_shards_is_an_error(tmp_path: Path) -> None:
    tensors = state(1)
    index = write_sharded(tmp_path, "m", tensors)
    save(tmp_path / "m-00002-of-00002.safetensors", tensors)  # shard 2 now repeats shard 1's keys
    with pytest.raises(OrthoMechaError, match="is in two shards"):
        Model(index)


@pytest.mark.parametrize("entry", ["../other/m-00002-of-00002.safetensors", "/tmp/m-00002-of-00002.safetensors",
                                   "..\\other\\m.safetensors"])
def test_an_index_naming_a_file_outside_its_folder_is_refused(tmp_path: Path, entry: str) -> None:
    """An index names its shards beside it; one leading elsewhere was followed (QA10: read-only, but another
    model's file would have been read as this one's)."""
    index = write_sharded(tmp_path, "m", state(1))
    data = json.loads(index.read_text())
    data["weight_map"] = {key: entry for key in data["weight_map"]}
    index.write_text(json.dumps(data))
    with pytest.raises(OrthoMechaError, match=r"index\.json: sharded-model index names a file outside its folder"):
        Model(index)


# -- key mapping ----------------------------------------------------------------------------------------------


def checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The all-in-one checkpoint spelling: prefixed diffusion keys plus text-encoder and VAE keys."""
    extra = {
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.ones(8, 4),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(4),
        "first_stage_model.decoder.conv_in.weight": torch.ones(4, 4, 3, 3),
    }
    return {DIFFUSION_PREFIX + k: v for k, v in tensors.items()} | extra


def as_scale(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL spelling: ``*norm.weight`` stored as ``*norm.scale``."""
    return {
        k.removesuffix(".norm.weight") + ".norm.scale" if k.endswith(".norm.weight") else k: v
        for k, v in tensors.items()
    }


def test_prefixed_checkpoint_lines_up_with_a_bare_base(tmp_path: Path, cli) -> None:
    base = save(tmp_path / "base.safetensors", state(0))
    ckpt = save(tmp_path / "ckpt.safetensors", checkpoint(state(1)))
    with Model(base) as b, Model(ckpt) as m:
        alignment = align(b, [m])
        check = alignment.checks[0]
        assert (check.shared, check.missing, check.extra) == (6, 0, 0)
        assert check.prefix_stripped == 6
        assert check.non_diffusion == 3
        assert alignment.file_key(1, "layers.0.norm.weight") == DIFFUSION_PREFIX + "layers.0.norm.weight"
        assert alignment.file_key(0, "layers.0.norm.weight") == "layers.0.norm.weight"
    result = cli("validate", "--base", base, ckpt)
    assert result.code == 0, result.err
    assert "'model.diffusion_model.' prefix removed from 6 keys" in result.out
    assert "3 text-encoder/VAE/other keys set aside (diffusion analysis)" in result.out


def test_a_file_lacking_the_checkpoint_bases_text_encoder_and_vae_is_told_so(tmp_path: Path, cli) -> None:
    base = save(tmp_path / "base.safetensors", checkpoint(state(0)))
    unet = save(tmp_path / "unet.safetensors", state(1))  # a UNet-only fine-tune: no text encoder, no VAE
    partial = checkpoint(state(2))
    del partial["first_stage_model.decoder.conv_in.weight"]
    ckpt = save(tmp_path / "ckpt.safetensors", partial)
    full = save(tmp_path / "full.safetensors", checkpoint(state(3)))
    with Model(base) as b, Model(unet) as u, Model(ckpt) as c, Model(full) as f:
        checks = align(b, [u, c, f]).checks
    assert [check.missing_components for check in checks] == [2, 1, 0]  # position_ids is not a float key
    assert checks[1].missing_component_examples == ["first_stage_model.decoder.conv_in.weight"]
    result = cli("validate", "--base", base, unet, ckpt, full)
    assert result.code == 0, result.err
    assert ("2 of the base's text-encoder/VAE keys missing (merge takes this row's delta there as 0), e.g. "
            "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight, "
            "first_stage_model.decoder.conv_in.weight") in result.out
    assert "1 of the base's text-encoder/VAE keys missing" in result.out
    assert result.out.count("text-encoder/VAE keys missing") == 2


def test_scale_norms_are_renamed_and_reported(tmp_path: Path, cli) -> None:
    base = save(tmp_path / "base.safetensors", checkpoint(state(0)))  # a checkpoint base with .weight norms
    bfl = save(tmp_path / "bfl.safetensors", as_scale(state(1)))
    with Model(base) as b, Model(bfl) as m:
        mapping = key_map(m)
        assert mapping.renamed == 3
        assert mapping.keys["layers.2.norm.weight"] == "layers.2.norm.scale"
        alignment = align(b, [m])
        assert alignment.checks[0].shared == 6
        assert alignment.file_key(1, "layers.2.norm.weight") == "layers.2.norm.scale"
    result = cli("validate", "--base", base, bfl)
    assert result.code == 0, result.err
    assert "3 '.scale' norm keys read as '.weight'" in result.out


def test_few_prefixed_keys_do_not_make_a_checkpoint(tmp_path: Path) -> None:
    """Like ComfyUI, a file is a checkpoint only when more than 5 keys carry the prefix."""
    tensors = state(0) | {DIFFUSION_PREFIX + "extra.weight": torch.ones(2)}
    with Model(save(tmp_path / "m.safetensors", tensors)) as model:
        mapping = key_map(model)
    assert mapping.prefix_stripped == 0
    assert DIFFUSION_PREFIX + "extra.weight" in mapping.keys


def test_shape_mismatch_is_reported_and_left_out(tmp_path: Path, cli) -> None:
    base = save(tmp_path / "base.safetensors", state(0))
    odd = state(1) | {"layers.1.attn.qkv.weight": torch.ones(6, 5)}
    model = save(tmp_path / "odd.safetensors", odd)
    report = tmp_path / "report.json"
    result = cli("validate", "--base", base, model, "--json", report)
    assert result.code == 0, result.err
    assert "1 key with a shape unlike the base's (left out): layers.1.attn.qkv.weight" in result.out
    assert (f"{model}: 5/6 keys shared (83%), OK for analysis; merge refuses it: 1 key has a shape unlike the "
            "base's") in result.out
    analysed = cli("analyse", "--base", base, model, "--json", tmp_path / "analysis.json")
    assert analysed.code == 0 and (f"{model}: 1 key with a shape unlike the base's left out of its figures (merge "
                                   "refuses it), e.g. layers.1.attn.qkv.weight") in analysed.err, analysed.err
    check = json.loads(report.read_text())["models"][0]
    assert check["shape_mismatch"] == ["layers.1.attn.qkv.weight"]
    assert check["merge_refusals"] == ["1 key has a shape unlike the base's"]
    from ortho_mecha.mecha_config import check_model, register_base_config

    with pytest.raises(OrthoMechaError, match=r"key 'layers\.1\.attn\.qkv\.weight' has shape \[6, 5\]"):
        check_model(register_base_config(base), base, model)  # what merge runs: the refusal validate announced
    assert (check["shared"], check["missing"]) == (5, 0)
    with Model(base) as b, Model(model) as m:
        alignment = align(b, [m])
        assert alignment.file_key(1, "layers.1.attn.qkv.weight") is None
        assert "layers.1.attn.qkv.weight" in alignment.keys  # still analysed for the others


def test_a_model_of_another_width_is_said_to_have_other_shapes(tmp_path: Path, cli_error) -> None:
    # the same key names at another width: "is it the same architecture? (base: custom, this file: custom)" answered
    # itself; the shapes are the reason
    base = save(tmp_path / "base.safetensors", state(0))
    wider = {k: torch.ones(2 * v.shape[0], *v.shape[1:]) for k, v in state(1).items()}
    model = save(tmp_path / "wider.safetensors", wider)
    error = cli_error("validate", "--base", base, model)
    assert ("shares only 0 of the 6 diffusion keys of the base" in error and "6 of its keys have other shapes than "
            "the base's, e.g. 'layers.0.attn.qkv.weight' [12, 4] vs [6, 4]: a model of another size or variant?"
            in error), error
    stranger = save(tmp_path / "stranger.safetensors", {f"other.{i}.weight": torch.ones(3, 3) for i in range(4)})
    assert "is it the same architecture?" in cli_error("validate", "--base", base, stranger)  # other names: as before


def test_exactly_half_the_keys_is_enough(tmp_path: Path) -> None:
    base = save(tmp_path / "base.safetensors", state(0))
    half = {k: v for i, (k, v) in enumerate(state(1).items()) if i % 2 == 0}
    with Model(base) as b, Model(save(tmp_path / "half.safetensors", half)) as m:
        check = align(b, [m]).checks[0]
    assert (check.shared, check.missing, check.shared_fraction) == (3, 3, 0.5)
    assert "3 base keys missing (delta taken as 0)" in check.messages[0]


# -- convert: one plain file that merge (sd-mecha) reads --------------------------------------------------------


def test_a_converted_scaled_fp8_model_merges_as_what_it_represents(read_files, tmp_path: Path, cli, digests) -> None:
    path, expected = read_files["per_row"]
    base = save(tmp_path / "base.safetensors", {k: (v * 0.9).to(torch.float16) for k, v in expected.items()})
    before = digests(path)
    plan = {"base": str(base), "method": "ortho_superpose", "rows": [{"model": str(path)}], "output_dtype": "fp32"}
    (tmp_path / "scaled.json").write_text(json.dumps(plan))
    refused = cli("merge", tmp_path / "scaled.json", "--out", tmp_path / "no.safetensors", "--no-survival")
    assert refused.code == 2 and f"'ortho-mecha convert {path} --out COPY.safetensors'" in refused.err
    copy = tmp_path / "copy.safetensors"
    result = cli("convert", path, "--out", copy, "--dtype", "fp32")
    assert result.code == 0, result.err
    assert result.out.startswith(f"wrote {copy}: 3 keys, 2 scaled fp8 weights dequantised, ")
    assert digests(path) == before
    with safe_open(str(copy), "pt") as f:
        assert sorted(f.keys()) == sorted(expected)  # scale tensors and the marker key are gone
        assert f.metadata()["ortho_mecha_converted_from"] == path.name
        for key, value in expected.items():
            assert torch.equal(f.get_tensor(key), value.to(torch.float32)), key
    plan["rows"] = [{"model": str(copy)}]
    (tmp_path / "copy.json").write_text(json.dumps(plan))
    merged = tmp_path / "merged.safetensors"
    assert cli("merge", tmp_path / "copy.json", "--out", merged, "--no-survival").code == 0
    with safe_open(str(merged), "pt") as f:
        for key, value in expected.items():
            assert torch.allclose(f.get_tensor(key).double(), value, rtol=1e-5, atol=1e-6), key


def test_comfyui_fp8_mixed_precision_converts_without_its_quant_markers(tmp_path: Path, cli) -> None:
    # ComfyUI's fp8mixed layout: <layer>.weight fp8, <layer>.weight_scale, <layer>.comfy_quant (a U8 JSON marker
    # by which ComfyUI loads a layer as quantised). A converted copy kept the markers, so ComfyUI would have read
    # its bf16 weights as fp8 layers without a scale; a merge on it copied them in as "repairs"
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 4, generator=generator)
    scale = weight.abs().max() / 448.0
    quantised = (weight / scale).to(torch.float8_e4m3fn)
    marker = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    path = save(tmp_path / "fp8mixed.safetensors", {
        "layers.0.attn.qkv.weight": quantised, "layers.0.attn.qkv.weight_scale": scale.reshape(()),
        "layers.0.attn.qkv.comfy_quant": marker, "layers.0.norm.weight": torch.ones(4, dtype=torch.bfloat16)})
    copy = tmp_path / "copy.safetensors"
    result = cli("convert", path, "--out", copy, "--dtype", "bf16")
    assert result.code == 0, result.err
    with safe_open(str(copy), "pt") as f:
        assert sorted(f.keys()) == ["layers.0.attn.qkv.weight", "layers.0.norm.weight"]
        expected = (quantised.to(torch.float64) * scale.double()).to(torch.bfloat16)
        assert torch.equal(f.get_tensor("layers.0.attn.qkv.weight"), expected)


def test_convert_keeps_a_plain_fp8_key_as_it_is(tmp_path: Path, cli) -> None:
    """A scaled-fp8 file whose norms are plain fp8 (no scale), kept by the default --dtype keep: the fp8 values are
    written as they are (torch compares no fp8: the range check failed with a torch message naming nothing)."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(6, 4, generator=generator)
    scale = weight.abs().max() / 448.0
    norm = torch.tensor([0.5, 1.0, float("nan"), -2.0]).to(torch.float8_e4m3fn)
    path = save(tmp_path / "scaled.safetensors", {
        "layers.0.attn.qkv.weight": (weight / scale).to(torch.float8_e4m3fn),
        "layers.0.attn.qkv.scale_weight": scale.reshape(1), "layers.0.norm.weight": norm})
    copy = tmp_path / "copy.safetensors"
    result = cli("convert", path, "--out", copy)
    assert result.code == 0, result.err
    with safe_open(str(copy), "pt") as f:
        kept = f.get_tensor("layers.0.norm.weight")
        assert kept.dtype == torch.float8_e4m3fn and torch.equal(kept.view(torch.uint8), norm.view(torch.uint8))


def test_convert_keeps_dtypes_by_default_and_joins_shards(sharded: tuple[Path, Path], read_files, tmp_path: Path,
                                                          cli) -> None:
    single, folder = sharded
    joined = tmp_path / "joined.safetensors"
    result = cli("convert", folder / "model.safetensors.index.json", "--out", joined)
    assert result.code == 0, result.err
    assert "from 3 shards: 10 keys" in result.out
    expected = stored(single)
    got = stored(joined)
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    from_folder = tmp_path / "from_folder.safetensors"  # the shards' folder stands for the model, as in analyse
    assert cli("convert", folder, "--out", from_folder).code == 0
    again = stored(from_folder)
    assert sorted(again) == sorted(expected) and all(torch.equal(again[k], expected[k]) for k in expected)
    two = tmp_path / "two"
    two.mkdir()
    save(two / "a.safetensors", state(1))
    save(two / "b.safetensors", state(2))
    assert "holds 2 models; name the one to convert" in cli("convert", two, "--out", tmp_path / "x.safetensors").err
    path, _ = read_files["per_row"]
    kept = tmp_path / "kept.safetensors"
    assert cli("convert", path, "--out", kept).code == 0
    with safe_open(str(kept), "pt") as f:
        names = f.keys()
        assert {k: f.get_slice(k).get_dtype() for k in names} == {
            "wide.weight": "BF16", "conv.weight": "BF16", "bias": "F16"}


def test_convert_refuses_to_overwrite_and_leaves_nothing_when_it_fails(read_files, tmp_path: Path, cli_error,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = read_files["plain"]
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert "already exists" in cli_error("convert", path, "--out", out)
    assert out.read_bytes() == b"precious"
    assert "would replace one of its own inputs" in cli_error("convert", path, "--out", path, "--overwrite")
    calls = []

    def failing(self: Model, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        calls.append(key)
        if len(calls) == 2:
            raise OrthoMechaError("read failed", self.path)
        return real(self, key, dtype)

    real = Model.read_tensor
    monkeypatch.setattr(Model, "read_tensor", failing)
    fresh = tmp_path / "fresh.safetensors"
    assert "read failed" in cli_error("convert", path, "--out", fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


# -- the validate command -------------------------------------------------------------------------------------


def test_validate_summary_and_json_report(family: dict[str, Path], tmp_path: Path, cli, digests) -> None:
    models = [family["anime"], family["photo"], family["unrelated"]]
    report = tmp_path / "out" / "report.json"
    report.parent.mkdir()
    before = digests(family["base"].parent)
    result = cli("validate", "--base", family["base"], *models, "--json", report)
    assert result.code == 0, result.err
    assert result.err == ""
    with Model(family["base"]) as base:
        n = len(base.tensors)
    lines = result.out.splitlines()
    assert lines[0] == f"base {family['base']}: custom, {n} diffusion keys"
    for model in models:
        assert f"  {model}: {n}/{n} keys shared (100%), OK" in lines
    data = json.loads(report.read_text())
    assert data["base"] == str(family["base"])
    assert data["arch"] == "custom"
    assert data["keys"] == n
    assert [m["path"] for m in data["models"]] == [str(m) for m in models]
    first = data["models"][0]
    assert (first["shared"], first["shared_fraction"], first["missing"], first["extra"]) == (n, 1.0, 0, 0)
    assert first["dtypes"] == {"F16": n}
    assert first["shape_mismatch"] == [] and first["notes"] == [] and first["scaled_fp8"] is False
    assert digests(family["base"].parent) == before


def test_validate_accepts_a_folder_and_skips_the_base_in_it(family: dict[str, Path], cli, tmp_path: Path) -> None:
    folder = family["base"].parent
    result = cli("validate", "--base", family["base"], folder)
    assert result.code == 0, result.err
    shared_lines = [line for line in result.out.splitlines() if "keys shared" in line]
    assert len(shared_lines) == len(family) - 1
    assert not any(str(family["base"]) + ":" in line for line in shared_lines)
    assert "left out" not in result.err  # the base's own folder lists it: no news
    analysed = cli("analyse", "--base", family["base"], folder, "--json", tmp_path / "report.json")
    assert analysed.code == 0 and "left out" not in analysed.err, analysed.err
    link = tmp_path / "base_link.safetensors"
    link.symlink_to(family["base"])
    linked = cli("validate", "--base", family["base"], link, family["anime"])
    assert linked.code == 0 and f"{link}: is the base {family['base']} itself" in linked.err  # said, not dropped
    for command in ("validate", "analyse"):  # the base itself among the models, by its own name
        again = cli(command, "--base", family["base"], family["base"], family["anime"])
        assert again.code == 0 and f"{family['base']}: is the base; left out of the models" in again.err


def test_sft_and_upper_case_names_are_read_and_a_plan_asks_to_rename_them(family: dict[str, Path], tmp_path: Path,
                                                                          cli, cli_error) -> None:
    """BFL's Flux releases are .sft; files from Windows may say .SAFETENSORS: every command reads them (a folder's
    scan too), and plan/merge, whose sd-mecha opens only *.safetensors names, say to rename or link them."""
    folder = tmp_path / "m"
    folder.mkdir()
    base = folder / "base.sft"
    base.write_bytes(family["base"].read_bytes())
    for name, file_name in (("anime", "anime.sft"), ("photo", "PHOTO.SAFETENSORS")):
        (folder / file_name).write_bytes(family[name].read_bytes())
    assert expand_model_paths([folder]) == [folder / "PHOTO.SAFETENSORS", folder / "anime.sft", base]
    result = cli("analyse", "--base", base, folder / "anime.sft", folder / "PHOTO.SAFETENSORS", "--json",
                 tmp_path / "r.json")
    assert result.code == 0, result.err
    plan = {"base": str(family["base"]), "method": "ortho_superpose", "rows": [{"model": str(folder / "anime.sft")}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    line = cli_error("merge", tmp_path / "plan.json", "--out", tmp_path / "out.safetensors")
    assert "opens only files named *.safetensors: rename or link it as anime.safetensors" in line
    assert not (tmp_path / "out.safetensors").exists()


def test_a_model_of_a_sibling_family_is_flagged_not_passed_silently(tmp_path: Path, cli) -> None:
    """Chroma shares most of Flux.1's keys, so a Chroma model over a Flux.1 base passes the half-shared rule: it is
    said (validate's notes, a warning from analyse and merge), as its delta is the whole family difference."""
    from tests.modelgen import write_family_files

    paths = write_family_files(tmp_path / "m", "flux", "fp32", members=["base", "anime", "photo"])
    guidance = {"distilled_guidance_layer.in_proj.weight": torch.zeros(4, 4, dtype=torch.float64)}  # Chroma's
    chroma = stored(paths["photo"]) | guidance
    save_file({k: v.float() for k, v in chroma.items()}, str(paths["photo"]))
    result = cli("validate", "--base", paths["base"], paths["anime"], paths["photo"])
    assert result.code == 0, result.err
    note = "its keys are those of a chroma model, but the base is flux1"
    assert note in result.out and result.out.count(note) == 1
    plan = {"base": str(paths["base"]), "method": "ortho_superpose",
            "rows": [{"model": str(paths["anime"])}, {"model": str(paths["photo"])}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    assert note not in result.err  # said once
    analysed = cli("analyse", "--base", paths["base"], paths["anime"], paths["photo"], "--json", tmp_path / "r.json")
    assert analysed.code == 0 and analysed.err.count(note) == 1
    planned = cli("plan", tmp_path / "r.json", "--json", tmp_path / "proposed.json")
    assert planned.code == 0 and any(line.startswith("photo.safetensors:") and note in line
                                     for line in planned.out.splitlines())  # in the row's reason too
    merged = cli("merge", tmp_path / "plan.json", "--out", tmp_path / "out.safetensors")
    assert merged.code == 0, merged.err  # merged as asked (siblings may be merged on purpose), but said, once
    assert f"{paths['photo']}: {note}" in merged.err and merged.err.count(note) == 1


def test_a_model_named_twice_is_taken_once(family: dict[str, Path], cli) -> None:
    folder = family["base"].parent
    result = cli("validate", "--base", family["base"], family["anime"], folder, family["anime"])
    assert result.code == 0, result.err
    shared_lines = [line for line in result.out.splitlines() if "keys shared" in line]
    assert len(shared_lines) == len(family) - 1
    assert f"{folder / 'anime.safetensors'}: given more than once; taken once" in result.err


def test_validate_arch_option_is_reported(family: dict[str, Path], cli) -> None:
    result = cli("validate", "--base", family["base"], family["anime"], "--arch", "zimage-base")
    assert result.code == 0, result.err
    assert result.out.startswith(f"base {family['base']}: zimage,")


def test_validate_never_writes_to_inputs(tmp_path: Path, cli, digests) -> None:
    """Inputs in every spelling (checkpoint, .scale norms, fp8 scaled, shards) stay byte-identical."""
    folder = tmp_path / "in"
    folder.mkdir()
    base = save(folder / "base.safetensors", state(0))
    save(folder / "ckpt.safetensors", checkpoint(state(1)))
    save(folder / "bfl.safetensors", as_scale(state(2)))
    write_scaled_fp8(folder / "scaled.safetensors", state(3))
    write_sharded(folder, "big", state(4))
    before = digests(folder)
    stats = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    result = cli("validate", "--base", base, folder, "--json", tmp_path / "report.json")
    assert result.code == 0, result.err
    assert result.out.count("OK") == 4
    assert digests(folder) == before
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stats


def test_lora_nan_binary_plan_and_absent_device_are_one_clear_line(tmp_path: Path, cli_error: Callable,
                                                                    digests: Callable) -> None:
    """extract-lora and compress refuse a kohya LoRA and name a NaN key's file; a model given as a plan or a
    report, and a device this PyTorch lacks, are named as such."""
    base, a = save(tmp_path / "base.safetensors", state(0)), save(tmp_path / "a.safetensors", state(1))
    lora = save(tmp_path / "lora.safetensors", {"lora_unet_layers_0_attn_qkv.lora_down.weight": torch.ones(2, 4),
                                                "lora_unet_layers_0_attn_qkv.lora_up.weight": torch.ones(6, 2)})
    nan = state(2)
    nan["layers.1.attn.qkv.weight"][0, 0] = float("nan")
    b = save(tmp_path / "nan.safetensors", nan)
    before = digests(base, a, b, lora)
    out = tmp_path / "out.safetensors"
    assert "lora.safetensors: is a kohya LoRA, not a full model" in cli_error(
        "extract-lora", lora, base, "--rank", "2", "--out", out)
    assert "nan.safetensors: key 'layers.1.attn.qkv.weight' holds NaN or Inf" in cli_error(
        "extract-lora", b, base, "--rank", "2", "--out", out)
    assert "lora.safetensors: is a kohya LoRA" in cli_error(
        "compress", "--base", base, a, lora, "--out", tmp_path / "c")
    assert "nan.safetensors: key 'layers.1.attn.qkv.weight' holds NaN or Inf" in cli_error(
        "compress", "--base", base, a, b, "--out", tmp_path / "c")
    assert "base.safetensors: not a report: not JSON text (a .safetensors file?)" in cli_error(
        "plan", base, "--json", tmp_path / "p.json")
    assert "base.safetensors: not a plan: not JSON text" in cli_error("merge", base, "--out", out)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"base": "base.safetensors", "method": "ortho_superpose",
                                "rows": [{"model": "a.safetensors"}]}))
    if not torch.cuda.is_available():
        assert "device 'cuda' is not available to this PyTorch" in cli_error("merge", plan, "--out", out,
                                                                           "--device", "cuda")
    assert digests(base, a, b, lora) == before
    assert not out.exists() and not (tmp_path / "c").exists() and not (tmp_path / "p.json").exists()


def test_cache_folder_chunk_and_report_folder_errors(tmp_path: Path, cli_error: Callable,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base, a = save(tmp_path / "base.safetensors", state(0)), save(tmp_path / "a.safetensors", state(1))
    common = ["analyse", "--base", base, a]
    assert "--chunk must be positive, got 0" in cli_error(*common, "--no-cache", "--chunk", "0")
    assert "missing: the folder for the report does not exist" in cli_error(
        *common, "--no-cache", "--json", tmp_path / "missing" / "r.json")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("ORTHO_MECHA_CACHE", str(blocker))
    line = cli_error(*common)
    assert "not-a-folder" in line and "cannot use the cache folder" in line and "ORTHO_MECHA_CACHE" in line


def test_a_reader_that_leaves_the_pipe_gets_no_error(tmp_path: Path) -> None:
    """``ortho-mecha … | head -1``: the command ends quietly, with a SIGPIPE'd tool's status (141)."""
    import os
    import subprocess
    import sys

    script = ("import sys\nfrom ortho_mecha.cli import main\n"
              "sys.stdout = open(sys.stdout.fileno(), 'w', buffering=1)\nraise SystemExit(main(sys.argv[1:]))\n")
    run = subprocess.Popen([sys.executable, "-c", script, "cache", "show"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env={**os.environ, "ORTHO_MECHA_CACHE": str(tmp_path / "cache")})
    run.stdout.close()  # the reader is gone before the first line
    _, err = run.communicate(timeout=60)
    assert (run.returncode, err) == (141, b"")
