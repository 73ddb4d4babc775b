"""Stage 2, the architecture search: frozen weights, Adam on the per-layer logits only.

Loss per step = KL(teacher || supernet) on next-token distributions (computed in chunks of tokens,
each recomputed in backward, so full-vocabulary fp32 logits never exist for the whole batch)
+ a cost regulariser toward the budget + a ramped entropy term that drives every layer toward one
choice, with the mixture temperature annealed from ``tau_start`` to ``tau_end``. The logits start at the budget
(``init="budget"``: each layer at the maximum-entropy mix of candidates whose expected cost is the budget,
``budget_prior``). The run
checkpoints its logits, optimizer and history; a killed run resumes to the same final logits as an
uninterrupted one (batches are a pure function of the seed and the step).

Token weighting (``objective``). ``"answers"`` (default): the mean KL over tokens plus ``answer_weight`` times the
mean KL over the answer tokens of the data's retrieval rows (``dash.data.add_retrieval_rows``: RULER-style prompts at
seeds the evaluation never uses, answers teacher-forced). Why: on SmolLM2 the plain mean KL over the search's text
could not tell DASH's K 9 hybrid from kl_restore's (0.01566 against 0.01573), which RULER scores 5 points apart,
while the KL on the answers of retrieval prompts ranks the hybrids measured as RULER does (kl_restore's K 9 0.039,
DASH's 0.066, benchmarks/NOTES.md, session 9): retrieval is where a hybrid's missing context shows, and a few
answer tokens in thousands carry it. ``"uniform"``: the mean KL over tokens alone. ``"long_range"``: each token's
KL is weighted by how much the teacher's prediction there needs context beyond the efficient candidates, measured
as KL(teacher || all-efficient model) at that token (one extra no-grad forward a step, every layer its cheapest
window, see ``efficient_reference``), normalised to mean 1 over the batch (LongPPL's key tokens, soft,
arXiv 2410.23771). Both are kept as ablations: on SmolLM2 with the text-only data, RULER 16.5 / 22.8 / 22.1
(uniform, budget start, lr 0.01) and 16.5 / 22.8 / 21.2 (long_range) at K 3 / 6 / 9, against kl_restore's 27.3
at K 9 (benchmarks/NOTES.md, sessions 8 and 9). ``"answers_nll"``: the mean KL over tokens plus ``answer_weight``
times the true answer's NLL (cross-entropy, not KL to the teacher), averaged per prompt and then over prompts, so
that every prompt counts alike (``prompt_answer_weights``). KL rewards matching the teacher everywhere, also where
the teacher is unsure of the answer; RULER rewards the right answer, and counts every task alike. On SmolLM2 at
K 9 the answers objective's hybrid has a lower answer KL than ppl_drop's (0.028 against 0.063), a higher answer
NLL (0.504 against 0.494) and 2.6 fewer RULER points; at K 6 the KL ranked the two as RULER did and the NLL tied
them; over 15 scored hybrids both rank as RULER does, near the teacher neither does (benchmarks/NOTES.md,
session 11). An ablation until a comparison measures it. ``"answers_margin"``: the mean KL over tokens plus
``answer_weight`` times, per prompt and then over prompts (as ``answers_nll``), the shortfall of the hybrid's
greedy margin (the true token's logit over the best other one) from the teacher's, capped at ``MARGIN_CAP`` logits,
on the answer positions where the teacher's argmax is the true token: ``relu(min(m_teacher, cap) - m_hybrid)``
(``answer_margin_shortfall``). Why: on SmolLM2 at K 9 every teacher-matching loss prefers DASH's hybrid to
ppl_drop's, yet greedy RULER scores it lower; the misses on passkey are all one near-tie, the answer's first token
(" " before the number against " the" / " a", a teacher margin of 0.6-0.75 logits), which DASH's hybrid narrows to
0.24 on average and flips in 8 of 30 prompts. Flipping a near-tie costs little KL yet loses the whole answer; the
margin term weighs exactly those tokens (benchmarks/NOTES.md, session 15). An ablation until a comparison measures it.
For both, a prompt is a run of answer positions in a row (``prompt_answer_weights``), so rows of several prompts
(``dash.data.retrieval_rows``' ``prompts_per_row``, ``dash search --prompts-per-row``) count each prompt alike; and
``answer_first_weight`` (default 1: evenly) weighs each prompt's first answer position that many times one of its
others, the prompt's total unchanged (``answer_weight`` keeps its meaning): the near-tie on the answer's first token
then counts more. Opt-in levers, off by default, until a comparison measures them.

Relaxation (``relaxation``). ``"mixture"`` (default): each layer outputs the probability-weighted sum of its
candidates (DARTS). The search then ranks layers inside a model where several are fractionally full, which the
exported hybrid never is; on SmolLM2 at K 9 DASH's exported hybrid ranked only 14th of 350 neighbouring K 9 hybrids
under the objective the mixture minimised, and the last one or two slots ended undecided (p(full) 0.2-0.7)
(benchmarks/NOTES.md, session 12). ``"straight_through"``: each step draws one discrete hybrid the way the export
makes one (with a full-layer budget exactly K full layers, drawn without replacement in proportion to the odds
p(full) / (1 - p(full)): Gumbel-top-K, ``dash.export.sample_discrete``); the forward computes that hybrid (one-hot
weights, the same fused kernel and cost), and the backward treats the probabilities as the weights
(straight-through, as in GDAS, arXiv 1910.04465). Each layer's gradient is then the first-order value of changing
its operator inside a hybrid of the budget's size; the loss is the expected loss of the hybrids the export can
return. On SmolLM2 it returned the mixture's very hybrids at K 6 and 9, and at K 3 a worse one, on a slot it left
undecided (benchmarks/NOTES.md, session 13): an ablation, not the default.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .candidates import Candidate
from .data import PackedData
from .supernet import Supernet, attention_shape

BUDGET_KINDS = ("full_layers", "kv_bytes")
# the search's loss over tokens, the default first (module docstring); the answer ones need the data's answer mask
OBJECTIVES = ("answers", "uniform", "long_range", "answers_nll", "answers_margin")
ANSWER_OBJECTIVES = ("answers", "answers_nll", "answers_margin")
# the objectives weighted per prompt (prompt_answer_weights), the only ones SearchConfig.answer_first_weight weights
FIRST_WEIGHT_OBJECTIVES = ("answers_nll", "answers_margin")
# the answers_margin objective keeps at most this much of the teacher's margin (logits): beyond it a token is safe
MARGIN_CAP = 2.0
INITS = ("budget", "uniform")  # where the logits start (SearchConfig.init)
# what the forward computes from the logits (SearchConfig.relaxation, the module docstring)
RELAXATIONS = ("mixture", "straight_through")
LOG_EVERY = 10  # steps between reads of the loss on the host (progress bar, history)


@dataclass
class SearchConfig:
    tokens: int = 12_300_000  # search budget in training tokens
    batch_size: int = 4
    lr: float = 0.01  # Adam moves each logit ~lr a step whatever the gradient's size: 1500 steps of 0.05 decided
                      # most layers in the first 60 (benchmarks/NOTES.md, session 8)
    tau_start: float = 1.0
    tau_end: float = 0.2
    budget_kind: str = "full_layers"  # or "kv_bytes": expected KV-cache bytes at budget_context
    budget: Optional[float] = None  # full layers (default: a fifth of the layers) or bytes
    budget_context: int = 8192
    cost_weight: float = 1.0
    entropy_weight: float = 0.05  # reached linearly by the end of the run
    kl_chunk_tokens: int = 1024
    checkpoint_every: int = 50
    seed: int = 0
    compile_modules: bool = False  # torch.compile the stateless modules (norms, MLPs): fewer launches a step
    objective: str = "answers"  # or "uniform", "long_range", "answers_nll", "answers_margin" (module docstring)
    answer_weight: float = 1.0  # the answer tokens' mean KL ("answers") or NLL ("answers_nll") counts this much
    # answers_nll / answers_margin: each prompt's first answer position weighs this many of its others (the sum per
    # prompt stays; prompt_answer_weights); 1: evenly. Other objectives take only 1
    answer_first_weight: float = 1.0
    init: str = "budget"  # or "uniform": every layer starts at the budget's mix of candidates (budget_prior)
    relaxation: str = "mixture"  # or "straight_through": each step a sampled discrete hybrid (module docstring)

    def validate(self, num_layers: int) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {self.relaxation!r}")
        if not self.answer_weight >= 0:
            raise ValueError(f"answer_weight must be >= 0, got {self.answer_weight}")
        if not (math.isfinite(self.answer_first_weight) and self.answer_first_weight > 0):
            raise ValueError(f"answer_first_weight must be a finite number > 0, got {self.answer_first_weight}")
        if self.answer_first_weight != 1.0 and self.objective not in FIRST_WEIGHT_OBJECTIVES:
            raise ValueError(f"answer_first_weight {self.answer_first_weight} weights only the objectives "
                             f"{FIRST_WEIGHT_OBJECTIVES}, not {self.objective!r}: leave it at 1.0 or choose one")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.budget_kind not in BUDGET_KINDS:
            raise ValueError(f"budget_kind must be one of {BUDGET_KINDS}, got {self.budget_kind!r}")
        if self.budget_kind == "full_layers" and self.budget is not None and not 0 <= self.budget <= num_layers:
            raise ValueError(f"budget must be between 0 and {num_layers} full-attention layers, got {self.budget}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")
        for name in ("tokens", "batch_size", "kl_chunk_tokens", "checkpoint_every", "budget_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise ValueError("tau_start and tau_end must be > 0")


def candidate_cache_bytes(candidate: Candidate, context: int, heads_kv: int, heads_q: int, head_dim: int) -> int:
    """Inference cache a layer with this candidate keeps at ``context``: 16-bit K/V rows, or the fp32
    recurrent state of a linear candidate ([Hq, D, D + 1] for gla with its normaliser column, [Hq, D, D] gdn)."""
    if candidate.is_linear:
        return heads_q * head_dim * (head_dim + (1 if candidate.kind == "gla" else 0)) * 4
    tokens = context if candidate.window is None else min(context, candidate.window + candidate.sink)
    return tokens * 2 * heads_kv * head_dim * 2


def layer_costs(net: Supernet, config: SearchConfig) -> torch.Tensor:
    """[C] cost of each candidate in the budget's unit (full layers, or cache bytes at the budget context)."""
    if config.budget_kind == "full_layers":
        return torch.tensor([1.0 if c.is_full else 0.0 for c in net.candidates])
    heads_q, heads_kv, head_dim = attention_shape(net.model.config)
    return torch.tensor([float(candidate_cache_bytes(c, config.budget_context, heads_kv, heads_q, head_dim))
                         for c in net.candidates])


