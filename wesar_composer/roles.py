"""Role discovery: which weight matrix of a transformer plays which role of the paper.

Roles (Table 1 of the paper): ``e`` token embedding, ``q`` ``k`` ``v`` attention
in-projections, ``o`` attention out-projection, ``u`` FFN up-projection, ``g`` GLU gate
projection, ``d`` FFN down-projection, ``p`` prediction head. A fused projection (MPT's
``Wqkv``) has one role per output slice.

Discovery matches module names against a role map (regex -> role) and reads the slice
layout of fused projections from the module itself. The default map covers llm-foundry's
MPT and Hugging Face Llama-style models (Llama, Mistral, Qwen2, ...); a user extends it with
``role_map`` (``{regex: role}``, searched in the qualified module name) for another
architecture, or ``skip`` for a projection that should stay plain (a MoE router, a
classifier). The algorithms refuse a model with projections discovery does not cover
(:func:`check_complete`), so that no model is changed halfway. The same discovery serves the WeSaR algorithm, the faithful baselines and the
update-ratio monitor, so all of them name matrices alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, cast

import torch
from torch import nn

ROLES = ('e', 'q', 'k', 'v', 'o', 'u', 'g', 'd', 'p')
FUSED_QKV = 'qkv'
SKIP = 'skip'  # role_map value: leave the matching modules as they are
RESIDUAL_ROLES = ('o', 'd')  # matrices that write into the residual stream
BACKBONES = ('he', 'small')

DEFAULT_ROLE_MAP: dict[str, str] = {
    # MPT (llm-foundry)
    r'(^|\.)wte$': 'e',
    r'(^|\.)Wqkv$': FUSED_QKV,
    r'(^|\.)Wq$': 'q',
    r'(^|\.)Wk$': 'k',
    r'(^|\.)Wv$': 'v',
    r'(^|\.)out_proj$': 'o',
    # Llama-style Hugging Face models
    r'(^|\.)embed_tokens$': 'e',
    r'(^|\.)q_proj$': 'q',
    r'(^|\.)k_proj$': 'k',
    r'(^|\.)v_proj$': 'v',
    r'(^|\.)o_proj$': 'o',
    # both
    r'(^|\.)up_proj$': 'u',
    r'(^|\.)gate_proj$': 'g',
    r'(^|\.)down_proj$': 'd',
    r'(^|\.)lm_head$': 'p',
}

_LAYER_INDEX = re.compile(r'\.(\d+)\.')


@dataclass(eq=False)  # hashable by identity: algorithms key their replacements by it
class MatrixSpec:
    """One weight matrix found in a model: its module, role(s) and place."""

    name: str  # qualified module name
    module: nn.Module
    roles: tuple[str, ...]  # one role per output slice (q, k, v for a fused Wqkv)
    slice_sizes: tuple[int, ...]  # rows of the weight per role
    layer: Optional[int]  # block index, None for e and p

    @property
    def d_in(self) -> int:
        return cast(torch.Tensor, self.module.weight).shape[1]

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.module, nn.Embedding)


@dataclass
class ModelShape:
    """Width d and depth N of a transformer, read from its config."""

    d_model: int
    n_layers: int
    tied_embeddings: bool = field(default=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The torch module inside a Composer model (``HuggingFaceModel.model``)."""
    inner = getattr(model, 'model', None)
    return inner if isinstance(inner, nn.Module) else model


def find_config(model: nn.Module):
    """The Hugging Face config of ``model`` or of the first submodule that has one."""
    for module in unwrap(model).modules():
        config = getattr(module, 'config', None)
        if config is not None and hasattr(config, 'to_dict'):
            return config
    return None


def model_shape(model: nn.Module) -> ModelShape:
    """Read d and N from the model config (MPT or Hugging Face names)."""
    config = find_config(model)
    if config is None:
        raise ValueError(
            f'Cannot read width and depth of {type(unwrap(model)).__name__}: it has no Hugging Face '
            'config (expected d_model/hidden_size/n_embd and n_layers/num_hidden_layers/n_layer).',
        )
    d_model = _first_attr(config, ('d_model', 'hidden_size', 'n_embd'))
    n_layers = _first_attr(config, ('n_layers', 'num_hidden_layers', 'n_layer'))
    if d_model is None or n_layers is None:
        raise ValueError(
            f'Config {type(config).__name__} names no width (d_model/hidden_size/n_embd = {d_model}) '
            f'or no depth (n_layers/num_hidden_layers/n_layer = {n_layers}).',
        )
    tied = bool(getattr(config, 'tie_word_embeddings', False))
    return ModelShape(d_model=int(d_model), n_layers=int(n_layers), tied_embeddings=tied)


def _first_attr(obj, names):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def merged_role_map(role_map: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The default role map extended (and overridden) by a user's ``{regex: role}``."""
    merged = dict(DEFAULT_ROLE_MAP)
    for pattern, role in (role_map or {}).items():
        if not isinstance(role, str) or (role not in ROLES and role not in (FUSED_QKV, SKIP)):
            raise ValueError(
                f'role_map: role {role!r} for pattern {pattern!r} is not one of {ROLES + (FUSED_QKV, SKIP)}.',
            )
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f'role_map: pattern {pattern!r} is not a valid regex: {err}') from err
        merged[pattern] = role
    return merged


