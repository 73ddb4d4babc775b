"""Stage 1, ``dash align``: train every layer's linear candidate to reproduce that layer's teacher attention.

One teacher forward per batch feeds all layers: each layer returns its teacher output (so later layers see
teacher activations) and scores its linear candidate against it (relative MSE). Only the linear
candidates' own parameters train. The result is a reusable *candidate bank*: ``linear_bank.safetensors``
plus ``linear_bank.json`` (model, candidate kind, shapes and per-layer held-out alignment error). Runs
checkpoint and resume like the search.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .data import PackedData
from .search import load_checkpoint, save_checkpoint
from .supernet import Supernet

BANK_WEIGHTS = "linear_bank.safetensors"
BANK_META = "linear_bank.json"


@dataclass
class AlignConfig:
    tokens: int = 2_000_000
    batch_size: int = 4
    lr: float = 1e-3
    checkpoint_every: int = 50
    seed: int = 0


BANK_FORMAT = "dash-linear-bank/2"  # tensors named layers.<i>.<kind>.<parameter>


def _bank_tensors(net: Supernet) -> dict:
    return {f"layers.{i}.{kind}.{name}": t.detach().cpu().contiguous()
            for i, s in enumerate(net.states) for kind, module in s.linear.items()
            for name, t in module.state_dict().items()}


def _load_linear(net: Supernet, tensors: dict, source: str) -> None:
    """Copy bank tensors into every layer's linear modules; a kind missing from the bank is an error."""
    for i, state in enumerate(net.states):
        for kind, module in state.linear.items():
            prefix = f"layers.{i}.{kind}."
            part = {k[len(prefix):]: v.to(state.alpha.device) for k, v in tensors.items() if k.startswith(prefix)}
            if not part:
                have = sorted({k.split(".")[2] for k in tensors if k.count(".") >= 3})
                raise ValueError(f"{source} has no aligned '{kind}' candidate for layer {i} (it holds {have}); "
                                 f"run `dash align` with the same linear candidates")
            module.load_state_dict(part)


