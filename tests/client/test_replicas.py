"""Several teacher replicas: spreading, failover when one dies mid-run, agreement checks."""

from __future__ import annotations

import signal
import threading

import pytest

from opd.client import IncompatibleTeacherError, TeacherClient
from opd.client.configs.train import TrainConfig
from opd.client.teacher.launch import LocalTeacher
from opd.client.teacher.replicas import ReplicaSet, normalise_urls
from opd.client.train.metric_log import read_metrics
from opd.client.train.trainer import Trainer
from opd.shared.packed import PackedRequest
from tests.support.prom import score_requests
from tests.support.train_config import train_config

_TIMING = ("time/", "throughput/")


def test_normalise_urls():
    assert normalise_urls("http://a:1/, http://b:2") == ["http://a:1", "http://b:2"]
    assert normalise_urls(["http://a:1", "http://a:1/"]) == ["http://a:1"]
    with pytest.raises(ValueError):
        normalise_urls([" "])


def test_replica_set_round_robin_and_ejection():
    replicas = ReplicaSet(["a", "b", "c"], cooldown_s=60)
    assert [replicas.pick() for _ in range(4)] == ["a", "b", "c", "a"]
    replicas.eject("b")
    assert replicas.healthy() == 2
    assert {replicas.pick() for _ in range(6)} == {"a", "c"}
    replicas.eject("a")
    replicas.eject("c")
    assert replicas.healthy() == 0
    assert replicas.pick() == "b"  # all down: the one that comes back first


def _config(student, urls, run_dir) -> TrainConfig:
    return train_config(student, urls, run_dir, seed=11, checkpoint_every=100)


def test_training_survives_a_replica_dying_mid_run(tiny_model_dir, tiny_student_dir, tmp_path):
    a = LocalTeacher(str(tiny_model_dir), log_path=tmp_path / "a.log")
    b = LocalTeacher(str(tiny_model_dir), log_path=tmp_path / "b.log")
    urls = [a.start(), b.start()]
    try:
        with Trainer(_config(tiny_student_dir, urls, tmp_path / "calm")) as trainer:
            trainer.run()
            calm_counts = _score_requests(trainer)

        killer = threading.Timer(0.3, lambda: b.process.send_signal(signal.SIGKILL))

        def kill_b_during_step_2(step: int, metrics: dict) -> None:
            if step == 1:  # no drain: whatever b holds in flight is lost and must be retried
                killer.start()

        with Trainer(_config(tiny_student_dir, urls, tmp_path / "killed")) as trainer:
            trainer.run(on_step=kill_b_during_step_2)
        killer.join()
        assert b.process is not None and b.process.wait(10) == -signal.SIGKILL
    finally:
        a.stop()
        b.stop()
    assert min(calm_counts.values()) > 0, "both replicas should have served the calm run"
    calm = read_metrics(tmp_path / "calm" / "metrics.jsonl")
    killed = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [m["step"] for m in killed] == [1, 2, 3, 4]
    for x, y in zip(calm, killed, strict=True):
        for key, value in x.items():
            if key.startswith(_TIMING) or value is None:
                continue
            assert y[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (x["step"], key)


def _score_requests(trainer: Trainer) -> dict[str, float]:
    """How many score requests each replica answered (from its /metrics)."""
    return {url: score_requests(url) for url in trainer.config.teacher.url}


def test_replicas_must_serve_the_same_model(tiny_server, smol_server):
    client = TeacherClient([tiny_server, smol_server])
    with client, pytest.raises(IncompatibleTeacherError, match="replicas disagree on revision"):
        client.connect()


def test_a_dead_replica_at_connect_is_skipped(tiny_server, tmp_path):
    from opd.client.teacher.launch import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with TeacherClient([dead, tiny_server], max_retries=1, backoff_base_s=0.01) as client:
        info = client.connect()
        result = client.score(PackedRequest.from_arrays([[1, 2, 3, 4]] * 6, [1] * 6))
    assert info.vocab_size == 49152 and result.n_sequences == 6
