"""Export: moeq checkpoints as the files other runtimes serve (GGUF for llama.cpp)."""

from .gguf import ExportError, GGUFReport, export_gguf

__all__ = ["ExportError", "GGUFReport", "export_gguf"]
