"""d2l's LeNet-5 on Fashion-MNIST: sigmoid activations, average pooling, Xavier init, plain SGD at lr 0.9.

    torchrun --standalone --nproc_per_node 2 -m launcher recipe=lenet data.download=true

The network is split into ``features`` (convolutions) and ``classifier`` (fully connected), as in the notes'
Net2, so the two can learn at different rates: ``model.classifier_lr_mult=0.1`` trains the classifier at a tenth
of ``optim.lr``.
"""

from torch import nn

from launcher.recipes._fashion_mnist import load_fashion_mnist

DEFAULTS = {
    "train": {"epochs": 10, "batch_size": 256},
    "optim": {"name": "sgd", "lr": 0.9},
    "model": {"classifier_lr_mult": 1.0},
}


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
            nn.Linear(120, 84), nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform weights for conv and linear layers, as d2l's train_ch6 does with ``net.apply``."""
    if type(module) in (nn.Linear, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight)


def build_model(cfg) -> nn.Module:
    model = LeNet()
    model.apply(init_weights)
    return model


def build_datasets(cfg):
    return load_fashion_mnist(cfg.data.root, cfg.data.download)


def param_groups(model: LeNet, cfg) -> list[dict]:
    """Features at optim.lr, the classifier at optim.lr * model.classifier_lr_mult."""
    return [
        {"params": model.features.parameters()},
        {"params": model.classifier.parameters(), "lr": cfg.optim.lr * cfg.model.classifier_lr_mult},
    ]
