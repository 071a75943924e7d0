"""Prefill speed of causal FNA vs exact attention in a tiny random Llama at a long context, and the
KV cache each leaves for decoding with the counted FLOPs of one decoding step on it; prefill timed
in one process, in alternating rounds.

    python benchmarks/causal_prefill.py --tokens 4096 --m 64 --rounds 5

Prints the prefill latency ratio (exact / FNA) beside its bounds: the attention FLOP ratio and the
Amdahl bound from the counted share of attention in the whole forward.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    import transformers as tr

    import fnabench
    from fnabench.measure import count_flops
    from fnabench.patching.kv_cache import cache_bytes

    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.tokens + 16)
    lm = tr.LlamaForCausalLM(cfg).eval().to(args.device)
    ids = torch.randint(0, 1000, (1, args.tokens), device=args.device)
    specs = {"exact": "exact", "fna": f"fna:m={args.m}"}

    def prefill(spec):
        with torch.no_grad(), fnabench.patch(lm, spec):
            out = lm(ids, use_cache=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    times = {k: [] for k in specs}
    for spec in specs.values():  # warm-up
        prefill(spec)
    for _ in range(args.rounds):
        for name, spec in specs.items():
            t0 = time.perf_counter()
            prefill(spec)
            times[name].append(time.perf_counter() - t0)
    ratios = [e / f for e, f in zip(times["exact"], times["fna"], strict=True)]
    flops = {}
    for name, spec in specs.items():
        with torch.no_grad(), fnabench.patch(lm, spec):
            flops[name] = count_flops(lambda x: lm(x, use_cache=False).logits, ids)
    share = flops["exact"].attention / flops["exact"].total
    attn_ratio = flops["exact"].attention / flops["fna"].attention
    amdahl = 1 / ((1 - share) + share / attn_ratio)
    cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    caches, steps = {}, {}
    for name, spec in specs.items():  # the cache each prefill leaves, and one decoding step on it
        out = prefill(spec)
        cache = getattr(out, cache_kw)
        caches[name] = cache_bytes(cache)
        with torch.no_grad(), fnabench.patch(lm, spec):
            steps[name] = count_flops(lambda x, c=cache: lm(x, use_cache=True, **{cache_kw: c}).logits,
                                      out.logits[:, -1:].argmax(-1))
    print(f"device {args.device}, {torch.get_num_threads()} threads, Llama {args.layers}x{args.hidden} "
          f"({args.heads} heads, {args.kv_heads} kv), {args.tokens} tokens, FNA m={args.m}, {args.rounds} rounds")
    for name in specs:
        print(f"  {name:5s} prefill median {statistics.median(times[name]):.3f} s  "
              f"(rounds {', '.join(f'{t:.3f}' for t in times[name])}); "
              f"GFLOPs {flops[name].total / 1e9:.2f} (attention {flops[name].attention / 1e9:.2f}); "
              f"KV cache {caches[name] / 2**20:.2f} MiB; decode step GFLOPs {steps[name].total / 1e9:.4f} "
              f"(attention {steps[name].attention / 1e9:.4f})")
    print(f"  speed-up exact/fna: median {statistics.median(ratios):.2f}x "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f}); "
          f"attention FLOP ratio {attn_ratio:.1f}x; Amdahl bound {amdahl:.2f}x (attention {share:.0%} of FLOPs)")
    print(f"  landmark KV cache / full: {caches['fna'] / caches['exact']:.4f}")


if __name__ == "__main__":
    main()
