"""Build the wheel bundle that ``scripts/gpu_check.sh`` installs on a GPU machine with no network.

The GPU machine is expected to hold a CUDA build of torch (2.7 or newer) and the common
scientific stack (numpy, pandas, pyarrow, scipy, matplotlib, ...), but not Composer or
llm-foundry. The bundle holds every other distribution that ``llmfoundry train`` imports in
this ``.venv`` (found by importing the train path and mapping the loaded modules to their
distributions), at this ``.venv``'s versions, as wheels for the target Python; this package's
own wheel; and the corpus sdist that ``wesar-data`` reads, so that the dataset is built there
with no download. The folder is git-ignored and kept under the transfer limit (``--max-mib``).

Run from the repository root (needs PyPI):  .venv/bin/python scripts/gpu_bundle.py [--python 3.12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Distributions the GPU machine's image provides at versions that work with the stack; the rest travel.
ON_THE_MACHINE = {
    'torch', 'torchvision', 'torchaudio', 'triton', 'numpy', 'pandas', 'pyarrow', 'scipy', 'scikit-learn',
    'sympy', 'mpmath', 'networkx', 'matplotlib', 'fonttools', 'kiwisolver', 'cycler', 'pillow', 'contourpy',
    'jinja2', 'markupsafe', 'pygments', 'pyyaml', 'requests', 'urllib3', 'idna', 'certifi', 'charset-normalizer',
    'six', 'packaging', 'setuptools', 'python-dateutil', 'attrs', 'aiohttp', 'aiosignal', 'frozenlist',
    'multidict', 'yarl', 'propcache', 'aiohappyeyeballs', 'psutil', 'rich', 'markdown-it-py', 'mdurl', 'tqdm',
    'filelock', 'joblib', 'threadpoolctl', 'typing-extensions', 'zipp', 'click', 'einops', 'regex', 'safetensors',
    'narwhals', 'shellingham', 'cloudpickle', 'py-cpuinfo', 'tabulate', 'xxhash', 'anyio', 'annotated-doc',
    'protobuf', 'pyparsing', 'typer', 'accelerate',
}  # fmt: skip

# Imported when present, not needed by a train (checked: the train path imports with them blocked).
OPTIONAL = {'mlflow': 'mlflow', 'boto3': 'boto3', 'botocore': 'botocore', 's3transfer': 's3transfer'}
# distribution -> its importable top-level module; the full mlflow adds only its server's files
# to mlflow-skinny, which provides the ``mlflow`` module the train path imports.

# What one llm-foundry train of this package imports.
_IMPORTS = """
import sys, importlib.metadata as md
for blocked in BLOCKED:
    sys.modules[blocked] = None
import composer, llmfoundry, streaming, transformers, omegaconf
import llmfoundry.command_utils, llmfoundry.cli.cli, composer.cli.launcher
import llmfoundry.callbacks, llmfoundry.models.mpt, llmfoundry.models.hf, llmfoundry.data
import wesar_composer, wesar_composer.tools.data.build
from llmfoundry.registry import algorithms, callbacks
algorithms.get_all(); callbacks.get_all()
names = md.packages_distributions()
print('\\n'.join(sorted({d for m in list(sys.modules) for d in names.get(m.split('.')[0], [])})))
"""

PLATFORMS = ['manylinux_2_28_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'manylinux1_x86_64']


def _normalize(name: str) -> str:
    return name.lower().replace('_', '-').replace('.', '-')


def needed(python: str) -> dict[str, str]:
    """{distribution: version} that the train path imports here and the machine lacks."""
    from importlib import metadata

    blocked = sorted(m for d, m in OPTIONAL.items() if d != 'mlflow')
    code = f'BLOCKED = {blocked!r}\n' + _IMPORTS
    out = subprocess.run([python, '-c', code], capture_output=True, text=True, check=True).stdout
    skip = {_normalize(n) for n in ON_THE_MACHINE} | set(OPTIONAL) | {'wesar-composer'}
    found = {}
    for name in out.split():
        if _normalize(name) not in skip and not _normalize(name).startswith('nvidia-'):
            found[name] = metadata.version(name)
    return found


def download(name: str, version: str, folder: Path, target_python: str) -> None:
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    binary = [*pip, 'download', '--no-deps', '--only-binary=:all:', '--python-version', target_python]
    binary += ['--implementation', 'cp', *(f'--platform={p}' for p in PLATFORMS), '-d', str(folder)]
    if subprocess.run([*binary, f'{name}=={version}']).returncode == 0:
        return
    if subprocess.run([*binary, name]).returncode == 0:  # no wheel of this version for the target Python
        print(f'{name}: no {version} wheel for Python {target_python}; carried the latest wheel', flush=True)
        return
    subprocess.run([*pip, 'wheel', '--no-deps', '-w', str(folder), f'{name}=={version}'], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or '').split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=ROOT / '.whl')
    parser.add_argument('--python', default='3.12', help="the GPU machine's Python (default 3.12)")
    parser.add_argument('--max-mib', type=float, default=60.0)
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    for old in args.out.glob('*.whl'):
        old.unlink()
    packages = needed(sys.executable)
    print(f'{len(packages)} distributions to carry: {", ".join(sorted(packages))}', flush=True)
    for name, version in sorted(packages.items()):
        download(name, version, args.out, args.python)
    subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', str(args.out), str(ROOT)], check=True
    )
    from wesar_composer.tools.data.corpus import fetch_source

    cache = args.out / 'cache'
    cache.mkdir(exist_ok=True)
    fetch_source(cache_dir=cache)
    size = sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file()) / 2**20
    print(f'{args.out}: {len(list(args.out.glob("*.whl")))} wheels and the corpus sdist, {size:.1f} MiB')
    if size > args.max_mib:
        print(f'over the {args.max_mib:g} MiB limit: carry less (see ON_THE_MACHINE)', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
