"""Flow-matching sampling: the shifted sigma schedule, UniPC (bh1/bh2), Euler, and the guidance wrapper.

Contract: plain functions over tensors, registered by name in `SAMPLERS`. A sampler takes a
`ModelFn` mapping (x, sigma, step) to an x0 prediction, the starting noise at sigmas[0] and a
strictly decreasing schedule; it knows nothing of the transformer, devices or files. `guided_model`
turns a velocity function (the transformer behind a closure) into such a `ModelFn` with FramePack's
guidance (distilled CFG lives in the transformer's kwargs; real CFG and its rescale live here).

Noise model (rectified flow): x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0, so
x0 = x - sigma v and the probability-flow ODE is dx/dsigma = (x - x0(x, sigma)) / sigma.

Both samplers follow the official `FlowMatchUniPC.sample` loop (spec §5): `steps = len(sigmas) - 1`
model evaluations at sigmas[0 .. steps-1]; the solver moves x from sigmas[0] to sigmas[steps-1] and
never steps to sigmas[steps] (normally 0), which only sets the count. The result is the last x0
prediction, made at sigmas[steps-1]: a first-order (DDIM = Euler) step to 0 from the point the model
last saw (for UniPC the predicted point, not the corrected x reported to the callback). Against the
ODE's end point this adds that step's O(sigmas[steps-1]^2) error, whatever the solver's order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch

# mu of the resolution-dependent shift: linear in the token count through (256, 0.5) and (4096, 1.15),
# capped at ln 7 (spec §5). FramePack's 640 buckets are all past the cap, where sigma = 7t / (1 + 6t).
_MU_SLOPE = (1.15 - 0.5) / (4096 - 256)
_MU_INTERCEPT = 0.5 - 256 * _MU_SLOPE
_MU_CAP = math.log(7.0)

VARIANTS = ("bh1", "bh2")


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each finished step."""

    step: int  # 0-based index of the finished step
    total: int  # number of steps
    sigma: float  # sigma the model was evaluated at in this step
    x: torch.Tensor  # current sample (at `sigma`)
    denoised: torch.Tensor  # the model's latest x0 prediction


ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""model(x, sigma, step) -> x0 prediction; sigma is a 0-dim float tensor, step the sampler step index."""

Callback = Callable[[StepInfo], None]


# ------------------------------------------------------------------------------------------ schedule
def flow_shift_mu(seq_len: int) -> float:
    """mu = min(k * seq_len + b, ln 7) for `seq_len` noisy tokens (T * H/16 * W/16 of the latent window)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int (the noisy token count), got {seq_len!r}")
    return min(_MU_SLOPE * seq_len + _MU_INTERCEPT, _MU_CAP)


