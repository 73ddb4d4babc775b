"""Search-step throughput of a DASH supernet beside its floor, measured in the same run.

floor  = one training step of the frozen plain model (forward + backward through it, as the search needs
         for the logits' gradients) + one teacher forward (no grad)
search = one DASH search step (teacher forward, supernet forward, chunked KL, backward, Adam on the logits)

Default: a Qwen2.5-3B-shaped model with random weights (36 layers, hidden 2048, 16/2 heads, head dim 128,
vocab 151936) at T 4096, bf16, 16K tokens a step, softmax-family candidates. Reports tokens/s, the ratio to
the floor and the projected wall time for 12.3M tokens; writes JSON.

  python benchmarks/bench_search.py --out benchmarks/results/search_step_h200.json
  python benchmarks/bench_search.py --tiny --device cpu        # a smoke run of the same code path
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from dash import build_supernet
from dash.data import PackedData
from dash.search import Search, SearchConfig

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, tie_word_embeddings=True)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def timed(fn, device, repeats):
    fn()  # warm-up (compilation, autotuning, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    import transformers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shape", choices=["qwen2.5-3b", "smollm2-135m"], default="qwen2.5-3b",
                        help="smollm2-135m: the default search's model shape (Llama), 8192 tokens a step")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--candidates", nargs="+", default=["full", "swa512", "swa2048", "sink64_swa512"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also: CUDA time per kernel of one search step")
    parser.add_argument("--compile-modules", action="store_true", help="torch.compile the norms and MLPs")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else (SMOLLM2_135M if args.shape == "smollm2-135m" else QWEN25_3B)
    if args.shape == "smollm2-135m" and args.tokens_per_step == 16384:
        args.tokens_per_step = 8192  # dash search's GPU default: 2 x 4096
    seq = min(args.seq, 128) if args.tiny else args.seq
    batch = max(1, (256 if args.tiny else args.tokens_per_step) // seq)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    if shape is SMOLLM2_135M:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    model = model.to(device=args.device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=args.device)
    embed = model.get_input_embeddings()

    def floor_step():  # teacher forward + frozen forward/backward (gradient w.r.t. the input embeddings)
        with torch.no_grad():
            model.model(ids, use_cache=False)
        inputs = embed(ids).detach().requires_grad_(True)
        hidden = model.model(inputs_embeds=inputs, use_cache=False).last_hidden_state
        hidden.float().square().mean().backward()

    floor_s = timed(floor_step, args.device, args.repeats)
    net = build_supernet(model, args.candidates)
    answers = torch.zeros(batch * 4, seq, dtype=torch.bool)
    answers[:, seq - 16:seq - 8] = True  # the default (answers) objective weights a few positions a row
    data = PackedData(train=torch.randint(0, shape["vocab_size"], (batch * 4, seq)),
                      heldout=torch.randint(0, shape["vocab_size"], (1, seq)), train_answers=answers)
    search = Search(net, data, SearchConfig(tokens=10**9, batch_size=batch, budget=1,
                                            compile_modules=args.compile_modules), "/tmp/dash_bench_search")

    step_answers = answers[:batch].to(ids.device)

    def search_step():
        search.optimizer.zero_grad(set_to_none=True)
        search.loss_terms(ids, step_answers)["loss"].backward()
        search.optimizer.step()

    search_s = timed(search_step, args.device, args.repeats)
    tokens = batch * seq
    result = {
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": "tiny" if args.tiny else f"{args.shape}-shaped (random weights)", "layers": shape["num_hidden_layers"],
        "seq": seq, "batch": batch, "dtype": str(dtype), "candidates": args.candidates,
        "compile_modules": args.compile_modules,
        "floor_step_s": floor_s, "search_step_s": search_s,
        "floor_tokens_per_s": tokens / floor_s, "search_tokens_per_s": tokens / search_s,
        "search_over_floor_throughput": floor_s / search_s,
        "projected_minutes_for_12.3M_tokens": 12.3e6 / (tokens / search_s) / 60,
        "timing": f"median of {args.repeats} steps after one warm-up, wall clock with device synchronisation",
    }
    if args.profile and args.device.startswith("cuda"):
        from profile_kernels import kernel_times

        per_kernel = kernel_times(search_step, iters=2)
        result["search_step_kernels_ms"] = dict(list(per_kernel.items())[:25])
        print(f"CUDA time of one search step: {sum(per_kernel.values()):.1f} ms; top kernels:")
        for name, ms in list(per_kernel.items())[:15]:
            print(f"  {ms:8.2f} ms  {name[:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
