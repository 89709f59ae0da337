"""The KV cache and its per-forward view (model/kv_cache.py) against a NumPy reference.

Writes and reads involve no arithmetic, so everything here is compared exactly: a decode scatter,
prefill slice copies, listed (scattered) rows and contiguous blocks must put the same keys and
values in the same places and hand attention the same inputs; masks hide exactly what a row may
not see; row and prefix copies move exactly what they say.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.kv_cache import CacheView, KVCache

CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=32, n_inner=64, block_size=32)
ROWS, H, S, D = 5, CONFIG.n_head, CONFIG.block_size, CONFIG.head_dim


def random_cache(seed: int) -> tuple[KVCache, list[np.ndarray], list[np.ndarray]]:
    """A cache full of random values, and NumPy copies of its keys and values per layer."""
    rng = np.random.default_rng(seed)
    cache = KVCache(CONFIG, rows=ROWS)
    keys = [rng.standard_normal((ROWS, H, S, D)).astype(np.float32) for _ in range(CONFIG.n_layer)]
    values = [rng.standard_normal((ROWS, H, S, D)).astype(np.float32) for _ in range(CONFIG.n_layer)]
    cache.keys = [mx.array(k) for k in keys]
    cache.values = [mx.array(v) for v in values]
    return cache, [k.copy() for k in keys], [v.copy() for v in values]


def new_kv(seed: int, B: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, H, T, D)).astype(np.float32), rng.standard_normal((B, H, T, D)).astype(np.float32)


def write_reference(ref: np.ndarray, rows: list[int], starts: list[int], new: np.ndarray) -> None:
    T = new.shape[2]
    for b, (row, start) in enumerate(zip(rows, starts)):
        ref[row, :, start : start + T] = new[b]


def same(a: mx.array, b: np.ndarray) -> bool:
    return np.array_equal(np.array(a), b)


CASES = {
    # name: (view maker, cache rows of the batch rows, starts, T, context)
    "decode block": (lambda c, st, T, ctx: CacheView.block(c, st, T, ctx, first_row=1), [1, 2, 3], [5, 9, 2], 1, 16),
    "decode listed rows": (lambda c, st, T, ctx: CacheView.rows(c, [3, 0], st, T, ctx), [3, 0], [7, 30], 1, 32),
    "prefill block": (lambda c, st, T, ctx: CacheView.block(c, st, T, ctx, first_row=2), [2, 3], [3, 10], 4, 16),
    "prefill listed rows": (lambda c, st, T, ctx: CacheView.rows(c, [4, 0, 2], st, T, ctx), [4, 0, 2], [0, 6, 1], 3, 16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_update_and_fetch_writes_in_place_and_returns_the_context(case):
    make, rows, starts, T, context = CASES[case]
    cache, ref_keys, ref_values = random_cache(1)
    view = make(cache, mx.array(starts, dtype=mx.int32), T, context)
    assert np.array_equal(np.array(view.positions), np.array(starts)[:, None] + np.arange(T)[None, :])
    for layer in range(CONFIG.n_layer):
        k, v = new_kv(10 + layer, len(rows), T)
        k_ctx, v_ctx = view.update_and_fetch(layer, mx.array(k), mx.array(v))
        write_reference(ref_keys[layer], rows, starts, k)
        write_reference(ref_values[layer], rows, starts, v)
        assert k_ctx.shape == v_ctx.shape == (len(rows), H, context, D)
        assert same(k_ctx, ref_keys[layer][rows, :, :context]) and same(v_ctx, ref_values[layer][rows, :, :context])
    for layer in range(CONFIG.n_layer):  # every row and layer, written or not, is what the reference says
        assert same(cache.keys[layer], ref_keys[layer]) and same(cache.values[layer], ref_values[layer])


def test_fresh_prompts_attend_within_the_chunk_and_still_write_the_cache():
    cache, ref_keys, ref_values = random_cache(2)
    view = CacheView.rows(cache, [3, 1], mx.array([0, 0], dtype=mx.int32), 6, None)
    k, v = new_kv(20, 2, 6)
    k_out, v_out = view.update_and_fetch(0, mx.array(k), mx.array(v))
    assert same(k_out, k) and same(v_out, v)
    write_reference(ref_keys[0], [3, 1], [0, 0], k)
    write_reference(ref_values[0], [3, 1], [0, 0], v)
    assert same(cache.keys[0], ref_keys[0]) and same(cache.values[0], ref_values[0])
    causal = np.array(view.mask)
    assert causal.shape == (6, 6) and np.array_equal(causal == 0, np.tril(np.ones((6, 6), dtype=bool)))


def test_mask_hides_the_future_and_stale_columns():
    cache, _, _ = random_cache(3)
    starts, T, context = [5, 0, 17], 3, 32
    mask = np.array(CacheView.block(cache, mx.array(starts, dtype=mx.int32), T, context).mask)
    assert mask.shape == (3, 1, T, context)
    for b, start in enumerate(starts):
        for t in range(T):
            visible = np.arange(context) <= start + t
            assert np.all(mask[b, 0, t][visible] == 0) and np.all(np.isneginf(mask[b, 0, t][~visible]))


def test_decode_steps_prefill_slices_and_listed_rows_give_attention_the_same_inputs():
    """One row's 8 tokens written three ways (8 decode scatters, one prefill slice copy into a
    block, one prefill into a listed row) leave the same cache and hand the next step the same keys and values."""
    k, v = new_kv(30, 1, 8)
    caches = []
    for way in ("decode", "prefill block", "prefill listed"):
        cache, _, _ = random_cache(4)
        if way == "decode":
            for t in range(8):
                view = CacheView.block(cache, mx.array([t], dtype=mx.int32), 1, 16, first_row=2)
                view.update_and_fetch(0, mx.array(k[:, :, t : t + 1]), mx.array(v[:, :, t : t + 1]))
        elif way == "prefill block":
            CacheView.block(cache, mx.array([0], dtype=mx.int32), 8, None, first_row=2).update_and_fetch(0, mx.array(k), mx.array(v))
        else:
            CacheView.rows(cache, [2], mx.array([0], dtype=mx.int32), 8, None).update_and_fetch(0, mx.array(k), mx.array(v))
        caches.append(cache)
    states = [np.array(c.keys[0]) for c in caches]
    assert np.array_equal(states[0], states[1]) and np.array_equal(states[0], states[2])
    nk, nv = new_kv(31, 1, 1)
    fetched = []
    for cache, listed in zip(caches, (False, False, True)):
        start = mx.array([8], dtype=mx.int32)
        view = CacheView.rows(cache, [2], start, 1, 16) if listed else CacheView.block(cache, start, 1, 16, first_row=2)
        fetched.append([np.array(a) for a in view.update_and_fetch(0, mx.array(nk), mx.array(nv))])
    for other in fetched[1:]:
        assert np.array_equal(fetched[0][0], other[0]) and np.array_equal(fetched[0][1], other[1])
    assert np.array_equal(fetched[0][0][0, :, :8], k[0]) and np.array_equal(fetched[0][0][0, :, 8], nk[0, :, 0])


def test_decode_view_works_inside_mx_compile():
    """The decode form reads nothing on the host, so a compiled step can use it (as the runner's does)."""
    cache, ref_keys, _ = random_cache(5)
    k, v = new_kv(40, 3, 1)
    starts = [4, 11, 0]

    def step(keys, values, start, k, v):
        wrapped = KVCache.wrap(list(keys), list(values))
        k_ctx, _ = CacheView.block(wrapped, start, 1, 16).update_and_fetch(1, k, v)
        return k_ctx, wrapped.keys

    k_ctx, keys = mx.compile(step)(cache.keys, cache.values, mx.array(starts, dtype=mx.int32), mx.array(k), mx.array(v))
    write_reference(ref_keys[1], [0, 1, 2], starts, k)
    assert same(k_ctx, ref_keys[1][:3, :, :16]) and same(keys[1], ref_keys[1]) and same(keys[0], ref_keys[0])


def test_copy_row_and_copy_prefix():
    cache, ref_keys, ref_values = random_cache(6)
    cache.copy_prefix(4, 1, 10)
    for ref in ref_keys + ref_values:
        ref[1, :, :10] = ref[4, :, :10]
    cache.copy_row(0, 3)
    for ref in ref_keys + ref_values:
        ref[3] = ref[0]
    cache.copy_prefix(2, 2, 5)  # onto itself: nothing changes
    cache.copy_prefix(2, 0, 0)  # an empty prefix: nothing changes
    for layer in range(CONFIG.n_layer):
        assert same(cache.keys[layer], ref_keys[layer]) and same(cache.values[layer], ref_values[layer])
    with pytest.raises(ValueError, match="prefix length"):
        cache.copy_prefix(0, 1, S + 1)
