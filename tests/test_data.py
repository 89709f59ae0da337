"""prepare-data and the token samplers, on small files made in tmp_path (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt_mlx.atomic import is_temporary
from nanogpt_mlx.errors import UserError
from nanogpt_mlx.model.tokenizer import get_tokenizer
from nanogpt_mlx.training.dataset import DataError, RandomWindowSampler, TokenShards, load_manifest, sequential_batches
from nanogpt_mlx.training.prepare import prepare_data
from nanogpt_mlx.training.split import held_out

ENC = get_tokenizer()
EOT = ENC.eot_token

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning was the word, and the word was short.",
    "Ünïcödé text — with dashes, “quotes” and emoji 🙂 survives tokenization.",
    "A fourth document\n\nwith two paragraphs.",
]


def expected_stream(docs: list[str]) -> list[int]:
    """What prepare-data must write: an EOT before every document's tokens."""
    out: list[int] = []
    for doc in docs:
        out += [EOT] + ENC.encode_ordinary(doc)
    return out


def read_split(out: Path, split: str) -> np.ndarray:
    manifest = load_manifest(out)
    parts = [np.fromfile(out / s["file"], dtype=np.uint16) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def split_documents(tokens: np.ndarray) -> list[str]:
    """Decode a split back into its documents (each is preceded by EOT)."""
    assert len(tokens) == 0 or tokens[0] == EOT
    cuts = np.flatnonzero(tokens == EOT)
    bounds = list(cuts) + [len(tokens)]
    return [ENC.decode(tokens[a + 1:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- inputs ---------------------------------------------------------------------------------


def test_text_files_and_directory_exact_tokens(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (d / "sub" / "b.md").write_text(DOCS[1], encoding="utf-8")
    (d / "ignored.bin").write_bytes(b"\x00\x01")  # unsupported files inside a directory are skipped
    single = tmp_path / "c.txt"
    # A text file may hold several documents separated by <|endoftext|>.
    single.write_text(DOCS[2] + "<|endoftext|>" + DOCS[3], encoding="utf-8")

    out = tmp_path / "out"
    manifest = prepare_data([d, single], out, val_fraction=0.0, progress=False)

    # Directory files are read in sorted path order: a.txt, sub/b.md; then c.txt's two documents.
    want = expected_stream(DOCS)
    assert read_split(out, "train").tolist() == want
    train = manifest["splits"]["train"]
    assert train["documents"] == 4 and train["tokens"] == len(want)
    assert manifest["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": []}
    assert manifest["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_token": 50256}
    assert [s["input"] for s in manifest["sources"]] == [str(d), str(single)]
    assert manifest["sources"][1]["documents"] == {"train": 2, "val": 0}
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_jsonl_json_and_text_field(tmp_path):
    jl = write_jsonl(tmp_path / "a.jsonl", [{"body": DOCS[0], "id": 1}, {"body": DOCS[1]}])
    js = tmp_path / "b.json"
    js.write_text(json.dumps([{"body": DOCS[2]}, {"body": DOCS[3]}]), encoding="utf-8")
    out = tmp_path / "out"
    manifest = prepare_data([jl, js], out, val_fraction=0.0, text_field="body", progress=False)
    assert read_split(out, "train").tolist() == expected_stream(DOCS)
    assert manifest["splits"]["train"]["documents"] == 4


def test_explicit_val_inputs(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in DOCS[:3]])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": DOCS[3]}])
    out = tmp_path / "out"
    manifest = prepare_data([train], out, val_inputs=[val], val_fraction=0.5, progress=False)
    assert read_split(out, "train").tolist() == expected_stream(DOCS[:3])
    assert read_split(out, "val").tolist() == expected_stream(DOCS[3:])
    assert manifest["splits"]["val"]["documents"] == 1
    assert manifest["split_rule"] == "explicit validation inputs"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": DOCS, "n": list(range(4))}), path, row_group_size=2)
    out = tmp_path / "out"
    prepare_data([path], out, val_fraction=0.0, text_field="content", progress=False)
    assert read_split(out, "train").tolist() == expected_stream(DOCS)
    with pytest.raises(DataError, match="no 'text' column"):
        prepare_data([path], tmp_path / "out2", progress=False)


@pytest.fixture
def offline_datasets(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("datasets")


def test_hf_dataset_saved_to_disk(tmp_path, offline_datasets):
    datasets = offline_datasets
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"story": DOCS[:3]}),
        "validation": datasets.Dataset.from_dict({"story": DOCS[3:]}),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    prepare_data([], out, hf_dataset=str(tmp_path / "ds"), hf_split="validation",
                 text_field="story", val_fraction=0.0, progress=False)
    assert read_split(out, "train").tolist() == expected_stream(DOCS[3:])
    with pytest.raises(DataError, match="no split 'test'"):
        prepare_data([], tmp_path / "o2", hf_dataset=str(tmp_path / "ds"), hf_split="test",
                     progress=False)


def test_hf_dataset_streaming_local_files_with_budget(tmp_path, offline_datasets):
    # load_dataset(<local dir>, streaming=True) infers the json builder from train.jsonl.
    src = tmp_path / "hub_like"
    src.mkdir()
    write_jsonl(src / "train.jsonl", [{"text": t} for t in DOCS])
    sizes = [len(ENC.encode_ordinary(t)) + 1 for t in DOCS]
    budget = sizes[0] + sizes[1] + 1  # room for two documents, not three
    out = tmp_path / "out"
    manifest = prepare_data([], out, hf_dataset=str(src), val_fraction=0.0,
                            token_budget=budget, progress=False)
    assert manifest["truncated_by_budget"] is True
    assert read_split(out, "train").tolist() == expected_stream(DOCS[:2])
    assert manifest["sources"][0]["input"].startswith("hf:")


# --- split, shards, atomicity ---------------------------------------------------------------


def many_docs(n: int = 400) -> list[str]:
    return [f"Document number {i} says {'hello ' * (i % 7 + 1)}and ends." for i in range(n)]


def test_hash_split_is_deterministic_and_exact(tmp_path):
    docs = many_docs()
    inp = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    m1 = prepare_data([inp], tmp_path / "o1", val_fraction=0.1, progress=False)
    m2 = prepare_data([inp], tmp_path / "o2", val_fraction=0.1, progress=False)
    for split in ("train", "val"):
        assert read_split(tmp_path / "o1", split).tobytes() == read_split(tmp_path / "o2", split).tobytes()
    assert m1["splits"] == m2["splits"]

    want_val = [t for t in docs if held_out(t, 0.1)]
    want_train = [t for t in docs if not held_out(t, 0.1)]
    assert 15 <= len(want_val) <= 70  # ~10 % of 400
    assert split_documents(read_split(tmp_path / "o1", "val")) == want_val
    assert split_documents(read_split(tmp_path / "o1", "train")) == want_train
    assert m1["splits"]["val"]["tokens"] == len(expected_stream(want_val))
    assert m1["splits"]["train"]["documents"] + m1["splits"]["val"]["documents"] == len(docs)


def test_small_shards_and_rerun_removes_stale(tmp_path):
    docs = many_docs(60)
    inp = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    out = tmp_path / "out"
    manifest = prepare_data([inp], out, val_fraction=0.0, shard_tokens=100, progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3
    assert [s["file"] for s in shards] == [f"train_{i:03d}.bin" for i in range(len(shards))]
    assert all(s["tokens"] == 100 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 100
    assert read_split(out, "train").tolist() == expected_stream(docs)
    assert not [p for p in out.iterdir() if is_temporary(p.name)]  # no temporary files left behind

    # Rewriting the same directory with one big shard leaves no stale train_001.bin behind.
    prepare_data([inp], out, val_fraction=0.0, progress=False)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000.bin"]


def test_failure_mid_shard_leaves_no_temporary_file(tmp_path):
    # The first input fills some shards and leaves one open; the second one's broken line aborts the run.
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in many_docs(30)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match="invalid JSON"):
        prepare_data([good, bad], out, val_fraction=0.0, shard_tokens=100, progress=False)
    assert (out / "train_000.bin").is_file()  # finished shards were renamed into place...
    assert not [p for p in out.iterdir() if is_temporary(p.name)]
    assert not (out / "manifest.json").exists()


# --- errors ---------------------------------------------------------------------------------


def test_errors(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        prepare_data([tmp_path / "missing.txt"], tmp_path / "o", progress=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        prepare_data([tmp_path / "x.csv"], tmp_path / "o", progress=False)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no .txt, .md"):
        prepare_data([tmp_path / "emptydir"], tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="no inputs"):
        prepare_data([], tmp_path / "o", progress=False)
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="no training documents"):
        prepare_data([tmp_path / "blank.txt"], tmp_path / "o", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no 'text' field"):
        prepare_data([bad], tmp_path / "o", progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        prepare_data([broken], tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="val-fraction"):
        prepare_data([bad], tmp_path / "o", val_fraction=1.0, progress=False)
    assert issubclass(DataError, ValueError) and issubclass(DataError, UserError)


def test_missing_optional_dependencies(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    # A None entry in sys.modules makes `import` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="needs pyarrow"):
        prepare_data([tmp_path / "d.parquet"], tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="needs the `datasets` package"):
        prepare_data([], tmp_path / "o", hf_dataset="roneneldan/TinyStories", progress=False)


# --- samplers -------------------------------------------------------------------------------


@pytest.fixture
def two_shard_data(tmp_path):
    docs = many_docs(200)
    inp = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    out = tmp_path / "tok"
    prepare_data([inp], out, val_fraction=0.0, shard_tokens=2000, progress=False)
    return out, np.array(expected_stream(docs), dtype=np.int64)


def test_token_shards(two_shard_data):
    out, stream = two_shard_data
    shards = TokenShards(out, "train")
    assert len(shards) == len(stream) and len(shards.shards) >= 2
    assert shards.documents == 200
    assert np.concatenate(shards.shards).tolist() == stream.tolist()
    with pytest.raises(DataError, match="no split"):
        TokenShards(out, "test")
    with pytest.raises(DataError, match="no manifest.json"):
        TokenShards(out / "nowhere", "train")


def test_random_window_sampler_windows_and_determinism(two_shard_data):
    out, stream = two_shard_data
    shards = TokenShards(out, "train")
    a = RandomWindowSampler(shards, batch_size=4, seq_len=16, seed=7)
    b = RandomWindowSampler(shards, batch_size=4, seq_len=16, seed=7)
    c = RandomWindowSampler(shards, batch_size=4, seq_len=16, seed=8)
    seen_shards = set()
    for _ in range(20):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == ya.dtype == np.int32
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa[:, 1:], ya[:, :-1])  # y is x shifted by one
        for row_x, row_y in zip(xa, ya):
            window = row_x.tolist() + [int(row_y[-1])]
            # Each window is a real run of the token stream inside one shard.
            hits = [s for s in range(len(shards.shards))
                    if _contains(shards.shards[s].tolist(), window)]
            assert hits
            seen_shards.update(hits)
    assert not np.array_equal(xa, xc)  # another seed draws other windows
    assert seen_shards == set(range(len(shards.shards)))
    assert a.step == 20


def _contains(haystack: list[int], needle: list[int]) -> bool:
    first = needle[0]
    return any(haystack[i:i + len(needle)] == needle
               for i, v in enumerate(haystack[:len(haystack) - len(needle) + 1]) if v == first)


def test_random_window_sampler_resume(two_shard_data):
    out, _ = two_shard_data
    shards = TokenShards(out, "train")
    s = RandomWindowSampler(shards, batch_size=3, seq_len=8, seed=123)
    for _ in range(5):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))  # must survive a JSON round trip
    expected = [s.next_batch() for _ in range(4)]

    resumed = RandomWindowSampler(shards, batch_size=3, seq_len=8, seed=0)
    resumed.load_state_dict(state)
    assert resumed.step == 5 and resumed.seed == 123
    for want_x, want_y in expected:
        x, y = resumed.next_batch()
        assert np.array_equal(x, want_x) and np.array_equal(y, want_y)

    with pytest.raises(ValueError, match="sampler state is for batch 3 x 8"):
        RandomWindowSampler(shards, batch_size=2, seq_len=8).load_state_dict(state)


def test_sampler_rejects_too_short_split(tmp_path):
    inp = tmp_path / "t.txt"
    inp.write_text("tiny")
    prepare_data([inp], tmp_path / "o", val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="fewer than one window"):
        RandomWindowSampler(TokenShards(tmp_path / "o"), batch_size=1, seq_len=64)


def test_sequential_batches_cover_every_window(two_shard_data):
    out, _ = two_shard_data
    shards = TokenShards(out, "train")
    T, B = 32, 5
    batches = list(sequential_batches(shards, B, T))
    assert all(x.shape[0] == B for x, _ in batches[:-1]) and 1 <= batches[-1][0].shape[0] <= B
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    want_rows = sum((len(a) - 1) // T for a in shards.shards)
    assert xs.shape == (want_rows, T) and np.array_equal(xs[:, 1:], ys[:, :-1])
    # Rows are the consecutive non-overlapping windows of each shard, in order.
    row = 0
    for arr in shards.shards:
        n = (len(arr) - 1) // T
        assert xs[row:row + n].reshape(-1).tolist() == arr[:n * T].tolist()
        assert ys[row:row + n].reshape(-1).tolist() == arr[1:n * T + 1].tolist()
        row += n


# --- the CLI, through a real process ---------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "nanogpt_mlx", "prepare-data", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_prepare_data(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in DOCS[:3]])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": DOCS[3]}])
    proc = _cli(str(train), "--val-input", str(val), "--out", str(tmp_path / "out"),
                "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train: 3 documents" in proc.stdout and "val: 1 documents" in proc.stdout
    manifest = load_manifest(tmp_path / "out")
    assert manifest["splits"]["train"]["tokens"] == len(expected_stream(DOCS[:3]))

    proc = _cli(str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o2"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: input not found") and "Traceback" not in proc.stderr

    proc = _cli("--out", str(tmp_path / "o3"), "--token-budget", "-5", str(train), cwd=tmp_path)
    assert proc.returncode == 2 and "must be positive" in proc.stderr
