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
    spec["image"]["patch_size"] = 8  # 16 patches at 32 px
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
    assert (tiny.patch_size, tiny.num_patches, tiny.image_dim, tiny.text_dim) == (16, 16, 128, 128)
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
                            patch_size=spec["image"]["patch_size"], **spec["image"]["overrides"])
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


def test_removed_keys_are_unknown():
    """Keys that existed only to be refused are gone: setting one is an unknown-key error."""
    from dmp_core.config import config_from_dict

    for section, key, value in (("model", "fusion_type", "coattn"), ("objective", "itc_queue_size", 16),
                                ("objective", "itc_distill_alpha", 0.4)):
        with pytest.raises(ParamsError, match=f"unknown key '{section}.{key}'"):
            config_from_dict({section: {key: value}})


def test_shapes_and_api(micro):
    images = micro.preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    ids, attn = _texts()
    v, t = micro.encode_image(images), micro.encode_text(ids, attn)
    joint = micro.fuse(v, t, attn)
    # default layout: [image CLS; 16 patches; 8 tokens], no fusion CLS
    assert micro.layout.patch_start == 1 and micro.layout.text_start == 17
    assert v.shape == (2, 17, 32) and t.shape == (2, 8, 32) and joint.shape == (2, 1 + 16 + 8, 32)
    assert micro.itm_logits(joint, attn).shape == (2, 2)
    img_emb, txt_emb = micro.image_embed(v), micro.text_embed(t, attn)
    assert torch.allclose(img_emb.norm(dim=-1), torch.ones(2)) and txt_emb.shape == (2, 16)
    assert micro.mlm_logits(micro.layout.tokens(joint)).shape == (2, 8, VOCAB)


@pytest.mark.parametrize("state, image_cls, length, head_in", [
    ("text_cls", True, 1 + 16 + 8, 32), ("text_cls", False, 16 + 8, 32), ("text_mean", True, 1 + 16 + 8, 32),
    ("text_cls_mean", True, 1 + 16 + 8, 64), ("fusion_cls", True, 2 + 16 + 8, 32), ("concat", False, 1 + 16 + 8, 64)])
def test_itm_state_reads_the_named_fused_state(state, image_cls, length, head_in):
    torch.manual_seed(0)
    model = create_model(ModelParams(itm_state=state, fusion_image_cls=image_cls), image_size=32,
                         vocab_size=VOCAB, spec=micro_spec()).eval()
    images = model.preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    ids, attn = _texts()
    joint = model.fuse(model.encode_image(images), model.encode_text(ids, attn), attn)
    assert joint.shape[1] == length and model.itm_head[0].in_features == head_in  # the MLP head's first layer
    text_cls = joint[:, model.layout.text_start]
    real = [joint[b, model.layout.text_start:][attn[b].bool()] for b in range(2)]
    text_mean = torch.stack([r.mean(dim=0) for r in real])  # brute force: the real tokens only
    expected = {"text_cls": text_cls, "fusion_cls": joint[:, 0], "text_mean": text_mean,
                "text_cls_mean": torch.cat([text_cls, text_mean], dim=-1),
                "concat": torch.cat([joint[:, 0], text_cls], dim=-1)}[state]
    assert torch.allclose(model.pair_state(joint, attn), expected, atol=1e-6)
    assert model.layout.tokens(joint).shape[1] == ids.shape[1]
    assert model.layout.patches(joint).shape[1] == model.num_patches


def test_itm_head_options():
    linear = create_model(ModelParams(itm_head="linear"), image_size=32, vocab_size=VOCAB, spec=micro_spec())
    mlp = create_model(ModelParams(itm_head="mlp"), image_size=32, vocab_size=VOCAB, spec=micro_spec())
    assert isinstance(linear.itm_head, torch.nn.Linear) and linear.itm_head.out_features == 2
    assert [type(m).__name__ for m in mlp.itm_head] == ["Linear", "GELU", "Linear"] and mlp.itm_head[-1].out_features == 2


