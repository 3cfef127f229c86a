"""The `cargo xtask bench s0-step` workload in PyTorch: one ContextBLIP S0 training step at BLIP-base.

HF `BlipForImageTextRetrieval` (random weights, frozen, eval) plus the modules ctxalign trains, with
the same sizes and so the same trainable count (41.5 M at 224 px): the multi-scale adapter (taps
3,6,9,12 through the ViT's post-LayerNorm, δ 2, concat, no biases), the text adapter (768→384→768),
the TMIM decoder (4 BERT-style layers of width 768, 8 heads, FFN 3072, cross-attention to the adapted
text, mask token, position table, reconstruction head). One step: the frozen ViT with every hidden
state, ITC similarities (/0.07) for hard negatives, ITM on the adapted image tokens for B positives and
2B hard negatives (cross-attentions kept), the text-guided mask (25 % of patches, from the mean
cross-attention of one text token), an MAE-style pass of the visible patches through the frozen ViT
and the adapter, the decoder, masked-patch MSE; backward; AdamW (lr 3e-4, wd 0.05).

    python3 xtask/bench_s0_torch.py --device cuda --dtype bf16 --ours target/bench/s0_step-cuda0-bf16.json
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BlipConfig, BlipForImageTextRetrieval

from bench_common import finish, machine, median, parser, peak_memory, profile, setup, timed

p = parser(__doc__.split("\n")[0], profiling=True)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--size", type=int, default=224)
p.add_argument("--tokens", type=int, default=30)
args = p.parse_args()
device, dtype = setup(args)
torch.manual_seed(0)


class Attention(nn.Module):
    def __init__(self, d, kv, heads):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(kv, d), nn.Linear(kv, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x, mem, mask=None):
        B, T, D = x.shape
        split = lambda t: t.view(B, t.shape[1], self.h, D // self.h).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(mem)), split(self.v(mem)), attn_mask=mask)
        return self.norm(x + self.o(a.transpose(1, 2).reshape(B, T, D)))


class DecoderLayer(nn.Module):
    """BERT layer with cross-attention (BLIP's text layer): self-attn, cross-attn, FFN, post-LN."""

    def __init__(self, d, text_d, heads, ffn):
        super().__init__()
        self.self_attn, self.cross = Attention(d, d, heads), Attention(d, text_d, heads)
        self.fc1, self.fc2, self.norm = nn.Linear(d, ffn), nn.Linear(ffn, d), nn.LayerNorm(d, eps=1e-12)

    def forward(self, x, text, text_mask):
        x = self.cross(self.self_attn(x, x), text, text_mask)
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


cfg = BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(image_size=args.size))
blip = BlipForImageTextRetrieval(cfg).eval().to(device)
blip.requires_grad_(False)
if dtype == torch.bfloat16:
    blip.to(dtype)  # frozen weights in bf16, as ctxalign loads them
