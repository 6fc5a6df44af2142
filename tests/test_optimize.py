"""Auto-fill, the optimizer and plans from a report, on planted families of seeded random deltas."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ortho_mecha import optimize
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.gram import cosine, delta_gram
from tests.modelgen import stored

DIM = 3000
NAMES = ["a", "a_copy", "a_near", "k", "u", "opposite", "null", "strong"]
QUALITY = [0.7, 0.4, 0.6, 0.6, 0.5, 0.5, 0.0, 0.3]
NULL = [False] * 6 + [True, False]


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM)
    return v / np.linalg.norm(v)


def planted(seed: int = 0) -> np.ndarray:
    """Deltas of: a; an exact copy of a; a near-copy (D = 0.0025·D_aC); k, a fine-tune of a; u, unrelated; the
    opposite of a; a null model; a strong model along a's direction (cos 0.85, 3× a's norm: not a's child)."""
    rng = np.random.default_rng(seed)
    a = unit(rng)
    return np.stack(
        [
            a,
            a.copy(),
            a + 0.05 * unit(rng),
            a + 0.5 * unit(rng),
            unit(rng),
            -a + 0.05 * unit(rng),
            np.zeros(DIM),
            3.0 * (0.85 * a + np.sqrt(1 - 0.85**2) * unit(rng)),
        ]
    )


def files_gram(x: np.ndarray) -> np.ndarray:
    return x @ x.T


def rows_by_name(choices: list[optimize.RowChoice]) -> dict[str, optimize.RowChoice]:
    return dict(zip(NAMES, choices, strict=True))


def test_autofill_on_a_planted_family() -> None:
    h = files_gram(planted())
    rows = rows_by_name(optimize.autofill(h, 8, QUALITY, NULL, names=NAMES))
    assert rows["a"].enabled and rows["a"].delta_from is None and rows["a"].alpha == 1.0
    for copy in ("a_copy", "a_near"):
        assert not rows[copy].enabled and rows[copy].alpha == 0.0
        assert rows[copy].info.startswith("disabled: duplicate of a ")
    assert rows["k"].enabled and rows["k"].delta_from == 0 and "delta from a (its parent)" in rows["k"].info
    assert not rows["null"].enabled and "null delta" in rows["null"].info
    assert not rows["strong"].enabled and rows["strong"].alpha == 0.0
    assert rows["strong"].info.startswith("disabled: cos 0.85 with a, lower quality")
    # the unrelated model keeps high new information against every enabled row: repeat 2
    assert rows["u"].enabled and rows["u"].repeat == 2 and "repeat 2" in rows["u"].info
    # the opposite model is flagged, on both sides of the pair
    assert rows["opposite"].enabled and "opposes a (cos -1.00)" in rows["opposite"].info
    assert "opposes opposite" in rows["a"].info and rows["a"].repeat == 1
    assert all("\n" not in r.info for r in rows.values())


def test_a_merge_made_from_a_model_is_never_called_its_parent() -> None:
    """A 50/50 merge of two related fine-tunes sits nearer the base than each and within the parent rule's
    threshold of both; the lineage finds it is their merge, and auto-fill and the optimizer's start agree:
    both stay deltas from the base."""
    from ortho_mecha.lineage import lineage, parent

    rng = np.random.default_rng(3)
    a = unit(rng)
    b = 0.1 * a + np.sqrt(1 - 0.1**2) * unit(rng)  # cos 0.1
    h = files_gram(np.stack([a, b, (a + b) / 2]))
    assert parent(h, 0, [1, 2]) == 2  # the bare parent rule alone would take the merge
    items = lineage(h, 3, [0.5] * 3)
    assert items[2]["mix"] is not None and set(items[2]["mix"]) == {0, 1}
    assert items[0]["parent"] is None and items[1]["parent"] is None
    rows = optimize.autofill(h, 3, [0.5] * 3, [False] * 3, names=["style_a", "style_b", "mix_a_b"])
    assert [row.delta_from for row in rows] == [None, None, None]
    assert not any("its parent" in row.info for row in rows)
    # both ingredients enabled: the merge adds no direction they lack and would count their shares again
    assert [row.enabled for row in rows] == [True, True, False] and rows[2].alpha == 0.0
    assert rows[2].info.startswith("disabled: a merge of 0.50 style_a + 0.50 style_b (its lineage), which are enabled")
    # one ingredient left out (null here): the merge is the only carrier of its share and stays
    alone = optimize.autofill(h, 3, [0.5] * 3, [False, True, False], names=["style_a", "style_b", "mix_a_b"])
    assert alone[2].enabled


