"""LARS, parameter groups, schedules and the optimiser factory of the trainer."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from streamcoke.train.optim import LARS, Schedule, build_optimizer, param_groups_for, scheduled_value


# --- schedules -------------------------------------------------------------------------------

def test_schedule_endpoints_and_middle():
    kw = dict(warmup_steps=10, final=0.01, start=0.1)
    assert scheduled_value(0, 110, 1.0, **kw) == pytest.approx(0.1)
    assert scheduled_value(10, 110, 1.0, **kw) == pytest.approx(1.0)
    assert scheduled_value(60, 110, 1.0, **kw) == pytest.approx((1.0 + 0.01) / 2)  # cosine midpoint
    assert scheduled_value(110, 110, 1.0, **kw) == pytest.approx(0.01)
    assert scheduled_value(500, 110, 1.0, **kw) == pytest.approx(0.01)  # held after the end


def test_schedule_warmup_is_linear_and_cosine_decreases():
    values = [scheduled_value(s, 100, 2.0, warmup_steps=20) for s in range(101)]
    warm = values[:21]
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert values[5] == pytest.approx(2.0 * 5 / 20)
    decay = values[20:]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert scheduled_value(0, 100, 2.0) == pytest.approx(2.0)  # no warm-up: starts at base


def test_schedule_dataclass_round_trips():
    s = Schedule(total_steps=50, base=0.5, warmup_steps=5, final=0.001)
    record = json.loads(json.dumps(dataclasses.asdict(s)))
    again = Schedule(**record)
    assert again == s
    assert [again(i) for i in range(60)] == [scheduled_value(i, 50, 0.5, warmup_steps=5, final=0.001)
                                             for i in range(60)]


@pytest.mark.parametrize("args, match", [
    ((0, 0, 1.0, 0), "total_steps"),
    ((0, 10, 1.0, 11), "warmup_steps"),
    ((-1, 10, 1.0, 0), "step"),
])
def test_schedule_rejects_bad_numbers(args, match):
    step, total, base, warmup = args
    with pytest.raises(ValueError, match=match):
        scheduled_value(step, total, base, warmup_steps=warmup)
    if match != "step":
        with pytest.raises(ValueError, match=match):
            Schedule(total_steps=total, base=base, warmup_steps=warmup)


# --- LARS ------------------------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_param_groups_split_weights_from_biases_and_norms():
    model = _model()
    groups = param_groups_for(model, 1e-4)
    assert [g["lars_exclude"] for g in groups] == [False, True]
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    model[0].weight.requires_grad_(False)
    assert len(param_groups_for(model, 0.0)[0]["params"]) == 1  # frozen weights left out


def test_lars_step_has_the_trust_ratio_size():
    w = nn.Parameter(torch.randn(5, 4))
    w.grad = torch.randn(5, 4) * 100
    before = w.detach().clone()
    LARS([w], lr=0.5, momentum=0.0, trust_coefficient=0.01).step()
    # ||dw|| = lr * trust * ||w|| whatever the gradient's scale.
    moved = torch.linalg.vector_norm(w.detach() - before).item()
    assert moved == pytest.approx(0.5 * 0.01 * before.norm().item(), rel=1e-5)


def test_lars_reduces_a_quadratic_loss():
    torch.manual_seed(1)
    target = torch.randn(10, 10)
    w = nn.Parameter(torch.randn(10, 10))
    b = nn.Parameter(torch.zeros(10))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True}], lr=1.0, momentum=0.9,
               trust_coefficient=0.002)

    def loss_fn():
        return ((w - target) ** 2).sum() + ((b - 1.0) ** 2).sum()

    start = loss_fn().item()
    for _ in range(200):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.05 * start


def test_excluded_parameters_are_not_decayed():
    w, b = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True}], lr=0.1, momentum=0.0,
               weight_decay=0.5)
    w.grad, b.grad = torch.zeros(3, 3), torch.zeros(3)
    opt.step()
    assert torch.equal(b, torch.ones(3))  # no gradient and no decay: unchanged
    assert torch.allclose(w, torch.full((3, 3), 1 - 0.1 * 0.5))  # zero gradient: plain decay step


def test_state_dict_round_trip_gives_the_same_next_step():
    torch.manual_seed(2)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = _model()
    opt = LARS(param_groups_for(model, 1e-3), lr=0.3)

    def step(m, o):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    clone = copy.deepcopy(model)
    opt2 = LARS(param_groups_for(clone, 1e-3), lr=0.3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as saved and loaded: no shared buffers
    step(model, opt)
    step(clone, opt2)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_lars_rejects_bad_hyper_parameters():
    p = [nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match="momentum"):
        LARS(p, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        LARS(p, lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        LARS(p, lr=0.1, weight_decay=-1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lars_on_cuda_matches_cpu():
    torch.manual_seed(3)
    w_cpu = nn.Parameter(torch.randn(4, 4))
    w_gpu = nn.Parameter(w_cpu.detach().cuda())
    grad = torch.randn(4, 4)
    for w in (w_cpu, w_gpu):
        opt = LARS([w], lr=0.5, weight_decay=1e-2)
        for _ in range(2):
            w.grad = grad.to(w.device)
            opt.step()
    assert torch.allclose(w_cpu, w_gpu.cpu(), atol=1e-6)


# --- factory ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("lars", LARS), ("SGD", torch.optim.SGD),
                                       ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    model = _model()
    opt = build_optimizer(name, param_groups_for(model, 1e-4), lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())


def test_build_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*lars, sgd, adamw"):
        build_optimizer("adam", _model().parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
