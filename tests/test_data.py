"""Retrieval rows (dash.data.retrieval_rows): one prompt a row as before, several with prompts_per_row; errors."""
import random
from collections import Counter

import pytest
import torch

from dash.data import (ANSWER_ROOM, RETRIEVAL_SEED_OFFSET, PackedData, add_retrieval_rows, retrieval_rows,
                       vocabulary_words)
from dash.ruler import TASKS, generate_samples
from helpers import TextTokenizer

TASKS_HERE = ["passkey", "niah_single_1", "vt", "cwe"]  # short and long answers, one and several


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer()


def filler(n=8000, seed=0):
    return torch.randint(1, 10_000, (n,), generator=torch.Generator().manual_seed(seed))


def runs(row_mask):
    """[(first, last)] of each run of True in a [T] mask."""
    out = []
    for p in row_mask.nonzero().flatten().tolist():
        if out and out[-1][1] == p - 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return [tuple(r) for r in out]


def one_prompt_a_row(tokenizer, seq_len, count, filler_ids, seed, tasks):
    """The rows and mask as retrieval_rows built them before prompts_per_row (one prompt a row), written out."""
    words = vocabulary_words(tokenizer)
    lengths = sorted({n for n in (seq_len // 4, seq_len // 2, seq_len - ANSWER_ROOM) if n >= 64})

    def fits(task, length):
        try:
            generate_samples(tokenizer, task, length, 1, seed + RETRIEVAL_SEED_OFFSET, words=words)
            return True
        except ValueError:
            return False

    kinds = [(t, n) for n in lengths for t in tasks if fits(t, n)]
    samples = []
    for i, (task, length) in enumerate(kinds):
        n = count // len(kinds) + (i < count % len(kinds))
        samples += generate_samples(tokenizer, task, length, n, seed + RETRIEVAL_SEED_OFFSET, words=words) if n else []
    rng = random.Random(seed)
    rng.shuffle(samples)
    ids = torch.empty(count, seq_len, dtype=torch.long)
    mask = torch.zeros(count, seq_len, dtype=torch.bool)
    for i, sample in enumerate(samples):
        prompt = tokenizer(sample.prompt)["input_ids"]
        answer = tokenizer(" " + ", ".join(sample.answers))["input_ids"]
        head = torch.tensor((prompt + answer + [tokenizer.eos_token_id])[:seq_len])
        start = rng.randrange(filler_ids.numel() - seq_len + 1)
        ids[i] = torch.cat([head, filler_ids[start:start + seq_len - head.numel()]])
        mask[i, len(prompt) - 1:min(len(prompt) + len(answer), seq_len) - 1] = True
    return ids, mask


def test_one_prompt_a_row_is_as_before(tokenizer):
    text = filler()
    for seq_len, count, seed, tasks in ((300, 7, 0, TASKS_HERE), (512, 5, 3, None)):
        want = one_prompt_a_row(tokenizer, seq_len, count, text, seed, list(tasks or TASKS))
        got = retrieval_rows(tokenizer, seq_len, count, text, seed=seed, tasks=tasks)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        explicit = retrieval_rows(tokenizer, seq_len, count, text, seed=seed, tasks=tasks, prompts_per_row=1)
        assert torch.equal(explicit[0], want[0]) and torch.equal(explicit[1], want[1])
        assert all(len(runs(m)) == 1 for m in got[1])
    data = PackedData(train=text[:12 * 300].view(12, 300), heldout=text[:300].view(1, 300))
    a = add_retrieval_rows(data, tokenizer, 0.5, seed=2, tasks=TASKS_HERE)
    b = add_retrieval_rows(data, tokenizer, 0.5, seed=2, tasks=TASKS_HERE, prompts_per_row=1)
    assert torch.equal(a.train, b.train) and torch.equal(a.train_answers, b.train_answers)
    assert a.digest() == b.digest()


def test_three_prompts_a_row_each_with_its_answers(tokenizer):
    seq_len, count, n, seed = 3 * 256 + 2, 4, 3, 0
    text = filler()
    ids, mask = retrieval_rows(tokenizer, seq_len, count, text, seed=seed, tasks=TASKS_HERE, prompts_per_row=n)
    assert ids.shape == mask.shape == (count, seq_len)
    slot = seq_len // n
    # every sample the rows may hold, by prompt: samples are a pure function of (task, length, index, seed)
    lengths = (slot // 4, slot // 2, slot - ANSWER_ROOM)
    known = {}
    for task in TASKS_HERE:
        for length in lengths:
            try:
                samples = generate_samples(tokenizer, task, length, count * n, seed + RETRIEVAL_SEED_OFFSET,
                                           words=vocabulary_words(tokenizer))
            except ValueError:  # too short for the task: no such prompt in the rows either
                continue
            known.update((s.prompt, s.answers) for s in samples)
    prompts, sizes = [], []
    for row, at in zip(ids, mask):
        found = runs(at)
        assert len(found) == n
        for k, (first, last) in enumerate(found):
            sizes.append(first + 1 - k * slot)
            start = k * slot
            assert start <= first and last + 2 < start + slot  # inside its slot, its EOS too
            prompt = tokenizer.decode(row[start:first + 1])  # the slot's prompt ends where its answer's run begins
            answer = tokenizer.decode(row[first + 1:last + 2])  # the tokens the run's positions predict
            assert prompt in known and answer == " " + ", ".join(known[prompt])
            assert int(row[last + 2]) == tokenizer.eos_token_id
            assert len(tokenizer(prompt)["input_ids"]) <= slot - ANSWER_ROOM
            prompts.append(prompt)
    assert len(set(prompts)) == count * n  # count rows, count * n prompts
    assert min(sizes) <= slot // 4 < slot // 2 < max(sizes)  # lengths take turns relative to the slot
    again = retrieval_rows(tokenizer, seq_len, count, text, seed=seed, tasks=TASKS_HERE, prompts_per_row=n)
    assert torch.equal(again[0], ids) and torch.equal(again[1], mask)  # deterministic by seed
    other = retrieval_rows(tokenizer, seq_len, count, text, seed=1, tasks=TASKS_HERE, prompts_per_row=n)
    assert not torch.equal(other[0], ids)
    data = PackedData(train=text[:8 * seq_len].view(8, seq_len), heldout=text[:seq_len].view(1, seq_len))
    mixed = add_retrieval_rows(data, tokenizer, 0.5, seed=0, tasks=TASKS_HERE, prompts_per_row=n)
    assert mixed.train.shape[0] == 16 and sorted(len(runs(m)) for m in mixed.train_answers) == [0] * 8 + [n] * 8
    assert mixed.digest() != add_retrieval_rows(data, tokenizer, 0.5, seed=0, tasks=TASKS_HERE).digest()


def test_bad_prompts_per_row_are_named(tokenizer):
    text = filler()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="prompts_per_row must be an integer >= 1"):
            retrieval_rows(tokenizer, 512, 2, text, prompts_per_row=bad)
    with pytest.raises(ValueError, match="prompts_per_row 5 leaves slots of 102 tokens"):
        retrieval_rows(tokenizer, 512, 2, text, prompts_per_row=5)
    data = PackedData(train=text[:4 * 512].view(4, 512), heldout=text[:512].view(1, 512))
    with pytest.raises(ValueError, match="prompts_per_row"):
        add_retrieval_rows(data, tokenizer, 0.5, prompts_per_row=0)
    with pytest.raises(ValueError, match=r"no retrieval prompt of at most 85 tokens \(slots of 170 tokens: "
                                         "prompts_per_row 2"):  # cwe's list alone is longer
        retrieval_rows(tokenizer, 2 * 170, 2, text, tasks=["cwe"], prompts_per_row=2)


def test_a_weighted_task_mix_shares_the_prompts_by_weight(tokenizer):
    """tasks={task: weight}: each task's share of the prompts follows its weight (largest remainders), split evenly
    over the lengths its prompt fits; a task of weight 0 is left out; the rows are as deterministic as before."""
    from dash.ruler import generate_samples as samples_of

    text = filler()
    seq_len, count, n = 512, 12, 2
    weights = {"passkey": 3.0, "niah_single_1": 1.0, "vt": 0.0}
    ids, mask = retrieval_rows(tokenizer, seq_len, count, text, seed=1, tasks=weights, prompts_per_row=n)
    again = retrieval_rows(tokenizer, seq_len, count, text, seed=1, tasks=weights, prompts_per_row=n)
    assert torch.equal(ids, again[0]) and torch.equal(mask, again[1])
    # which task each prompt is: the prompts retrieval_rows draws, recognised by their text in the row
    words = vocabulary_words(tokenizer)
    slot = seq_len // n
    lengths = sorted({x for x in (slot // 4, slot // 2, slot - ANSWER_ROOM) if x >= 64})
    found = Counter()
    for task in weights:
        for length in lengths:
            try:
                drawn = samples_of(tokenizer, task, length, count * n, 1 + RETRIEVAL_SEED_OFFSET, words=words)
            except ValueError:  # the task's question alone is longer
                drawn = []
            for sample in drawn:
                head = torch.tensor(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])
                for row in range(count):
                    for k in range(n):
                        if torch.equal(ids[row, k * slot:k * slot + head.numel()], head):
                            found[task, length] += 1
    per_task = Counter()
    for (task, _), m in found.items():
        per_task[task] += m
    assert per_task == {"passkey": 18, "niah_single_1": 6}  # 24 prompts, 3 : 1, no vt
    for task, total in per_task.items():  # evenly over the lengths that fit
        assert sorted(found[task, length] for length in lengths) == [total // len(lengths)] * len(lengths)
    assert sum(len(runs(mask[row])) for row in range(count)) == count * n
    plain = retrieval_rows(tokenizer, seq_len, count, text, seed=1, tasks=["passkey", "niah_single_1"],
                           prompts_per_row=n)
    assert not torch.equal(plain[0], ids)  # a list takes tasks in turn: 1 : 1


def test_retrieval_task_specs_parse_and_bad_ones_are_named():
    from dash.data import format_retrieval_tasks, parse_retrieval_tasks

    assert parse_retrieval_tasks(None) is None and parse_retrieval_tasks([]) is None
    weights = parse_retrieval_tasks(["passkey:2.5", "niah_single_1", "vt:0"])
    assert weights == {"passkey": 2.5, "niah_single_1": 1.0, "vt": 0.0}
    assert parse_retrieval_tasks(format_retrieval_tasks(weights)) == weights
    for bad, message in ((["qa"], "unknown task 'qa'"), (["passkey:-1"], "must be a finite number >= 0"),
                         (["passkey:inf"], "must be a finite number >= 0"), (["passkey:two"], "finite number"),
                         (["vt", "vt:2"], "'vt' is named twice"), (["vt:0"], "every weight is 0")):
        with pytest.raises(ValueError, match="^--retrieval-tasks: "):
            parse_retrieval_tasks(bad, name="--retrieval-tasks")
        with pytest.raises(ValueError, match=message):
            parse_retrieval_tasks(bad)
    with pytest.raises(ValueError, match="must be a finite number"):
        retrieval_rows(TextTokenizer(), 512, 2, filler(), tasks={"passkey": -1.0})