def test_duplicates_never_become_a_delta_from() -> None:
    h = files_gram(planted())
    fam = optimize._family(h, 8, QUALITY, NULL, NAMES)
    for i in range(8):
        allowed = fam.allowed_from(i)
        assert allowed[0] is None
        assert not {1, 2, 6} & set(allowed)  # the two copies of a and the null model
    for choices in (optimize.autofill(h, 8, QUALITY, NULL), optimize.optimize(h, 8, QUALITY, NULL)):
        assert not {1, 2, 6} & {c.delta_from for c in choices}


@pytest.mark.parametrize("seed", range(3))
def test_optimizer_collapses_copies_and_is_deterministic(seed: int) -> None:
    h = files_gram(planted(seed))
    first = optimize.optimize(h, 8, QUALITY, NULL, names=NAMES)
    assert first == optimize.optimize(h.copy(), 8, list(QUALITY), list(NULL), names=NAMES)
    rows = rows_by_name(first)
    assert not rows["a_copy"].enabled and not rows["a_near"].enabled and not rows["null"].enabled
    assert rows["a"].enabled and rows["u"].enabled
    assert "(identical), lower quality;" in rows["a_copy"].info  # 0.4 against a's 0.7
    tied = optimize.optimize(h, 8, [0.7, 0.7, *QUALITY[2:]], NULL, names=NAMES)  # a tie is said as one
    assert "(identical), the same quality (the one listed first is kept);" in rows_by_name(tied)["a_copy"].info


def _orthogonality(h: np.ndarray, choices: list[optimize.RowChoice], rows: list[int]) -> float:
    return optimize.orthogonality(delta_gram(h, list(range(len(choices))), [c.delta_from for c in choices]), rows)


@pytest.mark.parametrize("seed", range(3))
def test_optimizer_raises_orthogonality_above_the_parent_rule_start(seed: int) -> None:
    h = files_gram(planted(seed))
    active = [0, 3, 4, 5, 7]
    start = _orthogonality(h, optimize.optimize(h, 8, QUALITY, NULL, max_rounds=0), active)
    assert start == _orthogonality(h, optimize.autofill(h, 8, QUALITY, NULL), active)
    assert _orthogonality(h, optimize.optimize(h, 8, QUALITY, NULL), active) > start


def test_optimizer_moves_a_delta_from_the_parent_rule_misses() -> None:
    rng = np.random.default_rng(1)
    a, e, u = unit(rng), unit(rng), unit(rng)
    x = np.stack([a, a + 1.2 * e, u])  # row 1 holds a (cos 0.64) but is not a's child by the parent rule
    h = files_gram(x)
    filled = optimize.autofill(h, 3, [0.5, 0.5, 0.5], [False] * 3, names=["a", "x", "u"])
    assert filled[1].delta_from is None
    chosen = optimize.optimize(h, 3, [0.5, 0.5, 0.5], [False] * 3, names=["a", "x", "u"])
    assert chosen[1].delta_from == 0
    assert "delta from a, chosen by the optimizer (orthogonality of the rows" in chosen[1].info
    assert all(c.enabled for c in chosen)


