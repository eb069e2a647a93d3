"""Training and validation examples for LoRA tuning, from the dataset registry.

Two kinds of data:

- alpaca instruction sets ({"instruction", "input", "output"} records): each record
  becomes the Alpaca prompt (ALPACA_PROMPT / ALPACA_PROMPT_NO_INPUT, the template of
  Stanford Alpaca and LLM-Pruner's post-training) followed by the output and EOS,
  truncated to max_length tokens. The loss is on the response tokens (output + EOS)
  only: the prompt's labels are masked, so the model is not trained to write prompts.
- text corpora: the split's text tokenized once and cut into non-overlapping windows
  of exactly max_length tokens (the remainder dropped); every token but each window's
  first is predicted.

Validation is either a separate dataset (`val_data`) or held out from `data`: its
last `val_fraction` of examples (windows or records) in file order, so it never
overlaps the training examples and is the same on every run. It is then cut in two:
the *selection* part (scored at every evaluation; it chooses the step returned) and
the *held-out* part, its last `heldout_fraction`, scored only on the input and the
returned model, so its "after" carries no selection bias. At most
`max_val_examples` of each are scored (the first ones of each part).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from prunelab.data import BUILTIN_CORPORA, canonical_split, get_dataset, load_records, resolve_text
from prunelab.data.formats import detect_format
from prunelab.data.registry import local_split_file
from prunelab.errors import InvalidArgument, NotFound
from prunelab.tune.settings import TuneSettings

IGNORE_INDEX = -100  # label of tokens without loss (transformers' and torch's convention)
TUNABLE_FORMATS = ("alpaca", "text")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    input_ids: torch.Tensor  # (T,) int64
    labels: torch.Tensor  # (T,) int64, IGNORE_INDEX where no loss


@dataclass(frozen=True)
class TuneData:
    format: str  # of the training data: alpaca | text
    train: list[Example]
    validation: list[Example]  # the selection split: chooses the step
    heldout: list[Example]  # never seen by training or step selection
    identity: dict[str, Any]  # names, splits, sha256 of what was read, how validation was chosen


def dataset_format(name: str, split: str, field: str) -> str:
    """alpaca or text, without reading the data; InvalidArgument naming `field` for an
    unknown dataset or one tuning cannot read."""
    found = _stored_or_local_format(name, split)
    if found is None and name in BUILTIN_CORPORA:
        found = "text"
    if found is None:
        raise InvalidArgument(
            f"unknown dataset {name!r}: not in the registry (prunelab data list), not a built-in corpus "
            f"({', '.join(BUILTIN_CORPORA)}) and not a local file or folder; import it with: prunelab data import {name} PATH",
            field=field,
        )
    if found not in TUNABLE_FORMATS:
        raise InvalidArgument(f"dataset {name!r} is {found}; tuning reads alpaca instruction sets or text corpora", field=field)
    return found


def _stored_or_local_format(name: str, split: str) -> str | None:
    try:
        return get_dataset(name).format
    except (NotFound, InvalidArgument):  # not imported, or not a dataset name at all (a path)
        pass
    path = local_split_file(name, split)  # a path the caller may read, or the data folder's
    return detect_format(path) if path is not None else None


def build_tune_data(tokenizer: PreTrainedTokenizerBase, settings: TuneSettings) -> TuneData:
    fmt = dataset_format(settings.data, settings.data_split, "data")
    examples, digest = _read_examples(tokenizer, settings.data, settings.data_split, fmt, settings.max_length)
    identity: dict[str, Any] = {
        "data": settings.data, "data_split": canonical_split(settings.data_split), "format": fmt, "data_sha256": digest,
    }
    if fmt == "alpaca":
        identity["prompt_template"] = "alpaca; loss on response tokens only"
    if settings.val_data:
        train, validation = examples, _separate_validation(tokenizer, settings, identity)
    else:
        held_out = max(1, round(len(examples) * settings.val_fraction))
        train, validation = examples[:-held_out], examples[-held_out:]
        identity["validation"] = f"last {held_out} of {len(examples)} {_unit(fmt)} of {settings.data}"
    validation, heldout = _selection_and_heldout(validation, settings)
    if not train:
        raise InvalidArgument(
            f"{settings.data} gives {len(examples)} {_unit(fmt)} of at most {settings.max_length} tokens: "
            "too few to train on after holding out validation",
            field="data",
        )
    identity.update(train_examples=len(train), val_examples=len(validation), heldout_examples=len(heldout),
                    heldout=f"last {settings.heldout_fraction:g} of the validation examples, never used to choose the step")
    return TuneData(fmt, train, validation, heldout, identity)


def _selection_and_heldout(validation: list[Example], settings: TuneSettings) -> tuple[list[Example], list[Example]]:
    if len(validation) < 2:
        raise InvalidArgument(
            f"validation has {len(validation)} example(s); it needs at least 2, one to choose the step and one held out",
            field="val_data" if settings.val_data else "val_fraction",
        )
    held_out = min(len(validation) - 1, max(1, round(len(validation) * settings.heldout_fraction)))
    cap = settings.max_val_examples
    return validation[:-held_out][:cap], validation[-held_out:][:cap]


def _separate_validation(tokenizer: PreTrainedTokenizerBase, settings: TuneSettings, identity: dict[str, Any]) -> list[Example]:
    fmt = dataset_format(settings.val_data, settings.val_split, "val_data")
    validation, digest = _read_examples(tokenizer, settings.val_data, settings.val_split, fmt, settings.max_length)
    if not validation:
        raise InvalidArgument(f"{settings.val_data} holds no example of at most {settings.max_length} tokens", field="val_data")
    identity.update(val_data=settings.val_data, val_split=canonical_split(settings.val_split), val_format=fmt, val_sha256=digest)
    return validation


def _unit(fmt: str) -> str:
    return "records" if fmt == "alpaca" else "windows"


def _read_examples(
    tokenizer: PreTrainedTokenizerBase, name: str, split: str, fmt: str, max_length: int
) -> tuple[list[Example], str]:
    """The examples of one split and the sha256 of what was read."""
    if fmt == "text":
        text = resolve_text(name, split)
        return text_windows(tokenizer, text, max_length), hashlib.sha256(text.encode()).hexdigest()
    records = load_records(name, split)
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False).encode()
    examples = [alpaca_example(tokenizer, record, max_length) for record in records]
    return [e for e in examples if e is not None], hashlib.sha256(canonical).hexdigest()


def text_windows(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[Example]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    count = ids.numel() // max_length
    windows = ids[: count * max_length].view(count, max_length)
    return [Example(window, window) for window in windows]


def alpaca_prompt(record: dict[str, Any]) -> str:
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def alpaca_example(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], max_length: int) -> Example | None:
    """Prompt then response, labels on the response only; None when truncation to
    `max_length` leaves no response token."""
    prompt_ids = tokenizer(alpaca_prompt(record)).input_ids  # with the tokenizer's BOS where it has one
    response_ids = tokenizer(record["output"], add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Example(torch.tensor(input_ids), torch.tensor(labels))


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and labels (IGNORE_INDEX on padding)."""
    length = max(e.input_ids.numel() for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = example.input_ids.numel()
        input_ids[row, :size] = example.input_ids
        labels[row, :size] = example.labels
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
