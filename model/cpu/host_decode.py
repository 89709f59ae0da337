"""The lean host path for decode steps of a few rows: host_decode.c over the process's BLAS.

MLX runs a decode step as some 300 separately dispatched kernels; for a few rows each costs more
to schedule than its arithmetic, so a step of 1-8 rows waited mostly on dispatch. `HostDecoder`
runs the whole step (all blocks, the final LayerNorm and the LM head) in one C call instead, on
the same weights and the same KV cache:

- **The cache is shared, not copied.** On the CPU an evaluated `mx.array` exposes its memory
  through the buffer protocol, and `np.asarray` of it is a writable view. Each step takes the
  base address of every layer's key and value array (evaluating them first, which also lands
  any pending prefill writes), the C code writes the new keys and values in place and reads
  the cached ones, and the views are dropped before returning. The invariant this rests on:
  `KVCache` arrays are only ever updated in place (decode scatters, prefill slice copies,
  `copy_prefix`; all donated, see kv_cache.py), and no view outlives the call, so MLX keeps
  updating the same buffers in place (a live view would make its next update copy the cache)
  and sees what the C code wrote. The addresses are read anew every step all the same.
- **The weights** are read where MLX holds them (`(out, in)` linear weights, the runner's
  `(C, V)` head copy); the decoder keeps the arrays referenced. A runner serves fixed weights.
- **The BLAS** is the one `import nanogpt_mlx` loaded (blas.py); its functions are handed to
  the C code as pointers. Without an optimized BLAS there is no host path.
- **Compiled on first use**, never at import: `gcc -O3 -march=native` into
  `~/.cache/nanogpt-mlx/host-decode/` under a name that hashes the source, the flags and the
  CPU, so a changed file or another machine builds its own. Without a compiler, or with
  NANOGPT_MLX_HOST_DECODE=0, there is no host path and MLX runs every step.

Same maths as gpt.py in float32 (LayerNorm, exact erf GELU, softmax attention over each row's
own positions); tests/test_host_decode.py checks it against MLX's forward.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading

import mlx.core as mx
import numpy as np

from nanogpt_mlx.model.cpu import blas, runtime

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_decode.c")
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
ENV_SWITCH = "NANOGPT_MLX_HOST_DECODE"

# Rows a host step serves at most; wider steps run in MLX (see HOST_MAX_ROWS in cpu/ops.py).
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
        lib = ctypes.CDLL(path)
        lib.hd_create.restype = ctypes.c_void_p
        lib.hd_create.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.hd_free.argtypes = [ctypes.c_void_p]
        lib.hd_step.restype = ctypes.c_int
        lib.hd_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int, ctypes.c_void_p]
        _library = lib
        return lib


def failure() -> str | None:
    """Why the library could not be built, if it could not."""
    return _failure


def blas_functions() -> tuple[int, int] | None:
    """(cblas_sgemm, cblas_sgemv) addresses of the loaded optimized BLAS (MKL first), or None."""
    for name in ("mkl", "openblas"):
        handle = blas._handles.get(name)
        if handle is not None:
            return ctypes.cast(handle.cblas_sgemm, ctypes.c_void_p).value, ctypes.cast(handle.cblas_sgemv, ctypes.c_void_p).value
    return None


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


class HostDecoder:
    """Decode steps of 1..`max_rows` rows of one model over one KV cache, in C."""

    def __init__(self, library: ctypes.CDLL, functions: tuple[int, int], model, head: mx.array, max_rows: int, max_len: int):
        config = model.config
        self.max_rows = max_rows
        self.vocab = config.vocab_size
        self._lib = library
        params = dict(_flatten(model.parameters()))

        def host(a: mx.array) -> np.ndarray:
            array = np.asarray(a)  # a view of MLX's memory, kept for the decoder's life
            if array.dtype != np.float32 or not array.flags.c_contiguous:
                array = np.ascontiguousarray(array, dtype=np.float32)
            self._keep.append(array)
            return array

        self._keep: list[np.ndarray] = []
        head_matrix = host(head)
        if head_matrix.shape != (config.n_embd, config.vocab_size):
            raise ValueError(f"head must be (C, V), got {head_matrix.shape}")
        globals_ = [host(params["wte.weight"]), host(params["wpe.weight"]), host(params["ln_f.weight"]), host(params["ln_f.bias"]),
                    head_matrix]
        layers = [host(params[f"h.{i}.{name}"]) for i in range(config.n_layer) for name in PER_LAYER]
        self._globals = (ctypes.c_void_p * len(globals_))(*map(_address, globals_))
        self._layers = (ctypes.c_void_p * len(layers))(*map(_address, layers))
        dims = (ctypes.c_int * 7)(config.n_layer, config.n_head, config.n_embd, config.n_inner, config.vocab_size, max_rows, max_len)
        handle = library.hd_create(dims, config.layer_norm_eps, self._globals, self._layers, *functions)
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
            self._keys[layer] = _address(np.asarray(k))
            self._values[layer] = _address(np.asarray(v))
        logits = np.empty((B, self.vocab), dtype=np.float32)
        status = self._lib.hd_step(self._handle, B, _address(tokens), _address(positions), self._keys, self._values, S, _address(logits))
        if status:
            raise ValueError(f"host decode step rejected its input (status {status})")
        return logits

    def __del__(self):
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.hd_free(handle)


def _flatten(tree, prefix: str = ""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix)
