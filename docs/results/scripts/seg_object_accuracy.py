#!/usr/bin/env python3
"""Per-object accuracy of a segmentation model's predicted label maps: each ground-truth object
of `densekd data synth --out DIR` gets the majority predicted class over its own labelled pixels
(its class inside its COCO box), and objects are counted right or wrong by area bucket and by
class, with the most common confusions.

Usage: seg_object_accuracy.py DIR PRED  (Pillow; PRED is `densekd predict ... --out PRED`'s
labels/ folder for DIR/images/val; docs/results/deeplabv3.md)
"""
import collections
import json
import os
import sys

from PIL import Image

BUCKETS = [(256, "< 16²"), (1024, "16²–32²"), (4096, "32²–64²"), (float("inf"), "≥ 64²")]


def main(root, pred):
    coco = json.load(open(os.path.join(root, "annotations", "instances_val.json")))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {i["id"]: os.path.splitext(os.path.basename(i["file_name"]))[0] for i in coco["images"]}
    right = collections.defaultdict(lambda: [0, 0])
    confusions = collections.Counter()
    maps = {}
    for a in coco["annotations"]:
        stem = files[a["image_id"]]
        if stem not in maps:
            gt = Image.open(os.path.join(root, "labels", "val", stem + ".png"))
            pr = Image.open(os.path.join(pred, stem + ".png"))
            maps[stem] = (gt.size, gt.load(), pr.load())
        (w, h), gt, pr = maps[stem]
        x, y, bw, bh = a["bbox"]
        cls = a["category_id"]
        votes = collections.Counter(
            pr[u, v]
            for v in range(int(y), min(h, int(y + bh) + 1))
            for u in range(int(x), min(w, int(x + bw) + 1))
            if gt[u, v] == cls
        )
        if not votes:
            continue
        got = votes.most_common(1)[0][0]
        bucket = next(name for limit, name in BUCKETS if a["area"] < limit)
        for key in (bucket, names[cls]):
            right[key][0] += got == cls
            right[key][1] += 1
        if got != cls:
            confusions[(names[cls], names.get(got, "background"))] += 1
    for key in [name for _, name in BUCKETS] + sorted(names.values()):
        ok, n = right[key]
        if n:
            print(f"{key:>10}: {ok:4d} / {n:4d} right ({ok / n:.3f})")
    print("most common confusions (true → predicted):")
    for (t, p), n in confusions.most_common(10):
        print(f"  {t} → {p}: {n}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
