"""The command lines: `python -m launcher` (main), `python -m launcher.slurm`, `python -m launcher.plot`; sweeps;
how a run's end becomes an exit code."""
