"""Per-layer gain of restoring one layer to full attention, under the search's two token weightings.

Starting from the all-efficient model (every layer the efficient candidate), restores one layer at a time to full
attention and reports the drop of KL(teacher || hybrid) on rows of the search's own default data, as the plain
mean over tokens (``uniform``) and weighted by the all-efficient model's per-token KL (``long_range``, see
``dash.search``). The top-K layers of each ranking show what each objective rewards, without a search. Runs on the
CPU (SmolLM2, two 2048-token rows: about 30 minutes on 2 cores).

``--hybrids NAME=L1,L2,...``: instead, score given hybrids (those layers full, the rest efficient) under both
weightings: does the objective itself prefer one method's layers to another's?

``--ruler-tasks passkey niah_single_1 ...`` (with ``--hybrids``): score the hybrids on RULER-style prompts instead
of the search's data: each prompt (the ones ``dash.ruler.evaluate`` scores at --seq-len and --ruler-seed; the
comparison evaluates seed 0, the default 1 is unseen) is followed by its first answer, teacher-forced, and only the
answer tokens count: KL(teacher || hybrid), the hybrid's NLL of the answer, teacher-forced exact match (every answer
token the argmax) and the margins of the true token's logit over the best other one. Does a retrieval-answer
objective rank the hybrids as RULER does, where the search data's KL does not? ``--greedy`` adds the RULER score of
greedy decoding on the same prompts.

  python benchmarks/diagnose_restore_gains.py --model SmolLM2-135M-Instruct.Q4_1.gguf --seq-len 2048 --rows 2
  python benchmarks/diagnose_restore_gains.py --seq-len 4096 --hybrids dash=0,6,7 kl_restore=7,14,15
  python benchmarks/diagnose_restore_gains.py --seq-len 2048 --ruler-tasks passkey --ruler-samples 2 --hybrids ...

``--calibration`` (with ``--hybrids``): score them on `dash compare`'s own calibration rows (``comparison_data``:
the same rows for the same --seq-len, --retrieval-fraction, --calibration-tokens and seed, and transformers
version: the data digest printed is the search folders' ``_data<digest>``) under the discrete losses the
comparison uses: the ``answers`` objective's KL (the search and the refinement), the ``answers_nll`` objective,
the ``answers_margin`` objective, and the answer-weighted NLL that ppl_drop ranks layers by. Which of them picks
the RULER-better layer where a search ends undecided? On a GPU (``--device cuda``) seconds per hybrid; on the CPU (the "sdpa" attention
backend) about 20 s per hybrid and 4K-token row. ``--json`` writes the numbers (after each hybrid).

  python benchmarks/diagnose_restore_gains.py --device cuda --calibration --hybrids a=7,18,23 b=17,18,23
"""
import argparse
import time

import torch

