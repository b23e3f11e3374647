"""Image fidelity metrics on float tensors (1, 3, H, W) in [0, 255]: PSNR and SSIM over the whole image or a pixel
mask, box masks, and LPIPS (torchmetrics, AlexNet) with the reason when it cannot run. ``replan.eval.fidelity``
measures runs with them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LPIPS_MODES = ("auto", "on", "off")
_LPIPS_WEIGHTS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
LPIPS_NETS = tuple(sorted(_LPIPS_WEIGHTS))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor (1, 3, H, W) in [0, 255]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float | None:
    """PSNR in dB (data range 255) over all pixels, or over ``mask`` (H, W bool) pixels; ``inf`` when equal."""
    diff = (a.double() - b.double()) ** 2
    if mask is not None:
        if not bool(mask.any()):
            return None
        diff = diff[..., mask.to(diff.device)]
    mse = float(diff.mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim_full(a: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor]:
    """torchmetrics SSIM (Gaussian window, sigma 1.5, 11 px; data range 255): the image's value and its (H, W) map
    averaged over channels. Identical images give exactly 1 (float32 leaves ~1e-4 of rounding on flat areas;
    float64 would be ~30x slower on the CPU)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if torch.equal(a, b):
        return 1.0, torch.ones(a.shape[-2:], dtype=a.dtype, device=a.device)
    value, full = structural_similarity_index_measure(a, b, data_range=255.0, return_full_image=True,
                                                      reduction="none")
    return float(value[0]), full[0].mean(0)


def ssim_7x7(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM as RegionE reports it (``skimage.metrics.structural_similarity`` defaults on uint8 RGB, channel axis
    last): a 7×7 uniform window, sample covariance (× 49/48), K1 0.01, K2 0.03, data range 255, the map's mean over
    the windows that lie inside the image, averaged over channels. ``a``, ``b``: (1, C, H, W) in 0..255, H, W ≥ 7."""
    import torch.nn.functional as F

    x, y = a.double(), b.double()
    if min(x.shape[-2:]) < 7:
        raise ValueError(f"SSIM with a 7x7 window needs images of at least 7x7 pixels, got {tuple(x.shape[-2:])}")

    def mean(t):  # the uniform filter, only where the window fits (what skimage keeps after cropping)
        return F.avg_pool2d(t, 7, stride=1)

    ux, uy = mean(x), mean(y)
    norm = 49 / 48
    vx, vy = norm * (mean(x * x) - ux * ux), norm * (mean(y * y) - uy * uy)
    vxy = norm * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean(dim=(-2, -1)).mean())


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float | None:
    """Whole-image SSIM, or the mean of the SSIM map over ``mask`` (H, W bool) pixels (None when it is empty)."""
    value, full = ssim_full(a, b)
    if mask is None:
        return value
    return masked_mean(full, mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    mask = mask.to(values.device)
    return float(values[mask].mean()) if bool(mask.any()) else None


def box_mask(size: tuple[int, int], boxes) -> torch.Tensor:
    """(H, W) bool: True inside any box (original pixels, rounded outwards)."""
    w, h = size
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        c1, r1 = max(0, math.floor(x1)), max(0, math.floor(y1))
        c2, r2 = min(w, math.ceil(x2)), min(h, math.ceil(y2))
        if c2 > c1 and r2 > r1:
            mask[r1:r2, c1:c2] = True
    return mask


class LPIPS:
    """torchmetrics LPIPS with a guard against silent downloads (see the module docstring)."""

    def __init__(self, mode: str = "auto", net: str = "alex", device: str = "cpu"):
        if mode not in LPIPS_MODES:
            raise ValueError(f"lpips mode must be one of {', '.join(LPIPS_MODES)}, got {mode!r}")
        self.mode, self.net, self.device = mode, net, device
        self.metric, self.reason = None, None
        if mode == "off":
            self.reason = "disabled (--lpips off)"
            return
        self.reason = unavailable_reason(net, allow_download=mode == "on")
        if self.reason is not None:
            if mode == "on":
                raise ValueError(f"LPIPS requested (--lpips on) but unavailable: {self.reason}")
            return
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).to(device).eval()

    @property
    def available(self) -> bool:
        return self.metric is not None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float | None:
        if self.metric is None:
            return None
        with torch.no_grad():
            value = self.metric((a / 255.0).to(self.device), (b / 255.0).to(self.device))
        self.metric.reset()
        return float(value)

    def status(self) -> dict:
        out = {"status": "computed" if self.available else "skipped", "net": self.net}
        if self.reason:
            out["reason"] = self.reason
        return out


def unavailable_reason(net: str = "alex", allow_download: bool = False) -> str | None:
    """Why LPIPS cannot run without a download (None when it can)."""
    import importlib.util

    if net not in _LPIPS_WEIGHTS:
        return f"unknown LPIPS net {net!r}; choose one of {', '.join(_LPIPS_WEIGHTS)}"
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed (pip install torchvision)"
    if allow_download:
        return None
    try:
        import torchvision

        weights = getattr(torchvision.models, {"alexnet": "AlexNet_Weights", "vgg16": "VGG16_Weights",
                                               "squeezenet1_1": "SqueezeNet1_1_Weights"}[_LPIPS_WEIGHTS[net]]).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    except Exception as e:  # a torchvision without these weight enums
        return f"cannot locate the {_LPIPS_WEIGHTS[net]} weights: {e}"
    if not cached.is_file():
        return f"the pretrained {_LPIPS_WEIGHTS[net]} weights are not cached at {cached} (use --lpips on to download)"
    return None
