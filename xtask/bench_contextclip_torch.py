"""The `cargo xtask bench contextclip-step` workload in PyTorch (HF transformers towers), for a ratio.

The small ContextCLIP of `ContextClipConfig::small(64)`: CLIP's ViT (4 layers, width 128, 4 heads, MLP
512, patch 8, 64 px, exact GELU) and BERT (2 layers, width 128, 4 heads, FFN 512, bert-base-uncased
vocabulary, no pooler), the base code's projection heads (128-d, dropout 0.1), cosine InfoNCE with
hard targets, λ 0.75, learned τ, plus 0.5 × the contextual loss ("samples", h 0.5); AdamW step.
Random pixels, fixed 24-token captions, batch 32, f32 or bf16 autocast. Run `cargo xtask bench
contextclip-step` with the same device and precision first and pass its JSON as --ours.

    pip install torch transformers
    python3 xtask/bench_contextclip_torch.py [--steps 10] [--threads N] [--device cuda --dtype bf16] \
        [--ours target/bench/contextclip_step-cpu-f32.json]
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

from bench_common import finish, machine, parser, peak_memory, profile, setup, timed

p = parser(__doc__.split("\n")[0], profiling=True)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--tokens", type=int, default=24)
args = p.parse_args()
device, dtype = setup(args)


class Head(nn.Module):
    def __init__(self, d, p=128):
        super().__init__()
        self.projection, self.fc, self.layer_norm = nn.Linear(d, p), nn.Linear(p, p), nn.LayerNorm(p)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        p = self.projection(x)
        return self.layer_norm(p + self.dropout(self.fc(F.gelu(p))))


def contextual(x, y, h=0.5, eps=1e-5):
    mu = y.mean(0, keepdim=True)
    cos = F.normalize(x - mu, dim=-1) @ F.normalize(y - mu, dim=-1).T
    d = (1 - cos).clamp_min(0)
    d = d / (d.min(-1, keepdim=True).values + eps)
    cx = F.softmax((1 - d) / h, dim=-1).max(0).values.mean()
    return -torch.log(cx + eps)


torch.manual_seed(0)
vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                          num_attention_heads=4, image_size=64, patch_size=8, hidden_act="gelu"))
text = BertModel(BertConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64), add_pooling_layer=False)
heads = nn.ModuleList([Head(128), Head(128)])
vision, text, heads = vision.to(device), text.to(device), heads.to(device)
log_tau = nn.Parameter(torch.tensor(0.07, device=device).log())
params = list(vision.parameters()) + list(text.parameters()) + list(heads.parameters()) + [log_tau]
opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)
B, T = args.batch, args.tokens
pixels = torch.randn(B, 3, 64, 64, device=device)
ids = torch.tensor([[101] + [1000 + (b * 7 + t) % 20000 for t in range(1, T - 1)] + [102] for b in range(B)], device=device)
mask = torch.ones(B, T, dtype=torch.long, device=device)
targets = torch.arange(B, device=device)


def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        img = heads[0](vision(pixel_values=pixels).pooler_output).float()
        txt = heads[1](text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]).float()
    logits = F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T / log_tau.exp()
    clip = (0.75 * F.cross_entropy(logits.T, targets, reduction="none")
            + 0.25 * F.cross_entropy(logits, targets, reduction="none")).mean()
    loss = clip + 0.5 * contextual(img, txt)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


times = timed(step, device, args.steps)
secs = sum(times)
sps = args.steps * B / secs
print(f"PyTorch {torch.__version__} on {device} ({args.dtype}), {torch.get_num_threads()} threads: {sps:.1f} samples/s")
record = {"workload": "ContextCLIP small step (PyTorch)", "batch": B, "tokens": T, "steps": args.steps,
          "precision": args.dtype, "seconds": secs, "samples_per_s": sps, "machine": machine(device), **peak_memory(device)}
finish(args, record, "samples_per_s", higher_is_better=True)
if args.profile:
    profile(step, device, args.profile)
