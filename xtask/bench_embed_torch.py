"""The `cargo xtask bench embed` workload through HF transformers (PyTorch), for a speed ratio.

ITC-only BLIP image embedding: `BlipForImageTextRetrieval`'s vision tower and projection
(vision_model -> last_hidden_state[:, 0] -> vision_proj -> L2 normalise) on preprocessed pixels,
torch.inference_mode, f32 (or bf16 weights), images/s at each batch size. The xtask launches this
script with `--serve` and the random BLIP-base checkpoint it wrote (`--weights`), so both sides run
the same weights: it loads them, embeds the xtask's probe pixels (`--probe`, for the parity check),
then runs one timed round per "round [BATCH]" line on stdin (all batch sizes, or the one named),
printing one JSON line per round, and so the two sides alternate in one sitting. Without `--serve`
it runs `--rounds` rounds on its own.

    pip install torch transformers
    cargo xtask bench embed            # launches this script itself
    python3 xtask/bench_embed_torch.py [--weights DIR] [--size 224] [--batches 1,16] [--images 32] \\
        [--rounds 3] [--threads 2] [--out target/bench/embed-torch.json]
"""
import json, os, sys, time

import torch
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval

from bench_common import machine, parser, setup, sync

p = parser(__doc__.split("\n")[0])
p.add_argument("--weights", help="folder with the random BLIP-base model.safetensors the xtask wrote "
                                 "(default: PyTorch's own random initialisation)")
p.add_argument("--size", type=int, default=224)
p.add_argument("--batches", default="1,16")
p.add_argument("--images", type=int, default=32, help="images embedded per batch size and round")
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--probe", help="safetensors file with `pixels`: embeds them once and writes `embeddings` "
                               "beside it (PROBE.torch.safetensors)")
p.add_argument("--serve", action="store_true", help="one timed round per 'round [BATCH]' line on stdin")
args = p.parse_args()
device, dtype = setup(args)
batches = [int(b) for b in args.batches.split(",")]

torch.manual_seed(0)
cfg = BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(image_size=args.size))
model = BlipForImageTextRetrieval(cfg).eval()
if args.weights:
    from safetensors.torch import load_file
    state = load_file(os.path.join(args.weights, "model.safetensors"))
    state = {k: v for k, v in state.items() if k.startswith(("vision_model.", "vision_proj."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(("vision_model.", "vision_proj."))]
    if missing or unexpected:
        sys.exit(f"the checkpoint does not fit the vision tower: missing {missing}, unexpected {unexpected}")
model = model.to(device=device, dtype=dtype)


def embed(pixels):
    tokens = model.vision_model(pixel_values=pixels).last_hidden_state
    return F.normalize(model.vision_proj(tokens[:, 0]), dim=-1)


if args.probe:
    from safetensors.torch import load_file, save_file
    with torch.inference_mode():
        pixels = load_file(args.probe)["pixels"].to(device=device, dtype=dtype)
        out = embed(pixels).float().cpu().contiguous()
    save_file({"embeddings": out}, args.probe.removesuffix(".safetensors") + ".torch.safetensors")

pixels = {b: torch.randn(b, 3, args.size, args.size, device=device, dtype=dtype) for b in batches}


def one_round(only=None):
    """`images` images (rounded up to whole batches) at each batch size (or at `only`); seconds and
    images/s."""
    out = []
    for b in [only] if only else batches:
        steps = -(-args.images // b)
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(steps):
                embed(pixels[b]).float().cpu()
            sync(device)
            secs = time.perf_counter() - start
        out.append({"batch": b, "images": steps * b, "seconds": secs, "images_per_s": steps * b / secs})
    return out


with torch.inference_mode():  # warm-up: one batch of each size
    for b in batches:
        embed(pixels[b]).float().cpu()

header = {"machine": machine(device), "dtype": args.dtype, "torch": torch.__version__,
          "attn_implementation": getattr(model.config, "_attn_implementation", None)}
rounds = []
if args.serve:
    print(json.dumps({"ready": header}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words and words[0] == "round":  # "round" or "round BATCH"
            r = one_round(int(words[1]) if len(words) > 1 else None)
            rounds.append(r)
            print(json.dumps({"round": r}), flush=True)
else:
    for i in range(args.rounds):
        r = one_round()
        rounds.append(r)
        print(f"round {i}: " + ", ".join(f"batch {x['batch']}: {x['images_per_s']:.2f} images/s" for x in r), flush=True)
if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump({**header, "workload": "BLIP ITC image embedding (PyTorch)", "size": args.size, "rounds": rounds},
              open(args.out, "w"), indent=2)
