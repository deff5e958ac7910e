"""Vectorized torch implementation of SQuant weight quantization (docs/algorithm.md sections 1-4).

``quantize_torch`` runs on the device the weight lives on (CPU or CUDA) and
gives the same integer codes as the scalar reference, priority ties and
``.5`` roundings included.  No Python loop runs over kernels or channels:
each CASE level handles all of its groups at once.  (The CPU strategy loops
over *ranks*: the first few of the kernel level, at most ``ceil(K/2) + 1``,
and the first ``max t`` of a channel level ranked by element priorities.)

Exact tie rule
--------------
Priorities are non-negative float32, so their int32 bit patterns order like
the floats.  A group's order (priority descending, lower position first on
ties) is the descending order of the unique int64 keys
``bits << 32 | (len - 1 - position)`` (``sort``/``topk`` on those), the
result of repeated ``argmax`` over the int32 bits, because ``argmax``
returns the *first* maximal index (documented), or a stable descending
``sort`` of the int32 bits.

Flip tables without tables
--------------------------
Up and down candidates are exclusive (``e < 0`` vs ``e > 0``), so one
float32 array ``P`` -- ``e`` where the element is a candidate of either
table, else 0 -- holds both priorities (up: ``-P`` where ``P < 0``, down:
``P`` where ``P > 0``).  Flipping in direction ``sigma`` (+1 up, -1 down)
gives the table value ``rne(x) + sigma * cand`` and error
``cand * (P + sigma)`` with ``cand = [sigma * P < 0]``, non-candidates
included (value unchanged, error 0).

Fixed-point CASE sums
---------------------
``S`` is summed in fixed point (docs/algorithm.md section 8, Rust ``sum.rs``): each term is
``rne(e * 2^F)``, added exactly as int64, so every backend, device and
thread count gets the same ``S``.

Two strategies, identical results
---------------------------------
* CPU (``on_cpu=True``): work is proportional to the elements touched.  The
  kernel level ranks by repeated ``argmax`` (``sort``/``topk`` over millions
  of 9-element rows is slow on CPU), flips are computed on gathered entries
  and scattered back, the channel totals after the kernel level are the
  kernel totals plus the change of the flipped terms, and the channel level
  after K ranks only the ``IC`` carries plus the first ``t`` positions (the
  zero-priority fill) instead of the whole channel.  Channels ranked by
  their element priorities (K skipped) use a tournament over chunks when
  that beats ``topk`` (~10 ns per element on CPU whatever ``k``).
* CUDA (``on_cpu=False``): as few kernel launches as possible and one host
  sync per weight, which reads the flip counts and the suspect-channel count
  (``check``) together -- dense full-tensor updates, one segmented ``sort``
  for the kernels, one per channel level: of the elements when the kernel
  level was skipped, else of the ``IC`` carries, the rest of the order
  being every other position ascending (a running count).

Both run on any device; the tests run both on CPU against a loop oracle.

Batches
-------
Every step is per output channel (or per kernel of one), so weights with
the same trailing shape ``(IC, *kernel)`` concatenated along dim 0 are
quantized exactly as one by one: ``quantize_torch_segments`` runs such a
concatenation in one pass -- the launches of one weight, one host sync --
with the levels counting flips per channel (a row sum instead of a full
sum) and the host summing them per weight.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

__all__ = ["Launched", "launch", "quantize_torch", "quantize_torch_segments", "settle"]

_MAX_FRAC_BITS = 40
_FIXED_TOTAL_BITS = 62
_LITTLE_ENDIAN = sys.byteorder == "little"
# Kernel groups longer than this are ranked with int64 keys + topk on CPU
# instead of repeated argmax, and with topk instead of a full sort on CUDA.
_SMALL_KERNEL = 64
# CPU channel level with element priorities: tournament chunk length (<= 0:
# a power of two near sqrt(channel length)); force the tournament on (True)
# or off (False) instead of choosing by estimated cost (None).
_CHUNK = 0
_TOURNAMENT: bool | None = None
# Strategy for every device (tests, profiling): True the CPU one, False the
# CUDA one; None chooses by the weight's device.
_ON_CPU: bool | None = None


def _frac_bits(length: int) -> int:
    """Fractional bits of the fixed-point sum of a group of ``length`` terms."""
    return min(_MAX_FRAC_BITS, _FIXED_TOTAL_BITS - (length - 1).bit_length())


def _fixed(e: torch.Tensor, frac: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rne(e * 2^frac)`` as an integer-valued float32 tensor.

    Scaling a float32 with ``|e| <= 1`` by a power of two is exact (a
    subnormal times 2^frac is still a multiple of 2^-149) and rounding a
    float32 to an integer is exact, so this equals the reference's
    ``rne(float64(e) * 2^frac)``; the value (at most 2^40) is exact in
    float32 too.
    """
    scale = float(2.0**frac)
    v = e * scale if out is None else torch.mul(e, scale, out=out)
    return v.round_()