@pytest.mark.parametrize("seed", range(3))
def test_a_merge_of_a_scaled_copy_of_a_model_is_not_its_delta_from(seed: int) -> None:
    """m = 0.3 a + 0.7 b, with s = 2 a in the set: the lineage may name s (0.15 × 2a) as m's ingredient; m is
    still made from a, and a's delta from m would be 0.7 (a − b), moving the merge against b."""
    rng = np.random.default_rng(seed)
    a, b = unit(rng), 0.4 * unit(rng)  # b smaller: a's delta from m does not point against m's
    h = files_gram(np.stack([a, 0.3 * a + 0.7 * b, 2.0 * a, b]))  # b: only a delta-from file
    fam = optimize._family(h, 3, [0.5] * 3, [False] * 3, ["a", "m", "s", "b"])
    assert 1 not in fam.allowed_from(0) and 1 not in fam.allowed_from(2)
    assert all(row.delta_from != 1 for row in optimize.optimize(h, 3, [0.5] * 3, [False] * 3))


def test_cycle_is_broken_at_its_weakest_link() -> None:
    rng = np.random.default_rng(2)
    a, e = unit(rng), unit(rng)
    h = files_gram(np.stack([a, a + 0.3 * e, 2.0 * e]))
    fam = optimize._family(h, 3, [0.5] * 3, [False] * 3, ["a", "b", "c"])
    delta_from: list[int | None] = [1, 0, None]  # a ← b ← a
    notes = optimize._break_cycles(fam, delta_from)
    # the link a ← b has D_ab / D_aC = 0.09, the link b ← a has D_ab / D_bC = 0.09 / 1.09: a's link is the weaker
    assert delta_from == [None, 0, None]
    assert notes == {0: "delta from the base: from b would close the cycle a ← b ← a"}


def test_single_row_gets_no_repeat() -> None:
    h = files_gram(np.stack([unit(np.random.default_rng(0))]))
    (only,) = optimize.optimize(h, 1, [0.5], [False])
    assert only.enabled and only.repeat == 1


# -- plan from a report ----------------------------------------------------------------------------


def report_for(x: np.ndarray, folder: Path, extra: np.ndarray | None = None) -> dict:
    """An ``analyse --json`` report built from delta vectors (models first, then an optional extra file)."""
    n = len(x)
    vectors = x if extra is None else np.vstack([x, extra[None]])
    h = files_gram(vectors)
    files = [str(folder / f"{name}.safetensors") for name in NAMES[:n]]
    if extra is not None:
        files.append(str(folder / "extra.safetensors"))
    g = delta_gram(h, list(range(n)), [None] * n)
    return {
        "base": str(folder / "base.safetensors"),
        "arch": "custom",
        "files": files,
        "models": files[:n],
        "delta_from": [None] * n,
        "h": h.tolist(),
        "gram": g.tolist(),
        "cos": cosine(g).tolist(),
        "new_info": (1 - cosine(g) ** 2).tolist(),
        "signal": {"effective_rank": [0.1, 0.5, 0.3, 0.2, 0.3, 0.3, 0.0, 0.6][:n], "snr": [50.0] * n},
        "outliers": {"max_outlier": [3.0] * n, "keys": [[] for _ in range(n)]},
        "null": NULL[:n],
    }


def test_plan_from_report_proposes_the_optimizer_mix(tmp_path: Path) -> None:
    report = report_for(planted(), tmp_path)
    plan = optimize.plan_from_report(report)
    assert plan["base"] == report["base"] and plan["method"] == "ortho_superpose"
    assert [row["model"] for row in plan["rows"]] == report["models"]
    rows = dict(zip(NAMES, plan["rows"], strict=True))
    assert rows["a_copy"]["enabled"] is False and "duplicate of a.safetensors" in rows["a_copy"]["info"]
    assert rows["null"]["enabled"] is False
    assert rows["a"]["enabled"] is True and rows["a"]["delta_from"] is None
    assert all(set(row) == {"model", "delta_from", "alpha", "repeat", "enabled", "info"} for row in plan["rows"])
    assert plan["options"]["rcond"] == 1e-6 and plan["texture"] is None
    assert json.loads(json.dumps(plan)) == plan


