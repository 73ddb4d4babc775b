"""RULER-style long-context tasks, generated offline, and their scoring.

Tasks follow RULER (Hsieh et al., 2024) in kind and scoring, with haystacks that ship with the package:
  niah_single_1  repeated noise sentences, one numeric needle          niah_multikey_1  + distractor needles
  niah_single_2  prose haystack (pydoc), one numeric needle           niah_multikey_2  prose, many distractors
  niah_single_3  prose haystack, one UUID needle                      niah_multivalue  one key, four values
  niah_multiquery four keys asked at once                             passkey          the classic pass key
  vt             variable tracking: every name bound to a value through a chain of assignments
  cwe            common words extraction: the ten words repeated most often in a list
  fwe            frequent words extraction: the three most frequent coded words in a Zipf-distributed text
Every sample is a pure function of (task, length, index, seed); its answers are recoverable from its text.
Score of a sample (RULER's string_match_all): the fraction of its answers found in the model's output.
"""
from __future__ import annotations

import random
import string
import uuid
import weakref
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multivalue", "niah_multiquery", "passkey", "vt", "cwe", "fwe")
MAX_NEW_TOKENS = {"vt": 40, "cwe": 96, "fwe": 40}  # others: 32


@dataclass
class Sample:
    task: str
    length: int  # target prompt length in tokens
    prompt: str
    answers: List[str]

    def to_dict(self) -> dict:
        return asdict(self)


def score(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all: the fraction of answers that occur (case-insensitively) in the prediction."""
    if not answers:
        raise ValueError("a sample needs at least one answer")
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


class _Haystack:
    """Filler text of a requested token length: noise sentences or prose paragraphs."""

    def __init__(self, tokenizer, prose: bool, rng: random.Random):
        from .data import natural_paragraphs

        self.tokenizer, self.rng = tokenizer, rng
        self.units = [p + "\n" for p in natural_paragraphs()] if prose else [NOISE]
        self.prose = prose
        self._cost: Dict[str, int] = {}

    def tokens(self, text: str) -> int:
        if text not in self._cost:
            self._cost[text] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._cost[text]

    def units_for(self, budget: int) -> List[str]:
        """Consecutive units (from a random start for prose) totalling about ``budget`` tokens."""
        out, used = [], 0
        start = self.rng.randrange(len(self.units)) if self.prose else 0
        i = start
        while used < budget:
            unit = self.units[i % len(self.units)]
            cost = self.tokens(unit)
            if used + cost > budget:
                break
            out.append(unit)
            used += cost
            i += 1
        return out


def _fit(build: Callable[[int], str], tokenizer, length: int) -> str:
    """Largest filler budget whose prompt stays within ``length`` tokens (prompts grow with the budget)."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    lo, hi = 0, length
    best = build(0)
    if count(best) > length:
        raise ValueError(f"length {length} is too short for the task's question and needles ({count(best)} tokens)")
    while lo < hi:  # binary search on the filler budget
        mid = (lo + hi + 1) // 2
        text = build(mid)
        if count(text) <= length:
            best, lo = text, mid
        else:
            hi = mid - 1
    return best


def _insert(units: List[str], needles: Sequence[str], rng: random.Random) -> str:
    """Needles at random depths between filler units."""
    units = list(units)
    for needle in needles:
        units.insert(rng.randint(0, len(units)), needle + " ")
    return "".join(units)


def _number(rng):
    return str(rng.randint(1_000_000, 9_999_999))


def _key(rng, words):
    return "-".join(rng.sample(words, 2))


def _niah(tokenizer, length, rng, words, *, prose, value_kind, num_keys, num_values, num_queries):
    value = {"number": _number, "uuid": lambda r: str(uuid.UUID(int=r.getrandbits(128)))}[value_kind]
    keys = []
    while len(keys) < num_keys:
        key = _key(rng, words)
        if key not in keys:
            keys.append(key)
    values = {k: [value(rng) for _ in range(num_values if i == 0 else 1)] for i, k in enumerate(keys)}
    asked = keys[:num_queries] if num_queries > 1 else keys[:1]
    kind = "numbers" if value_kind == "number" else "ids"
    needles = [f"One of the special magic {kind} for {k} is: {v}." for k in keys for v in values[k]]
    rng.shuffle(needles)
    seed = rng.random()
    if len(asked) == 1:
        question = f"What are all the special magic {kind} for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {asked[0]} mentioned in the provided text are"
    else:
        question = (f"What are all the special magic {kind} for {', '.join(asked[:-1])} and {asked[-1]} mentioned in "
                    "the provided text?")
        prefix = f"The special magic {kind} for {', '.join(asked[:-1])} and {asked[-1]} mentioned in the provided text are"
    intro = (f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about them afterwards.\n")

    def build(budget):
        local = random.Random(seed)
        hay = _Haystack(tokenizer, prose, local)
        return f"{intro}{_insert(hay.units_for(budget), needles, local)}\n{question} {prefix}"

    answers = [v for k in asked for v in values[k]]
    return _fit(build, tokenizer, length), answers


def _passkey(tokenizer, length, rng, words):
    key = str(rng.randint(10000, 99999))
    seed = rng.random()

    def build(budget):
        local = random.Random(seed)
        hay = _Haystack(tokenizer, False, local)
        body = _insert(hay.units_for(budget), [f"The pass key is {key}. Remember it. {key} is the pass key."], local)
        return ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                f"I will quiz you about the important information there.\n{body}\nWhat is the pass key? "
                "The pass key is")

    return _fit(build, tokenizer, length), [key]


def _vt(tokenizer, length, rng, words, chains=1, hops=4):
    names = []
    while len(names) < chains * (hops + 1):
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = names[:hops + 1]
    statements = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i + 1]} = VAR {chain[i]}." for i in range(hops)]
    seed = rng.random()

    def build(budget):
        local = random.Random(seed)
        hay = _Haystack(tokenizer, False, local)
        units = hay.units_for(budget)
        # keep the chain in order: insert at increasing depths
        depths = sorted(local.randint(0, len(units)) for _ in statements)
        parts, last = [], 0
        for depth, stmt in zip(depths, statements):
            parts.extend(units[last:depth])
            parts.append(stmt + " ")
            last = depth
        parts.extend(units[last:])
        return ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
                f"{''.join(parts)}\nQuestion: Find all variables that are assigned the value {value} in the text "
                f"above. Answer: According to the chain(s) of variable assignment in the text above, "
                f"{len(chain)} variables are assigned the value {value}, they are:")

    return _fit(build, tokenizer, length), chain


