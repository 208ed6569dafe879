"""Sampling against independent references: the spec's sigma values, closed-form Gaussian flows,
an RK4 integration, diffusers' UniPCMultistepScheduler, and hand computations of the guidance.

The Gaussian problem: per element x0 ~ N(mu, s^2) and x_sigma = (1 - sigma) x0 + sigma eps. Then
  * the exact x0 prediction is the posterior mean
        D(x, sigma) = mu + (1 - sigma) s^2 / V(sigma) * (x - (1 - sigma) mu),  V = (1 - sigma)^2 s^2 + sigma^2,
  * the probability-flow ODE dx/dsigma = (x - D) / sigma started from z at sigma = 1 is solved by
        x(sigma) = (1 - sigma) mu + sqrt(V(sigma)) z,   ending at x(0) = mu + s z.

What "returns the last x0 prediction" means for convergence. The samplers integrate only down to
sigma_e = sigmas[steps-1] and return D(x(sigma_e), sigma_e), i.e. one Euler (= DDIM) step from there
to 0. Against the ODE end point x(0) that adds the local error of that step, sigma_e^2 x''/2; for the
Gaussian it is s z ((1 - sigma_e) s / sqrt(V(sigma_e)) - 1) = O(sigma_e^2). With `flow_sigmas`,
sigma_e ~ shift / steps, so this term alone caps the end-to-end order at 2 for any solver, and the
last lambda-steps of that schedule do not shrink as steps grow (sigma ratios 2, 3/2, ...), so the
solver's own error there does not fall like h^order either. The order tests therefore use a
schedule uniform in lambda = -log sigma down to a fixed sigma_e > 0 (a trailing 0 only sets the
count) and compare with the exact D(x(sigma_e), sigma_e), which isolates the solver's error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from framepack.sampling import (
    StepInfo,
    flow_shift_mu,
    flow_sigmas,
    guided_model,
    sample_euler,
    sample_unipc,
)

F64 = torch.float64


class Gaussian:
    """x0 ~ N(mu, s^2) per element; the exact x0 prediction and ODE solution in closed form."""

    def __init__(self, shape: tuple[int, ...] = (64,), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(shape, generator=g, dtype=F64)
        self.s = 0.3 + torch.rand(shape, generator=g, dtype=F64)
        self.z = torch.randn(shape, generator=g, dtype=F64)

    def var(self, sigma: float) -> torch.Tensor:
        return (1 - sigma) ** 2 * self.s**2 + sigma**2

    def posterior_mean(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.mu + (1 - sigma) * self.s**2 / self.var(sigma) * (x - (1 - sigma) * self.mu)

    def ode(self, sigma: float) -> torch.Tensor:
        return (1 - sigma) * self.mu + self.var(sigma).sqrt() * self.z

    def model(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        return self.posterior_mean(x, float(sigma))


def lambda_uniform(intervals: int, sigma_end: float) -> torch.Tensor:
    """intervals + 1 points uniform in -log sigma from 1 to sigma_end, then 0 (never stepped to)."""
    lam = torch.linspace(0.0, -math.log(sigma_end), intervals + 1, dtype=F64)
    return torch.cat([torch.exp(-lam), torch.zeros(1, dtype=F64)])


def fitted_order(intervals: list[int], errors: list[float]) -> float:
    """Slope of log(error) against log(1/h), h proportional to 1/intervals."""
    return float(np.polyfit(np.log(intervals), np.log(errors), 1)[0]) * -1.0


# ------------------------------------------------------------------------------------------ schedule
def test_flow_sigmas_spec_values_at_the_cap():
    # 640x608 example of spec §4.1: 9 * 40 * 38 = 13680 noisy tokens, past the cap (~8798).
    sig = flow_sigmas(25, seq_len=13680)
    assert sig.dtype == F64 and sig.shape == (26,)
    assert sig[0].item() == 1.0 and sig[-1].item() == 0.0
    head = [1.0, 0.9941, 0.9877]
    tail = [0.6364, 0.5714, 0.4884, 0.3784, 0.2258, 0.0]  # spec §5
    assert sig[:3].tolist() == pytest.approx(head, abs=5e-5)
    assert sig[-6:].tolist() == pytest.approx(tail, abs=5e-5)
    t = torch.linspace(1, 0, 26, dtype=F64)
    torch.testing.assert_close(sig, 7 * t / (1 + 6 * t), rtol=0, atol=1e-15)  # "sigma = 7t/(1+6t)"
    assert torch.equal(flow_sigmas(25, shift=7.0), sig)


def test_flow_shift_mu_line_and_cap():
    k = 0.65 / 3840  # hand: (1.15 - 0.5) / (4096 - 256)
    assert flow_shift_mu(256) == pytest.approx(0.5, abs=1e-15)
    assert flow_shift_mu(4096) == pytest.approx(1.15, abs=1e-15)
    assert flow_shift_mu(1000) == pytest.approx(0.5 + 744 * k, abs=1e-15)
    # The cap ln 7 is reached between 8797 and 8798 tokens: (ln 7 - 0.5) / k + 256 = 8797.9.
    assert flow_shift_mu(8797) < math.log(7) - 1e-5
    assert flow_shift_mu(8798) == math.log(7)
    assert flow_shift_mu(10**6) == math.log(7)
    # Below the cap the schedule uses the linear mu: shift = e^mu.
    t = torch.linspace(1, 0, 11, dtype=F64)
    e = math.exp(0.5 + 744 * k)
    torch.testing.assert_close(flow_sigmas(10, seq_len=1000), e * t / (1 + (e - 1) * t), rtol=0, atol=1e-15)


def test_flow_sigmas_explicit_shift_by_hand():
    # shift 3 on t = 1, .75, .5, .25, 0: sigma = 3t / (1 + 2t)
    assert flow_sigmas(4, shift=3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-15)
    assert flow_sigmas(4, shift=1.0).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-15)
    assert flow_sigmas(1, shift=3.0).tolist() == [1.0, 0.0]
    # An explicit shift wins over seq_len (mu = ln shift).
    assert torch.equal(flow_sigmas(4, seq_len=13680, shift=3.0), flow_sigmas(4, shift=3.0))


# ------------------------------------------------------------------------------------------ solvers
def test_two_steps_by_hand():
    """2 steps: x0_0 = D(z, 1); one first-order step to 1/2: x = z/2 + x0_0/2; return D(x, 1/2)."""
    gs = Gaussian((8,), seed=3)
    sig = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    m0 = gs.posterior_mean(gs.z, 1.0)
    expected = gs.posterior_mean(0.5 * gs.z + 0.5 * m0, 0.5)
    for out in (
        sample_unipc(gs.model, gs.z, sig, variant="bh1"),
        sample_unipc(gs.model, gs.z, sig, variant="bh2"),
        sample_euler(gs.model, gs.z, sig),
    ):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


# Expected global order of the solver error with max_order p. UniP-p has order p and UniC raises it
# to p + 1 (Zhao et al. 2023), which gives 2 and 3 for p = 1, 2. For p = 3 the steady state would
# be 4, but step 1 always runs at order 1 (no history yet) and its x0 evaluation, taken at that
# first-order predicted point, keeps feeding later steps: an O(h^3) term, so 3. bh2 happens to cancel
# that term on this *linear* problem and measures 4; on the nonlinear mixture below it is 3 as well.
EXPECTED_ORDER = {("bh1", 1): 2, ("bh1", 2): 3, ("bh1", 3): 3, ("bh2", 1): 2, ("bh2", 2): 3, ("bh2", 3): 4}
INTERVALS = [32, 64, 128, 256]
SIGMA_END = 0.05


@pytest.mark.parametrize(("variant", "max_order"), list(EXPECTED_ORDER))
def test_unipc_order_on_gaussian(variant: str, max_order: int):
    gs = Gaussian()
    errors = []
    for n in INTERVALS:
        sig = lambda_uniform(n, SIGMA_END)
        out = sample_unipc(gs.model, gs.z, sig, variant=variant, max_order=max_order)
        exact = gs.posterior_mean(gs.ode(SIGMA_END), SIGMA_END)
        errors.append((out - exact).abs().max().item())
    assert errors[-1] < errors[0]
    assert fitted_order(INTERVALS, errors) == pytest.approx(EXPECTED_ORDER[variant, max_order], abs=0.2), errors


def test_euler_is_first_order_on_gaussian():
    gs = Gaussian()
    errors = []
    for n in INTERVALS:
        out = sample_euler(gs.model, gs.z, lambda_uniform(n, SIGMA_END))
        errors.append((out - gs.posterior_mean(gs.ode(SIGMA_END), SIGMA_END)).abs().max().item())
    assert fitted_order(INTERVALS, errors) == pytest.approx(1.0, abs=0.1), errors


class Mixture:
    """x0 ~ w N(a, c^2) + (1 - w) N(b, c^2) per element: a nonlinear exact x0 prediction."""

    def __init__(self, n: int = 32, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.w = 0.2 + 0.6 * torch.rand(n, generator=g, dtype=F64)
        self.a = torch.randn(n, generator=g, dtype=F64) - 1
        self.b = torch.randn(n, generator=g, dtype=F64) + 1
        self.c = 0.4 + 0.3 * torch.rand(n, generator=g, dtype=F64)
        self.z = torch.randn(n, generator=g, dtype=F64)

    def posterior_mean(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        v = (1 - sigma) ** 2 * self.c**2 + sigma**2
        la = torch.log(self.w) - (x - (1 - sigma) * self.a) ** 2 / (2 * v)
        lb = torch.log1p(-self.w) - (x - (1 - sigma) * self.b) ** 2 / (2 * v)
        pa = torch.sigmoid(la - lb)  # posterior weight of component a
        gain = (1 - sigma) * self.c**2 / v
        return pa * (self.a + gain * (x - (1 - sigma) * self.a)) + (1 - pa) * (
            self.b + gain * (x - (1 - sigma) * self.b)
        )

    def model(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        return self.posterior_mean(x, float(sigma))

    def rk4_end(self, sigma_end: float, n: int = 1000) -> torch.Tensor:
        """Reference: classical RK4 on y = x / sigma, dy/dlambda = e^lambda D(sigma y, sigma)."""

        def f(lam: float, y: torch.Tensor) -> torch.Tensor:
            return math.exp(lam) * self.posterior_mean(math.exp(-lam) * y, math.exp(-lam))

        h, lam, y = -math.log(sigma_end) / n, 0.0, self.z.clone()
        for _ in range(n):
            k1 = f(lam, y)
            k2 = f(lam + h / 2, y + h / 2 * k1)
            k3 = f(lam + h / 2, y + h / 2 * k2)
            k4 = f(lam + h, y + h * k3)
            y, lam = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h
        return self.posterior_mean(sigma_end * y, sigma_end)


@pytest.fixture(scope="module")
def mixture() -> tuple[Mixture, torch.Tensor]:
    mix = Mixture()
    return mix, mix.rk4_end(0.1)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_order_3_is_3_on_nonlinear_data(mixture, variant: str):
    mix, exact = mixture
    intervals = [64, 128, 256]
    errors = [
        (sample_unipc(mix.model, mix.z, lambda_uniform(n, 0.1), variant=variant) - exact).abs().max().item()
        for n in intervals
    ]
    # The first-order warm-up step limits max_order 3 to order 3 (bh2 approaches it from above).
    assert 2.8 < fitted_order(intervals, errors) < 3.45, errors


# ------------------------------------------------------------------------------------------ diffusers
def _extended(sig: torch.Tensor) -> torch.Tensor:
    """Ours' evaluated sigmas plus two more below. diffusers lowers the order of its last two steps
    (lower_order_final); the extra sigmas keep that taper beyond the steps we compare."""
    s = sig[:-1]
    return torch.cat([s, s[-1:] * torch.tensor([0.5, 0.25], dtype=F64)])


def _run_diffusers(
    gs: Gaussian, sig: torch.Tensor, *, variant: str, order: int, flow: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Drive UniPCMultistepScheduler for as many model evaluations as ours makes; returns the last
    x0 prediction and the flow-space x of every evaluation."""
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

    steps = len(sig) - 1
    ext = _extended(sig)
    if flow:
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=order, solver_type=variant
        )
        sched.set_timesteps(sigmas=ext.numpy())
    else:
        sched = UniPCMultistepScheduler(prediction_type="sample", solver_order=order, solver_type=variant)
        sched.set_timesteps(len(ext))
    # Identical float64 sigmas (diffusers rounds its own to float32 and nudges sigma_0 off 1).
    sched.sigmas = torch.cat([ext, torch.zeros(1, dtype=F64)])
    sched.set_begin_index(0)

    # flow=False: diffusers' VP form with alpha = 1/sqrt(1 + sigma^2), its sigma_t = sigma alpha, so
    # its lambda is -log sigma like ours; its sample is alpha * (our x), its model output our x0.
    scale = [1.0 if flow else 1 / math.sqrt(1 + float(s) ** 2) for s in ext]
    sample, xs, x0 = gs.z * scale[0], [], gs.z
    for k in range(steps):
        x = sample / scale[k]
        xs.append(x)
        x0 = gs.posterior_mean(x, float(ext[k]))
        if k < steps - 1:
            out = (x - x0) / ext[k] if flow else x0  # flow_prediction wants the velocity
            sample = sched.step(out, sched.timesteps[k], sample).prev_sample
    return x0, xs


