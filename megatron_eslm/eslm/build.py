"""`--selection` -> a policy (None for dense training); eslm-kd and rho1 load their checkpoint here."""
from __future__ import annotations

import torch

from megatron_eslm import parallel_state
from megatron_eslm.config import Config
from megatron_eslm.config.validation import sequence_keep
from megatron_eslm.eslm.ada import AdaESLMPolicy, AlphaRule
from megatron_eslm.eslm.frozen_model import load_frozen_model
from megatron_eslm.eslm.importance import ESLMISPolicy
from megatron_eslm.eslm.kd import ESLMKDPolicy
from megatron_eslm.eslm.lfr import LFRPolicy, Phases
from megatron_eslm.eslm.lfr_skip import LFRSkipPolicy
from megatron_eslm.eslm.policies import ESLMPolicy, Policy, RandomPolicy
from megatron_eslm.eslm.rho1 import Rho1Policy
from megatron_eslm.eslm.sequence import SequencePolicy


def build_policy(cfg: Config, vocab_size: int, device: torch.device | None = None, group=None,
                 num_blocks: int = 0) -> Policy | None:
    """`group` is the selection group every threshold and normalizer is taken over (None: this process);
    `num_blocks`: the training data's blocks (--lfr-mode skip's table, `data/builder.py`)."""
    s = cfg.selection
    if s.selection == "none":
        return None
    device = device or torch.device("cpu")
    if s.eslm_granularity == "sequence":
        return _sequence_policy(cfg, vocab_size, device, group)
    eslm = ESLMPolicy(s.eslm_alpha, s.eslm_score, s.eslm_threshold, s.eslm_sketch_size, group,
                      s.eslm_threshold_scope)
    if s.selection == "eslm":
        return eslm
    if s.selection == "eslm-is":
        return ESLMISPolicy(eslm, s.eslm_is_prob, cfg.training.seed)
    if s.selection == "random":
        return RandomPolicy(eslm, cfg.training.seed, parallel_state.data_context_parallel_rank())
    if s.selection == "ada-eslm":
        return AdaESLMPolicy(eslm, AlphaRule(s.ada_eslm_rule, s.eslm_alpha_min, s.eslm_alpha_max, s.ada_eslm_budget,
                                             s.ada_eslm_momentum, cfg.training.train_iters))
    if s.selection == "eslm-kd":
        teacher = load_frozen_model(s.teacher_load, "--teacher-load", vocab_size, cfg.model.seq_length, device)
        return ESLMKDPolicy(eslm, teacher, s.kd_alpha, s.kd_temperature, s.kd_score)
    if s.selection == "rho1":
        reference = load_frozen_model(s.reference_load, "--reference-load", vocab_size, cfg.model.seq_length,
                                      device)
        return Rho1Policy(eslm, reference)
    phases = Phases(s.lfr_learn_iters, s.lfr_focus_iters, s.lfr_review_iters)
    if s.lfr_mode == "skip":
        return LFRSkipPolicy(phases, s.lfr_drop_fraction, num_blocks)
    return LFRPolicy(phases, s.lfr_drop_fraction,
                     s.eslm_threshold, s.eslm_sketch_size, group)


def _sequence_policy(cfg: Config, vocab_size: int, device: torch.device, group) -> SequencePolicy:
    """--eslm-granularity sequence: ESLM by the student's or the proxy's scores, or the random control."""
    s = cfg.selection
    proxy = None
    if s.eslm_scorer == "proxy":
        proxy = load_frozen_model(s.proxy_load, "--proxy-load", vocab_size, cfg.model.seq_length, device)
    return SequencePolicy(sequence_keep(s.eslm_alpha, cfg.training.global_batch_size), s.eslm_score, group, proxy,
                          cfg.training.seed if s.selection == "random" else None)
