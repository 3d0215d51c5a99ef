"""The learned router's variants (model.router.*): each one's defining invariant, in-process where it
can be, with real gloo processes for the global balance, and through the real launcher for layouts."""

from __future__ import annotations

import dataclasses
import math
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from shodh.model.config import ModelConfig, RouterConfig
from shodh.model.moe import MoEFFN, Router, RoutingTelemetry, update_router_biases
from shodh.model.transformer import LatentTransformer

E, D, N = 4, 8, 8  # experts, width, tokens per sample


def ffn(router: RouterConfig, capacity_factor: float = 4.0, seed: int = 0) -> MoEFFN:
    torch.manual_seed(seed)
    return MoEFFN(D, 16, E, 1, capacity_factor, capacity_factor, 0, None, False, layer=0, expert_offset=0, seed=seed,
                  std=0.02, out_std=0.02, router=router, tokens=N)


def gate_of(router: RouterConfig, **kw) -> Router:
    gate = ffn(router, **kw).gate
    assert isinstance(gate, Router)
    return gate


def test_bias_balancing_moves_a_skewed_load_toward_uniform():
    gate = gate_of(RouterConfig(balance="bias", bias_rate=0.04))
    v = torch.ones(D) / math.sqrt(D)
    with torch.no_grad():
        gate.wg.weight.zero_()
        gate.wg.weight[0] = v  # every token prefers expert 0 by ~1 logit
    gen = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(120):
        x_GD = v + 0.3 * torch.randn(64, D, generator=gen)
        out = gate(x_GD, None, True)
        fractions.append(out[6].float() / 64)
        gate.update_bias()
    first, last = fractions[0], torch.stack(fractions[-30:]).mean(0)
    assert first[0] > 0.95  # skewed: expert 0 takes (nearly) everything
    assert last.max() < 0.4 and last.min() > 0.1, last  # balanced within the bias rate's granularity
    assert gate.bias_E[0] < gate.bias_E[1:].min()  # only differences matter: the overloaded expert sank
    # The bias chooses, it never weights: the gate value is softmax of the unbiased logits.
    x_GD = v + 0.3 * torch.randn(64, D, generator=gen)
    l_aux, _, _, idx, _, gates1, _ = gate(x_GD, None, True)
    probs_GE = torch.softmax(x_GD @ gate.wg.weight.T, dim=1)
    kept = idx[0] >= 0
    torch.testing.assert_close(gates1[0][kept], probs_GE[kept, idx[0][kept].long()])
    assert l_aux.item() == 0.0  # loss-free


def test_sample_scope_routes_whole_samples_and_drops_them_whole():
    gate = gate_of(RouterConfig(scope="sample"), capacity_factor=0.5)
    gen = torch.Generator().manual_seed(1)
    B = 12
    x_GD = torch.randn(B * N, D, generator=gen) + 3 * torch.randn(B, 1, D, generator=gen).repeat(1, N, 1).reshape(-1, D)
    _, capacity, _, idx, loc, gates1, counts = gate(x_GD, None, True)
    idx_BN = idx[0].reshape(B, N)
    assert all(len(set(row.tolist())) == 1 for row in idx_BN)  # one expert per sample, or the whole sample dropped
    pooled_BD = x_GD.reshape(B, N, D).mean(1)
    choice_B = (pooled_BD @ gate.wg.weight.T).argmax(1)
    kept_B = idx_BN[:, 0] >= 0
    assert torch.equal(idx_BN[kept_B, 0].long(), choice_B[kept_B])
    per_expert = math.ceil(B / E * 0.5)  # capacity in whole samples
    assert int(capacity) == per_expert * N
    for e in range(E):
        assert (idx_BN[:, 0] == e).sum() == min(per_expert, int((choice_B == e).sum()))
        slots = loc[0][idx[0] == e]
        assert sorted(slots.tolist()) == list(range(len(slots)))  # consecutive slots within capacity
    assert (~kept_B).any()  # the test does exercise dropping
    assert counts.sum() == B * N
    # Through the whole model and DeepSpeed's dispatch: every token of a sample lands on one expert.
    cfg = ModelConfig(patch=4, dim=32, depth=2, heads=2, expert_dim=48, num_experts=E, moe_every=1, capacity_factor=4.0,
                      min_capacity=0, router=RouterConfig(scope="sample"))
    torch.manual_seed(0)
    model = LatentTransformer(cfg, 4)
    tel = RoutingTelemetry(model, [f"s{i}" for i in range(3)], E)
    with tel.labels(torch.arange(3)):
        model(torch.randn(3, 4, 16, 16, 16))
    for k in range(3):
        for l in range(cfg.depth):
            assert (tel.counts_KLE[k, l] > 0).sum() == 1
    tel.close()


@pytest.mark.parametrize("scope", ["token", "sample"])
def test_z_loss_value_and_gradient_match_the_closed_form(scope):
    gate = gate_of(RouterConfig(z_loss=1e-3, scope=scope))
    with torch.no_grad():
        gate.wg.weight.normal_(0, 0.5)
    x_GD = torch.randn(6 * N, D, generator=torch.Generator().manual_seed(2))
    gate(x_GD, None, True)
    (grad,) = torch.autograd.grad(gate.z, gate.wg.weight)
    rows_RD = x_GD.reshape(6, N, D).mean(1) if scope == "sample" else x_GD
    logits_RE = rows_RD @ gate.wg.weight.detach().T
    lse_R = torch.logsumexp(logits_RE, 1)
    assert gate.z.item() == pytest.approx((lse_R**2).mean().item(), rel=1e-6)
    # d/dW mean_r lse_r^2 = 2/R Σ_r lse_r softmax(l_r) x_r^T
    expected_ED = 2 / len(rows_RD) * (lse_R[:, None] * torch.softmax(logits_RE, 1)).T @ rows_RD
    torch.testing.assert_close(grad, expected_ED, rtol=1e-5, atol=1e-7)


