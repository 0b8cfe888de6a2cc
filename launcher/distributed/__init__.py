"""The job's processes: the distributed environment, the process group, stop signals, spawning workers, and the
DDP wrapper."""
