"""``dmp bench step``: wall time of full pretraining steps (forward, backward, AdamW,
EMA update where present) on random batches shaped like the real ones."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from dmp_core.config import Config, ParamsError, config_from_dict, preset_spec
from dmp_core.training.meta_arch import create_pretrainer
from dmp_core.training.schedule import build_optimizer
from dmp_core.training.loop import cpu_has_native_bf16, peak_rss_mb, use_bf16
from dmp_core.models import model_from_config

MINILM_VOCAB = 30522


def random_batch(cfg: Config, batch: int, *, patch: int, vocab_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch with PairDataset's keys: 2 captions per image, random caption lengths, both targets."""
    size, length = cfg.data.image_size, cfg.data.max_tokens
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    ids = torch.randint(1000, vocab_size, (batch, length), generator=generator)
    lengths = torch.randint(4, length + 1, (batch,), generator=generator)
    positions = torch.arange(length)[None, :]
    attention = (positions < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(batch), lengths - 1] = 102
    ids = ids * attention
    n_patches = (size // patch) ** 2
    hog_dim = 3 * cfg.targets.hog.bins * (patch // cfg.targets.hog.cell) ** 2
    return {
        "image": images, "image_id": torch.arange(batch) // 2, "caption_id": torch.arange(batch),
        "input_ids": ids, "attention_mask": attention,
        "hog": torch.rand(batch, n_patches, hog_dim, generator=generator),
        "pixel": torch.rand(batch, n_patches, patch * patch * 3, generator=generator),
    }


def bench_step(cfg: Config, variant: str, preset: str, batch: int, steps: int, warmup: int, amp: str = "auto",
               image_size: int | None = None) -> dict[str, Any]:
    """Time ``steps`` optimiser steps after ``warmup`` untimed ones; random init (no network).
    ``amp`` as ``pretrain.amp`` (auto: bf16 where :func:`use_bf16` says it pays)."""
    if steps < 1 or batch < 2 or warmup < 0:
        raise ParamsError(f"bench step: need steps >= 1, batch >= 2, warmup >= 0 (got {steps}, {batch}, {warmup})")
    raw = cfg.model_dump(mode="json")
    raw["objective"]["variant"] = variant
    raw["model"].update(preset=preset, pretrained=False, image_weights=None, text_weights=None)
    raw["targets"]["patch"] = None  # the preset's patch size
    raw["targets"]["hog"]["cell"] = preset_spec(preset)["image"]["patch_size"] // 2
    raw["pretrain"]["batch_size"] = batch
    raw["pretrain"]["amp"] = amp
    if image_size:
        raw["data"]["image_size"] = image_size
    cfg = config_from_dict(raw, source="bench step")
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_config(cfg, MINILM_VOCAB)
    pretrainer = create_pretrainer(cfg, "pretrain", model).to(device).train()
    params = [p for p in pretrainer.parameters() if p.requires_grad]
    optimizer = build_optimizer(pretrainer, cfg.pretrain)  # the training loop's AdamW (fused, decay groups)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = random_batch(cfg, batch, patch=model.patch_size, vocab_size=MINILM_VOCAB, generator=gen)
    data = {k: v.to(device) for k, v in data.items()}
    bf16 = use_bf16(cfg.pretrain.amp, device, preset)

    counter = [0]

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = pretrainer(data)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        pretrainer.model.clamp_temperature_()
        counter[0] += 1
        pretrainer.update_ema(counter[0])
        return float(out["loss"].detach())

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times, loss = [], 0.0
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()  # float() of the loss synchronises the device
        times.append(time.perf_counter() - start)
    cpu_seconds = time.process_time() - cpu_start
    seconds = sum(times)
    return {
        "bench": "step", "variant": variant, "preset": preset, "batch": batch, "steps": steps,
        "image_size": cfg.data.image_size, "max_tokens": cfg.data.max_tokens,
        "objectives": pretrainer.objectives.active, "ema": pretrainer.ema is not None,
        # the minimum is the figure least disturbed by other processes on a shared machine
        "s_per_step": round(seconds / max(steps, 1), 4), "s_per_step_min": round(min(times), 4),
        "s_per_step_median": round(statistics.median(times), 4), "pairs_per_s": round(batch * steps / seconds, 1),
        # process CPU time (all threads): with 1 thread, a figure other processes barely disturb
        "cpu_s_per_step": round(cpu_seconds / steps, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1), "torch_threads": torch.get_num_threads(),
        "device": str(device), "bf16": bf16, "cpu_native_bf16": cpu_has_native_bf16(), "final_loss": round(loss, 4),
        "params_trainable": sum(p.numel() for p in params),
    }