def test_z_loss_enters_the_training_objective_with_its_coefficient():
    cfg = ModelConfig(patch=4, dim=32, depth=2, heads=2, expert_dim=48, num_experts=E, moe_every=1,
                      router=RouterConfig(z_loss=2e-3))
    torch.manual_seed(0)
    _, loss = LatentTransformer(cfg, 4)(torch.randn(2, 4, 16, 16, 16))
    assert loss.z.item() > 0
    assert loss.weighted(cfg).item() == pytest.approx(cfg.aux_loss_coef * loss.balance.item() + 2e-3 * loss.z.item())


def _global_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    gate = gate_of(RouterConfig(balance="global"))
    with torch.no_grad():
        gate.wg.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    x_GD = torch.randn(32, D, generator=torch.Generator().manual_seed(10 + rank)) + rank  # ranks see different loads
    l_aux = gate(x_GD, None, True)[0]
    local = gate_of(RouterConfig(balance="switch"))
    local.load_state_dict(gate.state_dict())
    torch.save({"global": l_aux.item(), "local": local(x_GD, None, True)[0].item(), "w": gate.wg.weight.detach()},
               f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_global_balance_equals_local_alone_and_counts_the_global_load_with_two_ranks(tmp_path):
    x_GD = torch.randn(32, D, generator=torch.Generator().manual_seed(4))
    alone = gate_of(RouterConfig(balance="global"))
    switch = gate_of(RouterConfig(balance="switch"))
    switch.load_state_dict(alone.state_dict())
    assert alone(x_GD, None, True)[0].item() == pytest.approx(switch(x_GD, None, True)[0].item(), rel=1e-7)

    init = f"file://{tempfile.mkdtemp()}/rendezvous"
    mp.spawn(_global_worker, args=(2, init, str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    w = got[0]["w"]
    xs = [torch.randn(32, D, generator=torch.Generator().manual_seed(10 + r)) + r for r in range(2)]
    masks = [torch.nn.functional.one_hot((x @ w.T).argmax(1), E).float() for x in xs]
    ce_E = torch.cat(masks).mean(0)  # the load over both ranks' tokens
    for r in range(2):
        me_E = torch.softmax(xs[r] @ w.T, 1).mean(0)
        assert got[r]["global"] == pytest.approx(E * (me_E * ce_E).sum().item(), rel=1e-5)
        assert got[r]["local"] == pytest.approx(E * (me_E * masks[r].mean(0)).sum().item(), rel=1e-5)
        assert abs(got[r]["global"] - got[r]["local"]) > 1e-3  # the loads differ, so must the losses


def test_fixed_routers_refuse_learned_router_options():
    from shodh.config import from_dict
    from shodh.errors import ConfigError

    with pytest.raises(ConfigError, match="model.router.kind: a hash router is fixed"):
        from_dict(ModelConfig, {"router": {"kind": "hash", "balance": "bias"}}, "model")
    with pytest.raises(ConfigError, match="model.router: expected a mapping"):
        from_dict(ModelConfig, {"router": "hash"}, "model")
    with pytest.raises(ConfigError, match="model.router.balance: must be one of"):
        from_dict(ModelConfig, {"router": {"balance": "loss-free"}}, "model")


def test_bias_state_is_module_state():
    """The bias is a persistent buffer (checkpointed with the model), the pending load is not."""
    cfg = ModelConfig(patch=4, dim=32, depth=2, heads=2, expert_dim=48, num_experts=E, moe_every=1,
                      router=RouterConfig(balance="bias"))
    model = LatentTransformer(cfg, 4)
    model(torch.randn(2, 4, 16, 16, 16))
    update_router_biases(model)
    state = model.state_dict()
    biases = [k for k in state if k.endswith("gate.bias_E")]
    assert len(biases) == cfg.depth and not any(k.endswith("load_E") for k in state)
    assert all(state[k].abs().sum() > 0 for k in biases)
    fresh = LatentTransformer(dataclasses.replace(cfg), 4)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in biases)


def test_study_router_arms_set_their_router_fields_and_are_opt_in():
    from shodh.config import load_config
    from shodh.study.arms import arm_config, select

    domains = ["channel", "porous"]
    base = load_config("smoke", ["model.router.z_loss=0.002"])
    assert not any(a.optional for a in select([], domains))  # the default study runs no variant
    arms = {a.name: a for a in select(["moe_mixed", "moe_bias", "moe_sample", "moe_random", "moe_oracle"], domains)}
    routed = {name: arm_config(base, arm, domains, 0).model.router for name, arm in arms.items()}
    assert routed["moe_mixed"] == RouterConfig(z_loss=0.002)
    assert routed["moe_bias"] == RouterConfig(balance="bias", z_loss=0.002)
    assert routed["moe_sample"] == RouterConfig(scope="sample", z_loss=0.002)
    assert routed["moe_random"] == RouterConfig(kind="hash")  # a fixed router drops the learned-router options
    assert routed["moe_oracle"] == RouterConfig(kind="oracle", domains=2)
