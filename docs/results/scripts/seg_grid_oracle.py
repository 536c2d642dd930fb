#!/usr/bin/env python3
"""Upper bound of a segmentation model whose logits live on a coarse grid: every cell holds the
exact class shares of its pixels (ignored pixels left out), upsampled bilinearly as densekd's
logits are, argmax, scored as mIoU on the val labels of `densekd data synth --out DIR`.

Usage: seg_grid_oracle.py DIR  (numpy, torch, Pillow; docs/results/deeplabv3.md)
"""
import glob
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLASSES = 9
IGNORE = 255


def score(files, cells):
    inter = np.zeros(CLASSES)
    union = np.zeros(CLASSES)
    for f in files:
        y = np.array(Image.open(f)).astype(np.int64)
        valid = y != IGNORE
        one_hot = torch.from_numpy(np.stack([(y == k) for k in range(CLASSES)]).astype(np.float32))
        weight = torch.from_numpy(valid.astype(np.float32))[None, None]
        shares = F.adaptive_avg_pool2d(one_hot[None], cells)
        shares = shares / F.adaptive_avg_pool2d(weight, cells).clamp_min(1e-6)
        up = F.interpolate(shares, size=y.shape, mode="bilinear", align_corners=False)
        pred = up[0].argmax(0).numpy()
        for k in range(CLASSES):
            p, g = (pred == k) & valid, (y == k) & valid
            inter[k] += (p & g).sum()
            union[k] += (p | g).sum()
    iou = inter / np.maximum(union, 1)
    return iou.mean(), iou


def main():
    files = sorted(glob.glob(f"{sys.argv[1]}/labels/val/*.png"))
    for cells in (16, 24, 32, 64):
        miou, iou = score(files, cells)
        print(f"{cells}x{cells}: mIoU {miou:.4f}, per class {np.round(iou, 3).tolist()}")


if __name__ == "__main__":
    main()
