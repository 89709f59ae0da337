"""Knowledge distillation (`nanogpt-mlx distill`): a student trained against a teacher.

    client.py    HTTP to an OpenAI-compatible teacher: retries, backoff, Retry-After, counts
    cache.py     content-addressed answers, written atomically (a killed run asks nothing twice)
    teachers.py  LocalTeacher (a checkpoint in-process) and RemoteLogitTeacher (echo + logprobs)
    sequence.py  sequence-level: prompts -> teacher text -> shards mixed with the corpus
    run.py       the losses, `run_distill`, prefetch, and held-out KL / perplexity against a teacher
    faults.py    a fault-injecting proxy (500s, 429s, timeouts, dropped connections) for the proof
    proof.py     the bounded proof: CE only vs logit vs sequence-level distillation
"""

from nanogpt_mlx.training.distill.client import RequestStats, TeacherClient, TeacherRejected
from nanogpt_mlx.training.distill.run import (
    HeldOut,
    check_settings,
    held_out_against,
    make_teacher,
    planned_windows,
    prefetch,
    run_distill,
    run_sequence_distill,
)
from nanogpt_mlx.training.distill.sequence import SequenceTeacher, corpus_prompts, file_prompts, mix_data
from nanogpt_mlx.training.distill.teachers import LocalTeacher, RemoteLogitTeacher

__all__ = [
    "HeldOut", "LocalTeacher", "RemoteLogitTeacher", "RequestStats", "SequenceTeacher", "TeacherClient", "TeacherRejected",
    "check_settings", "corpus_prompts", "file_prompts", "held_out_against", "make_teacher", "mix_data", "planned_windows",
    "prefetch", "run_distill", "run_sequence_distill",
]