def flow_sigmas(steps: int, *, seq_len: int | None = None, shift: float | None = None) -> torch.Tensor:
    """The shifted schedule (steps + 1,) in float64, from 1.0 down to exactly 0.0.

    sigma = e^mu / (e^mu + 1/t - 1) on t = linspace(1, 0, steps + 1), with mu = ln(shift) when
    `shift` is given, else `flow_shift_mu(seq_len)`.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if shift is not None:
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        mu = math.log(shift)
    elif seq_len is not None:
        mu = flow_shift_mu(seq_len)
    else:
        raise ValueError("flow_sigmas needs seq_len (resolution-dependent shift) or shift (fixed); got neither")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    # Written as 1 / (1 + (1/t - 1) e^-mu) so that t = 1 gives exactly 1; 1/t = inf at t = 0 gives 0,
    # and the `where` states that by construction.
    sigma = 1.0 / (1.0 + (1.0 / t - 1.0) * math.exp(-mu))
    return torch.where(t > 0, sigma, torch.zeros_like(t))


def _check_sigmas(sigmas: torch.Tensor) -> list[float]:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        got = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor of length >= 2 (steps + 1), got {got}")
    if not sigmas.is_floating_point():
        raise ValueError(f"sigmas must be a floating-point tensor, got {sigmas.dtype}")
    s = sigmas.detach().to("cpu", torch.float64).tolist()  # one host copy; coefficients are float64 anyway
    if not all(math.isfinite(v) for v in s) or s[-1] < 0:
        raise ValueError(f"sigmas must be finite and >= 0, got {s}")
    if any(b >= a for a, b in pairwise(s)):
        raise ValueError(f"sigmas must be strictly decreasing, got {s}")
    return s


def _check_common(noise: torch.Tensor, callback: Callback | None, check_cancel: Callable[[], None] | None) -> None:
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        got = noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a floating-point tensor, got {got}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    if check_cancel is not None and not callable(check_cancel):
        raise ValueError(f"check_cancel must be callable or None, got {type(check_cancel).__name__}")


# ------------------------------------------------------------------------------------------ UniPC
@dataclass(frozen=True)
class _UniPCStep:
    """Scalar coefficients of one UniPC step from sigma_prev to sigma_t (all float64).

    With D_k = m_k - m_prev (k-th earlier x0 prediction minus the latest) the step is
        x_hat  = ratio * x - phi * m_prev
        x_pred = x_hat - B * sum_k pred[k] * D_k
        x_new  = x_hat - B * (sum_k corr[k] * D_k + corr_t * (m_t - m_prev))
    The spec's rho / r_k are folded into pred and corr here.
    """

    ratio: float
    phi: float
    B: float
    pred: tuple[float, ...]
    corr: tuple[float, ...]
    corr_t: float


def _unipc_step(lam_hist: list[float], lam_t: float, ratio: float, order: int, variant: str) -> _UniPCStep:
    """Coefficients for an order-`order` step; lam_hist holds lambda = -log sigma of stored points, latest last."""
    lam_prev = lam_hist[-1]
    h = lam_t - lam_prev
    rks = [(lam_hist[-(k + 1)] - lam_prev) / h for k in range(1, order)] + [1.0]
    hh = -h  # data prediction: the linear part decays as e^-h = sigma_t / sigma_prev
    phi = math.expm1(hh)
    B = hh if variant == "bh1" else phi
    # b_j = g_j j! / B with g_1 = phi/hh - 1, g_{j+1} = g_j/hh - 1/(j+1)!  (Zhao et al. 2023, B(h) form)
    g, fact, b = phi / hh - 1.0, 1.0, []
    for j in range(1, order + 1):
        b.append(g * fact / B)
        fact *= j + 1
        g = g / hh - 1.0 / fact
    R = torch.tensor([[r ** (j - 1) for r in rks] for j in range(1, order + 1)], dtype=torch.float64)
    bt = torch.tensor(b, dtype=torch.float64)
    # The spec's fixed 0.5s: UniP-2 uses rho_p = 1/2 instead of its 1x1 solve, UniC-1 uses rho_c = 1/2.
    if order == 1:
        rho_p, rho_c = [], [0.5]
    else:
        rho_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
        rho_c = torch.linalg.solve(R, bt).tolist()
    pred = tuple(p / r for p, r in zip(rho_p, rks[:-1]))
    corr = tuple(c / r for c, r in zip(rho_c[:-1], rks[:-1]))
    return _UniPCStep(ratio, phi, B, pred, corr, rho_c[-1])


def sample_unipc(
    model: ModelFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    variant: str = "bh1",
    max_order: int = 3,
    callback: Callback | None = None,
    check_cancel: Callable[[], None] | None = None,
) -> torch.Tensor:
    """FramePack's flow-matching UniPC (spec §5): data prediction in lambda = -log sigma, bh1 or bh2.

    Step 0 evaluates the model on `noise` at sigmas[0]. Step i >= 1 predicts x at sigmas[i] from
    sigmas[i-1] with order min(i, min(max_order, steps - 1)), evaluates the model at the predicted
    point and corrects x with that evaluation (UniC, which reuses it: one evaluation per step).
    Returns the last x0 prediction (see the module docstring). Tensors stay in `noise.dtype`.
    `check_cancel()` runs at the start of every step (let it raise to cancel); `callback` after it.
    """
    _check_common(noise, callback, check_cancel)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= 3:
        raise ValueError(f"max_order must be an int in 1..3, got {max_order!r}")
    sig = _check_sigmas(sigmas)  # strictly decreasing to >= 0: every evaluated sigma is > 0
    steps = len(sig) - 1
    order = min(max_order, steps - 1)
    keep = max(order, 1)
    dtype = noise.dtype

    x = noise
    ms: list[torch.Tensor] = []  # stored x0 predictions, latest last (at most `keep`)
    lams: list[float] = []
    for i in range(steps):
        if check_cancel is not None:
            check_cancel()
        lam_t = -math.log(sig[i])
        if i == 0:
            m_t = model(x, sigmas[i], i).to(dtype)
        else:
            k = min(i, order)  # warm-up: only i earlier predictions exist
            c = _unipc_step(lams, lam_t, sig[i] / sig[i - 1], k, variant)
            m0 = ms[-1]
            d = [ms[-(j + 1)] - m0 for j in range(1, k)]
            x_hat = c.ratio * x - c.phi * m0
            x_pred = x_hat
            for w, dk in zip(c.pred, d):
                x_pred = x_pred - (c.B * w) * dk
            m_t = model(x_pred, sigmas[i], i).to(dtype)
            x = x_hat - (c.B * c.corr_t) * (m_t - m0)
            for w, dk in zip(c.corr, d):
                x = x - (c.B * w) * dk
        ms = [*ms, m_t][-keep:]
        lams = [*lams, lam_t][-keep:]
        if callback is not None:
            callback(StepInfo(step=i, total=steps, sigma=sig[i], x=x, denoised=m_t))
    return ms[-1]


def sample_euler(
    model: ModelFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Callback | None = None,
    check_cancel: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Plain Euler on the flow ODE (a first-order baseline): x_{i+1} = x_i + (s_{i+1} - s_i)(x_i - x0_i)/s_i.

    Same loop shape as `sample_unipc`: `steps` evaluations at sigmas[0 .. steps-1], callback after
    each with x at the evaluated sigma, and it returns the last x0 prediction. When sigmas[-1] == 0
    that is exactly the final Euler step, x_steps = x0_{steps-1}.
    """
    _check_common(noise, callback, check_cancel)
    sig = _check_sigmas(sigmas)  # strictly decreasing to >= 0: every evaluated sigma is > 0
    steps = len(sig) - 1
    x, d = noise, noise
    for i in range(steps):
        if check_cancel is not None:
            check_cancel()
        if i > 0:  # the update of step i-1, deferred so that x and d both belong to sigmas[i]
            x = x + ((sig[i] - sig[i - 1]) / sig[i - 1]) * (x - d)
        d = model(x, sigmas[i], i).to(noise.dtype)
        if callback is not None:
            callback(StepInfo(step=i, total=steps, sigma=sig[i], x=x, denoised=d))
    return d


