"""Why a layer whose sliding window binds runs exact attention under a variant (docs/variants.md#supported-hosts):
on random Gemma-3-style decoders (3 windowed layers of window 16, then a global one), the relative error of the
logits against the unpatched model when FNA runs in the global layer only (what fnabench does) and when it runs
in every layer with the window ignored (the same weights, the window removed), per seed and sequence length.

    python benchmarks/sliding_window.py [--out benchmarks/results/sliding_window.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys

import torch

import fnabench


def _model(seed: int, window: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=window, pad_token_id=0,
        layer_types=["sliding_attention"] * 3 + ["full_attention"])
    return transformers.Gemma3ForCausalLM(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/sliding_window.csv")
    parser.add_argument("--spec", default="fna:m=16")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for n in (64, 256):
        for seed in range(3):
            model = _model(seed, 16)
            unwindowed = _model(seed, 10**6)
            unwindowed.load_state_dict(model.state_dict())
            ids = torch.randint(1, 96, (1, n), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                ref = model(ids).logits
                with fnabench.patch(model, args.spec) as handle:
                    ours = model(ids).logits
                    exact_layers = sorted(handle.states[next(iter(handle.states))].exact_because)
                with fnabench.patch(unwindowed, args.spec):
                    ignored = unwindowed(ids).logits

            def rel(x: torch.Tensor, ref: torch.Tensor = ref) -> float:
                return ((x - ref).norm() / ref.norm()).item()

            rows.append({"tokens": n, "seed": seed, "spec": args.spec, "window": 16,
                         "exact_layers": " ".join(map(str, exact_layers)),
                         "rel_err_fna_global_only": f"{rel(ours):.4f}",
                         "rel_err_fna_everywhere_window_ignored": f"{rel(ignored):.4f}"})
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with open(args.out, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
