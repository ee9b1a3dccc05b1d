"""The ``dmp`` command: one subcommand per pipeline stage (``check`` first), plus the
``bench``, ``model``, ``params`` and ``study`` groups and ``pipeline``. Each module
exposes ``register(app)``."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    help="dmp: denoising multimodal pretraining for image-text retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order = pipeline order; each module registers its own command(s).
STAGE_MODULES = [
    "stages.check",
    "stages.download",
    "stages.preprocess",
    "stages.targets",
    "stages.pretrain",
    "stages.finetune",
    "stages.evaluate",
    "stages.report",
    "stages.model",
    "stages.bench",
    "stages.study",
    "stages.collect",
    "stages.job",
    "stages.pipeline",
    "stages.params_doc",
]


@app.callback()
def _root() -> None:
    """dmp: check -> download -> preprocess -> targets -> pretrain -> finetune -> evaluate -> report."""


for _name in STAGE_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()