def _cwe(tokenizer, length, rng, words, common=10, rare_freq=3):
    common_freq = max(rare_freq + 2, min(30, length // 160))  # RULER's 30 at long lengths; fits short ones
    pool = rng.sample(list(words), min(len(words), 2000))
    common_words, rare_words = pool[:common], pool[common:]
    seed = rng.random()

    def build(budget):
        local = random.Random(seed)
        n_rare = max(0, budget // (rare_freq * 2))  # ~2 tokens a listed word
        listed = [w for w in common_words for _ in range(common_freq)]
        listed += [w for w in rare_words[:n_rare] for _ in range(rare_freq)]
        local.shuffle(listed)
        numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
        return (f"Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                f"the ones that appear most often.\n{numbered}\nQuestion: What are the {common} most common words "
                f"in the above list? Answer: The top {common} words that appear most often in the list are:")

    return _fit(build, tokenizer, length), common_words


def _fwe(tokenizer, length, rng, words, vocab=800, alpha=2.0):
    coded = []
    while len(coded) < vocab:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        if word not in coded:
            coded.append(word)
    weights = [1.0 / (i + 1) ** alpha for i in range(vocab)]
    seed = rng.random()

    def build(budget):
        local = random.Random(seed)
        n = max(10, budget // 3)  # ~3 tokens a coded word
        text = " ".join(local.choices(coded, weights=weights, k=n))
        return ("Read the following coded text and track the frequency of each coded word. Find the three most "
                f"frequently appeared coded words.\n{text}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text? "
                "Answer: According to the coded text above, the three most frequently appeared words are:")

    prompt = _fit(build, tokenizer, length)
    body = prompt.split("\n")[1]
    top3 = [w for w, _ in Counter(body.split()).most_common(3)]  # exact counts of this sample's text
    return prompt, top3


def generate_samples(tokenizer, task: str, length: int, num_samples: int, seed: int = 0,
                     words: Optional[Sequence[str]] = None) -> List[Sample]:
    """``num_samples`` prompts of at most ``length`` tokens for ``task``, deterministic in (task, length, seed)."""
    from .data import vocabulary_words

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
    if length < 64:
        raise ValueError(f"length must be >= 64 tokens, got {length}")
    words = list(words) if words is not None else vocabulary_words(tokenizer)
    out = []
    for index in range(num_samples):
        rng = random.Random(f"{task}/{length}/{index}/{seed}")
        if task.startswith("niah") or task == "passkey":
            if task == "passkey":
                prompt, answers = _passkey(tokenizer, length, rng, words)
            else:
                spec = {
                    "niah_single_1": dict(prose=False, value_kind="number", num_keys=1, num_values=1, num_queries=1),
                    "niah_single_2": dict(prose=True, value_kind="number", num_keys=1, num_values=1, num_queries=1),
                    "niah_single_3": dict(prose=True, value_kind="uuid", num_keys=1, num_values=1, num_queries=1),
                    "niah_multikey_1": dict(prose=True, value_kind="number", num_keys=4, num_values=1,
                                            num_queries=1),
                    "niah_multikey_2": dict(prose=False, value_kind="number", num_keys=16, num_values=1,
                                            num_queries=1),
                    "niah_multivalue": dict(prose=True, value_kind="number", num_keys=1, num_values=4,
                                            num_queries=1),
                    "niah_multiquery": dict(prose=True, value_kind="number", num_keys=4, num_values=1,
                                            num_queries=4),
                }[task]
                prompt, answers = _niah(tokenizer, length, rng, words, **spec)
        else:
            prompt, answers = {"vt": _vt, "cwe": _cwe, "fwe": _fwe}[task](tokenizer, length, rng, words)
        out.append(Sample(task, length, prompt, list(answers)))
    return out


_PROMPTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> evaluate's samples


def _evaluation_samples(tokenizer, task: str, length: int, num_samples: int, seed: int) -> List[Sample]:
    """generate_samples, kept while the tokenizer lives: a comparison scores many hybrids on the same prompts, whose
    making (a binary search over the filler by tokenizing the prompt) costs about a minute at 1K-8K."""
    try:
        kept = _PROMPTS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer without weak references: made each time
        return generate_samples(tokenizer, task, length, num_samples, seed)
    key = (task, length, num_samples, seed)
    if key not in kept:
        kept[key] = generate_samples(tokenizer, task, length, num_samples, seed)
    return kept[key]


def _filler_id(tokenizer) -> int:
    """The token that left-fills the shorter prompts of a batch: a newline (harmless before a prompt)."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return int(ids[-1]) if len(ids) else int(tokenizer.eos_token_id)


def evaluate(model, tokenizer, lengths: Sequence[int], tasks: Sequence[str] = TASKS, num_samples: int = 5,
             seed: int = 0, progress: bool = True, batch_size: int = 1) -> Dict:
    """Greedy answers for every (task, length); returns per-task, per-length and average scores.

    ``batch_size`` prompts of one (task, length) generate together. The DASH supernet and its kernels take no
    padding mask, so the shorter prompts of a batch are left-filled with newline tokens to the longest one (a few
    tokens: the prompts are generated to the same length); with ``batch_size=1`` every prompt runs as written."""
    import torch
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    limit = getattr(model.config, "max_position_embeddings", None)
    for length in lengths:
        if limit is not None and length > limit:
            raise ValueError(f"length {length} exceeds the model's context of {limit} tokens")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS)}")
    device = next(model.parameters()).device
    filler = _filler_id(tokenizer)
    scores: Dict[str, Dict[int, float]] = {t: {} for t in tasks}
    records = []
    bar = tqdm(total=len(tasks) * len(lengths) * num_samples, disable=not progress, desc="ruler")
    for task in tasks:
        new_tokens = MAX_NEW_TOKENS.get(task, 32)
        for length in lengths:
            total = 0.0
            # prompt + answer fit the length (RULER counts the answer budget inside the sequence length)
            samples = _evaluation_samples(tokenizer, task, length - new_tokens, num_samples, seed)
            for start in range(0, len(samples), batch_size):
                group = samples[start:start + batch_size]
                encoded = [list(tokenizer(s.prompt, add_special_tokens=False)["input_ids"]) for s in group]
                width = max(len(ids) for ids in encoded)
                ids = torch.tensor([[filler] * (width - len(x)) + x for x in encoded], device=device)
                with torch.no_grad():
                    # an explicit all-ones mask: generate would otherwise mask prompt tokens equal to the pad id
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
                for row, sample in zip(out, group):
                    prediction = tokenizer.decode(row[width:], skip_special_tokens=True)
                    s = score(prediction, sample.answers)
                    total += s
                    records.append({"task": task, "length": length, "score": s, "answers": sample.answers,
                                    "prediction": prediction})
                bar.update(len(group))
            scores[task][length] = total / num_samples
    bar.close()
    per_length = {length: sum(scores[t][length] for t in tasks) / len(tasks) for length in lengths}
    return {"tasks": list(tasks), "lengths": list(lengths), "samples_per_task": num_samples, "seed": seed,
            "batch_size": batch_size, "scores": scores, "average_per_length": per_length,
            "average": sum(per_length.values()) / len(per_length), "records": records}


def teacher_task_weights(model, tokenizer, length: int, num_samples: int = 8, seed: int = 0,
                         tasks: Sequence[str] = TASKS, progress: bool = True, batch_size: int = 1) -> Dict[str, float]:
    """{task: the model's RULER score} on ``num_samples`` greedy answers at ``length`` tokens, for the tasks it
    answers at all (score > 0): the weights of a retrieval mix of what the teacher can do
    (``dash.data.retrieval_rows(tasks=...)``, ``--retrieval-tasks solved``). A prompt the teacher answers wrongly
    teaches a hybrid only to repeat the mistake. The prompts are the training rows' (seed ``seed +
    RETRIEVAL_SEED_OFFSET``), not the evaluation's; a task whose prompt does not fit ``length`` is left out."""
    from .data import RETRIEVAL_SEED_OFFSET

    def fits(task):  # evaluate's own prompts (the answer budget inside the length), kept for it to reuse
        try:
            _evaluation_samples(tokenizer, task, length - MAX_NEW_TOKENS.get(task, 32), num_samples,
                                seed + RETRIEVAL_SEED_OFFSET)
            return True
        except ValueError:
            return False

    fitting = [task for task in tasks if fits(task)]
    if not fitting:
        raise ValueError(f"no prompt of the tasks {list(tasks)} fits {length} tokens: use longer rows")
    tasks = fitting
    result = evaluate(model, tokenizer, [length], tasks, num_samples, seed=seed + RETRIEVAL_SEED_OFFSET,
                      progress=progress, batch_size=batch_size)
    weights = {task: round(result["scores"][task][length], 4) for task in tasks}
    weights = {task: weight for task, weight in weights.items() if weight > 0}
    if not weights:
        raise ValueError(f"the teacher answers none of the tasks {list(tasks)} at {length} tokens ({num_samples} "
                         "prompts each): name the retrieval tasks instead of 'solved'")
    return weights


def markdown_table(result: Dict) -> str:
    lengths = result["lengths"]
    lines = ["| task | " + " | ".join(str(n) for n in lengths) + " |", "| --- |" + " --- |" * len(lengths)]
    for task in result["tasks"]:
        lines.append(f"| {task} | " + " | ".join(f"{100 * result['scores'][task][n]:.1f}" for n in lengths) + " |")
    lines.append("| **average** | " + " | ".join(f"**{100 * result['average_per_length'][n]:.1f}**"
                                                for n in lengths) + " |")
    return "\n".join(lines)
