"""The orchestration layer: code that drives DVC, git and MLflow from outside the library.

Layers, imports running downward only::

    stages/         thin Typer commands: parse options, call one function here or in dmp_core
    orchestration/  the pipeline runner, studies (DVC queue, Ray, printed jobs), the job
                    runner, experiment discovery and the report's inputs (git, ``dvc exp``,
                    MLflow); may import DVC, Ray and dmp_core
    dmp_core/       the library: data, models, objectives, training, evaluation, report;
                    never imports orchestration, stages, Typer or DVC
"""
