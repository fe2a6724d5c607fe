"""Export: moeq checkpoints as the files other runtimes serve (GGUF for llama.cpp, compressed-tensors for vLLM)."""

from .compressed import CompressedReport, export_compressed
from .gguf import GGUFReport, export_gguf
from .weights import ExportError

__all__ = ["CompressedReport", "ExportError", "GGUFReport", "export_compressed", "export_gguf"]
