"""CLIP's text tokenizer without torch: open_clip's byte-level BPE (SimpleTokenizer) rebuilt on
Hugging Face `tokenizers` when a model is exported, saved beside its ONNX text tower, and run
with NumPy. Token ids equal open_clip's (tests/unit/test_onnx.py compares them)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

from imgembed.errors import ConfigurationError

# open_clip's word pattern, without its special tokens (those are added tokens here).
_WORDS = r"""(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class TokenizerSpec:
    sot: int
    eot: int
    context_length: int
    lower: bool


class TextTokenizer:
    FILE = "tokenizer.json"

    def __init__(self, bpe: Tokenizer, spec: TokenizerSpec):
        self._bpe = bpe
        self.spec = spec

    @classmethod
    def from_open_clip(cls, simple: Any) -> TextTokenizer:
        """Rebuilds an open_clip SimpleTokenizer (export time; the caller has open_clip)."""
        from open_clip import tokenizer as oc

        clean = {oc._clean_lower: True, oc._clean_whitespace: False}.get(simple.clean_fn)
        if clean is None or simple.reduction_fn is not None or not simple.context_length:
            raise ConfigurationError(
                "this model's tokenizer (text cleaning or token reduction) has no ONNX "
                "equivalent; use IMGEMBED_RUNTIME=torch for its text tower"
            )
        merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
        bpe = Tokenizer(models.BPE(vocab=simple.encoder, merges=merges, end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        specials = [simple.decoder[i] for i in simple.all_special_ids]
        bpe.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
        spec = TokenizerSpec(
            sot=simple.sot_token_id,
            eot=simple.eot_token_id,
            context_length=simple.context_length,
            lower=clean,
        )
        return cls(bpe, spec)

    def save(self, folder: Path) -> dict[str, Any]:
        self._bpe.save(str(folder / self.FILE))
        return asdict(self.spec)

    @classmethod
    def load(cls, folder: Path, spec: dict[str, Any]) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(folder / cls.FILE)), TokenizerSpec(**spec))

    def _clean(self, text: str) -> str:
        # open_clip's basic_clean + whitespace_clean (+ lower), in its order.
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = " ".join(text.split())
        return text.lower() if self.spec.lower else text

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), context_length) int64 ids: start, BPE ids, end; cut to fit with the end
        token kept last, zero-padded, exactly as open_clip."""
        spec = self.spec
        encoded = self._bpe.encode_batch([self._clean(t) for t in texts], add_special_tokens=False)
        out = np.zeros((len(texts), spec.context_length), dtype=np.int64)
        for row, item in zip(out, encoded, strict=True):
            ids = [spec.sot, *item.ids, spec.eot][: spec.context_length]
            ids[-1] = spec.eot
            row[: len(ids)] = ids
        return out


def token_counts(ids: np.ndarray, eot: int | None, pad: int = 0) -> list[int]:
    """Tokens each row of `ids` gives the text tower: up to its end token (included), or
    its ids other than `pad` for a tokenizer without one (0 is a word in CLIP's vocabulary,
    so it is not looked for there)."""
    if eot is None:
        return [int(n) for n in np.count_nonzero(ids != pad, axis=1)]
    ends = ids == eot
    return [int(np.argmax(row)) + 1 if row.any() else len(row) for row in ends]
