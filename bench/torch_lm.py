#!/usr/bin/env python3
"""The PyTorch side of bench/bench_lm.cpp: the GPT-2 124M-shaped model written plainly (12 layers,
768 wide, 12 heads, vocab 50257, context 1024, tied head, random weights), float32 on the CPU.

  train step: forward + cross-entropy + backward + AdamW at batch 4 x 64 tokens
  decode:     greedy, KV cache, 4-token prompt then 32 new tokens, batch 1
  LoRA step:  PEFT LoRA rank 16 (alpha 32, no dropout) on every linear of the blocks (q, k, v, o,
              fc, proj), base frozen, AdamW on the adapters, same batch and loss

Usage: python3 bench/torch_lm.py [--threads 2] [--steps 5] [--json out.json]
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V, C, L, H, CTX = 50257, 768, 12, 12, 1024


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))
        self.fc, self.proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x, cache=None):
        B, T, _ = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(B, T, H, C // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        causal = cache is None or q.shape[2] > 1
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, C))
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(CTX, C)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln_f = nn.LayerNorm(C)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, ids, caches=None, start=0):
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(start, start + T))
        for i, b in enumerate(self.blocks):
            x = b(x, None if caches is None else caches[i])
        return F.linear(self.ln_f(x), self.wte.weight)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--no-lora", action="store_true", help="skip the PEFT LoRA step")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT()
    x = torch.randint(0, V, (4, 64))
    y = torch.randint(0, V, (4, 64))

    def timed_steps(m, params):
        """Median time of a.steps training steps (after 2 warm-up steps) with AdamW on params."""
        o = torch.optim.AdamW(params, lr=1e-4)
        ts = []
        for i in range(a.steps + 2):
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(x).view(-1, V), y.view(-1))
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            if i >= 2:
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    step = timed_steps(model, model.parameters())

    lora_step = None
    if not a.no_lora:
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        lm = get_peft_model(GPT(), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                              target_modules=["q", "k", "v", "o", "fc", "proj"]))
        lora_step = timed_steps(lm, [p for p in lm.parameters() if p.requires_grad])
        del lm
    model.eval()
    with torch.no_grad():
        def decode():
            caches = [dict() for _ in range(L)]
            prompt = torch.tensor([[464, 2068, 7586, 21831]])
            logits = model(prompt, caches, 0)
            tok, pos = logits[:, -1].argmax(-1, keepdim=True), 4
            for _ in range(31):
                logits = model(tok, caches, pos)
                tok, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
        decode()
        dts = []
        for _ in range(3):
            t0 = time.perf_counter()
            decode()
            dts.append(time.perf_counter() - t0)
    dec = 32 / statistics.median(dts)
    res = {"torch": torch.__version__, "threads": a.threads, "train_step_ms": step * 1e3,
           "train_tokens_per_s": 256 / step, "decode_tokens_per_s": dec,
           "lora_step_ms": lora_step * 1e3 if lora_step else None}
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
