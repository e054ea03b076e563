r"""`opd_reverse_kl_topk`: verl's distillation loss on the student's own top-K, with opd's numbers.

The method's default objective is the reverse KL on the student's support: at each response
position t, S_t = the student's top-K ids, and

    l_t = sum_{v in S_t} p_bar(v) (log p_bar(v) - log q_bar(v)),
    p_bar = softmax over S_t of the student's log-probs (gradient flows), q_bar = the teacher's,

opd's `student-topk` objective in its "renormalized" form (opd.client.train.objectives, one
home for the formula). It needs the teacher's log-probs at ids the student chose, which
verl's vLLM and SGLang teachers cannot give (verl issues #6676, #7806). verl 0.9.1 computes
top-K losses in the trainer from the student's logits (a "logits processor",
verl.trainer.distillation.losses.compute_topk_loss), with the teacher's numbers fetched in the
agent loop before the student's top-K is known. So this loss asks opd from the logits
processor: the student's top-K at every response position goes to `POST /v1/score` as
`candidate_ids`, and the teacher's log-probs at exactly those ids come back.

verl has a registry for the loss itself (`register_distillation_loss`), which is used; it has
no extension point for the logits processor, which dispatches to its forward KL by strategy,
nor for the check that a teacher's engine can return top-K (vllm or sglang only). Both are
wrapped here, for this loss mode and the engine "opd" only; every other mode and engine goes
to verl's own functions unchanged. Limits, each refused with the setting to change: the FSDP
(or VeOmni) actor in packed ("thd") format, no Ulysses sequence parallelism, no fused kernels,
one teacher. The teacher runs once more per micro-batch (the agent loop's call, whose top-K
verl's batch requires, is not used by this loss).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from tensordict import TensorDict
from verl.trainer.distillation import losses as verl_losses
from verl.trainer.distillation.losses import DistillationLossSettings, register_distillation_loss
from verl.utils.metric import AggregationType, Metric
from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size
from verl.workers.config import DistillationConfig, DistillationTeacherModelConfig
from verl.workers.utils.padding import no_padding_2_padding

from opd.client.teacher.client import TeacherClient
from opd.client.train.objectives import student_topk_loss
from opd.client.verl.settings import ENGINE, read_settings
from opd.shared.schemas import ScoreRequest, SequenceIn

LOSS_MODE = "opd_reverse_kl_topk"
_STRATEGIES = ("fsdp", "fsdp2", "veomni")

_clients: dict[Any, TeacherClient] = {}
_clients_lock = threading.Lock()


def _teacher(distillation_config: DistillationConfig) -> TeacherClient:
    """The opd client of the run's one teacher, made once per trainer process."""
    teachers = list(distillation_config.teacher_models.values())
    if len(teachers) != 1:
        raise NotImplementedError(
            f"distillation.distillation_loss.loss_mode={LOSS_MODE}: one teacher only, got "
            f"{len(teachers)}; several teachers train with the sampled (k1/k3) or forward_kl_topk "
            "losses"
        )
    teacher = teachers[0]
    if teacher.inference.name != ENGINE:
        raise ValueError(
            f"distillation.distillation_loss.loss_mode={LOSS_MODE} needs an opd teacher: "
            f"inference.name is {teacher.inference.name!r}, not {ENGINE!r}"
        )
    settings = read_settings(teacher.inference.engine_kwargs, teacher.model_path)
    with _clients_lock:
        if settings not in _clients:
            _clients[settings] = TeacherClient(**settings.client_kwargs())
        return _clients[settings]


def _response_rows(data: TensorDict, n_tokens: int) -> list[tuple[int, int, int]]:
    """(first token of the sequence, first response token, end) of each packed sequence."""
    prompts, responses = data["prompts"], data["responses"]
    if not (prompts.is_nested and responses.is_nested and data["input_ids"].is_nested):
        raise NotImplementedError(
            f"{LOSS_MODE}: needs the packed (no padding) micro-batch, "
            "actor_rollout_ref.model.use_remove_padding=True"
        )
    prompt_lens = prompts.offsets().diff().tolist()
    response_lens = responses.offsets().diff().tolist()
    offsets = data["input_ids"].offsets().tolist()
    rows = []
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        start, end = offsets[i], offsets[i + 1]
        if end - start != p + r:
            raise ValueError(f"{LOSS_MODE}: sequence {i} holds {end - start} tokens, not {p} + {r}")
        rows.append((start, start + p, end))
    if offsets[-1] != n_tokens:
        raise ValueError(f"{LOSS_MODE}: {n_tokens} logit rows for {offsets[-1]} packed tokens")
    return rows


