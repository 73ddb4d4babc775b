"""``dash finetune``: light distillation fine-tuning of an exported hybrid toward its teacher.

What trains (everything else stays frozen):
  - LoRA adapters ``W + (LORA_ALPHA / r) B A`` (rank r, ``B`` starting at zero, so training starts exactly at the
    hybrid) on the q/k/v/o projections of every layer that is *not* full attention: a full-attention layer
    already computes what the teacher's layer computes;
  - the linear candidates' own parameters (feature maps, gates) in layers that chose ``gla`` or ``gdn``.
The loss is KL(teacher || hybrid) on next-token distributions (``dash.search.distillation_kl``), on the same
packed training text the search uses (``dash.data``: the offline corpus, or ``--data``). Adam; batches are a pure
function of (seed, step), and the run checkpoints the trained tensors, optimizer and history to
``finetune_state.pt`` in the output directory, so a killed run resumes to the same result as an uninterrupted one.

The output is a new hybrid directory (default ``<path>-ft``) with the adapters merged into the projection weights
(``dash.load_hybrid`` loads it like any export, nothing new needed); its ``dash_hybrid.json`` keeps the source's
report and appends a ``finetune`` record (teacher, tokens, settings, loss). The teacher is the model recorded in
the hybrid's report (``dash export`` writes it), or ``--teacher``.

``dash compare --finetune-tokens N`` runs the same trainer (``Finetune``) on every method's hybrid in place in the
supernet, with the supernet's own teacher mode (adapters off) as the teacher, and drops the adapters after scoring.

  dash finetune runs/search/hybrid --tokens 2000000          (writes runs/search/hybrid-ft)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from .candidates import Candidate
from .data import PackedData
from .search import distillation_kl, load_checkpoint, save_checkpoint
from .supernet import attention_layers

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_ALPHA = 16.0  # the adapter's scale is LORA_ALPHA / rank (LoRA's alpha; 2 at the default rank 8)
LOG_EVERY = 10  # steps between reads of the loss on the host (progress bar, history)
STATE_FILE = "finetune_state.pt"
HELDOUT_ROWS = 4  # held-out rows scored before and after (the training batches' loss varies with their text)
GPU_DEFAULT_TOKENS, CPU_DEFAULT_TOKENS = 2_000_000, 16_384
REPORT_FILES = ("report.json", "report.md", "probabilities.png")  # the source's search report, carried along


@dataclass
class FinetuneConfig:
    tokens: int = GPU_DEFAULT_TOKENS
    batch_size: int = 2
    lr: float = 2e-4
    rank: int = 8
    kl_chunk_tokens: int = 1024
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self) -> None:
        for name in ("tokens", "batch_size", "rank", "kl_chunk_tokens", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


class LoRALinear(nn.Module):
    """``base(x) + scale * (x A^T) B^T`` with fp32 adapters whatever the base dtype (Adam on 16-bit weights
    loses small updates); ``enabled=False`` computes exactly the base projection."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = LORA_ALPHA / rank
        bound = 1.0 / math.sqrt(base.in_features)  # LoRA's default A init (kaiming-uniform, a = sqrt(5))
        a = torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        delta = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return out + (self.scale * delta).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        weight = self.base.weight
        return (weight.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())).to(weight.dtype)


def attach_lora(layers: Sequence[nn.Module], rank: int, seed: int) -> List[LoRALinear]:
    """Wrap the q/k/v/o projections of ``layers`` in LoRA adapters (seeded init); returns them in order."""
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for layer in layers:
        for name in PROJECTIONS:
            base = getattr(layer, name)
            if isinstance(base, LoRALinear):
                raise ValueError(f"layer {layer.layer_idx} already has LoRA adapters: remove them first")
            if not isinstance(base, nn.Linear):
                raise TypeError(f"layer {layer.layer_idx}.{name} is a {type(base).__name__}, not nn.Linear: "
                                "LoRA needs plain linear projections")
            adapter = LoRALinear(base, rank, generator)
            setattr(layer, name, adapter)
            adapters.append(adapter)
    return adapters


def detach_lora(layers: Sequence[nn.Module], merge: bool) -> None:
    """Put the plain projections back; ``merge=True`` first folds each adapter into its base weight."""
    for layer in layers:
        for name in PROJECTIONS:
            adapter = getattr(layer, name)
            if isinstance(adapter, LoRALinear):
                if merge:
                    with torch.no_grad():
                        adapter.base.weight.copy_(adapter.merged_weight())
                setattr(layer, name, adapter.base)


