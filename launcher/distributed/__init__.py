"""The job's processes.

The distributed environment, the process group, stop signals, spawning workers, and the DDP wrapper.
"""
