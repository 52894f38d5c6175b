"""The reimplemented Table-6 baselines, one plugin per file.

Installed, this folder is the sub-package ``fewshot_nsl.baselines`` and each file is registered
through the ``fewshot_nsl.methods`` entry points in ``pyproject.toml``, exactly as a third-party
plugin package would be (see the README, "Writing a plugin").
"""
