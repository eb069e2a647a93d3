"""Exporting models out of prunelab: GGUF files for llama.cpp and the engines built on it."""

from prunelab.export.gguf_file import FFN_BLOCK, OUTTYPES, GgufFile, check_outtype, write_gguf
from prunelab.export.job import ARTIFACT_KIND, GGUF_NAME, ExportOutcome, run_export

__all__ = ["ARTIFACT_KIND", "FFN_BLOCK", "GGUF_NAME", "OUTTYPES", "ExportOutcome", "GgufFile", "check_outtype", "run_export", "write_gguf"]
