"""launcher: a distributed training launcher for PyTorch.

A recipe (a plain Python module with ``build_model``, ``build_datasets`` and optional ``param_groups`` / ``loss``)
goes in; DistributedDataParallel training through torchrun, rank-0 evaluation, a model summary, metrics and the
trained ``state_dict`` come out. Run ``python -m launcher --help``.
"""

__version__ = "0.1.0"
