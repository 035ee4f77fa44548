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
    assert not skips_on_device(_param_and_adamw(True)[1], Precision("cpu", "fp16"))
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1, momentum=0.9, fused=True)
    assert not skips_on_device(sgd, fp32)  # its momentum buffer starts at the first step
    # load_state_dict takes "fused" from the saved groups: the groups decide
    p, fused = _param_and_adamw(True)
    fused.load_state_dict(_param_and_adamw(False)[1].state_dict())
    assert not skips_on_device(fused, fp32)


def _step(guard: StepGuard, p: torch.nn.Parameter, grad: float, reports: list) -> None:
    p.grad = torch.full_like(p, grad)
    loss = torch.tensor(grad * 2, device=p.device)
    guard.step(loss, torch.linalg.vector_norm(p.grad), lambda *bad: reports.append(bad))


def test_a_bad_step_leaves_weights_and_moments_alone_and_is_reported_after(device):
    p, opt = _param_and_adamw(True, device)
    guard, reports = StepGuard(opt, Precision(device)), []
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
    assert not hasattr(opt, "found_inf")  # a later unguarded step() is not silenced

    _step(guard, p, 1.0, reports)  # the next good step is applied
    guard.check(lambda *bad: reports.append(bad))
    assert len(reports) == 1 and not torch.equal(p.detach(), before[0])
    assert opt.state[p]["step"].item() == 2


def test_an_unchecked_bad_step_is_reported_by_the_next_step():
    p, opt = _param_and_adamw(True)
    guard, reports = StepGuard(opt, Precision("cpu")), []
    _step(guard, p, float("nan"), reports)
    _step(guard, p, 1.0, reports)
    assert len(reports) == 1 and torch.isnan(reports[0][0])


def test_good_steps_equal_the_plain_fused_step(device):
    p, opt = _param_and_adamw(True, device)
    q, plain = _param_and_adamw(True, device)
    guard, reports = StepGuard(opt, Precision(device)), []
    for grad in (1.0, -0.5, 2.0):
        _step(guard, p, grad, reports)
        guard.check(lambda *bad: reports.append(bad))
        q.grad = torch.full_like(q, grad)
        plain.step()
    assert reports == []
    assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-but-sharded"])
def test_the_host_check_reports_before_the_update(fused):
    p, opt = _param_and_adamw(fused)
    guard, reports = StepGuard(opt, Precision("cpu"), sharded=fused), []
    before = p.detach().clone()
    _step(guard, p, float("inf"), reports)
    assert len(reports) == 1 and torch.equal(p.detach(), before) and p.grad is None


def test_fp16_skip_of_a_nan_loss_lets_the_next_step_run():
    """The scaler's unscale_ of the skipped step is closed, so the next one may unscale."""
    p, opt = _param_and_adamw(False)
    fp16 = Precision("cpu", "fp16")
    guard, reports = StepGuard(opt, fp16), []
    for grad in (float("nan"), 1.0):
        opt.zero_grad()
        loss = (p * grad).sum()
        fp16.backward(loss)
        fp16.unscale(opt)
        guard.step(loss.detach(), torch.linalg.vector_norm(p.grad),
                   lambda *bad: reports.append(bad))
    assert len(reports) == 1
    assert opt.state[p]["step"].item() == 1
