"""Image data sets for recipes: CIFAR-10 from its pickle batches, and any ImageFolder tree (class per folder)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from launcher.errors import UserError

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ArrayImages(Dataset):
    """uint8 images (N, H, W, C) in memory, with a torchvision transform applied per sample."""

    def __init__(self, images: np.ndarray, labels: list[int], transform):
        self.images, self.labels, self.transform = images, torch.tensor(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(torch.from_numpy(self.images[index]).permute(2, 0, 1)), self.labels[index]


def _read_cifar_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, list[int]]:
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as file:
            batch = pickle.load(file, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch["labels"])
    return np.concatenate(images), labels


def cifar10(root: str, download: bool, train_transform, eval_transform) -> tuple[Dataset, Dataset]:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (data_batch_1..5, test_batch), downloaded by torchvision when
    ``download`` and missing."""
    folder = Path(root) / CIFAR_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if download and not all((folder / name).exists() for name in names):
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(root, download=True)
        except Exception as error:
            raise UserError(f"downloading CIFAR-10 into {root} failed ({error}); without network access, unpack "
                            f"cifar-10-python.tar.gz there so that {folder} holds {', '.join(names)}") from None
    missing = [name for name in names if not (folder / name).exists()]
    if missing:
        raise UserError(f"CIFAR-10 is not in data.root={root}: {folder} lacks {', '.join(missing)}. Set "
                        "data.download=true, or unpack cifar-10-python.tar.gz there")
    train = ArrayImages(*_read_cifar_batches(folder, names[:5]), train_transform)
    test = ArrayImages(*_read_cifar_batches(folder, names[5:]), eval_transform)
    return train, test


def _image_folder_splits(root: str) -> list[Path]:
    splits = [Path(root) / split for split in ("train", "val")]
    missing = [str(split) for split in splits if not split.is_dir()]
    if missing:
        raise UserError(f"data.format=imagefolder needs {' and '.join(missing)}: one folder per class, e.g. "
                        f"{splits[0]}/cat/1.png")
    return splits


def image_folder_class_count(root: str) -> int:
    """How many classes ``<root>/train`` has (its subfolders, as ImageFolder counts them), without reading an image."""
    return sum(1 for entry in _image_folder_splits(root)[0].iterdir() if entry.is_dir())


def image_folder(root: str, train_transform, eval_transform) -> tuple[Dataset, Dataset]:
    """``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` through torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    splits = _image_folder_splits(root)
    train, val = (ImageFolder(str(split), transform=t) for split, t in zip(splits, (train_transform, eval_transform)))
    if train.classes != val.classes:
        raise UserError(f"{splits[0]} and {splits[1]} have different class folders: {train.classes} vs {val.classes}")
    return train, val
