"""diygpt.step_guard: fused AdamW skips a non-finite step on the device, reported afterwards."""

from __future__ import annotations

import pytest
import torch

from diygpt.precision import Precision
from diygpt.step_guard import StepGuard, skips_on_device


def _param_and_adamw(fused: bool, device: str = "cpu"
                     ) -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, device=device))
    return p, torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=fused)


def test_which_optimizers_skip_on_the_device():
    fp32 = Precision("cpu")
    assert skips_on_device(_param_and_adamw(True)[1], fp32)
    assert not skips_on_device(_param_and_adamw(False)[1], fp32)
    assert not skips_on_device(_param_and_adamw(True)[1], fp32, sharded=True)
    assert not skips_on_device(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1), fp32)
    assert not skips_on_device(_param_and_adamw(True)[1], Precision("cpu", "fp16"))


def _step(guard: StepGuard, p: torch.nn.Parameter, grad: float, reports: list) -> None:
    p.grad = torch.full_like(p, grad)
    loss = torch.tensor(grad * 2, device=p.device)
    guard.step(loss, torch.linalg.vector_norm(p.grad), lambda *bad: reports.append(bad))


def test_a_bad_step_leaves_weights_and_moments_alone_and_is_reported_after(device):
    p, opt = _param_and_adamw(True, device)
    guard, reports = StepGuard(opt, Precision(device), on_device=True), []
    _step(guard, p, 1.0, reports)
    guard.check(lambda *bad: reports.append(bad))
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}

    _step(guard, p, float("nan"), reports)
    assert reports == []  # nothing read from the device yet
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in opt.state[p].items())  # step count too
    guard.check(lambda *bad: reports.append(bad))
    assert len(reports) == 1 and torch.isnan(reports[0][0])
    guard.check(lambda *bad: reports.append(bad))
    assert len(reports) == 1  # reported once


def test_good_steps_equal_the_plain_fused_step(device):
    p, opt = _param_and_adamw(True, device)
    q, plain = _param_and_adamw(True, device)
    guard, reports = StepGuard(opt, Precision(device), on_device=True), []
    for grad in (1.0, -0.5, 2.0):
        _step(guard, p, grad, reports)
        guard.check(lambda *bad: reports.append(bad))
        q.grad = torch.full_like(q, grad)
        plain.step()
    assert reports == []
    assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("fused", [False, True])
def test_the_host_check_reports_before_the_update(fused):
    p, opt = _param_and_adamw(fused)
    guard, reports = StepGuard(opt, Precision("cpu"), on_device=False), []
    before = p.detach().clone()
    _step(guard, p, float("inf"), reports)
    assert len(reports) == 1 and torch.equal(p.detach(), before) and p.grad is None
