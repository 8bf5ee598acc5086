"""Export a checkpoint to the Hugging Face format: a folder transformers loads without peerlab.

`export_checkpoint(path, out)` (exporter.py) writes config.json, model.safetensors (sharded
where large), the tokenizer, a model card and two standalone files that import only torch and
transformers: configuration_peerlab.py and modeling_peerlab.py (copied from this package).
"""

from peerlab.export.exporter import ExportError, export_checkpoint, hf_config

__all__ = ["ExportError", "export_checkpoint", "hf_config"]