def test_plan_from_report_can_take_an_extra_file_as_delta_from(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    p, e = unit(rng), unit(rng)
    report = report_for(np.stack([p + 0.4 * e, unit(rng)]), tmp_path, extra=p)
    plan = optimize.plan_from_report(report, "weighted_sum")
    assert plan["rows"][0]["delta_from"] == str(tmp_path / "extra.safetensors")
    assert plan["method"] == "weighted_sum"


def test_plan_disables_a_model_that_merge_would_refuse(tmp_path: Path) -> None:
    report = report_for(planted(), tmp_path)
    reason = "1 key has a shape unlike the base's"
    report["validation"] = {"models": [
        {"path": f"models/{Path(f).name}", "merge_refusals": [reason] if Path(f).stem == "a" else []}
        for f in report["files"]
    ]}
    rows = dict(zip(NAMES, optimize.plan_from_report(report)["rows"], strict=True))
    assert rows["a"]["enabled"] is False and rows["a"]["info"] == f"disabled: merge refuses it ({reason})"
    assert rows["u"]["enabled"] is True
    # one of its copies is the twin kept (they were disabled as lower-quality duplicates of the refused file)
    assert [rows[name]["enabled"] for name in ("a_copy", "a_near")].count(True) == 1
    assert not any("duplicate of a.safetensors" in row["info"] for row in rows.values())
    assert all(row["delta_from"] != report["files"][0] for row in rows.values())  # nor anyone's delta-from


def test_plan_from_report_errors(tmp_path: Path) -> None:
    report = report_for(planted(), tmp_path)
    with pytest.raises(OrthoMechaError, match=r"unknown method 'superpose'; allowed: .*ortho_superpose"):
        optimize.plan_from_report(report, "superpose")
    broken = {k: v for k, v in report.items() if k != "h"}
    with pytest.raises(OrthoMechaError, match="no 'h'"):
        optimize.plan_from_report(broken)
    with pytest.raises(OrthoMechaError, match="nothing to merge"):
        optimize.plan_from_report(report_for(np.zeros((1, 4)), tmp_path) | {"null": [True]})


def test_cli_plan_writes_a_plan_that_loads(
    tmp_path: Path, cli: Callable[..., object], cli_error: Callable[..., str]
) -> None:
    from ortho_mecha.plan import load_plan

    report = report_for(planted(), tmp_path)
    for path in [report["base"], *report["files"]]:
        Path(path).touch()
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(report))
    out = tmp_path / "plan.json"
    result = cli("plan", report_path, "--json", out)
    assert result.code == 0, result.err
    assert "a_copy.safetensors: disabled: duplicate of a.safetensors" in result.out
    plan = load_plan(out)
    assert [row.model.name for row in plan.rows] == [f"{n}.safetensors" for n in NAMES]
    assert plan.rows[3].delta_from == tmp_path / "a.safetensors"
    written = out.read_text()
    assert "already exists" in cli_error("plan", report_path, "--json", out)
    assert out.read_text() == written
    assert cli("plan", report_path, "--json", out, "--method", "orthomerge", "--overwrite").code == 0
    assert load_plan(out).method == "orthomerge"
    assert cli("plan", report_path, "--json", out, "--autofill", "--overwrite").code == 0  # no search
    filled = optimize.plan_from_report(report, search=False)
    assert [row.info for row in load_plan(out).rows] == [row["info"] for row in filled["rows"]]
    assert "k.safetensors: enabled: delta from a.safetensors (its parent)" in cli(
        "plan", report_path, "--json", out, "--autofill", "--overwrite").out
    assert not any("chosen by the optimizer" in row["info"] for row in filled["rows"])
    assert not list(tmp_path.glob(".plan.json.*"))  # no temporary file left behind
    report_text = report_path.read_text()
    assert "is one of the inputs" in cli_error("plan", report_path, "--json", report_path, "--overwrite")
    assert "is named like a model file" in cli_error("plan", report_path, "--json", report["files"][0], "--overwrite")
    assert report_path.read_text() == report_text and Path(report["files"][0]).read_bytes() == b""


