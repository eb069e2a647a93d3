"""Built-in text corpora (`wikitext2`, `ptb`, `wikipassages`) and the embedded fallback text.

A built-in name resolves like any corpus (registry.resolve_text: the store,
`$PRUNELAB_DATA_DIR/<name>/`, the Hugging Face hub when it answers) and finally
falls back to the embedded corpus, with a warning that the text is not the
corpus asked for; the report marks every number measured on it.

The fallback has to be real English that every fresh, offline machine already
has. No package we depend on ships a prose corpus (nltk's corpora, lm-eval's task
data and sacrebleu's test sets are all downloaded on first use), so it is built
from CPython's own `pydoc_data.topics`: the Python Language Reference's prose as
shipped with every interpreter (about 28,000 words of English once code samples
and grammar rules are dropped; PSF License). It is technical prose, not Wikipedia
or newswire, so its perplexities are not comparable to published WikiText-2/PTB
numbers; it exists so calibration and smoke runs work anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from prunelab.errors import InvalidArgument

# The fallback's paragraphs are dealt into splits by position so that the
# validation text never overlaps the text a model is calibrated or tuned on.
_FALLBACK_SPLIT_OF_REMAINDER = {0: "validation", 1: "test", 2: "train", 3: "train"}
_MIN_WORDS = 6  # shorter blocks are headings and list stubs ("* Else:"), not prose
FALLBACK_SOURCE = "CPython pydoc_data.topics (Python Language Reference prose, PSF License)"


@dataclass(frozen=True)
class HubSource:
    path: str  # dataset id on the hub
    config: str | None
    text_field: str  # each row's text becomes one line, as in the original files
    # A corpus cut out of another dataset: the hub split it reads, and the function
    # that turns those rows into the rows of the split asked for.
    hub_split: str | None = None
    derive: Callable[[list[dict], str], list[dict]] | None = None

    def split_to_read(self, split: str) -> str:
        return self.hub_split or split

    def rows_of(self, rows: list[dict], split: str) -> list[dict]:
        return self.derive(rows, split) if self.derive else rows


def _wikipedia_passages(rows: list[dict], split: str) -> list[dict]:
    """BoolQ's test passages as a raw-text corpus, as ../shared/data/wikipassages was made:
    distinct passages in order, the "Title -- " prefix removed, every 5th one (the 5th,
    10th, ...) validation and the rest train. Test-split passages: no harness scores them."""
    if split not in ("train", "validation"):
        raise InvalidArgument(f"wikipassages has splits train and validation, not {split!r}", field="split")
    passages = list(dict.fromkeys(row["passage"].split(" -- ", 1)[-1] for row in rows))
    return [{"passage": text} for i, text in enumerate(passages) if (i % 5 == 4) == (split == "validation")]


@dataclass(frozen=True)
class BuiltinCorpus:
    name: str
    description: str
    hub: HubSource


BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    corpus.name: corpus
    for corpus in (
        BuiltinCorpus(
            "wikitext2",
            "WikiText-2 (Merity et al. 2016), CC BY-SA 3.0",
            HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
        ),
        BuiltinCorpus(
            "wikipassages",
            "raw English Wikipedia prose: the distinct passages of SuperGLUE BoolQ's test split (CC BY-SA 3.0)",
            HubSource("aps/super_glue", "boolq", "passage", hub_split="test", derive=_wikipedia_passages),
        ),
        BuiltinCorpus(
            "ptb",
            "Penn Treebank, Mikolov's preprocessing (LDC, research use)",
            HubSource("ptb-text-only/ptb_text_only", "penn_treebank", "sentence"),
        ),
    )
}


def fallback_text(split: str) -> str:
    """The embedded English text for `split` (train, validation or test)."""
    if split not in _FALLBACK_SPLIT_OF_REMAINDER.values():
        raise InvalidArgument(f"the embedded fallback corpus has no split {split!r} (train, validation, test)", field="split")
    paragraphs = _prose_paragraphs()
    return "\n".join(p for i, p in enumerate(paragraphs) if _FALLBACK_SPLIT_OF_REMAINDER[i % 4] == split)


def _prose_paragraphs() -> list[str]:
    """Distinct paragraphs of running text, in topic order: indented blocks (code,
    grammar productions), headings and fragments under `_MIN_WORDS` are dropped,
    wrapped lines are joined."""
    from pydoc_data.topics import topics

    paragraphs: dict[str, None] = {}  # ordered set: some paragraphs recur across topics
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.strip("\n").split("\n")
            if any(line.startswith(" ") for line in lines) or set(lines[-1]) <= set("*=-~^"):
                continue
            paragraph = " ".join(line.strip() for line in lines)
            if len(paragraph.split()) >= _MIN_WORDS:
                paragraphs[paragraph] = None
    return list(paragraphs)
