"""Sparse FFN blocks: DeepSpeed's Top-1 MoE layer, the dense MLP it is compared with, and routing telemetry.

The MoE FFN is `deepspeed.moe.layer.MoE` (k=1) and nothing else: gating, capacity, token
dropping, the all-to-all between expert-parallel ranks and the Switch aux loss are DeepSpeed's.
This module adds what DeepSpeed leaves to the caller: independent expert initialization (its
experts are deep copies of one module), the aux-loss hand-off, no-drop evaluation, and telemetry.

Shape legend (the project's, shodh/__init__.py): B batch, N tokens per sample, G = B*N gate inputs
(tokens in one gate call), D model width, F FFN width, E experts, K domains, L MoE layers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import einops
import torch
import torch.nn.functional as F
from deepspeed.comm import pg_utils
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, gumbel_rsample, multiplicative_jitter, top1gating
from torch import nn

from shodh.errors import ShodhError
from shodh.model import params
from shodh.model.config import RouterConfig


class MLP(nn.Module):
    """Two-layer GELU FFN without biases, so a width-2H MLP has exactly the parameters of two width-H ones."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BND)))


def init_mlp(mlp: MLP, std: float, out_std: float, generator: torch.Generator | None = None) -> None:
    with torch.no_grad():
        mlp.fc1.weight.normal_(0.0, std, generator=generator)
        mlp.fc2.weight.normal_(0.0, out_std, generator=generator)


class RouterLoss(NamedTuple):
    """The router's training terms, summed over MoE layers and unweighted (0 for dense models):
    `balance` (the model.router.balance loss; 0 for bias and none) and `z` (ST-MoE z-loss)."""

    balance: torch.Tensor
    z: torch.Tensor

    def __add__(self, other: "RouterLoss") -> "RouterLoss":  # type: ignore[override]
        return RouterLoss(self.balance + other.balance, self.z + other.z)

    def weighted(self, cfg) -> torch.Tensor:
        """What the optimizer minimizes beside the MSE: aux_loss_coef · balance + router.z_loss · z."""
        return cfg.aux_loss_coef * self.balance.float() + cfg.router.z_loss * self.z.float()


def no_router_loss(like: torch.Tensor) -> RouterLoss:
    return RouterLoss(like.new_zeros((), dtype=torch.float32), like.new_zeros((), dtype=torch.float32))


def _keep_within_capacity(mask_UE: torch.Tensor, capacity: int, rts: bool) -> torch.Tensor:
    """Which routed units (tokens, or whole samples) fit in their expert's `capacity` slots: [U, E] 0/1.
    In order of arrival, or at random with Random Token Selection (DeepSpeed's default), so which units
    drop is unbiased by position."""
    if rts:
        priority_UE = mask_UE * torch.rand(mask_UE.shape, device=mask_UE.device)
        keep_UE = torch.zeros_like(mask_UE)
        top_idx = torch.topk(priority_UE, k=min(capacity, mask_UE.shape[0]), dim=0).indices
        return mask_UE * keep_UE.scatter_(0, top_idx, 1)
    return mask_UE * (torch.cumsum(mask_UE, dim=0) <= capacity).to(mask_UE.dtype)


