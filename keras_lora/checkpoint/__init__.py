"""Adapter checkpoints: one adapter of a model as `adapter_config.json` and
`adapter.safetensors`.

`format.py` reads and writes the files, `match.py` checks them against a
model, `describe.py` gives the `LoraConfig` of an adapter, and `save.py` and
`load.py` hold the entry points.
"""

from keras_lora.checkpoint.describe import adapter_config
from keras_lora.checkpoint.load import load_adapter
from keras_lora.checkpoint.save import save_adapter

__all__ = ["adapter_config", "load_adapter", "save_adapter"]
