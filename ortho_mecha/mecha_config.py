"""sd-mecha model configs derived from the base file's safetensors header, for every architecture.

sd-mecha needs a model config for each file of a recipe. Instead of letting it guess one of its
built-in configs from keys that merely resemble them, ortho-mecha derives the config from the base
file's header (keys, shapes and dtypes — no tensor is read) and registers it under an identifier made
from the architecture id and a hash of the key set and shapes, e.g. ``sdxl+1f0c…-ortho_mecha``. The
same layout always gives the same identifier, so a serialized recipe re-resolves it once
:func:`register_base_config` has run on the same base (the generated script does exactly that).

The config has one component, ``weights``, holding every key; for a full checkpoint the text encoders
and the VAE are components of their own (``clip_l``, ``clip_g``, ``vae``, ... from
:func:`ortho_mecha.components.split`), so a recipe can pick them with sd-mecha's ``pick_component``.
The split follows from the key names, so it changes neither the identifier nor any merge that does not
pick a component.

Models whose keys differ from the base's only by the ``model.diffusion_model.`` prefix or by the
``*norm.scale`` ↔ ``*norm.weight`` rename merge through sd-mecha's key aliases: every base key lists
its other spellings (the canonical forms of :mod:`ortho_mecha.validate`). Every key is optional: a
model lacking a key contributes nothing to it and the merge executor copies it from the base.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import sd_mecha
from sd_mecha.extensions import model_configs
from sd_mecha.extensions.model_configs import KeyMetadata, ModelComponent, ModelConfig, ModelConfigImpl

from ortho_mecha import components
from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.io import DTYPES, Model
from ortho_mecha.lora_rows import LoraModel, is_lora_file, refuse_other_adapters, register_lora_config
from ortho_mecha.validate import DIFFUSION_PREFIX, MIN_SHARED, canonical_key, file_arch, is_checkpoint, key_map

logger = logging.getLogger(__name__)

IMPLEMENTATION = "ortho_mecha"
COMPONENT = "weights"  # every key outside a checkpoint's text encoders and VAE (ortho_mecha.components)


def _spellings(canon: str) -> set[str]:
    """Every spelling of a canonical diffusion key: with and without the prefix, norm ``.weight`` or ``.scale``."""
    forms = {canon}
    stem, _, last = canon.rpartition(".")
    if last == "weight" and "norm" in stem.rsplit(".", 1)[-1]:
        forms.add(f"{stem}.scale")
    return forms | {DIFFUSION_PREFIX + form for form in forms}


def canonical_spellings(keys: list[str]) -> dict[str, str]:
    """Each diffusion key of a base → its canonical form (text-encoder / VAE keys of a checkpoint left out)."""
    checkpoint = is_checkpoint(keys)
    return {
        key: canonical_key(key.removeprefix(DIFFUSION_PREFIX))
        for key in keys
        if not checkpoint or key.startswith(DIFFUSION_PREFIX)
    }


def key_aliases(keys: list[str]) -> dict[str, tuple[str, ...]]:
    """The other spellings each base key may have in a model file (never another base key, never shared)."""
    canonical = canonical_spellings(keys)
    # text encoder / VAE keys of a checkpoint keep their one name
    candidates = {key: _spellings(canonical[key]) - {key} if key in canonical else set() for key in keys}
    taken = set(keys)
    claims = Counter(alias for aliases in candidates.values() for alias in aliases)
    return {
        key: tuple(sorted(a for a in aliases if a not in taken and claims[a] == 1))
        for key, aliases in candidates.items()
    }


def config_identifier(model: Model) -> str:
    """``<arch>+<hash of keys and shapes>-ortho_mecha``: the same layout gives the same identifier."""
    digest = hashlib.sha256()
    for key in sorted(model.tensors):
        digest.update(f"{key}\t{list(model.tensors[key].shape)}\n".encode())
    arch = file_arch(model.tensors).replace("-", "_")
    return f"{arch}+{digest.hexdigest()[:16]}-{IMPLEMENTATION}"


def _open(path: str | Path) -> Model:
    model = Model(path)
    if model.scaled_fp8:
        raise OrthoMechaError(
            "scaled fp8 model (fp8 weights with per-key scale tensors): sd-mecha would read the raw fp8 values "
            "without their scales. Analysis handles it; to merge it, write a dequantised copy with "
            f"'ortho-mecha convert {model.path} --out COPY.safetensors' and use that",
            model.path,
        )
    if len(model.files) > 1:
        raise OrthoMechaError(
            "sharded model: merging needs a single .safetensors file; write one with "
            f"'ortho-mecha convert {model.path} --out COPY.safetensors' and use that",
            model.path,
        )
    return model


def derive_config(base: str | Path) -> ModelConfig:
    """The sd-mecha config of ``base``'s layout, read from its header only."""
    with _open(base) as model:
        keys = list(model.tensors)
        aliases = key_aliases(keys)
        metadata = {
            key: KeyMetadata(
                shape=list(model.tensors[key].shape),
                dtype=DTYPES[model.tensors[key].dtype],
                aliases=aliases[key],
                optional=True,
            )
            for key in keys
        }
        identifier = config_identifier(model)
    if not metadata:
        raise OrthoMechaError("holds no tensors", base)
    grouped = components.split(keys)  # a checkpoint's text encoders and VAE, for sd-mecha's pick_component
    inside = {key for group in grouped.values() for key in group}
    parts = {COMPONENT: [key for key in keys if key not in inside], **grouped}
    return ModelConfigImpl(
        identifier, {name: ModelComponent({key: metadata[key] for key in part}) for name, part in parts.items() if part}
    )


