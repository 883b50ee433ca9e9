"""Moving idle optimizer states and the reference off the GPU (train.offload_between_phases)."""

import pytest
import torch

from liteppo_mcore.parallel import cpu_compat
from liteppo_mcore.parallel.device import on_gpu
from liteppo_mcore.parallel.strict_device import is_device
from liteppo_mcore.update.offload import (
    module_on_device,
    move_module,
    move_optimizer_state,
    offload_enabled,
    optimizer_state_on_device,
)


class _Wrapped:  # the shape of a megatron optimizer: the torch optimizer in `.optimizer`
    def __init__(self, inner):
        self.optimizer = inner


def _adam_after_a_step():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    return p, opt


def test_every_moment_moves_and_the_step_count_stays():
    p, opt = _adam_after_a_step()
    chained = type("Chained", (), {"chained_optimizers": [_Wrapped(opt)]})()
    moved = move_optimizer_state(chained, torch.device("meta"))
    state = opt.state[p]
    assert moved == 2 * p.numel() * 4
    assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
    assert state["step"].device.type == "cpu"
    assert p.device.type == "cpu"  # parameters (and master weights) never move
    assert move_optimizer_state(chained, torch.device("meta")) == 0  # already there


def test_offload_follows_the_gpu_answer():
    assert offload_enabled(True) == on_gpu()
    assert not offload_enabled(False)


@pytest.fixture
def strict():
    if torch.cuda.is_available():
        pytest.skip("the strict virtual-device mode exists only without CUDA")
    cpu_compat.install(strict=True)


def test_states_go_straight_into_pinned_host_memory_and_back(strict, monkeypatch):
    """GPU path under the strict mode: host copies land in pinned buffers made for them (never a
    pageable copy pinned afterwards), and come back as device tensors."""
    assert offload_enabled(True)
    p, opt = _adam_after_a_step()
    p.data = p.data.cuda()
    for key in ("exp_avg", "exp_avg_sq"):
        opt.state[p][key] = opt.state[p][key].cuda()
    before = {k: v.clone() for k, v in opt.state[p].items()}

    def no_pageable_then_pinned(self, *a, **k):
        raise AssertionError("Tensor.pin_memory() copies twice (pageable, then pinned)")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pageable_then_pinned)
    wrapped = _Wrapped(opt)
    move_optimizer_state(wrapped, torch.device("cpu"))
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[p][key].is_pinned() and not is_device(opt.state[p][key])
    move_optimizer_state(wrapped, torch.device("cuda", torch.cuda.current_device()))
    assert all(is_device(opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert all(torch.equal(opt.state[p][k].cpu(), v.cpu()) for k, v in before.items())


def test_the_reference_moves_the_same_way(strict, monkeypatch):
    model = torch.nn.Linear(3, 3).cuda()
    model.register_buffer("scale", torch.ones(3, device="cuda"))
    weight = model.weight.detach().cpu().clone()
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: (_ for _ in ()).throw(AssertionError("pageable")))
    move_module(model, torch.device("cpu"))
    assert all(t.is_pinned() and not is_device(t) for t in (model.weight, model.bias, model.scale))
    move_module(model, torch.device("cuda", 0))
    assert all(is_device(t) for t in (model.weight, model.bias, model.scale))
    assert torch.equal(model.weight.cpu(), weight)


def test_the_context_managers_bring_state_in_for_the_block_and_out_after_it(strict):
    """On the device inside the block, on the host after it, also when the block raises; with offload off
    nothing moves."""
    model = torch.nn.Linear(3, 3)
    p, opt = _adam_after_a_step()
    wrapped = _Wrapped(opt)
    with module_on_device(model, True) as inside, optimizer_state_on_device(wrapped, True):
        assert inside is model and all(is_device(t) for t in model.parameters())
        assert all(is_device(opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert not any(is_device(t) for t in model.parameters())
    assert not any(is_device(opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq"))
    with pytest.raises(RuntimeError, match="in the block"):
        with module_on_device(model, True), optimizer_state_on_device(wrapped, True):
            raise RuntimeError("in the block")
    assert not any(is_device(t) for t in model.parameters())
    assert not any(is_device(opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq"))
    with module_on_device(model, False), optimizer_state_on_device(wrapped, False):
        assert not any(is_device(t) for t in model.parameters())
        assert not is_device(opt.state[p]["exp_avg"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_states_round_trip_through_the_cpu():
    p, opt = _adam_after_a_step()
    p.data = p.data.cuda()
    for key in ("exp_avg", "exp_avg_sq"):
        opt.state[p][key] = opt.state[p][key].cuda()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    wrapped = _Wrapped(opt)
    move_optimizer_state(wrapped, torch.device("cpu"))
    assert opt.state[p]["exp_avg"].is_pinned()
    move_optimizer_state(wrapped, torch.device("cuda"))
    assert all(torch.equal(opt.state[p][k].cpu(), v.cpu()) for k, v in before.items())
    model = torch.nn.Linear(3, 3).cuda()
    move_module(model, torch.device("cpu"))
    assert model.weight.device.type == "cpu"