@contextlib.contextmanager
def _trainable_only(model: nn.Module, params: Sequence[nn.Parameter]):
    """Within the block only ``params`` require grad (no wasted weight or logit gradients); flags restored."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class Finetune:
    """Distil a hybrid (any causal LM whose attention layers carry DASH states computing ``choices``) toward a
    teacher. ``teacher_hidden(batch)`` returns the teacher's final hidden states; it runs without gradients and
    with the adapters off (so a supernet in teacher mode can be its own teacher)."""

    def __init__(self, model: nn.Module, choices: Sequence[Candidate], data: PackedData, config: FinetuneConfig,
                 output_dir: str, teacher_hidden: Callable[[torch.Tensor], torch.Tensor]):
        config.validate()
        layers = attention_layers(model)
        if len(choices) != len(layers):
            raise ValueError(f"{len(choices)} layer choices for a model with {len(layers)} attention layers")
        self.model, self.choices, self.data, self.config = model, list(choices), data, config
        self.output_dir, self.teacher_hidden = output_dir, teacher_hidden
        self.adapted = [layer for layer, c in zip(layers, choices) if not c.is_full]
        self.adapted_index = [i for i, c in enumerate(choices) if not c.is_full]
        self.linear_index = [i for i, c in enumerate(choices) if c.is_linear]
        linear = []
        for i in self.linear_index:
            modules = getattr(layers[i], "dash", None)
            if modules is None or choices[i].kind not in modules.linear:
                raise ValueError(f"layer {i} chose {choices[i].name} but carries no such linear module")
            linear.extend(modules.linear[choices[i].kind].parameters())
        self.adapters = attach_lora(self.adapted, config.rank, config.seed)
        self.parameters = [p for a in self.adapters for p in (a.lora_a, a.lora_b)] + linear
        # an all-full hybrid is the teacher itself: nothing to train, zero steps
        self.steps = math.ceil(config.tokens / (config.batch_size * data.seq_len)) if self.parameters else 0
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.lr) if self.parameters else None
        self.history: list = []
        self.step = 0
        os.makedirs(output_dir, exist_ok=True)

    @property
    def state_path(self) -> str:
        return os.path.join(self.output_dir, STATE_FILE)

    @contextlib.contextmanager
    def adapters_off(self):
        for a in self.adapters:
            a.enabled = False
        try:
            yield
        finally:
            for a in self.adapters:
                a.enabled = True

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean per-token KL(teacher || hybrid) of a batch."""
        with torch.no_grad(), self.adapters_off():
            teacher = self.teacher_hidden(batch)
        student = self.model.base_model(batch, use_cache=False).last_hidden_state
        return distillation_kl(student, teacher, self.model.get_output_embeddings(), self.config.kl_chunk_tokens)

    def evaluate(self, rows: torch.Tensor) -> float:
        """Mean distillation loss over ``rows`` [N, T] (one row at a time, no gradients)."""
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return sum(float(self.loss(row[None].to(device))) for row in rows) / max(1, len(rows))

    def save(self) -> None:
        state = {"step": self.step, "trainable": [p.detach().cpu() for p in self.parameters],
                 "optimizer": self.optimizer.state_dict(), "history": self.history,
                 "config": asdict(self.config), "choices": [c.name for c in self.choices]}
        save_checkpoint(self.state_path, state)

    def try_resume(self) -> bool:
        if not os.path.exists(self.state_path):
            return False
        state = load_checkpoint(self.state_path, ("step", "trainable", "optimizer", "history", "config", "choices"))
        names = [c.name for c in self.choices]
        if state["choices"] != names or state["config"].get("rank") != self.config.rank:
            raise ValueError(f"{self.state_path} belongs to another run (layers {state['choices']}, rank "
                             f"{state['config'].get('rank')}; this one: {names}, rank {self.config.rank}): "
                             "use another output directory or move the file away")
        if state["step"] > self.steps:
            raise ValueError(f"{self.state_path} is at step {state['step']}, past this run's {self.steps} steps "
                             f"({self.config.tokens} tokens): use another output directory or more tokens")
        with torch.no_grad():
            for p, saved in zip(self.parameters, state["trainable"]):
                p.copy_(saved.to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]
        return True

    def _summary(self, seconds: float, first: int) -> dict:
        tokens_per_step = self.config.batch_size * self.data.seq_len
        losses = [h["kl"] for h in self.history]
        window = max(1, min(LOG_EVERY, len(losses) // 2))  # mean over the first and last few steps
        return {"steps": self.step, "total_steps": self.steps, "tokens": self.step * tokens_per_step,
                "trained_parameters": sum(p.numel() for p in self.parameters),
                "adapted_layers": self.adapted_index, "linear_layers": self.linear_index,
                # training-batch losses: each batch is other text, so these are noisy; see heldout_kl_*
                "train_kl_first": sum(losses[:window]) / window if losses else None,
                "train_kl_last": sum(losses[-window:]) / window if losses else None,
                "seconds": seconds,
                "tokens_per_s": (self.step - first) * tokens_per_step / max(seconds, 1e-9)}

    def run(self, progress: bool = True, stop_after: Optional[int] = None) -> dict:
        """Trains to the end (or ``stop_after`` more steps); returns a summary (tokens, seconds, loss)."""
        from tqdm.auto import tqdm

        if not self.steps:
            return self._summary(0.0, 0)
        resumed = self.try_resume()
        device = next(self.model.parameters()).device
        tokens_per_step = self.config.batch_size * self.data.seq_len
        end = self.steps if stop_after is None else min(self.steps, self.step + stop_after)
        bar = tqdm(total=self.steps, initial=self.step, disable=not progress, unit="step",
                   desc="dash finetune" + (" (resumed)" if resumed else ""))
        started, first = time.time(), self.step
        pending = []  # per-step losses still on the device: reading each one would stall the queue

        def flush():
            self.history.extend({"step": step, "kl": float(kl)} for step, kl in pending)
            pending.clear()

        with _trainable_only(self.model, self.parameters):
            while self.step < end:
                batch = self.data.batch(self.step, self.config.batch_size, self.config.seed).to(device)
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(batch)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                pending.append((self.step, loss.detach()))
                bar.update(1)
                checkpoint_now = self.step % self.config.checkpoint_every == 0 or self.step == end
                if checkpoint_now or self.step % LOG_EVERY == 0:
                    flush()
                    rate = (self.step - first) * tokens_per_step / max(1e-9, time.time() - started)
                    bar.set_postfix(kl=f"{self.history[-1]['kl']:.4f}", tok_s=f"{rate:.0f}")
                if checkpoint_now:
                    self.save()
        bar.close()
        summary = self._summary(time.time() - started, first)
        with open(os.path.join(self.output_dir, "finetune_history.json"), "w") as f:
            json.dump({"summary": summary, "history": self.history}, f)
        return summary

    def remove(self, merge: bool) -> None:
        """Take the adapters out: merged into the projection weights (``merge=True``) or dropped."""
        detach_lora(self.adapted, merge)
        self.adapters = []


def _load_data(data, tokenizer, seq_len: int, tokens: int, seed: int) -> PackedData:
    from .data import default_data, pack, read_documents

    if isinstance(data, PackedData):
        return data
    if data:  # files, folders or hf:<dataset>, as `dash search --data`
        return pack(read_documents(list(data)), tokenizer, seq_len, seed=seed)
    return default_data(tokenizer, seq_len, min(tokens, 2_000_000), seed=seed)


def finetune_hybrid(path: str, output: Optional[str] = None, *, teacher: Optional[str] = None, data=None,
                    tokens: Optional[int] = None, lr: float = FinetuneConfig.lr, rank: int = FinetuneConfig.rank,
                    seq_len: Optional[int] = None, batch_size: Optional[int] = None, device: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None, seed: int = 0, progress: bool = True,
                    stop_after: Optional[int] = None) -> dict:
    """Fine-tune the hybrid at ``path`` and write it to ``output`` (default ``<path>-ft``); returns a summary.

    ``teacher``: a model ``dash.load_model`` accepts (default: the one recorded in the hybrid's report).
    ``data``: None (the offline corpus), paths as ``dash search --data``, or a ``PackedData`` (whose length then
    overrides ``seq_len``). ``stop_after``:
    train that many steps and stop with only the checkpoint written (a later call resumes)."""
    from .export import HYBRID_FILE, _candidate_of, export_hybrid, load_hybrid
    from .models import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    tokens = tokens if tokens is not None else (GPU_DEFAULT_TOKENS if on_gpu else CPU_DEFAULT_TOKENS)
    if isinstance(data, PackedData):  # given rows carry their own length
        seq_len = data.seq_len
    seq_len = seq_len if seq_len is not None else (4096 if on_gpu else 1024)
    config = FinetuneConfig(tokens=tokens, batch_size=batch_size if batch_size is not None else (2 if on_gpu else 1),
                            lr=lr, rank=rank, seed=seed)
    config.validate()  # bad numbers fail before anything loads
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    hybrid_file = os.path.join(path, HYBRID_FILE)
    if not os.path.isfile(hybrid_file):
        raise FileNotFoundError(f"{path!r} is not an exported hybrid ({HYBRID_FILE} not found): write one with "
                                "`dash export`")
    output = output or path.rstrip("/\\") + "-ft"
    if os.path.abspath(output) == os.path.abspath(path):
        raise ValueError(f"output {output!r} is the input hybrid: write the fine-tuned one elsewhere")
    with open(hybrid_file) as f:
        hybrid = json.load(f)
    teacher = teacher or hybrid.get("report", {}).get("model")
    if not teacher:
        raise ValueError(f"{path} does not record its teacher model (exported without a report): pass teacher= "
                         "(--teacher) with the model the hybrid was searched on")
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    teacher_model, tokenizer = load_model(teacher, device=device, dtype=dtype)
    student = load_hybrid(path, device=device, dtype=dtype)
    layers = attention_layers(student)
    if len(attention_layers(teacher_model)) != len(layers) or \
            teacher_model.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher {teacher!r} does not match the hybrid {path} (layers or vocabulary differ)")
    limit = getattr(student.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of {limit} tokens")
    packed = _load_data(data, tokenizer, seq_len, tokens, seed)
    choices = [_candidate_of(entry) for entry in hybrid["layers"]]

    def teacher_hidden(batch):
        return teacher_model.base_model(batch, use_cache=False).last_hidden_state

    tuner = Finetune(student, choices, packed, config, output, teacher_hidden)
    heldout = packed.heldout[:HELDOUT_ROWS]
    # before resuming (adapters at zero, linear parameters as exported): the source hybrid's own distance
    before = tuner.evaluate(heldout) if len(heldout) and tuner.steps else None
    summary = tuner.run(progress=progress, stop_after=stop_after)
    if tuner.step < tuner.steps:  # stopped early: the checkpoint is written, the hybrid not yet
        return {**summary, "output": None, "finished": False}
    after = tuner.evaluate(heldout) if before is not None else None
    summary.update(heldout_kl_before=before, heldout_kl_after=after)
    tuner.remove(merge=True)
    linear_modules = [layer.dash.linear for layer in layers]
    student.set_attn_implementation("sdpa")  # export writes a plain model: DASH states are not weights
    for layer in layers:
        del layer.dash
    record = {"teacher": teacher, "tokens": summary["tokens"], "steps": summary["steps"], "seq_len": packed.seq_len,
              "data": "offline corpus" if data is None else ("given rows" if isinstance(data, PackedData)
                                                              else list(data)),
              "lr": lr, "rank": rank, "lora_alpha": LORA_ALPHA, "batch_size": config.batch_size, "seed": seed,
              "trained": {"lora_projections": list(PROJECTIONS), "lora_layers": summary["adapted_layers"],
                          "linear_layers": summary["linear_layers"],
                          "parameters": summary["trained_parameters"]},
              "heldout_kl_before": before, "heldout_kl_after": after, "heldout_rows": len(heldout),
              "train_kl_first": summary["train_kl_first"], "train_kl_last": summary["train_kl_last"],
              "source": path}
    export_hybrid(student, choices, output, tokenizer=tokenizer, report=hybrid.get("report", {}),
                  linear_modules=linear_modules)
    with open(os.path.join(output, HYBRID_FILE)) as f:
        written = json.load(f)
    # the teacher's family, not the loaded hybrid's (a Llama teacher's hybrid may be written as Qwen2)
    written["teacher_model_type"] = hybrid.get("teacher_model_type", written["teacher_model_type"])
    written["finetune"] = list(hybrid.get("finetune", [])) + [record]
    with open(os.path.join(output, HYBRID_FILE), "w") as f:
        json.dump(written, f, indent=1)
    for name in REPORT_FILES:
        if os.path.exists(os.path.join(path, name)):
            shutil.copy2(os.path.join(path, name), os.path.join(output, name))
    return {**summary, "output": output, "finished": True, "record": record}
