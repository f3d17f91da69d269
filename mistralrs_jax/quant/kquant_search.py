"""The scale searches behind llama.cpp's K-quant reference quantizers, vectorized.

Each function mirrors one helper of ggml-quants.c (`make_qkx2_quants`,
`make_qx_quants`, `make_q3_quants`) for many groups at once. Arrays are
elements-major: x has shape (n, n_groups), one column per group, so the C loops
over the n positions of a group become loops of n vector operations, and the float
sums accumulate in the same order as in C (see packing.seq_sum). Per-group early
exits become masks: a group that C would have left keeps its values.

All arithmetic stays in float32, operand order as in the C expressions, so the
results match ggml's reference quantizers bit for bit (up to compiler FMA contraction,
which the portable ggml-base build does not do).
"""

from __future__ import annotations

import numpy as np

from .packing import F32, GROUP_MAX_EPS, first_absmax, nearest_int, seq_sum


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where the caller masks out den == 0 lanes afterwards."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (num / den).astype(F32)


def make_qkx2_quants(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric search: x ~ scale * L - the_min with L in 0..nmax, weighted error.

    Returns (scale (B,), the_min (B,), L (n, B) as float32 integers). Tries nstep+1
    trial inverse scales around nmax / (max - min) and keeps the least-squares
    (scale, min) fit with the smallest weighted squared (or absolute) error.
    """
    fmax = F32(nmax)
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    sum_w = seq_sum(weights)
    sum_x = seq_sum(weights * x)
    flat = hi == lo

    def error(scale: np.ndarray, levels: np.ndarray, shift: np.ndarray) -> np.ndarray:
        diff = scale * levels + shift - x
        diff = np.abs(diff) if use_mad else diff * diff
        return seq_sum(weights * diff)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (fmax / (hi - lo)).astype(F32)
        scale = (F32(1) / iscale).astype(F32)
        levels = np.clip(nearest_int(iscale * (x - lo)), 0, fmax)
        best_error = error(scale, levels, lo)
        for step in range(nstep + 1):
            trial_iscale = ((F32(rmin) + F32(rdelta) * F32(step) + fmax) / (hi - lo)).astype(F32)
            trial = np.clip(nearest_int(trial_iscale * (x - lo)), 0, fmax)
            wl = weights * trial
            sum_l = seq_sum(wl)
            sum_l2 = seq_sum(wl * trial)
            sum_xl = seq_sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = _safe_div(sum_w * sum_xl - sum_x * sum_l, det)
            this_min = _safe_div(sum_l2 * sum_x - sum_l * sum_xl, det)
            clamp = this_min > 0
            this_min = np.where(clamp, F32(0), this_min)
            this_scale = np.where(clamp, _safe_div(sum_xl, sum_l2), this_scale)
            cur_error = error(this_scale, trial, this_min)
            better = (det > 0) & (cur_error < best_error) & ~flat
            levels = np.where(better, trial, levels)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    # A constant group (after clamping min to <= 0) quantizes to zeros with scale 0.
    levels = np.where(flat, F32(0), levels)
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-lo).astype(F32), levels.astype(F32)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric search (`rmse_type` 1, no importance weights): x ~ scale * (L - nmax)
    with L in 0..2*nmax-1, weights x^2. Returns (scale (B,), L (n, B))."""
    fmax = F32(nmax)
    amax, signed_max = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    signed_max = np.where(zero, F32(1), signed_max)
    weights = x * x
    wx = weights * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = np.clip(nearest_int(iscale * x), -fmax, fmax - 1)
        return levels, seq_sum(wx * levels), seq_sum(weights * levels * levels)

    levels, sumlx, suml2 = trial((-fmax / signed_max).astype(F32))
    scale = np.where(suml2 != 0, _safe_div(sumlx, suml2), F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(fmax + F32(0.1) * F32(step)) / signed_max).astype(F32)
        trial_levels, sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = np.where(better, trial_levels, levels)
        scale = np.where(better, _safe_div(sumlx, suml2), scale)
        best = np.where(better, scale * sumlx, best)
    levels = np.where(zero, F32(0), levels + fmax)
    return np.where(zero, F32(0), scale).astype(F32), levels.astype(F32)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K's symmetric search (`do_rmse`): start from round(-nmax/max * x), then up to
    5 sweeps of coordinate descent that move one level at a time when that raises
    sumlx^2 / suml2. Returns (scale (B,), L (n, B) in 0..2*nmax-1)."""
    fmax = F32(nmax)
    amax, signed_max = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    signed_max = np.where(zero, F32(1), signed_max)
    iscale = (-fmax / signed_max).astype(F32)
    levels = np.clip(nearest_int(iscale * x), -fmax, fmax - 1)
    weights = x * x
    wx = weights * x
    sumlx = seq_sum(wx * levels)
    suml2 = seq_sum(weights * levels * levels)
    active = ~zero
    # Products of sums may overflow to inf for huge inputs; C compares those infs too.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = np.zeros_like(active)
            for i in range(x.shape[0]):
                w, xi, li = weights[i], x[i], levels[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - w * li * li
                new_l = np.clip(nearest_int(xi * sl2 / slx), -fmax, fmax - 1)
                slx_new = slx + wx[i] * new_l
                sl2_new = sl2 + w * new_l * new_l
                take = (
                    active
                    & (slx > 0)
                    & (new_l != li)
                    & (sl2_new > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                )
                levels[i] = np.where(take, new_l, li)
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
                changed |= take
            active &= changed
            if not active.any():
                break
    scale = np.where(suml2 > 0, _safe_div(sumlx, suml2), F32(0))
    levels = np.where(zero, F32(0), levels + fmax)
    return np.where(zero, F32(0), scale).astype(F32), levels.astype(F32)