def budget_prior(costs: torch.Tensor, budget: float, num_layers: int, floor: float = 1e-3) -> torch.Tensor:
    """[C] the candidate probabilities every layer starts from under ``init="budget"``: of the distributions whose
    expected cost per layer is ``budget / num_layers``, the one of maximum entropy, p_c ~ exp(-lam * cost_c)
    with lam >= 0 (found by bisection); uniform where uniform is already within the budget, each p >= ``floor``.
    With {full, window} and a budget of K full layers: p_full = K / L.

    Why: from uniform logits the supernet starts half full (15 expected full layers of 30 for a budget of 3-9),
    so the first steps are spent pushing every layer down at the optimizer's full speed, and a layer's fate is
    set by gradients measured in a near-teacher model (what a perplexity-drop selector measures). Starting at
    the budget, the gradients come from hybrids as cheap as the one the search must return."""
    costs = costs.detach().double().cpu()
    target = float(budget) / num_layers
    scale = float(costs.max() - costs.min())
    if scale == 0 or float(costs.mean()) <= target:
        return torch.full(costs.shape, 1.0 / costs.numel())
    unit = (costs - costs.min()) / scale

    def probs(lam: float) -> torch.Tensor:
        p = torch.softmax(-lam * unit, 0).clamp_min(floor)
        return p / p.sum()

    low, high = 0.0, 1.0
    while float((probs(high) * costs).sum()) > target and high < 1e4:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if float((probs(mid) * costs).sum()) > target else (low, mid)
    return probs(high).float()


