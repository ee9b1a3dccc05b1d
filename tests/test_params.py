"""params.yaml, the schema and docs/PARAMS.md agree; `dmp check` (the pipeline's first
stage) validates, summarises and refuses a typo in one line.

- docs/PARAMS.md is what `dmp params doc` generates from the schema today;
- every key params.yaml lists is a schema key holding the schema default (one source of defaults);
- params.yaml is byte-identical to what DVC writes when it rewrites the file, so
  `dvc exp run -S ...` changes only the lines of the keys it sets (checked with DVC's own writer).
"""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dmp_core.config import Config, ParamsError, config_from_dict, flatten, load_config
from stages import check as check_mod
from dmp_core import params_doc
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


# ------------------------------------------------------------------ one source of defaults
def test_params_doc_is_up_to_date() -> None:
    expected = params_doc.render(PARAMS)
    actual = (ROOT / "docs" / "PARAMS.md").read_text()
    assert actual == expected, "docs/PARAMS.md is stale: run `dmp params doc`"
    result = CliRunner().invoke(app, ["params", "doc", "--check", "--params", str(PARAMS),
                                      "--out", str(ROOT / "docs" / "PARAMS.md")])
    assert result.exit_code == 0, result.output


def test_params_doc_lists_every_schema_key(tmp_path) -> None:
    text = params_doc.render(PARAMS)
    defaults = flatten(Config())
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == set(defaults)
    assert "| `objective.variant` | mamo \\| denoising \\| frozen | `denoising` | yes |" in rows["objective.variant"]
    assert "| `finetune.steps` | int \\| null (>= 1) | `100` | yes |" in rows["finetune.steps"]  # FinetuneParams, not TrainParams (500)
    assert "| `pretrain.epochs` | int \\| null (>= 1) | `null` |  |" in rows["pretrain.epochs"]
    assert "share of the run" in rows["pretrain.warmup"]  # the comment beside the field in config.py
    # --check fails on a stale file, then the command rewrites it
    stale = tmp_path / "PARAMS.md"
    stale.write_text("old\n")
    runner = CliRunner()
    result = runner.invoke(app, ["params", "doc", "--check", "--out", str(stale), "--params", str(PARAMS)])
    assert result.exit_code == 1 and "out of date" in result.output
    assert runner.invoke(app, ["params", "doc", "--out", str(stale), "--params", str(PARAMS)]).exit_code == 0
    assert stale.read_text() == text


def test_field_comments_beside_or_above() -> None:
    source = '''
class A:
    # a block above
    # over two lines
    x: int = 1
    y: str = "a"  # beside
    z: float = 0.5

    w: int = 2  # beside wins
'''
    assert params_doc.field_comments(source) == {
        ("A", "x"): "a block above over two lines", ("A", "y"): "beside", ("A", "w"): "beside wins"}


def test_params_yaml_keys_hold_schema_defaults() -> None:
    defaults = flatten(Config())
    listed = flatten(yaml.safe_load(PARAMS.read_text()))
    leaves = {k: v for k, v in listed.items() if v != {}}  # `targets: {}`: a section with nothing listed
    unknown = sorted(set(leaves) - set(defaults))
    assert not unknown, f"params.yaml keys missing from the schema: {unknown}"
    differ = {k: (v, defaults[k]) for k, v in leaves.items() if v != defaults[k]}
    assert not differ, f"params.yaml values that differ from the schema defaults (yaml, schema): {differ}"
    assert load_config(PARAMS) == Config()


def test_params_yaml_is_formatted_as_dvc_writes_it() -> None:
    """DVC rewrites params.yaml with ruamel's round-trip writer on every `dvc exp run -S`."""
    from dvc.utils.serialize._yaml import dumps_yaml, parse_yaml_for_update

    text = PARAMS.read_text()
    assert dumps_yaml(parse_yaml_for_update(text, str(PARAMS))) == text