def student_topk_outputs(
    student_logits: torch.Tensor, data: TensorDict, distillation_config: DistillationConfig
) -> dict[str, torch.Tensor]:
    """Per-token loss and masses, each (1, total tokens), as verl's logits processor returns.

    Row j of the packed logits predicts packed token j + 1; the rows that predict response
    tokens are scored, the others are 0 (verl masks them with the response mask anyway).
    """
    if get_ulysses_sequence_parallel_world_size() > 1:
        raise NotImplementedError(
            f"{LOSS_MODE}: Ulysses sequence parallelism splits the logits; set "
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"
        )
    logits_TV = student_logits[0]
    k = distillation_config.distillation_loss.topk
    tokens_T = data["input_ids"].values()
    rows = _response_rows(data, logits_TV.shape[0])
    logp_TV = torch.log_softmax(logits_TV.float(), dim=-1)
    cand_TK = logp_TV.detach().topk(k, dim=-1).indices
    scored = [(s, p, e) for s, p, e in rows if e > p]
    teacher_TK = torch.zeros(cand_TK.shape, dtype=torch.float32)
    mask_T = torch.zeros(logits_TV.shape[0], dtype=torch.bool)
    if scored:
        request = ScoreRequest(
            sequences=[
                SequenceIn(
                    token_ids=tokens_T[s:e].tolist(),
                    score_from=p - s,
                    candidate_ids=cand_TK[p - 1 : e - 1].tolist(),
                )
                for s, p, e in scored
            ]
        )
        result = _teacher(distillation_config).score(request)
        for i, (_, p, e) in enumerate(scored):
            values = result.sequence(i).candidate_logprobs
            assert values is not None
            teacher_TK[p - 1 : e - 1] = torch.from_numpy(values.astype("float32"))
            mask_T[p - 1 : e - 1] = True
    teacher_TK = teacher_TK.to(logits_TV.device)
    mask_T = mask_T.to(logits_TV.device)
    cand_logp_TK = logp_TV.detach().gather(-1, cand_TK)  # "old" = now: the loss is on policy
    loss_T = student_topk_loss(logp_TV, cand_TK, cand_logp_TK, teacher_TK, variant="renormalized")
    student_mass_T = cand_logp_TK.exp().sum(-1)
    teacher_mass_T = teacher_TK.exp().sum(-1)
    zero = torch.zeros((), device=logits_TV.device)
    return {
        "distillation_losses": torch.where(mask_T, loss_T, zero).unsqueeze(0),
        "student_mass": torch.where(mask_T, student_mass_T, zero).unsqueeze(0),
        "teacher_mass": torch.where(mask_T, teacher_mass_T, zero).unsqueeze(0),
    }


def opd_reverse_kl_topk(
    config: Any, distillation_config: DistillationConfig, model_output: dict, data: TensorDict
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's per-response-token loss (bsz, response length) and metrics for this mode."""
    if "distillation_losses" not in model_output:
        raise RuntimeError(
            f"{LOSS_MODE}: the logits processor did not run; it needs the student's logits "
            "(actor_rollout_ref.model.use_fused_kernels=False)"
        )
    losses = no_padding_2_padding(model_output["distillation_losses"], data)
    student_mass = no_padding_2_padding(model_output["student_mass"], data)
    teacher_mass = no_padding_2_padding(model_output["teacher_mass"], data)
    mask = data["response_mask"]
    mask = (mask.to_padded_tensor(0) if mask.is_nested else mask).bool()
    student_mass, teacher_mass = student_mass[mask], teacher_mass[mask]
    metrics = {
        "distillation/student_mass": student_mass.mean().item(),
        "distillation/student_mass_min": Metric(AggregationType.MIN, student_mass.min()),
        "distillation/student_mass_max": Metric(AggregationType.MAX, student_mass.max()),
        "distillation/teacher_mass": teacher_mass.mean().item(),
        "distillation/teacher_mass_min": Metric(AggregationType.MIN, teacher_mass.min()),
        "distillation/teacher_mass_max": Metric(AggregationType.MAX, teacher_mass.max()),
    }
    return losses, metrics


def install() -> None:
    """Register the loss, and route its logits processor and its teacher check here.

    Idempotent: a second call (the module imported again, or twice in one process) changes
    nothing.
    """
    if LOSS_MODE not in verl_losses.DISTILLATION_LOSS_REGISTRY:
        settings = DistillationLossSettings(names=[LOSS_MODE], use_topk=True)
        register_distillation_loss(settings)(opd_reverse_kl_topk)
    if not getattr(verl_losses.compute_topk_loss, "opd", False):
        verl_compute_topk_loss = verl_losses.compute_topk_loss

        def compute_topk_loss(
            config: Any,
            distillation_config: DistillationConfig,
            data: TensorDict,
            student_logits: torch.Tensor,
            data_format: str,
        ) -> dict[str, torch.Tensor]:
            if distillation_config.distillation_loss.loss_mode != LOSS_MODE:
                return verl_compute_topk_loss(
                    config, distillation_config, data, student_logits, data_format
                )
            if config.strategy not in _STRATEGIES or data_format != "thd":
                raise NotImplementedError(
                    f"{LOSS_MODE}: needs actor strategy in {_STRATEGIES} with packed sequences "
                    f"(data format 'thd'); got {config.strategy!r}, {data_format!r}"
                )
            return student_topk_outputs(student_logits, data, distillation_config)

        compute_topk_loss.opd = True  # type: ignore[attr-defined]
        verl_losses.compute_topk_loss = compute_topk_loss
    check = DistillationTeacherModelConfig._validate_topk_logprobs
    if not getattr(check, "opd", False):

        def validate_topk_logprobs(
            self: DistillationTeacherModelConfig, use_topk: bool, topk: int | None
        ) -> None:
            if self.inference.name != ENGINE:
                return check(self, use_topk, topk)
            # opd's limit (max_top_k, max_candidates) is the server's, checked per request.
            if use_topk and topk is None:
                raise ValueError("topk must be specified when use_topk is True.")

        validate_topk_logprobs.opd = True  # type: ignore[attr-defined]
        DistillationTeacherModelConfig._validate_topk_logprobs = validate_topk_logprobs
