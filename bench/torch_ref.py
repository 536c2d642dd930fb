"""PyTorch side of `densekd bench`: torchvision models driven step by step over JSON lines.

densekd starts this script once and interleaves its own steps with ours, so both sides see the
same machine state. Protocol (one JSON object per line each way):
  {"cmd": "setup", "workload": "resnet18-train", "batch": 8, "size": 224, "threads": 2,
   "device": "cpu" | "cuda", "model": null | {architecture of a workload built from a shipped config}}
      -> {"ok": true, "flops": <forward FLOPs per step, x3 for a train step>}
  {"cmd": "version"}   -> {"ok": true, "torch": "2.15.0"}
  {"cmd": "step"}      -> {"ok": true, "seconds": <wall time of one step>}
  {"cmd": "peak_rss"}  -> {"ok": true, "bytes": <peak RSS since setup>}
  {"cmd": "cocoeval", "gt": PATH, "dt": PATH}
      -> {"ok": true, "seconds": <load + evaluate + accumulate + summarize>, "stats": [12]}
  {"cmd": "lsap", "cost": [[...]], "repeats": N}
      -> {"ok": true, "seconds": <per call>, "total": <optimal cost>}
Errors answer {"ok": false, "error": "..."}; end of input ends the script.
"""

import json
import sys
import time

import torch
import torchvision

MODELS = {
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
}


