"""LoRA rows: a kohya-format LoRA file as a row whose delta is the LoRA's product.

A kohya LoRA stores, per module, ``<module>.lora_down.weight`` ``[r, in(, kh, kw)]``,
``<module>.lora_up.weight`` ``[out, r(, 1, 1)]`` and optionally ``<module>.alpha`` (a scalar). Applied
to the base it was trained on, it adds to that module's weight

    δ = (alpha / r) · up ⋅ down          (up and down flattened to 2-D, reshaped to the weight's shape;
                                          no alpha means alpha = r, a scale of 1)

so a LoRA is a delta from its base, and as a row its delta is exactly that product (0 on the base keys
it does not touch). Its delta-from is always the base; it cannot be another row's delta-from either.

Module names are the canonical diffusion key without ``.weight``, dots written as underscores, after
``lora_unet_`` (:func:`ortho_mecha.lora.lora_name`; what ``ortho-mecha extract-lora`` writes, ComfyUI
and A1111 load, and Flux LoRAs use: ``lora_unet_double_blocks_0_img_attn_qkv``). An underscore can be
a dot or part of a name, so modules are never parsed back: the names of every matrix key of the *base*
are formed and looked up (:func:`module_names`). For SD1/SDXL-style UNets the older kohya names in
diffusers spelling (``lora_unet_down_blocks_1_attentions_0_…``) are formed too, from the base's own
block structure: down level ``i = (N−1) // 3`` and slot ``j = (N−1) % 3`` of ``input_blocks.N``
(slot 2 is the level's downsampler), up level ``N // 3`` and slot ``N % 3`` of ``output_blocks.N``,
resnet, attention and up/downsampler sub-modules renamed as diffusers does.

Text-encoder modules (``lora_te*``) are not diffusion: they are set aside and reported. Modules that
match no base key mean the LoRA was made for another model: an error naming the file and a few of
them, unless they are at most :data:`MAX_UNMATCHED` of the LoRA's diffusion modules — then they are
reported and left out, as ComfyUI does ("lora key not loaded"). A matched module whose product has a
shape unlike the base key's is always an error.

:class:`LoraModel` is such a file bound to a base: it reads like a :class:`~ortho_mecha.io.Model`
whose keys are the base's canonical keys it touches and whose values are the product δ (``is_delta``),
formed for one key at a time in float64. :func:`register_lora_config` gives sd-mecha the same
mapping: a LoRA model config derived from the base config and a conversion merge method from it to the
base config's delta space, so a recipe builds a LoRA row's delta with sd-mecha's own nodes
(:func:`lora_delta_node`).
"""

# No `from __future__ import annotations`: sd-mecha reads the conversion's Parameter(...) annotations as objects.

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ortho_mecha.errors import OrthoMechaError
from ortho_mecha.io import Model as FileModel
from ortho_mecha.io import TensorInfo, parse_header
from ortho_mecha.lora import DIFFUSERS_DIT_PREFIX, lora_name, lora_prefix
from ortho_mecha.security import READ_SUFFIXES

logger = logging.getLogger(__name__)

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
SUFFIXES = (DOWN, UP, ALPHA)
TE_PREFIX = "lora_te"  # lora_te_, lora_te1_, lora_te2_, lora_te3_: text encoders
# at most this fraction of a LoRA's diffusion modules may match no base key: a Flux LoRA on Chroma (which has no
# modulation layers) leaves about a third unmatched, and ComfyUI applies the rest; one for another model, nearly all
MAX_UNMATCHED = 0.5
LISTED = 5
PRODUCT_DTYPE = "F64"  # the product is formed in float64


PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")  # a LoRA in PEFT/diffusers keys (ai-toolkit, diffusers)


