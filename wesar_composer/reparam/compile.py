"""What lets llm-foundry's MPT compile (``compile_config``) on Python 3.12 with recent torch.

``ComposerMPTCausalLM.forward`` and ``.loss`` test ``ffn_type in ffns_with_megablocks``, a
catalogue registry. Its ``__contains__`` reads the installed entry points; on Python 3.12,
``importlib.metadata.entry_points()`` returns an ``EntryPoints`` tuple that Dynamo (torch 2.9
and later) guards by index while ``EntryPoints.__getitem__`` takes names, and tracing fails with
``InternalTorchDynamoError: KeyError: 0``, for every MPT, gated or not. Python 3.11 returns a
dict there and compiles.

:func:`make_registry_lookups_compilable` gives that one registry a membership cache: the answer
for a name is computed once, outside the graph (``torch.compiler.disable``), and later lookups,
the traced ones included, read a plain dict. The model is built (which looks the name up) before
it is compiled, so the traced forward finds the answer cached and has no graph break there.
"""

from __future__ import annotations

import torch

__all__ = ['make_registry_lookups_compilable']


class _CachedMembership:
    """Mixin for a catalogue registry: ``name in registry`` answered once per name, then from a dict."""

    def __contains__(self, name: str) -> bool:
        cache = self.__dict__.setdefault('_membership', {})
        if name in cache:
            return cache[name]
        return self._look_up(name)

    @torch.compiler.disable
    def _look_up(self, name: str) -> bool:
        found = super().__contains__(name)  # type: ignore[misc]
        self.__dict__.setdefault('_membership', {})[name] = found
        return found


def make_registry_lookups_compilable() -> None:
    """Give llm-foundry's ``ffns_with_megablocks`` registry the membership cache (idempotent)."""
    from llmfoundry import layers_registry

    registry = layers_registry.ffns_with_megablocks
    if isinstance(registry, _CachedMembership):
        return
    registry.__class__ = type(f'Cached{type(registry).__name__}', (_CachedMembership, type(registry)), {})
