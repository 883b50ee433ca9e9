"""The strict virtual-device mode (liteppo_mcore/parallel/strict_device.py): tensors carry the device
they would have on a GPU, and host/device mixes fail as CUDA would, in forward and backward ops.

These tests turn the mode on for their process (it is on for the whole suite under
tools/run_tests.sh and CI anyway). Each "bug put back" test runs the buggy form of a real defect the
mode exists to catch next to the fixed form, and asserts that only the buggy one fails.
"""

import pytest
import torch

from liteppo_mcore.parallel import cpu_compat, strict_device
from liteppo_mcore.parallel.strict_device import StrictDeviceError, is_device, placement
from tests.distributed.spawn import run_gloo

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the mode only exists where CUDA is absent")


@pytest.fixture(autouse=True)
def strict():
    assert cpu_compat.install(strict=True)
    assert cpu_compat.is_strict()


def test_factories_and_moves_place_as_on_a_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert torch.cuda.current_device() == 3
    d = torch.ones(4, device="cuda")
    h = torch.ones(4)
    assert is_device(d) and not is_device(h)
    assert d.device == torch.device("cuda", 3) and d.is_cuda and d.get_device() == 3
    assert h.device == torch.device("cpu") and not h.is_cuda and h.get_device() == -1
    assert is_device(torch.zeros(2, device=torch.cuda.current_device()))  # an int index
    assert is_device(torch.empty(2, device=torch.device("cuda", 0)))
    assert is_device(torch.zeros_like(d)) and not is_device(torch.zeros_like(d, device="cpu"))
    assert is_device(h.new_zeros(3, device="cuda")) and is_device(d.new_zeros(3))
    assert d.type() == "torch.cuda.FloatTensor" and h.type() == "torch.FloatTensor"
    # moves between host and device copy, as on a GPU (never an alias)
    up = h.cuda()
    assert is_device(up) and up.data_ptr() != h.data_ptr()
    h.add_(1)
    assert up.tolist() == [1.0] * 4
    down = d.cpu()
    assert not is_device(down) and down.data_ptr() != d.data_ptr()
    assert d.to("cuda") is d and h.to("cpu") is h and h.cpu() is h and d.cuda() is d
    assert is_device(h.to(d)) and not is_device(d.to(h))
    assert is_device(h.to("cuda", torch.float64)) and h.to("cuda", torch.float64).dtype == torch.float64
    assert h.to("meta").device.type == "meta"
    with pytest.raises(TypeError, match="can't convert cuda:3 device type tensor to numpy"):
        d.numpy()


def test_views_parameters_inplace_and_autograd_keep_the_device():
    d = torch.randn(4, 3, device="cuda")
    assert is_device(d[1:]) and is_device(d.t()) and is_device(d.view(12)) and is_device(d.data)
    p = torch.nn.Parameter(d)
    assert is_device(p)
    d.mul_(2)
    assert is_device(d)
    module = torch.nn.Linear(3, 2)
    assert not is_device(module.weight)
    module.cuda()
    assert is_device(module.weight) and is_device(module.bias) and module.weight.is_cuda
    out = module(torch.randn(5, 3, device="cuda")).sum()
    out.backward()
    assert is_device(module.weight.grad) and is_device(out)
    module.to("cpu")
    assert not is_device(module.weight)


def test_gradients_flow_back_across_moves():
    w = torch.randn(3, device="cuda", requires_grad=True)
    host = (w * 2).cpu()  # e.g. a loss computed partly on the host
    index = torch.tensor([0, 2])
    (host[index].sum() * torch.ones(())).backward()  # the backward of .cpu() must land on the device
    assert is_device(w.grad) and w.grad.tolist() == [2.0, 0.0, 2.0]
    h = torch.randn(2, requires_grad=True)
    (h.cuda().double() ** 2).sum().backward()
    assert not is_device(h.grad) and h.grad.dtype == torch.float32