def _run_ours(gs: Gaussian, sig: torch.Tensor, *, variant: str, order: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    xs = []

    def model(x, sigma, step):
        xs.append(x)
        return gs.model(x, sigma, step)

    return sample_unipc(model, gs.z, sig, variant=variant, max_order=order), xs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= notice inside diffusers' set_timesteps
@pytest.mark.parametrize("steps", [3, 5, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_matches_diffusers_unipc_in_lambda_minus_log_sigma(variant: str, order: int, steps: int):
    """FramePack's UniPC is diffusers' UniPC in the parametrisation where lambda = -log sigma.

    diffusers' data-prediction step, written in y = x / sigma_t, is y_t = y_s - e^lambda_t (...),
    with the same coefficient recipe as spec §5; only lambda differs between parametrisations. Its
    non-flow (VP) mode has lambda = log alpha - log(sigma alpha) = -log sigma, exactly ours, so fed
    the same sigmas (set directly: `set_timesteps(sigmas=...)` is flow-only) and x rescaled by alpha,
    every model input and the result must agree to rounding, for every variant and order.
    Same structure as ours too: the corrector reuses the evaluation at the predicted point, and
    warm-up orders 1, 2, ... (`lower_order_nums`) match spec §5's min(i, order).
    """
    gs = Gaussian((2, 3, 4), seed=5)
    sig = flow_sigmas(steps, shift=7.0)
    ours, ours_xs = _run_ours(gs, sig, variant=variant, order=order)
    theirs, their_xs = _run_diffusers(gs, sig, variant=variant, order=min(order, steps - 1), flow=False)
    assert len(ours_xs) == len(their_xs) == steps
    for a, b in zip(ours_xs, their_xs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-13)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_diffusers_flow_config_agrees_only_where_the_methods_coincide(variant: str, order: int):
    """diffusers' flow mode (flow_prediction, use_flow_sigmas) uses alpha = 1 - sigma, so its
    lambda = log((1 - sigma) / sigma), not FramePack's -log sigma. Consequences, all checked here:
      * the first-order step is the same (both exact for constant x0: x_t = r x + (1 - r) x0,
        r = sigma_t / sigma_s), so the first two model inputs agree for every variant/order;
      * bh2 at order 1 agrees throughout: diffusers' corrector weight alpha_t expm1(-h) equals
        r - 1 = ours' expm1(-h) in either lambda, and rho_c = 1/2 in both;
      * bh1 (B = -h, h depends on lambda) and orders >= 2 (the ratios r_k of lambda gaps differ) do
        not: from the third model input on the two are different solvers of the same ODE.
    diffusers also needs sigma_0 < 1 there (lambda(1) = -inf); it nudges it by 1e-6, as we do here.
    """
    gs = Gaussian((2, 3, 4), seed=5)
    sig = flow_sigmas(8, shift=7.0)
    sig[0] = 1 - 1e-6
    ours, ours_xs = _run_ours(gs, sig, variant=variant, order=order)
    theirs, their_xs = _run_diffusers(gs, sig, variant=variant, order=order, flow=True)
    for a, b in zip(ours_xs[:2], their_xs[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    diff = max((a - b).abs().max().item() for a, b in zip(ours_xs, their_xs))
    if (variant, order) == ("bh2", 1):
        assert diff < 1e-13
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-13)
    else:
        assert diff > 1e-4  # a real method difference, not rounding
        # ... but both are consistent solvers of the same ODE: they end close to each other.
        assert (ours - theirs).abs().max().item() < 0.1


# ------------------------------------------------------------------------------------------ guidance
def _scripted_velocity(log: list, pos: torch.Tensor, neg: torch.Tensor):
    def velocity(x, timestep, pass_name):
        log.append(("velocity", pass_name, x.dtype, timestep))
        return (pos if pass_name == "cond" else neg).to(torch.bfloat16)  # .float() must come back

    return velocity


def test_guidance_cfg_one_is_a_single_pass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, generator=g)
    pos = torch.randn(2, 4, 3, 5, generator=g).to(torch.bfloat16).float()  # exact in bf16
    log: list = []
    model = guided_model(_scripted_velocity(log, pos, pos), cfg=1.0, rescale=0.7)
    sigma = torch.tensor(0.9941, dtype=F64)
    x0 = model(x, sigma, 4)
    assert [e[1] for e in log] == ["cond"]
    _, _, xdtype, ts = log[0]
    assert xdtype == torch.bfloat16
    assert ts.dtype == torch.bfloat16 and ts.shape == (2,)
    assert ts.tolist() == [996.0, 996.0]  # 994.1 in bf16 (spacing 4 between 512 and 1024) -> 996
    x_m = x.to(torch.bfloat16).float()
    torch.testing.assert_close(x0, x_m - 0.9941 * pos, rtol=0, atol=1e-6)  # rescale: identity at cfg 1
    assert x0.dtype == torch.float32


def test_guidance_cfg_combines_cond_then_uncond_and_rescales_by_hand():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, generator=g)
    pos = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16).float()
    neg = (0.5 * torch.randn(2, 3, 4, generator=g)).to(torch.bfloat16).float()
    sigma, cfg = 0.5, 6.0
    xm = x.to(torch.bfloat16).double().numpy()
    p, n = pos.double().numpy(), neg.double().numpy()
    for rescale in (0.0, 0.7, 1.0):
        log: list = []
        model = guided_model(_scripted_velocity(log, pos, neg), cfg=cfg, rescale=rescale)
        x0 = model(x, torch.tensor(sigma), 0)
        assert [e[1] for e in log] == ["cond", "uncond"]
        # Hand computation in numpy float64: out = n + cfg (p - n), then per-sample std rescale.
        out = n + cfg * (p - n)
        ratio = p.reshape(2, -1).std(axis=1, ddof=0) / out.reshape(2, -1).std(axis=1, ddof=0)
        out = rescale * out * ratio[:, None, None] + (1 - rescale) * out
        np.testing.assert_allclose(x0.double().numpy(), xm - sigma * out, rtol=0, atol=2e-5)
    # rescale 1 restores the cond pass's per-sample std exactly.
    v = (x.to(torch.bfloat16).float() - x0) / sigma
    torch.testing.assert_close(v.flatten(1).std(dim=1), pos.flatten(1).std(dim=1), rtol=1e-5, atol=0)


def test_guidance_uses_the_model_dtype_copy_of_x():
    # 1 + 2^-10 is not a bf16 number (8 significant bits): it rounds to 1. With zero velocity x0 == x_m.
    x = torch.full((1, 2, 3), 1 + 2**-10) * torch.tensor([1.0, -3.0, 0.25]).view(1, 1, 3)
    model = guided_model(lambda xm, t, p: torch.zeros(xm.shape), cfg=1.0)
    x0 = model(x, torch.tensor(0.3), 0)
    expected = torch.tensor([1.0, -3.0, 0.25]).expand(1, 2, 3)
    assert torch.equal(x0, expected) and not torch.equal(x0, x)
    # An fp32 "model" dtype keeps x as is.
    fp32_model = guided_model(lambda xm, t, p: torch.zeros(xm.shape), model_dtype=torch.float32)
    assert torch.equal(fp32_model(x, torch.tensor(0.3), 0), x)


def test_on_pass_reports_step_and_pass_before_each_velocity_call():
    log: list = []
    velocity = _scripted_velocity(log, torch.zeros(1, 2), torch.ones(1, 2))
    model = guided_model(velocity, cfg=2.0, on_pass=lambda step, name: log.append(("on_pass", step, name)))
    sample_unipc(model, torch.randn(1, 2), flow_sigmas(3, shift=3.0))
    expected = []
    for i in range(3):
        expected += [("on_pass", i, "cond"), ("velocity", "cond"), ("on_pass", i, "uncond"), ("velocity", "uncond")]
    assert [e[:3] if e[0] == "on_pass" else e[:2] for e in log] == expected

    log.clear()
    model = guided_model(velocity, cfg=1.0, on_pass=lambda step, name: log.append(("on_pass", step, name)))
    sample_euler(model, torch.randn(1, 2), flow_sigmas(3, shift=3.0))
    assert [e[:3] if e[0] == "on_pass" else e[:2] for e in log] == [
        x for i in range(3) for x in (("on_pass", i, "cond"), ("velocity", "cond"))
    ]


# ------------------------------------------------------------------------------------------ loop
@pytest.mark.parametrize("sampler", [sample_unipc, sample_euler])
def test_callback_sees_every_step_and_the_result_is_the_last_x0(sampler):
    gs = Gaussian((3, 4), seed=2)
    sig = flow_sigmas(6, shift=7.0)
    calls, infos = [], []

    def model(x, sigma, step):
        assert sigma.ndim == 0
        calls.append((step, sigma.item(), x.dtype))
        return gs.model(x, sigma, step).float()

    out = sampler(model, gs.z.float(), sig, callback=infos.append)
    assert [c[0] for c in calls] == list(range(6))
    assert [c[1] for c in calls] == sig[:-1].tolist()  # the final 0 is never evaluated
    assert all(c[2] == torch.float32 for c in calls)
    assert all(isinstance(i, StepInfo) for i in infos)
    assert [(i.step, i.total) for i in infos] == [(k, 6) for k in range(6)]
    assert [i.sigma for i in infos] == sig[:-1].tolist()
    assert torch.equal(infos[0].x, gs.z.float())
    assert out.dtype == torch.float32 and all(i.x.dtype == torch.float32 for i in infos)
    assert torch.equal(out, infos[-1].denoised)


def test_unipc_in_float32_stays_close_to_float64():
    gs = Gaussian((4, 16), seed=4)
    sig = flow_sigmas(25, shift=7.0)
    ref = sample_unipc(gs.model, gs.z, sig)
    out = sample_unipc(lambda x, s, i: gs.model(x.double(), s, i).float(), gs.z.float(), sig)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


class Cancelled(Exception):
    pass


@pytest.mark.parametrize("sampler", [sample_unipc, sample_euler])
def test_check_cancel_stops_before_the_next_model_call(sampler):
    gs = Gaussian((4,), seed=1)
    n_model, n_callback, checks = [0], [0], [0]

    def model(x, sigma, step):
        n_model[0] += 1
        return gs.model(x, sigma, step)

    def check_cancel():
        checks[0] += 1
        if checks[0] == 4:  # the start of step 3
            raise Cancelled

    def callback(info):
        n_callback[0] += 1

    with pytest.raises(Cancelled):
        sampler(model, gs.z, flow_sigmas(10, shift=7.0), callback=callback, check_cancel=check_cancel)
    assert (n_model[0], n_callback[0], checks[0]) == (3, 3, 4)


# ------------------------------------------------------------------------------------------ arguments
def _model(x, sigma, step):
    return x


GOOD = flow_sigmas(4, shift=3.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: flow_sigmas(0, shift=3.0), "steps must be an int >= 1"),
        (lambda: flow_sigmas(2.5, shift=3.0), "steps must be an int >= 1"),
        (lambda: flow_sigmas(10), "needs seq_len"),
        (lambda: flow_sigmas(10, shift=0.0), "shift must be a finite number > 0"),
        (lambda: flow_sigmas(10, shift=float("nan")), "shift must be a finite number > 0"),
        (lambda: flow_shift_mu(0), "seq_len must be a positive int"),
        (lambda: sample_unipc(_model, torch.zeros(2), GOOD, variant="bh3"), "variant must be one of"),
        (lambda: sample_unipc(_model, torch.zeros(2), GOOD, max_order=0), "max_order must be an int in 1..3"),
        (lambda: sample_unipc(_model, torch.zeros(2), GOOD, max_order=4), "max_order must be an int in 1..3"),
        (lambda: sample_unipc(_model, torch.zeros(2), GOOD.view(1, -1)), "1-D tensor of length >= 2"),
        (lambda: sample_unipc(_model, torch.zeros(2), GOOD[:1]), "1-D tensor of length >= 2"),
        (lambda: sample_unipc(_model, torch.zeros(2), GOOD.flip(0)), "strictly decreasing"),
        (lambda: sample_unipc(_model, torch.zeros(2), torch.tensor([1.0, 0.5, 0.5, 0.0])), "strictly decreasing"),
        (lambda: sample_unipc(_model, torch.zeros(2), torch.tensor([1.0, 0.5, -0.1])), "finite and >= 0"),
        (lambda: sample_unipc(_model, torch.zeros(2), torch.tensor([1.0, float("nan"), 0.0])), "finite and >= 0"),
        (lambda: sample_unipc(_model, torch.zeros(2), torch.tensor([2, 1, 0])), "floating-point tensor"),
        (lambda: sample_unipc(_model, torch.zeros(2, dtype=torch.long), GOOD), "noise must be a floating-point"),
        (lambda: sample_euler(_model, torch.zeros(2), torch.tensor([0.5, 0.7, 0.0])), "strictly decreasing"),
        (lambda: sample_euler(_model, torch.zeros(2), GOOD, callback=3), "callback must be callable"),
        (lambda: guided_model(_model, cfg=-1.0), "cfg must be a finite number >= 0"),
        (lambda: guided_model(_model, rescale=1.5), r"rescale must be a number in \[0, 1\]"),
        (lambda: guided_model(_model, model_dtype=torch.int32), "model_dtype must be a floating"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
