"""Triton passes of the selective LM head: same functions, signatures and semantics as ``lm_head_torch``.

Design (why each pass looks the way it does):

* Pass 1 (``lm_head_scores``) is one kernel that computes logit tiles with ``tl.dot`` (looping over the
  hidden dimension) and folds them into online softmax statistics while sweeping the vocabulary; logits
  never reach memory. Each program writes four per-row *partials* for its vocabulary range (max, sum-exp,
  target logit, sum of exp-weighted shifted logits) and a few elementwise torch ops turn them into loss,
  lse and entropy. With few rows the vocabulary is split across programs so every SM has work; the same
  partials serve vocab-parallel (tensor-parallel) heads, see ``lm_head_partials`` / ``combine_partials``.
* Pass 2 (``lm_head_backward_rows``) walks the kept rows in chunks. Per chunk a Triton kernel recomputes
  the logit tiles of the kept rows and writes ``(softmax - onehot) * grad_scale`` into a bounded
  ``[chunk, V]`` buffer in the hidden dtype; then ``grad_hidden = d_logits @ W`` is a cuBLAS GEMM
  (torch.mm, fp32 accumulation inside) and ``grad_weight += d_logits.T @ hidden[rows]`` is a Triton
  kernel that gathers the kept rows itself and accumulates into the float32 weight gradient, so nothing is
  rounded to 16 bits between chunks. The grid only covers kept rows: dropped rows cost nothing. The
  weight gradient can go straight into an existing accumulator (``grad_weight_out``: the weight's
  ``.grad``), so a micro-batch allocates no [V, H] gradient of its own.
* Dense training (``lm_head_fused_dense``, every valid row trained on: nothing to select) runs in the
  forward, chunk by chunk over the rows: the pass-1 kernel also stores the chunk's logit tiles (score
  dtype) in a ``[chunk, V]`` buffer, and once the chunk's lse is known the pass-2 kernels turn that buffer
  into ``d_logits`` and the two gradient GEMMs, with the gradient scale of the mean loss assumed. Three
  logits-sized GEMMs instead of four: no recompute. The backward only rescales by the incoming gradient
  (``model/lm_head.py``). The buffer holds float32 logits, not 16-bit ones (as a 16-bit GEMM output
  would), so the gradient is the two-pass one's up to summation order; the price is that buffer (plus a
  16-bit ``d_logits`` one for 16-bit inputs), at least FUSED_MIN_ROWS rows on a GPU.

Precision: tiles are accumulated in the score dtype (float32, float64 for float64 inputs). Float32 dots
use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` allows it for torch matmuls.

Triton is imported on the first kernel launch, not with this module: the module imports (and can be
registered) without triton, and ``TRITON_INTERPRET=1`` (kernels run by triton's interpreter on CPU tensors)
only has to be set before triton itself is first imported.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from types import SimpleNamespace

import torch
from torch import Tensor

# Re-exported: the vocab-parallel statistics are part of this module's interface.
from megatron_eslm.kernels.lm_head_partials import (Partials, combine_partials, merge_partials,  # noqa: F401
                                                    rescale_partials)
from megatron_eslm.kernels.lm_head_torch import score_dtype, weight_grad_buffer

# Bytes of the [chunk, V] d_logits buffer of pass 2 (on CPU also of the fused pass's buffers). Large chunks
# matter on GPUs: every chunk re-reads and re-writes the [V, H] float32 weight gradient, which must stay
# small next to the chunk's GEMMs.
CHUNK_BYTES = {"cpu": 2**20}
DEFAULT_CHUNK_BYTES = 2**30
# Fewest rows a chunk of the fused dense pass holds on a GPU, for the same reason: the weight-gradient
# traffic of a chunk against its GEMMs shrinks with the row count alone (both scale with V * H).
FUSED_MIN_ROWS = 2048
PROGRAMS_PER_SM = 2  # pass 1 splits the vocabulary until this many programs per SM exist
MIN_SPLIT_COLUMNS = 4096  # ... but never into ranges narrower than this
# Autotune candidates (three block sizes, warps, stages) for Hopper: (rows, vocab, hidden) tiles of the
# logits GEMM and (vocab, hidden, rows) tiles of the weight-gradient GEMM. The last, small tile is there
# because its shared memory also fits float64 operands.
LOGIT_TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4),
               (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 32, 4, 2)]
GRAD_WEIGHT_TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                     (64, 128, 64, 4, 4), (64, 64, 32, 4, 2)]
INTERPRETER_TILE = (16, 16, 16, 1, 1)  # a single config: the interpreter then skips benchmarking
tl = None  # triton.language, bound by _kernels() on the first launch


def is_available() -> bool:
    """True when triton is installed and kernels can run: on CUDA, or on CPU through TRITON_INTERPRET=1."""
    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------- kernels

def _logits_tile(h_ptr, w_ptr, rows, row_mask, cols, col_mask, H, stride_h, stride_w,
                 ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """hidden[rows] @ weight[cols].T as a [BLOCK_N, BLOCK_V] tile in ACC; masked entries are 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for start in range(0, H, BLOCK_H):
        ks = start + tl.arange(0, BLOCK_H)
        k_mask = ks[None, :] < H
        h = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & k_mask, other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask, other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