def expected_cost(net: Supernet, costs: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for state in net.states:
        probs = state.probabilities()
        probs = probs.mean(0) if probs.dim() == 2 else probs
        total = total + (probs * costs.to(probs.device)).sum()
    return total


def _log_probs(hidden, head_weight, head_bias):
    return torch.log_softmax(F.linear(hidden, head_weight, head_bias).float(), -1)


def kl_from_log_probs(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """[N] KL(teacher || student) from [N, V] log-probabilities."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def label_nll(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] NLL of each label ([N] token ids) under [N, V] log-probabilities."""
    return -logp.gather(-1, labels[:, None])[:, 0]


def token_kl(student_h, teacher_h, head_weight, head_bias):
    """[N] KL(teacher || student) per token, from the last hidden states through the LM head."""
    student, teacher = (_log_probs(h, head_weight, head_bias) for h in (student_h, teacher_h))
    return kl_from_log_probs(student, teacher)


def greedy_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] margin of each label's logit over the largest other logit of [N, V] logits (> 0: greedy decoding writes
    the label)."""
    true = logits.gather(-1, labels[:, None])[:, 0]
    other = logits.scatter(-1, labels[:, None], float("-inf")).amax(-1)
    return true - other


def answer_margin_shortfall(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                            cap: float = MARGIN_CAP) -> torch.Tensor:
    """[N] the ``answers_margin`` objective's per-token term: how far the student's greedy margin of each label falls
    short of the teacher's, capped at ``cap`` logits, where the teacher's argmax is the label (0 elsewhere: where
    the teacher itself is wrong there is no decision to keep)."""
    teacher = greedy_margin(teacher_logits, labels)
    target = teacher.clamp(max=cap)
    return torch.where(teacher > 0, torch.relu(target - greedy_margin(student_logits, labels)),
                       torch.zeros_like(teacher))


def _kl_chunk(student_h, teacher_h, head_weight, head_bias, weights, labels, label_weights, margin=False):
    student_logits = F.linear(student_h, head_weight, head_bias).float()
    teacher_logits = F.linear(teacher_h, head_weight, head_bias).float()
    student = torch.log_softmax(student_logits, -1)
    per_token = kl_from_log_probs(student, torch.log_softmax(teacher_logits, -1))
    total = (per_token if weights is None else per_token * weights).sum()
    if labels is not None:
        term = (answer_margin_shortfall(student_logits, teacher_logits, labels) if margin
                else label_nll(student, labels))
        total = total + (term * label_weights).sum()
    return total


def distillation_kl(student_hidden, teacher_hidden, lm_head, chunk_tokens: int,
                    weights: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                    label_weights: Optional[torch.Tensor] = None, margin: bool = False) -> torch.Tensor:
    """Mean per-token KL(teacher || student), each token's times ``weights`` ([N] over the flattened tokens) when
    given; plus, with ``labels`` ([N] token ids), the student's NLL of each label (``margin``: its greedy-margin
    shortfall from the teacher's, ``answer_margin_shortfall``) times ``label_weights`` ([N]), summed and divided by N
    alike. Chunked over tokens and recomputed in backward."""
    s = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    for name, value in (("weights", weights), ("labels", labels), ("label_weights", label_weights)):
        if value is not None and value.shape != (s.shape[0],):
            raise ValueError(f"{name} must have shape ({s.shape[0]},) (one per token), got {tuple(value.shape)}")
    if (labels is None) != (label_weights is None):
        raise ValueError("labels and label_weights go together")
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_kl_chunk, s[part], t[part], lm_head.weight, lm_head.bias,
                                   None if weights is None else weights[part],
                                   None if labels is None else labels[part],
                                   None if label_weights is None else label_weights[part], margin,
                                   use_reentrant=False)
    return total / s.shape[0]


def answer_weights(answers: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """Token weights of the ``answers`` objective, the shape of ``answers`` (bool: the position predicts a retrieval
    answer's token): 1 everywhere plus ``answer_weight * N / (answer positions)`` on the answers, so that the
    weighted mean KL is the mean KL plus ``answer_weight`` times the answers' mean KL (the plain mean where there
    are none)."""
    flags = answers.float()
    count = flags.sum().clamp_min(1.0)  # on the device: no host read
    return 1.0 + answer_weight * flags * (flags.numel() / count)


def prompt_answer_weights(answers: torch.Tensor, answer_weight: float,
                          answer_first_weight: float = 1.0) -> torch.Tensor:
    """The ``answers_nll`` / ``answers_margin`` objectives' weights of each position's term, the shape of ``answers``
    ([rows, T]). A prompt is a run of consecutive answer positions in a row (one per retrieval row, or
    ``dash.data.retrieval_rows``' ``prompts_per_row``). Every prompt's weights sum to ``answer_weight * N /
    prompts``, spread evenly over its positions except the first, which takes ``answer_first_weight`` times a
    position's share (``1``: evenly); 0 elsewhere. Their weighted mean over the N positions is then ``answer_weight``
    times the mean over prompts of each prompt's (first-weighted) mean answer term: every prompt counts alike, as
    RULER counts every task, where a mean over tokens would let the long answers (a UUID, three 7-digit values, ten
    words: 20-35 tokens, tasks no hybrid of SmolLM2 solves among them) outweigh a passkey's 6 tokens; and the
    answer's first token, a near-tie that greedy decoding must win (" " against " the", module docstring), can
    count more than the rest. On the device (no host read)."""
    if answers.dim() != 2:
        raise ValueError(f"answers must be [rows, T] (a prompt: a run of answer positions in a row), got shape "
                         f"{tuple(answers.shape)}")
    if not (math.isfinite(answer_first_weight) and answer_first_weight > 0):
        raise ValueError(f"answer_first_weight must be a finite number > 0, got {answer_first_weight}")
    answers = answers.bool()
    before = F.pad(answers[:, :-1], (1, 0), value=False)  # each position's predecessor in its row
    firsts = answers & ~before  # a prompt's first answer position
    prompts = firsts.sum().clamp_min(1)  # on the device: no host read
    run = firsts.reshape(-1).cumsum(0)  # each position's prompt: the last one begun (1, 2, ...; 0 before any)
    sizes = torch.zeros(run.numel() + 1, dtype=torch.long, device=run.device)
    sizes = sizes.scatter_add_(0, run, answers.reshape(-1).long())[run].view(answers.shape)  # exact, in integers
    # a prompt's weights before normalising: 1 a position, its first one answer_first_weight (1: the plain count)
    flags = answers.float() * (1.0 + (answer_first_weight - 1.0) * firsts.float())
    totals = torch.where(answers, sizes.float() + (answer_first_weight - 1.0), torch.ones_like(flags))
    return answer_weight * flags / totals * (flags.numel() / prompts)


def next_tokens(input_ids: torch.Tensor) -> torch.Tensor:
    """Each position's next token, the shape of ``input_ids`` (the last position's is a placeholder: no answer mask
    marks it)."""
    return torch.roll(input_ids, -1, dims=-1)


@torch.no_grad()
def long_range_weights(efficient_hidden, teacher_hidden, lm_head, chunk_tokens: int) -> torch.Tensor:
    """[N] token weights of the ``long_range`` objective: KL(teacher || all-efficient model) per token, over its
    mean (a batch where the efficient model matches the teacher everywhere gets uniform weights)."""
    e = efficient_hidden.reshape(-1, efficient_hidden.shape[-1])
    t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    gap = torch.cat([token_kl(e[i:i + chunk_tokens], t[i:i + chunk_tokens], lm_head.weight, lm_head.bias)
                     for i in range(0, e.shape[0], chunk_tokens)]).clamp_min(0.0)
    mean = gap.mean()  # kept on the device: a host read here would stall the search's queue every step
    return torch.where(mean > 1e-12, gap / mean.clamp_min(1e-12), torch.ones_like(gap))


def efficient_reference(net: Supernet) -> list:
    """Each layer's cheapest windowed softmax candidate (least inference cache at 8K; the first of equals), or the
    cheapest linear one where there is no window: the all-efficient model whose gap to the teacher weights the
    ``long_range`` objective. A window's gap is the context it lacks; a linear candidate's is mostly its
    approximation error at every distance, so it stands in only when nothing else does."""
    heads_q, heads_kv, head_dim = attention_shape(net.model.config)
    others = [i for i, c in enumerate(net.candidates) if not c.is_full and not c.is_linear] or \
        [i for i, c in enumerate(net.candidates) if not c.is_full]
    if not others:
        raise ValueError("the long_range objective needs an efficient (non-full) candidate")
    cheapest = min(others, key=lambda i: candidate_cache_bytes(net.candidates[i], 8192, heads_kv, heads_q, head_dim))
    return [cheapest] * len(net.states)


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save through a temporary file: a kill mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_json(path: str, document) -> None:
    """json.dump through a temporary file of this process: a kill mid-write leaves the previous file intact, and
    processes writing the same file at once each replace it whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(document, f)
    os.replace(tmp, path)