def test_cli_plan_error_lines(tmp_path: Path, cli_error: Callable[..., str]) -> None:
    assert "no such report" in cli_error("plan", tmp_path / "missing.json", "--json", tmp_path / "p.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in cli_error("plan", bad, "--json", tmp_path / "p.json")
    report = tmp_path / "report.json"
    report.write_text(json.dumps(report_for(planted(), tmp_path)))
    line = cli_error("plan", report, "--json", tmp_path / "p.json", "--method", "slerp")
    assert "--method: unknown method 'slerp'" in line and "orthomerge" in line and str(report) not in line
    missing = cli_error("plan", report, "--json", tmp_path / "p.json")  # the report's model files do not exist
    assert "does not exist" in missing
    assert f"error: {report}: base " in missing  # the report names it, not the plan not yet written (QA10)
    assert not (tmp_path / "p.json").exists()


def test_a_plan_from_a_report_of_relative_paths_loads_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[..., object]
) -> None:
    """The report holds absolute paths, so a plan written beside it (not in the folder ``analyse`` ran in)
    finds its models."""
    from ortho_mecha.plan import load_plan

    monkeypatch.chdir(tmp_path)
    assert cli("demo", "demo").code == 0
    analysed = cli("analyse", "--no-cache", "--base", "demo/base.safetensors", "demo", "--json", "demo/report.json")
    assert analysed.code == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["base"] == str(tmp_path / "demo" / "base.safetensors")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in [*report["models"], *report["files"]])
    result = cli("plan", "demo/report.json", "--json", "demo/plan.json")
    assert result.code == 0, result.err
    plan = load_plan(tmp_path / "demo" / "plan.json")
    assert plan.base == tmp_path / "demo" / "base.safetensors"
    assert {row.model.parent for row in plan.rows} == {tmp_path / "demo"}


def test_the_optimizer_never_takes_an_unrelated_model_as_delta_from() -> None:
    """A 50/50 merge of two independent fine-tunes beside an unrelated one: taking the unrelated model as the
    merge's delta-from raises the rows' orthogonality a little (the merge's cos to its ingredients falls) but
    adds that model's delta, negated, to the merge's row: it would cancel that model in the merge."""
    rng = np.random.default_rng(3)
    a, b, unrelated = (unit(rng) for _ in range(3))
    names = ["unrelated", "mix_ab", "a", "b"]
    h = files_gram(np.stack([unrelated, 0.5 * a + 0.5 * b, a, b]))
    choices = dict(zip(names, optimize.optimize(h, 4, [0.6] * 4, [False] * 4, names=names), strict=True))
    assert choices["mix_ab"].delta_from is None, choices["mix_ab"].info
    assert all(choice.delta_from != 0 for choice in choices.values())


def test_the_optimizer_never_takes_a_merge_made_from_a_model_as_its_delta_from() -> None:
    """A 50/50 merge of a and p lies, in the Gram, like a's parent (a − merge ⟂ merge); a's delta from it would be
    half of a minus half of p, cancelling p's row. The lineage knows it is a merge of a: never a's delta-from."""
    rng = np.random.default_rng(4)
    a, p, u = (unit(rng) for _ in range(3))
    names = ["a", "p", "merge", "u"]
    h = files_gram(np.stack([a, p, 0.5 * a + 0.5 * p, u]))
    choices = dict(zip(names, optimize.optimize(h, 4, [0.6] * 4, [False] * 4, names=names), strict=True))
    assert choices["a"].delta_from is None and choices["p"].delta_from is None, (choices["a"].info, choices["p"].info)