# adapters in other formats than kohya's: (key suffixes, what the file is)
OTHER_ADAPTERS = (
    ((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"), "a LyCORIS LoHa adapter (….hada_w1_a keys)"),
    ((".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a"), "a LyCORIS LoKr adapter (….lokr_w1 keys)"),
    ((".diff", ".diff_b"), "a full-difference adapter (….diff keys, as ComfyUI's LoRA save writes them)"),
)


def refuse_other_adapters(tensors: Mapping[str, Any], path: str | Path) -> None:
    """Refuse an adapter file that is not a kohya LoRA (PEFT/diffusers, LyCORIS LoHa/LoKr, ComfyUI's ``.diff``) with
    what it is and what to do: read as a model it would share no key with the base and be called another
    architecture."""
    if any(name.endswith(PEFT_SUFFIXES) for name in tensors):
        raise OrthoMechaError(
            "is a LoRA in PEFT/diffusers key names (….lora_A.weight / lora_B.weight); ortho-mecha reads kohya LoRAs "
            "(lora_unet_…lora_down/lora_up.weight): convert it to kohya's format first", path)
    for suffixes, what in OTHER_ADAPTERS:
        if any(name.endswith(suffixes) for name in tensors):
            raise OrthoMechaError(
                f"is {what}, not a model or a kohya LoRA (lora_down/lora_up): ortho-mecha does not read this format; "
                "apply it to its base with a tool that does (ComfyUI, say), save that model and use it", path)


def is_lora(tensors: Mapping[str, Any]) -> bool:
    """Whether a file's keys are a kohya LoRA's: some ``lora_*.lora_down.weight`` / ``.lora_up.weight`` key."""
    return any(name.startswith("lora_") and name.endswith((f".{DOWN}", f".{UP}")) for name in tensors)


def refuse_lora(model: Any, role: str) -> None:
    """Refuse a kohya LoRA ``model`` (an :class:`~ortho_mecha.io.Model`) where a full model is needed as ``role``."""
    if is_lora(model.tensors):
        raise OrthoMechaError(f"is a kohya LoRA, not a full model: {role}", model.path)


def is_lora_file(path: str | Path) -> bool:
    """:func:`is_lora` from a file's header alone (no tensor read; one file, shards are never LoRAs)."""
    path = Path(path)
    if path.suffix.lower() not in READ_SUFFIXES:
        return False
    tensors, _ = parse_header(path)
    return is_lora(tensors)


# -- the file's modules ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    """One kohya module: its keys and rank."""

    name: str
    up: str
    down: str
    alpha: str | None
    rank: int


@dataclass
class Layout:
    """A LoRA file's modules: the diffusion ones, and the text-encoder ones set aside."""

    modules: dict[str, Module]
    set_aside: list[str]


def parse(file: FileModel) -> Layout:
    """Group a LoRA file's keys into modules; refuse keys and modules that are not plain kohya LoRA."""
    parts: dict[str, dict[str, str]] = {}
    for key in file.tensors:
        module, _, suffix = key.partition(".")
        if not module.startswith("lora_") or suffix not in SUFFIXES:
            raise OrthoMechaError(
                f"key '{key}' is not part of a kohya LoRA (expected lora_*.{DOWN}, .{UP} or .{ALPHA}); "
                "LyCORIS (LoHa, LoKr), DoRA and other adapter formats are not supported",
                file.path,
            )
        parts.setdefault(module, {})[suffix] = key
    modules, set_aside = {}, []
    for name, keys in parts.items():
        if name.startswith(TE_PREFIX):
            set_aside.append(name)
            continue
        modules[name] = _module(file, name, keys)
    return Layout(modules, sorted(set_aside))


def _module(file: FileModel, name: str, keys: dict[str, str]) -> Module:
    if DOWN not in keys or UP not in keys:
        missing = DOWN if DOWN not in keys else UP
        raise OrthoMechaError(f"LoRA module '{name}' has no '{missing}': the file is incomplete", file.path)
    down, up = file.tensors[keys[DOWN]], file.tensors[keys[UP]]
    if len(down.shape) < 2 or len(up.shape) < 2 or up.shape[1] != down.shape[0] or any(d != 1 for d in up.shape[2:]):
        raise OrthoMechaError(
            f"LoRA module '{name}': up {list(up.shape)} and down {list(down.shape)} do not form a product "
            "(expected up [out, r(, 1, 1)] and down [r, in(, kh, kw)])",
            file.path,
        )
    alpha = keys.get(ALPHA)
    if alpha is not None and file.tensors[alpha].numel != 1:
        raise OrthoMechaError(f"LoRA module '{name}': alpha holds {file.tensors[alpha].numel} values, not 1", file.path)
    if not (down.is_float and up.is_float):
        raise OrthoMechaError(f"LoRA module '{name}' is not stored as floating point", file.path)
    return Module(name, keys[UP], keys[DOWN], alpha, down.shape[0])


# -- module names of a base ---------------------------------------------------------------------------

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
           "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_PLAIN = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
          "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
          "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out",
          "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
          "middle_block.2": "mid_block.resnets.1"}


def _resnet(rest: str) -> str:
    for original, diffusers in _RESNET.items():
        if rest == original or rest.startswith(original + "."):
            return diffusers + rest[len(original) :]
    return rest


def diffusers_unet_key(canon: str) -> str | None:
    """The diffusers spelling of an SD1/SDXL-style UNet key (``input_blocks.4.1.proj_in.weight`` →
    ``down_blocks.1.attentions.0.proj_in.weight``), or None for keys outside such a UNet."""
    for original, diffusers in _PLAIN.items():
        if canon.startswith(original + "."):
            rest = canon[len(original) + 1 :]
            return f"{diffusers}.{_resnet(rest) if 'resnets' in diffusers else rest}"
    group, _, tail = canon.partition(".")
    index, _, tail = tail.partition(".")
    slot, _, rest = tail.partition(".")
    if group not in ("input_blocks", "output_blocks") or not index.isdigit() or not slot.isdigit() or not rest:
        return None
    n, k = int(index), int(slot)
    if group == "input_blocks":
        level, j = divmod(n - 1, 3)
        if j == 2:  # the level's downsampler: input_blocks.{3(level+1)}.0.op
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") else None
        side = "down_blocks"
    else:
        (level, j), side = divmod(n, 3), "up_blocks"
    if k == 0:
        return f"{side}.{level}.resnets.{j}.{_resnet(rest)}"
    if side == "up_blocks" and rest.startswith("conv."):  # the level's upsampler, after its attention if any
        return f"up_blocks.{level}.upsamplers.0.{rest}"
    return f"{side}.{level}.attentions.{j}.{rest}" if k == 1 else None


def module_names(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, str], set[str]]:
    """Kohya module name → canonical base key, for every matrix key of the base (its own spelling and, for
    SD-style UNets, the diffusers one), and the names two keys would share (left out: ambiguous)."""
    claims: dict[str, set[str]] = {}
    prefix = lora_prefix(shapes)  # a Flux transformer in diffusers' layout: lora_transformer_ (ComfyUI's name)
    for canon, shape in shapes.items():
        if len(shape) < 2:
            continue
        names = {lora_name(canon), lora_name(canon, prefix)}
        diffusers = diffusers_unet_key(canon)
        if diffusers is not None:
            names.add(lora_name(diffusers))
        for name in names - {None}:
            claims.setdefault(name, set()).add(canon)
    ambiguous = {name for name, keys in claims.items() if len(keys) > 1}
    return {name: next(iter(keys)) for name, keys in claims.items() if name not in ambiguous}, ambiguous