# ------------------------------------------------------------------------------------------ registry
Sampler = Callable[..., torch.Tensor]
"""sampler(model, noise, sigmas, *, callback=None, check_cancel=None) -> the final x0 prediction."""

# name -> sampler: the one list the request, CLI, UI and API take their choices from. A new sampler is a
# function with that signature, added here.
SAMPLERS: dict[str, Sampler] = {
    "unipc": partial(sample_unipc, variant="bh1"),  # the official default
    "unipc-bh2": partial(sample_unipc, variant="bh2"),
    "euler": sample_euler,
}


# ------------------------------------------------------------------------------------------ guidance
def guided_model(
    velocity: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
    *,
    cfg: float = 1.0,
    rescale: float = 0.0,
    model_dtype: torch.dtype = torch.bfloat16,
    on_pass: Callable[[int, str], None] | None = None,
) -> ModelFn:
    """Wrap `velocity(x, timestep, pass_name)` into a `ModelFn` (spec §5, "Model wrapper").

    x is cast to `model_dtype` and the timestep is sigma * 1000 in `model_dtype`, shape (B,). The
    "cond" pass always runs; the "uncond" pass only when cfg != 1, and then
    v = uncond + cfg (cond - uncond), optionally rescaled towards std(cond) by `rescale`. The x0
    prediction x_m - sigma v is formed from the model-dtype copy x_m (upcast), as the official does,
    in the caller's dtype. `on_pass(step, pass_name)` runs right before each velocity call, so a
    step cache can tell steps and guidance passes apart.
    """
    if not callable(velocity):
        raise ValueError(f"velocity must be callable, got {type(velocity).__name__}")
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"cfg must be a finite number >= 0 (1 = no real CFG; the UI offers 1..32), got {cfg!r}")
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must be a number in [0, 1], got {rescale!r}")
    if not isinstance(model_dtype, torch.dtype) or not model_dtype.is_floating_point:
        raise ValueError(f"model_dtype must be a floating torch.dtype, got {model_dtype!r}")
    if on_pass is not None and not callable(on_pass):
        raise ValueError(f"on_pass must be callable or None, got {type(on_pass).__name__}")

    def _call(x_m: torch.Tensor, timestep: torch.Tensor, step: int, pass_name: str) -> torch.Tensor:
        if on_pass is not None:
            on_pass(step, pass_name)
        return velocity(x_m, timestep, pass_name).float()

    def model(x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        s = sigma.to(device=x.device, dtype=x.dtype)  # fp32 in the pipeline, as the official's sigma.float()
        x_m = x.to(model_dtype)
        timestep = (s * 1000).to(model_dtype).expand(x.shape[0])  # (B,)
        pos = _call(x_m, timestep, step, "cond")
        if cfg == 1:
            # neg + 1 * (pos - neg) == pos, and the rescale's std ratio is then 1: both are identities.
            out = pos
        else:
            neg = _call(x_m, timestep, step, "uncond")
            out = neg + cfg * (pos - neg)
            if rescale > 0:
                # std over all non-batch dims; the unbiased/biased choice cancels in the ratio.
                dims = list(range(1, out.ndim))
                ratio = pos.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
                out = rescale * out * ratio + (1 - rescale) * out
        return x_m.to(x.dtype) - s * out.to(x.dtype)

    return model
