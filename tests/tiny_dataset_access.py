"""``make_tiny_store`` of the ``tiny`` test dataset plugin, importable by test helpers."""
from pathlib import Path

from fewshot_nsl.registry import load_plugins, plugin_module

PLUGINS = Path(__file__).resolve().parent / "plugins"
load_plugins([PLUGINS])
make_tiny_store = plugin_module(PLUGINS / "tiny_dataset.py").make_tiny_store