def _group_totals(e: torch.Tensor, frac: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int64 fixed-point totals over the last dimension of ``e``."""
    return _fixed(e, frac, out).long().sum(dim=-1)


def _decide(total: torch.Tensor, frac: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/algorithm.md section 3 from the exact fixed-point total: ``(up, t, over)``.

    ``up``: S < 0 (S == 0 goes down); ``t``: rne(|S| as float32) as int64;
    ``over``: t >= |S|.  t never exceeds the group length: every |e| <= 1
    (<= 0.5 before any flip), so |S| <= length.
    """
    up, a, t = _abs_sum(total, frac)
    over = t >= a
    return up, t.long(), over


def _decide_channel(total: torch.Tensor, frac: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_decide`` without ``over`` (the channel level leaves no carry)."""
    up, _, t = _abs_sum(total, frac)
    return up, t.long()


def _abs_sum(total: torch.Tensor, frac: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S < 0, |S| as float32, rne of it)`` from the fixed-point total."""
    s = total.double().mul_(float(2.0**-frac))
    up = s < 0
    a = s.abs_().float()
    return up, a, torch.round(a)


# Dense strategy: int64 totals below this convert to float32 with one
# rounding, as through float64 (exact there); t stays float32, compared with
# int64 ranks and counts, while the group is shorter than _FLOAT_T_LIMIT.
_EXACT_TOTAL_LIMIT = 1 << 53
_FLOAT_T_LIMIT = 1 << 24


def _decide_dense(
    total: torch.Tensor, frac: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(up, |S| as float32, t)`` in few launches (see ``_decide``).

    ``|total| <= length * 2^frac`` (every |e| <= 1).  ``t`` is float32
    (int64 for groups of ``_FLOAT_T_LIMIT`` elements or more).
    """
    up = total < 0
    if length << frac < _EXACT_TOTAL_LIMIT:
        a = total.abs().float().mul_(float(2.0**-frac))
    else:
        a = total.double().mul_(float(2.0**-frac)).abs_().float()
    t = torch.round(a)
    return up, a, t if length < _FLOAT_T_LIMIT else t.long()


def _neg_sigma(up: torch.Tensor) -> torch.Tensor:
    """-1.0 where ``up``, +1.0 elsewhere, as an ``(N, 1)`` column (two
    launches on CUDA; ``where`` with two scalars takes three)."""
    return torch.pow(-1.0, up).unsqueeze(1)


def _sigma(up: torch.Tensor) -> torch.Tensor:
    """+1.0 where ``up``, -1.0 elsewhere (one launch)."""
    return torch.where(up, 1.0, -1.0)


def _sigma_arith(up: torch.Tensor) -> torch.Tensor:
    """``_sigma`` without ``where`` (which is slow on CPU)."""
    return up.float().mul_(2.0).sub_(1.0)


def _keys(hi: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys ``hi << 32 | rev`` for non-negative int32 ``hi``
    and ``rev``; ``rev`` broadcasts against ``hi``."""
    if _LITTLE_ENDIAN or hi.device.type != "cpu":
        # One pass: the int32 pair (low word rev, high word hi) is the key.
        pair = torch.stack([rev.expand_as(hi), hi], dim=-1)
        return pair.view(torch.int64).squeeze(-1)
    return (hi.long() << 32) | rev.long()  # pragma: no cover (big-endian host)


def _rev(length: int, device: torch.device) -> torch.Tensor:
    """``length - 1 - position`` as int32."""
    return torch.arange(length - 1, -1, -1, dtype=torch.int32, device=device)


def quantize_torch(
    w: torch.Tensor,
    bits: int,
    mode: str,
    *,
    check: Callable[[], None] | None = None,
    quantizer: str = "asymmetric",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """SQuant-quantize ``w`` on its device (docs/algorithm.md sections 1-4;
    with ``quantizer="symmetric"`` the symmetric quantizer instead of
    section 1's).

    ``w`` must already be validated (non-empty, ``ndim >= 2``, bits in 2..8,
    a known mode).  It is read as float32 and viewed as ``(OC, IC, K)``.
    Returns ``(codes, scale, zero_point, k_changed, c_changed)``: int8 codes
    of ``w.shape`` on ``w.device``, docs/algorithm.md's ``s`` and ``z`` as float32
    ``(OC,)``, and the numbers of elements whose code the kernel and the
    channel level changed.

    ``check`` is called when some channel's quantizer may not be finite (a
    NaN or infinity in the channel, or ``s``, ``s * mn``, ``s * mx`` or ``z``
    overflowing float32): it should raise the error that describes it.  If
    it returns (or is None) the results are returned as computed -- for a
    channel that really is non-finite they mean nothing.  On CUDA the test
    shares the one host sync that reads the flip counts.
    """
    return _quantize(w, bits, mode, on_cpu=_strategy_on_cpu(w), check=check, quantizer=quantizer)


def quantize_torch_segments(
    w: torch.Tensor,
    bits: int,
    mode: str,
    segments: Sequence[int],
    *,
    check: Callable[[], None] | None = None,
    quantizer: str = "asymmetric",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """``quantize_torch`` for several weights concatenated along dim 0.

    Every step works per output channel, so the rows of the concatenation
    are quantized exactly as in their own weight.  ``segments`` lists the
    rows of each weight (they must add up to ``w.shape[0]``); the flip
    counts come back per segment -- what ``quantize_torch`` reports for that
    weight alone -- read with the same single host sync.  ``check`` is
    called when a channel of any segment is suspect.
    """
    return _quantize_segments(
        w, bits, mode, segments, on_cpu=_strategy_on_cpu(w), check=check, quantizer=quantizer
    )


def _strategy_on_cpu(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" if _ON_CPU is None else _ON_CPU


def _quantize(
    w: torch.Tensor,
    bits: int,
    mode: str,
    *,
    on_cpu: bool,
    check: Callable[[], None] | None = None,
    quantizer: str = "asymmetric",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """``quantize_torch`` with the strategy chosen explicitly (see module doc)."""
    codes, s, z, kc, cc = _run(w, bits, mode, None, on_cpu=on_cpu, check=check, quantizer=quantizer)
    return codes, s, z, kc[0], cc[0]


def _quantize_segments(
    w: torch.Tensor,
    bits: int,
    mode: str,
    segments: Sequence[int],
    *,
    on_cpu: bool,
    check: Callable[[], None] | None = None,
    quantizer: str = "asymmetric",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """``quantize_torch_segments`` with the strategy chosen explicitly."""
    sizes = [int(n) for n in segments]
    if not sizes or min(sizes) < 1 or sum(sizes) != int(w.shape[0]):
        raise ValueError(
            f"segments {sizes} must be positive row counts adding up to {int(w.shape[0])}"
        )
    return _run(w, bits, mode, sizes, on_cpu=on_cpu, check=check, quantizer=quantizer)


def _run(
    w: torch.Tensor,
    bits: int,
    mode: str,
    segments: list[int] | None,
    *,
    on_cpu: bool,
    check: Callable[[], None] | None,
    quantizer: str = "asymmetric",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """The quantizer; flip counts per segment (None: one, the whole weight).

    With segments the levels count flips per channel, and the host sums
    each segment's channels after the one sync; otherwise they count one
    total each.  The same kernels run either way (a row sum instead of a
    full sum).
    """
    run = _launch(w, bits, mode, segments, on_cpu=on_cpu, check=check, quantizer=quantizer)
    ((k_changed, c_changed, suspect),) = settle([run])
    if suspect and check is not None:
        check()
    return run.codes, run.s, run.z, k_changed, c_changed


class Launched:
    """A pass whose kernels are queued: its outputs (valid once the queue
    runs) and the device-side counts still to be read by :func:`settle`."""

    def __init__(
        self,
        codes: torch.Tensor,
        s: torch.Tensor,
        z: torch.Tensor,
        counts: list[torch.Tensor],
        bad: torch.Tensor | None,
        run_k: bool,
        run_c: bool,
        segments: list[int] | None,
    ) -> None:
        self.codes, self.s, self.z = codes, s, z
        self.counts, self.bad = counts, bad
        self.run_k, self.run_c = run_k, run_c
        self.segments = segments

    def parts(self) -> list[torch.Tensor]:
        """What the host must read, as 1-D int64 tensors."""
        parts = [c.reshape(-1).to(torch.int64) for c in self.counts]
        if self.bad is not None:
            parts.append(self.bad.reshape(1).to(torch.int64))
        return parts

    def read(self, host: np.ndarray) -> tuple[list[int], list[int], bool]:
        """Per-segment K and C flip counts and the suspect flag, from this
        pass's slice of the host copy of :meth:`parts`."""
        suspect = False
        if self.bad is not None:
            suspect = int(host[-1]) > 0
            host = host[:-1]
        values: list[list[int]] = []
        if self.counts:
            if self.segments is None:
                values = [[int(v)] for v in host]
            else:
                oc = sum(self.segments)
                starts = np.cumsum([0, *self.segments[:-1]])
                rows = host.reshape(len(self.counts), oc)
                values = np.add.reduceat(rows, starts, axis=1).tolist()
        zeros = [0] * (1 if self.segments is None else len(self.segments))
        k_changed = values[0] if self.run_k else zeros
        c_changed = values[-1] if self.run_c else zeros
        return k_changed, c_changed, suspect


def settle(runs: list[Launched]) -> list[tuple[list[int], list[int], bool]]:
    """Read the counts of several queued passes with one host copy per
    device (the only host syncs), in order."""
    parts = [r.parts() for r in runs]
    sizes = [sum(int(p.numel()) for p in ps) for ps in parts]
    host: dict[torch.device, np.ndarray] = {}
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for r, ps in zip(runs, parts):
        by_device.setdefault(r.codes.device, []).extend(ps)
    for device, ts in by_device.items():
        host[device] = torch.cat(ts).cpu().numpy() if ts else np.zeros(0, np.int64)
    offset = dict.fromkeys(host, 0)
    out = []
    for r, n in zip(runs, sizes):
        d = r.codes.device
        out.append(r.read(host[d][offset[d] : offset[d] + n]))
        offset[d] += n
    return out


def launch(
    w: torch.Tensor,
    bits: int,
    mode: str,
    segments: Sequence[int] | None,
    *,
    check: Callable[[], None] | None = None,
    quantizer: str = "asymmetric",
) -> Launched:
    """Queue the quantization of ``w`` (segments: rows per weight of a
    concatenation, or None) without reading anything back; :func:`settle`
    reads the flip counts and the suspect flag of many such passes at once,
    and the caller calls ``check`` for a suspect pass.  (The CPU strategy
    calls ``check`` itself, before its levels.)"""
    sizes = None if segments is None else [int(n) for n in segments]
    return _launch(
        w, bits, mode, sizes, on_cpu=_strategy_on_cpu(w), check=check, quantizer=quantizer
    )


def _launch(
    w: torch.Tensor,
    bits: int,
    mode: str,
    segments: list[int] | None,
    *,
    on_cpu: bool,
    check: Callable[[], None] | None,
    quantizer: str = "asymmetric",
) -> Launched:
    """Everything of :func:`_run` up to its host sync."""
    oc, ic = int(w.shape[0]), int(w.shape[1])
    k = math.prod(int(d) for d in w.shape[2:])
    width = ic * k
    n = 2 ** (bits - 1)
    symmetric = quantizer == "symmetric"
    tmin, tmax = (1 - n if symmetric else -n), n - 1
    w2 = w.detach().to(torch.float32).reshape(oc, width)  # read only: may be w itself

    # --- docs/algorithm.md section 1: per-channel quantizer ---------------
    if on_cpu:  # aminmax over a dim is slow on CPU; one launch on CUDA
        mn, mx = w2.amin(dim=1), w2.amax(dim=1)
    else:
        mn, mx = torch.aminmax(w2, dim=1)
    # True division (not reciprocal * c): a CPU scalar dividend keeps it
    # one launch on CUDA.
    if symmetric:  # the symmetric quantizer: s = (n - 1) / max|w|, z = 0
        amax = torch.maximum(mx.abs(), mn.abs())
        s = torch.div(torch.tensor(float(n - 1)), amax.clamp_min_(1e-8))
        z = torch.zeros_like(s)
    else:
        s = torch.div(torch.tensor(float(2**bits - 1)), (mx - mn).clamp_min_(1e-8))
        z = torch.round(s * mn).add_(float(n))
    bad: torch.Tensor | None = None  # CUDA: read with the flip counts
    if check is not None:
        suspect = _suspect_channels(s, z, n)
        if not on_cpu:
            bad = suspect
        elif int(suspect):
            # Before the levels: their host-side loop bounds come from the data.
            check()
    x = s.unsqueeze(1) * w2  # multiply, then subtract: two roundings
    x.sub_(z.unsqueeze(1))

    # --- docs/algorithm.md section 2: nearest rounding --------------------
    r = torch.round(x)
    run_k = k > 1 and mode in ("squant-k", "squant")
    run_c = mode in ("squant-c", "squant")
    counts: list[torch.Tensor] = []
    if run_k or run_c:
        e = r - x  # exact: |e| <= 0.5

        # --- docs/algorithm.md sections 3-4: the CASE levels ---------
        per_row = segments is not None
        levels: _SparseLevels | _DenseLevels
        if on_cpu:
            levels = _SparseLevels(x, r, e, tmin, tmax, per_row)
        else:
            levels = _DenseLevels(x, r, e, tmin, tmax, per_row)
        del x, e
        carry: _Carry | None = None
        if run_k:
            counts.append(levels.kernel_level(ic, k, run_c))
            carry = levels.carry
        if run_c:
            counts.append(levels.channel_level(ic, k, carry))
        r = levels.r
    codes = _codes(r, tmin, tmax, w.shape)
    return Launched(codes, s, z, counts, bad, run_k, run_c, segments)


def _suspect_channels(s: torch.Tensor, z: torch.Tensor, n: int) -> torch.Tensor:
    """Number of channels whose quantizer may not be finite (int64, 0-dim).

    Every grid value ``(q + z) / s`` (``q`` in ``[-n, n - 1]``) is at most
    ``(|z| + n) / s`` in magnitude, which is NaN when ``s`` is NaN (a NaN in
    the channel) or ``z`` is not finite, infinite when ``s`` is 0 (``mx -
    mn`` overflowed, infinities included) or when the grid's ends overflow
    float32 (weights near float32's limit; the bound may also be a false
    alarm there, which the caller's exact check clears).  ``v - v`` is then
    NaN, else 0.
    """
    v = z.abs().add_(float(n)).div_(s)
    return torch.count_nonzero(v.sub_(v))


def _codes(r: torch.Tensor, tmin: int, tmax: int, shape: torch.Size) -> torch.Tensor:
    """docs/algorithm.md section 4, step 4: clamp to ``[tmin, tmax]``, as
    int8 of the weight's shape."""
    return r.clamp_(tmin, tmax).to(torch.int8).reshape(shape)


class _Carry:
    """The kernel level's carries, one per kernel (docs/algorithm.md section 3).

    ``local``: position inside the kernel (G,) int64; ``pri``: priority (G,)
    float32; ``up``: True for the up table (G,); ``total``: the channel
    fixed-point totals after the kernel level (OC,) int64.
    """

    def __init__(
        self, local: torch.Tensor, pri: torch.Tensor, up: torch.Tensor, total: torch.Tensor
    ) -> None:
        self.local = local
        self.pri = pri
        self.up = up
        self.total = total


def _priorities(e: torch.Tensor, r: torch.Tensor, tmin: int, tmax: int, buf: torch.Tensor) -> None:
    """Turn ``e`` into ``P`` in place (``buf``: scratch of the same shape).

    ``P = clamp(e, lo, hi)``: lo = 0 where r >= tmax (no up flip), else -1;
    hi = 0 where r <= tmin (no down flip), else 1.  With |e| <= 0.5 and
    integral r these are docs/algorithm.md's "x < tmax" / "x > tmin" conditions.
    """
    torch.sub(r, tmax, out=buf).clamp_(-1.0, 0.0)
    e.clamp_(min=buf)
    torch.sub(r, tmin, out=buf).clamp_(0.0, 1.0)
    e.clamp_(max=buf)


class _SparseLevels:
    """CPU strategy: gathers, scatters, repeated argmax (see module doc).

    The levels return their flip counts as one total, or per output channel
    (``(OC,)``) when ``per_row``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        e: torch.Tensor,
        tmin: int,
        tmax: int,
        per_row: bool = False,
    ):
        self.x, self.r, self.e = x, r, e
        self.tmin, self.tmax = tmin, tmax
        self.per_row = per_row
        self.carry: _Carry | None = None

    def kernel_level(self, ic: int, k: int, want_carry: bool) -> torch.Tensor:
        x, r, e = self.x, self.r, self.e
        device = x.device
        oc = x.shape[0]
        g_count = oc * ic
        frac = _frac_bits(k)
        buf = torch.empty_like(e)
        total = _group_totals(e.view(g_count, k), frac, out=buf.view(g_count, k))
        _priorities(e, r, self.tmin, self.tmax, buf)
        p = e.view(g_count, k)
        up, t, over = _decide(total, frac)
        sigma = _sigma_arith(up)
        # |e| <= 0.5 gives |S| <= k/2, so t <= ceil(k/2) < k: a non-over
        # step always has its carry at rank t.
        need = t + (~over).long()
        kk = max(int(need.max()), 1)
        hi = buf.view(torch.int32).view(g_count, k)
        torch.mul(p, sigma.neg().unsqueeze(1), out=buf.view(g_count, k))
        hi.clamp_min_(0)  # dir's priority bits (-0.0 -> 0)

        # order[last] (for S == 0) before the ranking overwrites hi.
        zero = total == 0
        zero_rows = torch.nonzero(zero).squeeze(1) if bool(zero.any()) else None
        last = None if zero_rows is None else (k - 1) - hi[zero_rows].flip(1).argmin(dim=1)

        deep_rows: torch.Tensor | None = None
        deep_idx: torch.Tensor | None = None
        if k <= _SMALL_KERNEL:
            dense = min(kk, 2)
            idx = torch.empty((g_count, dense), dtype=torch.int64, device=device)
            for j in range(dense):
                a = hi.argmax(dim=1)
                idx[:, j] = a
                if j + 1 < kk:
                    hi.scatter_(1, a.unsqueeze(1), -1)
            if kk > dense:
                deep_rows = torch.nonzero(need > dense).squeeze(1)
                h = hi[deep_rows]
                deep_idx = torch.empty(
                    (deep_rows.numel(), kk - dense), dtype=torch.int64, device=device
                )
                for j in range(kk - dense):
                    a = h.argmax(dim=1)
                    deep_idx[:, j] = a
                    if j + 1 < kk - dense:
                        h.scatter_(1, a.unsqueeze(1), -1)
        else:
            idx = _keys(hi, _rev(k, device)).topk(kk, dim=1).indices
        del hi, buf

        frac_c = _frac_bits(ic * k)  # the corrections feed the channel level
        x2 = x.view(g_count, k)
        r2 = r.view(g_count, k)
        per_row = self.per_row
        blocks = [_KernelFlips(x2, r2, p, None, idx, 0, t, sigma, frac_c, per_row)]
        if deep_rows is not None and deep_idx is not None:
            blocks.append(
                _KernelFlips(
                    x2,
                    r2,
                    p,
                    deep_rows,
                    deep_idx,
                    idx.shape[1],
                    t[deep_rows],
                    sigma[deep_rows],
                    frac_c,
                    per_row,
                )
            )
        # Per kernel when per_row: summed per channel.
        changed = blocks[0].changed.view(oc, ic).sum(dim=1) if per_row else blocks[0].changed
        corr = blocks[0].corr
        for b in blocks[1:]:
            assert b.rows is not None
            if per_row:
                changed.index_add_(0, b.rows // ic, b.changed)
            else:
                changed = changed + b.changed
            corr.index_add_(0, b.rows, b.corr)
        if not want_carry:
            return changed

        # Carries (docs/algorithm.md section 3).  Over: c = order[t-1], already flipped, goes to
        # the opposite table with |its new e|; otherwise c = order[t] goes
        # to dir's table with its unflipped |e|.  S == 0: c = order[last].
        cj = t - over.long()
        local, flipped_e, e0 = blocks[0].at(cj)
        for b in blocks[1:]:
            assert b.rows is not None
            sub = cj[b.rows] - b.jstart
            hit = torch.nonzero(sub >= 0).squeeze(1)
            rows = b.rows[hit]
            local[rows], flipped_e[rows], e0[rows] = b.at(sub[hit], hit)
        if zero_rows is not None and last is not None:
            local[zero_rows] = last
            xz = x2[zero_rows].gather(1, last.unsqueeze(1)).squeeze(1)
            e0[zero_rows] = torch.round(xz) - xz
        flipped = (over & (t > 0)).float()
        carry_e = flipped_e.mul_(flipped).add_(e0.mul_(1.0 - flipped))
        if frac_c == frac:
            total_c = (total + corr).view(oc, ic).sum(dim=1)
        else:  # channels above 2^22 elements: fewer fractional bits
            e_full = torch.round(x).sub_(x)
            total_c = _group_totals(e_full, frac_c, out=e_full)
            total_c += corr.view(oc, ic).sum(dim=1)
        self.carry = _Carry(local, carry_e.abs_(), up ^ over, total_c)
        return changed

    def channel_level(self, ic: int, k: int, carry: _Carry | None) -> torch.Tensor:
        x, r, e = self.x, self.r, self.e
        device = x.device
        oc, width = x.shape
        frac = _frac_bits(width)
        if carry is None:
            buf = torch.empty_like(e)
            total = _group_totals(e, frac, out=buf)
            _priorities(e, r, self.tmin, self.tmax, buf)
            del buf
        else:
            total = carry.total
        up, t = _decide_channel(total, frac)
        t_max = int(t.max())
        if t_max == 0:
            return torch.zeros((oc,) if self.per_row else (), dtype=torch.int64, device=device)
        if carry is None:
            pos = _top_positions_elements(e, up, t_max)
        else:
            pos = _top_positions_after_k(carry, up, t_max, oc, ic, k)
        # Flip the first t[o] positions of each row (positions unique per row).
        kk = pos.shape[1]
        valid = torch.arange(kk, device=device).unsqueeze(0) < t.unsqueeze(1)
        sig = _sigma(up).unsqueeze(1)
        xg = x.gather(1, pos)
        cand = (e.gather(1, pos) * sig < 0).float()
        value = torch.round(xg).add_(sig * cand)
        current = r.gather(1, pos)
        value = torch.where(valid, value, current)
        r.scatter_(1, pos, value)
        if self.per_row:
            return torch.count_nonzero(value != current, dim=1)
        return torch.count_nonzero(value != current)


class _KernelFlips:
    """Flip the entries of one block of kernel ranks and keep what the
    carries need.

    Rows ``rows`` (None: all kernels) with rank positions ``idx`` (R, c) for
    ranks ``jstart .. jstart + c - 1``.  Entries with rank >= t are written
    back unchanged: the positions are unique and ``r`` is still the E-level
    code at every position a block touches.  ``changed`` counts the flips:
    one total, or per row (``(R,)``) when ``per_row``.
    """

    def __init__(
        self,
        x2: torch.Tensor,
        r2: torch.Tensor,
        p2: torch.Tensor,
        rows: torch.Tensor | None,
        idx: torch.Tensor,
        jstart: int,
        t: torch.Tensor,
        sigma: torch.Tensor,
        frac_c: int,
        per_row: bool = False,
    ) -> None:
        self.rows, self.idx, self.jstart = rows, idx, jstart
        device = x2.device
        if rows is None:
            xg, pg = x2.gather(1, idx), p2.gather(1, idx)
        else:
            xg, pg = x2[rows].gather(1, idx), p2[rows].gather(1, idx)
        sig = sigma.unsqueeze(1)
        cols = torch.arange(jstart, jstart + idx.shape[1], device=device, dtype=torch.float32)
        valid = (t.float().unsqueeze(1) - cols).clamp_(0.0, 1.0)  # rank < t
        cand = (pg * sig < 0).float()
        self.error = (pg + sig).mul_(cand)  # table error if flipped
        r0 = torch.round(xg)  # r is still the E-level code here
        self.e0 = r0 - xg  # E-level error
        step = cand.mul_(valid).mul_(sig)
        if rows is None:
            r2.scatter_(1, idx, r0.add_(step))
        else:
            k = r2.shape[1]
            r2.view(-1)[(rows.unsqueeze(1) * k + idx).view(-1)] = r0.add_(step).view(-1)
        self.changed = torch.count_nonzero(step, dim=1) if per_row else torch.count_nonzero(step)
        # Change of the fixed-point terms (int64: float32 cannot hold it).
        new_term = _fixed(self.error * valid, frac_c).long()
        self.corr = new_term.sub_(_fixed(self.e0 * valid, frac_c).long()).sum(dim=1)

    def at(
        self, col: torch.Tensor, sub: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position, flipped error, E-level error) at rank ``jstart + col``
        of each row (rows ``sub`` of the block; None: all)."""
        idx, err, e0 = self.idx, self.error, self.e0
        if sub is not None:
            idx, err, e0 = idx[sub], err[sub], e0[sub]
        c = col.clamp(0, idx.shape[1] - 1).unsqueeze(1)
        return idx.gather(1, c).squeeze(1), err.gather(1, c).squeeze(1), e0.gather(1, c).squeeze(1)


def _top_positions_after_k(
    carry: _Carry, up: torch.Tensor, t_max: int, oc: int, ic: int, k: int
) -> torch.Tensor:
    """First ``t_max`` positions of each channel's order after the kernel
    level, from the carries alone.

    Only carries have a non-zero priority, so the order starts with the
    positive carries (priority descending, position ascending), followed by
    every other position in ascending order.  Ranking the ``IC`` carries and
    the first ``t_max`` positions (minus those that are carries, which are
    listed with their own key) covers the first ``t_max`` ranks: at most
    ``IC`` of the fill positions can be carries.
    """
    device = carry.local.device
    width = ic * k
    pos = (torch.arange(ic, device=device) * k).unsqueeze(0) + carry.local.view(oc, ic)
    pri = carry.pri.view(oc, ic) * (carry.up.view(oc, ic) == up.unsqueeze(1))
    key_carry = _keys(pri.view(torch.int32), ((width - 1) - pos).to(torch.int32))
    fill = min(t_max, width)
    fpos = torch.arange(fill, device=device)
    is_carry = pos[:, fpos // k] == fpos.unsqueeze(0)
    key_fill = ((width - 1) - fpos).unsqueeze(0).expand(oc, fill).masked_fill(is_carry, -1)
    keys = torch.cat([key_carry, key_fill], dim=1)
    cand_pos = torch.cat([pos, fpos.unsqueeze(0).expand(oc, fill)], dim=1)
    sel = keys.topk(min(t_max, keys.shape[1]), dim=1).indices
    return cand_pos.gather(1, sel)


def _top_positions_elements(p: torch.Tensor, up: torch.Tensor, t_max: int) -> torch.Tensor:
    """First ``t_max`` positions of each channel's order by the element
    priorities (CPU): a chunk tournament, or keys + ``topk`` where the
    estimated cost is lower (small channels, large ``t_max``)."""
    oc, width = p.shape
    chunk = _chunk_len(width)
    n_chunks = -(-width // chunk)
    # Rough CPU cost model (units of ~3 ns, measured): per rank ~10 small
    # ops (~15k units) plus a chunk maxima row and a chunk per channel;
    # keys + topk: ~4 units per element.
    cheaper = t_max * (15_000 + oc * (n_chunks + chunk)) < 4 * oc * width
    if cheaper if _TOURNAMENT is None else _TOURNAMENT:
        buf = torch.empty(p.shape, dtype=torch.int32, device=p.device)
        return _top_positions_tournament(p, up, t_max, buf, chunk)
    hi = (p * _sigma(up).neg_().unsqueeze(1)).view(torch.int32).clamp_min_(0)
    return _keys(hi, _rev(width, p.device)).topk(t_max, dim=1).indices


def _top_positions_tournament(
    p: torch.Tensor, up: torch.Tensor, t_max: int, buf: torch.Tensor, chunk: int
) -> torch.Tensor:
    """First ``t_max`` positions of each channel's order by the element
    priorities (from ``P``), by a tournament over chunks (CPU).

    ``topk`` costs ~10 ns per element on CPU whatever ``k``; here the tensor
    is read twice (priority bits, chunk maxima) and each rank then touches
    one chunk maximum row and one chunk per channel.  Ties: ``argmax``
    returns the first maximal index, so the best chunk is the lowest one
    holding the best priority and, inside it, the lowest position -- the
    element the order puts first.  A taken element's priority becomes -1.
    ``buf`` is int32 scratch of ``p``'s shape.
    """
    oc, width = p.shape
    device = p.device
    n_chunks = -(-width // chunk)
    hi = buf
    torch.mul(p, _sigma(up).neg_().unsqueeze(1), out=hi.view(torch.float32))
    hi.clamp_min_(0)
    if n_chunks * chunk != width:  # pad the last chunk with taken entries
        hi = torch.cat([hi, hi.new_full((oc, n_chunks * chunk - width), -1)], dim=1)
    padded = n_chunks * chunk
    blocks = hi.view(oc * n_chunks, chunk)
    best = blocks.amax(dim=1)  # (OC * n_chunks,) chunk maxima
    best_rows = best.view(oc, n_chunks)
    flat_hi = hi.view(-1)
    chunk_base = torch.arange(oc, device=device) * n_chunks
    pos = torch.empty((oc, t_max), dtype=torch.int64, device=device)
    for j in range(t_max):
        c = best_rows.argmax(dim=1).add_(chunk_base)  # flat chunk index
        block = blocks.index_select(0, c)  # (OC, chunk) copy
        a = block.argmax(dim=1)
        flat = c * chunk + a  # flat index into the padded bits
        pos[:, j] = flat
        flat_hi.index_fill_(0, flat, -1)
        block.scatter_(1, a.unsqueeze(1), -1)
        best.index_copy_(0, c, block.amax(dim=1))
    return pos.sub_((torch.arange(oc, device=device) * padded).unsqueeze(1))


def _chunk_len(width: int) -> int:
    """Chunk length for the tournament: a power of two near sqrt(width)."""
    return max(1, 1 << round(math.log2(max(width, 1)) / 2)) if _CHUNK <= 0 else _CHUNK


class _DenseLevels:
    """CUDA strategy: dense full-tensor updates, no host sync (the caller
    reads the flip counts once at the end).

    Every group is fully ordered -- a ``sort`` of the unique int64 keys for
    the kernels, a stable descending ``sort`` of the int32 priority bits
    (clamped at 0, so ``-0.0`` and the other direction's candidates tie at
    0; ties keep the lower position first) for the channels -- and a
    position flips when its rank is below ``t``: no ``t``-sized tensor, so
    no sync for ``max t``.  ``r`` is replaced, never updated in place, so
    ``r0`` (SQuant-E's codes, the base of both flip tables) stays at hand.
    The levels return their flip counts as one total, or per output channel
    (``(OC,)``, a row sum instead of a full sum) when ``per_row``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        e: torch.Tensor,
        tmin: int,
        tmax: int,
        per_row: bool = False,
    ):
        self.x, self.r, self.e, self.r0 = x, r, e, r
        self.per_row = per_row
        # P = clamp(e, lo, hi), as in _priorities.
        lo = (r - tmax).clamp_(-1.0, 0.0)
        hi = (r - tmin).clamp_(0.0, 1.0)
        self.p = torch.clamp(e, lo, hi)
        self.carry: _Carry | None = None

    def kernel_level(self, ic: int, k: int, want_carry: bool) -> torch.Tensor:
        oc = self.x.shape[0]
        g_count = oc * ic
        frac = _frac_bits(k)
        e = self.e.view(g_count, k)
        p = self.p.view(g_count, k)
        total = _group_totals(e, frac)
        up, a, t = _decide_dense(total, frac, k)
        nsig = _neg_sigma(up)  # -sigma
        q = p * nsig  # dir's priority where > 0
        # Unique int64 keys: a plain sort (bitonic on short rows, ~3x faster
        # on CUDA than the stable sort of the int32 bits here).
        keys = _keys(q.view(torch.int32).clamp_min(0), _rev(k, q.device))
        order = keys.sort(dim=1, descending=True).indices
        flip = _ranks(order) < t.unsqueeze(1)
        flip_cand = (q > 0).logical_and_(flip)
        step = flip_cand * nsig  # -sigma where a candidate flips, else 0
        self.r = (self.r0.view(g_count, k) - step).view(oc, ic * k)
        # Flipped candidates: e + sigma; flipped non-candidates: 0.
        e_new = (e - step).masked_fill_(flip.logical_xor_(flip_cand), 0.0)
        self.e = e_new.view(oc, ic * k)
        if want_carry:
            # Over (t >= A): c = order[t-1], else order[t]: that is rank
            # ceil(A) - 1 either way (A integral: t = A, over), and -1, which
            # the remainder wraps to order[last], when S == 0.  The remainder
            # also keeps the index in range for a non-finite channel.
            cj = torch.remainder(a.ceil().sub_(1.0), k).long().unsqueeze(1)
            local = order.gather(1, cj)
            pri = e_new.gather(1, local).abs_()
            total_c = _group_totals(self.e, _frac_bits(ic * k))
            over = t >= a
            self.carry = _Carry(local.squeeze(1), pri.squeeze(1), up ^ over, total_c)
        return self._count(flip_cand, oc)

    def channel_level(self, ic: int, k: int, carry: _Carry | None) -> torch.Tensor:
        oc, width = self.x.shape
        frac = _frac_bits(width)
        total = _group_totals(self.e, frac) if carry is None else carry.total
        up, _, t = _decide_dense(total, frac, width)
        nsig = _neg_sigma(up)  # -sigma
        q = self.p * nsig  # dir's priority (E-level tables) where > 0
        if carry is None:
            # r is still r0: flipping a non-candidate changes nothing.
            flip = _ranks(_stable_order(q)) < t.unsqueeze(1)
            flip.logical_and_(q > 0)
            self.r = torch.where(flip, self.r0 - nsig, self.r0)
            return self._count(flip, oc)
        flip = _flips_after_k(carry, up, t, oc, ic, k)
        value = torch.where(q > 0, self.r0 - nsig, self.r0)
        new_r = torch.where(flip, value, self.r)
        changed = self._count(new_r != self.r, oc)
        self.r = new_r
        return changed

    def _count(self, mask: torch.Tensor, oc: int) -> torch.Tensor:
        """True entries of a mask of the weight's elements: in all, or per
        output channel."""
        return mask.view(oc, -1).sum(dim=1) if self.per_row else mask.sum()


def _stable_order(q: torch.Tensor) -> torch.Tensor:
    """Positions of each row by priority ``max(q, 0)`` descending, lower
    position first on ties (stable sort of the non-negative int32 bits)."""
    bits = q.view(torch.int32).clamp_min(0)
    return bits.sort(dim=-1, descending=True, stable=True).indices


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation of each row of ``order``: the rank of every position."""
    n = order.shape[-1]
    ar = torch.arange(n, device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def _flips_after_k(
    carry: _Carry, up: torch.Tensor, t: torch.Tensor, oc: int, ic: int, k: int
) -> torch.Tensor:
    """Dense (OC, IC*K) mask of the first ``t`` positions of each channel's
    order after the kernel level, from the carries alone (no sync).

    Only carries have a non-zero priority, so the order is: the positive
    carries in the channel's direction (priority descending, position --
    that is, kernel -- ascending), then every other position ascending.  A
    positive carry flips when its rank among them is below ``t``; another
    position flips when it is among the first ``t - n_pos`` of the rest
    (inclusive running count of the non-carry mask).
    """
    pri = carry.pri.view(oc, ic) * (carry.up.view(oc, ic) == up.unsqueeze(1))
    positive = pri > 0
    n_pos = positive.sum(dim=1)
    first = _ranks(_stable_order(pri)) < t.unsqueeze(1)  # (OC, IC)
    hit = torch.arange(k, device=pri.device) == carry.local.view(oc, ic, 1)
    pc = hit.logical_and_(positive.unsqueeze(2)).view(oc, ic * k)
    # Running count of the other positions (pc's own entries are not used).
    fill = pc.logical_not().cumsum(dim=1) <= (t - n_pos).unsqueeze(1)
    flip = torch.where(pc.view(oc, ic, k), first.unsqueeze(2), fill.view(oc, ic, k))
    return flip.view(oc, ic * k)
