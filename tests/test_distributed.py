"""DDP on CPU with gloo and 2 processes: the gathered ITC and VICReg losses equal the
single-process losses on the concatenated batch (values and input gradients), and a
short 2-process ``torchrun ... -m stages pretrain`` completes with one MLflow run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from conftest import free_port, tiny_config

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
PER_RANK = 6



def _global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n = WORLD * PER_RANK
    img = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=1)
    # duplicated image ids across the two ranks' halves: positives must cross ranks
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 6, 7, 8, 2, 9])
    za, zb = torch.randn(n, 24, generator=gen), torch.randn(n, 24, generator=gen)
    return {"img": img, "txt": txt, "ids": ids, "za": za, "zb": zb}


def _losses(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from dmp_core.losses import itc_loss, vicreg_loss

    return {"itc": itc_loss(batch["img"], batch["txt"], batch["ids"], 0.07),
            "vicreg": vicreg_loss(batch["za"], batch["zb"])["loss"]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        full = _global_batch()
        local = {k: v[rank * PER_RANK:(rank + 1) * PER_RANK].clone() for k, v in full.items()}
        for k in ("img", "txt", "za", "zb"):
            local[k].requires_grad_(True)
        result = {}
        for name, loss in _losses(local).items():
            grads = torch.autograd.grad(loss, [local[k] for k in ("img", "txt", "za", "zb")], allow_unused=True)
            result[name] = {"loss": loss.detach(), "grads": [g if g is not None else None for g in grads]}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_gathered_itc_and_vicreg_equal_single_process_on_concatenated_batch(tmp_path):
    full = _global_batch()
    leaves = {k: full[k].clone().requires_grad_(True) for k in ("img", "txt", "za", "zb")}
    ref_batch = {**leaves, "ids": full["ids"]}
    reference = {}
    for name, loss in _losses(ref_batch).items():
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        reference[name] = (loss.detach(), grads)

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for name, (ref_loss, ref_grads) in reference.items():
            # every rank computes the loss of the global batch
            torch.testing.assert_close(got[name]["loss"], ref_loss, rtol=1e-6, atol=1e-6)
            for g, ref in zip(got[name]["grads"], ref_grads):
                if ref is None or not ref.abs().sum():
                    continue
                # each rank's gradient w.r.t. its own rows is WORLD x dL/dx (the all_gather
                # backward sums every rank's copy); DDP's averaging divides it back
                torch.testing.assert_close(g / WORLD, ref[rows], rtol=1e-5, atol=1e-7)


def _itm_worker(rank: int, port: int, out_dir: str, uniform: bool) -> None:
    """Each rank's local batch shows ONE image (ids all equal): within the local batch no
    ITM negative exists; from the gathered batch every row has negatives on the other rank
    (the hard ones, and with ``uniform`` the uniformly drawn ones too)."""
    from dmp_core.training.meta_arch import create_pretrainer
    from dmp_core.models import create_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # identical weights on both ranks, as DDP guarantees
        cfg = tiny_config(objective__itm_uniform_negatives=uniform, objective__itm_loss="binary")  # the seed's ITM
        model = create_model(cfg.model, image_size=cfg.data.image_size, vocab_size=30522)
        pretrainer = create_pretrainer(cfg, "finetune", model)
        gen = torch.Generator().manual_seed(rank)
        b, length = 4, cfg.data.max_tokens
        batch = {"image": torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=gen),
                 "image_id": torch.full((b,), rank), "caption_id": torch.arange(b),
                 "input_ids": torch.randint(1000, 2000, (b, length), generator=gen),
                 "attention_mask": torch.ones(b, length, dtype=torch.long)}
        seen = []
        head = pretrainer.model.itm_head
        head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
        out = pretrainer(batch)
        out["loss"].backward()
        grad = sum(float(p.grad.abs().sum()) for p in pretrainer.model.vision.parameters() if p.grad is not None)
        torch.save({"itm_rows": seen[0], "loss_itm": out["loss_itm"].detach(), "vision_grad": grad},
                   Path(out_dir) / f"itm{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("uniform", [True, False], ids=["hard+uniform", "hard"])
def test_itm_negatives_come_from_the_gathered_batch(tmp_path, uniform):
    mp.spawn(_itm_worker, args=(free_port(), str(tmp_path), uniform), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"itm{rank}.pt", weights_only=True)
        # B positives + B hard negative texts + B hard negative images (+ B uniform texts and
        # B uniform images), every negative from the other rank: a local one would be no negative
        assert got["itm_rows"] == (5 if uniform else 3) * 4
        assert torch.isfinite(got["loss_itm"]) and got["vision_grad"] > 0


def _listwise_batch(rank: int, b: int = 4, length: int = 16) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s half: 4 captions of ONE image (the image id is the rank)."""
    gen = torch.Generator().manual_seed(rank)
    return {"image": torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=gen),
            "image_id": torch.full((b,), rank), "caption_id": torch.arange(b) + rank * b,
            "input_ids": torch.randint(1000, 2000, (b, length), generator=gen),
            "attention_mask": torch.ones(b, length, dtype=torch.long)}