# -- a LoRA bound to a base -----------------------------------------------------------------------------


def product(up: torch.Tensor, down: torch.Tensor, alpha: torch.Tensor | float | None,
            shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """``(alpha / r) · up ⋅ down`` reshaped to ``shape`` (alpha None: scale 1), in the factors' dtype."""
    rank = down.shape[0]
    delta = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
    if alpha is not None:
        delta = delta * (alpha / rank)
    return delta.reshape(shape)


@dataclass
class Binding:
    """How a LoRA's modules line up with a base: canonical key → module, and what was left out."""

    keys: dict[str, Module]
    set_aside: list[str]
    unmatched: list[str]
    ranks: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The validation report's ``lora`` entry."""
        return {
            "modules": len(self.keys) + len(self.unmatched),
            "mapped_keys": len(self.keys),
            "rank": max(self.ranks, default=0),
            "set_aside": len(self.set_aside),
            "set_aside_examples": self.set_aside[:LISTED],
            "unmatched": len(self.unmatched),
            "unmatched_examples": self.unmatched[:LISTED],
        }


def summary_notes(summary: Mapping[str, Any]) -> list[str]:
    """Human lines of a :meth:`Binding.summary`, for the validation report."""
    lines = [f"kohya LoRA (rank ≤ {summary['rank']}): {summary['mapped_keys']} modules mapped to base keys, "
             "its delta is their product; untouched keys have delta 0"]
    if summary["set_aside"]:
        lines.append(f"{summary['set_aside']} text-encoder modules set aside (diffusion only), "
                     f"e.g. {', '.join(summary['set_aside_examples'][:3])}")
    if summary["unmatched"]:
        lines.append(f"{summary['unmatched']} modules match no base key (left out), "
                     f"e.g. {', '.join(summary['unmatched_examples'][:3])}")
    return lines


def bind(file: FileModel, shapes: Mapping[str, tuple[int, ...]], base: str | Path) -> Binding:
    """Line ``file``'s modules up with the base's canonical keys and ``shapes`` (see the module docstring)."""
    layout = parse(file)
    names, ambiguous = module_names(shapes)
    keys: dict[str, Module] = {}
    unmatched = []
    for name, module in layout.modules.items():
        if name in ambiguous:
            raise OrthoMechaError(
                f"LoRA module '{name}' names several keys of the base {base} at once (kohya names write '.' as "
                "'_', which cannot tell them apart); this LoRA cannot be applied to it unambiguously",
                file.path,
            )
        canon = names.get(name)
        if canon is None:
            unmatched.append(name)
            continue
        if canon in keys:
            raise OrthoMechaError(
                f"LoRA modules '{keys[canon].name}' and '{name}' both modify '{canon}'; keep one spelling", file.path
            )
        _check_shape(file, module, canon, shapes[canon], base)
        keys[canon] = module
    if not keys or len(unmatched) > MAX_UNMATCHED * len(layout.modules):
        what = f"{len(unmatched)} of its {len(layout.modules)} diffusion modules match no key"
        if not layout.modules:
            what = "it has no diffusion (lora_unet_*) modules, only text-encoder ones"
        hint = "Is it a LoRA for another model? Give the base it was trained on"
        if any(name.startswith(DIFFUSERS_DIT_PREFIX) for name in unmatched):
            hint = (f"Its module names are diffusers' ({DIFFUSERS_DIT_PREFIX}…), which ortho-mecha does not map to a "
                    "DiT's keys: convert it to kohya's lora_unet_ names (as sd-scripts writes Flux LoRAs)")
        raise OrthoMechaError(
            f"this LoRA does not fit the base {base}: {what}"
            + (f", e.g. {', '.join(unmatched[:LISTED])}" if unmatched else "")
            + f". {hint}",
            file.path,
        )
    return Binding(keys, layout.set_aside, sorted(unmatched), [m.rank for m in keys.values()])


def _check_shape(file: FileModel, module: Module, canon: str, shape: tuple[int, ...], base: str | Path) -> None:
    up, down = file.tensors[module.up].shape, file.tensors[module.down].shape
    if up[0] != shape[0] or math.prod(down[1:]) != math.prod(shape[1:]):
        raise OrthoMechaError(
            f"LoRA module '{module.name}' (up {list(up)}, down {list(down)}) does not fit '{canon}' "
            f"{list(shape)} of the base {base}: the LoRA is for another model",
            file.path,
        )


class LoraModel:
    """A LoRA file bound to a base, read like a :class:`~ortho_mecha.io.Model` of deltas: its keys are the
    base's canonical keys it touches, each read as the product δ (float64, formed once per key)."""

    is_delta = True
    scaled_fp8 = False

    def __init__(self, file: FileModel, shapes: Mapping[str, tuple[int, ...]], base: str | Path) -> None:
        self.file = file
        self.path = file.path
        self.files = file.files
        self.metadata = file.metadata
        self.binding = bind(file, shapes, base)
        self.tensors = {
            canon: TensorInfo(canon, PRODUCT_DTYPE, tuple(shapes[canon]), file.path, 0, 0)
            for canon in self.binding.keys
        }
        self._lock = threading.Lock()
        self._current: tuple[str, torch.Tensor] | None = None

    @property
    def fingerprint(self) -> str:
        return self.file.fingerprint

    @property
    def nbytes(self) -> int:
        return self.file.nbytes

    def delta(self, canon: str) -> torch.Tensor:
        """The product δ of ``canon`` in the base key's shape, float64 (the last key is kept: one key in memory)."""
        with self._lock:
            if self._current is not None and self._current[0] == canon:
                return self._current[1]
            module = self.binding.keys[canon]
            alpha = None if module.alpha is None else self.file.read_tensor(module.alpha, torch.float64).reshape(())
            value = product(self.file.read_tensor(module.up, torch.float64),
                            self.file.read_tensor(module.down, torch.float64), alpha, self.tensors[canon].shape)
            self._current = (canon, value)
            return value

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        return out.copy_(self.delta(key).reshape(-1)[start:stop])

    def read(self, key: str, start: int = 0, stop: int | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        stop = self.tensors[key].numel if stop is None else stop
        return self.read_into(key, start, stop, torch.empty(stop - start, dtype=dtype))

    def read_tensor(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.delta(key).to(dtype)

    def close(self) -> None:
        self._current = None
        self.file.close()

    def __enter__(self) -> "LoraModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraModel({str(self.path)!r}, {len(self.tensors)} keys)"


def refuse_lora_delta_from(model: str | Path, delta_from: str | Path | None, model_is_lora: bool,
                           from_is_lora: bool, source: str | Path | None = None) -> None:
    """The delta-from rules of LoRA rows: a LoRA's delta is from the base; a LoRA is nobody's delta-from."""
    if model_is_lora and delta_from is not None:
        raise OrthoMechaError(
            f"{Path(model).name} is a LoRA: its delta is its product, a delta from the base it was trained on; "
            f"it cannot be taken from {Path(delta_from).name} (set its delta-from to the base)",
            source or model,
        )
    if from_is_lora:
        raise OrthoMechaError(
            f"the delta-from of {Path(model).name} is {Path(str(delta_from)).name}, a LoRA (a delta, not a model); "
            "take the delta from the base or a full model",
            source or model,
        )


# -- sd-mecha: a LoRA config derived from the base config, and its conversion ------------------------------


def lora_config_identifier(base_config_id: str) -> str:
    """``<arch>+<hash>_kohya_lora-ortho_mecha`` for the base config ``<arch>+<hash>-ortho_mecha``."""
    stem, _, implementation = base_config_id.rpartition("-")
    return f"{stem}_kohya_lora-{implementation}"


def conversion_identifier(base_config_id: str) -> str:
    """The conversion merge method's name, in sd-mecha's ``convert_'<from>'_to_'<to>'`` convention."""
    return f"convert_'{lora_config_identifier(base_config_id)}'_to_'{base_config_id}'"


def _base_modules(base_config: Any) -> dict[str, list[str]]:
    """Base config key → its module names (own spelling first), as :func:`module_names` forms them."""
    from ortho_mecha.mecha_config import canonical_spellings

    canon_of = canonical_spellings(list(base_config.keys()))
    shapes = {canon_of[k]: tuple(meta.shape) for k, meta in base_config.keys().items() if k in canon_of}
    names, _ = module_names(shapes)
    raw_of = {canon: key for key, canon in canon_of.items()}
    out: dict[str, list[str]] = {}
    for name, canon in names.items():
        out.setdefault(raw_of[canon], []).append(name)
    return {key: sorted(found, key=lambda n: n != lora_name(canon_of[key])) for key, found in out.items()}


def register_lora_config(base_config_id: str) -> str:
    """Register (once) the LoRA config of a registered base config and its conversion merge method.

    The LoRA config lists, for every base matrix key, ``<module>.lora_up.weight``, ``.lora_down.weight``
    and ``.alpha`` (shapes unknown: any rank), with the diffusers module spelling as aliases. The
    conversion ``convert_'<lora>'_to_'<base>'`` returns each touched base key's product δ in the delta
    space; keys the LoRA does not touch are left out (:func:`lora_delta_node` fills them with zeros).
    """
    from sd_mecha.extensions import model_configs
    from sd_mecha.extensions.model_configs import KeyMetadata, ModelComponent, ModelConfigImpl

    identifier = lora_config_identifier(base_config_id)
    try:
        model_configs.resolve(identifier)
    except KeyError:
        pass
    else:
        return identifier
    base_config = model_configs.resolve(base_config_id)
    modules = _base_modules(base_config)
    keys = {}
    for names in modules.values():
        primary, aliases = names[0], names[1:]
        for suffix in SUFFIXES:
            keys[f"{primary}.{suffix}"] = KeyMetadata(
                shape=[] if suffix == ALPHA else None,
                aliases=tuple(f"{a}.{suffix}" for a in aliases),
                optional=True,
            )
    component = next(iter(base_config.components()))
    model_configs.register_aux(ModelConfigImpl(identifier, {component: ModelComponent(keys)}))
    _register_conversion(base_config, identifier, {key: names[0] for key, names in modules.items()})
    logger.debug("registered sd-mecha LoRA config %s", identifier)
    return identifier


def _register_conversion(base_config: Any, lora_config_id: str, module_of: dict[str, str]) -> None:
    from sd_mecha.extensions.merge_methods import Parameter, Return, StateDict, merge_method
    from torch import Tensor

    base_config_id = base_config.identifier

    @merge_method(identifier=conversion_identifier(base_config_id), is_conversion=True)
    class LoraToDelta:
        """A kohya LoRA's product ``(alpha / r) · up ⋅ down`` per touched base key, as a delta."""

        @staticmethod
        def map_keys(b: Any) -> None:
            for key, module in module_of.items():
                up, down, alpha = (f"{module}.{suffix}" for suffix in (UP, DOWN, ALPHA))
                b[key] = b.lora.keys[(up, down, alpha)] | b.lora.keys[(up, down)]

        def __call__(
            self,
            lora: Parameter(StateDict[Tensor], "weight", lora_config_id),
            **kwargs,  # sd-mecha passes key, key_relation, cache; not annotated, sd-mecha would read it
        ) -> Return(Tensor, "delta", base_config_id):
            relation = kwargs["key_relation"]
            up, down, *alpha = relation.inputs["lora"]
            scale = lora[alpha[0]] if alpha else None
            return product(lora[up], lora[down], scale, base_config.keys()[kwargs["key"]].shape)


def lora_delta_node(path: str | Path, base_node: Any, base_config_id: str) -> Any:
    """A LoRA row's delta as sd-mecha nodes: ``fallback(convert(lora, base config), subtract(base, base))`` —
    the product on the keys the LoRA touches, exact zeros (in the merge dtype and device) elsewhere."""
    import sd_mecha
    from sd_mecha.extensions import merge_methods

    lora = sd_mecha.model(Path(path), config=register_lora_config(base_config_id), merge_space="weight")
    zero = sd_mecha.subtract(base_node, base_node)
    return merge_methods.resolve("fallback")(sd_mecha.convert(lora, base_config_id), zero)
