"""Image data sets for recipes: CIFAR-10 from its pickle batches, and any ImageFolder tree (class per folder)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from launcher.errors import UserError

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _read_cifar_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, list[int]]:
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as file:
            batch = pickle.load(file, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch["labels"])
    return np.concatenate(images), labels


def cifar10(root: str, download: bool) -> tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (data_batch_1..5, test_batch), downloaded by torchvision when
    ``download`` and missing: (images, labels) TensorDatasets, the images normalised float (N, 3, 32, 32). In
    memory, so on a GPU they stay on the device (data.resident); augmentation is batched (``random_crop_and_flip``).
    """
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
    return _normalized(*_read_cifar_batches(folder, names[:5])), _normalized(*_read_cifar_batches(folder, names[5:]))


def _normalized(images: np.ndarray, labels: list[int]) -> TensorDataset:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return TensorDataset(((pixels - mean) / std).contiguous(), torch.tensor(labels))


def random_crop_and_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) and RandomHorizontalFlip for a whole batch of normalised CIFAR images
    at once, on their device: the padding is black (what 0 becomes after normalisation), each image gets its own
    offset and coin."""
    count, channels, height, width = images.shape
    black = (-torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD)).to(images.device, images.dtype)
    padded = black.view(1, channels, 1, 1).repeat(count, 1, height + 2 * padding, width + 2 * padding)
    padded[:, :, padding : padding + height, padding : padding + width] = images
    top, left = (torch.randint(0, 2 * padding + 1, (count,), generator=generator, device=images.device)
                 for _ in range(2))
    rows = (top[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    columns = (left[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
    cropped = padded[torch.arange(count, device=images.device)[:, None, None, None],
                     torch.arange(channels, device=images.device)[None, :, None, None], rows, columns]
    flip = torch.rand(count, generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


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
