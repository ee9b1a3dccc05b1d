"""The repository as the workflow commands see it: git status, the paths that dvc.yaml
declares, new source files a DVC experiment would miss, params against HEAD's; and
``echo``, the one-line progress messages on stderr that every workflow step prints."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

from dmp_core.config import Config


def echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ git and dvc.yaml
def git(*args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """``git <args>`` with captured text output (never raises on a non-zero exit)."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def git_status(cwd: Optional[Path] = None) -> list[tuple[str, str]]:
    """``(XY code, path)`` of every changed or untracked (not ignored) file, as
    ``git status --porcelain`` reports them; a rename gives its new path."""
    out = git("status", "--porcelain=v1", "-z", "--untracked-files=all", cwd=cwd).stdout
    entries, items = [], out.split("\0")
    i = 0
    while i < len(items):
        item = items[i]
        i += 1
        if len(item) < 4:
            continue
        code, path = item[:2], item[3:]
        if code[0] in "RC":  # -z puts the old path of a rename in the next field
            i += 1
        entries.append((code, path))
    return entries


def _declared(dvc_yaml: Path, sections: tuple[str, ...]) -> list[str]:
    import yaml

    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}) if dvc_yaml.is_file() else {}
    paths = []
    for stage in stages.values():
        for section in sections:
            for entry in stage.get(section) or []:
                paths.append((entry if isinstance(entry, str) else next(iter(entry))).rstrip("/"))
    return paths


def pipeline_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Every path that a stage of ``dvc_yaml`` declares under outs, metrics or plots."""
    return _declared(dvc_yaml, ("outs", "metrics", "plots"))


def code_roots(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The top-level folders of the stages' code: those of every declared dependency that
    no stage writes (``stages``, ``dmp_core``); ``python -m stages`` imports all of them."""
    outputs = pipeline_outputs(dvc_yaml)
    deps = [d for d in _declared(dvc_yaml, ("deps",)) if not is_pipeline_file(d, outputs)]
    return sorted({Path(d).parts[0] for d in deps if Path(d).parts})


def is_pipeline_file(path: str, outputs: list[str]) -> bool:
    """A file DVC writes when it runs the pipeline: a declared output (or inside one),
    ``dvc.lock``, or a ``.gitignore`` (DVC lists its cached outputs there)."""
    if path == "dvc.lock" or Path(path).name == ".gitignore":
        return True
    path = path.rstrip("/")
    return any(path == out or path.startswith(out + "/") for out in outputs)


def untracked_sources(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Untracked (not ignored) files in the code folders (:func:`code_roots`): new modules.

    DVC 3.67 builds a ``--temp`` or queued experiment from git-tracked files only, so
    these must be copied in with ``-C`` (and are not recorded in the experiment's commit)."""
    roots = code_roots(dvc_yaml)
    outputs = pipeline_outputs(dvc_yaml)
    return [path for code, path in git_status() if code == "??" and Path(path).parts[0] in roots
            and not is_pipeline_file(path, outputs)]


def params_differ_from_head(params: Path, cfg: Config) -> tuple[Optional[list[str]], str]:
    """``(keys that differ, "")`` comparing the validated params with HEAD's; ``(None, why)``
    when HEAD has no params file to compare with (no commit yet, file not committed)."""
    shown = git("show", f"HEAD:./{params.as_posix()}")
    if shown.returncode != 0:
        return None, f"{params} is not in a git commit yet (DVC experiments need one: git add -A && git commit)"
    import yaml

    from dmp_core.config import ParamsError, config_from_dict, flatten

    try:
        head = config_from_dict(yaml.safe_load(shown.stdout) or {}, source=f"HEAD:{params}")
    except ParamsError as err:
        return None, f"HEAD's {params} is not valid ({err})"
    now, then = flatten(cfg), flatten(head)
    return [key for key in now if now[key] != then.get(key)], ""
