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


def _cfg(**overrides):
    """The tiny config with step-based training lengths set explicitly."""
    lengths = dict(pretrain__steps=3, pretrain__epochs=None, finetune__steps=2, finetune__epochs=None,
                   tracking__system_metrics=False)
    return tiny_config(**{**lengths, **overrides})


# ------------------------------------------------------------------ URI resolution
def test_uri_from_params_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_tracking_uri(TrackingParams(uri="http://example:5000"), tmp_path) == "http://example:5000"
    assert tracking.resolve_tracking_uri(TrackingParams(), tmp_path) == "http://127.0.0.1:1"
    # the whole config works too (dmp_core.evaluation.retrieval passes it)
    assert tracking.resolve_tracking_uri(_cfg(tracking__uri="http://h:1")) == "http://h:1"


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
    monkeypatch.setenv("DMP_STUDY", "study-x")  # what the job runner sets (orchestration/jobs.py)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # what a pinned queue worker or Ray sets
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(tracking__uri=uri, tracking__experiment="unit")
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
    assert tags["dmp.study"] == "study-x" and tags["dmp.cuda_visible_devices"] == "3"
    assert tags["mlflow.runName"] == "brisk-lynx/pretrain"  # no repeated variant
    params = run.data.params
    assert params["objective.variant"] == "denoising"
    # real values, spelt as in params.yaml: an unset switch is "null", never ''
    assert params["objective.vicreg"] == "null" and params["objective.mim_target"] == "null"
    assert params["model.pretrained"] == "true" and params["pretrain.steps"] == "3"
    assert params["pretrain.epochs"] == "null" and params["pretrain.lr"] == str(cfg.pretrain.lr)
    assert params["targets.kinds"] == '["hog", "pixel"]' and params["pretrain.betas"] == "[0.9, 0.999]"
    # what the denoising recipe resolves to
    assert params["resolved.objectives"] == "itc,itm,mlm,mim,vicreg"
    assert params["resolved.vicreg"] == "true" and params["resolved.mrm"] == "false"
    assert params["resolved.mim_target"] == "hog" and params["resolved.itm_negatives"] == "itc"
    assert params["resolved.text_mask_ratio"] == "0.4" and params["resolved.image_mask_ratio"] == "0.75"
    assert params["resolved.needs_ema"] == "false"
    assert "" not in params.values()
    assert tags["dmp.objectives"] == "itc,itm,mlm,mim,vicreg" and tags["dmp.mim_target"] == "hog"
    hist = client.get_metric_history(tr.run_id, "loss_itc")
    assert sorted((m.step, m.value) for m in hist) == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "unit" and exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tmp_path / "mlartifacts" / tr.run_id / "artifacts" / "model" / "model.safetensors").read_bytes() == b"weights"
    assert {a.path for a in client.list_artifacts(tr.run_id)} >= {"config", "model"}
    info = tracking.read_run_json(tmp_path / "reports" / "run.json")
    assert info == {"run_id": tr.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": uri,
                    "stage": "pretrain", "environment": tracking.launch_environment()}

    # resuming continues the same run (params are not logged twice)
    tr2 = tracking.Tracker(cfg, "pretrain", run_id=tr.run_id)
    tr2.log_metrics({"loss": 0.1}, 4)
    tr2.end()
    assert tr2.run_id == tr.run_id and tr2.resumed
    assert len(client.get_metric_history(tr.run_id, "loss")) == 4


