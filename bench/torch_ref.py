"""PyTorch side of `densekd bench`: torchvision models driven step by step over JSON lines.

densekd starts this script once and interleaves its own steps with ours, so both sides see the
same machine state. Protocol (one JSON object per line each way):
  {"cmd": "setup", "workload": "resnet18-train", "batch": 8, "size": 224, "threads": 2}
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
    def __init__(self, name, batch, size, threads):
        arch, mode = name.rsplit("-", 1)
        if arch not in MODELS or mode not in ("train", "infer"):
            raise ValueError(f"unknown workload {name}")
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.train = mode == "train"
        self.model = MODELS[arch](num_classes=1000)
        self.x = torch.randn(batch, 3, size, size)
        self.y = torch.randint(0, 1000, (batch,))
        if self.train:
            self.model.train()
            self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        else:
            self.model.eval()
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.model(self.x)
        # A train step is a forward pass and a backward pass of twice its cost.
        self.flops = counter.get_total_flops() * (3 if self.train else 1)
        reset_peak_rss()

    def step(self):
        start = time.perf_counter()
        if self.train:
            self.optim.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
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
                workload = Workload(msg["workload"], msg["batch"], msg["size"], msg["threads"])
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
