"""YAML configs shipped with the suite (installed as ``fewshot_nsl.configs``): ``profiles/`` and ``table6.yaml``."""
