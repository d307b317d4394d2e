"""Token-selection flags: ESLM's VaR threshold and the family built on it (docs/selection.md)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_eslm.config.checks import one_of, positive
from megatron_eslm.errors import UserError

TITLE = "token selection (ESLM)"
SELECTIONS = ("none", "eslm", "eslm-is", "random", "ada-eslm", "eslm-kd", "rho1", "lfr")
ADA_ESLM_RULES = ("grad-mass", "linear", "cosine")
KD_SCORES = ("student", "teacher")
SCORES = ("loss", "entropy")
THRESHOLD_MODES = ("sketch", "sketch-exact", "exact")
THRESHOLD_SCOPES = ("micro-batch", "previous-step")
LM_HEAD_IMPLS = ("auto", "torch", "triton")
LFR_MODES = ("skip", "mask")
GRANULARITIES = ("token", "sequence")
SEQUENCE_SCORERS = ("student", "proxy")


@dataclass
class SelectionConfig:
    selection: str = "eslm"  # none | eslm | eslm-is | random | ada-eslm | eslm-kd | rho1 | lfr
    eslm_score: str = "loss"  # loss | entropy
    eslm_alpha: float = 0.5  # confidence level: the alpha-quantile of scores is the VaR threshold
    eslm_threshold: str = "sketch-exact"  # sketch | sketch-exact | exact
    eslm_sketch_size: int = 2048
    eslm_threshold_scope: str = "micro-batch"  # micro-batch | previous-step: whose scores set the threshold
    eslm_is_prob: float = 0.1  # eslm-is: keep probability of a token below the threshold (weight 1/p)
    eslm_alpha_min: float = 0.0  # ada-eslm: alpha's bounds; the schedules run from min to max
    eslm_alpha_max: float = 0.8
    ada_eslm_rule: str = "grad-mass"  # grad-mass | linear | cosine
    ada_eslm_budget: float = 0.1  # grad-mass: share of the logit-gradient mass dropped tokens may carry
    ada_eslm_momentum: float = 0.9  # grad-mass: weight of the previous alpha
    teacher_load: str | None = None  # eslm-kd: teacher checkpoint directory
    kd_alpha: float = 0.5  # eslm-kd: weight of the distillation term
    kd_temperature: float = 2.0
    kd_score: str = "student"  # eslm-kd: whose score the VaR threshold uses: student | teacher
    reference_load: str | None = None  # rho1: reference checkpoint directory
    lfr_learn_iters: int = 100  # lfr: phase lengths in steps, then the drop fraction of focus phases
    lfr_focus_iters: int = 50
    lfr_review_iters: int = 25
    lfr_drop_fraction: float = 0.3
    lfr_mode: str = "skip"  # skip | mask
    eslm_granularity: str = "token"  # token | sequence: what eslm and random keep or drop
    eslm_scorer: str = "student"  # sequence granularity: who scores the candidates: student | proxy
    proxy_load: str | None = None  # --eslm-scorer proxy: the proxy's checkpoint directory
    lm_head_impl: str = "auto"  # auto | torch | triton
    selection_warmup_iters: int = 0


HELP = {
    "selection": "token selection: " + ", ".join(SELECTIONS),
    "eslm_score": "per-token score for the VaR threshold: " + ", ".join(SCORES),
    "eslm_alpha": "confidence alpha in [0, 1): tokens below the alpha-quantile score are dropped",
    "eslm_threshold": "how the VaR threshold is found: " + ", ".join(THRESHOLD_MODES)
                      + " (see docs/threshold.md)",
    "eslm_sketch_size": "quantile-sketch points per rank: rank error below 1/N of the tokens",
    "eslm_threshold_scope": "whose scores set a micro-batch's VaR threshold: " + ", ".join(THRESHOLD_SCOPES)
                            + " (the merged sketch of every micro-batch of the previous step; see "
                            "docs/threshold.md)",
    "eslm_is_prob": "eslm-is: probability p in (0, 1] with which a token below the threshold is kept, with "
                    "weight 1/p (an unbiased estimate of the dense loss; p = 1 is dense; docs/selection.md)",
    "eslm_alpha_min": "ada-eslm: lowest alpha (where the linear/cosine schedules start)",
    "eslm_alpha_max": "ada-eslm: highest alpha (where the linear/cosine schedules end)",
    "ada_eslm_rule": "ada-eslm: how alpha moves: " + ", ".join(ADA_ESLM_RULES) + " (see docs/selection.md)",
    "ada_eslm_budget": "ada-eslm grad-mass: share of the logit-gradient mass the dropped tokens may carry",
    "ada_eslm_momentum": "ada-eslm grad-mass: weight of the previous alpha in each update, in [0, 1)",
    "teacher_load": "eslm-kd: teacher checkpoint directory (our layout, same tokenizer, any size)",
    "kd_alpha": "eslm-kd: weight in [0, 1] of the distillation term on the kept tokens",
    "kd_temperature": "eslm-kd: softmax temperature of the distillation term",
    "kd_score": "eslm-kd: whose --eslm-score the VaR threshold uses: " + ", ".join(KD_SCORES),
    "reference_load": "rho1: reference checkpoint directory; the score is student loss - reference loss",
    "lfr_learn_iters": "lfr: initial steps on every sample",
    "lfr_focus_iters": "lfr: steps of each focus phase (easiest samples dropped)",
    "lfr_review_iters": "lfr: steps of each review phase (every sample); also the perplexity window",
    "lfr_drop_fraction": "lfr: fraction in [0, 1) of the recent samples' perplexities below which a sample "
                         "is dropped in focus phases",
    "lfr_mode": "lfr: skip (the sampler passes over the blocks whose last recorded perplexity is below the "
                "drop quantile and fills the batch with the next ones: a focus step is a dense step on harder "
                "data; the data loader runs without workers) or mask (every sample goes through the model, the "
                "dropped ones' tokens get no loss); see docs/selection.md",
    "eslm_granularity": "what --selection eslm or random keeps: token (tokens of every sequence, after the "
                        "forward) or sequence (whole sequences of the global batch, chosen before the training "
                        "forward: ESLM by a no-autograd scoring pass, random by a keyed draw; the others cost "
                        "nothing more; see docs/selection.md)",
    "eslm_scorer": "--eslm-granularity sequence: who scores the candidates: " + ", ".join(SEQUENCE_SCORERS)
                   + " (a smaller frozen model from --proxy-load, same tokenizer)",
    "proxy_load": "--eslm-scorer proxy: the proxy's checkpoint directory (our layout, same tokenizer, any size)",
    "lm_head_impl": "LM-head kernels: " + ", ".join(LM_HEAD_IMPLS) + " (auto: triton on CUDA, else torch)",
    "selection_warmup_iters": "train dense for the first N iterations, then with --selection (the policy is "
                              "not consulted before: Ada-ESLM's alpha, LFR's table and Rho-1's reference pass "
                              "start after them)",
}


def _validate_selection_family(s: SelectionConfig) -> None:
    """The flags of ada-eslm, eslm-kd, rho1 and lfr (docs/selection.md)."""
    if not 0.0 <= s.eslm_alpha_min <= s.eslm_alpha_max < 1.0:
        raise UserError(f"--eslm-alpha-min {s.eslm_alpha_min} and --eslm-alpha-max {s.eslm_alpha_max} must "
                        "satisfy 0 <= min <= max < 1")
    one_of(s.ada_eslm_rule, ADA_ESLM_RULES, "--ada-eslm-rule")
    if not 0.0 <= s.ada_eslm_budget <= 1.0:
        raise UserError(f"--ada-eslm-budget must be in [0, 1], got {s.ada_eslm_budget}")
    if not 0.0 <= s.ada_eslm_momentum < 1.0:
        raise UserError(f"--ada-eslm-momentum must be in [0, 1), got {s.ada_eslm_momentum}")
    if not 0.0 <= s.kd_alpha <= 1.0:
        raise UserError(f"--kd-alpha must be in [0, 1], got {s.kd_alpha}")
    positive(s.kd_temperature, "--kd-temperature")
    one_of(s.kd_score, KD_SCORES, "--kd-score")
    for path, flag, selection in ((s.teacher_load, "--teacher-load", "eslm-kd"),
                                  (s.reference_load, "--reference-load", "rho1")):
        if (path is None) != (s.selection != selection):
            raise UserError(f"--selection {selection} needs {flag}" if path is None
                            else f"{flag} is only read by --selection {selection}")
    if s.lfr_learn_iters < 0 or s.lfr_focus_iters < 0:
        raise UserError(f"--lfr-learn-iters and --lfr-focus-iters must be >= 0, got {s.lfr_learn_iters} "
                        f"and {s.lfr_focus_iters}")
    positive(s.lfr_review_iters, "--lfr-review-iters")
    if not 0.0 <= s.lfr_drop_fraction < 1.0:
        raise UserError(f"--lfr-drop-fraction must be in [0, 1), got {s.lfr_drop_fraction}")
    one_of(s.lfr_mode, LFR_MODES, "--lfr-mode")
    if s.selection == "lfr" and s.eslm_threshold_scope != "micro-batch":
        raise UserError("--eslm-threshold-scope previous-step is not read by --selection lfr (its quantile "
                        "is over a table of samples)")


def _validate_granularity(s: SelectionConfig) -> None:
    """--eslm-granularity and the sequence scorer's flags (docs/selection.md, "Sequence granularity")."""
    one_of(s.eslm_granularity, GRANULARITIES, "--eslm-granularity")
    one_of(s.eslm_scorer, SEQUENCE_SCORERS, "--eslm-scorer")
    sequence = s.eslm_granularity == "sequence"
    if sequence and s.selection not in ("eslm", "random"):
        raise UserError(f"--eslm-granularity sequence is read by --selection eslm and random only, not "
                        f"{s.selection}")
    if s.eslm_scorer == "proxy" and not (sequence and s.selection == "eslm"):
        raise UserError("--eslm-scorer proxy needs --selection eslm --eslm-granularity sequence")
    if (s.proxy_load is None) == (s.eslm_scorer == "proxy"):
        raise UserError("--eslm-scorer proxy needs --proxy-load" if s.proxy_load is None
                        else "--proxy-load is only read by --eslm-scorer proxy")


