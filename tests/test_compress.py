"""Shared-base compression: planted families recovered, errors equal to the best rank-1/rank-2 fit, export.

A planted family ``W_m = W̃ + λ_m D (+ κ_m Q)`` must give back the scalars up to what the model cannot
tell apart — a common scale and sign of λ (one direction), any invertible 2×2 mix of (λ, κ) (two) — with
near-zero error; on unstructured noise the reported errors must be exactly those of the best low-rank
fit of the stacked deltas (Eckart–Young), whatever they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ortho_mecha.compress import AVERAGE_FILE, als, export, fit, fit_key
from ortho_mecha.errors import OrthoMechaError
from tests.modelgen import stored

SHAPES = {
    "layers.0.attn.weight": (10, 12),
    "layers.0.conv.weight": (6, 4, 3, 3),
    "layers.0.proj.weight": (16, 5),
    "layers.0.norm.weight": (10,),
}
LAMBDAS = [1.0, -0.5, 2.0, 0.3]
KAPPAS = [0.2, 1.0, -0.7, 0.0]


def randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def planted_family(folder: Path, kappas: list[float] | None = None, noise: float = 0.0, seed: int = 0) -> dict:
    """float64 files ``base`` and ``m0..m3`` = base + λ_m D (+ κ_m Q) (+ noise); returns paths and parts."""
    generator = torch.Generator().manual_seed(seed)
    base = {k: randn(s, generator) for k, s in SHAPES.items()}
    d = {k: randn(s, generator) for k, s in SHAPES.items()}
    q = {k: randn(s, generator) for k, s in SHAPES.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "base.safetensors"))
    models = []
    for m, lam in enumerate(LAMBDAS):
        kappa = kappas[m] if kappas else 0.0
        weights = {k: base[k] + lam * d[k] + kappa * q[k] + noise * randn(SHAPES[k], generator) for k in SHAPES}
        save_file(weights, str(folder / f"m{m}.safetensors"))
        models.append(folder / f"m{m}.safetensors")
    return {"base": folder / "base.safetensors", "models": models, "d": d, "q": q, "weights": base}


def best_fit_errors(models: list[Path], base: dict[str, torch.Tensor], key: str, rank: int) -> np.ndarray:
    """Per-model relative error of the best rank-``rank`` fit of the stacked deltas of ``key`` (float64 SVD)."""
    x = torch.stack([(stored(p)[key] - base[key]).flatten() for p in models])
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    approx = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    return ((x - approx).norm(dim=1) / x.norm(dim=1)).numpy()


# -- the fit on plain Grams ---------------------------------------------------------------------------


def test_als_hand_computed() -> None:
    # X1 = e1, X2 = 2·e1, X3 = 0: one direction explains everything; λ ∝ (1, 2, 0), the largest scaled to +1
    gram = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    lam, a = als(gram, rounds=3, floor=0.0)
    np.testing.assert_allclose(lam, [0.5, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(a @ gram @ a, 4.0)  # ‖δW‖² = ‖X2‖²: λ_2 δW = X2
    result = fit_key("k", (1,), gram, directions=1, rounds=3)
    assert result.error == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)
    assert result.norm_dw == pytest.approx(2.0)


def test_als_zero_gram_gives_zero_scalars() -> None:
    lam, a = als(np.zeros((3, 3)), rounds=2, floor=0.0)
    assert not lam.any() and not a.any()
    assert fit_key("k", (2,), np.zeros((3, 3)), directions=2, rounds=2).error == [0.0, 0.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(models=st.integers(2, 6), width=st.integers(1, 30), directions=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_fit_key_errors_are_the_best_low_rank_fit(models: int, width: int, directions: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(models, width, generator=generator, dtype=torch.float64)
    result = fit_key("k", (width,), (x @ x.T).numpy(), directions, rounds=2)
    sigma, (u, s, vh) = torch.linalg.svdvals(x), torch.linalg.svd(x, full_matrices=False)
    approx = u[:, :directions] @ torch.diag(s[:directions]) @ vh[:directions]
    expected = ((x - approx).norm(dim=1) / x.norm(dim=1)).numpy()
    np.testing.assert_allclose(result.error, expected, atol=1e-6)
    # the fitted pieces rebuild the rank-k approximation: λ_m δW + κ_m δQ with δW = aᵀX, δQ = cᵀX
    a = torch.tensor(result.a, dtype=torch.float64)
    rebuilt = torch.outer(torch.tensor(result.lam, dtype=torch.float64), a @ x)
    if directions == 2:
        c = torch.tensor(result.c, dtype=torch.float64)
        rebuilt += torch.outer(torch.tensor(result.kappa, dtype=torch.float64), c @ x)
    np.testing.assert_allclose(rebuilt.numpy(), approx.numpy(), atol=1e-8 * float(sigma[0]))
    assert max(abs(v) for v in result.lam) == pytest.approx(1.0) or not any(result.lam)


# -- planted families on disk --------------------------------------------------------------------------


def test_one_direction_recovers_planted_scalars_against_a_base(tmp_path, digests) -> None:
    family = planted_family(tmp_path / "models")
    before = digests(tmp_path / "models")
    result = fit(family["models"], family["base"], directions=1)
    assert sorted(k.key for k in result.keys) == sorted(SHAPES)
    for key_fit in result.keys:
        lam = np.array(key_fit.lam)
        np.testing.assert_allclose(lam / lam[0], np.array(LAMBDAS) / LAMBDAS[0], rtol=1e-8)
        # λ_m ‖δW‖ is the planted λ_m ‖D‖ up to one common sign
        products = lam * key_fit.norm_dw
        planted = np.array(LAMBDAS) * float(family["d"][key_fit.key].norm())
        np.testing.assert_allclose(np.abs(products), np.abs(planted), rtol=1e-8)
        assert key_fit.error == pytest.approx([0.0] * 4, abs=1e-6)
    assert result.error == pytest.approx([0.0] * 4, abs=1e-6)
    assert digests(tmp_path / "models") == before


def test_average_base_recovers_centred_scalars(tmp_path) -> None:
    family = planted_family(tmp_path / "models")
    result = fit(family["models"], "average", directions=1)
    centred = np.array(LAMBDAS) - np.mean(LAMBDAS)  # the average already holds mean(λ)·D
    for key_fit in result.keys:
        lam = np.array(key_fit.lam)
        np.testing.assert_allclose(lam / lam[2], centred / centred[2], rtol=1e-6)
        assert max(key_fit.error) < 1e-6
    assert result.base == "average"
    assert fit(family["models"], None).keys[0].lam == result.keys[0].lam  # None means the average


def test_a_model_equal_to_the_average_up_to_rounding_has_no_fit_error(tmp_path) -> None:
    # W_m = W + s_m D with s = 0.5, 1, 1.5 in fp32: the middle one is the average, up to the average's rounding, and
    # its delta is rounding noise: an error relative to that noise (it was 98 %) says nothing
    generator = torch.Generator().manual_seed(3)
    base = {k: randn(s, generator) for k, s in SHAPES.items()}
    d = {k: randn(s, generator) for k, s in SHAPES.items()}
    models = []
    for m, scale in enumerate((0.5, 1.0, 1.5)):
        models.append(tmp_path / f"m{m}.safetensors")
        save_file({k: (base[k] + scale * d[k]).float() for k in SHAPES}, str(models[-1]))
    result = fit(models, "average", directions=1)
    middle = stored(models[1])
    assert any(float((stored(tmp_path / "m0.safetensors")[k] + stored(models[2])[k] - 2 * middle[k]).abs().max()) > 0
               for k in SHAPES)  # the files are not exact thirds: the middle one's delta is rounding, not zero
    assert result.error[1] == 0.0 and all(key_fit.error[1] == 0.0 for key_fit in result.keys)
    assert result.error[0] < 1e-6 and result.error[2] < 1e-6  # the others fit the one direction


def test_two_directions_recover_the_planted_plane(tmp_path) -> None:
    family = planted_family(tmp_path / "models", kappas=KAPPAS)
    one, two = fit(family["models"], family["base"], 1), fit(family["models"], family["base"], 2)
    planted = np.stack([LAMBDAS, KAPPAS], axis=1)
    for key_one, key_two in zip(one.keys, two.keys, strict=True):
        assert max(key_one.error) > 0.05  # one direction cannot hold a 2-D family
        assert max(key_two.error) < 1e-6
        fitted = np.stack([key_two.lam, key_two.kappa], axis=1)
        # the same plane: the planted scalars are an invertible 2×2 mix of the fitted ones
        mix, *_ = np.linalg.lstsq(fitted, planted, rcond=None)
        np.testing.assert_allclose(fitted @ mix, planted, atol=1e-8)
        assert abs(np.linalg.det(mix)) > 1e-6


def test_noise_errors_are_reported_as_they_are(tmp_path) -> None:
    family = planted_family(tmp_path / "models", noise=1.0)
    family_paths = family["models"]
    for directions in (1, 2):
        result = fit(family_paths, family["base"], directions)
        for key_fit in result.keys:
            expected = best_fit_errors(family_paths, family["weights"], key_fit.key, directions)
            np.testing.assert_allclose(key_fit.error, expected, rtol=1e-6, atol=1e-9)
        assert min(result.error) > 0.05  # noise is not compressible; the report says so


def test_bad_options_are_refused(tmp_path) -> None:
    family = planted_family(tmp_path / "models")
    with pytest.raises(OrthoMechaError, match="--directions must be 1 or 2"):
        fit(family["models"], family["base"], directions=3)
    with pytest.raises(OrthoMechaError, match="--rounds"):
        fit(family["models"], family["base"], rounds=0)
    with pytest.raises(OrthoMechaError, match="at least two models"):
        fit(family["models"][:1], family["base"])
    with pytest.raises(OrthoMechaError, match=r"at least two models \(got 1; the base .* is not counted as a model\)"):
        fit([family["base"], family["models"][0]], family["base"])  # the base itself is not a model: said (QA10)


# -- export ---------------------------------------------------------------------------------------------


def reapply(lora: dict[str, torch.Tensor], name: str, base: torch.Tensor) -> torch.Tensor:
    up, down = lora[f"{name}.lora_up.weight"].double(), lora[f"{name}.lora_down.weight"].double()
    scale = float(lora[f"{name}.alpha"]) / down.shape[0]
    return base + (up.flatten(1) @ down.flatten(1)).reshape(base.shape) * scale


LORA_NAMES = {
    "layers.0.attn.weight": "lora_unet_layers_0_attn",
    "layers.0.conv.weight": "lora_unet_layers_0_conv",
    "layers.0.proj.weight": "lora_unet_layers_0_proj",
}


@pytest.mark.parametrize("directions", [1, 2])
def test_export_against_a_base_rebuilds_every_model(tmp_path, directions: int, digests) -> None:
    family = planted_family(tmp_path / "models", kappas=KAPPAS if directions == 2 else None)
    before = digests(tmp_path / "models")
    out = tmp_path / "out"
    report = export(fit(family["models"], family["base"], directions), out, rank=16, dtype="fp32")
    assert sorted(p.name for p in out.iterdir()) == [f"m{m}_lora.safetensors" for m in range(4)]
    base = stored(family["base"])
    for m, path in enumerate(family["models"]):
        lora, weights = load_file(str(out / f"m{m}_lora.safetensors")), stored(path)
        for key, name in LORA_NAMES.items():
            error = float((weights[key] - reapply(lora, name, base[key])).norm())
            assert error <= 1e-5 * float((weights[key] - base[key]).norm())
        assert report.models[m].not_captured.keys == 1  # the norm
        assert report.models[m].energy_kept == pytest.approx(1.0, abs=1e-9)
    with safe_open(str(out / "m0_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ortho_mecha_base"] == str(family["base"]) and meta["ortho_mecha_model"] == str(family["models"][0])
    written = load_file(str(out / "m0_lora.safetensors"))
    downs = [t.shape[0] for k, t in written.items() if k.endswith("lora_down.weight")]
    assert meta["ss_network_dim"] == str(max(downs)) == "10"  # rank 16 asked: cut to the keys' shorter side
    assert digests(tmp_path / "models") == before


def test_the_reported_bound_holds_for_base_plus_lora(tmp_path) -> None:
    """The summary printed the fit error only (0.3 %) while base + a rank-8 LoRA was 65 % off: it now gives an upper
    bound on the end-to-end error of what it writes, which the real error (re-applied here) stays under."""
    family = planted_family(tmp_path / "models", noise=0.3)
    out = tmp_path / "out"
    report = export(fit(family["models"], family["base"], 1), out, rank=1, dtype="fp32")
    base = stored(family["base"])
    for m, path in enumerate(family["models"]):
        lora, weights = load_file(str(out / f"m{m}_lora.safetensors")), stored(path)
        rebuilt = {key: reapply(lora, name, base[key]) for key, name in LORA_NAMES.items()}
        off = sum(float((weights[k] - rebuilt.get(k, base[k])).square().sum()) for k in SHAPES)
        delta = sum(float((weights[k] - base[k]).square().sum()) for k in SHAPES)
        real = math.sqrt(off / delta)
        bound = report.models[m].error_bound
        assert real <= bound + 1e-9 and bound > report.models[m].fit_error
        assert bound < 3 * real  # a bound, not a wild one
    assert "so base + this LoRA is within" in report.summary_lines()[1]


def test_export_of_keys_no_lora_can_name_is_refused_and_writes_nothing(tmp_path) -> None:
    """Matrix keys without '.weight' have no kohya module name: the LoRAs would hold nothing (they were written
    empty, said to keep 100 %)."""
    generator = torch.Generator().manual_seed(3)
    folder = tmp_path / "models"
    folder.mkdir()
    base = {"encoder.attn.w": randn((6, 5), generator), "head.proj": randn((4, 5), generator)}
    save_file(base, str(folder / "base.safetensors"))
    models = []
    for m, lam in enumerate(LAMBDAS[:2]):
        d = {k: randn(v.shape, generator) for k, v in base.items()}
        save_file({k: base[k] + lam * d[k] for k in base}, str(folder / f"m{m}.safetensors"))
        models.append(folder / f"m{m}.safetensors")
    out = tmp_path / "out"
    with pytest.raises(OrthoMechaError, match=r"has a kohya module name .*here e.g. 'encoder.attn.w'\): no LoRA can "
                                              r"carry their deltas; nothing was written"):
        export(fit(models, folder / "base.safetensors", 1), out, rank=4)
    assert not out.exists()


def test_export_with_the_average_writes_the_base_and_rebuilds_models(tmp_path) -> None:
    family = planted_family(tmp_path / "models")
    out = tmp_path / "out"
    report = export(fit(family["models"], "average"), out, rank=16, dtype="fp32")
    average = stored(out / AVERAGE_FILE)
    weights = [stored(p) for p in family["models"]]
    assert sorted(average) == sorted(SHAPES)
    for key in SHAPES:
        torch.testing.assert_close(average[key], torch.stack([w[key] for w in weights]).mean(0), rtol=0, atol=1e-12)
    for m, w in enumerate(weights):
        lora = load_file(str(out / f"m{m}_lora.safetensors"))
        for key, name in LORA_NAMES.items():
            assert float((w[key] - reapply(lora, name, average[key])).norm()) <= 1e-5 * float(w[key].norm())
    assert report.base == str(out / AVERAGE_FILE)


def test_average_is_written_in_the_models_dtype(make_family, tmp_path) -> None:
    paths = make_family("custom", "fp16", members=["anime", "photo", "anime_v2"])
    out = tmp_path / "out"
    export(fit(list(paths.values()), "average", directions=2), out, rank=4)
    written = load_file(str(out / AVERAGE_FILE))
    models = [stored(p) for p in paths.values()]
    for key, value in written.items():
        assert value.dtype == torch.float16
        mean = torch.stack([m[key] for m in models]).mean(0)
        torch.testing.assert_close(value, mean.to(torch.float16), rtol=0, atol=0)
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_an_interrupted_export_leaves_nothing_and_the_rerun_writes_the_set(
    make_family, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ortho_mecha.compress as compress

    paths = make_family("custom", "fp16", members=["anime", "photo", "anime_v2"])
    fitted = fit(list(paths.values()), "average", directions=2)
    out = tmp_path / "out"
    real = compress.write_lora
    calls: list[Path] = []

    def interrupted_at_the_second(path: Path, *args, **kwargs) -> Path:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(compress, "write_lora", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        export(fitted, out, rank=4)
    assert not out.exists()  # the average and the first LoRA removed again, and the folder this run made
    monkeypatch.setattr(compress, "write_lora", real)
    report = export(fitted, out, rank=4)
    assert sorted(p.name for p in out.iterdir()) == sorted([AVERAGE_FILE, *(Path(m.lora).name for m in report.models)])


# -- command line ---------------------------------------------------------------------------------------


def test_cli_compress_writes_files_and_report(tmp_path, cli, digests) -> None:
    family = planted_family(tmp_path / "models")
    before = digests(tmp_path / "models")
    out, report = tmp_path / "out", tmp_path / "report.json"
    models = family["models"]
    result = cli("compress", "--base", "average", *models, "--out", out, "--rank", 4, "--json", report)
    assert result.code == 0, result.err
    assert "fit error" in result.out
    data = json.loads(report.read_text())
    assert data["fit"]["models"] == [str(p) for p in models] and data["fit"]["directions"] == 1
    assert len(data["fit"]["error"]) == 4 and data["export"]["rank"] == 4
    assert sorted(p.name for p in out.iterdir()) == [AVERAGE_FILE] + [f"m{m}_lora.safetensors" for m in range(4)]
    assert digests(tmp_path / "models") == before


def test_cli_compress_errors_are_one_line_and_never_overwrite(tmp_path, cli, cli_error, digests) -> None:
    family = planted_family(tmp_path / "models")
    base, models = family["base"], family["models"]
    out = tmp_path / "out"
    assert cli("compress", "--base", base, *models, "--out", out, "--rank", 2).code == 0
    written = digests(out)
    line = cli_error("compress", "--base", base, *models, "--out", out, "--rank", 2)
    assert "m0_lora.safetensors" in line and "already exists" in line and "--overwrite" not in line
    assert digests(out) == written
    line = cli_error("compress", "--base", tmp_path / "nope.safetensors", *models, "--out", tmp_path / "o2")
    assert "nope.safetensors" in line and "no such file" in line
    line = cli_error("compress", "--base", base, models[0], "--out", tmp_path / "o3")
    assert "at least two models" in line
    line = cli_error("compress", "--base", base, *models, "--out", tmp_path / "o4", "--rank", 0)
    assert "--rank" in line
    line = cli_error("compress", "--base", base, *models, "--out", tmp_path / "o5", "--json", models[1])
    assert "input" in line
    assert not any((tmp_path / f"o{i}").exists() for i in range(2, 6))


def test_cli_compress_says_text_encoders_and_vae_are_outside_the_loras(tmp_path, cli) -> None:
    from tests.modelgen import write_checkpoint_family

    family = write_checkpoint_family(tmp_path / "sd1", "sd1", "fp16")
    result = cli("compress", "--base", family["base"], family["a"], family["b"], "--out", tmp_path / "out",
                 "--rank", 2)
    assert result.code == 0, result.err
    assert "text-encoder/VAE keys are outside the fit and the LoRAs" in result.out
    assert f"the base {family['base']} keeps its own" in result.out


def test_the_average_base_of_checkpoints_carries_their_text_encoders_and_vae(tmp_path, cli) -> None:
    # without them the written base was a checkpoint with no CLIP or VAE, and nothing held the models' encoders
    from ortho_mecha.components import base_components
    from tests.modelgen import POSITION_IDS, write_checkpoint_family

    family = write_checkpoint_family(tmp_path / "sd1", "sd1", "fp16")
    models = [family[n] for n in ("a", "b", "c")]
    result = cli("compress", "--base", "average", *models, "--out", tmp_path / "out", "--rank", 2)
    assert result.code == 0, result.err
    assert "the written base holds their average" in result.out
    written = load_file(str(tmp_path / "out" / AVERAGE_FILE))
    beside = [k for keys in base_components(family["a"]).values() for k in keys if k != POSITION_IDS]
    assert beside and set(beside) <= set(written)
    stacked = [load_file(str(p)) for p in models]
    for key in beside:
        mean = torch.stack([m[key].double() for m in stacked]).mean(0)
        assert written[key].dtype == torch.float16
        torch.testing.assert_close(written[key], mean.half(), rtol=0, atol=0)  # the average, as the fp16 models
    assert list(base_components(tmp_path / "out" / AVERAGE_FILE)) == list(base_components(family["a"]))


class _FullDisk:
    """A file handle whose writes fail as on a full disk."""

    def write(self, data: object) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


def test_a_full_disk_names_the_file_being_written(tmp_path: Path) -> None:
    """The base average's streamed write said only '[Errno 28] No space left on device' (QA10)."""
    from ortho_mecha.compress import StreamingFile

    target = tmp_path / "base_average.safetensors"
    writer = StreamingFile(target, {"w": ("F32", (2, 2))}, {})
    writer._fh = _FullDisk()
    with pytest.raises(OrthoMechaError, match=r"base_average\.safetensors: cannot write \(No space left on device\); "
                                              r"nothing was written"):
        writer.write(torch.zeros(2, 2))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
