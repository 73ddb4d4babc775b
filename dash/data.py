"""Training text for alignment and search: user files, or an offline default; packed to fixed length.

The offline default needs no download. It mixes natural English that ships with every CPython (the
language reference topics of ``pydoc_data``, ~110K tokens) with synthetic documents that have
long-range dependencies: facts stated early and asked about much later, key-value lists recalled out
of order, passages repeated after long gaps, with natural prose from the same source as filler. Such
documents reward exactly what full attention gives over a window, which is the signal the search needs.

Retrieval rows (``add_retrieval_rows``, any data): RULER-style prompts (``dash.ruler``'s generators, at seeds
the evaluation never uses) followed by their answers, teacher-forced, each alone in a row (the rest of the row is
natural text after an EOS; or ``prompts_per_row`` of them to a row, each in its slot), with a mask of the positions
that predict an answer token. Retrieval is where a hybrid's missing context shows, and those few answer tokens are
where it shows most: scored on them, the hybrids of the SmolLM2 comparison rank as RULER ranks them, where the mean
KL over the text does not (benchmarks/NOTES.md, session 9). ``dash.search``'s ``answers`` objective weights them.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")


def _hub_documents(spec: str, text_field: str) -> List[str]:
    """``name[:split]`` of a hub dataset (needs the ``datasets`` package and a network)."""
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"hub dataset 'hf:{spec}' needs the datasets package: pip install datasets") from exc
    rows = datasets.load_dataset(name, split=split or "train")
    if text_field not in rows.column_names:
        raise ValueError(f"hub dataset {name} has no '{text_field}' column (columns: {rows.column_names})")
    return [r for r in rows[text_field] if isinstance(r, str)]


def read_documents(paths: Sequence[str], text_field: str = "text") -> List[str]:
    """Documents from text files (one document each), jsonl files (``text_field`` per line), folders,
    or ``hf:<dataset>[:split]`` hub datasets where a network exists."""
    docs: List[str] = []
    for path in paths:
        if path.startswith("hf:"):
            docs.extend(_hub_documents(path[3:], text_field))
        elif os.path.isdir(path):
            for root, _, files in sorted(os.walk(path)):
                inner = [os.path.join(root, f) for f in sorted(files) if f.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)]
                docs.extend(read_documents(inner, text_field))
        elif path.endswith(JSONL_SUFFIXES):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"{path}:{line_no}: expected a JSON object with a string field '{text_field}'")
                    docs.append(record[text_field])
        elif os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
        else:
            raise FileNotFoundError(f"data path not found: {path}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"no non-empty documents found in {list(paths)}")
    return docs


def vocabulary_words(tokenizer, limit: int = 4000) -> List[str]:
    """Plain alphabetic words from the tokenizer's vocabulary (deterministic order)."""
    words = set()
    for piece in tokenizer.get_vocab():
        word = piece.replace("Ġ", "").replace("▁", "").strip()
        if 3 <= len(word) <= 10 and word.isascii() and word.isalpha() and word.islower():
            words.add(word)
    words = sorted(words)[:limit]
    if len(words) < 50:
        raise ValueError("tokenizer vocabulary yields too few plain words for synthetic documents")
    return words


