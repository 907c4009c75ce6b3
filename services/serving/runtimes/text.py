"""A text model's tokenizer, stored with its version: raw text in, the model's token ids out.

The trainer stores the tokenizer training used in the version's model folder
(``tokenizer/tokenizer.json``: the Hugging Face ``tokenizers`` format, a vocabulary and rules, no
code to run), set up with the job's truncation and fixed padding to the model's ``max_length``.
Serving opens it with ``tokenizers.Tokenizer.from_file`` (Rust; never a Python object from the
artifact) when the version's one input is ``int64 [batch, max_length]``, so that a client may send
text where it would send ``input_ids``, in every protocol; each text becomes exactly the ids
training made of it, and one that did not fit in ``max_length`` tokens is cut and said to be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.serving.runtimes.base import ModelLoadError, Signature

#: Where the trainer puts the tokenizer, inside the version's model folder.
TOKENIZER_FILE = Path("tokenizer") / "tokenizer.json"


@dataclass(frozen=True)
class TextEncoder:
    """Texts as the token ids of the version's one input (``input``), ``max_length`` each."""

    tokenizer: Any  # tokenizers.Tokenizer
    input: str
    max_length: int

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """The ids, int64 [len(texts), max_length]; and whether each text was cut to fit."""
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        return ids, [bool(encoding.overflowing) for encoding in encodings]


def load_text_encoder(root: Path, signature: Signature) -> TextEncoder | None:
    """The version's text encoder, when ``root`` holds a tokenizer; None otherwise.

    Refuses (ModelLoadError) a tokenizer that does not make the ids the signature takes: one int64
    input of a fixed length, which the tokenizer must pad and truncate to.
    """
    path = root / TOKENIZER_FILE
    if not path.is_file():
        return None
    specs = signature.inputs
    if len(specs) != 1 or specs[0].dtype != np.int64 or len(specs[0].shape) != 2 or specs[0].shape[1] is None:
        raise ModelLoadError(
            f"the version holds {TOKENIZER_FILE} but takes {[s.describe() for s in specs]}, not one int64 "
            "input of token ids [batch, max_length]")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library's own error type for a file it cannot read
        raise ModelLoadError(f"{TOKENIZER_FILE} cannot be read as a tokenizer: {exc}") from exc
    length = int(specs[0].shape[1])
    truncation, padding = tokenizer.truncation or {}, tokenizer.padding or {}
    if truncation.get("max_length") != length or padding.get("length") != length:
        raise ModelLoadError(
            f"{TOKENIZER_FILE} truncates to {truncation.get('max_length')} and pads to "
            f"{padding.get('length')} tokens; the model takes {length}")
    return TextEncoder(tokenizer=tokenizer, input=specs[0].name, max_length=length)