def test_fused_text_cls_depends_on_the_text_and_the_image(micro):
    """The default pair state carries content from both modalities at initialisation (the
    fusion [CLS] query's first-layer attention could not depend on the text)."""
    images = micro.preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    ids, attn = _texts()
    v, t = micro.encode_image(images), micro.encode_text(ids, attn)
    state = micro.pair_state(micro.fuse(v, t, attn), attn)
    swapped_image = micro.pair_state(micro.fuse(v.flip(0), t, attn), attn)
    other_text = micro.pair_state(micro.fuse(v, micro.encode_text(ids.flip(0), attn.flip(0)), attn.flip(0)), attn.flip(0))
    assert (state - swapped_image).abs().max() > 1e-4 and (state - other_text).abs().max() > 1e-4


def test_fresh_heads_get_bert_init():
    torch.manual_seed(0)
    spec = micro_spec()
    spec["text"]["bert"]["hidden_size"] = spec["image"]["overrides"]["embed_dim"] = 256
    spec["embed_dim"] = 256
    model = create_model(ModelParams(itm_state="fusion_cls"), image_size=32, vocab_size=VOCAB, spec=spec, mim_dim=108)
    for name in ("image_proj", "text_proj", "itm_head", "mim_head"):
        layer = getattr(model, name)
        layer = layer[0] if isinstance(layer, torch.nn.Sequential) else layer
        assert abs(float(layer.weight.detach().std()) - 0.02) < 0.004, name  # PyTorch's default would be ~1/sqrt(3*256)
        assert float(layer.bias.detach().abs().max()) == 0.0, name
    dense = model.mlm_head.transform.dense
    assert abs(float(dense.weight.detach().std()) - 0.02) < 0.004 and float(dense.bias.detach().abs().max()) == 0.0
    assert abs(float(model.fusion.image_proj[0].weight.detach().std()) - 0.02) < 0.004
    assert abs(float(model.fusion.cls.detach().std()) - 0.02) < 0.01


def test_no_weight_decay_names_cover_tokens_and_embeddings():
    from dmp_core.config import TrainParams
    from dmp_core.training.schedule import build_optimizer

    model = create_model(ModelParams(itm_state="concat"), image_size=32, vocab_size=VOCAB, spec=micro_spec())
    optimizer = build_optimizer(model, TrainParams(weight_decay=0.05))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    for name in ("vision.vit.pos_embed", "vision.vit.cls_token", "vision.mask_token", "fusion.cls",
                 "fusion.type_embeddings.weight", "text.embeddings.position_embeddings.weight", "temp"):
        assert name in dict(model.named_parameters()) and name not in names, name
    assert "text.embeddings.word_embeddings.weight" in names and "itm_head.0.weight" in names
    assert not any(n.endswith(".bias") or "LayerNorm" in n or ".norm" in n for n in names)


