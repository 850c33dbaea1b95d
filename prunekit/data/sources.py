"""Named text sources (wikitext2, ptb, tinyshakespeare, tinystories, c4) and local files.

A source is read from `$PRUNEKIT_DATA_DIR/data/text/...` when present, else from the
Hugging Face hub through `datasets` (users with internet).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunekit import settings
from prunekit.errors import PrunekitError, choice_error, read_text


@dataclass(frozen=True)
class TextSource:
    """A text and where it came from. `sha256` is of the UTF-8 text."""

    name: str
    split: str
    text: str
    origin: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "origin": self.origin,
            "chars": len(self.text),
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class Dataset:
    """A named corpus: its local files per split and how to fetch it online."""

    local: dict[str, str]  # split -> path under data/text
    calib_split: str
    eval_split: str
    online: Callable[[str], str] | None = None
    fraction: dict[str, tuple[float, float]] | None = None  # split -> slice of one file


def _hub_wikitext2(split: str) -> str:
    from datasets import load_dataset

    hub_split = {"valid": "validation"}.get(split, split)
    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"]
    # the references join the test split with blank lines and the others with spaces
    return ("\n\n" if split == "test" else " ").join(rows)


def _hub_ptb(split: str) -> str:
    from datasets import load_dataset

    hub_split = {"valid": "validation"}.get(split, split)
    rows = load_dataset("ptb_text_only", "penn_treebank", split=hub_split)["sentence"]
    return "\n".join(rows)


def _hub_c4(split: str) -> str:
    from datasets import load_dataset

    files = {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }
    rows = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)["text"]
    return "\n\n".join(rows[:3000])


DATASETS: dict[str, Dataset] = {
    "wikitext2": Dataset(
        local={"valid": "wikitext2/valid.txt", "test": "wikitext2/test.txt"},
        calib_split="valid",
        eval_split="test",
        online=_hub_wikitext2,
    ),
    "ptb": Dataset(
        local={"valid": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt"},
        calib_split="valid",
        eval_split="test",
        online=_hub_ptb,
    ),
    "tinyshakespeare": Dataset(
        local={"train": "tinyshakespeare/input.txt", "test": "tinyshakespeare/input.txt"},
        calib_split="train",
        eval_split="test",
        fraction={"train": (0.0, 0.9), "test": (0.9, 1.0)},
    ),
    "tinystories": Dataset(
        local={"sample": "tinystories/sample.txt"}, calib_split="sample", eval_split="sample"
    ),
    "c4": Dataset(
        local={"train": "c4/train.txt", "validation": "c4/validation.txt"},
        calib_split="train",
        eval_split="validation",
        online=_hub_c4,
    ),
}


def _read_local(dataset: Dataset, split: str) -> tuple[str, str] | None:
    root = settings.data_dir()
    if root is None or split not in dataset.local:
        return None
    path = root / "data" / "text" / dataset.local[split]
    if not path.is_file():
        return None
    text = read_text(path, "text file")
    if dataset.fraction and split in dataset.fraction:
        lo, hi = dataset.fraction[split]
        text = text[int(lo * len(text)) : int(hi * len(text))]
    return text, str(path)


def check_dataset(name: str) -> None:
    """Fail with the valid names unless `name` is a known dataset or an existing file."""
    if name not in DATASETS and not Path(name).expanduser().is_file():
        raise choice_error("dataset", name, [*DATASETS, "<path to a .txt file>"])


def load_text(name: str, split: str | None = None, purpose: str = "eval") -> TextSource:
    """The text of a named dataset split, or of a local file when `name` is a path.

    `purpose` ("calib" or "eval") picks the default split: calibration never reads the
    evaluation split.
    """
    path = Path(name).expanduser()
    if name not in DATASETS and path.is_file():
        return TextSource(path.stem, "file", read_text(path, "text file"), str(path))
    check_dataset(name)
    dataset = DATASETS[name]
    split = split or (dataset.calib_split if purpose == "calib" else dataset.eval_split)
    local = _read_local(dataset, split)
    if local is not None:
        return TextSource(name, split, local[0], local[1])
    if dataset.online is None:
        raise PrunekitError(
            f"dataset {name!r} split {split!r} is only available locally: "
            f"set PRUNEKIT_DATA_DIR to a folder holding data/text/{dataset.local.get(split, '')}"
        )
    try:
        text = dataset.online(split)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear line
        raise PrunekitError(
            f"dataset {name!r} split {split!r} is not in $PRUNEKIT_DATA_DIR and could not be "
            f"downloaded ({type(err).__name__}); set PRUNEKIT_DATA_DIR or go online"
        ) from err
    return TextSource(name, split, text, f"hub:{name}/{split}")
