"""opd.client.verl: opd as the teacher of verl's on-policy distillation (`pip install opd[verl]`).

verl launches its teacher replicas itself, through Ray, and calls them as actors, never over
HTTP (verl/experimental/teacher_loop/). This package gives verl a replica kind named "opd"
that forwards those calls to opd teachers, and a student-support reverse KL loss that asks
the teacher for its log-probs at the student's own top-K ids, which no stock server can give.

- plugin.py: what verl loads at `import verl` (entry point group `verl.plugins`); it
  registers the replica and the loss.
- settings.py: the opd URLs and client options, read from a teacher's
  `inference.engine_kwargs.opd` (verl-free).
- layout.py: verl's teacher call parsed, and opd's scores laid out as the rows verl's vLLM
  replica returns (verl-free).
- server.py: the Ray actor that answers verl's `generate()` with `POST /v1/score`.
- replica.py: the `RolloutReplica` subclass verl instantiates per teacher replica (needs verl).
- loss.py: `opd_reverse_kl_topk`, the student-support reverse KL (needs verl and torch).

Only the torch-free client of opd (opd.client.teacher) is used on the replica side; the loss
runs in verl's trainer, where torch is, and reuses opd's objective function.
"""
