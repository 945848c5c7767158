"""`python -m sit_fast.training` (or `torchrun -m sit_fast.training`): the same as train.py."""
from sit_fast.errors import cli_entry
from sit_fast.training.loop import main

cli_entry(main)()