def load_checkpoint(path: str, keys: tuple) -> dict:
    """torch.load with a clear error for a missing, truncated or foreign file (the file is left as it is)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or not a torch file
        raise ValueError(f"{path} is not a readable DASH checkpoint ({type(exc).__name__}: {exc}); "
                         "move it away to start over") from exc
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a DASH checkpoint of this kind: missing {missing}")
    return state


def compile_stateless_modules(model) -> int:
    """torch.compile every RMSNorm and MLP of the model in place (returns how many). They hold no DASH state, so
    their graphs never recompile: the attention layers, whose mixture temperature changes every step, stay eager.
    An eager step of a small model launches thousands of tiny elementwise kernels (norms, SiLU * up, casts); the
    compiled modules fuse them."""
    count = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") or kind.endswith("MLP"):
            module.compile(dynamic=False)
            count += 1
    return count


class Search:
    def __init__(self, net: Supernet, data: PackedData, config: SearchConfig, output_dir: str):
        self.net, self.data, self.config, self.output_dir = net, data, config, output_dir
        num_layers = len(net.layers)
        config.validate(num_layers)
        if config.budget is None:
            config.budget = float(max(1, round(num_layers / 5))) if config.budget_kind == "full_layers" else None
            if config.budget is None:
                raise ValueError("budget_kind='kv_bytes' needs an explicit budget in bytes")
        for p in net.linear_parameters():  # stage 2 trains the logits only; linear candidates come aligned
            p.requires_grad_(False)
        if config.compile_modules:
            compile_stateless_modules(net.model)
        # on the logits' device once (a per-layer host-to-device copy would stall every step)
        self.host_costs = layer_costs(net, config)  # the straight-through draw's, on the host
        self.costs = self.host_costs.to(net.arch_parameters()[0].device)
        self.efficient = efficient_reference(net) if config.objective == "long_range" else None
        no_answers = data.train_answers is None or not bool(data.train_answers.any())
        if config.objective in ANSWER_OBJECTIVES and no_answers:
            raise ValueError(f"objective '{config.objective}' needs retrieval rows in the data "
                             "(dash.data.add_retrieval_rows, `--retrieval-fraction` > 0); or choose objective "
                             "'uniform'")
        self.data_digest = data.digest()
        self.steps = max(1, math.ceil(config.tokens / (config.batch_size * data.seq_len)))
        with torch.no_grad():  # where the logits start (a resumed run then loads its own)
            start = budget_prior(self.costs, config.budget, num_layers) if config.init == "budget" else None
            for alpha in net.arch_parameters():
                alpha.copy_(torch.zeros_like(alpha) if start is None else
                            (config.tau_start * start.log()).to(alpha.device).expand_as(alpha))
        self.optimizer = torch.optim.Adam(net.arch_parameters(), lr=config.lr)
        self.history: list = []
        self.step = 0
        self.elapsed_s = 0.0  # search-loop seconds of every run so far (a resumed run adds to it)
        os.makedirs(output_dir, exist_ok=True)

    @property
    def state_path(self) -> str:
        return os.path.join(self.output_dir, "search_state.pt")

    def temperature(self, step: int) -> float:
        frac = step / max(1, self.steps - 1)
        return self.config.tau_start * (self.config.tau_end / self.config.tau_start) ** frac

    def save(self) -> None:
        state = {"step": self.step, "alphas": [a.detach().cpu() for a in self.net.arch_parameters()],
                 "optimizer": self.optimizer.state_dict(), "history": self.history,
                 "config": asdict(self.config), "candidates": [c.name for c in self.net.candidates],
                 "elapsed_s": self.elapsed_s, "data_digest": self.data_digest}
        save_checkpoint(self.state_path, state)

    def try_resume(self) -> bool:
        if not os.path.exists(self.state_path):
            return False
        state = load_checkpoint(self.state_path, ("step", "alphas", "optimizer", "history", "candidates"))
        if state["candidates"] != [c.name for c in self.net.candidates]:
            raise ValueError(f"{self.state_path} was made for candidates {state['candidates']}, "
                             f"not {[c.name for c in self.net.candidates]}")
        with torch.no_grad():
            for alpha, saved in zip(self.net.arch_parameters(), state["alphas"]):
                alpha.copy_(saved.to(alpha.device))
        self.optimizer.load_state_dict(state["optimizer"])
        # a checkpoint continues only its own trajectory (older checkpoints: uniform objective and init, lr 0.05)
        saved = dict({"objective": "uniform", "init": "uniform", "lr": 0.05, "answer_weight": 1.0,
                      "answer_first_weight": 1.0, "relaxation": "mixture"}, **state.get("config", {}))
        for name in ("objective", "init", "lr", "answer_weight", "answer_first_weight", "relaxation"):
            if saved[name] != getattr(self.config, name):
                raise ValueError(f"{self.state_path} was made with {name} {saved[name]!r}, not "
                                 f"{getattr(self.config, name)!r}: use another output folder or the same {name}")
        if state.get("data_digest", self.data_digest) != self.data_digest:
            raise ValueError(f"{self.state_path} was made on other training data (digest {state['data_digest']}, "
                             f"now {self.data_digest}): use another output folder or the same data")
        self.step, self.history = state["step"], state["history"]
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        return True

    def loss_terms(self, input_ids: torch.Tensor, answers: Optional[torch.Tensor] = None) -> dict:
        """The step's loss and its parts; ``answers``: the batch's answer mask (the ``answers`` objective)."""
        model = self.net.model
        base, head = model.base_model, model.get_output_embeddings()
        with torch.no_grad(), self.net.teacher():
            teacher_hidden = base(input_ids, use_cache=False).last_hidden_state
        weights = None
        if self.config.objective == "long_range":
            with torch.no_grad(), self.net.fixed(self.efficient):
                efficient_hidden = base(input_ids, use_cache=False).last_hidden_state
            weights = long_range_weights(efficient_hidden, teacher_hidden, head, self.config.kl_chunk_tokens)
            del efficient_hidden
        elif self.config.objective in ANSWER_OBJECTIVES and answers is None:
            raise ValueError(f"objective '{self.config.objective}' needs the batch's answer mask")
        labels = label_weights = None
        if self.config.objective == "answers":
            weights = answer_weights(answers.reshape(-1), self.config.answer_weight)
        elif self.config.objective in ("answers_nll", "answers_margin"):
            labels = next_tokens(input_ids).reshape(-1)
            label_weights = prompt_answer_weights(answers, self.config.answer_weight,
                                                  self.config.answer_first_weight).reshape(-1)
        student_hidden = base(input_ids, use_cache=False).last_hidden_state
        kl = distillation_kl(student_hidden, teacher_hidden, head, self.config.kl_chunk_tokens, weights, labels,
                             label_weights, margin=self.config.objective == "answers_margin")
        cost = expected_cost(self.net, self.costs)
        overshoot = torch.relu(cost - self.config.budget) / max(self.config.budget, 1e-9)
        entropy = torch.stack([-(p * p.clamp_min(1e-12).log()).sum(-1).mean()
                               for p in (s.probabilities() for s in self.net.states)]).mean()
        ramp = self.step / max(1, self.steps - 1)
        total = kl + self.config.cost_weight * overshoot ** 2 + self.config.entropy_weight * ramp * entropy
        return {"loss": total, "kl": kl, "expected_cost": cost, "entropy": entropy}

    def sampled_hybrid(self, step: int) -> list:
        """The straight-through relaxation's hybrid at ``step`` (candidate indices per layer): a draw from the
        current probabilities shaped as the export's (``dash.export.sample_discrete``), a pure function of the
        logits, the seed and the step, so that a resumed search draws what an uninterrupted one would."""
        from .export import sample_discrete

        generator = torch.Generator().manual_seed((self.config.seed << 32) + step)
        return sample_discrete(self.net.probabilities(), self.net.candidates, self.config.budget, generator,
                               self.config.budget_kind, self.host_costs)

    def _relaxed(self):
        """The step's forward: the mixture itself, or (straight-through) the sampled hybrid."""
        if self.config.relaxation == "mixture":
            return contextlib.nullcontext()
        states = self.net.states
        # [L, C] on the logits' device in one copy, each layer's row expanded to its logits' shape
        hot = F.one_hot(torch.tensor(self.sampled_hybrid(self.step)), len(self.net.candidates)).float()
        hot = hot.to(states[0].alpha.device, non_blocking=True)
        return self.net.sampled([row.expand_as(state.alpha) for row, state in zip(hot, states)])

    def _flush(self, pending: list) -> None:
        """Moves the pending GPU-side step records into the history (one sync for all of them)."""
        for step, tau, terms, probs in pending:
            record = {k: float(v) for k, v in terms.items()}
            record.update(step=step, tau=tau, probabilities=probs.tolist())
            self.history.append(record)
        pending.clear()

    def run(self, progress: bool = True, stop_after: Optional[int] = None) -> dict:
        """Runs to the end (or ``stop_after`` more steps); returns the final summary."""
        from tqdm.auto import tqdm

        resumed = self.try_resume()
        device = next(self.net.model.parameters()).device
        tokens_per_step = self.config.batch_size * self.data.seq_len
        end = self.steps if stop_after is None else min(self.steps, self.step + stop_after)
        bar = tqdm(total=self.steps, initial=self.step, disable=not progress, unit="step",
                   desc="dash search" + (" (resumed)" if resumed else ""))
        started, earlier_s = time.time(), self.elapsed_s
        first = self.step
        pending = []  # per-step records still on the GPU: reading them every step would stall the queue
        while self.step < end:
            self.net.set_temperature(self.temperature(self.step))
            rows = self.data.batch_rows(self.step, self.config.batch_size, self.config.seed)
            batch, answers = self.data.train[rows], self.data.answers(rows)
            if device.type == "cuda":
                batch = batch.pin_memory().to(device, non_blocking=True)
                answers = answers.pin_memory().to(device, non_blocking=True)
            else:
                batch, answers = batch.to(device), answers.to(device)
            self.optimizer.zero_grad(set_to_none=True)
            with self._relaxed():
                terms = self.loss_terms(batch, answers)
                terms["loss"].backward()
            self.optimizer.step()
            self.step += 1
            pending.append((self.step, self.net.states[0].tau, {k: v.detach() for k, v in terms.items()},
                            self.net.probabilities()))
            bar.update(1)
            checkpoint_now = self.step % self.config.checkpoint_every == 0 or self.step == end
            if checkpoint_now or self.step % LOG_EVERY == 0:
                self._flush(pending)
                rate = (self.step - first) * tokens_per_step / max(1e-9, time.time() - started)
                record = self.history[-1]
                bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}", tok_s=f"{rate:.0f}",
                                full=sum(c == "full" for c in self.net.discrete_choice()))
            if checkpoint_now:
                self.elapsed_s = earlier_s + time.time() - started
                self.save()
        bar.close()
        self.net.set_temperature(self.temperature(max(0, self.step - 1)))  # as at the last step, resumed or not
        loop_s = time.time() - started
        self.elapsed_s = earlier_s + loop_s
        summary = {"steps": self.step, "total_steps": self.steps, "tokens": self.step * tokens_per_step,
                   "choice": self.net.discrete_choice(), "probabilities": self.net.probabilities().tolist(),
                   "timing": {"search_s": loop_s, "total_search_s": self.elapsed_s,
                              "steps_this_run": self.step - first,
                              "tokens_per_s": (self.step - first) * tokens_per_step / max(loop_s, 1e-9)}}
        with open(os.path.join(self.output_dir, "history.json"), "w") as f:
            json.dump({"summary": summary, "history": self.history}, f)
        return summary
