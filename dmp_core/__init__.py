"""dmp_core: the library behind the dmp pipeline (data, targets, models, losses,
training, evaluation, reporting). It never imports ``stages``, Typer or DVC."""

__version__ = "0.1.0"
