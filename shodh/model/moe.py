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
from typing import Iterator

import einops
import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, top1gating
from torch import nn

from shodh.errors import ShodhError
from shodh.model import params


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


class GroupedExperts(Experts):
    """DeepSpeed's `Experts` with its Python loop over experts (a chunk, two GEMMs and a cat per expert)
    replaced by one batched GEMM per projection: DeepSpeed gives every expert the same capacity, so the
    dispatched tokens are a dense [ep, E_local, capacity, D] block and torch.bmm is a grouped GEMM over
    the local experts. The parameters stay DeepSpeed's (`deepspeed_experts.<i>.fc1/fc2`), so expert
    checkpoints, optimizer groups and the expert-parallel all-to-all are untouched; the weights are
    stacked per call (autograd hands each expert its own gradient).

    Shapes: E local experts, N = ep_size x capacity slots of one expert, D model width, F expert width."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.deepspeed_experts, self.num_local_experts = experts.deepspeed_experts, experts.num_local_experts
        for expert in self.deepspeed_experts:
            assert isinstance(expert, MLP) and expert.fc1.bias is None and expert.fc2.bias is None, \
                "GroupedExperts computes MLP (bias-free fc1, GELU, fc2) experts only"

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        ep = inputs.shape[0]
        x_END = einops.rearrange(inputs, "g e c d -> e (g c) d")
        w1_EFD = torch.stack([expert.fc1.weight for expert in self.deepspeed_experts])
        w2_EDF = torch.stack([expert.fc2.weight for expert in self.deepspeed_experts])
        h_ENF = F.gelu(torch.bmm(x_END, w1_EFD.transpose(1, 2)))
        y_END = torch.bmm(h_ENF, w2_EDF.transpose(1, 2))
        return einops.rearrange(y_END, "e (g c) d -> g e c d", g=ep)


# --- Fixed routers (study controls, model.router = hash | oracle) ------------------------------
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


def gate_logits_GE(gate: nn.Module, x_GD: torch.Tensor) -> torch.Tensor:
    """Noise-free router logits of gate inputs [G, D] -> [G, E]: W_g·x, or a fixed router's decision."""
    if isinstance(gate, FixedGate):
        return gate.logits_GE(x_GD)
    return F.linear(x_GD.float(), gate.wg.weight.float())


def router_inputs(router: str, domain_B: torch.Tensor) -> dict:
    """Extra model-forward kwargs: the domain labels for the oracle router, nothing for any other
    router. Callers pass `**router_inputs(cfg.model.router, batch["domain"])`."""
    return {"domain_B": domain_B} if router == "oracle" else {}


class MoEFFN(nn.Module):
    """Top-1 DeepSpeed MoE FFN; returns (output, aux loss). `expert_offset` = this rank's first global expert."""

    def __init__(self, dim: int, expert_dim: int, num_experts: int, ep_size: int, capacity_factor: float,
                 eval_capacity_factor: float, min_capacity: int, noisy_gate_policy: str | None,
                 shared_expert: bool, layer: int, expert_offset: int, seed: int, std: float, out_std: float,
                 router: str = "learned", tokens: int = 0, router_domains: int = 1):
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
        if router != "learned":  # study control: same layer, DeepSpeed's gate decision replaced
            self.moe.deepspeed_moe.gate = FixedGate(self.moe.deepspeed_moe.gate, router, tokens, router_domains,
                                                    seed * 1_000_003 + layer)
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

    def forward(self, x_BND: torch.Tensor, domain_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.gate, FixedGate):
            self.gate.domain_B = domain_B  # read by the oracle gate (and the telemetry hook) in this call only
        try:
            y_BND, aux, _ = self.moe(x_BND)
        finally:
            if isinstance(self.gate, FixedGate):
                self.gate.domain_B = None
        return y_BND, aux


@contextlib.contextmanager
def no_token_dropping(model: nn.Module) -> Iterator[None]:
    """Evaluate with unbounded capacity: Random Token Selection makes *which* tokens drop random,
    so validation with dropping would not be reproducible. DeepSpeed then sizes the capacity to
    the largest expert load (all-reduced over the expert-parallel group, so ranks stay in step)."""
    gates = [m.gate for m in model.modules() if isinstance(m, MoEFFN)]
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
    dropped tokens). A token's expert is the router's choice, argmax of the noise-free gate
    logits, recomputed here from the gate input: it is the dispatched expert unless noisy gating
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
                logits_GE = gate_logits_GE(gate, x_GD)
                logp_GE = torch.log_softmax(logits_GE, dim=-1)
                entropy = -(logp_GE.exp() * logp_GE).sum().item()
                choice_G = logits_GE.argmax(dim=-1).cpu()
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