class Router(TopKGate):
    """The learned Top-1 router (model.router.kind=learned), a drop-in for DeepSpeed's TopKGate.

    It returns DeepSpeed 0.19's sparse-route 7-tuple, so dispatch, the expert-parallel all-to-all,
    the experts and the combine stay DeepSpeed's; what it owns is the decision and its losses.
    - Gate probabilities softmax(W_g·x) weight the chosen expert's output ("soft" Top-1), as in
      DeepSpeed's top1gating; the *selection* is argmax(W_g·x + b), b = bias_E (balance=bias only:
      DeepSeek-V3's loss-free balancing, b shifts who is chosen, never a gradient; other variants
      have no bias, and their checkpoints the layout of DeepSpeed's own gate).
    - balance: switch = E·Σ_e f_e·p_e over this call's tokens (DeepSpeed's); global = the same with
      the load f_e counted over every rank's tokens (all-reduced, no gradient) and p_e local, whose
      data-parallel gradient average is exactly the gradient of the global-batch loss; bias/none = 0.
    - z = mean over routing units of logsumexp(logits)^2 (ST-MoE), stored for MoEFFN to collect.
    - scope=sample: logits of a sample = W_g·mean of its tokens (one decision per sample); capacity
      is counted in whole samples, ceil(factor·B/E) of them per expert, and a sample that does not
      fit is dropped whole (all its tokens get index -1: they pass through the shared expert and the
      residual only, and count in route/*/drop_rate), never split. Tokens of a sample are contiguous
      in DeepSpeed's flattened [B*N] order, so a kept sample fills consecutive slots.
    Capacity otherwise follows top1gating: ceil(factor·G/E) >= min_capacity in training; with
    drop_tokens off, the largest load over the expert-parallel group (every rank sizes its buffers alike).
    """

    def __init__(self, learned: TopKGate, balance: str, bias_rate: float, scope: str, tokens: int):
        super().__init__(learned.wg.in_features, learned.wg.out_features, k=1, capacity_factor=learned.capacity_factor,
                         eval_capacity_factor=learned.eval_capacity_factor, min_capacity=learned.min_capacity,
                         noisy_gate_policy=learned.noisy_gate_policy, drop_tokens=learned.drop_tokens,
                         use_rts=learned.use_rts)
        self.balance, self.bias_rate, self.scope, self.tokens = balance, bias_rate, scope, tokens
        num_experts = learned.wg.out_features
        bias = balance == "bias"
        # Persistent: part of the module state, so checkpoints carry it and a resume continues exactly.
        # A None buffer is not in the state dict.
        self.register_buffer("bias_E", torch.zeros(num_experts) if bias else None)
        # Selections since the last bias update (this rank's tokens); summed over ranks at the update.
        self.register_buffer("load_E", torch.zeros(num_experts, dtype=torch.float64) if bias else None, persistent=False)
        self.z: torch.Tensor | None = None

    def logits_GE(self, x_GD: torch.Tensor) -> torch.Tensor:
        """Gate logits per gate input [G, E] (per sample, repeated over its tokens, for scope=sample)."""
        logits_GE = F.linear(x_GD.float(), self.wg.weight.float())
        if self.scope == "sample":
            logits_BNE = einops.rearrange(logits_GE, "(b n) e -> b n e", n=self.tokens)
            # W_g·mean(x) = mean(W_g·x): pooling the logits is pooling the tokens.
            logits_GE = einops.repeat(logits_BNE.mean(1), "b e -> (b n) e", n=self.tokens)
        return logits_GE

    def selection_GE(self, logits_GE: torch.Tensor) -> torch.Tensor:
        return logits_GE if self.bias_E is None else logits_GE + self.bias_E.float()

    def _rows(self, t_GE: torch.Tensor) -> torch.Tensor:
        """One row per routing unit: tokens, or the first token of every sample."""
        return t_GE[:: self.tokens] if self.scope == "sample" else t_GE

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        if used_token is not None or not sparse_routes or use_tutel:
            raise ShodhError("moe.Router supports DeepSpeed's sparse-route dispatch only (DeepSpeed 0.19 MOELayer)")
        x_GD = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x_GD = multiplicative_jitter(x_GD, device=x_GD.device)
        logits_GE = self.logits_GE(x_GD)
        G, E = logits_GE.shape
        gates_GE = F.softmax(logits_GE, dim=1)
        select_GE = self.selection_GE(logits_GE)
        if self.noisy_gate_policy == "RSample" and self.training:
            select_GE = select_GE + gumbel_rsample(select_GE.shape, device=select_GE.device)
        choice_G = select_GE.argmax(dim=1)
        mask_GE = F.one_hot(choice_G, E)
        exp_counts_E = mask_GE.sum(0).detach()
        if self.training and self.balance == "bias":
            self.load_E += exp_counts_E.to(self.load_E)
        l_aux = self._balance_loss(gates_GE, mask_GE)
        self.z = torch.logsumexp(self._rows(logits_GE), dim=1).square().mean()

        unit = self.tokens if self.scope == "sample" else 1
        mask_UE = self._rows(mask_GE)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        units = max(math.ceil(mask_UE.shape[0] / E * factor), math.ceil(self.min_capacity / unit))
        if not self.drop_tokens:
            most = mask_UE.sum(0).max()
            if pg_utils.is_parallel(self.ep_group):
                torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
            units = int(most)
        keep_UE = _keep_within_capacity(mask_UE, units, self.use_rts and self.training)
        keep_GE = einops.repeat(keep_UE, "u e -> (u n) e", n=unit)
        capacity = max(units * unit, 1)
        kept_G = keep_GE.sum(1) > 0
        locations_G = ((torch.cumsum(keep_GE, dim=0) - 1) * keep_GE).sum(1)
        indices_G = torch.where(kept_G, choice_G, torch.full_like(choice_G, -1))
        gates1_G = (gates_GE * keep_GE).sum(1)
        return (l_aux, torch.tensor(capacity), E, indices_G.to(torch.int32).unsqueeze(0),
                locations_G.to(torch.int32).unsqueeze(0), gates1_G.unsqueeze(0), exp_counts_E)

    def _balance_loss(self, gates_GE: torch.Tensor, mask_GE: torch.Tensor) -> torch.Tensor:
        E = gates_GE.shape[1]
        if self.balance in ("bias", "none"):
            return gates_GE.new_zeros(())
        me_E = gates_GE.mean(0)
        ce_E = mask_GE.float().mean(0)
        world = torch.distributed.is_available() and torch.distributed.is_initialized()
        # Training only: evaluation and gradient probes may run the model on one rank alone.
        if self.balance == "global" and world and self.training:
            load_E = torch.cat([mask_GE.sum(0).float(), mask_GE.new_tensor([mask_GE.shape[0]]).float()])
            torch.distributed.all_reduce(load_E)
            ce_E = load_E[:E] / load_E[E]
        return (me_E * ce_E).sum() * E

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing step (balance=bias): b_e += γ·sign(mean load - load_e), the load summed over
        every rank's selections since the last update, so every replica of this gate moves identically."""
        load_E = self.load_E.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load_E)
        self.bias_E += self.bias_rate * torch.sign(load_E.mean() - load_E).to(self.bias_E)
        self.load_E.zero_()