D, P = 768, (args.size // 16) ** 2
taps = [3, 6, 9, 12]
adapter = nn.ModuleDict(dict(down=nn.ModuleList([nn.Linear(D, D // 2, bias=False) for _ in taps]),
                             up=nn.Linear(len(taps) * D // 2, D, bias=False)))
text_adapter = nn.ModuleDict(dict(fc1=nn.Linear(D, D // 2), fc2=nn.Linear(D // 2, D)))
decoder = nn.ModuleDict(dict(layers=nn.ModuleList([DecoderLayer(D, D, 8, 4 * D) for _ in range(4)]),
                             recon=nn.Linear(D, 16 * 16 * 3)))
mask_embed = nn.Parameter(torch.zeros(1, 1, D, device=device))
pos_embed = nn.Parameter(torch.randn(1, 1 + P, D, device=device) * 0.02)
trainable = nn.ModuleList([adapter, text_adapter, decoder]).to(device)
params = list(trainable.parameters()) + [mask_embed, pos_embed]
n_trainable = sum(p.numel() for p in params)
opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05)

B, T = args.batch, args.tokens
pixels = torch.randn(B, 3, args.size, args.size, device=device, dtype=dtype)
ids = torch.tensor([[101] + [1000 + (b * 5 + t * 7) % 12 for t in range(T - 2)] + [102] for b in range(B)], device=device)
enc_ids = ids.clone()
enc_ids[:, 0] = 30523
mask = torch.ones(B, T, dtype=torch.long, device=device)
k = int(0.25 * P)
vm = blip.vision_model


def adapt(hidden_states, last):
    reduced = [F.relu(down(vm.post_layernorm(hidden_states[t]))) for t, down in zip(taps, adapter["down"])]
    return last + F.relu(adapter["up"](torch.cat(reduced, -1)))


def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with torch.no_grad():
            vision = vm(pixel_values=pixels, output_hidden_states=True)
            img_itc = F.normalize(blip.vision_proj(vision.last_hidden_state[:, 0]), dim=-1)
            text_states = blip.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            txt_itc = F.normalize(blip.text_proj(text_states[:, 0]), dim=-1)
            sim = (img_itc @ txt_itc.T).float() / 0.07
            sim.fill_diagonal_(-math.inf)
            neg_text = torch.multinomial(F.softmax(sim, 1), 1)[:, 0]
            neg_image = torch.multinomial(F.softmax(sim.T, 1), 1)[:, 0]
        adapted = adapt(vision.hidden_states, vision.last_hidden_state)
        att = torch.ones(adapted.shape[:2], dtype=torch.long, device=device)
        pos = blip.text_encoder(input_ids=enc_ids, attention_mask=mask, encoder_hidden_states=adapted,
                                encoder_attention_mask=att, output_attentions=True)
        neg = blip.text_encoder(input_ids=torch.cat([enc_ids, enc_ids[neg_text]]),
                                attention_mask=torch.cat([mask, mask]),
                                encoder_hidden_states=torch.cat([adapted[neg_image], adapted]),
                                encoder_attention_mask=torch.cat([att, att])).last_hidden_state
        logits = blip.itm_head(torch.cat([pos.last_hidden_state[:, 0], neg[:, 0]])).float()
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(device)
        itm = F.cross_entropy(logits, labels)
        with torch.no_grad():  # the text-guided mask: patches most attended by one text token
            attn = torch.stack(pos.cross_attentions).mean((0, 2))[:, 1, 1:]  # [B, P]
            masked = attn.topk(k, dim=-1).indices.sort(-1).values
            keep = torch.ones(B, P, dtype=torch.bool, device=device)
            keep[torch.arange(B, device=device)[:, None], masked] = False
            tokens = vision.hidden_states[0]
            visible = torch.cat([tokens[:, :1], tokens[:, 1:][keep].view(B, P - k, D)], 1)
            hidden = [visible]  # the encoder layer by layer: its hidden-state output differs across versions
            for layer in vm.encoder.layers:
                out = layer(hidden[-1])
                hidden.append(out[0] if isinstance(out, tuple) else out)
        vis_adapted = adapt(hidden, vm.post_layernorm(hidden[-1]))
        text = text_states + F.relu(text_adapter["fc2"](F.relu(text_adapter["fc1"](text_states))))
        full = pos_embed.expand(B, -1, -1).clone().to(vis_adapted.dtype)
        full[:, 0] = vis_adapted[:, 0]
        full[:, 1:][keep] = vis_adapted[:, 1:].reshape(-1, D)
        full[:, 1:][~keep] = (pos_embed[:, 1:].expand(B, -1, -1)[~keep] + mask_embed[0]).to(full.dtype)
        h = full
        for layer in decoder["layers"]:
            h = layer(h, text, None)
        pred = decoder["recon"](h[:, 1:][~keep]).float()
        patches = pixels.float().view(B, 3, args.size // 16, 16, args.size // 16, 16).permute(0, 2, 4, 3, 5, 1)
        target = patches.reshape(B, P, -1)[~keep]
        tmim = F.mse_loss(pred, target)
        loss = itm + tmim
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


times = timed(step, device, args.steps)
per_step = median(times)
print(f"PyTorch {torch.__version__} s0-step on {device} ({args.dtype}): {n_trainable} trainable, "
      f"median {per_step:.3f} s/step over {args.steps}")
record = {"workload": "ContextBLIP S0 step (PyTorch)", "image_size": args.size, "batch": B, "tokens": T,
          "steps": args.steps, "precision": args.dtype, "trainable_parameters": n_trainable,
          "seconds_per_step": per_step, "step_seconds": times, "samples_per_s": B / per_step,
          "machine": machine(device), **peak_memory(device)}
finish(args, record, "seconds_per_step", higher_is_better=False)
if args.profile:
    profile(step, device, args.profile)