def save_bank(net: Supernet, output_dir: str, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file(_bank_tensors(net), os.path.join(output_dir, BANK_WEIGHTS))
    with open(os.path.join(output_dir, BANK_META), "w") as f:
        json.dump(meta, f, indent=1)


def load_bank(net: Supernet, bank_dir: str, model_name: Optional[str] = None) -> dict:
    """Load aligned linear candidates into a supernet built with the same linear candidate."""
    from safetensors.torch import load_file

    meta_path, weights_path = os.path.join(bank_dir, BANK_META), os.path.join(bank_dir, BANK_WEIGHTS)
    for path in (meta_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"linear-candidate bank incomplete: {path} not found (run `dash align`)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        tensors = load_file(weights_path)
    except Exception as exc:
        raise ValueError(f"bank {bank_dir} is unreadable ({type(exc).__name__}: {exc})") from exc
    if model_name is not None and meta.get("model") != model_name:
        raise ValueError(f"bank {bank_dir} was aligned on {meta.get('model')!r}, not {model_name!r}")
    if meta.get("format") != BANK_FORMAT:
        raise ValueError(f"bank {bank_dir} has format {meta.get('format')!r}, this version reads {BANK_FORMAT!r}; "
                         "re-run `dash align`")
    if meta.get("num_layers") != len(net.states):
        raise ValueError(f"bank {bank_dir} has {meta.get('num_layers')} layers, the model {len(net.states)}")
    if not net.linear_parameters():
        raise ValueError("the supernet has no linear candidate to load the bank into (add 'gla' or 'gdn')")
    _load_linear(net, tensors, f"bank {bank_dir}")
    return meta


class Align:
    def __init__(self, net: Supernet, data: PackedData, config: AlignConfig, output_dir: str, model_name: str = ""):
        if not net.linear_parameters():
            raise ValueError("nothing to align: build the supernet with a linear candidate ('gla' or 'gdn')")
        self.net, self.data, self.config, self.output_dir, self.model_name = net, data, config, output_dir, model_name
        self.steps = max(1, math.ceil(config.tokens / (config.batch_size * data.seq_len)))
        self.optimizer = torch.optim.Adam(net.linear_parameters(), lr=config.lr)
        self.step, self.history = 0, []
        os.makedirs(output_dir, exist_ok=True)

    @property
    def state_path(self) -> str:
        return os.path.join(self.output_dir, "align_state.pt")

    @property
    def kinds(self) -> list:
        return list(self.net.states[0].linear.keys())

    def _layer_losses(self, batch: torch.Tensor) -> list:
        """Per layer, the mean over its linear candidates of their relative errors (the training loss)."""
        with self.net.aligning():
            self.net.model.base_model(batch, use_cache=False)
        return [torch.stack(list(s.align_losses.values())).mean() for s in self.net.states]

    def evaluate(self, rows: Optional[torch.Tensor] = None) -> dict:
        """kind -> per-layer relative error ||lin - teacher||^2 / ||teacher||^2 on held-out rows."""
        rows = self.data.heldout if rows is None else rows
        device = next(self.net.model.parameters()).device
        totals = {kind: torch.zeros(len(self.net.states)) for kind in self.kinds}
        with torch.no_grad():
            for row in rows:
                with self.net.aligning():
                    self.net.model.base_model(row[None].to(device), use_cache=False)
                for kind in self.kinds:
                    totals[kind] += torch.stack([s.align_losses[kind].float().cpu() for s in self.net.states])
        return {kind: (t / max(1, len(rows))).tolist() for kind, t in totals.items()}

    def save(self) -> None:
        state = {"step": self.step, "linear": _bank_tensors(self.net), "optimizer": self.optimizer.state_dict(),
                 "history": self.history, "config": asdict(self.config)}
        save_checkpoint(self.state_path, state)

    def try_resume(self) -> bool:
        if not os.path.exists(self.state_path):
            return False
        state = load_checkpoint(self.state_path, ("step", "linear", "optimizer", "history"))
        _load_linear(self.net, state["linear"], self.state_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]
        return True

    def run(self, progress: bool = True, stop_after: Optional[int] = None) -> dict:
        from tqdm.auto import tqdm

        resumed = self.try_resume()
        device = next(self.net.model.parameters()).device
        end = self.steps if stop_after is None else min(self.steps, self.step + stop_after)
        bar = tqdm(total=self.steps, initial=self.step, disable=not progress, unit="step",
                   desc="dash align" + (" (resumed)" if resumed else ""))
        started, first = time.time(), self.step
        while self.step < end:
            batch = self.data.batch(self.step, self.config.batch_size, self.config.seed).to(device)
            self.optimizer.zero_grad(set_to_none=True)
            losses = self._layer_losses(batch)
            loss = torch.stack(losses).mean()
            loss.backward()
            self.optimizer.step()
            self.step += 1
            self.history.append({"step": self.step, "loss": float(loss.detach()),
                                 "layers": [float(x.detach()) for x in losses]})
            rate = (self.step - first) * self.config.batch_size * self.data.seq_len / max(1e-9, time.time() - started)
            bar.update(1)
            bar.set_postfix(rel_err=f"{float(loss.detach()):.4f}", tok_s=f"{rate:.0f}")
            if self.step % self.config.checkpoint_every == 0 or self.step == end:
                self.save()
        bar.close()
        errors = self.evaluate()
        meta = {"format": BANK_FORMAT, "model": self.model_name, "kinds": self.kinds,
                "num_layers": len(self.net.states), "steps": self.step,
                "tokens": self.step * self.config.batch_size * self.data.seq_len,
                "heldout_relative_error": errors}
        save_bank(self.net, self.output_dir, meta)
        return meta