def update_router_biases(model: nn.Module) -> None:
    """After every optimizer step (all ranks in lockstep): the bias update of each balance=bias router."""
    for gate in routers(model):
        if isinstance(gate, Router) and gate.balance == "bias":
            gate.update_bias()


def routers(model: nn.Module) -> list[nn.Module]:
    return [m.gate for m in model.modules() if isinstance(m, MoEFFN)]


class GroupedExperts(Experts):
    """DeepSpeed's `Experts` with its Python loop over experts (a chunk, two GEMMs and a cat per expert)
    replaced by one batched GEMM per projection: DeepSpeed gives every expert the same capacity, so the
    dispatched tokens are a dense [ep, E_local, capacity, D] block and torch.bmm is a grouped GEMM over
    the local experts. The parameters stay DeepSpeed's (`deepspeed_experts.<i>.fc1/fc2`), so expert
    checkpoints, optimizer groups and the expert-parallel all-to-all are untouched; the weights are
    stacked per call (autograd hands each expert its own gradient).

    On CPU with large experts (D·F >= CPU_LOOP_ABOVE) DeepSpeed's own loop runs instead: there one GEMM per
    expert is already efficient and torch's CPU bmm backward is slower than per-expert mm (measured at the
    paper's D = 512, F = 2048: loop 1.2 s, bmm 1.5 s, + 0.2 s stacking, per E = 16 fwd+bwd); at the demo's
    D·F = 65,536 the loop's per-call overhead dominates and the batched GEMM is 1.28x faster.

    Shapes: E local experts, N = ep_size x capacity slots of one expert, D model width, F expert width."""

    CPU_LOOP_ABOVE = 2**18

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.deepspeed_experts, self.num_local_experts = experts.deepspeed_experts, experts.num_local_experts
        for expert in self.deepspeed_experts:
            assert isinstance(expert, MLP) and expert.fc1.bias is None and expert.fc2.bias is None, \
                "GroupedExperts computes MLP (bias-free fc1, GELU, fc2) experts only"

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        fc1 = self.deepspeed_experts[0].fc1
        if inputs.device.type == "cpu" and fc1.in_features * fc1.out_features >= self.CPU_LOOP_ABOVE:
            return Experts.forward(self, inputs)
        ep = inputs.shape[0]
        x_END = einops.rearrange(inputs, "g e c d -> e (g c) d")
        w1_EFD = torch.stack([expert.fc1.weight for expert in self.deepspeed_experts])
        w2_EDF = torch.stack([expert.fc2.weight for expert in self.deepspeed_experts])
        h_ENF = F.gelu(torch.bmm(x_END, w1_EFD.transpose(1, 2)))
        y_END = torch.bmm(h_ENF, w2_EDF.transpose(1, 2))
        return einops.rearrange(y_END, "e (g c) d -> g e c d", g=ep)


