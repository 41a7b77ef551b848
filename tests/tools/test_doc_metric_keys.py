"""Every monitor metric key the docs name is one the code can log.

Keys of the families ``update_ratio/``, ``grad_norm/``, ``param_norm/`` and ``gate/`` in README.md and
docs/*.md are checked against the monitor's key layout: a matrix key ``{family}/L{layer}/{role}`` (or
``{family}/{role}`` for e and p), or a key the callbacks' source spells out (the summaries, such as
``update_ratio/last_layer_d_over_u``; ``{...}`` placeholders on either side match any name).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
FAMILIES = ('update_ratio', 'param_norm', 'grad_norm', 'gate')
ROLES = 'eqkvoudpg'
DOC_KEY = re.compile(r'`((?:' + '|'.join(FAMILIES) + r')/[^`\s]+)`')
SOURCE_KEY = re.compile(r"""f?['"]((?:""" + '|'.join(FAMILIES) + r""")/[^'"\s]*)['"]""")
PLACEHOLDER = re.compile(r'\{[^}]*\}')


def _pattern(key: str) -> re.Pattern:
    parts = PLACEHOLDER.split(key)
    slot = rf'(?:[{ROLES}]|L\d+(?:/[{ROLES}])?|\{{[^}}]*\}})'  # a role, a layer, or a placeholder of the docs
    return re.compile('^' + slot.join(re.escape(p) for p in parts) + '$')


def _matrix_key(key: str) -> bool:
    family, _, rest = key.partition('/')
    layer = r'(L(\d+|\{[^}]*\}|\*)/)'
    role = rf'([{ROLES}]|\{{[^}}]*\}}|\*)'
    return family in FAMILIES and (
        re.fullmatch(f'{layer}{role}', rest) is not None or re.fullmatch(role, rest) is not None
    )


def _source_keys() -> set[str]:
    keys = set()
    for path in (ROOT / 'wesar_composer' / 'callbacks').rglob('*.py'):
        keys |= {k for k in SOURCE_KEY.findall(path.read_text()) if not k.endswith('/')}
    return keys


def _doc_keys() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]:
        for raw in DOC_KEY.findall(path.read_text()):
            key = raw.rstrip('.,;:')
            if not key.endswith(('/', '/*', '/...')):  # a family named by its prefix
                found.setdefault(key, []).append(path.name)
    return found


def test_every_documented_metric_key_is_logged():
    source = _source_keys()
    assert 'update_ratio/last_layer_d_over_u' in source and 'update_ratio/max' in source
    patterns = [_pattern(k) for k in source]
    unknown = {
        key: pages
        for key, pages in _doc_keys().items()
        if not _matrix_key(key) and not any(p.match(key) or _pattern(key).match(s) for p, s in zip(patterns, source))
    }
    assert not unknown, f'metric keys named in the docs that the monitor does not log: {unknown}'


def test_the_check_catches_a_wrong_key():
    source = _source_keys()
    patterns = [_pattern(k) for k in source]
    for bad in ('update_ratio/d_over_u_last', 'grad_norm/L3/x'):
        assert not _matrix_key(bad) and not any(p.match(bad) for p in patterns)
    for good in ('update_ratio/L3/d', 'gate/p', 'param_norm/L{layer}/{role}', 'update_ratio/mean_u'):
        assert _matrix_key(good) or any(p.match(good) for p in patterns)