@pytest.mark.parametrize("overrides,changed", [
    (["objective.vicreg=false"], {"-  vicreg:", "+  vicreg: false"}),
    (["objective.variant=mamo", "++pretrain.warmup=0.2"], {"-  variant: denoising", "+  variant: mamo", "+  warmup: 0.2"}),
    (["pretrain.steps=null", "++pretrain.epochs=2"], {f"-  steps: {load_config(PARAMS).pretrain.steps}", "+  steps:", "+  epochs: 2"}),
])
def test_dvc_set_param_changes_only_its_lines(tmp_path, overrides, changed) -> None:
    """What `dvc exp run -S` writes (DVC's own apply_overrides) differs only in the keys set."""
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    shutil.copyfile(PARAMS, copy)
    apply_overrides(copy, overrides)
    diff = [line for line in difflib.unified_diff(PARAMS.read_text().splitlines(), copy.read_text().splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    # compare without the trailing comments DVC keeps in place
    assert {line.split("#")[0].rstrip() for line in diff} == changed
    load_config(copy)  # and the result is valid


# ------------------------------------------------------------------ dmp check
def _check(params: Path, marker: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "DVC_EXP_NAME"} | env
    return subprocess.run([sys.executable, "-m", "stages", "check", "--params", str(params), "--marker", str(marker)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=full_env)


def _edited(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / name
    shutil.copyfile(PARAMS, path)
    apply_overrides(path, overrides)
    return path


def test_check_summarises_and_writes_a_constant_marker(tmp_path) -> None:
    marker = tmp_path / "data" / "params.ok"
    proc = _check(PARAMS, marker)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and line.startswith("dmp check: ")
    for part in ("variant denoising", "objectives itc,itm,mlm,mim,vicreg", "MIM target hog",
                 "mask ratios image 0.75 / text 0.4", "model tiny", f"pretrain {load_config(PARAMS).pretrain.steps} steps",
                 f"finetune {load_config(PARAMS).finetune.steps} steps"):
        assert part in line, (part, line)
    first = marker.read_bytes()

    other = _edited(tmp_path, "mamo.yaml", ["objective.variant=mamo", "objective.mim_target=pixel",
                                             "pretrain.steps=null", "++pretrain.epochs=2"])
    proc = _check(other, marker)
    assert proc.returncode == 0, proc.stderr
    for part in ("variant mamo", "objectives itc,itm,mlm,mim,mrm", "MIM target pixel", "text 0.25", "pretrain 2 epochs"):
        assert part in proc.stdout, (part, proc.stdout)
    assert marker.read_bytes() == first  # a passing check never invalidates downstream stages


@pytest.mark.parametrize("overrides,needle", [
    (["++objective.vicerg=false"], "objective.vicerg"),
    (["++data.synthetic.n_trian=10"], "data.synthetic.n_trian"),
    (["data.image_size=63"], "data.image_size"),  # a cross-field check (patch size 8), at load
    (["objective.variant=denoisin"], "objective.variant"),
    (["++objective.mrm=true"], "mrm"),  # impossible without the EMA model of mamo
])
def test_check_refuses_bad_params_in_one_line(tmp_path, overrides, needle) -> None:
    bad = _edited(tmp_path, "params.yaml", overrides)
    marker = tmp_path / "params.ok"
    proc = _check(bad, marker)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dmp check: error: ") and needle in lines[0] and str(bad) in lines[0]
    assert not marker.exists()
    assert proc.stdout == ""


def test_check_under_a_workspace_experiment_says_how_to_undo(tmp_path, monkeypatch) -> None:
    bad = _edited(tmp_path, "params.yaml", ["++objective.vicerg=false"])
    proc = _check(bad, tmp_path / "params.ok", DVC_EXP_NAME="lusty-fern")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1
    assert "objective.vicerg" in lines[0] and f"git checkout {bad}" in lines[0]
    # a --temp / queued experiment runs in a copy: the user's params.yaml is untouched
    monkeypatch.setenv("DVC_EXP_NAME", "lusty-fern")
    assert check_mod.in_workspace_experiment(tmp_path)
    assert not check_mod.in_workspace_experiment(tmp_path / ".dvc/tmp/exps/standalone/tmpab12")


# ------------------------------------------------------------------ recipes
def test_every_recipe_is_valid_on_the_default_params_and_applies_as_dvc_would(tmp_path) -> None:
    """A recipe's `-S ++key=value` arguments, applied by DVC's own override code, give the
    config that the recipe names (and a recipe with a bad key is refused by name)."""
    from dvc.utils.hydra import apply_overrides

    from dmp_core.config import apply_dotted, load_recipe, recipe_names
    from dmp_core.params_doc import recipe_overrides

    assert recipe_names(), "no recipe in dmp_core/recipes/"
    base = yaml.safe_load(PARAMS.read_text())
    for name in recipe_names():
        recipe = load_recipe(name)
        copy = tmp_path / f"{name}.yaml"
        shutil.copyfile(PARAMS, copy)
        apply_overrides(copy, recipe_overrides(name))
        applied = flatten(load_config(copy))
        for key, value in recipe.items():
            assert applied[key] == value, (name, key)
        assert load_config(copy) == config_from_dict(apply_dotted(base, recipe))


def test_unknown_recipe_is_one_line() -> None:
    from dmp_core.config import load_recipe

    with pytest.raises(ParamsError, match="unknown recipe 'nope'"):
        load_recipe("nope")