def test_pinned_host_memory():
    pinned = torch.empty(3, pin_memory=True)
    assert pinned.is_pinned() and not is_device(pinned)
    assert not torch.ones(2).is_pinned()
    assert torch.ones(2).pin_memory().is_pinned()
    with pytest.raises(StrictDeviceError, match="only dense CPU tensors can be pinned"):
        torch.ones(2, device="cuda").pin_memory()


def test_a_mix_fails_naming_the_op_the_shapes_and_where_each_input_was_placed():
    d = torch.ones(8, device="cuda")
    h = torch.ones(8, 1)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device") as info:
        d * h
    text = str(info.value)
    assert "aten.mul.Tensor" in text
    assert "float32[8] on cuda:0" in text and "float32[8, 1] on cpu" in text
    assert text.count("test_strict_device.py:") == 2  # both inputs' placements point here


def test_cuda_exceptions_are_kept():
    d = torch.arange(6.0, device="cuda")
    scalar = torch.tensor(2.0)
    assert is_device(d * scalar) and is_device(torch.where(d > 2, d, scalar))  # 0-dim host operands
    assert is_device(d[torch.tensor([0, 2])])  # host index tensors
    d[torch.tensor([1])] = torch.tensor(5.0)
    assert d[1].item() == 5.0
    d.copy_(torch.zeros(6))  # copies may cross
    with pytest.raises(StrictDeviceError, match="aten.cat"):
        torch.cat([d, torch.zeros(1)])
    with pytest.raises(StrictDeviceError, match="aten.gather"):
        d.view(2, 3).gather(1, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(StrictDeviceError, match="aten.index_select"):
        d.index_select(0, torch.tensor([0]))
    with pytest.raises(StrictDeviceError, match="aten.where"):
        torch.where(torch.tensor(True), d, d)  # the condition may not be a host scalar
    with pytest.raises(StrictDeviceError, match="aten.embedding"):
        torch.nn.functional.embedding(torch.tensor([0, 1]), torch.randn(4, 2, device="cuda"))


def test_backward_ops_are_checked():
    class HostGrad(torch.autograd.Function):
        """A backward that (wrongly) combines the gradient with a host tensor."""

        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.full(grad.shape, 2.0)

    x = torch.ones(3, device="cuda", requires_grad=True)
    y = HostGrad.apply(x).sum()  # the forward is fine
    with pytest.raises(StrictDeviceError, match="aten.mul.Tensor"):
        y.backward()


# --------------------------------------------------------------------------------- bugs put back

def test_bug_a_module_with_a_cpu_created_parameter_fails_with_device_inputs():
    """models/layers.py created its norm weights without a device (megatron put everything else on the
    GPU). The buggy construction fails at the first forward; the fixed one runs."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from liteppo_mcore.models.layers import RMSNorm

    def config(cpu_init):
        return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=cpu_init)

    hidden = torch.randn(3, 8, device="cuda")
    fixed = RMSNorm(config(False), 8)
    assert is_device(fixed.weight) and is_device(fixed(hidden))
    buggy = RMSNorm(config(True), 8)  # the weight where the old code made it: on the host
    assert not is_device(buggy.weight)
    with pytest.raises(StrictDeviceError, match=r"input 0: float32\[8\] on cpu, placed at .*layers.py"):
        buggy(hidden)


def test_bug_c_stacking_a_host_scalar_with_device_scalars_fails():
    """update/loss.py built kl_loss with torch.zeros(()) and stacked it with device sums."""
    pg_loss = torch.randn(4, device="cuda").sum()
    parts = [pg_loss.reshape(()), torch.ones((), device="cuda")]
    with pytest.raises(StrictDeviceError, match="aten.stack"):
        torch.stack(parts + [torch.zeros((), dtype=pg_loss.dtype)])
    assert is_device(torch.stack(parts + [pg_loss.new_zeros(())]))


def test_bug_c_in_the_real_actor_loss():
    """actor_loss with use_kl_loss false, the LitePPO default: its sums must stack on the device."""
    from liteppo_mcore.config import load_config
    from liteppo_mcore.update import loss as L

    cfg = load_config(overrides=["use_kl_loss=false", "entropy_coef=0.0"])
    s = L.LossSettings.from_config(cfg)
    b, t, v = 2, 5, 7
    logits = torch.randn(b, t, v, device="cuda", requires_grad=True)
    mask = torch.ones(b, t, dtype=torch.bool, device="cuda")
    mb = {"labels": torch.randint(0, v, (b, t), device="cuda"), "mask": mask,
          "advantages": torch.randn(b, t, device="cuda"), "seq_token_counts": torch.full((b,), t, device="cuda")}
    groups = type("G", (), {"tp_group": None, "tp_rank": 0})()
    d = L.Denominators(num_tokens=torch.tensor(10.0, dtype=torch.float64, device="cuda"),
                       num_seqs=torch.tensor(2.0, dtype=torch.float64, device="cuda"))
    loss, metrics = L.actor_loss(logits, mb, s, d, groups, vocab_size=v)
    assert is_device(loss) and is_device(metrics["sums"])
    loss.backward()
    assert is_device(logits.grad)


# --------------------------------------------------------------------------------- collectives

def collectives_worker(rank, world_size):
    import torch.distributed as dist

    cpu_compat.install(strict=True)
    out = {}
    d = torch.ones(2, device="cuda")
    dist.all_reduce(d)
    out["device_ok"] = d.tolist()
    try:
        dist.all_reduce(torch.ones(2))
        out["host_world"] = "passed"
    except StrictDeviceError as e:
        out["host_world"] = str(e)
    gloo = dist.new_group([0, 1], backend="gloo")
    h = torch.ones(2)
    dist.all_reduce(h, group=gloo)
    out["host_gloo"] = h.tolist()
    objs = [None, None]
    dist.all_gather_object(objs, {"rank": rank})
    out["objects"] = objs
    from liteppo_mcore.parallel.device import collective_device, is_host_group

    out["placement"] = (is_host_group(gloo), is_host_group(None), str(collective_device(None)))
    from liteppo_mcore.parallel.reducer import make_allreduce_sum

    summed = make_allreduce_sum(dist.group.WORLD)(torch.ones(2))  # a host statistic, reduced over "NCCL"
    out["reducer"] = (summed.tolist(), is_device(summed))
    from liteppo_mcore.parallel.mcore import ParallelGroups
    from liteppo_mcore.rollout.metrics import logprob_abs_diff

    groups = ParallelGroups(None, None, None, dist.group.WORLD, dist.group.WORLD, 0, 1, 0, 1, 0, 1, rank, 2)
    mask = torch.tensor([[True, rank == 0]])
    out["abs_diff"] = logprob_abs_diff(torch.zeros(1, 2), torch.full((1, 2), 0.5), mask, groups=groups)
    return out


def test_collectives_over_nccl_groups_refuse_host_tensors():
    results = run_gloo(collectives_worker, 2, env={"LITEPPO_STRICT_DEVICE": "1"})
    for rank, r in enumerate(results):
        assert r["device_ok"] == [2.0, 2.0]
        assert "c10d.allreduce_.default over process group '0'" in r["host_world"]
        assert "NCCL only takes CUDA tensors" in r["host_world"]
        assert r["host_gloo"] == [2.0, 2.0]
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["placement"] == (True, False, f"cuda:{rank}")
        assert r["reducer"] == ([2.0, 2.0], False)  # sent on the device, handed back on the host
        assert r["abs_diff"] == 0.5  # rollout/metrics.py's own DP reduction of host statistics


def test_the_environment_switch(monkeypatch):
    for value, wanted in (("1", True), ("true", True), ("on", True), ("0", False), ("", False)):
        monkeypatch.setenv("LITEPPO_STRICT_DEVICE", value)
        assert strict_device.requested() is wanted
    monkeypatch.delenv("LITEPPO_STRICT_DEVICE")
    assert not strict_device.requested()
    assert placement(torch.ones(1, device="cuda")).kind == strict_device.DEVICE
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "5")  # srun without torchrun
    assert torch.cuda.current_device() == 5
