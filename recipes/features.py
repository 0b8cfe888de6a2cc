"""A multi-output model, in the style of the notes' VGG with slices (the pattern for a perceptual loss): the
network returns the activations of each slice and the logits, and a custom loss uses all of them.

    torchrun --standalone --nproc_per_node 2 -m launcher recipe=features

On scikit-learn's digits: cross-entropy on the logits plus a small penalty on every slice's activations.
``predictions`` tells the engine which output to score for accuracy.
"""

import torch.nn.functional as F
from torch import nn

from launcher.recipes.digits import DEFAULTS as DIGITS_DEFAULTS
from launcher.recipes.digits import build_datasets  # noqa: F401  (the recipe's data: the digits split)

DEFAULTS = {**DIGITS_DEFAULTS, "model": {"width": 16}}
ACTIVATION_PENALTY = 1e-3


class SlicedConvNet(nn.Module):
    """Three slices, as in the notes' Vgg19; ``forward`` returns ``[h1, h2, h3, logits]``."""

    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        conv = lambda c_in, c_out: nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)  # noqa: E731
        self.slice1 = nn.Sequential(conv(1, width), nn.ReLU(), conv(width, width), nn.ReLU())
        self.slice2 = nn.Sequential(nn.MaxPool2d(2), conv(width, 2 * width), nn.ReLU())
        self.slice3 = nn.Sequential(nn.MaxPool2d(2), conv(2 * width, 4 * width), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 2 * 2, num_classes))

    def forward(self, x):
        h1 = self.slice1(x)
        h2 = self.slice2(h1)
        h3 = self.slice3(h2)
        return [h1, h2, h3, self.head(h3)]


def build_model(cfg) -> nn.Module:
    return SlicedConvNet(cfg.model.width)


def loss(outputs, targets):
    *features, logits = outputs
    return F.cross_entropy(logits, targets) + ACTIVATION_PENALTY * sum(h.pow(2).mean() for h in features)


def predictions(outputs):
    """The logits, for accuracy."""
    return outputs[-1]
