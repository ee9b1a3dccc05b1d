"""MLflow tracking: URI resolution (incl. DVC experiment copies) and real stores
(a SQLite file and a real ``mlflow server`` on 127.0.0.1) read back with MlflowClient."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dmp_core import tracking
from dmp_core.config import TrackingParams
from conftest import free_port, tiny_config

VENV_BIN = Path(sys.executable).parent


# ------------------------------------------------------------------ URI resolution
def test_uri_from_params_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_tracking_uri(TrackingParams(uri="http://example:5000"), tmp_path) == "http://example:5000"
    assert tracking.resolve_tracking_uri(TrackingParams(), tmp_path) == "http://127.0.0.1:1"
    # the whole config works too (dmp_core.evaluate passes it)
    assert tracking.resolve_tracking_uri(tiny_config(tracking__uri="http://h:1")) == "http://h:1"


def test_default_uri_is_absolute_sqlite_at_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.resolve_tracking_uri(TrackingParams(), "/somewhere/else") == f"sqlite:///{tmp_path}/mlflow.db"


@pytest.mark.parametrize("inside", [".dvc/tmp/exps/tmp52r7oh7y", ".dvc/tmp/exps/standalone/tmpkzn11sia/sub"])
def test_queued_experiment_copy_maps_to_real_root(monkeypatch, tmp_path, inside):
    """Queued (exps/tmpX) and --temp (exps/standalone/tmpX) runs log to the real store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / inside
    copy.mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking.project_root(copy) == tmp_path
    # DVC_ROOT pointing into the copy (older DVC versions) is mapped back too
    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert tracking.resolve_tracking_uri(TrackingParams(), copy) == f"sqlite:///{tmp_path}/mlflow.db"
    # a relative sqlite URI is anchored at the real root, not the copy
    assert tracking.resolve_tracking_uri(TrackingParams(uri="sqlite:///runs.db"), copy) == f"sqlite:///{tmp_path}/runs.db"


def test_git_toplevel_without_dvc(monkeypatch, tmp_path):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    assert tracking.project_root(sub) == tmp_path.resolve()


def test_artifact_location_beside_sqlite(tmp_path):
    assert tracking.artifact_location_for(f"sqlite:///{tmp_path}/m.db") == (tmp_path / "mlartifacts").as_uri()
    assert tracking.artifact_location_for("http://127.0.0.1:5000") is None


# ------------------------------------------------------------------ a real SQLite store
def test_tracker_sqlite_roundtrip(monkeypatch, tmp_path):
    from mlflow import MlflowClient

    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lynx")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(tracking__uri=uri, tracking__experiment="unit")
    tr = tracking.Tracker(cfg, "pretrain", upstream_run_id="up-1")
    for step in range(1, 4):
        tr.log_metrics({"loss": 1.0 / step, "loss_itc": 2.0 / step}, step)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    tr.log_artifact(weights, "model")
    tr.end()
    tracking.write_run_json(tmp_path / "reports", tr, stage="pretrain")

    client = MlflowClient(uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["dmp.stage"] == "pretrain" and tags["dmp.variant"] == "denoising"
    assert tags["dmp.model_preset"] == "tiny" and tags["dmp.upstream_run_id"] == "up-1"
    assert tags["dvc.exp_name"] == "brisk-lynx" and tags["dvc.baseline_rev"] == "abc123"
    assert run.data.params["objective.variant"] == "denoising"
    hist = client.get_metric_history(tr.run_id, "loss_itc")
    assert sorted((m.step, m.value) for m in hist) == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "unit" and exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tmp_path / "mlartifacts" / tr.run_id / "artifacts" / "model" / "model.safetensors").read_bytes() == b"weights"
    assert {a.path for a in client.list_artifacts(tr.run_id)} >= {"config", "model"}
    info = tracking.read_run_json(tmp_path / "reports" / "run.json")
    assert info == {"run_id": tr.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": uri,
                    "stage": "pretrain"}

    # resuming continues the same run (params are not logged twice)
    tr2 = tracking.Tracker(cfg, "pretrain", run_id=tr.run_id)
    tr2.log_metrics({"loss": 0.1}, 4)
    tr2.end()
    assert tr2.run_id == tr.run_id and tr2.resumed
    assert len(client.get_metric_history(tr.run_id, "loss")) == 4


# ------------------------------------------------------------------ a real mlflow server

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free 127.0.0.1 port; stopped by PID afterwards."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 9)  # the server's own process group (its uvicorn worker too)
    proc.wait()
    log.close()


@pytest.mark.slow
def test_pretrain_then_finetune_logged_to_server(mlflow_server, tiny_data, tmp_path, monkeypatch):
    """Both stages against a real server: tags, per-step metric histories, weights artifact,
    and finetune's upstream tag pointing at the pretrain run."""
    from mlflow import MlflowClient

    from dmp_core.train import run_training
    from test_train import check_stage_outputs

    monkeypatch.setenv("DVC_EXP_NAME", "server-test")
    cfg = tiny_config(tracking__uri=mlflow_server, pretrain__max_steps=3, pretrain__val_every=2,
                      finetune__max_steps=2)
    models, reports = tmp_path / "models", tmp_path / "reports"
    pre = run_training(cfg, "pretrain", prepared_dir=tiny_data["prepared"], targets_dir=tiny_data["targets"],
                       out_dir=models / "pretrain", reports_dir=reports / "pretrain")
    fin = run_training(cfg, "finetune", prepared_dir=tiny_data["prepared"], targets_dir=None,
                       out_dir=models / "finetune", reports_dir=reports / "finetune",
                       init_weights=models / "pretrain" / "model.safetensors",
                       upstream_run=reports / "pretrain" / "run.json")
    assert pre["steps"] == 3 and fin["steps"] == 2
    check_stage_outputs(cfg, "pretrain", models, reports, cfg.objective.resolve().active)
    check_stage_outputs(cfg, "finetune", models, reports, ["itc", "itm"])

    client = MlflowClient(mlflow_server)
    pre_run = client.get_run(tracking.read_run_json(reports / "pretrain" / "run.json")["run_id"])
    fin_run = client.get_run(tracking.read_run_json(reports / "finetune" / "run.json")["run_id"])
    assert pre_run.info.status == fin_run.info.status == "FINISHED"
    assert pre_run.info.experiment_id == fin_run.info.experiment_id
    assert client.get_experiment(pre_run.info.experiment_id).name == "dmp-synthetic"
    assert pre_run.data.tags["dmp.stage"] == "pretrain" and fin_run.data.tags["dmp.stage"] == "finetune"
    assert pre_run.data.tags["dvc.exp_name"] == "server-test"
    assert fin_run.data.tags["dmp.upstream_run_id"] == pre_run.info.run_id
    assert "dmp.upstream_run_id" not in pre_run.data.tags

    active = ["loss"] + [f"loss_{name}" for name in cfg.objective.resolve().active] + ["lr"]
    for key in active:
        steps = [m.step for m in client.get_metric_history(pre_run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3], key
    assert sorted(m.step for m in client.get_metric_history(fin_run.info.run_id, "loss_itm")) == [1, 2]
    assert len(client.get_metric_history(pre_run.info.run_id, "val_r_mean")) >= 1

    local = client.download_artifacts(fin_run.info.run_id, "model/model.safetensors", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (models / "finetune" / "model.safetensors").read_bytes()