def test_resolved_objectives_filterable(monkeypatch, tmp_path):
    """Switches change the resolved params and tags; finetune's tag names what it trains;
    outside a DVC experiment the run is named workspace/<stage>."""
    from mlflow import MlflowClient

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(tracking__uri=uri, objective__variant="mamo", objective__mim_target="pixel",
               objective__vicreg=True)
    ids = {}
    for stage in ("pretrain", "finetune"):
        tr = tracking.Tracker(cfg, stage)
        tr.end()
        ids[stage] = tr.run_id
    client = MlflowClient(uri)
    pre, fin = (client.get_run(ids[s]) for s in ("pretrain", "finetune"))
    assert pre.info.run_name == "workspace/pretrain" and fin.info.run_name == "workspace/finetune"
    assert pre.data.params["objective.vicreg"] == "true" and pre.data.params["objective.mim_target"] == "pixel"
    assert pre.data.params["resolved.objectives"] == "itc,itm,mlm,mim,mrm,vicreg"
    assert pre.data.params["resolved.needs_ema"] == "true"  # MRM needs the EMA model
    assert pre.data.params["resolved.text_mask_ratio"] == "0.25"  # mamo's recipe
    assert pre.data.tags["dmp.objectives"] == "itc,itm,mlm,mim,mrm,vicreg"
    assert pre.data.tags["dmp.mim_target"] == fin.data.tags["dmp.mim_target"] == "pixel"
    assert fin.data.tags["dmp.objectives"] == "itc,itm"
    assert fin.data.tags["dmp.pretrain_objectives"] == pre.data.tags["dmp.objectives"]
    # runs can be selected by what ran
    found = client.search_runs([pre.info.experiment_id],
                               "tags.`dmp.mim_target` = 'pixel' and params.`resolved.mrm` = 'true'")
    assert {r.info.run_id for r in found} == set(ids.values())
    no_mim = _cfg(tracking__uri=uri, objective__mim=False)
    assert tracking.objective_tags(no_mim, "pretrain")["dmp.mim_target"] == "none"


def test_finetune_objectives_match_the_training_code():
    from dmp_core.training.meta_arch import LOSS_TERMS

    assert tracking.FINETUNE_OBJECTIVES == LOSS_TERMS["finetune"]


KILL_BEFORE_CHECKPOINT = """
import os, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from dmp_core import tracking
cfg = tiny_config(tracking__uri={uri!r}, tracking__system_metrics=False, pretrain__steps=3,
                  pretrain__epochs=None, finetune__steps=2, finetune__epochs=None)
tr = tracking.Tracker(cfg, "pretrain")
tracking.write_run_json({reports!r}, tr, stage="pretrain")
os.kill(os.getpid(), 9)  # killed like `kill -9` before any checkpoint: nothing ends the run
"""


def test_close_orphan_run_marks_a_killed_run(tmp_path):
    """A stage process killed before its first checkpoint leaves its MLflow run RUNNING;
    the next fresh start ends it as KILLED (once) and says so in one line."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    reports = tmp_path / "reports" / "pretrain"
    script = KILL_BEFORE_CHECKPOINT.format(tests=str(Path(__file__).parent), uri=uri, reports=str(reports))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_json = reports / "run.json"
    run_id = tracking.read_run_json(run_json)["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"

    cfg = _cfg(tracking__uri=uri)
    message = tracking.close_orphan_run(run_json, cfg)
    assert message == (f"previous run {run_id} was killed before its first checkpoint: marked KILLED; "
                       "starting from step 0")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert tracking.close_orphan_run(run_json, cfg) is None  # already ended: nothing to do

    # a finished run, a missing file, an unknown run id: left alone, no message
    tr = tracking.Tracker(cfg, "finetune")
    tr.end()
    tracking.write_run_json(tmp_path / "done", tr, stage="finetune")
    assert tracking.close_orphan_run(tmp_path / "done" / "run.json", cfg) is None
    assert client.get_run(tr.run_id).info.status == "FINISHED"
    assert tracking.close_orphan_run(tmp_path / "absent" / "run.json", cfg) is None
    (tmp_path / "bogus.json").write_text('{"run_id": "0123456789abcdef0123456789abcdef", "tracking_uri": "%s"}' % uri)
    assert tracking.close_orphan_run(tmp_path / "bogus.json", cfg) is None


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

    from dmp_core.training.loop import run_training
    from test_train import check_stage_outputs

    monkeypatch.setenv("DVC_EXP_NAME", "server-test")
    cfg = _cfg(tracking__uri=mlflow_server, pretrain__val_every=2)
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