def _partials_kernel(h_ptr, w_ptr, label_ptr, max_ptr, sumexp_ptr, target_ptr, shifted_ptr, logits_ptr,
                     N, V, H, split_width, stride_h, stride_w, stride_l, DOT_PRECISION: tl.constexpr,
                     STORE_LOGITS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (row blocks, vocab splits): Partials of BLOCK_N rows over columns [split * split_width, +width);
    with STORE_LOGITS also the logit tiles, into logits[N, V] (the fused dense pass's chunk buffer)."""
    acc_dtype = max_ptr.dtype.element_ty
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(label_ptr + rows, mask=row_mask, other=-1)
    v_start = split * split_width
    v_end = tl.minimum(v_start + split_width, V)
    # -1e30 is a finite "minus infinity": it keeps 0 * (-inf) = NaN out of the online rescaling.
    row_max = tl.full((BLOCK_N,), -1e30, acc_dtype)
    sumexp = tl.zeros((BLOCK_N,), acc_dtype)
    target = tl.zeros((BLOCK_N,), acc_dtype)
    sum_shifted = tl.zeros((BLOCK_N,), acc_dtype)
    for v in range(v_start, v_end, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        logits = _logits_tile(h_ptr, w_ptr, rows, row_mask, cols, col_mask, H, stride_h, stride_w,
                              acc_dtype, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        if STORE_LOGITS:
            tl.store(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :], logits,
                     mask=row_mask[:, None] & col_mask[None, :])
        logits = tl.where(col_mask[None, :], logits, -1e30)
        is_target = (cols[None, :] == labels[:, None]) & col_mask[None, :]
        target += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        max_shift = row_max - new_max  # <= 0; rescales what was accumulated against the old max
        alpha = tl.exp(max_shift)
        shifted = logits - new_max[:, None]
        exp = tl.exp(shifted)
        sum_shifted = alpha * (sum_shifted + max_shift * sumexp) + tl.sum(exp * shifted, axis=1)
        sumexp = alpha * sumexp + tl.sum(exp, axis=1)
        row_max = new_max
    out = split * N + rows
    tl.store(max_ptr + out, row_max, mask=row_mask)
    tl.store(sumexp_ptr + out, sumexp, mask=row_mask)
    tl.store(target_ptr + out, target, mask=row_mask)
    tl.store(shifted_ptr + out, sum_shifted, mask=row_mask)


def _logit_grad_kernel(h_ptr, w_ptr, rows_ptr, label_ptr, lse_ptr, scale_ptr, logits_ptr, d_ptr, K, V, H,
                       stride_h, stride_w, stride_l, stride_d, DOT_PRECISION: tl.constexpr,
                       LOGITS_IN_MEMORY: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """d[k, v] = (softmax - onehot(label))[rows[k], v] * scale for K gathered rows; 1-D grid over tiles.

    The logits are recomputed, or with LOGITS_IN_MEMORY read from logits[k, v] (which d may overwrite in
    place: each program reads its tile before it writes it). Row blocks vary fastest, so programs running
    together share a weight tile through L2.
    """
    row_blocks = tl.cdiv(K, BLOCK_N)
    pid = tl.program_id(0)
    ks = (pid % row_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    rows = tl.load(rows_ptr + ks, mask=k_mask, other=0)
    labels = tl.load(label_ptr + rows, mask=k_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=k_mask, other=0.0)
    cols = (pid // row_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    if LOGITS_IN_MEMORY:
        logits = tl.load(logits_ptr + ks.to(tl.int64)[:, None] * stride_l + cols[None, :],
                         mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        logits = _logits_tile(h_ptr, w_ptr, rows, k_mask, cols, col_mask, H, stride_h, stride_w,
                              lse_ptr.dtype.element_ty, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    d = tl.exp(logits - lse[:, None]) - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    d = d * tl.load(scale_ptr)
    tl.store(d_ptr + ks.to(tl.int64)[:, None] * stride_d + cols[None, :], d.to(d_ptr.dtype.element_ty),
             mask=k_mask[:, None] & col_mask[None, :])


def _grad_weight_kernel(d_ptr, h_ptr, rows_ptr, gw_ptr, K, V, H, stride_d, stride_h, stride_gw,
                        DOT_PRECISION: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """gw[V, H] += d[K, V].T @ hidden[rows[K]] in gw's dtype; 1-D grid over (vocab, hidden) tiles."""
    h_blocks = tl.cdiv(H, BLOCK_H)
    pid = tl.program_id(0)
    cols = (pid // h_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
    hs = (pid % h_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < V
    h_mask = hs < H
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=gw_ptr.dtype.element_ty)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        rows = tl.load(rows_ptr + ks, mask=k_mask, other=0)
        d = tl.load(d_ptr + ks.to(tl.int64)[:, None] * stride_d + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + hs[None, :],
                    mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(d), h, acc, input_precision=DOT_PRECISION)
    out = gw_ptr + cols.to(tl.int64)[:, None] * stride_gw + hs[None, :]
    mask = col_mask[:, None] & h_mask[None, :]
    tl.store(out, tl.load(out, mask=mask) + acc, mask=mask)


@functools.cache
def _kernels() -> SimpleNamespace:
    """Import triton and decorate the kernels on first launch rather than at import.

    Importing this module (to register it, say) then needs no triton, and does not fix too early whether
    triton runs compiled or interpreted: triton decides that when it is imported, from TRITON_INTERPRET.
    """
    import triton
    import triton.language as tl

    # The kernel bodies above resolve these module globals when triton compiles or interprets them (after a
    # cache_clear, as a test's other interpreter tiles need, the decorated function is decorated afresh).
    globals().update(tl=tl, _logits_tile=triton.jit(getattr(_logits_tile, "fn", _logits_tile)))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"

    def tuned(kernel, names: tuple[str, str, str], tiles: list[tuple[int, ...]], switches: tuple[str, ...] = (),
              **kwargs):
        """Autotuned on the problem width (H, V) and the kernel's constexpr ``switches`` (a tile good for a
        GEMM is not one for a memory-bound variant), never on the row count, which changes every step."""
        configs = [triton.Config(dict(zip(names, tile[:3])), num_warps=tile[3], num_stages=tile[4])
                   for tile in ([INTERPRETER_TILE] if interpret else tiles)]
        return triton.autotune(configs, key=["H", "V", *switches], **kwargs)(triton.jit(kernel))

    logit_blocks = ("BLOCK_N", "BLOCK_V", "BLOCK_H")
    return SimpleNamespace(
        partials=tuned(_partials_kernel, logit_blocks, LOGIT_TILES, ("STORE_LOGITS",)),
        # restore_value: the fused pass writes d_logits over the logits it reads, and tuning runs it repeatedly.
        logit_grad=tuned(_logit_grad_kernel, logit_blocks, LOGIT_TILES, ("LOGITS_IN_MEMORY",),
                         restore_value=["logits_ptr"]),
        # restore_value: tuning runs the accumulating kernel several times on the real gradient.
        grad_weight=tuned(_grad_weight_kernel, ("BLOCK_V", "BLOCK_H", "BLOCK_K"), GRAD_WEIGHT_TILES,
                          restore_value=["gw_ptr"]))


# ------------------------------------------------------------------------------------------- host side

def _dot_precision(dtype: torch.dtype) -> str:
    """TF32 for float32 dots only where torch matmuls would use it too."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Row-major hidden and the weight cast to the hidden dtype (tl.dot needs one dtype); no copy when the
    head passes the weight already cast, as ``model/lm_head.py`` does."""
    return hidden.contiguous(), weight.to(hidden.dtype).contiguous()


def _vocab_splits(num_rows: int, vocab: int, device: torch.device) -> int:
    """How many vocabulary ranges pass 1 scores in separate programs, so that few rows still fill the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = _cdiv(PROGRAMS_PER_SM * sms, _cdiv(num_rows, 128))
    return max(1, min(wanted, vocab // MIN_SPLIT_COLUMNS))


def _split_partials(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, ignore_index: int,
                    logits_out: Tensor | None = None) -> Partials:
    """[S, N] Partials over S contiguous ranges of the shard ``weight`` (head rows vocab_start..); the logits
    also go to ``logits_out`` ([N, V], score dtype, unit column stride) when given."""
    (num_rows, hidden_size), vocab = hidden.shape, weight.shape[0]
    local_labels = torch.where(labels == ignore_index, -1, labels - vocab_start)  # -1 never matches a column
    width = _cdiv(vocab, _vocab_splits(num_rows, vocab, hidden.device))
    splits = _cdiv(vocab, width)
    partials = Partials(*(hidden.new_empty(splits, num_rows, dtype=score_dtype(hidden.dtype)) for _ in range(4)))
    if num_rows:
        grid = lambda meta: (_cdiv(num_rows, meta["BLOCK_N"]), splits)  # noqa: E731
        store = logits_out is not None
        logits = logits_out if store else partials.row_max  # a pointer the kernel never touches when not storing
        _kernels().partials[grid](hidden, weight, local_labels, *partials, logits, num_rows, vocab, hidden_size,
                               width, hidden.stride(0), weight.stride(0), logits.stride(0),
                               DOT_PRECISION=_dot_precision(hidden.dtype), STORE_LOGITS=store)
    return partials


@torch.no_grad()
def lm_head_partials(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int,
                     ignore_index: int = -100) -> Partials:
    """[N] Partials of ``hidden @ weight.T`` for a vocab shard: ``weight`` holds rows vocab_start.. of the head.

    Labels outside the shard (and ignored labels) contribute a target of 0, so summing ``target`` over the
    shards yields the label logit.
    """
    return merge_partials(_split_partials(*_operands(hidden, weight), labels, vocab_start, ignore_index))


@torch.no_grad()
def lm_head_scores(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                   chunk_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1: per-row (loss, lse, entropy) for all N rows; no logits are written to memory.

    Ignored rows get loss 0. ``chunk_rows`` is accepted for signature parity and unused: pass 1 needs no
    buffer.
    """
    partials = _split_partials(*_operands(hidden, weight), labels, 0, ignore_index)
    return combine_partials(partials, labels != ignore_index)


def _chunk_rows(num_rows: int, vocab: int, hidden: Tensor) -> int:
    """Rows per pass-2 chunk so that one [chunk, vocab] d_logits buffer fits the device's byte budget."""
    budget = CHUNK_BYTES.get(hidden.device.type, DEFAULT_CHUNK_BYTES)
    return max(1, min(num_rows, budget // (vocab * hidden.element_size())))


def _chunk_backward(hidden: Tensor, weight: Tensor, rows: Tensor, labels: Tensor, lse: Tensor, scale: Tensor,
                    d_logits: Tensor, grad_hidden_out: Tensor, grad_weight: Tensor, logits: Tensor | None = None
                    ) -> None:
    """One chunk of ``rows``: d_logits[:K] = (softmax - onehot) * scale, from ``logits`` [K, V] when given,
    else recomputed; grad_hidden_out = d_logits @ weight (cuBLAS, fp32 accumulation inside); grad_weight +=
    d_logits.T @ hidden[rows] (Triton, gathering the rows and accumulating in the score dtype)."""
    (size,), (vocab, hidden_size) = rows.shape, weight.shape
    d_logits = d_logits[:size]
    in_memory = logits is not None
    source = logits if in_memory else scale  # a pointer the kernel never touches when recomputing
    grid = lambda meta: (_cdiv(size, meta["BLOCK_N"]) * _cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
    precision = _dot_precision(hidden.dtype)
    _kernels().logit_grad[grid](hidden, weight, rows, labels, lse, scale, source, d_logits, size, vocab, hidden_size,
                             hidden.stride(0), weight.stride(0), source.stride(0) if in_memory else 0,
                             d_logits.stride(0), DOT_PRECISION=precision, LOGITS_IN_MEMORY=in_memory)
    torch.mm(d_logits, weight, out=grad_hidden_out)
    grid = lambda meta: (_cdiv(vocab, meta["BLOCK_V"]) * _cdiv(hidden_size, meta["BLOCK_H"]),)  # noqa: E731
    _kernels().grad_weight[grid](d_logits, hidden, rows, grad_weight, size, vocab, hidden_size, d_logits.stride(0),
                              hidden.stride(0), grad_weight.stride(0), DOT_PRECISION=precision)


@torch.no_grad()
def lm_head_backward_rows(hidden: Tensor, weight: Tensor, labels: Tensor, rows: Tensor, lse: Tensor,
                          grad_scale: float | Tensor, chunk_rows: int | None = None,
                          grad_weight_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pass 2: gradients of grad_scale * sum(loss[rows]) w.r.t. hidden[rows] and weight.

    ``rows`` must have valid labels. The weight gradient is added to ``grad_weight_out`` (score dtype, e.g.
    the weight's ``.grad``) or to fresh zeros. Returns (grad_hidden_rows [K, H] in hidden dtype,
    grad_weight [V, H] in the score dtype). Work and memory scale with K; the d_logits buffer holds
    ``chunk_rows`` rows.
    """
    grad_weight = weight_grad_buffer(weight, hidden, grad_weight_out)
    hidden, weight = _operands(hidden, weight)
    (num_kept,), (vocab, hidden_size) = rows.shape, weight.shape
    acc_dtype = score_dtype(hidden.dtype)
    chunk_rows = chunk_rows or _chunk_rows(num_kept, vocab, hidden)
    d_logits = hidden.new_empty(max(1, min(chunk_rows, num_kept)), vocab)
    scale = torch.as_tensor(grad_scale, dtype=acc_dtype, device=hidden.device).reshape(1)
    labels, lse = labels.contiguous(), lse.to(acc_dtype).contiguous()
    grad_hidden = hidden.new_empty(num_kept, hidden_size)
    for start in range(0, num_kept, chunk_rows):
        part = slice(start, start + chunk_rows)
        _chunk_backward(hidden, weight, rows[part].contiguous(), labels, lse, scale, d_logits, grad_hidden[part],
                        grad_weight)
    return grad_hidden, grad_weight


def _fused_chunk_rows(num_rows: int, weight: Tensor, hidden: Tensor) -> int:
    """Rows per chunk of the fused dense pass, whose buffers hold a chunk's score-dtype logits and, for
    16-bit inputs, its d_logits besides. On a GPU they may take the bytes of the [V, H] weight gradient the
    pass returns anyway (so at most double its own memory), but hold at least FUSED_MIN_ROWS rows."""
    vocab, hidden_size = weight.shape
    acc_size = torch.empty((), dtype=score_dtype(hidden.dtype)).element_size()
    row_bytes = vocab * (acc_size + (0 if score_dtype(hidden.dtype) == hidden.dtype else hidden.element_size()))
    budget = CHUNK_BYTES.get(hidden.device.type, max(FUSED_MIN_ROWS * row_bytes, vocab * hidden_size * acc_size))
    return max(1, min(num_rows, budget // row_bytes))


@torch.no_grad()
def lm_head_fused_dense(hidden: Tensor, weight: Tensor, labels: Tensor, grad_scale: float | Tensor,
                        ignore_index: int = -100, chunk_rows: int | None = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Scores and gradients of grad_scale * sum(valid losses) in one pass, for dense training (the same
    contract as ``lm_head_torch.lm_head_fused_dense``, its readable reference).

    Per chunk of rows: pass 1 with the logits kept in a [chunk, V] buffer, their lse, then pass 2's
    kernels reading that buffer instead of recomputing it. Ignored rows get zero gradient (their lse is
    taken as +inf, their label as no column). Returns (loss, lse, entropy, grad_hidden [N, H] hidden dtype,
    grad_weight [V, H] score dtype).
    """
    grad_weight = weight_grad_buffer(weight, hidden)
    hidden, weight = _operands(hidden, weight)
    num_rows, acc_dtype = hidden.shape[0], score_dtype(hidden.dtype)
    chunk_rows = chunk_rows or _fused_chunk_rows(num_rows, weight, hidden)
    logits = hidden.new_empty(max(1, min(chunk_rows, num_rows)), weight.shape[0], dtype=acc_dtype)
    d_logits = logits if acc_dtype == hidden.dtype else torch.empty_like(logits, dtype=hidden.dtype)
    valid = labels != ignore_index
    grad_labels = torch.where(valid, labels, -1)  # -1 never matches a column: no one-hot term
    scale = torch.as_tensor(grad_scale, dtype=acc_dtype, device=hidden.device).reshape(1)
    loss, lse, entropy = (hidden.new_empty(num_rows, dtype=acc_dtype) for _ in range(3))
    chunk_index = torch.arange(logits.shape[0], device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    for start in range(0, num_rows, chunk_rows):
        part = slice(start, start + chunk_rows)
        size = hidden[part].shape[0]
        partials = _split_partials(hidden[part], weight, labels[part], 0, ignore_index, logits_out=logits[:size])
        loss[part], lse[part], entropy[part] = combine_partials(partials, valid[part])
        grad_lse = lse[part].masked_fill(~valid[part], float("inf"))  # softmax 0: ignored rows get no gradient
        _chunk_backward(hidden[part], weight, chunk_index[:size], grad_labels[part], grad_lse, scale, d_logits,
                        grad_hidden[part], grad_weight, logits=logits[:size])
    return loss, lse, entropy, grad_hidden, grad_weight
