"""The `cargo xtask bench itm` workload through HF transformers (PyTorch), for a speed ratio.

BLIP-base (`BlipForImageTextRetrieval`, random weights), one 35-token description against 10 images,
ITC (text-only pass + projections) and ITM ([ENC] pass with cross-attention to each image), at 224 and
384 px, torch.no_grad, in f32 or bf16 weights, on the CPU (PyTorch's default thread count) or a GPU.
Run `cargo xtask bench itm` with the same device and dtype first and pass its JSON as --ours.

    pip install torch transformers
    python3 xtask/bench_itm_torch.py [--sets 3] [--sizes 224,384] [--device cuda --dtype bf16] \\
        [--ours target/bench/itm-cpu-f32.json] [--out target/bench/itm-torch.json]
"""
import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval

from bench_common import finish, machine, parser, peak_memory, setup, timed

p = parser(__doc__.split("\n")[0])
p.add_argument("--sets", type=int, default=3)
p.add_argument("--sizes", default="224,384")
p.add_argument("--tokens", type=int, default=35)
args = p.parse_args()
device, dtype = setup(args)

torch.manual_seed(0)
results = []
for size in [int(s) for s in args.sizes.split(",")]:
    cfg = BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(image_size=size))
    model = BlipForImageTextRetrieval(cfg).eval().to(device=device, dtype=dtype)
    pixels = torch.randn(10, 3, size, size, device=device, dtype=dtype)
    ids = torch.arange(1000, 1000 + args.tokens, device=device).unsqueeze(0)
    ids[0, 0] = 101
    enc_ids = ids.clone()
    enc_ids[0, 0] = 30523
    mask = torch.ones_like(ids)

    def one_set():
        with torch.no_grad():
            img = model.vision_model(pixels).last_hidden_state
            txt = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            itc = F.normalize(model.vision_proj(img[:, 0]), dim=-1) @ F.normalize(model.text_proj(txt[:, 0]), dim=-1).T
            att = torch.ones(img.shape[:2], dtype=torch.long, device=device)
            fused = model.text_encoder(input_ids=enc_ids.expand(10, -1), attention_mask=mask.expand(10, -1),
                                       encoder_hidden_states=img, encoder_attention_mask=att).last_hidden_state
            itm = model.itm_head(fused[:, 0]).float().softmax(-1)[:, 1]
            return float(itc.float().sum() + itm.sum())

    times = timed(one_set, device, args.sets)
    secs = sum(times)
    sps = args.sets / secs
    print(f"torch itm {size}px ({device}, {args.dtype}): {args.sets} sets in {secs:.2f} s -> {sps:.3f} sets/s", flush=True)
    results.append({"image_size": size, "sets": args.sets, "seconds": secs, "sets_per_s": sps})
    del model

record = {"workload": "BLIP-base ITM+ITC, 1 description vs 10 images (PyTorch)", "tokens": args.tokens,
          "dtype": args.dtype, "machine": machine(device), "results": results, **peak_memory(device)}
# Ratios per image size against ctxalign's record.
import json, os
if args.ours and os.path.exists(args.ours):
    ours = {r["image_size"]: r["sets_per_s"] for r in json.load(open(args.ours))["results"]}
    for r in results:
        if r["image_size"] in ours:
            r["ctxalign_sets_per_s"] = ours[r["image_size"]]
            r["speed_ratio_ctxalign_over_torch"] = ours[r["image_size"]] / r["sets_per_s"]
            print(f"{r['image_size']} px: ctxalign {ours[r['image_size']]:.3f} sets/s -> ratio ctxalign/PyTorch = "
                  f"{r['speed_ratio_ctxalign_over_torch']:.2f}x")
args.ours = None
finish(args, record, "seconds", higher_is_better=False)
