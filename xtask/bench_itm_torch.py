"""The `cargo xtask bench itm` workload through HF transformers (PyTorch), for a speed ratio.

BLIP-base (`BlipForImageTextRetrieval`, random weights), one 35-token description against 10 images,
ITC (text-only pass + projections) and ITM ([ENC] pass with cross-attention to each image), at 224 and
384 px, float32, torch.no_grad, PyTorch's default thread count. Run `cargo xtask bench itm` first: the
ratio is printed against its `target/bench/itm.json`.

    pip install torch transformers
    python3 xtask/bench_itm_torch.py [--sets 3] [--sizes 224,384]
"""
import argparse, json, os, time

import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval

p = argparse.ArgumentParser()
p.add_argument("--sets", type=int, default=3)
p.add_argument("--sizes", default="224,384")
p.add_argument("--tokens", type=int, default=35)
args = p.parse_args()

ours = {}
path = os.path.join(os.path.dirname(__file__), "..", "target", "bench", "itm.json")
if os.path.exists(path):
    ours = {r["image_size"]: r["sets_per_s"] for r in json.load(open(path))["results"]}

torch.manual_seed(0)
for size in [int(s) for s in args.sizes.split(",")]:
    cfg = BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(image_size=size))
    model = BlipForImageTextRetrieval(cfg).eval()
    pixels = torch.randn(10, 3, size, size)
    ids = torch.arange(1000, 1000 + args.tokens).unsqueeze(0)
    ids[0, 0] = 101
    enc_ids = ids.clone()
    enc_ids[0, 0] = 30523
    mask = torch.ones_like(ids)

    def one_set():
        with torch.no_grad():
            img = model.vision_model(pixels).last_hidden_state
            txt = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            itc = F.normalize(model.vision_proj(img[:, 0]), dim=-1) @ F.normalize(model.text_proj(txt[:, 0]), dim=-1).T
            fused = model.text_encoder(input_ids=enc_ids.expand(10, -1), attention_mask=mask.expand(10, -1),
                                       encoder_hidden_states=img,
                                       encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state
            itm = model.itm_head(fused[:, 0]).softmax(-1)[:, 1]
            return float(itc.sum() + itm.sum())

    one_set()
    start = time.perf_counter()
    for _ in range(args.sets):
        one_set()
    secs = time.perf_counter() - start
    sps = args.sets / secs
    line = f"torch itm {size}px: {args.sets} sets in {secs:.2f} s -> {sps:.3f} sets/s (threads {torch.get_num_threads()})"
    if size in ours:
        line += f"; ctxalign {ours[size]:.3f} sets/s, ratio ctxalign/torch = {ours[size] / sps:.2f}"
    print(line, flush=True)
