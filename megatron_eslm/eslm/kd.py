"""ESLM-KD: ESLM selection plus knowledge distillation from a frozen teacher on the kept tokens.

    loss = (1 - a) * CE_kept + a * T^2 * sum_{i kept} KL(softmax(t_i / T) || softmax(s_i / T)) / K

with s_i, t_i the student's and teacher's logits of token i, K the kept count over the selection group
(the ESLM normalizer), a = --kd-alpha and T = --kd-temperature. The tokens are chosen by the VaR rule on
--eslm-score of the student (--kd-score student) or of the teacher (--kd-score teacher, which adds the
teacher's LM-head pass over every token).

The selective LM head never holds [tokens x vocab] logits; the distillation term does, for the kept rows
only: student and teacher logits [K, V] plus their log-softmaxes and the student's logit gradient, about
5 K V floats (K = 4096 kept rows at V = 50k: 4 GB in fp32). Fine at CPU scale; a chunked KD kernel would
be the next step at scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_eslm import host_syncs
from megatron_eslm.eslm.frozen_model import FrozenPass, frozen_pass
from megatron_eslm.eslm.policies import ESLMPolicy, Policy, token_score
from megatron_eslm.model.gpt import GPTModel
from megatron_eslm.model.lm_head import LMHeadOutput, Selection, TokenScores


def kd_loss_sum(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """sum over rows of T^2 KL(softmax(teacher / T) || softmax(student / T)), in float32 at least; the
    T^2 keeps the gradient's scale independent of T (Hinton et al. 2015)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    teacher_logp = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
    return temperature * temperature * kl


class ESLMKDPolicy(Policy):
    def __init__(self, eslm: ESLMPolicy, teacher: GPTModel, kd_alpha: float, temperature: float,
                 score_by: str = "student"):
        self.eslm = eslm
        self.teacher = teacher
        self.kd_alpha = kd_alpha
        self.temperature = temperature
        self.score_by = score_by
        self._teacher: FrozenPass | None = None
        self._kd_flops = 0.0

    def start_step(self, iteration: int) -> None:
        self.eslm.start_step(iteration)

    def prepare(self, tokens: Tensor, labels: Tensor, index: Tensor | None) -> None:
        self._teacher = frozen_pass(self.teacher, tokens, labels, score=self.score_by == "teacher")

    def __call__(self, scores: TokenScores) -> Selection:
        source = scores if self.score_by == "student" else self._teacher.scores
        return self.eslm.select(token_score(source, self.eslm.score), scores.valid)

    def objective(self, model: GPTModel, hidden: Tensor, out: LMHeadOutput) -> Tensor:
        rows = out.selection.rows  # the head's kept rows: no second host read
        if rows is None:  # the head ran without autograd
            with host_syncs.inherent("the kept count sizes the distillation's logits"):
                rows = out.selection.kept.nonzero().squeeze(1)
        student = model.logits(hidden.reshape(-1, hidden.shape[-1])[rows])
        with torch.no_grad():
            teacher = self.teacher.logits(self._teacher.hidden[rows])
        normalizer = torch.as_tensor(out.selection.normalizer, device=student.device)
        kd = kd_loss_sum(student, teacher, self.temperature) * torch.where(normalizer > 0, 1.0 / normalizer, 0.0)
        # student logits: forward + two backward GEMMs; teacher logits: forward only
        head = 2.0 * rows.numel() * model.vocab_size
        self._kd_flops = head * (3 * model.cfg.hidden_size + self.teacher.cfg.hidden_size)
        return (1.0 - self.kd_alpha) * out.loss + self.kd_alpha * kd

    def extra_flops(self) -> float:
        return self._teacher.flops + self._kd_flops

    def state_dict(self) -> dict:
        return self.eslm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.eslm.load_state_dict(state)
