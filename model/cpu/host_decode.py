"""The lean host path for decode steps of a few rows: one C call (host_decode.c) per step.

MLX runs a decode step as some 300 separately dispatched kernels; for a few rows each costs more
to schedule than its arithmetic, so a step of 1-8 rows waited mostly on dispatch, and the BLAS
libraries ran the products of 2-8 rows far below what the memory allows. `HostDecoder` runs the
whole step (all blocks, the final LayerNorm and the LM head) in one C call instead, on the same
weights and the same KV cache:

- **The cache is shared, not copied.** On the CPU an evaluated `mx.array` exposes its memory
  through the buffer protocol, and `np.asarray` of it is a writable view. Each step takes the
  base address of every layer's key and value array (evaluating them first, which also lands
  any pending prefill writes), the C code writes the new keys and values in place and reads
  the cached ones, and the views are dropped before returning. The invariant this rests on:
  `KVCache` arrays are only ever updated in place (decode scatters, prefill slice copies,
  `copy_prefix`; all donated, see kv_cache.py), and no view outlives the call, so MLX keeps
  updating the same buffers in place (a live view would make its next update copy the cache)
  and sees what the C code wrote. The addresses are read anew every step all the same.
- **The weights** are packed once per model (`PackedWeights`, shared by the runners of a
  model): every matrix as panels of output columns (`pack`), so a step streams each weight
  from memory once for all its rows; embeddings, LayerNorms and biases are read where MLX
  holds them. Repacked when the model's parameter arrays are replaced.
- **Threads**: the calling thread and up to MAX_THREADS - 1 workers of the C library's own,
  which sleep between steps.
- **Compiled on first use**, never at import: `gcc -O3 -march=native` into
  `~/.cache/nanogpt-mlx/host-decode/` under a name that hashes the source, the flags and the
  CPU, so a changed file or another machine builds its own. Without a compiler, or with
  NANOGPT_MLX_HOST_DECODE=0, there is no host path and MLX runs every step.

Same maths as gpt.py in float32 (LayerNorm, exact erf GELU, softmax attention over each row's
own positions; sums in another order); tests/test_host_decode.py checks it against MLX's forward.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import weakref

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from nanogpt_mlx.model.cpu import blas, runtime

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_decode.c")
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-pthread")
ENV_SWITCH = "NANOGPT_MLX_HOST_DECODE"

MAX_THREADS = 4  # a step is bound by reading the weights once, which a few cores saturate (measured on 2 only)
PER_LAYER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
             "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


def enabled() -> bool:
    """Whether NANOGPT_MLX_HOST_DECODE allows the host path (on unless it says 0 / off / false)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def _library_path() -> str:
    compiler = os.environ.get("CC") or "gcc"
    key = hashlib.sha256()
    key.update(open(SOURCE, "rb").read())
    key.update(" ".join((compiler, *CFLAGS)).encode())
    key.update(blas.cpuinfo_field("model name").encode() + blas.cpuinfo_field("flags").encode())
    return os.path.join(runtime.cache_dir("host-decode"), f"libhost_decode-{key.hexdigest()[:16]}.so")


