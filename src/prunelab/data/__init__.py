"""Dataset registry: text corpora, instruction sets and lm-eval task data, stored as
artifacts and named by refs `datasets/<name>`; see `registry.py` for how a name
resolves and `corpora.py` for the built-in corpora and the offline fallback text."""

from prunelab.data import hub
from prunelab.data.corpora import BUILTIN_CORPORA, fallback_text
from prunelab.data.formats import FORMATS, canonical_split
from prunelab.data.registry import (
    DatasetRef,
    SplitInfo,
    find_task_data,
    get_dataset,
    import_dataset,
    list_datasets,
    load_records,
    resolve_text,
)

__all__ = [
    "BUILTIN_CORPORA",
    "FORMATS",
    "DatasetRef",
    "SplitInfo",
    "canonical_split",
    "fallback_text",
    "find_task_data",
    "get_dataset",
    "import_dataset",
    "hub",
    "list_datasets",
    "load_records",
    "resolve_text",
]