def _layout(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """What identifies a derived config: keys, shapes and aliases (the dtype is only a hint to sd-mecha)."""
    return {key: (tuple(meta.shape), tuple(meta.aliases)) for key, meta in config.keys().items()}


def register_base_config(base: str | Path) -> str:
    """Derive ``base``'s config and register it with sd-mecha (once per layout); return its identifier."""
    config = derive_config(base)
    try:
        known = model_configs.resolve(config.identifier)
    except KeyError:
        model_configs.register(config)
        logger.debug("registered sd-mecha config %s from %s", config.identifier, base)
    else:
        if _layout(known) != _layout(config):
            raise OrthoMechaError(f"sd-mecha already has a different config named {config.identifier}", base)
    register_lora_config(config.identifier)  # so a recipe (or .mecha file) with LoRA rows resolves too
    return config.identifier


@dataclass(frozen=True)
class KeyCheck:
    """How one model's keys line up with the base config."""

    path: str
    shared: int
    missing: int
    extra: int
    set_aside: int = 0  # a LoRA row's text-encoder modules (a LoRA row merges its diffusion part only)


def check_model(config_id: str, base: str | Path, path: str | Path) -> KeyCheck:
    """Line ``path`` up against the base config as sd-mecha will (key, then aliases); raise on any shape
    mismatch, on fewer than half the base's keys shared, and on files sd-mecha cannot merge. A kohya LoRA
    is checked against the base's keys instead (:mod:`ortho_mecha.lora_rows`)."""
    if is_lora_file(path):
        return _check_lora(base, path)
    config = model_configs.resolve(config_id)
    with _open(path) as model:
        tensors = model.tensors
        shared = 0
        claimed: set[str] = set()
        for key, meta in config.keys().items():
            found = next((name for name in (key, *meta.aliases) if name in tensors), None)
            if found is None:
                continue
            claimed.add(found)
            if tuple(tensors[found].shape) != tuple(meta.shape):
                raise OrthoMechaError(
                    f"key '{found}' has shape {list(tensors[found].shape)} but the base {base} has "
                    f"{list(meta.shape)} for '{key}': is it the same architecture?",
                    path,
                )
            if not tensors[found].is_float and meta.dtype is not None and meta.dtype.is_floating_point:
                raise OrthoMechaError(
                    f"key '{found}' is stored as {tensors[found].dtype}, not floating point, but the base {base} has "
                    f"{str(meta.dtype).removeprefix('torch.')} weights for '{key}': it is no weight the merge can use "
                    "(the analysis reads it as the base's value)",
                    path,
                )
            shared += 1
    total = len(config.keys())
    if shared < MIN_SHARED * total:
        refuse_other_adapters(tensors, path)  # says what such a file is
        raise OrthoMechaError(
            f"shares only {shared} of the {total} keys of the base {base} ({shared / total:.0%} < 50%): "
            "is it the same architecture?",
            path,
        )
    return KeyCheck(str(path), shared, total - shared, len(set(tensors) - claimed))


def _check_lora(base: str | Path, path: str | Path) -> KeyCheck:
    """A LoRA input: its modules bound to the base's keys (errors as :func:`ortho_mecha.lora_rows.bind`)."""
    with _open(base) as base_model, _open(path) as file:
        base_map = key_map(base_model)
        shapes = {canon: tuple(base_model.tensors[name].shape) for canon, name in base_map.keys.items()}
        binding = LoraModel(file, shapes, base).binding
        total = len(base_model.tensors)
    mapped = len(binding.keys)
    return KeyCheck(str(path), mapped, total - mapped, len(binding.unmatched), len(binding.set_aside))


def model_node(path: str | Path, config_id: str, merge_space: str = "weight") -> sd_mecha.RecipeNode:
    """An sd-mecha model node bound to the derived config (never a guessed built-in one)."""
    return sd_mecha.model(Path(path), config=config_id, merge_space=merge_space)