def deeplabv3(m):
    """densekd's DeepLabV3 (src/model/deeplabv3) in torchvision modules: a frozen-BatchNorm
    MobileNetV2 dilated past the output stride, ASPP (its dilated branches depthwise-separable
    with separable_aspp), a 3x3 conv, DeepLabV3+'s decoder on the stride-4 stage (features[:4])
    if configured, the classifier, and the FCN auxiliary head on the stride-16 stage
    (features[:14])."""
    import math

    from torch import nn

    if m["arch"] != "mobilenet_v2" or m["backbone_norm"] != "frozen" or m["norm"] != "group":
        raise ValueError(f"the reference builds frozen-BN MobileNetV2 with group-norm heads: {m}")
    if m["last_conv"]:
        raise ValueError(f"the reference's DeepLabV3 reads the 320-channel C5: {m}")

    def cnr(i, o, k=1, d=1, g=1):
        norm = nn.GroupNorm(math.gcd(32, o), o)
        conv = nn.Conv2d(i, o, k, padding=d * (k // 2), dilation=d, groups=g, bias=False)
        return nn.Sequential(conv, norm, nn.ReLU())

    def separable(i, o, d=1):
        return nn.Sequential(cnr(i, i, 3, d, g=i), cnr(i, o))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            f = mobilenet_stages(m["frozen_stages"])
            # Past the output stride a stage keeps its resolution and dilates instead.
            reached, dil = 2, 1
            stage_first = {1: 1, 2: 2, 4: 2, 7: 2, 11: 1, 14: 2, 17: 1}
            for i in range(1, 18):
                dw = [c for c in f[i].modules() if isinstance(c, nn.Conv2d) and c.groups > 1][0]
                s = stage_first.get(i, 1)
                if s != 1 and reached >= m["output_stride"]:
                    dil *= s
                    dw.stride = (1, 1)
                elif s != 1:
                    reached *= s
                dw.dilation = dw.padding = (dil, dil)
            self.f, ch, k = f, m["channels"], m["num_classes"]
            rates = m["aspp_rates"]
            sep = m["separable_aspp"]
            dilated = [separable(320, ch, r) if sep else cnr(320, ch, 3, r) for r in rates]
            self.aspp = nn.ModuleList([cnr(320, ch)] + dilated)
            self.pool = cnr(320, ch)
            self.project = cnr(ch * (len(rates) + 2), ch)
            self.conv = cnr(ch, ch, 3)
            low = m["decoder"]
            if low is not None:
                self.low = cnr(24, low)
                self.refine = nn.Sequential(separable(ch + low, ch), separable(ch, ch))
            self.out = nn.Conv2d(ch, k, 1)
            self.aux = nn.Sequential(cnr(96, 24, 3), nn.Conv2d(24, k, 1)) if m["aux_head"] else None

        def forward(self, x):
            size = x.shape[-2:]
            if m["input_scale"] != 1:
                x = torch.nn.functional.interpolate(
                    x, scale_factor=m["input_scale"], mode="bilinear", align_corners=False
                )
            c2 = self.f[:4](x)
            c4 = self.f[4:14](c2)
            x = self.f[14:](c4)
            pooled = self.pool(x.mean((2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
            y = self.conv(self.project(torch.cat([b(x) for b in self.aspp] + [pooled], 1)))
            if m["decoder"] is not None:
                low = self.low(c2)
                y = torch.nn.functional.interpolate(
                    y, size=low.shape[-2:], mode="bilinear", align_corners=False
                )
                y = self.refine(torch.cat([y, low], 1))
            return self.out(y), (self.aux(c4) if self.aux is not None else None), size

    return Net()


def mobilenet_stages(frozen_stages, last_conv=False):
    """torchvision's MobileNetV2 features (the last 1x1 conv to 1280 channels only with
    `last_conv`), frozen BatchNorm, the first `frozen_stages` stages (densekd's count: the stem,
    then each block group) frozen."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    f = torchvision.models.mobilenet_v2(norm_layer=FrozenBatchNorm2d).features
    f = f if last_conv else f[:-1]
    ends = [1, 2, 4, 7, 11, 14, 17, 18]
    for block in f[: ends[frozen_stages - 1] if frozen_stages else 0]:
        for p in block.parameters():
            p.requires_grad_(False)
    return f


def fcos(m):
    """densekd's FCOS (src/model/fcos) as torchvision's `FCOS`: frozen-BN MobileNetV2, an FPN
    on the stride 8/16/32 stages, the GroupNorm towers of `FCOSHead`, its targets and loss."""
    from collections import OrderedDict

    from torch import nn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOS, FCOSHead
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

    if m["arch"] != "mobilenet_v2" or m["backbone_norm"] != "frozen":
        raise ValueError(f"the reference builds frozen-BN MobileNetV2 FCOS: {m}")
    if m["strides"] != [8, 16, 32] or m["norm_groups"] != 32:
        raise ValueError(f"the reference builds P3-P5 with GroupNorm(32): {m}")

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = mobilenet_stages(m["frozen_stages"], m["last_conv"])
            c5 = 1280 if m["last_conv"] else 320
            self.fpn = FeaturePyramidNetwork([32, 96, c5], m["channels"])
            self.out_channels = m["channels"]

        def forward(self, x):
            c3 = self.f[:7](x)
            c4 = self.f[7:14](c3)
            c5 = self.f[14:](c4)
            return self.fpn(OrderedDict([("0", c3), ("1", c4), ("2", c5)]))

    anchors = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,),) * 3)
    head = FCOSHead(m["channels"], 1, m["num_classes"], num_convs=m["head_convs"])
    side = m["size"]
    return FCOS(
        Body(), m["num_classes"], min_size=side, max_size=side, image_mean=[0.0] * 3,
        image_std=[1.0] * 3, anchor_generator=anchors, head=head,
        center_sampling_radius=m["center_sampling_radius"],
    )


def seg_loss(out, y, aux_weight, ohem):
    """densekd's pixel loss (src/model/deeplabv3/loss.rs): cross-entropy of the upsampled
    logits over labelled pixels, or with ohem = [thresh, min_kept] over the hard ones only
    (ground-truth-class probability <= thresh, raised to the min_kept-th smallest)."""
    import torch.nn.functional as F

    logits, aux, size = out
    valid = y != 255

    def head(t):
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        ce = F.cross_entropy(t, y, ignore_index=255, reduction="none")
        keep = valid
        if ohem is not None:
            prob, tau = torch.exp(-ce.detach()), ohem[0]
            if 0 < ohem[1] <= int(valid.sum()):
                tau = max(tau, prob[valid].kthvalue(ohem[1]).values.item())
            keep = valid & (prob <= tau)
        return ce[keep].sum() / keep.sum().clamp(min=1)

    loss = head(logits)
    if aux is not None:
        loss = loss + aux_weight * head(aux)
    return loss


def reset_peak_rss():
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Workload:
    def __init__(self, name, batch, size, threads, device="cpu", model=None):
        arch, mode = name.rsplit("-", 1)
        known = arch in MODELS or (arch in ("deeplabv3", "fcos") and mode == "train")
        if not known or mode not in ("train", "infer"):
            raise ValueError(f"unknown workload {name}")
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.train = mode == "train"
        self.x = torch.randn(batch, 3, size, size)
        if arch == "deeplabv3":
            self.model = deeplabv3(model)
            y = torch.randint(0, model["num_classes"], (batch, size, size))
            self.y = y.masked_fill(torch.rand(batch, size, size) < 0.1, 255)
            loss = (model["aux_weight"], model["ohem"])
            self.forward = lambda: seg_loss(self.model(self.x), self.y, *loss)
        elif arch == "fcos":
            self.model = fcos(dict(model, size=size))
            self.x = list(self.x)
            self.y = [
                {"boxes": torch.tensor(b, dtype=torch.float32), "labels": torch.tensor(c)}
                for b, c in zip(model["boxes"], model["classes"])
            ]
            self.forward = lambda: sum(self.model(self.x, self.y).values())
        else:
            self.model = MODELS[arch](num_classes=1000)
            self.y = torch.randint(0, 1000, (batch,))
            self.forward = lambda: torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        self.to(torch.device(device))
        if self.train:
            self.model.train()
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            self.optim = torch.optim.AdamW(trainable, lr=1e-4)
        else:
            self.model.eval()
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.forward() if self.train else self.model(self.x)
        # A train step is a forward pass and a backward pass of twice its cost.
        self.flops = counter.get_total_flops() * (3 if self.train else 1)
        reset_peak_rss()

    def to(self, device):
        """Moves the model, inputs and targets to `device` (the steps' `.item()` waits for it)."""
        self.model.to(device)
        move = lambda t: t.to(device) if torch.is_tensor(t) else {k: move(v) for k, v in t.items()}
        self.x = [move(t) for t in self.x] if isinstance(self.x, list) else move(self.x)
        self.y = [move(t) for t in self.y] if isinstance(self.y, list) else move(self.y)

    def step(self):
        start = time.perf_counter()
        if self.train:
            self.optim.zero_grad(set_to_none=True)
            loss = self.forward()
            loss.backward()
            self.optim.step()
            loss.item()
        else:
            with torch.inference_mode():
                self.model(self.x).sum().item()
        return time.perf_counter() - start


def cocoeval(gt_path, dt_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    reset_peak_rss()
    start = time.perf_counter()
    # pycocotools prints progress; keep stdout for the protocol.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        dt = gt.loadRes(dt_path)
        e = COCOeval(gt, dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    seconds = time.perf_counter() - start
    return {"ok": True, "seconds": seconds, "stats": [float(x) for x in e.stats]}


def lsap(cost, repeats):
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(cost, dtype=np.float64)
    start = time.perf_counter()
    for _ in range(repeats):
        rows, cols = linear_sum_assignment(c)
    seconds = (time.perf_counter() - start) / repeats
    return {"ok": True, "seconds": seconds, "total": float(c[rows, cols].sum())}


def main():
    workload = None
    for line in sys.stdin:
        try:
            msg = json.loads(line)
            if msg["cmd"] == "version":
                out = {"ok": True, "torch": torch.__version__}
            elif msg["cmd"] == "setup":
                workload = Workload(
                    msg["workload"], msg["batch"], msg["size"], msg["threads"],
                    msg.get("device", "cpu"), msg.get("model"),
                )
                out = {"ok": True, "flops": workload.flops}
            elif msg["cmd"] == "step":
                out = {"ok": True, "seconds": workload.step()}
            elif msg["cmd"] == "peak_rss":
                out = {"ok": True, "bytes": peak_rss()}
            elif msg["cmd"] == "cocoeval":
                out = cocoeval(msg["gt"], msg["dt"])
            elif msg["cmd"] == "lsap":
                out = lsap(msg["cost"], msg["repeats"])
            else:
                out = {"ok": False, "error": f"unknown command {msg['cmd']}"}
        except Exception as e:  # report to densekd instead of dying mid-protocol
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
