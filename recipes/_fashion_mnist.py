"""Fashion-MNIST through torchvision, held in memory as tensors (d2l's `load_data_fashion_mnist`, minus PIL)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import TensorDataset

from launcher.errors import UserError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def raw_folder(root: str) -> Path:
    """Where torchvision looks for the four IDX files."""
    return Path(root) / "FashionMNIST" / "raw"


def load_fashion_mnist(root: str, download: bool) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) as float images in [0, 1] shaped (N, 1, 28, 28) and int64 labels."""
    from torchvision.datasets import FashionMNIST  # only recipes that need torchvision pay for importing it

    folder = raw_folder(root)
    try:
        splits = [FashionMNIST(root, train=train, download=download) for train in (True, False)]
    except RuntimeError as error:
        if download:
            reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise UserError(
                f"downloading Fashion-MNIST into {folder} failed: {reason}. Without network "
                f"access, copy the four files {', '.join(FILES)} (unzipped) into {folder}"
            ) from None
        raise UserError(
            f"Fashion-MNIST is not in data.root={root}: expected the files {', '.join(FILES)} in {folder}. "
            "Set data.download=true to download them, or copy them there (unzipped)"
        ) from None
    except (AssertionError, ValueError) as error:  # torchvision's IDX reader asserts on malformed files
        raise UserError(f"Fashion-MNIST files in {folder} are not valid IDX files ({error!r}): replace them") from None
    return tuple(TensorDataset(s.data.unsqueeze(1).float().div_(255), s.targets) for s in splits)

