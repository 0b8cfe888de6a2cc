"""d2l's multilayer perceptron on Fashion-MNIST: 784 -> 256 (ReLU) -> 10, weights from N(0, 0.01), SGD at lr 0.1.

    python -m launcher recipe=mlp data.download=true model.hidden=512
"""

from torch import nn

from launcher.recipes._fashion_mnist import load_fashion_mnist

DEFAULTS = {
    "train": {"epochs": 10, "batch_size": 256},
    "optim": {"name": "sgd", "lr": 0.1},
    "model": {"hidden": 256},
}


def init_weights(module: nn.Module) -> None:
    if type(module) is nn.Linear:
        nn.init.normal_(module.weight, std=0.01)
        nn.init.zeros_(module.bias)


def build_model(cfg) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, cfg.model.hidden), nn.ReLU(), nn.Linear(cfg.model.hidden, 10))
    model.apply(init_weights)
    return model


def build_datasets(cfg):
    return load_fashion_mnist(cfg.data.root, cfg.data.download)
