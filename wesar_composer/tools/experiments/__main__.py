"""``python -m wesar_composer.tools.experiments``: the same as ``wesar-experiments``."""

import sys

from wesar_composer.tools.experiments.cli import main

sys.exit(main())
