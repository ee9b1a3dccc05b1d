"""Caption cleaning and WordPiece tokenisation."""
from __future__ import annotations

import pytest

from dmp_core.data.text import clean_caption, decode, english_stopwords, load_tokenizer, tokenize
from dmp_core.errors import DataError


@pytest.mark.parametrize(
    "raw, kwargs, expected",
    [
        ("A Man's dog, running!", {}, "a mans dog running"),
        ("Two dogs -- playing   in\tthe snow.", {}, "two dogs playing in the snow"),
        ("left-hand side: (red) ball", {}, "left hand side red ball"),
        ("A Dog.", {"lowercase": False}, "A Dog"),
        ("A Dog.", {"remove_punctuation": False}, "a dog."),
        ("a dog is on the grass", {"remove_stopwords": True}, "dog grass"),
        ("The Dog is ON the grass", {"remove_stopwords": True, "lowercase": False}, "Dog grass"),
        ("one two three four five", {"max_words": 3}, "one two three"),
        ("?!...", {}, ""),
        ("", {}, ""),
    ],
)
def test_clean_caption(raw, kwargs, expected):
    assert clean_caption(raw, **kwargs) == expected


def test_stopwords_come_from_a_library_list():
    stop = english_stopwords()
    assert len(stop) > 300 and {"the", "a", "is", "above"} <= stop and "dog" not in stop


def test_minilm_tokenizer_offline():
    tok = load_tokenizer("minilm")
    assert len(tok) == 30522
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 101, 102, 103)


def test_tokenize_alignment_and_mask():
    tok = load_tokenizer("minilm")
    texts = ["a red circle left of a blue square", "dog", "a very long caption " * 10, "turquoise rhombus"]
    ids, mask = tokenize(tok, texts, max_tokens=12, batch_size=3)  # batch_size < len: chunking
    assert ids.dtype.name == "int32" and mask.dtype.name == "uint8" and ids.shape == (4, 12)
    for row, text in enumerate(texts):
        n = int(mask[row].sum())
        assert ids[row, 0] == tok.cls_token_id and ids[row, n - 1] == tok.sep_token_id
        assert all(ids[row, k] == tok.pad_token_id for k in range(n, 12))
        assert all(mask[row, k] == (1 if k < n else 0) for k in range(12))
        decoded = decode(tok, ids[row])
        if n < 12:
            assert decoded == text
        else:  # truncated: a prefix of the words
            assert text.startswith(decoded)


def test_unknown_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(DataError) as exc:
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))
    assert "data.tokenizer" in str(exc.value) and "\n" not in str(exc.value)