# --- Fixed routers (study controls, model.router.kind = hash | oracle) --------------------------
ROUTE_LOGIT = 30.0  # logit of the chosen expert (others 0): gate probability 1 - (E-1)e^-30, i.e. 1


class FixedGate(TopKGate):
    """DeepSpeed's Top-1 gate with the decision fixed instead of learned (`shodh study` controls).

    hash: token position n goes to expert slot_N[n] % E, slot_N a seeded permutation of the N
    positions (balanced when E divides N), the same for every sample and step. oracle: the
    sample's domain k picks experts [k*E/K, (k+1)*E/K) and the position hashes within that block;
    the label comes from `routed_by(domain_B)` (MoEFFN sets it), the only place a domain label
    enters any model. The decision becomes one-hot logits handed to DeepSpeed's own top1gating,
    so capacity, dropping, dispatch and the aux loss are the learned router's code; wg stays (same
    checkpoint layout) but gets no gradient.
    """

    def __init__(self, learned: TopKGate, router: str, tokens: int, domains: int, seed: int):
        super().__init__(learned.wg.in_features, learned.wg.out_features, k=1, capacity_factor=learned.capacity_factor,
                         eval_capacity_factor=learned.eval_capacity_factor, min_capacity=learned.min_capacity,
                         noisy_gate_policy=None, drop_tokens=learned.drop_tokens, use_rts=learned.use_rts)
        self.router, self.tokens = router, tokens
        num_experts = learned.wg.out_features
        self.block = num_experts // domains if router == "oracle" else num_experts
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("slot_N", torch.randperm(tokens, generator=gen), persistent=False)
        self.domain_B: torch.Tensor | None = None

    def expert_G(self, G: int) -> torch.Tensor:
        """The expert of each of the G = B*N gate inputs (DeepSpeed flattens [B, N] batch-major): [G]."""
        slot_G = einops.repeat(self.slot_N % self.block, "n -> (b n)", b=G // self.tokens)
        if self.router == "hash":
            return slot_G
        if self.domain_B is None:
            raise ShodhError("model.router=oracle: this forward got no domain labels (pass "
                             "moe.router_inputs(cfg, domain_B) to the model)")
        domain_G = einops.repeat(self.domain_B.to(self.slot_N.device), "b -> (b n)", n=self.tokens)
        return domain_G * self.block + slot_G

    def logits_GE(self, x_GD: torch.Tensor) -> torch.Tensor:
        expert_G = self.expert_G(x_GD.shape[0]).to(x_GD.device)
        return F.one_hot(expert_G, self.wg.out_features).float() * ROUTE_LOGIT

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return top1gating(self.logits_GE(input), capacity_factor, self.min_capacity, used_token, None,
                          self.drop_tokens, self.use_rts, self.ep_group, sparse_routes, use_tutel)


def route_view(gate: nn.Module, x_GD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-free (gate logits [G, E], chosen expert [G]) of gate inputs [G, D]: what telemetry counts.
    The choice is the dispatched expert unless noisy gating is on or the token was dropped."""
    if isinstance(gate, FixedGate):
        logits_GE = gate.logits_GE(x_GD)
        return logits_GE, logits_GE.argmax(dim=-1)
    logits_GE = gate.logits_GE(x_GD)
    return logits_GE, gate.selection_GE(logits_GE).argmax(dim=-1)


def router_inputs(router: str, domain_B: torch.Tensor) -> dict:
    """Extra model-forward kwargs: the domain labels for the oracle router, nothing for any other
    router. Callers pass `**router_inputs(cfg.model.router.kind, batch["domain"])`."""
    return {"domain_B": domain_B} if router == "oracle" else {}


class MoEFFN(nn.Module):
    """Top-1 DeepSpeed MoE FFN; returns (output, RouterLoss). `expert_offset` = this rank's first global expert."""

    def __init__(self, dim: int, expert_dim: int, num_experts: int, ep_size: int, capacity_factor: float,
                 eval_capacity_factor: float, min_capacity: int, noisy_gate_policy: str | None,
                 shared_expert: bool, layer: int, expert_offset: int, seed: int, std: float, out_std: float,
                 router: RouterConfig, tokens: int):
        super().__init__()
        self.layer = layer
        shared = MLP(dim, expert_dim)
        init_mlp(shared, std, out_std)  # with use_residual this very module is the shared expert
        self.moe = MoE(hidden_size=dim, expert=shared, num_experts=num_experts, ep_size=ep_size, k=1,
                       capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                       min_capacity=min_capacity, noisy_gate_policy=noisy_gate_policy, use_residual=shared_expert)
        # DeepSpeed deep-copies `shared` into every expert: identical experts get identical gradients
        # and never specialize. Each expert gets its own stream keyed by its *global* index, so a
        # layout with ep_size=2 holds exactly the experts of the ep_size=1 model.
        for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1_009 + expert_offset + i)
            init_mlp(expert, std, out_std, gen)
        self.moe.deepspeed_moe.experts = GroupedExperts(self.moe.deepspeed_moe.experts)
        ds_gate = self.moe.deepspeed_moe.gate
        if router.kind == "learned":
            self.moe.deepspeed_moe.gate = Router(ds_gate, router.balance, router.bias_rate, router.scope, tokens)
        else:  # study control: same layer, DeepSpeed's gate decision replaced
            self.moe.deepspeed_moe.gate = FixedGate(ds_gate, router.kind, tokens, router.domains, seed * 1_000_003 + layer)
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.normal_(0.0, std)
        params.tag(self.moe.deepspeed_moe.experts, "expert")
        params.tag(self.moe.deepspeed_moe.gate, "router")
        if shared_expert:  # DeepSpeed's residual MoE: `mlp` is the shared expert, `coefficient` mixes it in
            params.tag(self.moe.mlp, "shared_expert")
            params.tag(self.moe.coefficient, "router")

    @property
    def gate(self) -> nn.Module:
        return self.moe.deepspeed_moe.gate

    def forward(self, x_BND: torch.Tensor, domain_B: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterLoss]:
        if isinstance(self.gate, FixedGate):
            self.gate.domain_B = domain_B  # read by the oracle gate (and the telemetry hook) in this call only
        try:
            y_BND, balance, _ = self.moe(x_BND)
        finally:
            if isinstance(self.gate, FixedGate):
                self.gate.domain_B = None
        z = self.gate.z if isinstance(self.gate, Router) else balance.new_zeros(())
        return y_BND, RouterLoss(balance.float(), z.float())


@contextlib.contextmanager
def no_token_dropping(model: nn.Module) -> Iterator[None]:
    """Evaluate with unbounded capacity: Random Token Selection makes *which* tokens drop random,
    so validation with dropping would not be reproducible. DeepSpeed then sizes the capacity to
    the largest expert load (all-reduced over the expert-parallel group, so ranks stay in step)."""
    gates = routers(model)
    saved = [g.drop_tokens for g in gates]
    for g in gates:
        g.drop_tokens = False
    try:
        yield
    finally:
        for g, s in zip(gates, saved):
            g.drop_tokens = s


class RoutingTelemetry:
    """Counts routed tokens per (domain, MoE layer, expert), dropped tokens and router entropy.

    A forward hook on each layer's `deepspeed_moe.gate` (the gate returns DeepSpeed 0.19's 7-tuple
    (l_aux, capacity, E, indices_1S, locations_1S, gates_1S, exp_counts_E); indices are -1 for
    dropped tokens). A token's expert is the router's choice, argmax of the noise-free selection
    logits (`route_view`), recomputed here from the gate input: it is the dispatched expert unless noisy gating
    is on or the token was dropped, so every token of a domain is counted once and the fractions
    of a (domain, layer) sum to 1. The domain labels come from `labels()`, never from the model.
    """

    def __init__(self, model: nn.Module, domains: list[str], num_experts: int):
        self.layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
        self.domains, self.num_experts = list(domains), num_experts
        self._domain_B: torch.Tensor | None = None
        self._handles = [m.gate.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]
        self.reset()

    def reset(self) -> None:
        K, L, E = len(self.domains), len(self.layers), self.num_experts
        self.counts_KLE = torch.zeros(K, L, E, dtype=torch.float64)
        self.dropped_L = torch.zeros(L, dtype=torch.float64)
        self.entropy_L = torch.zeros(L, dtype=torch.float64)  # summed over tokens, nats

    @contextlib.contextmanager
    def labels(self, domain_B: torch.Tensor) -> Iterator[None]:
        """Attribute the gate calls inside this block to samples of these domains."""
        self._domain_B = domain_B.detach().cpu()
        try:
            yield
        finally:
            self._domain_B = None

    def _hook(self, index: int):
        def hook(gate: nn.Module, inputs: tuple, outputs: tuple) -> None:
            if self._domain_B is None:
                return  # a forward outside labels() (e.g. FLOP counting) is not telemetry
            x_GD = inputs[0]
            with torch.no_grad():
                logits_GE, choice_G = route_view(gate, x_GD)
                logp_GE = torch.log_softmax(logits_GE, dim=-1)
                entropy = -(logp_GE.exp() * logp_GE).sum().item()
                choice_G = choice_G.cpu()
                dropped = int((outputs[3] < 0).sum())
            tokens_per_sample = x_GD.shape[0] // self._domain_B.shape[0]
            domain_G = einops.repeat(self._domain_B, "b -> (b n)", n=tokens_per_sample)
            flat = domain_G * self.num_experts + choice_G
            hist = torch.bincount(flat, minlength=len(self.domains) * self.num_experts).double()
            self.counts_KLE[:, index] += einops.rearrange(hist, "(k e) -> k e", e=self.num_experts)
            self.dropped_L[index] += dropped
            self.entropy_L[index] += entropy
        return hook

    def all_reduce(self) -> None:
        """Sum the counts over the world (each rank's gates saw only its own tokens)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = torch.cat([self.counts_KLE.flatten(), self.dropped_L, self.entropy_L])
            torch.distributed.all_reduce(flat)
            K, L, E = self.counts_KLE.shape
            self.counts_KLE = flat[: K * L * E].view(K, L, E)
            self.dropped_L, self.entropy_L = flat[K * L * E: K * L * E + L], flat[K * L * E + L:]

    def metrics(self) -> dict[str, float]:
        """DESIGN.md's route/* metrics for the tokens counted since reset(); call all_reduce() first."""
        out: dict[str, float] = {}
        log_e = math.log(self.num_experts)
        for l, layer in enumerate(self.layers):
            counts_KE = self.counts_KLE[:, l]
            tokens = counts_KE.sum().item()
            if tokens == 0:
                continue
            for k, domain in enumerate(self.domains):
                n_k = counts_KE[k].sum().item()
                for e in range(self.num_experts):
                    if n_k > 0:
                        out[f"route/{domain}/layer{layer.layer}/expert{e}"] = counts_KE[k, e].item() / n_k
            load_E = counts_KE.sum(0)
            out[f"route/layer{layer.layer}/entropy"] = self.entropy_L[l].item() / tokens / log_e
            out[f"route/layer{layer.layer}/drop_rate"] = self.dropped_L[l].item() / tokens
            out[f"route/layer{layer.layer}/load_cv"] = (load_E.std(unbiased=False) / load_E.mean()).item()
            out[f"route/layer{layer.layer}/domain_mi"] = normalized_mi(counts_KE)
            # Purity of an expert: the share of its tokens that come from its majority domain.
            for e in range(self.num_experts):
                if load_E[e] > 0:
                    out[f"route/layer{layer.layer}/expert{e}/purity"] = (counts_KE[:, e].max() / load_E[e]).item()
            out[f"route/layer{layer.layer}/purity"] = (counts_KE.max(0).values.sum() / tokens).item()
            gate = layer.gate
            if isinstance(gate, Router) and gate.balance == "bias":
                for e, b in enumerate(gate.bias_E.tolist()):
                    out[f"route/layer{layer.layer}/bias{e}"] = b
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def normalized_mi(counts_KE: torch.Tensor) -> float:
    """I(domain; expert) / H(domain) from a joint count table: 0 = routing ignores the domain,
    1 = the expert identifies the domain. 0 when only one domain is present."""
    p_KE = counts_KE / counts_KE.sum()
    p_K, p_E = p_KE.sum(1, keepdim=True), p_KE.sum(0, keepdim=True)
    nz = p_KE > 0
    mi = (p_KE[nz] * (p_KE[nz] / (p_K * p_E).expand_as(p_KE)[nz]).log()).sum().item()
    h_k = -(p_K[p_K > 0] * p_K[p_K > 0].log()).sum().item()
    return mi / h_k if h_k > 0 else 0.0