def find_matrices(model: nn.Module, role_map: Optional[Mapping[str, str]] = None) -> list[MatrixSpec]:
    """All weight matrices of ``model`` with a role, in module order.

    Only ``nn.Linear`` and ``nn.Embedding`` modules (and their subclasses) are considered.
    Patterns of a user ``role_map`` that match no such module raise ``ValueError``.
    """
    patterns = merged_role_map(role_map)
    compiled = [(re.compile(p), p, r) for p, r in reversed(list(patterns.items()))]  # user entries first
    used: set[str] = set()
    specs = []
    for name, module in unwrap(model).named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for regex, pattern, role in compiled:
            if regex.search(name):
                used.add(pattern)
                if role != SKIP:
                    parent = unwrap(model).get_submodule(name.rpartition('.')[0])
                    specs.append(_spec(name, module, role, parent))
                break
    unused = [p for p in (role_map or {}) if p not in used]
    if unused:
        names = [n for n, m in unwrap(model).named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        raise ValueError(
            f'role_map patterns {unused} match no nn.Linear or nn.Embedding module. '
            f'Module names are, for example: {names[:8]}',
        )
    return specs


def check_complete(
    model: nn.Module, specs: list[MatrixSpec], method: str, role_map: Optional[Mapping[str, str]] = None
) -> None:
    """Refuse a model whose projections role discovery does not all cover, before anything changes.

    - a Hugging Face ``Conv1D`` (GPT-2 and relatives; its weight is stored in x out, transposed
      to ``nn.Linear``'s) is not supported: the model would be reparameterized only in part;
    - an ``nn.Linear`` no role pattern matches must be named in ``role_map`` (a role, or ``skip``).
    """
    inner = unwrap(model)
    conv1d = [n for n, m in inner.named_modules() if type(m).__name__ == 'Conv1D' and hasattr(m, 'nf')]
    if conv1d:
        raise ValueError(
            f'{method}: {type(inner).__name__} uses transformers Conv1D projections ({conv1d[:4]}, ...), which store '
            'W transposed; they are not supported, and the model would be reparameterized only in part. Use an '
            'architecture built from nn.Linear (Llama-style hf_causal_lm or llm-foundry MPT).',
        )
    patterns = [re.compile(p) for p in merged_role_map(role_map)]
    matched = {spec.name for spec in specs}
    left = [
        n
        for n, m in inner.named_modules()
        if isinstance(m, nn.Linear) and n not in matched and not any(p.search(n) for p in patterns)
    ]
    if left:
        raise ValueError(
            f'{method}: no role for the nn.Linear modules {left[:6]}{" ..." if len(left) > 6 else ""}; the model '
            f'would be reparameterized only in part. Name them in role_map ({{regex: role}}, roles {ROLES + (FUSED_QKV,)}), '
            f"or map them to '{SKIP}' to leave them plain.",
        )


def layer_index(name: str, role: str) -> Optional[int]:
    """Block index of a matrix: the first integer in its module name; None for e and p."""
    match = _LAYER_INDEX.search(f'.{name}.')
    return int(match.group(1)) if match and role not in ('e', 'p') else None


def _spec(name: str, module: nn.Module, role: str, parent: nn.Module) -> MatrixSpec:
    layer = layer_index(name, role)
    rows = module.weight.shape[0]
    if role != FUSED_QKV:
        return MatrixSpec(name, module, (role,), (rows,), layer)
    return MatrixSpec(name, module, ('q', 'k', 'v'), fused_qkv_sizes(name, module, parent), layer)


def fused_qkv_sizes(name: str, module: nn.Module, attention: nn.Module) -> tuple[int, int, int]:
    """Rows of q, k and v in a fused projection, read from its attention module.

    llm-foundry's attention modules carry ``n_heads``, ``kv_n_heads`` and ``head_dim``; with
    GQA, k and v are narrower than q. Without ``kv_n_heads`` the three slices are equal.
    """
    rows = cast(torch.Tensor, module.weight).shape[0]
    n_heads = getattr(attention, 'n_heads', None)
    head_dim = getattr(attention, 'head_dim', None)
    kv_heads = getattr(attention, 'kv_n_heads', n_heads)
    if n_heads and head_dim and kv_heads and (n_heads + 2 * kv_heads) * head_dim == rows:
        return (n_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    if rows % 3 == 0 and n_heads is None:
        return cast(tuple[int, int, int], (rows // 3,) * 3)
    raise ValueError(
        f'{name}: cannot split {rows} fused rows into q, k, v from its attention module '
        f'(n_heads={n_heads}, kv_n_heads={kv_heads}, head_dim={head_dim}).',
    )


def backbone_std(role: str, d_in: int, shape: ModelShape, backbone: str) -> float:
    """Std s_r of the backbone initialization for one matrix (Table 1).

    He: s_r = gain / sqrt(d_in), gain sqrt(2) for W_d (input is an activation output), else 1.
    Small: s_r = sqrt(2 / (5 d)) for every matrix.
    Both: o and d (residual writers) times 1 / sqrt(2N).
    """
    if backbone == 'he':
        gain = math.sqrt(2.0) if role == 'd' else 1.0
        std = gain / math.sqrt(d_in)
    elif backbone == 'small':
        std = math.sqrt(2.0 / (5.0 * shape.d_model))
    else:
        raise ValueError(f'backbone must be one of {BACKBONES}, got {backbone!r}.')
    if role in RESIDUAL_ROLES:
        std /= math.sqrt(2.0 * shape.n_layers)
    return std


def embedding_std(shape: ModelShape, backbone: str) -> float:
    """Std of W_e under a backbone: sqrt(1/d) (He) or sqrt(2/(5d)) (Small)."""
    return backbone_std('e', shape.d_model, shape, backbone)