def test_plan_leaves_out_a_model_of_another_lineage_than_the_base(tmp_path: Path) -> None:
    """A model whose change from the base is larger than the base itself is not a fine-tune of it: the plan disables
    it (it was enabled with repeat 2 for its "new information") and never takes it as a delta-from."""
    from ortho_mecha.lineage import change_from_base

    report = report_for(planted(), tmp_path)  # with a base of norm 2, as the analysis reports it
    report |= {"base_norm": 2.0, "change": change_from_base(np.asarray(report["h"]), len(report["models"]), 2.0)}
    # "strong": ~3× a's unit norm, change ~1.5
    change = np.sqrt(report["h"][7][7]) / 2.0
    rows = dict(zip(NAMES, optimize.plan_from_report(report)["rows"], strict=True))
    assert rows["strong"]["enabled"] is False and rows["strong"]["alpha"] == 0.0
    expected = f"disabled: not a fine-tune of this base: its change from it is {100 * change:.0f} %"
    assert change > 1.4 and rows["strong"]["info"].startswith(expected)
    assert rows["a"]["enabled"] and rows["u"]["enabled"]  # changes of 50–56 % stay
    before = dict(zip(NAMES, optimize.plan_from_report(report_for(planted(), tmp_path))["rows"], strict=True))
    assert before["strong"]["enabled"]  # a report without the base's norm (an older one) is planned as before


def test_analyse_flags_an_independently_trained_model_and_plan_disables_it(tmp_path: Path, cli) -> None:
    from ortho_mecha.demo import random_base
    from tests.modelgen import write_family_files, write_model

    paths = write_family_files(tmp_path, "sdxl", "fp16", members=["base", "anime", "photo"])
    other = random_base({k: tuple(v.shape) for k, v in stored(paths["base"]).items()},
                        torch.Generator().manual_seed(99))  # same shapes, trained apart: another lineage
    write_model(tmp_path / "stranger.safetensors", other, "fp16")
    report = tmp_path / "report.json"
    stranger = tmp_path / "stranger.safetensors"
    analysed = cli("analyse", "--base", paths["base"], paths["anime"], paths["photo"], stranger, "--json", report)
    assert analysed.code == 0, analysed.err
    line = next(line for line in analysed.out.splitlines() if "stranger" in line)
    assert "not a fine-tune of this base" in line
    changes = json.loads(report.read_text())["change"]
    assert changes[2] > 1.0 and max(changes[:2]) < 0.5
    assert cli("plan", report, "--json", tmp_path / "plan.json").code == 0
    rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
    assert [row["enabled"] for row in rows] == [True, True, False]


def test_of_two_duplicates_the_complete_file_is_kept(tmp_path: Path) -> None:
    """A copy lacking a base key scored a hair above its complete twin and was kept: the merge then carried no change
    from that model on the key. A file lacking keys ranks below a complete one of about its quality."""
    tie = report_for(planted(), tmp_path)
    tie["signal"]["effective_rank"][:3] = [0.3, 0.3, 0.3]  # a and its two copies score about the same
    plain = dict(zip(NAMES, optimize.plan_from_report(tie)["rows"], strict=True))
    assert plain["a"]["enabled"] and not plain["a_copy"]["enabled"]  # complete, a keeps its place
    report = tie | {"validation": {"models": [
        {"path": f"models/{Path(f).name}", "missing": 1 if Path(f).stem == "a" else 0} for f in tie["files"]
    ]}}
    rows = dict(zip(NAMES, optimize.plan_from_report(report)["rows"], strict=True))
    assert not rows["a"]["enabled"] and "lacks 1 base key(s)" in rows["a"]["info"]
    assert [rows[name]["enabled"] for name in ("a_copy", "a_near")].count(True) == 1


def test_a_null_fp8_row_is_said_to_be_within_fp8_rounding(tmp_path: Path) -> None:
    """An fp8 copy of a real fine-tune reads as null (its change is at fp8's rounding): the reason says so, not
    'no change from the base'."""
    report = report_for(planted(), tmp_path)
    report["validation"] = {"models": [
        {"path": f"models/{Path(f).name}", "dtypes": {"F8_E4M3": 10} if Path(f).stem == "null" else {"F16": 10}}
        for f in report["files"]
    ]}
    rows = dict(zip(NAMES, optimize.plan_from_report(report)["rows"], strict=True))
    assert not rows["null"]["enabled"] and "within the rounding noise of its fp8 storage" in rows["null"]["info"]
    assert "fp8" not in rows["a_copy"]["info"]
