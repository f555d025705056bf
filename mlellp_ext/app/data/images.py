"""Images kept as files and decoded when indexed (:class:`ImageFiles`), and the
header check that names every unreadable file before training starts."""
from __future__ import annotations

import numpy as np
import torch

from .core import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def read_rgb(path: str, size: tuple[int, int] | None, where: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3), resized (bilinear) to ``size`` = (width, height) if given."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
        raise DataError(f"{where}: cannot read image {path} ({type(e).__name__}: {e})") from e


def check_header(path: str, where: str) -> tuple[int, int]:
    """(width, height) of an image file, read without decoding it (PIL's verify: the
    header, and for PNG the checksums of the whole file); DataError naming the file and
    ``where`` if it is not a readable image. A file broken in a way only decoding
    finds (a truncated JPEG) is named when it is first decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # reads the file through (for PNG, its checksums) without decoding it
            return size
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
        raise DataError(f"{where}: cannot read image {path} ({type(e).__name__}: {e})") from e


class ImageFiles:
    """Images read from their files when indexed, not held in memory: ``x[index]``
    (an int, a slice, a 1-D integer tensor or list, or a tuple whose first entry is
    one of those) decodes those files, resized (bilinear) to ``size`` = (width, height),
    into uint8 (k, 3, H, W), as the in-memory datasets hold them. ``shape`` and
    ``dtype`` are those of the whole stack. Picklable, for DataLoader workers."""

    dtype = torch.uint8

    def __init__(self, paths: list[str], size: tuple[int, int], where: list[str]):
        self.paths, self.size, self.where = list(paths), tuple(size), list(where)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 3, self.size[1], self.size[0]))

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> torch.Tensor:
        """Image i as uint8 (3, H, W)."""
        return torch.from_numpy(np.ascontiguousarray(read_rgb(self.paths[i], self.size, self.where[i])
                                                     .transpose(2, 0, 1)))

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            key = list(range(len(self)))[key]
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            out = self.image(int(key))
            return out[rest] if rest else out
        else:
            key = torch.as_tensor(key)
            if key.dtype == torch.bool or key.is_floating_point() or key.dim() != 1:
                raise IndexError(f"ImageFiles: index with an int, a slice or a 1-D integer tensor/list, got "
                                 f"dtype {key.dtype}, shape {list(key.shape)}")
            index = key.long().tolist()
            out = torch.stack([self.image(i) for i in index]) if index else torch.empty(0, *self.shape[1:],
                                                                                        dtype=torch.uint8)
        return out[(slice(None),) + rest] if rest else out
