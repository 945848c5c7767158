"""`python -m sit_fast.training` (or `torchrun -m sit_fast.training`): the same as train.py."""
from sit_fast.errors import cli_entry, quiet_ctrl_c_while_loading

quiet_ctrl_c_while_loading(__name__)  # a Ctrl-C while torch loads ends it, quietly

from sit_fast.training.loop import main

cli_entry(main)()
