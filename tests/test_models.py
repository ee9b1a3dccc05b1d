"""Model construction (every preset offline, the local-weights loading paths), the mask
token, the additive padding mask, tied MLM decoder, and ``dmp model info``."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from conftest import tiny_config
from dmp_core.config import ModelParams, ParamsError
from dmp_core.models import create_model, load_preset

VOCAB = 1000


def micro_spec() -> dict:
    """The tiny preset shrunk further so tests run in milliseconds."""
    spec = copy.deepcopy(load_preset("tiny"))
    spec["image"]["overrides"].update(embed_dim=32, depth=1, num_heads=2)
    spec["text"]["bert"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    spec["text"]["text_layers"] = 1
    spec["embed_dim"] = 16
    return spec


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model(ModelParams(preset="tiny"), image_size=32, vocab_size=VOCAB, spec=micro_spec()).eval()


def _texts():
    ids = torch.tensor([[101, 200, 201, 202, 102, 0, 0, 0], [101, 300, 102, 0, 0, 0, 0, 0]])
    return ids, (ids != 0).long()


def test_presets_build_offline():
    tiny = create_model(ModelParams(preset="tiny"), image_size=64, vocab_size=30522)
    assert (tiny.patch_size, tiny.num_patches, tiny.image_dim, tiny.text_dim) == (8, 64, 128, 128)
    assert len(tiny.text.layers) == 2 and len(tiny.fusion.layers) == 2
    minilm = create_model(ModelParams(preset="minilm"), image_size=64, vocab_size=30522)  # pretrained, offline
    assert minilm.text_dim == 384 and len(minilm.text.layers) == 3 and len(minilm.fusion.layers) == 3
    ref = BertModel.from_pretrained(_minilm_dir(), add_pooling_layer=False)
    assert torch.equal(minilm.fusion.layers[0].output.dense.weight, ref.encoder.layer[3].output.dense.weight)
    seed = create_model(ModelParams(preset="vit_s_bert_s", pretrained=False), image_size=64, vocab_size=30522)
    assert (seed.patch_size, seed.image_dim, seed.text_dim, seed.embed_dim) == (16, 384, 512, 256)
    assert len(seed.text.layers) == 2 and len(seed.fusion.layers) == 2


def _minilm_dir():
    from dmp_core.models.text import _resolve_source

    return _resolve_source(load_preset("minilm")["text"]["pretrained"])


def test_local_weights_are_loaded(tmp_path):
    """A BertModel saved with save_pretrained and a timm checkpoint file / hub-layout folder."""
    spec = micro_spec()
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=48), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    vit = timm.create_model(spec["image"]["arch"], img_size=32, num_classes=0, global_pool="",
                            **spec["image"]["overrides"])
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    params = ModelParams(preset="tiny", image_weights=str(tmp_path / "vit.safetensors"),
                         text_weights=str(tmp_path / "bert"))
    model = create_model(params, image_size=32, vocab_size=VOCAB, spec=spec)
    assert torch.equal(model.vision.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert model.text_dim == 24 and len(model.text.layers) == 1 and len(model.fusion.layers) == 3
    assert torch.equal(model.fusion.layers[2].attention.self.query.weight, bert.encoder.layer[3].attention.self.query.weight)
    hub_dir = tmp_path / "vit_dir"
    hub_dir.mkdir()
    save_file(vit.state_dict(), str(hub_dir / "model.safetensors"))
    (hub_dir / "config.json").write_text(json.dumps({"architecture": spec["image"]["arch"]}))
    model = create_model(params.model_copy(update={"image_weights": str(hub_dir)}), image_size=32,
                         vocab_size=VOCAB, spec=spec)
    assert torch.equal(model.vision.vit.pos_embed, vit.pos_embed)
    with pytest.raises(ParamsError, match="model.text_weights"):
        create_model(params.model_copy(update={"text_weights": str(tmp_path / "nope")}), image_size=32,
                     vocab_size=VOCAB, spec=spec)
    with pytest.raises(ParamsError, match="vocabulary"):
        create_model(params, image_size=32, vocab_size=VOCAB + 1, spec=spec)


def test_coattn_is_a_one_line_params_error():
    with pytest.raises(ParamsError, match="coattn is not implemented"):
        create_model(ModelParams(fusion_type="coattn"), image_size=32, vocab_size=VOCAB)


def test_shapes_and_api(micro):
    images = micro.preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    ids, attn = _texts()
    v, t = micro.encode_image(images), micro.encode_text(ids, attn)
    joint = micro.fuse(v, t, attn)
    assert v.shape == (2, 17, 32) and t.shape == (2, 8, 32) and joint.shape == (2, 1 + 16 + 8, 32)
    assert micro.itm_logits(joint).shape == (2, 2)
    img_emb, txt_emb = micro.image_embed(v), micro.text_embed(t)
    assert torch.allclose(img_emb.norm(dim=-1), torch.ones(2)) and txt_emb.shape == (2, 16)
    assert micro.mlm_logits(joint[:, 17:]).shape == (2, 8, VOCAB)


def test_mask_token_replaces_patches_before_position_embeddings(micro):
    images = micro.preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    none = torch.zeros(2, 16, dtype=torch.bool)
    assert torch.equal(micro.encode_image(images, none), micro.encode_image(images))
    mask = none.clone()
    mask[:, :8] = True
    # masked content is invisible: changing the pixels of masked patches (top half) changes nothing
    other = images.clone()
    other[:, :, :16] = torch.randn_like(other[:, :, :16])
    assert torch.allclose(micro.encode_image(images, mask), micro.encode_image(other, mask), atol=1e-6)
    assert not torch.allclose(micro.encode_image(images), micro.encode_image(other), atol=1e-3)
    # two masked patches still differ (position embeddings are added after the mask token)
    x = micro.vision.vit.patch_embed(images)
    x = torch.where(mask[..., None], micro.vision.mask_token.expand_as(x), x)
    x = micro.vision.vit._pos_embed(x)
    assert not torch.allclose(x[:, 1], x[:, 2])


def test_zero_masking_option():
    torch.manual_seed(0)
    model = create_model(ModelParams(image_masking="zero"), image_size=32, vocab_size=VOCAB, spec=micro_spec())
    images = model.preprocess(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 0] = True
    zeroed = images.clone()
    zeroed[:, :, :8, :8] = 0
    assert torch.allclose(model.encode_image(images, mask), model.encode_image(zeroed), atol=1e-6)


def test_padding_changes_nothing(micro):
    images = micro.preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    ids, attn = _texts()
    other = ids.clone()
    other[attn == 0] = torch.randint(500, 900, (int((attn == 0).sum()),))
    v = micro.encode_image(images)
    t1, t2 = micro.encode_text(ids, attn), micro.encode_text(other, attn)
    keep = attn.bool()
    assert torch.allclose(t1[keep], t2[keep], atol=1e-6)
    assert torch.allclose(micro.text_embed(t1), micro.text_embed(t2), atol=1e-6)
    j1, j2 = micro.fuse(v, t1, attn), micro.fuse(v, t2, attn)
    joint_keep = torch.cat([torch.ones(2, 17, dtype=torch.bool), keep], dim=1)
    assert torch.allclose(j1[joint_keep], j2[joint_keep], atol=1e-6)
    assert torch.allclose(micro.itm_logits(j1), micro.itm_logits(j2), atol=1e-6)
    # the mask is really used: attending to padding (all-ones mask) changes the outputs
    t3 = micro.encode_text(other, torch.ones_like(attn))
    assert not torch.allclose(t1[keep], t3[keep], atol=1e-4)


def test_mlm_decoder_is_tied_and_temperature_clamped(micro):
    model = copy.deepcopy(micro)
    states = torch.randn(3, 32)
    model.mlm_logits(states).sum().backward()
    assert model.text.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert "mlm_head.decoder.weight" not in dict(model.named_parameters())
    with torch.no_grad():
        model.temp.fill_(5.0)
    assert float(model.temperature.detach()) == 0.5
    with torch.no_grad():
        model.temp.fill_(0.0)
    assert float(model.temperature.detach()) == pytest.approx(0.001)


def test_model_info_cli(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(tiny_config().model_dump(mode="json")))  # JSON is YAML
    result = CliRunner().invoke(app, ["model", "info", "--preset", "tiny", "--params", str(params)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output.strip().splitlines()[-1])
    model = create_model(ModelParams(), image_size=32, vocab_size=30522)
    for part in ("image_tower", "text_tower", "fusion", "heads"):
        assert counts[part] > 0
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(counts[k] for k in ("image_tower", "text_tower", "fusion", "heads"))
    bad = CliRunner().invoke(app, ["model", "info", "--preset", "nope", "--params", str(params)])
    assert bad.exit_code == 1 and "unknown preset" in bad.output
