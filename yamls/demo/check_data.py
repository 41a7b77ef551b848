"""Imported by llm-foundry before it builds anything (``code_paths`` in demo.yaml).

Registers a config transform that stops a run whose dataset has not been built yet with a
message naming the folder and the ``wesar-data`` command that builds it.
"""

from wesar_composer.data.build import register_train_config_check

register_train_config_check()
