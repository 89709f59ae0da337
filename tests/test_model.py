"""The network is proven correct (issue 3, item 3).

(a) our logits == transformers GPT2LMHeadModel loaded from the same directory (full shape, untied
    and tied), max abs difference <= 1e-4;
(b) incremental decode through the KV cache == recomputing the whole sequence;
(c) a batch of rows at different lengths == each row alone (GPT.hidden with a CacheView, and ModelRunner.decode);
(d) parameter counts 52,990,464 (separate head) and 33,691,776 (tied).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nanogpt_mlx.model.checkpoint import load_model, save_checkpoint
from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.generate import generate_tokens
from nanogpt_mlx.model.gpt import GPT
from nanogpt_mlx.model.kv_cache import CacheView, KVCache
from nanogpt_mlx.model.runner import ModelRunner, PrefillChunk, Runner, _group_by_length, context_for
from nanogpt_mlx.model.sampling import SamplingParams

HF_TOLERANCE = 1e-4


def tokens(seed: int, shape, vocab: int = 50257) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def full_logits(model: GPT, seq) -> np.ndarray:
    """Reference: the whole sequence through the plain (uncached) forward, (T, vocab)."""
    return np.array(model(mx.array(np.asarray(seq, dtype=np.int32)[None, :])))[0]


# --- (d) parameter counts ----------------------------------------------------------------------
def test_default_config_is_the_card():
    c = ModelConfig()
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.block_size, c.vocab_size) == (8, 384, 8, 1536, 512, 50257)
    assert c.layer_norm_eps == 1e-5 and c.tie_embeddings is False and c.head_dim == 48


def test_parameter_count_separate_head():
    assert GPT(ModelConfig()).num_params() == 52_990_464


def test_parameter_count_tied_head():
    model = GPT(ModelConfig(tie_embeddings=True))
    assert model.num_params() == 33_691_776
    assert not hasattr(model, "lm_head")


def test_config_round_trips_through_hf_dict():
    c = ModelConfig(n_layer=3, n_head=2, n_embd=16, n_inner=40, block_size=64, tie_embeddings=True, dropout=0.1)
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    assert c.to_hf_dict()["activation_function"] == "gelu"  # exact erf GELU in transformers


def test_config_rejects_tanh_gelu_and_bad_shapes():
    d = ModelConfig().to_hf_dict()
    with pytest.raises(ValueError, match="activation_function"):
        ModelConfig.from_hf_dict({**d, "activation_function": "gelu_new"})
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(n_embd=30, n_head=4)


# --- (a) equality with transformers --------------------------------------------------------------
def hf_logits(model_dir, toks: np.ndarray, **overrides) -> tuple[np.ndarray, object]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, **overrides)
    hf.eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        out = hf(torch.tensor(toks, dtype=torch.long)).logits.float().numpy()
    return out, hf


@pytest.mark.parametrize("shape", [(1, 512), (3, 40)], ids=["1x512", "3x40"])
def test_logits_match_transformers_full_size(full_checkpoint, shape):
    toks = tokens(10, shape)
    ref, hf = hf_logits(full_checkpoint, toks)
    assert hf.config.activation_function == "gelu" and hf.config.tie_word_embeddings is False
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    assert hf.num_parameters() == 52_990_464
    ours = np.array(load_model(full_checkpoint)(mx.array(toks)))
    assert ours.shape == ref.shape == (*shape, 50257)
    assert ref.std() > 0.5  # the weights are random enough that a wrong mapping cannot agree
    assert np.abs(ours - ref).max() <= HF_TOLERANCE


def test_logits_match_transformers_full_size_tied(tmp_path, random_model):
    model = random_model(ModelConfig(tie_embeddings=True), seed=3)
    save_checkpoint(model, tmp_path / "tied")
    toks = tokens(11, (2, 128))
    ref, hf = hf_logits(tmp_path / "tied", toks)
    assert hf.config.tie_word_embeddings is True
    assert hf.num_parameters() == 33_691_776
    ours = np.array(load_model(tmp_path / "tied")(mx.array(toks)))
    assert ref.std() > 0.5
    assert np.abs(ours - ref).max() <= HF_TOLERANCE


def test_the_hf_comparison_can_fail(full_checkpoint):
    """The tolerance has power: the tanh GELU (GPT-2's own) differs by more than 1e-4."""
    toks = tokens(10, (1, 128))
    ref, _ = hf_logits(full_checkpoint, toks, activation_function="gelu_new")
    ours = np.array(load_model(full_checkpoint)(mx.array(toks)))
    assert np.abs(ours - ref).max() > HF_TOLERANCE


def test_cached_prefill_matches_transformers(full_checkpoint):
    """The serving path (the cache + last-position logits) agrees with transformers too."""
    toks = tokens(12, (1, 200))
    ref, _ = hf_logits(full_checkpoint, toks)
    model = load_model(full_checkpoint)
    runner = ModelRunner(model, max_rows=1)
    last = runner.prefill(0, toks[0], start=0)
    assert np.abs(last - ref[0, -1]).max() <= HF_TOLERANCE


# --- (b) KV cache == recomputation ---------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "full"])
def test_incremental_decode_matches_recompute(which, random_model, tiny_config, full_checkpoint):
    model = random_model(tiny_config, seed=4) if which == "tiny" else load_model(full_checkpoint)
    tol = 1e-5 if which == "tiny" else 1e-4
    block = model.config.block_size
    seq = tokens(13, (90,)).tolist()
    prompt_len = 50
    reference = full_logits(model, seq)
    cache = KVCache(model.config, rows=1)
    hidden = model.hidden(mx.array([seq[:prompt_len]]), CacheView.block(cache, mx.array([0]), prompt_len, context_for(prompt_len, block)))
    prefill = np.array(model.logits(hidden))[0]
    assert np.abs(prefill - reference[:prompt_len]).max() <= tol  # every prefill position, not just the last
    for pos in range(prompt_len, len(seq)):  # crosses the 64-column context bucket boundary
        hidden = model.hidden(mx.array([[seq[pos]]]), CacheView.block(cache, mx.array([pos]), 1, context_for(pos + 1, block)))
        step = np.array(model.logits(hidden[:, -1]))[0]
        assert np.abs(step - reference[pos]).max() <= tol, f"position {pos}"


def test_chunked_prefill_matches_recompute(random_model, tiny_config):
    model = random_model(tiny_config, seed=5)
    seq = tokens(14, (100,)).tolist()
    reference = full_logits(model, seq)
    cache = KVCache(model.config, rows=1)
    outs = []
    for begin, end in [(0, 7), (7, 64), (64, 65), (65, 100)]:
        hidden = model.hidden(mx.array([seq[begin:end]]), CacheView.block(cache, mx.array([begin]), end - begin, context_for(end, 128)))
        outs.append(np.array(model.logits(hidden))[0])
    assert np.abs(np.concatenate(outs) - reference).max() <= 1e-5


def test_full_context_decode(random_model, tiny_config):
    """Up to the last position of the context (block_size 128)."""
    model = random_model(tiny_config, seed=6)
    seq = tokens(15, (128,)).tolist()
    reference = full_logits(model, seq)
    runner = ModelRunner(model, max_rows=1)
    runner.prefill(0, seq[:120], start=0)
    for pos in range(120, 128):
        step = runner.decode(np.array([seq[pos]]), np.array([pos]))
        assert np.abs(step[0] - reference[pos]).max() <= 1e-5


def test_sequence_longer_than_context_is_rejected(random_model, tiny_config):
    model = random_model(tiny_config)
    with pytest.raises(ValueError, match="context"):
        model(mx.array(tokens(0, (1, 129))))
    with pytest.raises(ValueError, match="context"):
        list(generate_tokens(model, [1] * 100, max_tokens=29))


# --- (c) batched rows at different lengths == each row alone ------------------------------------------
def test_cached_forward_batch_of_different_lengths(random_model, tiny_config):
    model = random_model(tiny_config, seed=7)
    lengths = [3, 30, 70, 1]
    seqs = [tokens(20 + i, (n + 5,)).tolist() for i, n in enumerate(lengths)]
    cache = KVCache(model.config, rows=len(seqs))
    # prefill each row on its own into its cache row (first_row)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        model.hidden(mx.array([seq[:n]]), CacheView.block(cache, mx.array([0]), n, context_for(n, 128), first_row=row))
    # then all rows advance together: first by 3 tokens each, then by 1, each at its own position
    for step_len in (3, 1, 1):
        starts = np.array(lengths)
        batch = np.array([seq[s : s + step_len] for seq, s in zip(seqs, starts)], dtype=np.int32)
        context = context_for(int(starts.max()) + step_len, 128)
        hidden = model.hidden(mx.array(batch), CacheView.block(cache, mx.array(starts.astype(np.int32)), step_len, context))
        batched = np.array(model.logits(hidden))
        for row, seq in enumerate(seqs):
            alone = full_logits(model, seq[: starts[row] + step_len])[starts[row] :]
            assert np.abs(batched[row] - alone).max() <= 1e-5, f"row {row} at length {starts[row]}"
        lengths = [n + step_len for n in lengths]


def test_runner_decode_batch_matches_rows_alone(random_model, tiny_config):
    model = random_model(tiny_config, seed=8)
    prompts = [tokens(30, (5,)).tolist(), tokens(31, (63,)).tolist(), tokens(32, (64,)).tolist(), tokens(33, (90,)).tolist()]
    runner = ModelRunner(model, max_rows=6)  # spare rows stay untouched
    alone_runners = [ModelRunner(model, max_rows=1) for _ in prompts]
    seqs = [list(p) for p in prompts]
    nxt = []
    for row, p in enumerate(prompts):
        last = runner.prefill(row, p, start=0)
        last_alone = alone_runners[row].prefill(0, p, start=0)
        assert np.abs(last - last_alone).max() <= 1e-5
        assert np.abs(last - full_logits(model, p)[-1]).max() <= 1e-5
        nxt.append(int(np.argmax(last)))
    for _ in range(6):
        positions = np.array([len(s) for s in seqs])
        batched = runner.decode(np.array(nxt), positions)
        assert batched.shape == (len(prompts), model.config.vocab_size)
        for row, seq in enumerate(seqs):
            alone = alone_runners[row].decode(np.array([nxt[row]]), positions[row : row + 1])[0]
            assert np.abs(batched[row] - alone).max() <= 1e-5
            seq.append(nxt[row])
            assert np.abs(batched[row] - full_logits(model, seq)[-1]).max() <= 1e-5
        nxt = [int(np.argmax(r)) for r in batched]


def test_reused_cache_row_does_not_leak_stale_entries(random_model, tiny_config):
    """A row that held a longer sequence, refilled with a shorter one, decodes like a fresh row."""
    model = random_model(tiny_config, seed=9)
    runner = ModelRunner(model, max_rows=2)
    runner.prefill(0, tokens(40, (100,)), start=0)
    short = tokens(41, (10,)).tolist()
    runner.prefill(0, short, start=0)
    step = runner.decode(np.array([7]), np.array([10]))
    assert np.abs(step[0] - full_logits(model, short + [7])[-1]).max() <= 1e-5


def test_move_row_keeps_the_sequence(random_model, tiny_config):
    model = random_model(tiny_config, seed=10)
    runner = ModelRunner(model, max_rows=3)
    seq = tokens(42, (20,)).tolist()
    runner.prefill(2, seq, start=0)
    runner.move_row(2, 0)
    step = runner.decode(np.array([5]), np.array([20]))
    assert np.abs(step[0] - full_logits(model, seq + [5])[-1]).max() <= 1e-5


def test_move_row_leaves_other_rows_untouched(random_model, tiny_config):
    model = random_model(tiny_config, seed=12)
    runner = ModelRunner(model, max_rows=4)
    seqs = {row: tokens(50 + row, (15 + row,)).tolist() for row in (0, 1, 3)}
    for row, seq in seqs.items():
        runner.prefill(row, seq, start=0)
    runner.move_row(3, 2)  # row 2 was free; rows 0 and 1 must not change
    step = runner.decode(np.array([5, 6, 7]), np.array([15, 16, 18]))
    for b, seq in enumerate([seqs[0], seqs[1], seqs[3]]):
        assert np.abs(step[b] - full_logits(model, seq + [5 + b])[-1]).max() <= 1e-5


def test_prefill_many_matches_prefilling_each_row_alone(random_model, tiny_config):
    """Batched prefill over scattered rows, mixed lengths (padding), a continuation chunk and
    an all-logits row gives what one prefill per row gives, and leaves rows decodable."""
    model = random_model(tiny_config, seed=13)
    lengths = [30, 36, 33, 40, 5, 120]
    prompts = [tokens(60 + i, (n,)).tolist() for i, n in enumerate(lengths)]
    batched, alone = ModelRunner(model, max_rows=8), ModelRunner(model, max_rows=8)
    rows = [7, 1, 4, 2, 6, 3]
    batched.prefill(rows[3], prompts[3][:10], start=0)  # row 2 continues from position 10
    alone.prefill(rows[3], prompts[3][:10], start=0)
    chunks = [
        PrefillChunk(row, p[10:] if i == 3 else p, 10 if i == 3 else 0, all_logits=(i == 2))
        for i, (row, p) in enumerate(zip(rows, prompts))
    ]
    got = batched.prefill_many(chunks)
    for c, g in zip(chunks, got):
        want = alone.prefill(c.row, c.tokens, c.start, c.all_logits)
        assert g.shape == want.shape
        assert np.abs(g - want).max() <= 1e-5
    assert np.abs(got[2] - full_logits(model, prompts[2])).max() <= 1e-5
    for i, row in enumerate(rows):  # each row continues correctly (pad garbage never attended)
        batched.move_row(row, 0)
        step = batched.decode(np.array([9]), np.array([lengths[i]]))
        assert np.abs(step[0] - full_logits(model, prompts[i] + [9])[-1]).max() <= 1e-5


def test_prefill_groups_bound_the_padding():
    chunks = [PrefillChunk(0, [1] * n) for n in [5, 30, 33, 36, 40, 120, 7]]
    groups = _group_by_length(chunks)
    assert sorted(i for g in groups for i in g) == list(range(len(chunks)))
    for g in groups:
        lengths = [len(chunks[i].tokens) for i in g]
        assert max(lengths) * len(lengths) <= 1.5 * sum(lengths)
    assert any(len(g) >= 4 for g in groups)  # the four similar prompts share one call


def test_prefill_all_logits_and_continuation(random_model, tiny_config):
    model = random_model(tiny_config, seed=11)
    seq = tokens(43, (40,)).tolist()
    reference = full_logits(model, seq)
    runner = ModelRunner(model, max_rows=1)
    first = runner.prefill(0, seq[:25], start=0, all_logits=True)
    rest = runner.prefill(0, seq[25:], start=25, all_logits=True)
    assert first.shape == (25, model.config.vocab_size)
    assert np.abs(np.concatenate([first, rest]) - reference).max() <= 1e-5


def test_runner_rejects_bad_requests(random_model, tiny_config):
    runner = ModelRunner(random_model(tiny_config), max_rows=2)
    assert isinstance(runner, Runner) and (runner.max_rows, runner.max_len, runner.vocab_size) == (2, 128, tiny_config.vocab_size)
    with pytest.raises(ValueError):
        runner.prefill(0, [], start=0)
    with pytest.raises(ValueError):
        runner.prefill(0, [1] * 10, start=120)
    with pytest.raises(ValueError):
        runner.decode(np.array([1, 2, 3]), np.array([0, 0, 0]))
    with pytest.raises(ValueError):
        runner.decode(np.array([1]), np.array([128]))


# --- generation ------------------------------------------------------------------------------------
def test_greedy_generation_matches_naive_argmax_loop(random_model, tiny_config):
    model = random_model(tiny_config, seed=12)
    prompt = tokens(44, (50,)).tolist()
    got = list(generate_tokens(model, prompt, max_tokens=30, params=SamplingParams(temperature=0.0)))
    seq = list(prompt)
    for _ in range(30):
        seq.append(int(np.argmax(full_logits(model, seq)[-1])))
    assert got == seq[len(prompt) :]


def test_generation_stops_at_a_stop_token(random_model, tiny_config):
    model = random_model(tiny_config, seed=12)
    prompt = tokens(44, (50,)).tolist()
    free = list(generate_tokens(model, prompt, max_tokens=10))
    stopped = list(generate_tokens(model, prompt, max_tokens=10, stop_tokens=frozenset({free[3]})))
    assert stopped == free[: free.index(free[3]) + 1]


def test_seeded_generation_is_reproducible(random_model, tiny_config):
    model = random_model(tiny_config, seed=13)
    params = lambda seed: SamplingParams(temperature=1.0, top_k=50, seed=seed)  # noqa: E731
    a = list(generate_tokens(model, [1, 2, 3], 20, params(5)))
    b = list(generate_tokens(model, [1, 2, 3], 20, params(5)))
    c = list(generate_tokens(model, [1, 2, 3], 20, params(6)))
    assert a == b and a != c


def test_loaded_model_is_in_inference_mode(tmp_path, random_model, tiny_config):
    """A checkpoint trained with dropout must not apply dropout when loaded to serve."""
    model = random_model(tiny_config.replace(dropout=0.1), seed=14)
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")
    toks = mx.array(tokens(45, (2, 20)))
    a, b = np.array(loaded(toks)), np.array(loaded(toks))
    model.eval()
    assert np.array_equal(a, b)
    assert np.abs(a - np.array(model(toks))).max() <= 1e-6


# --- attention split over CPU streams (decode steps of many rows) ----------------------------------
def test_wide_decode_split_over_cpu_streams_equals_one_stream(random_model, tiny_config, monkeypatch):
    """20 rows decode with their attention heads split over this thread's CPU streams; the
    logits equal the one-stream step (uncompiled, so it reads the switch) and each row's full forward."""
    from nanogpt_mlx.model import ops
    from nanogpt_mlx.model.cpu import ops as cpu_ops
    from nanogpt_mlx.model.cpu import streams as cpu_streams

    monkeypatch.setattr(cpu_streams.os, "cpu_count", lambda: 2)  # split even on a 1-core machine
    head_groups = []
    original = ops.Ops.attention
    monkeypatch.setattr(ops.Ops, "attention", lambda self, q, *rest: (head_groups.append(q.shape[1]), original(self, q, *rest))[1])
    model = random_model(tiny_config, seed=11)
    rows = max(cpu_ops.SPLIT_MIN_ROWS, 20)
    prompts = [tokens(60 + r, (3 + 5 * r,)).tolist() for r in range(rows)]
    positions = np.array([len(p) for p in prompts])
    outputs = {}
    for split in (True, False):
        cpu_streams.set_enabled(split)
        try:
            runner = ModelRunner(model, max_rows=rows, compile=split, host_decode=False)  # MLX's step; compiled steps keep the first trace
            runner.prefill_many([PrefillChunk(r, p, 0) for r, p in enumerate(prompts)])
            head_groups.clear()
            outputs[split] = runner.decode(np.full(rows, 7), positions)
            groups_per_layer = len(head_groups) / tiny_config.n_layer
            assert groups_per_layer == (min(len(cpu_streams.streams()), tiny_config.n_head) if split else 1), head_groups
        finally:
            cpu_streams.set_enabled(True)
    assert len(cpu_streams.streams()) >= 2  # so the first step really split its heads
    assert np.abs(outputs[True] - outputs[False]).max() <= 1e-5
    for r in (0, rows // 2, rows - 1):
        assert np.abs(outputs[True][r] - full_logits(model, prompts[r] + [7])[-1]).max() <= 1e-5


def test_a_model_decodes_on_a_second_thread_after_the_first_traced_it(random_model, tiny_config, monkeypatch):
    """A trace of the decode step holds the tracing thread's streams, which other threads cannot
    use: a runner of the same model on a new thread (the server's engine) must still work, and
    `close` forgets that thread's streams."""
    import threading

    from nanogpt_mlx.model.cpu import ops as cpu_ops
    from nanogpt_mlx.model.cpu import streams as cpu_streams

    monkeypatch.setattr(cpu_streams.os, "cpu_count", lambda: 2)
    model = random_model(tiny_config, seed=12)
    rows = cpu_ops.SPLIT_MIN_ROWS
    prompts = [tokens(80 + r, (4 + r,)).tolist() for r in range(rows)]
    positions = np.array([len(p) for p in prompts])

    def decode_on_this_thread(result: dict, close: bool):
        try:
            runner = ModelRunner(model, max_rows=rows, host_decode=False)  # MLX's traced step
            runner.prefill_many([PrefillChunk(r, p, 0) for r, p in enumerate(prompts)])
            result["logits"] = runner.decode(np.full(rows, 3), positions)
            result["streams"] = cpu_streams.streams()
            if close:  # not on pytest's thread: clear_streams would end its streams for later tests
                runner.close()
                result["streams_after_close"] = getattr(cpu_streams._local, "streams", ())
        except Exception as exc:  # reported to the main thread below
            result["error"] = exc

    here = {}
    decode_on_this_thread(here, close=False)
    there = {}
    thread = threading.Thread(target=decode_on_this_thread, args=(there, True))
    thread.start()
    thread.join(60)
    assert "error" not in here and "error" not in there, (here.get("error"), there.get("error"))
    assert len(here["streams"]) >= 2 and len(there["streams"]) >= 2 and set(here["streams"]).isdisjoint(there["streams"])
    assert there["streams_after_close"] == ()
    assert np.abs(here["logits"] - there["logits"]).max() <= 1e-5


def test_batched_prefill_split_over_cpu_streams_equals_one_stream(random_model, tiny_config, monkeypatch):
    """A batched prefill runs its rows in parts on separate CPU streams (MKL on one thread each):
    the logits and the cache it leaves equal the one-stream prefill, and MKL's threads are
    restored afterwards."""
    from nanogpt_mlx.model.cpu import blas
    from nanogpt_mlx.model.cpu import streams as cpu_streams
    from nanogpt_mlx.model.runner import ModelRunner as Runner

    monkeypatch.setattr(cpu_streams.os, "cpu_count", lambda: 2)
    parts = []
    original = Runner._part_inputs
    monkeypatch.setattr(Runner, "_part_inputs", lambda self, part: (parts.append(len(part)), original(self, part))[1])
    model = random_model(tiny_config, seed=13)
    prompts = [tokens(90 + r, (20 + r % 3,)).tolist() for r in range(7)]
    chunks = [PrefillChunk(r, p, 0, all_logits=(r == 5)) for r, p in enumerate(prompts)]
    threads_before = blas.threads()
    results = {}
    for split in (True, False):
        cpu_streams.set_enabled(split)
        try:
            parts.clear()
            runner = ModelRunner(model, max_rows=8)
            logits = runner.prefill_many(chunks)
            next_step = runner.decode(np.full(7, 3), np.array([len(p) for p in prompts]))  # reads the cache
            results[split] = (logits, next_step, sorted(parts))
        finally:
            cpu_streams.set_enabled(True)
    assert results[True][2] == [3, 4] and results[False][2] == [7]  # two parts of one group / one forward
    assert blas.threads() == threads_before
    for a, b in zip(results[True][0], results[False][0]):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
    assert results[True][0][5].shape == (len(prompts[5]), tiny_config.vocab_size)  # all positions for logprobs
    assert np.abs(results[True][1] - results[False][1]).max() <= 1e-5
    for r in (0, 6):
        assert np.abs(results[True][0][r] - full_logits(model, prompts[r])[-1]).max() <= 1e-5


def test_batched_prefill_after_cached_prefixes_splits_over_streams_and_updates_the_cache_in_place(random_model, tiny_config, monkeypatch):
    """Chunks that continue rows already in the cache (a reused prefix), prefilled together in
    two parts on two CPU streams: the logits and the cache equal one stream's and the uncached
    forward's, and no step of it copies a whole cache array (every row), which MLX does when a
    written array has a second reader; the peak memory tells."""
    from nanogpt_mlx.model.cpu import streams as cpu_streams

    monkeypatch.setattr(cpu_streams.os, "cpu_count", lambda: 2)
    model = random_model(tiny_config, seed=17)
    rows = 256  # one cache array is then far larger than the forward's own buffers
    prompts = [tokens(40 + r, (30 + r,)).tolist() for r in range(4)]
    prefix = 24
    results = {}
    for split in (True, False):
        cpu_streams.set_enabled(split)
        try:
            runner = ModelRunner(model, max_rows=rows)
            for r, p in enumerate(prompts):
                runner.prefill(rows - 1 - r, p[:prefix], 0)
            chunks = [PrefillChunk(rows - 1 - r, p[prefix:], prefix, all_logits=(r == 2)) for r, p in enumerate(prompts)]
            mx.eval(runner.cache.state())
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            logits = runner.prefill_many(chunks)
            grown = mx.get_peak_memory() - before
            cached = [np.array(runner.cache.keys[-1][rows - 1 - r, :, : len(p)]) for r, p in enumerate(prompts)]
            results[split] = logits, cached
        finally:
            cpu_streams.set_enabled(True)
        assert grown < runner.cache.keys[0].nbytes, (split, grown)
    for a, b in zip(results[True][0], results[False][0]):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
    for a, b in zip(results[True][1], results[False][1]):
        assert np.abs(a - b).max() <= 1e-6
    for r, p in enumerate(prompts):
        reference = full_logits(model, p)
        expected = reference[prefix:] if r == 2 else reference[-1]
        assert np.abs(results[True][0][r] - expected).max() <= 1e-4


def test_logits_on_the_host_equal_the_device_head(random_model, tiny_config):
    """On the CPU the runner computes logits in NumPy (padded to 8 rows from 4 rows on) by
    default; decode and batched prefill, with and without all logits, give the device head's."""
    model = random_model(tiny_config, seed=21)
    from nanogpt_mlx.model.cpu.ops import HostHead

    # MLX's decode step (host_decode=False): the C step computes its own logits
    host, device = ModelRunner(model, max_rows=13, host_decode=False), ModelRunner(model, max_rows=13, host_logits=False, host_decode=False)
    assert isinstance(host.logits_head, HostHead) and not isinstance(device.logits_head, HostHead)
    assert np.shares_memory(host.logits_head.matrix, np.asarray(host.head))  # a view of the MLX head, no copy
    prompts = [tokens(80 + i, (4 + 3 * i,)).tolist() for i in range(13)]
    chunks = [PrefillChunk(row, p, all_logits=(row == 5)) for row, p in enumerate(prompts)]
    for h, d in zip(host.prefill_many(chunks), device.prefill_many(chunks)):
        assert h.shape == d.shape and h.flags.c_contiguous
        assert np.abs(h - d).max() <= 1e-5
    for rows in (1, 3, 4, 5, 8, 13):  # below the threshold, padded, exact multiple, padded again
        toks = np.arange(rows, dtype=np.int32)
        positions = np.array([len(p) for p in prompts[:rows]])
        got, want = host.decode(toks, positions), device.decode(toks, positions)
        assert got.shape == (rows, model.config.vocab_size) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-5
        assert np.abs(got[rows - 1] - full_logits(model, prompts[rows - 1] + [rows - 1])[-1]).max() <= 1e-5
