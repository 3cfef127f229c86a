"""The `cargo xtask bench loader` workload through torchvision + torch DataLoader, for a ratio.

Decode JPEG (PIL) -> RandomResizedCrop(size, scale=(0.5, 1.0), bicubic) -> ToTensor -> Normalize
(CLIP mean/std), batches of 64, 2 worker processes (one per core here), over the same caption
images. Run `cargo xtask synth --out /tmp/vg --size 256 --train-sets 0 --valid-sets 0 --test-sets 0
--caption-images 2000 --class-images 0` first, then

    python3 xtask/bench_loader_torch.py /tmp/vg/captions [--workers 2]
"""
import argparse, json, os, time

import torch
from PIL import Image
from torchvision import transforms

p = argparse.ArgumentParser()
p.add_argument("captions_dir")
p.add_argument("--workers", type=int, default=os.cpu_count())
p.add_argument("--size", type=int, default=224)
p.add_argument("--batch", type=int, default=64)
args = p.parse_args()

records = json.load(open(os.path.join(args.captions_dir, "train.json")))
paths = [os.path.join(args.captions_dir, r["image"]) for r in records]
tf = transforms.Compose([
    transforms.RandomResizedCrop(args.size, scale=(0.5, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.ToTensor(),
    transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
])


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return len(paths)

    def __getitem__(self, i):
        return tf(Image.open(paths[i]).convert("RGB"))


loader = torch.utils.data.DataLoader(Images(), batch_size=args.batch, shuffle=True, num_workers=args.workers, prefetch_factor=4 if args.workers else None)
for epoch in range(2):
    start = time.perf_counter()
    n = sum(b.shape[0] for b in loader)
    secs = time.perf_counter() - start
    print(f"torch loader epoch {epoch}: {n} images in {secs:.2f} s = {n / secs:.0f} images/s ({args.workers} workers)", flush=True)
