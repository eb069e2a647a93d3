"""Model I/O for prunelab: loading from every source (`load_model`), the Llama-family
adapter the pruner shrinks models through, and the pruned-checkpoint format."""

from prunelab.models.adapter import LayerProjections, LayerWidths, LlamaFamilyAdapter, model_family
from prunelab.models.checkpoint import PROVENANCE_FILE, checkpoint_config, read_provenance, save_checkpoint
from prunelab.models.loading import LoadedModel, ModelSource, load_model, read_weights, resolve_model
from prunelab.models.registry import register_model, registered_names

__all__ = [
    "PROVENANCE_FILE",
    "LayerProjections",
    "LayerWidths",
    "LlamaFamilyAdapter",
    "LoadedModel",
    "ModelSource",
    "checkpoint_config",
    "load_model",
    "model_family",
    "read_provenance",
    "read_weights",
    "register_model",
    "registered_names",
    "resolve_model",
    "save_checkpoint",
]
