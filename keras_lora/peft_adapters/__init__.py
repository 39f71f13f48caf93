"""Hugging Face peft LoRA adapters in and out of keras-hub models.

`families.py` maps each supported family's transformers modules to its
keras-hub layers, `files.py` reads and writes peft's adapter directory, and
`load.py` / `save.py` hold the entry points.
"""

from keras_lora.peft_adapters.load import load_peft_adapter
from keras_lora.peft_adapters.save import save_peft_adapter

__all__ = ["load_peft_adapter", "save_peft_adapter"]