from dash.data import default_data
from dash.models import load_model
from dash.search import greedy_margin, token_kl
from dash.supernet import build_supernet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="as for `dash search` (default: the embedded SmolLM2)")
    parser.add_argument("--efficient", default="sink64_swa512")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048; 4096 with --calibration (the "
                        "comparison's)")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--budgets", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--hybrids", nargs="+", default=[], metavar="NAME=LAYERS",
                        help="score these hybrids (comma-separated full layers) instead of the per-layer gains")
    parser.add_argument("--ruler-tasks", nargs="+", default=[], help="score --hybrids on these RULER tasks' answers")
    parser.add_argument("--ruler-samples", type=int, default=2, help="prompts per RULER task (at --seq-len)")
    parser.add_argument("--ruler-seed", type=int, default=1, help="the RULER prompts' seed (the comparison scores "
                        "seed 0: its own prompts, teacher-forced)")
    parser.add_argument("--greedy", action="store_true", help="with --ruler-tasks: also greedy-decode the prompts "
                        "and score them as RULER does")
    parser.add_argument("--calibration", action="store_true", help="score --hybrids on `dash compare`'s calibration "
                        "rows under its discrete losses")
    parser.add_argument("--calibration-tokens", type=int, default=65536)
    parser.add_argument("--retrieval-fraction", type=float, default=0.5)
    parser.add_argument("--prompts-per-row", type=int, default=1, help="with --calibration: retrieval prompts a row "
                        "(`dash compare --prompts-per-row`)")
    parser.add_argument("--retrieval-tasks", nargs="+", default=None, metavar="TASK[:WEIGHT]", help="with "
                        "--calibration: the retrieval rows' tasks and shares (`dash compare --retrieval-tasks`, "
                        "explicit weights)")
    parser.add_argument("--answer-first-weights", type=float, nargs="+", default=[1.0],
                        help="with --calibration: each prompt's first answer position weighs this many of its others "
                             "in the answers_nll / answers_margin objectives (`--answer-first-weight`), one score each")
    parser.add_argument("--answer-weights", type=float, nargs="+", default=[1.0],
                        help="with --calibration: the answer weights to score each hybrid's losses at")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="with --calibration: write the scores to this file")
    args = parser.parse_args(argv)
    if args.calibration and (not args.hybrids or args.ruler_tasks):
        parser.error("--calibration scores --hybrids (and not with --ruler-tasks)")
    args.seq_len = args.seq_len or (4096 if args.calibration else 2048)
    if args.ruler_tasks and not args.hybrids:
        parser.error("--ruler-tasks scores --hybrids: name some")
    hybrids = {}
    for spec in args.hybrids:
        name, _, layers = spec.partition("=")
        try:
            hybrids[name] = [int(x) for x in layers.split(",") if x]
        except ValueError:
            parser.error(f"--hybrids expects NAME=L1,L2,... (integers), got {spec!r}")
    on_gpu = args.device.startswith("cuda")
    model, tokenizer = load_model(args.model, device=args.device, dtype=torch.bfloat16 if on_gpu else torch.float32)
    net = build_supernet(model, ["full", args.efficient])
    if args.calibration:
        return score_calibration(net, tokenizer, hybrids, args)
    if args.ruler_tasks:
        return score_ruler_answers(model, tokenizer, net, hybrids, args.ruler_tasks, args.seq_len,
                                   args.ruler_samples, args.ruler_seed, args.greedy)
    rows = default_data(tokenizer, args.seq_len, args.rows * args.seq_len * 3, seed=0).train[: args.rows]
    head = model.get_output_embeddings()
    num_layers = len(net.states)

    def hybrid_kl(choice, teacher):
        out = []
        with torch.no_grad(), net.fixed(choice):
            for i, row in enumerate(rows):
                hidden = model.base_model(row[None], use_cache=False).last_hidden_state[0]
                out.append(token_kl(hidden, teacher[i], head.weight, head.bias))
        return torch.cat(out)

    started = time.time()
    with torch.no_grad(), net.teacher():
        teacher = [model.base_model(row[None], use_cache=False).last_hidden_state[0] for row in rows]
    efficient = hybrid_kl([1] * num_layers, teacher)
    weights = efficient / efficient.mean()
    top = weights.sort(descending=True).values[: len(weights) // 20].sum() / weights.sum()
    print(f"all-efficient KL {efficient.mean():.4f}; weight share of the top 5% tokens {top:.2f}", flush=True)
    if hybrids:
        for name, layers in hybrids.items():
            kl = hybrid_kl([0 if i in layers else 1 for i in range(num_layers)], teacher)
            print(f"{name:14s} full {layers}: uniform KL {kl.mean():.5f}  long_range KL {(weights * kl).mean():.5f}"
                  f"  ({time.time() - started:.0f} s)", flush=True)
        return
    gains = {"uniform": [], "long_range": []}
    for layer in range(num_layers):
        restored = hybrid_kl([0 if i == layer else 1 for i in range(num_layers)], teacher)
        gains["uniform"].append(float((efficient - restored).mean()))
        gains["long_range"].append(float((weights * (efficient - restored)).mean()))
        print(f"layer {layer:2d}: uniform gain {gains['uniform'][-1]:.5f}  long_range gain "
              f"{gains['long_range'][-1]:.5f}  ({time.time() - started:.0f} s)", flush=True)
    for name, gain in gains.items():
        order = sorted(range(num_layers), key=lambda i: -gain[i])
        print(name, "top K:", " ".join(f"{k}: {sorted(order[:k])}" for k in args.budgets))


def score_calibration(net, tokenizer, hybrids, args):
    """Each hybrid's discrete losses on the comparison's calibration rows, at every --answer-weights entry.

    One forward pass per hybrid and row: the per-token KL(teacher || hybrid) and next-token NLL are kept, and every
    loss is a weighted mean of them (``dash.baselines._loss``'s definitions: the ``answers`` objective's KL, the
    ``answers_nll`` objective, ppl_drop's answer-weighted NLL), so extra answer weights cost nothing."""
    import json

    from dash.baselines import teacher_hidden_states
    from dash.compare import comparison_data
    from dash.data import parse_retrieval_tasks
    from dash.search import (answer_margin_shortfall, answer_weights, kl_from_log_probs, label_nll,
                             prompt_answer_weights)

    seq_len = args.seq_len
    tasks = parse_retrieval_tasks(getattr(args, "retrieval_tasks", None), name="--retrieval-tasks")
    made = comparison_data(tokenizer, seq_len, 12_300_000, args.retrieval_fraction, args.calibration_tokens,
                           device=args.device, prompts_per_row=args.prompts_per_row, retrieval_tasks=tasks)
    rows, answers = made["calibration"], made["answers"]
    if answers is None or not bool(answers.any()):
        raise SystemExit("--calibration needs retrieval rows among the calibration rows (--retrieval-fraction > 0)")
    digest = made["data"].digest()
    prompts = int((answers & ~torch.nn.functional.pad(answers[:, :-1], (1, 0), value=False)).sum())
    print(f"data digest {digest[:8]}; {rows.shape[0]} calibration rows of {seq_len} tokens, "
          f"{int((answers.sum(-1) > 0).sum())} with answers, {prompts} prompts", flush=True)
    started = time.time()
    teacher = teacher_hidden_states(net, rows)
    model = net.model
    head = model.get_output_embeddings()
    num_layers, scores = len(net.states), {}
    for name, layers in hybrids.items():
        kl, nll, short = [], [], []  # per row: [T] KL at each position, [T - 1] NLL and margin shortfall
        with torch.no_grad(), net.fixed([0 if i in layers else 1 for i in range(num_layers)]):
            for i, row in enumerate(rows):
                hidden = model.base_model(row[None], use_cache=False).last_hidden_state[0]
                logits = head(hidden).float()
                logp = torch.log_softmax(logits, -1)
                # the teacher's logits again per hybrid: kept for all rows they would take [rows, T, V] floats
                teacher_logits = head(teacher[i]).float()
                kl.append(kl_from_log_probs(logp, torch.log_softmax(teacher_logits, -1)))
                nll.append(label_nll(logp[:-1], row[1:]))
                short.append(answer_margin_shortfall(logits[:-1], teacher_logits[:-1], row[1:]))
        kl, nll, short = torch.stack(kl), torch.stack(nll), torch.stack(short)
        losses = {}
        for weight in args.answer_weights:
            token_w = answer_weights(answers, weight)
            losses[str(weight)] = {"answers_kl": float((kl * token_w).mean()),
                                   "ppl_drop_nll": float((nll * token_w[:, :-1]).mean())}
            for first in args.answer_first_weights:
                prompt_w = prompt_answer_weights(answers, weight, first)
                tag = "" if first == 1.0 else f"_first{first:g}"
                losses[str(weight)].update({
                    f"answers_nll_objective{tag}": float((kl.sum() + (nll * prompt_w[:, :-1]).sum()) / kl.numel()),
                    f"answers_margin_objective{tag}":
                        float((kl.sum() + (short * prompt_w[:, :-1]).sum()) / kl.numel())})
        scores[name] = {"full_layers": layers, "losses": losses, "mean_kl": float(kl.mean()),
                        "answers_kl_alone": float(kl[answers].mean()), "mean_nll": float(nll.mean())}
        print(f"{name:16s} full {layers}: mean KL {scores[name]['mean_kl']:.5f}  answers' KL "
              f"{scores[name]['answers_kl_alone']:.5f}  " + "  ".join(
                  f"w{w}: " + " ".join(f"{key.replace('_objective', '')} {value:.5f}" for key, value in v.items())
                  for w, v in losses.items()) + f"  ({time.time() - started:.0f} s)",
              flush=True)
        if args.json:  # after each hybrid: a long CPU run keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"data_digest": digest, "seq_len": seq_len, "answer_weights": args.answer_weights,
                           "answer_first_weights": args.answer_first_weights, "prompts_per_row": args.prompts_per_row,
                           "scores": scores}, f, indent=1)
    return scores