def load_library() -> ctypes.CDLL | None:
    """The compiled host_decode.c, built on first call; None (reason in `failure()`) when it cannot be."""
    global _library, _failure
    with _lock:
        if _library is not None or _failure is not None:
            return _library
        path = _library_path()
        if not os.path.exists(path):
            compiler = os.environ.get("CC") or "gcc"
            if shutil.which(compiler) is None:
                _failure = f"no C compiler ({compiler}) to build the host decode path"
                runtime.REPORT.notes.append(_failure)
                return None
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            proc = subprocess.run([compiler, *CFLAGS, "-o", tmp, SOURCE, "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                _failure = f"host decode path not built: {proc.stderr.strip()[:500]}"
                runtime.REPORT.notes.append(_failure)
                return None
            os.replace(tmp, path)  # atomic: concurrent builders each write their own file
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            _failure = f"host decode library not loaded: {exc}"
            runtime.REPORT.notes.append(_failure)
            return None
        lib.hd_create.restype = ctypes.c_void_p
        lib.hd_create.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
        lib.hd_free.argtypes = [ctypes.c_void_p]
        lib.hd_step.restype = ctypes.c_int
        lib.hd_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int, ctypes.c_void_p]
        _library = lib
        return lib


def failure() -> str | None:
    """Why the library could not be built, if it could not."""
    return _failure


def threads() -> int:
    """Threads a host step runs on: the cores this process may use, at most MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _cache_address(array: mx.array, rows: int) -> int:
    view = np.asarray(array)
    if view.dtype != np.float32 or not view.flags.c_contiguous or view.ndim != 4 or view.shape[0] < rows:
        raise TypeError(f"the host decode path needs a contiguous float32 (rows, H, S, D) cache, got {view.dtype} {view.shape}")
    return _address(view)


def pack(matrix: np.ndarray, panel: int) -> np.ndarray:
    """An (in, out) matrix as (panels, in, panel): each panel's columns contiguous, zero past `out`."""
    rows, cols = matrix.shape
    padded = np.zeros((rows, -(-cols // panel) * panel), dtype=np.float32)
    padded[:, :cols] = matrix
    return np.ascontiguousarray(padded.reshape(rows, -1, panel).transpose(1, 0, 2))


class PackedWeights:
    """A model's weights as host_decode.c reads them: packed matrices, views of the rest."""

    def __init__(self, model, head: mx.array, panel: int):
        config = model.config
        params = dict(tree_flatten(model.parameters()))
        self.sources = [params[name] for name in sorted(params)]  # to tell whether the model still holds these

        def view(a: mx.array) -> np.ndarray:
            return np.ascontiguousarray(np.asarray(a), dtype=np.float32)  # MLX's memory where it is already so

        self.arrays = [view(params["wte.weight"]), view(params["wpe.weight"]), view(params["ln_f.weight"]), view(params["ln_f.bias"]),
                       pack(np.asarray(head), panel)]
        self.layer_arrays = []
        for i in range(config.n_layer):
            for name in PER_LAYER:
                a = params[f"h.{i}.{name}"]
                self.layer_arrays.append(pack(np.asarray(a).T, panel) if name.endswith("weight") and a.ndim == 2 else view(a))
        self.globals = (ctypes.c_void_p * len(self.arrays))(*map(_address, self.arrays))
        self.layers = (ctypes.c_void_p * len(self.layer_arrays))(*map(_address, self.layer_arrays))

    def serves(self, model) -> bool:
        """Whether `model` still holds the arrays these were packed from (the head is one of them)."""
        params = dict(tree_flatten(model.parameters()))
        return len(params) == len(self.sources) and all(a is b for a, b in zip((params[n] for n in sorted(params)), self.sources))


# id(model) -> its packed weights, shared by the runners of a model (a runner per `generate` call).
_PACKED: dict[int, PackedWeights] = {}


def packed_weights(model, head: mx.array, panel: int) -> PackedWeights:
    """`model`'s packed weights, `head` its (C, V) LM head: packed once, again after its parameters are replaced."""
    packed = _PACKED.get(id(model))
    if packed is None or not packed.serves(model):
        if id(model) not in _PACKED:
            weakref.finalize(model, _PACKED.pop, id(model), None)
        packed = _PACKED[id(model)] = PackedWeights(model, head, panel)
    return packed


class HostDecoder:
    """Decode steps of 1..`max_rows` rows of one model over one KV cache, in C."""

    def __init__(
        self, library: ctypes.CDLL, model, head: mx.array, max_len: int, max_rows: int | None = None, n_threads: int | None = None
    ):
        config = model.config
        self.max_rows = min(max_rows or int(library.hd_max_rows()), int(library.hd_max_rows()))
        self.vocab = config.vocab_size
        self._lib = library
        self.weights = packed_weights(model, head, int(library.hd_panel()))
        dims = (ctypes.c_int * 7)(config.n_layer, config.n_head, config.n_embd, config.n_inner, config.vocab_size, max_len,
                                  n_threads or threads())
        handle = library.hd_create(dims, config.layer_norm_eps, self.weights.globals, self.weights.layers)
        if not handle:
            raise MemoryError("host decode scratch")
        self._handle = handle
        self._keys = (ctypes.c_void_p * config.n_layer)()
        self._values = (ctypes.c_void_p * config.n_layer)()

    def __call__(self, tokens: np.ndarray, positions: np.ndarray, keys: list[mx.array], values: list[mx.array]) -> np.ndarray:
        """One step for rows 0..B-1 of the cache arrays `keys` / `values`; (B, V) float32 logits."""
        B = len(tokens)
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        S = keys[0].shape[2]
        for layer, (k, v) in enumerate(zip(keys, values)):
            # Views only for the addresses, dropped at once: a live view would make MLX copy the
            # cache on its next in-place update (see the module docstring).
            self._keys[layer] = _cache_address(k, B)
            self._values[layer] = _cache_address(v, B)
        logits = np.empty((B, self.vocab), dtype=np.float32)
        status = self._lib.hd_step(self._handle, B, _address(tokens), _address(positions), self._keys, self._values, S, _address(logits))
        if status:
            raise ValueError(f"host decode step rejected its input (status {status})")
        return logits

    def __del__(self):
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.hd_free(handle)
