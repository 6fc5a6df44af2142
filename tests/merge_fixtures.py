"""Tiny real safetensors models for the plan, recipe and merge tests.

``write_family(folder)`` writes a base and fine-tunes whose keys look like an SDXL UNet (so a guessing
tool would be tempted to pick sd-mecha's built-in SDXL config): a 4-D conv, matrices, 1-D biases and
norms (one stored as ``.scale``), and an integer tensor. Fine-tunes are the base plus small seeded
deltas, stored as fp32, fp16, bf16 and fp8 e4m3fn; one carries the ``model.diffusion_model.`` prefix
and the ``.norm.weight`` spelling against the bare base.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "model.diffusion_model."
NORM_SCALE = "double_blocks.0.img_attn.norm.key_norm.scale"
SHAPES: dict[str, tuple[int, ...]] = {
    "input_blocks.0.0.weight": (8, 4, 3, 3),
    "input_blocks.0.0.bias": (8,),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 12),
    "label_emb.0.0.weight": (16, 12),
    "middle_block.1.norm.weight": (8,),
    "middle_block.1.proj_in.weight": (8, 8),
    "time_embed.0.weight": (16, 8),
    "time_embed.0.bias": (16,),
    "out.2.weight": (4, 8, 3, 3),
    NORM_SCALE: (4,),
}
INT_KEY = "position_ids"
ROOT = Path(__file__).resolve().parent.parent


def base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=generator) * 0.5 for key, shape in SHAPES.items()}
    state[INT_KEY] = torch.arange(6, dtype=torch.int64)
    return state


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + torch.randn(value.shape, generator=generator) * scale if value.is_floating_point() else value
        for key, value in base.items()
    }


def cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def prefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint spelling: prefix on every key, ``.norm.scale`` stored as ``.norm.weight``."""
    renamed = {}
    for key, value in state.items():
        name = key.removesuffix(".scale") + ".weight" if key == NORM_SCALE else key
        renamed[PREFIX + name] = value
    return renamed


def write_family(folder: Path) -> dict[str, Path]:
    """Write the test family into ``folder``; return name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    base = base_state()
    models = {
        "base": base,
        "a": finetune(base, 1),
        "b": finetune(base, 2),
        "c16": cast(finetune(base, 3), torch.float16),
        "dbf16": cast(finetune(base, 4), torch.bfloat16),
        "e8": cast(finetune(base, 5), torch.float8_e4m3fn),
        "pref": prefixed(finetune(base, 6)),
        "tex": finetune(base, 7, scale=0.02),
    }
    paths = {}
    for name, state in models.items():
        path = folder / f"{name}.safetensors"
        save_file(state, str(path))
        paths[name] = path
    return paths


def read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_plan(folder: Path, data: dict, name: str = "plan.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def merge_three_ways(plan_path: Path, base: Path, folder: Path, *merge_options: str) -> tuple[Path, Path, Path, str]:
    """The plan merged by ``ortho-mecha merge`` (with ``merge_options``), by the ``.mecha`` recipe that
    ``ortho-mecha recipe`` writes (through the executor, fp64) and by the script it writes (run in a fresh
    interpreter): the three output files, and the script's stdout."""
    import sd_mecha

    from ortho_mecha.cli import main
    from ortho_mecha.mecha_config import register_base_config
    from ortho_mecha.merge import execute

    first, from_mecha, from_script = (folder / f"{n}.safetensors" for n in ("first", "mecha", "script"))
    mecha, script = folder / "recipe.mecha", folder / "merge.py"
    assert main(["merge", str(plan_path), "--out", str(first), *merge_options]) == 0
    assert main(["recipe", str(plan_path), "--mecha", str(mecha), "--script", str(script)]) == 0
    register_base_config(base)
    execute(sd_mecha.deserialize_path(mecha), from_mecha, base=base, merge_dtype="fp64", output_dtype="fp32",
            recipe_text=mecha.read_text())  # as README says: the recipe recorded as written
    run = subprocess.run([sys.executable, str(script), str(from_script)], capture_output=True, text=True,
                         timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    again = subprocess.run([sys.executable, str(script), str(from_script)], capture_output=True, text=True,
                           timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert again.returncode == 2 and again.stderr.splitlines() == [  # a user's error: one line, no traceback
        f"error: {from_script}: already exists; choose another name or pass --overwrite"], again.stderr
    return first, from_mecha, from_script, run.stdout


def assert_same_merge(reference: Path, *others: Path) -> None:
    """Each of ``others`` holds ``reference``'s tensors bit for bit, and its recipe and input hashes."""
    from safetensors import safe_open

    from ortho_mecha.merge import META_HASHES, META_RECIPE

    with safe_open(str(reference), "pt") as f:
        expected, expected_meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    assert expected
    for path in others:
        with safe_open(str(path), "pt") as f:
            assert set(f.keys()) == set(expected), path
            for key, tensor in expected.items():
                assert torch.equal(f.get_tensor(key).view(torch.uint8), tensor.view(torch.uint8)), (path, key)
            assert f.metadata()[META_RECIPE] == expected_meta[META_RECIPE], path
            assert f.metadata()[META_HASHES] == expected_meta[META_HASHES], path