def score_ruler_answers(model, tokenizer, net, hybrids, tasks, length, samples_per_task, seed=1, greedy=False):
    """Each hybrid (and the teacher, and the all-efficient model) teacher-forced on RULER-style prompts: the prompts
    ``dash.ruler.evaluate`` would score at ``length`` and ``seed`` (the answer budget inside the length), each
    followed by its first answer; only the answer tokens count. ``greedy``: also the RULER score of greedy
    decoding on the same prompts (``dash.ruler.evaluate`` itself), to set the teacher-forced measures beside it."""
    from dash.ruler import MAX_NEW_TOKENS, _evaluation_samples, evaluate

    rows = []  # (task, ids, answer positions: the logits that predict the answer's tokens)
    for task in tasks:
        for sample in _evaluation_samples(tokenizer, task, length - MAX_NEW_TOKENS.get(task, 32), samples_per_task,
                                          seed):
            prompt = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
            answer = tokenizer(" " + sample.answers[0], add_special_tokens=False)["input_ids"]
            ids = torch.tensor(prompt + answer)
            rows.append((task, ids, torch.arange(len(prompt) - 1, len(ids) - 1)))
    head = model.get_output_embeddings()
    num_layers = len(net.states)
    started = time.time()

    def answer_hidden(row):
        _, ids, at = row
        return model.base_model(ids[None], use_cache=False).last_hidden_state[0, at]

    with torch.no_grad(), net.teacher():
        teacher = [answer_hidden(row) for row in rows]
    print(f"{len(rows)} prompts of {length} tokens, tasks {tasks}, seed {seed} ({time.time() - started:.0f} s)",
          flush=True)
    for name, layers in {"teacher": list(range(num_layers)), "all_efficient": [], **hybrids}.items():
        choice = [0 if i in layers else 1 for i in range(num_layers)]
        # per prompt: the answer tokens' mean KL and NLL; whether every answer token is the argmax (teacher-forced
        # exact match: greedy decoding would write the answer); the first token's and the smallest margin of the
        # true token's logit over the best other one (how near greedy decoding is to going wrong)
        metrics = ("kl", "nll", "exact", "first_margin", "min_margin")
        scores = {m: {t: [] for t in tasks} for m in metrics}
        with torch.no_grad(), net.fixed(choice):
            for row, t_hidden in zip(rows, teacher):
                task, ids, at = row
                hidden = answer_hidden(row)
                logits = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
                margin = greedy_margin(logits, ids[at + 1])
                values = (token_kl(hidden, t_hidden, head.weight, head.bias).mean(),
                          -torch.log_softmax(logits, -1).gather(-1, ids[at + 1, None]).mean(),
                          (margin > 0).all().float(), margin[0], margin.min())
                for m, v in zip(metrics, values):
                    scores[m][task].append(float(v))
            if greedy:
                ruler = evaluate(model, tokenizer, [length], tasks, samples_per_task, seed, progress=False)
                scores["greedy"] = {t: [ruler["scores"][t][length]] for t in tasks}
                misses = [r for r in ruler["records"] if r["score"] < 1]
                for r in misses:  # what a hybrid writes where it goes wrong
                    print(f"    {name} miss {r['task']}: answers {r['answers']} wrote {r['prediction'][:60]!r}")
        mean = {m: {t: sum(v) / len(v) for t, v in per_task.items()} for m, per_task in scores.items()}
        average = {m: sum(per_task.values()) / len(tasks) for m, per_task in mean.items()}
        print(f"{name:16s} full {layers}: answer KL {average['kl']:.4f}  NLL {average['nll']:.4f}  exact "
              f"{100 * average['exact']:.1f}  first margin {average['first_margin']:.3f}  min margin "
              f"{average['min_margin']:.3f}" + (f"  greedy RULER {100 * average['greedy']:.1f}" if greedy else "")
              + "\n    per task KL/NLL/exact/min margin" + ("/greedy: " if greedy else ": ")
              + "  ".join(f"{t} {mean['kl'][t]:.3f}/{mean['nll'][t]:.3f}/{100 * mean['exact'][t]:.0f}/"
                          f"{mean['min_margin'][t]:.2f}" + (f"/{100 * mean['greedy'][t]:.0f}" if greedy else "")
                          for t in tasks)
              + f"  ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
