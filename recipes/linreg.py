"""d2l's linear regression from scratch, done with the engine: recover w = [2, -3.4] and b = 4.2 from noisy samples.

    python -m launcher recipe=linreg

y = Xw + b + noise with X ~ N(0, 1) and noise ~ N(0, 0.01^2); one nn.Linear, squared loss, SGD at lr 0.03,
batch 10, 3 epochs. The trained weights in <run.dir>/model.pt match data.true_w and data.true_b to about 1e-3.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

DEFAULTS = {
    "train": {"epochs": 3, "batch_size": 10, "log_every": 25},
    "optim": {"name": "sgd", "lr": 0.03},
    "data": {"true_w": [2.0, -3.4], "true_b": 4.2, "num_examples": 1000, "noise": 0.01},
}


def synthetic_data(w: torch.Tensor, b: float, num_examples: int, noise: float, seed: int):
    """y = Xw + b + noise, the notes' synthetic_data, with its own generator so every rank makes the same data."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.normal(0, 1, (num_examples, len(w)), generator=generator)
    y = x @ w + b + torch.normal(0, noise, (num_examples,), generator=generator)
    return x, y.reshape(-1, 1)


def build_model(cfg) -> nn.Module:
    model = nn.Linear(len(cfg.data.true_w), 1)
    nn.init.normal_(model.weight, std=0.01)
    nn.init.zeros_(model.bias)
    return model


def build_datasets(cfg):
    w = torch.tensor(list(cfg.data.true_w))
    make = lambda n, seed: TensorDataset(*synthetic_data(w, cfg.data.true_b, n, cfg.data.noise, seed))  # noqa: E731
    return make(cfg.data.num_examples, seed=1), make(max(cfg.data.num_examples // 5, 1), seed=2)


def loss(outputs, targets):
    return nn.functional.mse_loss(outputs, targets)
