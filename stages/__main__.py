"""``python -m stages <command>``: what dvc.yaml and torchrun call.

Running with ``-m`` from the project root puts the root first on ``sys.path``, so a
queued DVC experiment (which runs in a copy under ``.dvc/tmp/exps``) executes the
copy's own code, not the editable install's."""
from stages.cli import main

main()
