"""PyTorch passes of the chunked LM head: scores for every row, gradients for chosen rows only.

The full ``[N, V]`` logits matrix is never alive: each pass walks the rows in chunks and keeps at most
two ``[V, chunk]`` float buffers. A Triton module (``lm_head_triton.py``) implements the same pure functions
with the same signatures (``lm_head_partials`` serves vocab-parallel heads).

Layout: a chunk's logits are held vocab-major, ``[V, C] = weight @ hidden_rows.T``, and the softmax
reduces over dim 0. On CPU (MKL) that GEMM ran ~25% faster than ``hidden_rows @ weight.T``, which
outweighs the slightly slower column reductions (pass 1 ~20% faster overall at V=16k, H=512).

Precision: the GEMMs read the weight rounded to the hidden dtype and sum their products in the "score
dtype" (float32 for 16-bit inputs, float64 for float64 inputs), which also holds the logits, the softmax
statistics and the weight gradient: the Triton kernels' precision, so that both heads score alike and
keep the same tokens (a 16-bit GEMM output would round every logit to 8 bits of mantissa first). cuBLAS
writes float32 from 16-bit operands directly; torch's CPU GEMMs cannot, so on CPU the 16-bit values are
multiplied in float32 (exact products, float32 sums), at the cost of one float32 copy of the weight per
pass. The hidden gradient is in the hidden dtype.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from megatron_eslm.kernels.lm_head_partials import Partials

# Bytes of one [V, chunk] score buffer: large enough for efficient GEMMs (on CPU, 1024-row chunks ran
# ~25% faster than 256-row ones at V=16k), small enough to bound memory regardless of N.
CHUNK_BYTES = 64 * 2**20

# consume_chunk(rows, exp [V, C], sumexp [C]) in the scoring pass; may overwrite exp.
ChunkConsumer = Callable[[slice, Tensor, Tensor], None]


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the softmax statistics and weight gradient are accumulated in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def weight_grad_buffer(weight: Tensor, hidden: Tensor, grad_weight_out: Tensor | None = None) -> Tensor:
    """Where a pass adds the weight gradient: ``grad_weight_out``, checked, or fresh zeros (score dtype)."""
    shape, dtype = weight.shape, score_dtype(hidden.dtype)
    if grad_weight_out is None:
        return torch.zeros(shape, dtype=dtype, device=weight.device)
    if grad_weight_out.shape != shape or grad_weight_out.dtype != dtype or grad_weight_out.stride(-1) != 1:
        raise ValueError(f"grad_weight_out must be a {dtype} {tuple(shape)} tensor with unit column stride, "
                         f"got {grad_weight_out.dtype} {tuple(grad_weight_out.shape)} {grad_weight_out.stride()}")
    return grad_weight_out


def default_chunk_rows(num_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one [vocab, chunk] score buffer stays within CHUNK_BYTES."""
    itemsize = torch.empty((), dtype=score_dtype(dtype)).element_size()
    return max(1, min(num_rows, CHUNK_BYTES // (vocab * itemsize)))


def _chunks(num_rows: int, chunk_rows: int) -> Iterator[slice]:
    """Row slices of at most chunk_rows rows covering range(num_rows)."""
    return (slice(start, min(start + chunk_rows, num_rows)) for start in range(0, num_rows, chunk_rows))


def _buffers(hidden: Tensor, num_rows: int, vocab: int, chunk_rows: int | None, count: int
             ) -> tuple[int, list[Tensor]]:
    """Resolve the chunk size for num_rows rows and allocate ``count`` flat [vocab * chunk] buffers.

    The buffers are reused by every chunk (a fresh allocation per chunk would page-fault on CPU); they
    are flat so that a ragged last chunk still gets a contiguous [vocab, rows] view.
    """
    chunk_rows = chunk_rows or default_chunk_rows(num_rows, vocab, hidden.dtype)
    numel = vocab * max(1, min(chunk_rows, num_rows))
    return chunk_rows, [hidden.new_empty(numel, dtype=score_dtype(hidden.dtype)) for _ in range(count)]


def _view(buffer: Tensor, vocab: int, rows: int) -> Tensor:
    return buffer[: vocab * rows].view(vocab, rows)


def _operand_dtype(hidden: Tensor) -> torch.dtype:
    """Dtype the GEMMs read: the hidden dtype, but float32 for 16-bit inputs on CPU (see the module doc)."""
    return score_dtype(hidden.dtype) if hidden.device.type == "cpu" else hidden.dtype


def _gemm_weight(weight: Tensor, hidden: Tensor) -> Tensor:
    """The weight as the GEMMs read it: rounded to the hidden dtype, held in the operand dtype (no copy
    when the head passes it already cast, as ``model/lm_head.py`` does)."""
    return weight.to(hidden.dtype).to(_operand_dtype(hidden))


def _matmul_into(a: Tensor, b: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
    """``out = a @ b`` (``accumulate``: ``out += a @ b``) with the products summed in ``out``'s dtype when
    that is wider than the operands' (float32 from bf16 on CUDA), rounded to it when narrower (CPU's
    float32 operands into a bf16 hidden gradient)."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if a.is_cuda:  # 16-bit operands, float32 out: cuBLAS's fp32-output GEMM, no 16-bit intermediate
        if accumulate:  # addmm's dtype overload needs a 16-bit input matrix; baddbmm's accepts ``out``
            torch.baddbmm(out[None], a[None], b[None], out_dtype=out.dtype, out=out[None])
            return out
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    return out.add_(a @ b) if accumulate else out.copy_(a @ b)


def _logits_into(hidden_rows: Tensor, weight: Tensor, buffer: Tensor) -> Tensor:
    """Vocab-major logits ``weight @ hidden_rows.T`` [V, C] in the score dtype, in ``buffer``; ``weight``
    is the GEMM weight (``_gemm_weight``)."""
    out = _view(buffer, weight.shape[0], hidden_rows.shape[0])
    return _matmul_into(weight, hidden_rows.to(weight.dtype).t(), out)


def _chunk_scores(logits: Tensor, labels: Tensor, exp_buffer: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Softmax statistics of one [V, C] chunk: returns (lse, loss, entropy, exp, sumexp).

    Consumes ``logits`` (overwritten) and leaves the unnormalised ``exp = exp(logits - max)`` in
    ``exp_buffer`` so the fused path can turn it into the logit gradient without recomputing it.
    """
    col_max = logits.amax(dim=0, keepdim=True)
    shifted = logits.sub_(col_max)
    exp = torch.exp(shifted, out=_view(exp_buffer, *shifted.shape))
    sumexp = exp.sum(dim=0)
    log_z = sumexp.log()
    label_logit = shifted.gather(0, labels.unsqueeze(0)).squeeze(0)
    mean_shifted = shifted.mul_(exp).sum(dim=0).div_(sumexp)  # E_p[shifted logits]
    return col_max.squeeze(0) + log_z, log_z - label_logit, log_z - mean_shifted, exp, sumexp


def _logit_grad_(scaled_probs: Tensor, labels: Tensor, col_scale: Tensor) -> Tensor:
    """In place: columns holding softmax * scale become (softmax - onehot(label)) * scale = dL/dlogits."""
    return scaled_probs.scatter_add_(0, labels.unsqueeze(0), col_scale.neg().unsqueeze(0))


def _accumulate_grads(d_logits: Tensor, hidden_rows: Tensor, weight: Tensor, grad_hidden_out: Tensor,
                      grad_weight: Tensor) -> None:
    """From [V, C] d_logits: grad_hidden_out = d.T @ weight; grad_weight += d @ hidden_rows. ``weight`` is
    the GEMM weight; d_logits enters the GEMMs in its dtype (rounded to 16 bits on CUDA, as in Triton's)."""
    d_logits = d_logits.to(weight.dtype)
    _matmul_into(d_logits.t(), weight, grad_hidden_out)
    _matmul_into(d_logits, hidden_rows.to(weight.dtype), grad_weight, accumulate=True)


def _safe_labels(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(valid mask, labels with ignored entries replaced by 0) so gathers never index out of range."""
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, 0)


def _scores_pass(hidden: Tensor, compute_weight: Tensor, labels: Tensor, ignore_index: int,
                 chunk_rows: int | None, consume_chunk: ChunkConsumer | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1 over all rows with the GEMM weight, handing each chunk's exp to ``consume_chunk`` before its
    buffer is reused."""
    valid, safe = _safe_labels(labels, ignore_index)
    vocab = compute_weight.shape[0]
    chunk_rows, (logits_buf, exp_buf) = _buffers(hidden, hidden.shape[0], vocab, chunk_rows, 2)
    loss, lse, entropy = (hidden.new_empty(hidden.shape[0], dtype=logits_buf.dtype) for _ in range(3))
    for rows in _chunks(hidden.shape[0], chunk_rows):
        logits = _logits_into(hidden[rows], compute_weight, logits_buf)
        lse[rows], loss[rows], entropy[rows], exp, sumexp = _chunk_scores(logits, safe[rows], exp_buf)
        if consume_chunk is not None:
            consume_chunk(rows, exp, sumexp)
    return loss.masked_fill_(~valid, 0.0), lse, entropy


@torch.no_grad()
def lm_head_scores(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                   chunk_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1: per-row (loss, lse, entropy) for all N rows, one chunk of logits alive at a time.

    Ignored rows get loss 0; their lse and entropy are still computed (they are cheap and harmless).
    """
    return _scores_pass(hidden, _gemm_weight(weight, hidden), labels, ignore_index, chunk_rows)


def _chunk_partials(logits: Tensor, labels: Tensor, in_shard: Tensor, exp_buffer: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Partials (row_max, sumexp, target, sum_shifted) of one [V, C] chunk; consumes ``logits``."""
    col_max = logits.amax(dim=0, keepdim=True)
    target = logits.gather(0, labels.unsqueeze(0)).squeeze(0).masked_fill_(~in_shard, 0.0)
    shifted = logits.sub_(col_max)
    exp = torch.exp(shifted, out=_view(exp_buffer, *shifted.shape))
    return col_max.squeeze(0), exp.sum(dim=0), target, shifted.mul_(exp).sum(dim=0)


@torch.no_grad()
def lm_head_partials(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, ignore_index: int = -100,
                     chunk_rows: int | None = None) -> Partials:
    """[N] Partials of ``hidden @ weight.T`` for a vocab shard (``weight`` holds head rows vocab_start..),
    the statistics a vocab-parallel head all-reduces. Labels outside the shard, and ignored ones, give a
    target of 0, so summing ``target`` over the shards yields the label logit."""
    compute_weight = _gemm_weight(weight, hidden)
    local = labels - vocab_start
    in_shard = (labels != ignore_index) & (local >= 0) & (local < weight.shape[0])
    safe = torch.where(in_shard, local, 0)
    chunk_rows, (logits_buf, exp_buf) = _buffers(hidden, hidden.shape[0], weight.shape[0], chunk_rows, 2)
    partials = Partials(*(hidden.new_empty(hidden.shape[0], dtype=logits_buf.dtype) for _ in range(4)))
    for rows in _chunks(hidden.shape[0], chunk_rows):
        logits = _logits_into(hidden[rows], compute_weight, logits_buf)
        for field, value in zip(partials, _chunk_partials(logits, safe[rows], in_shard[rows], exp_buf)):
            field[rows] = value
    return partials


@torch.no_grad()
def lm_head_backward_rows(hidden: Tensor, weight: Tensor, labels: Tensor, rows: Tensor, lse: Tensor,
                          grad_scale: float | Tensor, chunk_rows: int | None = None,
                          grad_weight_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pass 2: gradients of grad_scale * sum(loss[rows]) w.r.t. hidden[rows] and weight.

    Only the K selected rows are recomputed, so the cost scales with the kept fraction. ``rows`` must
    have valid labels; a label outside [0, V) (a vocab-parallel shard's row whose label another shard
    holds, with ``lse`` over the whole vocabulary) gets no one-hot term. The weight gradient is added to
    ``grad_weight_out`` (score dtype, e.g. the weight's ``.grad``: no [V, H] allocation) or to fresh zeros.
    Returns (grad_hidden_rows [K, H] in hidden dtype, grad_weight [V, H] score dtype).
    """
    compute_weight = _gemm_weight(weight, hidden)
    chunk_rows, (logits_buf,) = _buffers(hidden, rows.shape[0], weight.shape[0], chunk_rows, 1)
    scale = torch.as_tensor(grad_scale, dtype=logits_buf.dtype, device=hidden.device)
    grad_hidden = hidden.new_empty(rows.shape[0], hidden.shape[1])
    grad_weight = weight_grad_buffer(weight, hidden, grad_weight_out)
    for part in _chunks(rows.shape[0], chunk_rows):
        index = rows[part]
        hidden_rows = hidden.index_select(0, index).to(compute_weight.dtype)
        probs = _logits_into(hidden_rows, compute_weight, logits_buf).sub_(lse[index].unsqueeze(0)).exp_()
        row_labels = labels[index]
        in_vocab = (row_labels >= 0) & (row_labels < weight.shape[0])
        d_logits = _logit_grad_(probs.mul_(scale), row_labels.clamp(0, weight.shape[0] - 1), scale * in_vocab)
        _accumulate_grads(d_logits, hidden_rows, compute_weight, grad_hidden[part], grad_weight)
    return grad_hidden, grad_weight


@torch.no_grad()
def lm_head_fused_dense(hidden: Tensor, weight: Tensor, labels: Tensor, grad_scale: float | Tensor,
                        ignore_index: int = -100, chunk_rows: int | None = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Scores and gradients of grad_scale * sum(valid losses) in one pass, for dense training.

    When every valid row is trained on there is nothing to select, so each chunk's softmax is turned
    into gradients right after its scores, with no recompute. Ignored rows get zero gradient.
    Returns (loss, lse, entropy, grad_hidden [N, H] hidden dtype, grad_weight [V, H] score dtype).
    """
    compute_weight = _gemm_weight(weight, hidden)
    valid, safe = _safe_labels(labels, ignore_index)
    accum_dtype = score_dtype(hidden.dtype)
    row_scales = valid.to(accum_dtype).mul_(torch.as_tensor(grad_scale, dtype=accum_dtype, device=hidden.device))
    grad_hidden = torch.empty_like(hidden)
    grad_weight = weight_grad_buffer(weight, hidden)

    def to_grads(rows: slice, exp: Tensor, sumexp: Tensor) -> None:
        row_scale = row_scales[rows]
        d_logits = _logit_grad_(exp.mul_((row_scale / sumexp).unsqueeze(0)), safe[rows], row_scale)
        _accumulate_grads(d_logits, hidden[rows], compute_weight, grad_hidden[rows], grad_weight)

    scores = _scores_pass(hidden, compute_weight, labels, ignore_index, chunk_rows, to_grads)
    return (*scores, grad_hidden, grad_weight)
