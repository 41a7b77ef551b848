"""The tools around the library: demo, experiments, plotting and the offline data builder.

Console scripts ``wesar-demo``, ``wesar-experiments``, ``wesar-plot`` and ``wesar-data``. The
library (every other module of :mod:`wesar_composer`) never imports this package; the tools use
the library. The YAMLs they need ship as package data in ``yamls/`` (read with
:mod:`importlib.resources`), and every path they read or write by default is relative to the
current folder.
"""
