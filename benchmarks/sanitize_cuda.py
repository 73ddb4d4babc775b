"""The CUDA backend's forward and backward on small awkward shapes, for compute-sanitizer (memcheck, racecheck).

  compute-sanitizer --tool memcheck python benchmarks/sanitize_cuda.py
  compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py

Shapes: T not a multiple of the 64-row tile, GQA, windows wider than T, a 1-key window, sinks of 1 and of 64, both
head dims and both 16-bit dtypes. Checks each result against the reference too (the sanitizer slows the kernels,
not their results)."""
import sys

import torch

from dash_kernels import mixed_attention, mixed_attention_reference

CASES = [
    # (B, T, Hq, Hkv, D, dtype, windows, sinks)
    (1, 77, 4, 2, 64, torch.bfloat16, [None, 1, 100, 9], [0, 0, 0, 1]),
    (2, 130, 2, 1, 128, torch.float16, [None, 64, 17], [0, 0, 64]),
    (1, 5, 2, 2, 128, torch.bfloat16, [3, None], [1, 0]),
    # long enough for runs of plain tiles (one band, no snapshot): the overlapped walk (DASH_CUDA_FWD=sm90overlap)
    (1, 700, 2, 1, 64, torch.bfloat16, [None, 256, 64], [0, 0, 4]),
]


def main() -> int:
    if not torch.cuda.is_available():
        sys.exit("sanitize_cuda: needs a CUDA GPU")
    worst = 0.0
    for batch, seq, hq, hkv, d, dtype, windows, sinks in CASES:
        gen = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(batch, seq, h, d, generator=gen).to("cuda", dtype).requires_grad_()
                   for h in (hq, hkv, hkv))
        w = torch.rand(hq, len(windows), generator=gen).cuda().requires_grad_()
        y = mixed_attention(q, k, v, w, windows, sinks, backend="cuda")
        grads = torch.autograd.grad(y, (q, k, v, w), torch.ones_like(y))
        y_ref = mixed_attention_reference(q, k, v, w, windows, sinks)
        grads_ref = torch.autograd.grad(y_ref, (q, k, v, w), torch.ones_like(y_ref))
        for got, want in zip((y, *grads), (y_ref, *grads_ref)):
            worst = max(worst, ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item())
        print(f"T {seq} D {d} {dtype}: done", flush=True)
    print(f"worst relative error {worst:.2e}")
    return 0 if worst < 5e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
