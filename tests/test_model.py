"""Latent transformer and MoE layer, in-process (no process group needed for ep_size=1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from shodh.config import from_dict
from shodh.distributed import DistInfo
from shodh.errors import ConfigError
from shodh.model.config import ModelConfig, RouterConfig
from shodh.model.moe import MoEFFN, RoutingTelemetry, no_token_dropping, normalized_mi
from shodh.model.params import count_params
from shodh.model.transformer import LatentTransformer, forward_flops_per_token
from shodh.train.config import TrainConfig
from shodh.train.engine import check_layout

C = 4
SMALL = ModelConfig(patch=4, dim=32, depth=2, heads=2, expert_dim=48, num_experts=4, moe_every=1,
                    capacity_factor=1.0, min_capacity=0)


def model(cfg: ModelConfig, **kw) -> LatentTransformer:
    torch.manual_seed(0)
    return LatentTransformer(cfg, C, **kw)


def experts(m: LatentTransformer, block: int) -> list:
    return list(m.blocks[block].ffn.moe.deepspeed_moe.experts.deepspeed_experts)


def test_dense_active_matches_moe_active_params_and_flops():
    moe, dense = model(SMALL), model(dataclasses.replace(SMALL, kind="dense_active"))
    total = model(dataclasses.replace(SMALL, kind="dense_total"))
    p_moe, p_dense, p_total = count_params(moe), count_params(dense), count_params(total)
    # Identical except for the router (gate + residual-MoE coefficient): D*E + 2D + 2 per MoE layer.
    router = SMALL.depth * (SMALL.dim * SMALL.num_experts + 2 * SMALL.dim + 2)
    assert p_moe["router"] == router
    assert p_dense["total"] == p_moe["active"] - router
    assert p_total["total"] == p_moe["total"] - router
    assert p_moe["total"] > p_moe["active"]

    # Measured matmul FLOPs of one forward at capacity 1.0 (S divisible by E: no padding slots).
    z = torch.randn(2, C, 16, 16, 16)
    flops = {}
    for name, m in (("moe", moe), ("dense", dense)):
        with FlopCounterMode(display=False) as counter:
            m(z)
        flops[name] = counter.get_total_flops()
    tokens = 2 * SMALL.tokens
    router_flops_per_token = SMALL.depth * 2 * SMALL.dim * (SMALL.num_experts + 2)
    assert flops["moe"] - flops["dense"] == tokens * router_flops_per_token
    analytic = forward_flops_per_token(SMALL, C) - forward_flops_per_token(dataclasses.replace(SMALL, kind="dense_active"), C)
    assert analytic == router_flops_per_token


def test_experts_are_independent_and_layout_invariant():
    full = model(SMALL)
    weights = [e.fc1.weight for e in experts(full, 0)]
    assert all(not torch.equal(weights[i], weights[j]) for i in range(4) for j in range(i + 1, 4))
    # The ep rank holding global experts 2 and 3 must build exactly those experts.
    half = model(dataclasses.replace(SMALL, ep_size=2), expert_offset=2)
    for local, glob in ((0, 2), (1, 3)):
        assert torch.equal(experts(half, 1)[local].fc2.weight, experts(full, 1)[glob].fc2.weight)


def test_forward_is_residual_and_shape_preserving():
    m = model(SMALL)
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.zero_()
    z = torch.randn(3, C, 16, 16, 16)
    out, router_loss = m(z)
    assert out.shape == z.shape and torch.equal(out, z)  # Δ = 0 -> z_{t+1} = z_t exactly
    assert router_loss.balance.ndim == 0 and router_loss.balance.item() >= 1.0 * SMALL.depth - 1e-6  # Switch >= 1 per layer


def test_telemetry_fractions_and_no_drop_evaluation():
    m = model(dataclasses.replace(SMALL, capacity_factor=0.25))
    tel = RoutingTelemetry(m, ["channel", "porous"], SMALL.num_experts)
    z, domain = torch.randn(4, C, 16, 16, 16), torch.tensor([0, 1, 1, 0])
    with tel.labels(domain):
        m(z)
    assert tel.counts_KLE.sum().item() == 4 * SMALL.tokens * SMALL.depth  # every token, every MoE layer
    metrics = tel.metrics()
    for layer in range(SMALL.depth):
        for d in ("channel", "porous"):
            total = sum(metrics[f"route/{d}/layer{layer}/expert{e}"] for e in range(SMALL.num_experts))
            assert total == pytest.approx(1.0)
        assert metrics[f"route/layer{layer}/drop_rate"] >= 0.5  # capacity 0.25: at most a quarter kept
        assert 0 <= metrics[f"route/layer{layer}/entropy"] <= 1
    tel.reset()
    m.eval()
    with tel.labels(domain), torch.no_grad(), no_token_dropping(m):
        m(z)
    assert tel.dropped_L.sum().item() == 0
    assert all(layer.gate.drop_tokens for layer in m.modules() if isinstance(layer, MoEFFN))  # restored
    tel.close()


def test_normalized_mutual_information():
    assert normalized_mi(torch.tensor([[10.0, 0.0], [0.0, 10.0]])) == pytest.approx(1.0)
    assert normalized_mi(torch.tensor([[5.0, 5.0], [5.0, 5.0]])) == pytest.approx(0.0)
    assert normalized_mi(torch.tensor([[3.0, 7.0]])) == 0.0


def test_layout_is_validated_before_anything_is_built():
    with pytest.raises(ConfigError, match="model.ep_size"):
        from_dict(ModelConfig, {"num_experts": 4, "ep_size": 3}, "model")
    cfg = dataclasses.replace(SMALL, ep_size=2)
    with pytest.raises(ConfigError, match="model.ep_size: must divide the world size 3"):
        check_layout(cfg, TrainConfig(), DistInfo(rank=0, world_size=3))
    with pytest.raises(ConfigError, match="train.global_batch"):
        check_layout(cfg, TrainConfig(micro_batch=2, global_batch=6), DistInfo(rank=0, world_size=2))
    layout = check_layout(cfg, TrainConfig(micro_batch=2, grad_accum=3), DistInfo(rank=3, world_size=4))
    assert layout.global_batch == 24 and layout.ep_rank == 1


def test_every_parameter_is_tagged_by_module_type():
    """Parameter groups come from tags set where modules are built, not from names: every parameter of
    every model kind and router has one, and each group holds exactly the modules it names."""
    from shodh.model import params

    hashed = dataclasses.replace(SMALL, router=RouterConfig(kind="hash"))
    for cfg in (SMALL, dataclasses.replace(SMALL, kind="dense_active"), hashed,
                dataclasses.replace(SMALL, shared_expert=False)):
        m = model(cfg)
        groups = {name: params.group_of(p, name) for name, p in m.named_parameters()}
        assert set(groups.values()) <= set(params.GROUPS)
        if cfg.kind == "moe":
            ffn = m.blocks[0].ffn.moe
            assert {params.group_of(p) for p in ffn.deepspeed_moe.experts.parameters()} == {"expert"}
            assert params.group_of(ffn.deepspeed_moe.gate.wg.weight) == "router"
            assert ("shared_expert" in groups.values()) == cfg.shared_expert
        else:
            assert {params.group_of(p) for p in m.blocks[0].ffn.parameters()} == {"dense_ffn"}
        assert {params.group_of(p) for p in m.blocks[0].attn.parameters()} == {"attention"}
        # No weight decay: vectors (norms, biases) and the position tables, which are matrices.
        no_decay = {name for name, p in m.named_parameters() if not params.decays(p, name)}
        assert {"pos_x", "pos_y", "pos_z"} <= no_decay
        assert all(p.ndim < 2 or name.startswith("pos_") for name, p in m.named_parameters() if name in no_decay)
    untagged = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="no shodh_group tag"):
        params.decays(untagged, "new.weight")


def test_activation_checkpointing_gives_the_same_gradients_and_saves_less():
    """Recomputed blocks reproduce the stored-activation gradients exactly (Random Token Selection drops
    the same tokens in the recompute: checkpoint restores the RNG), while autograd keeps far less."""
    cfg = dataclasses.replace(SMALL, capacity_factor=0.5, depth=3, moe_every=2)  # drops tokens: RTS matters
    z = torch.randn(2, C, 16, 16, 16)
    grads, saved = {}, {}
    for ckpt in (False, True):
        m = model(dataclasses.replace(cfg, activation_checkpointing=ckpt))
        sizes = []
        torch.manual_seed(7)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, sizes=sizes: sizes.append(t.numel()) or t, lambda t: t):
            pred, router_loss = m(z)
        (pred.square().mean() + router_loss.weighted(cfg)).backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in m.named_parameters()}
        saved[ckpt] = sum(sizes)
    assert grads[False].keys() == grads[True].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=0, msg=name)
    assert saved[True] < 0.5 * saved[False]


def test_grouped_expert_gemm_equals_deepspeeds_expert_loop():
    """One batched GEMM over the local experts computes what DeepSpeed's per-expert loop computes,
    outputs and gradients, for an expert-parallel dispatch block [ep, E_local, capacity, D]."""
    from deepspeed.moe.experts import Experts

    from shodh.model.moe import GroupedExperts

    grouped = model(dataclasses.replace(SMALL, ep_size=2)).blocks[0].ffn.moe.deepspeed_moe.experts
    assert isinstance(grouped, GroupedExperts) and grouped.num_local_experts == 2
    x = torch.randn(2, 2, 5, SMALL.dim)
    results = []
    for forward in (Experts.forward, GroupedExperts.forward):
        grouped.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = forward(grouped, xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in grouped.parameters()]))
    (y_loop, gx_loop, gp_loop), (y_grp, gx_grp, gp_grp) = results
    torch.testing.assert_close(y_grp, y_loop)
    torch.testing.assert_close(gx_grp, gx_loop)
    for a, b in zip(gp_grp, gp_loop):
        torch.testing.assert_close(a, b)
    # Large experts on CPU take DeepSpeed's loop itself (bit for bit), where it is the faster one.
    grouped.CPU_LOOP_ABOVE = 1
    with torch.no_grad():
        assert torch.equal(GroupedExperts.forward(grouped, x), Experts.forward(grouped, x))
