"""Checkpoints: round trip, refusal of mismatched/corrupt ones (one line), retraining over
a finished run with other params, rerunning a finished run, and the kill test: a run
SIGKILLed mid-training and restarted ends exactly like an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from dmp_core.training.checkpoint import Checkpointer, make_fingerprint, run_params
from dmp_core.errors import CheckpointError
from dmp_core.training.loop import MACHINE_METRICS, run_training

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


# ------------------------------------------------------------------ unit level
def _checkpointer(folder, cfg=None, stage="pretrain", n_train=96, world_size=1):
    cfg = cfg or tiny_config()
    return Checkpointer(folder, make_fingerprint(cfg, stage, n_train=n_train, world_size=world_size),
                        run_params(cfg, stage))


def _save(ck, module, step=4, done=False):
    ck.save_best(module)
    ck.save(module, {"optimizer": {}, "note": "x"}, step=step, done=done, run_id="r1", best_step=step)


def test_roundtrip_and_only_the_last_step_kept(tmp_path):
    torch.manual_seed(0)
    module, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ck = _checkpointer(tmp_path)
    _save(ck, module, step=2)
    module.weight.data += 1
    _save(ck, module, step=4)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000004.pt", "step_0000004.safetensors"]
    resume = ck.load(other)
    assert resume.step == 4 and not resume.done and resume.run_id == "r1" and resume.state["note"] == "x"
    assert torch.equal(other.weight, module.weight)


@pytest.mark.parametrize("change, key", [
    (dict(objective__variant="mamo"), "variant="),
    (dict(model__preset="minilm"), "preset="),
    (dict(model__embed_dim=64), "model.embed_dim="),
    (dict(objective__vicreg_coeffs__expander_dim=32), "objective.vicreg_coeffs.expander_dim="),
    (dict(pretrain__lr=2e-3), "pretrain.lr="),
])
def test_unfinished_mismatched_checkpoint_is_refused(tmp_path, change, key):
    _save(_checkpointer(tmp_path), torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError) as info:
        _checkpointer(tmp_path, tiny_config(**change)).load(torch.nn.Linear(3, 2))
    msg = str(info.value)
    assert "\n" not in msg and key in msg and str(tmp_path / "latest.json") in msg


def test_other_stage_data_size_or_world_size_refused(tmp_path):
    _save(_checkpointer(tmp_path), torch.nn.Linear(3, 2))
    for kwargs, key in ((dict(stage="finetune"), "stage="), (dict(n_train=97), "n_train="),
                        (dict(world_size=2), "world_size=")):
        with pytest.raises(CheckpointError, match=key):
            _checkpointer(tmp_path, **kwargs).load(torch.nn.Linear(3, 2))


def test_logging_cadence_is_not_a_mismatch(tmp_path):
    _save(_checkpointer(tmp_path), torch.nn.Linear(3, 2))
    cfg = tiny_config(pretrain__log_every=7, pretrain__num_workers=2, pretrain__checkpoint_every=9,
                      data__root="/elsewhere")
    assert _checkpointer(tmp_path, cfg).load(torch.nn.Linear(3, 2)).step == 4


def test_finished_checkpoint_with_other_params_starts_over(tmp_path):
    _save(_checkpointer(tmp_path), torch.nn.Linear(3, 2), done=True)
    assert _checkpointer(tmp_path, tiny_config(objective__variant="mamo")).load(torch.nn.Linear(3, 2)) is None
    assert not tmp_path.exists()


def test_shape_mismatch_in_weights_refused(tmp_path):
    _save(_checkpointer(tmp_path), torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="step_0000004.safetensors"):
        _checkpointer(tmp_path).load(torch.nn.Linear(5, 2))


@pytest.mark.parametrize("damage", ["latest_json", "weights", "state"])
def test_corrupt_checkpoint_refused(tmp_path, damage):
    _save(_checkpointer(tmp_path), torch.nn.Linear(3, 2))
    target = {"latest_json": tmp_path / "latest.json", "weights": tmp_path / "step_0000004.safetensors",
              "state": tmp_path / "step_0000004.pt"}[damage]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        _checkpointer(tmp_path).load(torch.nn.Linear(3, 2))
    assert "\n" not in str(info.value) and str(target) in str(info.value)


def test_stray_files_without_commit_record_are_ignored(tmp_path):
    (tmp_path / "step_0000002.safetensors").write_bytes(b"half")
    assert _checkpointer(tmp_path).load(torch.nn.Linear(3, 2)) is None


# ------------------------------------------------------------------ real runs
def _args(cfg, tiny_data, tmp, store):
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return [sys.executable, "-m", "stages", "pretrain", "--params", str(params),
            "--prepared", str(tiny_data["prepared"]), "--targets", str(tiny_data["targets"]),
            "--models", str(tmp / "models"), "--reports", str(tmp / "reports")]


def _env(store):
    # CPU only: bit-identical results are the CPU guarantee (deterministic kernels)
    return {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_result(tiny_data, tmp_path, store):
    """2 epochs x 6 steps, checkpoint every 2, val every 5 (mid-epoch), one persistent data
    worker (as in params.yaml); SIGKILL once a checkpoint exists, delete the non-persistent
    outputs (as DVC does), run again."""
    cfg = tiny_config(pretrain__steps=None, pretrain__epochs=2, pretrain__captions="all", pretrain__batch_size=16,
                      pretrain__checkpoint_every=2,
                      pretrain__val_every=5, pretrain__log_every=50, pretrain__num_workers=1)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir(), clean.mkdir()

    proc = subprocess.Popen(_args(cfg, tiny_data, killed, store), cwd=ROOT, env=_env(store),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / "models" / "pretrain" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            record = json.loads(latest.read_text())
        except (OSError, json.JSONDecodeError):
            record = None
        if record and record["step"] >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    record = json.loads(latest.read_text())
    assert not record["done"] and record["step"] < 12
    first_run_id = json.loads((killed / "reports" / "pretrain" / "run.json").read_text())["run_id"]
    for path in (killed / "reports").rglob("*"):  # DVC deletes non-persistent outs before a run
        if path.is_file():
            path.unlink()

    resumed = subprocess.run(_args(cfg, tiny_data, killed, store), cwd=ROOT, env=_env(store),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {latest} at step {record['step']}/12" in resumed.stderr
    # the uninterrupted reference: the same command, same threads, same seed
    reference = subprocess.run(_args(cfg, tiny_data, clean, store), cwd=ROOT, env=_env(store),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]

    a = load_file(killed / "models" / "pretrain" / "model.safetensors")
    b = load_file(clean / "models" / "pretrain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((killed / "reports" / "pretrain" / "metrics.json").read_text())
    mb = json.loads((clean / "reports" / "pretrain" / "metrics.json").read_text())
    for key in MACHINE_METRICS:
        ma.pop(key), mb.pop(key)
    assert ma == mb and ma["steps"] == 12
    ha = pd.read_csv(killed / "reports" / "pretrain" / "history.csv").drop(columns="pairs_per_s")
    hb = pd.read_csv(clean / "reports" / "pretrain" / "history.csv").drop(columns="pairs_per_s")
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    # the resumed run continued the killed run's MLflow run
    assert json.loads((killed / "reports" / "pretrain" / "run.json").read_text())["run_id"] == first_run_id
    from mlflow import MlflowClient

    run = MlflowClient(store).get_run(first_run_id)
    assert run.info.status == "FINISHED"
    assert max(m.step for m in MlflowClient(store).get_metric_history(first_run_id, "loss")) == 12


@pytest.mark.slow
def test_rerunning_a_finished_run_rewrites_outputs_without_training(tiny_data, tmp_path, store):
    from mlflow import MlflowClient

    cfg = tiny_config(tracking__uri=store, tracking__experiment="rerun", pretrain__steps=2)
    kw = dict(prepared_dir=tiny_data["prepared"], targets_dir=tiny_data["targets"],
              out_dir=tmp_path / "models", reports_dir=tmp_path / "reports")
    first = run_training(cfg, "pretrain", **kw)
    weights = (tmp_path / "models" / "model.safetensors").read_bytes()
    history = (tmp_path / "reports" / "history.csv").read_text()
    run_json = (tmp_path / "reports" / "run.json").read_text()
    for path in [tmp_path / "models" / "model.safetensors", *(tmp_path / "reports").iterdir()]:
        path.unlink()
    again = run_training(cfg, "pretrain", **kw)
    assert again == first
    assert (tmp_path / "models" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "reports" / "history.csv").read_text() == history
    assert json.loads((tmp_path / "reports" / "run.json").read_text()) == json.loads(run_json)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("rerun")
    assert len(client.search_runs([exp.experiment_id])) == 1  # no second MLflow run

    # other params over the finished run: trained afresh (new run), no refusal
    cfg2 = tiny_config(tracking__uri=store, tracking__experiment="rerun", pretrain__steps=3)
    assert run_training(cfg2, "pretrain", **kw)["steps"] == 3
    assert len(client.search_runs([exp.experiment_id])) == 2