def validate_selection(s: SelectionConfig) -> None:
    if not 0.0 <= s.eslm_alpha < 1.0:
        raise UserError(f"--eslm-alpha must be in [0, 1), got {s.eslm_alpha}")
    one_of(s.selection, SELECTIONS, "--selection")
    one_of(s.eslm_score, SCORES, "--eslm-score")
    one_of(s.eslm_threshold, THRESHOLD_MODES, "--eslm-threshold")
    if s.eslm_sketch_size < 2:
        raise UserError(f"--eslm-sketch-size must be at least 2, got {s.eslm_sketch_size}")
    one_of(s.eslm_threshold_scope, THRESHOLD_SCOPES, "--eslm-threshold-scope")
    if not 0.0 < s.eslm_is_prob <= 1.0:
        raise UserError(f"--eslm-is-prob must be in (0, 1], got {s.eslm_is_prob}")
    _validate_selection_family(s)
    _validate_granularity(s)
    one_of(s.lm_head_impl, LM_HEAD_IMPLS, "--lm-head-impl")
    if s.selection_warmup_iters < 0:
        raise UserError(f"--selection-warmup-iters must be >= 0, got {s.selection_warmup_iters}")
    if s.selection_warmup_iters and s.selection == "none":
        raise UserError("--selection-warmup-iters needs a --selection other than none")
