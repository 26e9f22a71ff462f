"""5-point face alignment: least-squares similarity transform onto the 112x112 ArcFace template.

Coordinates are pixel indices with pixel centres on integers (the convention of the landmark
files of IJB-B/C and of the template below): pixel (0, 0) is the top-left pixel's centre.

The transform M [2, 3] maps source points to template points, p' = M[:, :2] p + M[:, 2], with
M[:, :2] = s R (uniform scale times a rotation, no reflection). It minimises sum ||M p_i - q_i||^2
(Umeyama 1991, Least-squares estimation of transformation parameters between two point
patterns). Warping samples the source at M^-1(output pixel) with bilinear interpolation; outside
the source image is black.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

ARCFACE_TEMPLATE = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float64)
"""Left eye, right eye, nose tip, left and right mouth corners in a 112x112 crop [5, 2] (x, y)."""


def similarity_transform(src: Tensor, dst: Tensor = ARCFACE_TEMPLATE) -> Tensor:
    """Least-squares similarity from src [..., K, 2] onto dst [K, 2] (or [..., K, 2]) -> M [..., 2, 3] float64.

    Batched over the leading dims (one SVD of a 2x2 covariance per face). Raises if a face's
    points all coincide (no scale can be estimated).
    """
    src = torch.as_tensor(src, dtype=torch.float64)
    dst = torch.as_tensor(dst, dtype=torch.float64).expand_as(src)
    if src.shape[-1] != 2 or src.shape[-2] < 2:
        raise ValueError(f"landmarks must be [..., K, 2] with K >= 2 points, got shape {tuple(src.shape)}")
    mu_s, mu_d = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    var_s = s.pow(2).sum((-2, -1)) / src.shape[-2]  # [...]
    if bool((var_s <= 1e-12).any()):
        bad = int((var_s.reshape(-1) <= 1e-12).nonzero()[0])
        raise ValueError(f"face {bad} (flat index): all landmarks coincide, cannot estimate a similarity; "
                         f"check its landmark line")
    cov = d.transpose(-1, -2) @ s / src.shape[-2]  # [..., 2, 2] = E[d s^T]
    u, sig, vt = torch.linalg.svd(cov)
    flip = torch.where(torch.linalg.det(u) * torch.linalg.det(vt) < 0, -1.0, 1.0).to(src)  # no reflection
    diag = torch.stack([torch.ones_like(flip), flip], -1)  # [..., 2]
    rot = u @ torch.diag_embed(diag) @ vt
    scale = (sig * diag).sum(-1) / var_s
    lin = scale[..., None, None] * rot
    t = mu_d.squeeze(-2) - (lin @ mu_s.transpose(-1, -2)).squeeze(-1)
    return torch.cat([lin, t.unsqueeze(-1)], -1)


def apply_transform(m: Tensor, points: Tensor) -> Tensor:
    """m [..., 2, 3], points [..., K, 2] -> transformed points [..., K, 2]."""
    return points @ m[..., :2].transpose(-1, -2) + m[..., 2].unsqueeze(-2)


def invert_transform(m: Tensor) -> Tensor:
    """Inverse of an invertible affine map m [..., 2, 3] -> [..., 2, 3]."""
    inv = torch.linalg.inv(m[..., :2])
    return torch.cat([inv, -(inv @ m[..., 2:])], -1)


def warp_tensor(images: Tensor, m: Tensor, size: tuple[int, int] = (112, 112)) -> Tensor:
    """Warp images [B, C, H, W] by m [B, 2, 3] (source -> output pixels) -> [B, C, size[0], size[1]].

    torch grid_sample, bilinear, zeros outside; align_corners=True puts pixel centres on integers.
    """
    b, _, h, w = images.shape
    inv = invert_transform(m.double())
    ys, xs = torch.meshgrid(torch.arange(size[0], dtype=torch.float64), torch.arange(size[1], dtype=torch.float64),
                            indexing="ij")
    out = torch.stack([xs, ys], -1).reshape(1, -1, 2).expand(b, -1, -1)  # [B, HW, 2] (x, y)
    src = apply_transform(inv, out)
    grid = torch.stack([src[..., 0] * (2.0 / (w - 1)) - 1.0, src[..., 1] * (2.0 / (h - 1)) - 1.0], -1)
    grid = grid.reshape(b, size[0], size[1], 2).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def warp_pil(image: Image.Image, m: Tensor | np.ndarray, size: tuple[int, int] = (112, 112)) -> Image.Image:
    """Warp a PIL image by m [2, 3] (source -> output pixels) into a size (H, W) crop (Pillow, bilinear).

    Pillow's affine transform works in continuous coordinates (pixel i spans [i, i+1)); the inverse
    map is shifted by half a pixel to keep the integer-centre convention of the landmarks.
    """
    inv = invert_transform(torch.as_tensor(m, dtype=torch.float64)).numpy()
    a = inv[:, :2]
    shift = inv[:, 2] + 0.5 - 0.5 * a.sum(1)
    data = (a[0, 0], a[0, 1], shift[0], a[1, 0], a[1, 1], shift[1])
    return image.transform((size[1], size[0]), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)


CHANNEL_ORDERS = ("rgb", "bgr")


def to_model_input(image: Image.Image, channels: str = "rgb") -> Tensor:
    """PIL image -> float [3, H, W] in [-1, 1] ((x / 255 - 0.5) / 0.5), channels in `channels` order."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    x = arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return x.flip(0) if channels == "bgr" else x


class AlignedFaces(Dataset):
    """Loads image `folder/names[i]`, aligns it by its 5 landmarks and returns [3, 112, 112] in [-1, 1].

    Args:
        folder: image folder (e.g. IJBC/loose_crop).
        names: file names [N].
        landmarks: [N, 5, 2] (x, y) pixel coordinates in each image.
        template: target points [5, 2] in the output crop.
        size: output (H, W).
        channels: "rgb" (what this project's face readers feed in training) or "bgr" (OpenCV order,
            what models trained on cv2-decoded images expect).
    """

    def __init__(self, folder: str | os.PathLike, names: Sequence[str], landmarks: Tensor,
                 template: Tensor = ARCFACE_TEMPLATE, size: tuple[int, int] = (112, 112),
                 channels: str = "rgb") -> None:
        if channels not in CHANNEL_ORDERS:
            raise ValueError(f"channels={channels!r}: choose one of {CHANNEL_ORDERS}")
        if landmarks.shape != (len(names), template.shape[0], 2):
            raise ValueError(f"landmarks must be [{len(names)}, {template.shape[0]}, 2] (one set per name), "
                             f"got {tuple(landmarks.shape)}")
        self.folder = os.fspath(folder)
        self.names = list(names)
        self.transforms = similarity_transform(landmarks, template)  # [N, 2, 3], all at once
        self.size = size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Tensor:
        path = os.path.join(self.folder, self.names[i])
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as err:
            raise OSError(f"{path}: cannot read image {i} ({err}); check the image folder") from err
        return to_model_input(warp_pil(img, self.transforms[i], self.size), self.channels)
