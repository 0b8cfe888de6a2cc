"""The command lines, sweeps, and how a run's end becomes an exit code.

The command lines are `python -m launcher` (main), `python -m launcher.slurm` and `python -m launcher.plot`.
"""
