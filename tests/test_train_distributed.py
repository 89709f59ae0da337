"""Data-parallel training under `mlx.launch` (ring backend, 2 processes on 127.0.0.1).

Both ranks must end with identical weights, equal (within float tolerance: the all-reduce sums
in another order) to one process training on the same global batch.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_train import TINY_MODEL, write_shards

from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.gpt import GPT

WORKER = '''
import json, sys
import nanogpt_mlx  # before mlx.core
import mlx.core as mx
from mlx.utils import tree_flatten
from nanogpt_mlx.training.recipe import Recipe
from nanogpt_mlx.training.train import Trainer

recipe = Recipe.from_dict(json.loads(sys.argv[1]))
shards, out = sys.argv[2], sys.argv[3]
group = mx.distributed.init()
trainer = Trainer(recipe, shards, out, progress=False, group=group)
summary = trainer.fit()
name = f"{out}/weights_rank{group.rank()}_of_{group.size()}.safetensors"
mx.save_safetensors(name, dict(tree_flatten(trainer.model.parameters())))
print(json.dumps({"rank": group.rank(), "size": group.size(), **summary}), flush=True)
'''


def free_port_pair() -> int:
    """A port p with p and p + 1 both free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def recipe_dict(batch_size: int) -> dict:
    return {
        "model": dict(TINY_MODEL),
        "data": {"seq_len": 32, "batch_size": batch_size, "eval_batches": 4},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        "train": {"max_steps": 3, "eval_interval": 3, "log_interval": 1, "save_interval_steps": 3},
    }


def load(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    launcher = Path(sys.executable).with_name("mlx.launch")
    if not launcher.is_file():
        pytest.skip("mlx.launch is not installed beside this interpreter")
    shards = write_shards(tmp_path / "data")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    here = str(Path(__file__).parent)

    single = tmp_path / "single"
    proc = subprocess.run(
        [sys.executable, str(worker), json.dumps(recipe_dict(4)), str(shards), str(single)],
        capture_output=True, text=True, timeout=240, cwd=here,
    )
    assert proc.returncode == 0, proc.stderr

    dist = tmp_path / "dist"
    port = free_port_pair()
    proc = subprocess.run(
        [str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "--starting-port", str(port), "--",
         sys.executable, str(worker), json.dumps(recipe_dict(2)), str(shards), str(dist)],
        capture_output=True, text=True, timeout=240, cwd=here,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summaries = sorted((json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")), key=lambda s: s["rank"])
    assert [(s["rank"], s["size"]) for s in summaries] == [(0, 2), (1, 2)]

    rank0 = load(dist / "weights_rank0_of_2.safetensors")
    rank1 = load(dist / "weights_rank1_of_2.safetensors")
    one = load(single / "weights_rank0_of_1.safetensors")
    for k in rank0:
        np.testing.assert_array_equal(rank0[k], rank1[k], err_msg=f"ranks diverged at {k}")
        np.testing.assert_allclose(rank0[k], one[k], atol=2e-5, rtol=0, err_msg=k)
    # training moved the weights away from the shared seeded initialisation (so equality means something)
    init = GPT(ModelConfig(**TINY_MODEL))
    init.init_weights(seed=1337)
    init = {k: np.array(v) for k, v in tree_flatten(init.parameters())}
    assert max(np.abs(init[k] - one[k]).max() for k in one) > 1e-3
    # the same losses were logged, and the distributed eval (each rank half the batches) agrees
    single_log = [json.loads(l) for l in (single / "log.jsonl").read_text().splitlines()]
    dist_log = [json.loads(l) for l in (dist / "log.jsonl").read_text().splitlines()]
    for a, b in zip(single_log, dist_log):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a, b)
    assert dist_log[-1]["tokens"] == single_log[-1]["tokens"] == 3 * 4 * 32
    # only rank 0 writes checkpoints, and they resume a single process
    assert (dist / "checkpoints" / "step_00000003" / "optimizer.safetensors").is_file()
