"""torchvision's ResNet-18 on CIFAR-10 or on any ImageFolder tree, with the usual augmentation.

    torchrun --standalone --nproc_per_node 8 -m launcher recipe=resnet18 data.download=true train.amp=bf16 \\
        train.channels_last=true
    python -m launcher recipe=resnet18 data.format=imagefolder data.root=/data/flowers data.image_size=224 \\
        model.pretrained=resnet18-imagenet.pt

``model.num_classes`` 0 (the default) takes the count from the data: 10 for CIFAR-10, the class folders of an
ImageFolder tree.

The backbone and the classifier (``fc``) are separate param groups (``model.classifier_lr_mult`` scales the
classifier's LR, as for fine-tuning), and norms and biases get no weight decay. ``model.cifar_stem`` swaps the
7x7 stride-2 stem and max-pool for a 3x3 stride-1 convolution, the usual choice for 32x32 images.
"""

import logging

import torch
from torch import nn
from torchvision import transforms
from torchvision.models import resnet18

from launcher.errors import UserError
from launcher.recipes._images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    cifar10,
    image_folder,
    image_folder_class_count,
    random_crop_and_flip,
)

log = logging.getLogger(__name__)

DEFAULTS = {
    "train": {"epochs": 30, "batch_size": 512},
    "optim": {"name": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 5e-4},
    "sched": {"name": "onecycle"},
    "data": {"format": "cifar10", "image_size": 224, "num_workers": 4},
    "model": {"num_classes": 0, "cifar_stem": True, "classifier_lr_mult": 1.0, "pretrained": ""},
}


def num_classes(cfg) -> int:
    """``model.num_classes``, or (0) what the data has."""
    if cfg.model.num_classes:
        return cfg.model.num_classes
    return image_folder_class_count(cfg.data.root) if cfg.data.format == "imagefolder" else 10


def build_model(cfg) -> nn.Module:
    model = resnet18(num_classes=num_classes(cfg))
    if cfg.model.cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if cfg.model.pretrained:
        _load_pretrained(model, cfg.model.pretrained)
    return model


def _load_pretrained(model: nn.Module, path: str) -> None:
    """A local state_dict; tensors whose shape differs (another classifier, another stem) are left as built."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"model.pretrained={path} does not load as a state_dict ({error})") from None
    own = model.state_dict()
    fitting = {key: value for key, value in saved.items() if key in own and own[key].shape == value.shape}
    skipped = sorted(set(own) - set(fitting))
    model.load_state_dict(fitting, strict=False)
    if skipped:
        log.warning("model.pretrained: %d tensors kept as built (not in the file or another shape): %s",
                    len(skipped), ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))


def build_datasets(cfg):
    if cfg.data.format == "cifar10":
        return cifar10(cfg.data.root, cfg.data.download)  # augmented by ``augment``, a batch at a time
    if cfg.data.format == "imagefolder":
        size, normalize = cfg.data.image_size, transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), normalize])
        evaluate = transforms.Compose([transforms.Resize(round(size * 8 / 7)), transforms.CenterCrop(size),
                                       transforms.ToTensor(), normalize])
        train_set, eval_set = image_folder(cfg.data.root, train, evaluate)
        if len(train_set.classes) != num_classes(cfg):
            found = len(train_set.classes)
            raise UserError(f"data.root={cfg.data.root} has {found} classes but model.num_classes="
                            f"{cfg.model.num_classes}: set model.num_classes={found}, or 0 to take it from the data")
        return train_set, eval_set
    raise UserError(f"data.format={cfg.data.format!r} is not one of: cifar10, imagefolder")


def augment(batch, generator, cfg):
    """CIFAR-10's random crop (padding 4) and horizontal flip, for the whole batch at once on its device (an
    ImageFolder tree's augmentation is per sample, in its transforms)."""
    if cfg.data.format != "cifar10":
        return batch
    images, labels = batch
    return random_crop_and_flip(images, generator), labels


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Backbone and classifier at their own LRs; weight decay only on the weights of convolutions and linears."""
    groups = []
    for part, lr in (("backbone", cfg.optim.lr), ("classifier", cfg.optim.lr * cfg.model.classifier_lr_mult)):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith("fc.") == (part == "classifier")]
        decay = [p for n, p in params if p.dim() > 1]
        no_decay = [p for n, p in params if p.dim() <= 1]  # norms and biases
        groups += [{"params": decay, "lr": lr}, {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return groups
