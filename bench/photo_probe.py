"""How much do the two pretrained towers of ``effnet_lite0_minilm`` carry, and which text
state should ITC read? Frozen features, two linear projections trained with ITC (LiT).

Encodes the prepared train/val photos once with EfficientNet-Lite0 (the pooled final map,
exactly the tower's [CLS]-like token) and the captions with MiniLM, keeping several text
states (the [CLS] or the masked mean after 4, 5 or 6 layers; captions cleaned as the
prepared data or raw), then trains ``image_proj`` / ``text_proj`` (to 256-d, learned
temperature, AdamW, 10% warmup then constant) with the symmetric ITC loss and prints the
val R mean for each learning rate and step count, one JSON line per setting.

    python bench/photo_probe.py --prepared data/prepared   # a prepared photo set (photo_cnn recipe)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dmp_core.config import preset_spec
from dmp_core.data.text import load_tokenizer
from dmp_core.losses.itc import itc_loss
from dmp_core.models.cnn import CNNTower
from dmp_core.models.model import masked_mean
from dmp_core.models.text import load_bert
from dmp_core.training.loop import itc_recall

PRESET = "effnet_lite0_minilm"


@torch.no_grad()
def image_features(split: Path, batch: int = 64) -> torch.Tensor:
    images = np.load(split / "images.npy", mmap_mode="r")
    tower = CNNTower(preset_spec(PRESET)["image"], image_size=images.shape[1], pretrained=True).eval()
    mean, std = (torch.tensor(tower.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    out = []
    for lo in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[lo:lo + batch])).permute(0, 3, 1, 2).float() / 255.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(tower((x - mean) / std)[:, 0].float())
    return torch.cat(out)


@torch.no_grad()
def text_features(split: Path, raw: bool, batch: int = 128) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    captions = pd.read_parquet(split / "captions.parquet")
    tokenizer = load_tokenizer("minilm")
    texts = captions["raw" if raw else "clean"].tolist()
    bert = load_bert(preset_spec(PRESET)["text"], vocab_size=tokenizer.vocab_size, pretrained=True, weights=None).eval()
    states: dict[str, list[torch.Tensor]] = {}
    for lo in range(0, len(texts), batch):
        enc = tokenizer(texts[lo:lo + batch], padding=True, truncation=True, max_length=32, return_tensors="pt",
                        return_token_type_ids=False)
        out = bert(**enc, output_hidden_states=True)
        for layers in (4, 5, 6):
            states.setdefault(f"mean{layers}", []).append(masked_mean(out.hidden_states[layers], enc["attention_mask"]))
        states.setdefault("cls4", []).append(out.hidden_states[4][:, 0])
    return {k: torch.cat(v) for k, v in states.items()}, captions["image_index"].to_numpy()


def train_probe(img: torch.Tensor, txt: torch.Tensor, txt2img: np.ndarray, val: tuple, *, lr: float,
                steps: list[int], batch: int = 32, seed: int = 0) -> dict[int, float]:
    torch.manual_seed(seed)
    img_proj, txt_proj = torch.nn.Linear(img.shape[1], 256), torch.nn.Linear(txt.shape[1], 256)
    temp = torch.nn.Parameter(torch.tensor(0.07))
    params = [*img_proj.parameters(), *txt_proj.parameters(), temp]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, int(0.1 * max(steps)))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(txt), generator=gen)
    out, pos = {}, 0
    for step in range(1, max(steps) + 1):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(txt), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warm)
        ids = torch.from_numpy(txt2img[idx.numpy()])
        loss = itc_loss(F.normalize(img_proj(img[ids]), dim=-1), F.normalize(txt_proj(txt[idx]), dim=-1), ids, temp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            temp.clamp_(0.001, 0.5)
        if step in steps:
            with torch.no_grad():
                v_img, v_txt, v_t2i = val
                out[step] = itc_recall(F.normalize(img_proj(v_img), dim=-1), F.normalize(txt_proj(v_txt), dim=-1),
                                       v_t2i)["r_mean"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    parser.add_argument("--steps", default="150,250,600")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    img = {s: image_features(args.prepared / s) for s in ("train", "val")}
    print(json.dumps({"image_features_s": round(time.perf_counter() - start, 1)}), flush=True)
    steps = [int(s) for s in args.steps.split(",")]
    for raw in (False, True):
        (train_txt, train_t2i), (val_txt, val_t2i) = (text_features(args.prepared / s, raw) for s in ("train", "val"))
        for state in train_txt:
            for lr in (float(x) for x in args.lrs.split(",")):
                runs = [train_probe(img["train"], train_txt[state], train_t2i, (img["val"], val_txt[state], val_t2i),
                                    lr=lr, steps=steps, seed=seed) for seed in range(args.seeds)]
                print(json.dumps({"captions": "raw" if raw else "clean", "text_state": state, "lr": lr,
                                  **{f"val_r_mean@{k}": round(float(np.mean([r[k] for r in runs])), 1) for k in steps}}),
                      flush=True)


if __name__ == "__main__":
    main()
