"""What the review server asks of one learner process (a round): ``Job``, as JSON.

A round either trains (``corrections`` set: fine-tune ``parent`` into ``version``, gate
it, and on success predict ``tiles`` with it) or only predicts ``tiles`` with the
existing ``version`` (a rollback to a version that never predicted them).
"""

from __future__ import annotations

import msgspec


class Job(msgspec.Struct, forbid_unknown_fields=True):
    store: str
    workdir: str  #: this round's folder (job.json, the corrections export, logs)
    repository: str  #: the Triton model repository the versions live in
    name: str  #: the model's folder in it (``segloop_unet``)
    version: int  #: the version this round makes (or, predicting only, uses)
    parent: int | None  #: the served version it starts from (None: predict only)
    tiles: list[tuple[int, int]]  #: level-0 tiles to predict, first first
    corrections: str | None = None  #: the export to train on (None: predict only)
    held_out: list[int] = []  #: indices of exported tiles to validate on, not train on
    steps: int = 120
    patch: int = 128
    batch: int = 8
    #: share of synthetic in-distribution crops: 7 of 8 (measured: 0.75 lost 0.013 in-distribution
    #: nucleus IoU after 120 steps on 5 tiles, 0.875 lost 0.007 and gained as much OOD)
    replay: float = 0.875
    lr: float = 5e-4
    seed: int = 0
    threads: int = 1  #: torch and ONNX Runtime threads of the learner
    #: CPU priority: idle (SCHED_IDLE + nice 19: only cores nothing else wants), low
    #: (nice 19), normal (as the server: for tests on a machine loaded by others)
    priority: str = "idle"
    memory_mb: int = 6144  #: address-space limit of the learner process
    validation_px: int = 1024  #: side of the synthetic in-distribution validation image
    #: a new version is rejected when its held-out mean IoU falls more than this …
    tolerance: float = 0.005
    #: … or its in-distribution nucleus IoU drops more than this below its parent's
    id_drop: float = 0.01
    runtime: str = "onnx"  #: how it predicts: onnx (embedded) or triton
    url: str | None = None  #: Triton's gRPC HOST:PORT (runtime triton)


def encode(job: Job) -> bytes:
    return msgspec.json.encode(job)


def decode(data: bytes) -> Job:
    return msgspec.json.decode(data, type=Job)
