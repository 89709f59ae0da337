"""Training recipes: a TOML file, plus command-line overrides, checked against the model.

A recipe has five sections (every key optional; the defaults are the card's recipe):

    [model]       ModelConfig fields (n_layer, n_embd, n_head, n_inner, block_size, dropout, ...)
    [data]        train (a shards directory), seq_len, batch_size (rows per micro-batch per
                  process), grad_accum, eval_batches, seq_len_schedule
    [optim]       lr, min_lr, warmup_steps, weight_decay, beta1, beta2, eps, grad_clip,
                  decay_steps (default: max_steps - warmup_steps)
    [train]       max_steps, seed, eval_interval, log_interval, save_interval_steps,
                  save_interval_minutes, keep_last
    [distill]     teacher, mode, alpha, temperature, top_k, sparse_kl, ... (only `nanogpt-mlx distill`;
                  see DistillSection and training/README.md)

`data.seq_len_schedule` trains in phases, e.g. `[[0, 256, 24], [6000, 512, 12]]`: from step 0
sequences of 256 in batches of 24 rows, from step 6000 sequences of 512 in batches of 12 (the
same tokens per step). Short sequences early are cheaper per token on CPU (attention is
quadratic) and the model first learns local statistics anyway.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from nanogpt_mlx.errors import UserError
from nanogpt_mlx.model.config import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"


class TrainingError(UserError):
    """A problem with the recipe, the data or a checkpoint that the user can fix (exit code 2)."""


@dataclass
class DataSection:
    train: str = ""
    seq_len: int = 512
    batch_size: int = 12
    grad_accum: int = 1
    eval_batches: int = 50
    seq_len_schedule: list = field(default_factory=list)


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 1.5e-5
    warmup_steps: int = 2000
    decay_steps: int = 0  # 0: decay over the rest of training (max_steps - warmup_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    max_steps: int = 35000
    seed: int = 1337
    eval_interval: int = 500
    log_interval: int = 10
    save_interval_steps: int = 1000
    save_interval_minutes: float = 0.0  # 0: by steps only
    keep_last: int = 3


@dataclass
class DistillSection:
    """`nanogpt-mlx distill` (training/distill/): the teacher, the loss, and how it is asked."""

    teacher: str = ""  # a checkpoint directory or an http(s):// OpenAI-compatible base URL
    teacher_model: str = ""  # the "model" field sent to an HTTP teacher (default: the first it lists)
    mode: str = "logits"  # logits: the teacher's distributions (KL); sequence: its text (CE on continuations)
    alpha: float = 0.7
    temperature: float = 2.0
    top_k: int = 20  # logprobs asked of an HTTP teacher (fewer if the server allows fewer)
    sparse_kl: str = "renorm"  # KL from top-k logprobs: renorm (top k renormalised; measured better) or bucket (top k + the rest)
    teacher_max_len: int = 0  # the HTTP teacher's context; 0: read max_model_len from /v1/models
    concurrency: int = 4  # requests in flight to an HTTP teacher
    timeout: float = 120.0  # seconds for one answer
    max_retries: int = 8  # per request, on 429 / 5xx / timeouts / dropped connections
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the teacher's API key
    cache_dir: str = ""  # teacher answers (default RUN/teacher_cache)
    prefetch: bool = False  # ask for every window of the run before the first step
    prompts: str = ""  # sequence mode: a prompts file (default: sampled from the train split)
    num_prompts: int = 1100
    prompt_tokens: int = 32  # length of prompts sampled from the corpus
    max_new_tokens: int = 256
    gen_temperature: float = 0.8  # sampling temperature of the teacher's continuations
    endpoint: str = "completions"  # sequence mode: completions or chat
    mix_ratio: float = 0.5  # sequence mode: share of training windows drawn from teacher text


@dataclass
class Recipe:
    model: dict = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "recipe") -> Recipe:
        recipe = cls()
        for section, value in raw.items():
            if section == "model":
                unknown = set(value) - set(ModelConfig.field_names())
                if unknown:
                    raise TrainingError(f"{source}: unknown [model] keys {sorted(unknown)}; known: {ModelConfig.field_names()}")
                recipe.model.update(value)
                continue
            target = getattr(recipe, section, None)
            if not dataclasses.is_dataclass(target):
                raise TrainingError(f"{source}: unknown section [{section}]; known: model, data, optim, train, distill")
            for key, v in value.items():
                _set_field(target, section, key, v, source)
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = resolve_config_path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise TrainingError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    def override(self, assignments: list[str]) -> Recipe:
        """Apply `section.key=value` strings (values parsed as TOML, else taken as strings)."""
        out = copy.deepcopy(self)
        for item in assignments:
            if "=" not in item or "." not in item.split("=", 1)[0]:
                raise TrainingError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=1e-3")
            dotted, text = item.split("=", 1)
            section, key = dotted.strip().split(".", 1)
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                value = text
            if section == "model":
                if key not in ModelConfig.field_names():
                    raise TrainingError(f"--set {item}: unknown model field {key!r}")
                out.model[key] = value
            else:
                target = getattr(out, section, None)
                if not dataclasses.is_dataclass(target):
                    raise TrainingError(f"--set {item}: unknown section {section!r}")
                _set_field(target, section, key, value, f"--set {item}")
        return out

    def to_dict(self) -> dict:
        return {"model": dict(self.model), **{s: dataclasses.asdict(getattr(self, s)) for s in ("data", "optim", "train", "distill")}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # --- derived values and checks ------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig(**self.model)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"[model]: {exc}") from exc

    def phases(self) -> list[tuple[int, int, int]]:
        """(start_step, seq_len, batch_size) phases, sorted; one phase without a schedule."""
        if not self.data.seq_len_schedule:
            return [(0, self.data.seq_len, self.data.batch_size)]
        phases = []
        for entry in self.data.seq_len_schedule:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(v, int) for v in entry)):
                raise TrainingError(f"data.seq_len_schedule entries must be [start_step, seq_len, batch_size], got {entry!r}")
            phases.append(tuple(entry))
        phases.sort()
        if phases[0][0] != 0:
            raise TrainingError("data.seq_len_schedule must start at step 0")
        return phases

    def phase_at(self, step: int) -> tuple[int, int, int, int]:
        """(phase index, start_step, seq_len, batch_size) in force at `step`."""
        phases = self.phases()
        index = max(i for i, p in enumerate(phases) if p[0] <= step)
        return (index, *phases[index])

    def validate(self, config: ModelConfig | None = None) -> ModelConfig:
        """Check the recipe for contradictions, with itself and with the model; return the model config."""
        config = config or self.model_config()
        d, o, t = self.data, self.optim, self.train
        for _start, seq_len, batch in self.phases():
            if seq_len < 2 or batch < 1:
                raise TrainingError(f"seq_len must be >= 2 and batch_size >= 1 (got seq_len {seq_len}, batch_size {batch})")
            if seq_len > config.block_size:
                raise TrainingError(
                    f"seq_len {seq_len} exceeds the model's context (block_size {config.block_size}): "
                    "shorten the sequences or enlarge model.block_size"
                )
        checks = [
            (d.grad_accum >= 1, f"data.grad_accum must be >= 1, got {d.grad_accum}"),
            (d.eval_batches >= 0, f"data.eval_batches must be >= 0, got {d.eval_batches}"),
            (t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}"),
            (o.lr > 0 and 0 <= o.min_lr <= o.lr, f"need 0 <= optim.min_lr ({o.min_lr}) <= optim.lr ({o.lr}) and lr > 0"),
            (0 <= o.warmup_steps, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}"),
            (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim betas must be in [0, 1), got {o.beta1}, {o.beta2}"),
            (o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}"),
            (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
            (t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}"),
            (t.eval_interval >= 0 and t.log_interval >= 1, "train.eval_interval must be >= 0 and train.log_interval >= 1"),
            (0 <= self.distill.alpha <= 1, f"distill.alpha must be in [0, 1], got {self.distill.alpha}"),
            (self.distill.temperature > 0, f"distill.temperature must be > 0, got {self.distill.temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)
        return config


def _set_field(target, section: str, key: str, value, source: str) -> None:
    names = {f.name: f for f in dataclasses.fields(target)}
    if key not in names:
        raise TrainingError(f"{source}: unknown key {section}.{key}; known: {sorted(names)}")
    current = getattr(target, key)
    if isinstance(current, bool) or isinstance(current, list):
        ok = isinstance(value, type(current))
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
        value = str(value)
    if not ok:
        raise TrainingError(f"{source}: {section}.{key} must be a {type(current).__name__}, got {value!r}")
    setattr(target, key, value)


def resolve_config_path(path: str | Path) -> Path:
    """A path, or the name of a bundled recipe (`card`, `default-offline`)."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / f"{p.name.removesuffix('.toml')}.toml"
    if not p.suffix and bundled.is_file():
        return bundled
    names = sorted(f.stem for f in CONFIG_DIR.glob("*.toml"))
    raise TrainingError(f"config not found: {path} (bundled recipes: {', '.join(names)})")