def _listwise_setup():
    from dmp_core.models import create_model
    from dmp_core.training.meta_arch import create_pretrainer

    torch.manual_seed(0)  # identical weights on every rank and in the reference
    cfg = tiny_config(objective__itm_loss="listwise", objective__itm_group_size=3, objective__mlm=False,
                      objective__mim=False, objective__vicreg=False)
    model = create_model(cfg.model, image_size=cfg.data.image_size, vocab_size=30522)
    pretrainer = create_pretrainer(cfg, "finetune", model)
    rows: list[int] = []
    pretrainer.model.rank_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    return pretrainer, rows


def _listwise_worker(rank: int, port: int, out_dir: str) -> None:
    """Within a rank's batch no listwise negative exists (one image); every group's
    candidates must come from the other rank's half."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        pretrainer, rows = _listwise_setup()
        out = pretrainer(_listwise_batch(rank))
        torch.save({"rows": rows[0], "loss_itm": out["loss_itm"].detach()}, Path(out_dir) / f"lw{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_listwise_groups_come_from_the_gathered_batch_and_match_one_process(tmp_path):
    mp.spawn(_listwise_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"lw{rank}.pt", weights_only=True) for rank in range(WORLD)]
    # per rank: 4 positives + 4 x 3 i2t and 4 x 3 t2i candidates, all of the other rank's image
    # or captions (a group of local candidates would be empty: the same image everywhere)
    assert [g["rows"] for g in got] == [4 * (1 + 3 + 3)] * WORLD
    pretrainer, rows = _listwise_setup()
    halves = [_listwise_batch(rank) for rank in range(WORLD)]
    reference = pretrainer({k: torch.cat([h[k] for h in halves]) for k in halves[0]})["loss_itm"]
    # equal halves: the global loss is the mean of the ranks' losses (each over its own anchors)
    torch.testing.assert_close((got[0]["loss_itm"] + got[1]["loss_itm"]) / 2, reference.detach(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(840)
def test_two_process_pretrain_with_torchrun_writes_one_mlflow_run_and_two_nodes_match(tiny_data, tmp_path):
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(tracking__uri=store, tracking__experiment="ddp", pretrain__steps=3,
                      pretrain__checkpoint_every=2)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # the stage relaunches itself under `torchrun --standalone` (DMP_NPROC_PER_NODE, what
    # `dmp study --gpus-per-exp 2` sets)
    cmd = [sys.executable, "-m", "stages", "pretrain", "--params", str(params), "--prepared", str(tiny_data["prepared"]),
           "--targets", str(tiny_data["targets"]), "--models", str(tmp_path / "models"),
           "--reports", str(tmp_path / "reports")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU
           "DMP_NPROC_PER_NODE": str(WORLD)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "relaunching under torchrun" in done.stderr and "world size 2" in done.stderr

    metrics = json.loads((tmp_path / "reports" / "pretrain" / "metrics.json").read_text())
    assert metrics["steps"] == 3  # 96 pairs / (8 per rank x 2 ranks) = 6 steps per epoch, capped at 3
    latest = json.loads((tmp_path / "models" / "pretrain" / "checkpoints" / "latest.json").read_text())
    assert latest["done"] and latest["fingerprint"]["world_size"] == 2
    state = torch.load(tmp_path / "models" / "pretrain" / "checkpoints" / latest["state"], weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("ddp")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 only
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss_itc")) == [1, 2, 3]

    # the same run on two "nodes" of one process each (c10d rendezvous on localhost, gloo):
    # the same world of two ranks, so the same loss history, value for value
    port = free_port()
    nodes = []
    for node in range(2):
        out = tmp_path / f"node{node}"
        node_params = tmp_path / f"params{node}.yaml"
        node_cfg = tiny_config(tracking__uri=f"sqlite:///{out}/mlflow.db", tracking__experiment="ddp",
                               pretrain__steps=3, pretrain__checkpoint_every=2)
        out.mkdir()
        node_params.write_text(yaml.safe_dump(node_cfg.model_dump(mode="json")))
        node_cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
                    "-m", "stages", "pretrain", "--params", str(node_params), "--prepared", str(tiny_data["prepared"]),
                    "--targets", str(tiny_data["targets"]), "--models", str(out / "models"),
                    "--reports", str(out / "reports")]
        nodes.append(subprocess.Popen(node_cmd, cwd=ROOT, env={k: v for k, v in env.items() if k != "DMP_NPROC_PER_NODE"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [node.communicate(timeout=400)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-2000:] for log in logs)
    written = [tmp_path / f"node{n}" / "reports" / "pretrain" / "history.csv" for n in range(2)]
    assert sum(path.is_file() for path in written) == 1  # rank 0's node writes the outputs
    one_node = pd.read_csv(tmp_path / "reports" / "pretrain" / "history.csv")
    two_nodes = pd.read_csv(next(path for path in written if path.is_file()))
    losses = ["step", "lr"] + [c for c in one_node.columns if c.startswith("loss")]
    pd.testing.assert_frame_equal(two_nodes[losses], one_node[losses])