def natural_paragraphs() -> List[str]:
    """English paragraphs of the Python language reference shipped with CPython (offline, deterministic)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        paragraphs.extend(p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 80)
    return paragraphs


def synthetic_documents(words: Sequence[str], num_docs: int, approx_words: int, seed: int = 0,
                        filler: Optional[Sequence[str]] = None) -> List[str]:
    """Documents whose later parts depend on facts stated far earlier.

    ``filler``: paragraphs to put between a fact and its recall (random ``words`` when None)."""
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        kind = i % 3

        def gap(n_words):
            if not filler:
                return " ".join(rng.choice(words) for _ in range(n_words))
            out, count = [], 0
            while count < n_words:
                para = filler[rng.randrange(len(filler))]
                out.append(para)
                count += len(para.split())
            return "\n\n".join(out)

        if kind == 0:  # key-value list, then recall in a different order
            keys = rng.sample(list(words), 12)
            facts = {k: rng.randrange(1000, 9999) for k in keys}
            head = " ".join(f"The code for {k} is {v}." for k, v in facts.items())
            tail = " ".join(f"Recall: the code for {k} is {facts[k]}." for k in rng.sample(keys, len(keys)))
            docs.append(f"{head}\n{gap(max(10, approx_words - 120))}\n{tail}")
        elif kind == 1:  # a passage repeated after a long gap
            passage = " ".join(rng.choice(words) for _ in range(60))
            docs.append(f"{passage}\n{gap(max(10, approx_words - 120))}\nOnce more: {passage}")
        else:  # a named entity introduced early, referred back to at the end
            name, city, job = rng.choice(words).title(), rng.choice(words).title(), rng.choice(words)
            docs.append(f"{name} lives in {city} and works as a {job}. {gap(max(10, approx_words - 30))} "
                        f"Where does {name} live? {name} lives in {city}, working as a {job}.")
    return docs


@dataclass
class PackedData:
    """Token sequences of equal length: ``train`` [N, T] and ``heldout`` [M, T] (int64); ``train_answers`` [N, T]
    (bool, or None: no retrieval rows) marks the positions whose next token is a retrieval answer's."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_answers: Optional[torch.Tensor] = None

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def batch_rows(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Row indices of a given step's batch: a seeded permutation per epoch, so a resumed run sees the same data."""
        n = self.train.shape[0]
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} packed training sequences")
        per_epoch = n // batch_size
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        return order[index * batch_size:(index + 1) * batch_size]

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        return self.train[self.batch_rows(step, batch_size, seed)]

    def answers(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), T] answer mask of those training rows (all False without retrieval rows)."""
        if self.train_answers is None:
            return torch.zeros(len(rows), self.seq_len, dtype=torch.bool)
        return self.train_answers[rows]

    def digest(self) -> str:
        """A fingerprint of the training rows and answer mask: a checkpoint continues only on its own data."""
        return tensor_digest(self.train, self.train_answers)[:16]


def tensor_digest(*tensors: Optional[torch.Tensor]) -> str:
    """SHA-1 of the tensors' bytes (None skipped): the same data, the same digest."""
    import hashlib

    h = hashlib.sha1()
    for tensor in tensors:
        if tensor is not None:
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pack(documents: Iterable[str], tokenizer, seq_len: int, *, seed: int = 0, heldout_fraction: float = 0.05,
         max_tokens: Optional[int] = None) -> PackedData:
    """Tokenize, shuffle documents (seeded), join with EOS and cut into ``seq_len`` rows; split off held-out rows."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    docs = list(documents)
    random.Random(seed).shuffle(docs)
    eos = tokenizer.eos_token_id
    stream: List[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    rows = len(stream) // seq_len
    if rows < 2:
        raise ValueError(f"only {len(stream)} tokens: need at least {2 * seq_len} for sequences of {seq_len}")
    data = torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
    n_held = max(1, int(round(rows * heldout_fraction))) if heldout_fraction > 0 else 0
    return PackedData(train=data[n_held:], heldout=data[:n_held])


RETRIEVAL_SEED_OFFSET = 1000  # retrieval rows draw samples at seed + this; `dash eval` / `dash compare` use the seed
ANSWER_ROOM = 96  # tokens kept after a retrieval prompt for its answer (cwe's ten words need the most)


def parse_retrieval_tasks(specs: Optional[Sequence[str]], name: str = "retrieval tasks") -> Optional[Dict[str, float]]:
    """``--retrieval-tasks`` specs, each ``task`` or ``task:weight``, as {task: weight} (None: every task, in turn).
    A weight is the task's share of the retrieval prompts relative to the others' (a bare task weighs 1); a task of
    weight 0 is left out. Errors begin with ``name`` (the argument's, e.g. ``--retrieval-tasks``)."""
    from .ruler import TASKS

    if not specs:
        return None
    weights: Dict[str, float] = {}
    for spec in specs:
        task, sep, value = str(spec).partition(":")
        if task not in TASKS:
            raise ValueError(f"{name}: unknown task {task!r} in {spec!r}; known: {list(TASKS)}")
        if task in weights:
            raise ValueError(f"{name}: {task!r} is named twice")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{name}: the weight of {spec!r} must be a finite number >= 0 (task:weight)")
        weights[task] = weight
    if not any(weights.values()):
        raise ValueError(f"{name}: every weight is 0 in {list(specs)}")
    return weights


def format_retrieval_tasks(weights: Optional[Mapping[str, float]]) -> Optional[List[str]]:
    """The specs ``parse_retrieval_tasks`` reads back as ``weights`` (a recorded setting, a shard's arguments)."""
    return None if weights is None else [f"{task}:{weight:g}" for task, weight in weights.items()]


def _shares(total: int, weights: Sequence[float]) -> List[int]:
    """``total`` split in proportion to ``weights`` by largest remainders (ties: the earlier one)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    shares = [int(math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[:total - sum(shares)]:
        shares[i] += 1
    return shares


def retrieval_rows(tokenizer, seq_len: int, count: int, filler_ids: Sequence[int], *, seed: int = 0,
                   tasks: Union[None, Sequence[str], Mapping[str, float]] = None, prompts_per_row: int = 1):
    """``count`` rows of ``seq_len`` tokens, each a RULER-style prompt, its answers (joined by commas,
    teacher-forced), EOS, then ``filler_ids`` (natural text, from a seeded offset) to the end; and the [count, T]
    mask of the positions that predict an answer token. Tasks take turns (default: every task of ``dash.ruler``
    whose prompt fits); prompt lengths take turns over a quarter, a half and all of the row less ``ANSWER_ROOM``,
    so the answers sit at several distances from their needles. Samples are ``dash.ruler``'s at seed
    ``seed + RETRIEVAL_SEED_OFFSET``: disjoint from the evaluation's prompts (seed ``seed``).

    ``prompts_per_row`` n > 1: each row is n slots of ``seq_len // n`` tokens (the last one takes the remainder),
    each a prompt whose length takes those turns relative to the slot (a quarter, a half, the slot less
    ``ANSWER_ROOM``), its answers, EOS and filler to the slot's end: ``count * n`` prompts, and n runs of answer
    positions in every row (``dash.search.prompt_answer_weights`` counts each run as a prompt). More prompts for
    the same tokens: a short answer (a passkey's first token) is not outweighed by a few long ones.

    ``tasks`` a mapping {task: weight} (``parse_retrieval_tasks``): each task's share of the prompts is in
    proportion to its weight (largest remainders), split evenly over the lengths its prompt fits; e.g. the tasks
    the teacher answers, weighted by how often (``dash.ruler.teacher_task_weights``)."""
    from .ruler import TASKS, generate_samples

    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if isinstance(prompts_per_row, bool) or not isinstance(prompts_per_row, int) or prompts_per_row < 1:
        raise ValueError(f"prompts_per_row must be an integer >= 1, got {prompts_per_row!r}")
    weights = dict(tasks) if isinstance(tasks, Mapping) else None
    if weights is not None:
        parse_retrieval_tasks([f"{t}:{w}" for t, w in weights.items()])  # the same checks as the specs'
        tasks = [t for t, w in weights.items() if w > 0]
    tasks = list(TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown retrieval tasks {unknown}; known: {list(TASKS)}")
    slot = seq_len // prompts_per_row  # the last slot of a row also takes seq_len % prompts_per_row
    lengths = sorted({n for n in (slot // 4, slot // 2, slot - ANSWER_ROOM) if n >= 64})
    if not lengths and prompts_per_row > 1:
        raise ValueError(f"prompts_per_row {prompts_per_row} leaves slots of {slot} tokens, too short for a "
                         f"retrieval prompt: a slot needs >= 128 tokens (a prompt of half of it, >= 64; seq_len >= "
                         f"{prompts_per_row * 128}, or fewer prompts_per_row)")
    if not lengths or len(filler_ids) < seq_len:
        raise ValueError(f"retrieval rows need seq_len >= {64 + ANSWER_ROOM} and {seq_len} filler tokens, got "
                         f"seq_len {seq_len} and {len(filler_ids)} (text alone: --retrieval-fraction 0, with an "
                         "objective other than answers or answers_nll)")
    words = vocabulary_words(tokenizer)
    seed_of_samples = seed + RETRIEVAL_SEED_OFFSET

    def fits(task, length):  # the task's question and needles alone may exceed a short length
        try:
            generate_samples(tokenizer, task, length, 1, seed_of_samples, words=words)
            return True
        except ValueError:
            return False

    kinds = [(task, length) for length in lengths for task in tasks if fits(task, length)]
    if not kinds:
        raise ValueError(f"tasks {tasks} yield no retrieval prompt of at most {lengths[-1]} tokens"
                         + (f" (slots of {slot} tokens: prompts_per_row {prompts_per_row})"
                            if prompts_per_row > 1 else ""))
    total = count * prompts_per_row
    if weights is None:  # tasks and lengths in turn
        per_kind = [total // len(kinds) + (i < total % len(kinds)) for i in range(len(kinds))]
    else:
        fitting = [t for t in tasks if any(task == t for task, _ in kinds)]
        per_task = dict(zip(fitting, _shares(total, [weights[t] for t in fitting])))
        per_kind = []
        for task, length in kinds:
            mine = [n for t, n in kinds if t == task]
            i = mine.index(length)
            per_kind.append(per_task[task] // len(mine) + (i < per_task[task] % len(mine)))
    samples = []
    for n, (task, length) in zip(per_kind, kinds):
        samples.extend(generate_samples(tokenizer, task, length, n, seed_of_samples, words=words) if n else [])
    rng = random.Random(seed)
    rng.shuffle(samples)
    filler = torch.as_tensor(filler_ids, dtype=torch.long).flatten()
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = torch.empty(count, seq_len, dtype=torch.long)
    mask = torch.zeros(count, seq_len, dtype=torch.bool)
    for i, sample in enumerate(samples):
        row, k = divmod(i, prompts_per_row)
        start = k * slot
        size = slot if k < prompts_per_row - 1 else seq_len - start  # one slot a row: the whole row
        prompt = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + ", ".join(sample.answers), add_special_tokens=False)["input_ids"]
        head = torch.tensor((prompt + answer + eos)[:size], dtype=torch.long)
        offset = rng.randrange(filler.numel() - size + 1)
        ids[row, start:start + size] = torch.cat([head, filler[offset:offset + size - head.numel()]])
        mask[row, start + len(prompt) - 1:start + min(len(prompt) + len(answer), size) - 1] = True
    return ids, mask


def add_retrieval_rows(data: PackedData, tokenizer, fraction: float, *, seed: int = 0,
                       tasks: Union[None, Sequence[str], Mapping[str, float]] = None,
                       prompts_per_row: int = 1) -> PackedData:
    """``data`` with retrieval rows (``retrieval_rows``, ``prompts_per_row`` prompts each) making up ``fraction``
    of its training rows, shuffled in (seeded); the held-out rows stay as they are (perplexity is measured on
    text). Filler: the data's own text."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"retrieval fraction must be in [0, 1), got {fraction}")
    count = int(round(data.train.shape[0] * fraction / (1.0 - fraction)))
    if count == 0:
        return data
    ids, mask = retrieval_rows(tokenizer, data.seq_len, count, data.train.flatten(), seed=seed, tasks=tasks,
                               prompts_per_row=prompts_per_row)
    old_mask = data.answers(torch.arange(data.train.shape[0]))
    order = torch.randperm(data.train.shape[0] + count, generator=torch.Generator().manual_seed(seed))
    return PackedData(train=torch.cat([data.train, ids])[order], heldout=data.heldout,
                      train_answers=torch.cat([old_mask, mask])[order])


def default_data(tokenizer, seq_len: int, num_tokens: int, *, seed: int = 0, heldout_fraction: float = 0.05):
    """The offline default corpus (see module docstring), about ``num_tokens`` tokens."""
    words = vocabulary_words(tokenizer)
    prose = natural_paragraphs()
    approx_words = max(50, int(seq_len * 0.6))
    recall = synthetic_documents(words, num_docs=max(8, num_tokens // max(1, seq_len) + 4),
                                 approx_words=approx_words, seed=seed, filler=prose)
    # natural documents: runs of consecutive paragraphs, as long as a sequence
    natural, current = [], []
    for para in prose:
        current.append(para)
        if sum(len(p.split()) for p in current) >= approx_words:
            natural.append("\n\n".join(current))
            current = []
    docs = [d for pair in zip(recall, natural) for d in pair] + recall[len(natural):]
    return pack(docs, tokenizer, seq_len, seed=seed, heldout_fraction=heldout_fraction,
                max_tokens=int(num_tokens * (1 + heldout_fraction)) + seq_len)