def test_mlm_transform_is_loaded_from_a_pretrained_checkpoint(tmp_path):
    """A text tower from a BertForMaskedLM checkpoint brings its MLM transform and bias;
    a bare BertModel checkpoint (like all-MiniLM-L6-v2) leaves the head BERT-initialised."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    spec = micro_spec()
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    mlm = BertForMaskedLM(config)
    with torch.no_grad():
        mlm.cls.predictions.bias.uniform_(-1, 1)
    mlm.save_pretrained(tmp_path / "mlm")
    model = create_model(ModelParams(text_weights=str(tmp_path / "mlm")), image_size=32, vocab_size=VOCAB, spec=spec)
    transform = mlm.cls.predictions.transform
    assert torch.equal(model.mlm_head.transform.dense.weight, transform.dense.weight)
    assert torch.equal(model.mlm_head.transform.LayerNorm.weight, transform.LayerNorm.weight)
    assert torch.equal(model.mlm_head.bias, mlm.cls.predictions.bias)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "bare")
    bare = create_model(ModelParams(text_weights=str(tmp_path / "bare")), image_size=32, vocab_size=VOCAB, spec=spec)
    assert float(bare.mlm_head.bias.detach().abs().max()) == 0.0
    assert not torch.equal(bare.mlm_head.transform.dense.weight, transform.dense.weight)


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
    assert torch.allclose(micro.text_embed(t1, attn), micro.text_embed(t2, attn), atol=1e-6)  # mean pooling
    # and padding states (which differ) never enter the mean
    assert not torch.allclose(t1[~keep], t2[~keep])
    j1, j2 = micro.fuse(v, t1, attn), micro.fuse(v, t2, attn)
    joint_keep = torch.cat([torch.ones(2, 17, dtype=torch.bool), keep], dim=1)
    assert torch.allclose(j1[joint_keep], j2[joint_keep], atol=1e-6)
    assert torch.allclose(micro.itm_logits(j1, attn), micro.itm_logits(j2, attn), atol=1e-6)
    # the mask is really used: attending to padding (all-ones mask) changes the outputs
    t3 = micro.encode_text(other, torch.ones_like(attn))
    assert not torch.allclose(t1[keep], t3[keep], atol=1e-4)


def test_mlm_decoder_is_tied(micro):
    model = copy.deepcopy(micro)
    states = torch.randn(3, 32)
    model.mlm_logits(states).sum().backward()
    assert model.text.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert "mlm_head.decoder.weight" not in dict(model.named_parameters())


def test_temperature_is_clamped_in_place_after_the_step_and_keeps_its_gradient(micro):
    """ALBEF: the forward pass uses the raw parameter (a gradient even at a bound), and the
    optimiser step is followed by an in-place clamp to [0.001, 0.5]."""
    from dmp_core.losses import itc_loss

    model = copy.deepcopy(micro)
    with torch.no_grad():
        model.temp.fill_(0.5)  # at the upper bound
    emb = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    loss = itc_loss(emb, emb.flip(0), torch.arange(4), model.temperature)
    loss.backward()
    assert model.temp.grad is not None and float(model.temp.grad.abs()) > 0  # a clamp in forward would give 0
    optimizer = torch.optim.SGD([model.temp], lr=100.0)
    with torch.no_grad():
        model.temp.grad.fill_(-1.0)  # a step that pushes it above the bound
    optimizer.step()
    assert float(model.temp.detach()) > 0.5
    model.clamp_temperature_()
    assert float(model.temp.detach()) == 0.5
    with torch.no_grad():
        model.temp.fill_(-3.0)
    model.clamp_temperature_()
    assert float(model.temp.detach()) == pytest.approx(0.001)


def test_model_info_cli(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(tiny_config().model_dump(mode="json")))  # JSON is YAML
    result = CliRunner().invoke(app, ["model", "info", "--preset", "tiny", "--params", str(params)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output.strip().splitlines()[-1])
    model = create_model(ModelParams(patch_size=8), image_size=32, vocab_size=30522)
    for part in ("image_tower", "text_tower", "fusion", "heads"):
        assert counts[part] > 0
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(counts[k] for k in ("image_tower", "text_tower", "fusion", "heads"))
    bad = CliRunner().invoke(app, ["model", "info", "--preset", "nope", "--params", str(params)])
    assert bad.exit_code == 1 and "unknown preset" in bad.output


def test_text_pool_cls_reads_the_cls_state_and_mean_the_real_tokens():
    torch.manual_seed(0)
    model = create_model(ModelParams(text_pool="cls"), image_size=32, vocab_size=VOCAB, spec=micro_spec()).eval()
    assert model.text_pool == "cls" and create_model(ModelParams(), image_size=32, vocab_size=VOCAB,
                                                     spec=micro_spec()).text_pool == "mean"  # tiny's preset value
    states = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.allclose(model.text_features(states, mask), model.text_proj(states[:, 0]))
    model.text_pool = "mean"
    want = torch.stack([states[0, :3].mean(0), states[1].mean(0)])
    assert torch.allclose(model.text_features(states, mask), model.text_proj(want), atol=1e-6)


def test_tiny_text_embeddings_are_not_collapsed_at_init():
    """The root cause of a long ITC plateau: from scratch, the tiny text tower's [CLS]
    state is the same for every caption (cosine ~0.9999), so ITC starts at ln(batch) with
    next to no gradient; the mean of the token states differs between captions at once."""
    torch.manual_seed(0)
    ids = torch.randint(1000, 5000, (16, 10))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)

    def mean_cosine(pool: str) -> float:
        torch.manual_seed(0)
        model = create_model(ModelParams(text_pool=pool), image_size=64, vocab_size=30522).eval()
        with torch.no_grad():
            emb = model.text_embed(model.encode_text(ids, mask), mask)
        sim = emb @ emb.T
        return float(sim[~torch.eye(16, dtype=torch.bool)].mean())

    cls, mean = mean_cosine("cls"), mean_cosine("mean")
    assert cls > 0.999 and 1 - mean > 100 * (1 - cls), (cls, mean)
