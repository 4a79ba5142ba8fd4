"""`python -m anystory_cli.cli` (e.g. under `torchrun --nproc-per-node N -m anystory_cli.cli render ...`)."""

from . import app

app()
