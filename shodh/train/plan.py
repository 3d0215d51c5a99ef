"""`shodh plan`: what one rank of a pretraining layout holds and does, before anything is submitted.

Per rank: memory of parameters, gradients, ZeRO-2 optimizer shards, activations of one micro
batch (with and without activation checkpointing) and all-to-all buffers; FLOPs per step; all-to-all
bytes per MoE layer and step; tokens per expert per step; a step-time estimate from a peak FLOP/s
and an interconnect bandwidth; the loader rate a rank consumes and the workers that supply it.

Parameters and optimizer state are DeepSpeed ZeRO-1/2's own arithmetic (stage_1_and_2.py), applied
to the parameter groups the engine builds (`engine.param_groups`) on a model built on the meta
device: each group is flattened and padded to a multiple of 2 x its data-parallel degree (world for
dense groups, world / ep_size for expert groups); every rank keeps the whole flat buffer in the
training dtype and an fp32 master copy plus AdamW's two fp32 moments of its 1/dp partition. Those
terms equal what DeepSpeed allocates (tests/test_plan.py). Activations are the tensors autograd
saves for backward, counted per token from the model's structure (within 20 % of the measured
saved tensors); gradients are ZeRO-2's partitioned gradient buffer plus one reduce bucket
(an estimate: buckets are transient). Step time is an estimate: compute at a stated fraction of
peak plus un-overlapped communication.

Shape legend (the project's, shodh/__init__.py): B batch, N tokens per sample, G = B*N gate inputs,
D model width, F FFN width, E experts, P values per patch, M attention heads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from shodh.config import RunConfig
from shodh.distributed import DistInfo
from shodh.errors import ConfigError
from shodh.train.engine import check_layout, load_ds_config, param_groups

GIB = 2**30
FP32 = 4
# AdamW keeps exp_avg and exp_avg_sq (fp32, the master partition's shape) and a scalar `step` per group.
ADAM_MOMENTS = 2


@dataclass
class Hardware:
    """What the plan assumes about one device and the network (flags of `shodh plan`)."""

    gpu: bool = True  # bf16 on GPU (ds_configs/zero2_gpu_bf16.json), fp32 on CPU
    memory_gib: float = 80.0  # usable device memory per rank
    peak_flops: float = 989e12  # dense matmul FLOP/s per device in the training dtype (H100 SXM bf16)
    efficiency: float = 0.4  # assumed fraction of peak the model reaches (an assumption, not a measurement)
    bandwidth: float = 50e9  # bytes/s per rank for all-to-all and gradient reduction across ranks
    # samples/s one loader worker delivers once its shard cache is warm: default MEASURED by
    # benchmarks/bench_loader.py (paper shapes, float16 shards and batches, 1 worker) on a 2-core CPU VM;
    # a GPU node's cores differ: measure yours and pass --loader-rate.
    loader_rate: float = 2700.0


@dataclass
class GroupShard:
    """One optimizer parameter group as ZeRO-2 lays it out on a rank."""

    name: str
    numel: int  # parameters of the group on this rank (experts: this rank's experts only)
    dp: int  # data-parallel degree the group is partitioned over
    padded: int  # flat buffer length: numel rounded up to a multiple of 2 * dp
    partition: int  # this rank's share of the flat buffer: padded / dp


@dataclass
class Plan:
    world: int
    ep_size: int
    micro_batch: int
    grad_accum: int
    dtype_bytes: int
    groups: list[GroupShard]
    memory: dict[str, int]  # bytes per rank, by term (the fit check's terms)
    activations_checkpointed: int  # bytes per micro batch if model.activation_checkpointing were on
    activations_stored: int  # bytes per micro batch if it were off
    flops_per_step: int  # per rank, model FLOPs (3 x forward) of one optimizer step
    alltoall_bytes_per_layer: int  # per rank and optimizer step, forward + backward, leaving the rank
    tokens_per_expert: float  # routed tokens per expert per optimizer step (whole world, even routing)
    capacity: int  # expert slots per expert per micro batch of one rank (DeepSpeed's top-1 capacity)
    step_s: dict[str, float] = field(default_factory=dict)
    samples_per_s_per_rank: float = 0.0
    loader_workers: int = 0  # per rank, from Hardware.loader_rate

    @property
    def total(self) -> int:
        return sum(self.memory.values())


def _model_groups(cfg: RunConfig, channels: int) -> list[tuple[str, bool, int]]:
    """(name, is_expert_group, numel) of each optimizer group on one rank, in the engine's order."""
    import torch
    from deepspeed.moe.utils import is_moe_param

    from shodh.model.transformer import LatentTransformer

    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        model = LatentTransformer(cfg.model, channels)
    out = []
    for group in param_groups(model, cfg.train.weight_decay):
        expert = any(is_moe_param(p) for p in group["params"])
        out.append((group["name"], expert, sum(p.numel() for p in group["params"])))
    return out


def _capacity(cfg: RunConfig, gate_inputs: int) -> int:
    """DeepSpeed top1gating's training capacity for G gate inputs: ceil(G / E * factor), >= min_capacity."""
    m = cfg.model
    return max(math.ceil(gate_inputs / m.num_experts * m.capacity_factor), m.min_capacity)


def activation_bytes(cfg: RunConfig, channels: int, micro_batch: int, dtype_bytes: int,
                     checkpointed: bool) -> int:
    """Bytes autograd saves for backward in one micro batch on one rank (the peak of a stored-activation
    forward; with checkpointing: the block inputs plus one block recomputed during its backward).

    Per token and block, from what each op keeps: a dense block saves its two LayerNorm inputs and
    outputs, q, k, v, the attention output and its copy for the projection, the FFN hidden input and
    GELU output (9 D + 2 F, plus M float32 log-sum-exps); an MoE block keeps the same attention and norm
    tensors, the gate's softmax (E float32), the shared expert (2 H), the residual-MoE mix (2 D + 2) and,
    per expert slot (E x capacity of them, padding included), the dispatched input, both expert hidden
    tensors and the output to combine (2 D + 2 H), and the local experts' weights stacked for the grouped
    GEMM (2 x E/ep_size x D x H)."""
    m = cfg.model
    G = micro_batch * m.tokens
    D, H, E, M = m.dim, m.expert_dim, m.num_experts, m.heads
    P = channels * m.patch**3
    attention = 7 * D
    outside = G * (P + 2 * D) * dtype_bytes  # embedding input, final norm input and output
    blocks = []
    for i in range(m.depth):
        if m.is_moe_block(i):
            shared = 2 * H if m.shared_expert else 0
            mix = 2 * D + 2 if m.shared_expert else 0
            per_token = (attention + 2 * D + shared + mix) * dtype_bytes + E * FP32
            slots = E * _capacity(cfg, G) * (2 * D + 2 * H) * dtype_bytes
            # GroupedExperts stacks the local experts' fc1 and fc2 weights for its batched GEMMs; backward keeps them.
            stacked = 2 * (E // m.ep_size) * D * H * dtype_bytes
            blocks.append(G * per_token + slots + stacked)
        else:
            blocks.append(G * ((attention + 2 * D + 2 * m.dense_ffn_dim()) * dtype_bytes + M * FP32))
    if checkpointed:
        return outside + m.depth * G * D * dtype_bytes + max(blocks)
    return outside + sum(blocks)


def make_plan(cfg: RunConfig, nodes: int, gpus_per_node: int, hw: Hardware) -> Plan:
    """The plan of `cfg` on nodes x gpus_per_node ranks (one rank per device)."""
    from shodh.model.transformer import forward_flops_per_token

    world = nodes * gpus_per_node
    if hw.loader_rate <= 0:
        raise ConfigError(f"--loader-rate must be > 0 samples/s per worker, got {hw.loader_rate:g}")
    if world < 1:
        raise ConfigError(f"--nodes x --gpus-per-node must be >= 1, got {nodes} x {gpus_per_node}")
    layout = check_layout(cfg.model, cfg.train, DistInfo(rank=0, world_size=world))
    m, train = cfg.model, cfg.train
    channels = cfg.tokenizer.channels
    b = 2 if hw.gpu else FP32
    ds_name = train.ds_config or ("zero2_gpu_bf16.json" if hw.gpu else "zero2_cpu_fp32.json")
    ds = load_ds_config(dataclasses.replace(train, ds_config=ds_name), layout)
    bucket = int(ds.get("zero_optimization", {}).get("reduce_bucket_size", 5e8))  # DeepSpeed's default

    groups = []
    for name, expert, numel in _model_groups(cfg, channels):
        dp = world // m.ep_size if expert else world
        padded = math.ceil(numel / (2 * dp)) * (2 * dp)  # DeepSpeed's nccl_start_alignment_factor (2) x dp
        groups.append(GroupShard(("expert " if expert else "") + name, numel, dp, padded, padded // dp))
    partition = sum(g.partition for g in groups)
    local_params = sum(g.numel for g in groups)
    G = layout.micro_batch * m.tokens
    stored = activation_bytes(cfg, channels, layout.micro_batch, b, checkpointed=False)
    ckpt = activation_bytes(cfg, channels, layout.micro_batch, b, checkpointed=True)
    capacity = _capacity(cfg, G) if m.kind == "moe" else 0
    n_moe = sum(m.is_moe_block(i) for i in range(m.depth))
    # One all-to-all moves the E x capacity x D dispatch buffer; (ep-1)/ep of it leaves the rank.
    # Forward: dispatch + combine; backward: their two transposes.
    a2a_buffer = m.num_experts * capacity * m.dim * b
    a2a_step = 4 * a2a_buffer * (m.ep_size - 1) // m.ep_size * layout.grad_accum
    memory = {
        "parameters": sum(g.padded for g in groups) * b,
        # ZeRO-2: this rank's gradient partition in the training dtype, fp32 for the optimizer when that
        # differs, and one reduce bucket of full gradients in flight.
        "gradients": partition * b + (partition * FP32 if b != FP32 else 0) + min(bucket, local_params) * b,
        "optimizer": partition * FP32 * (1 + ADAM_MOMENTS) + FP32 * len(groups),
        "activations": ckpt if m.activation_checkpointing else stored,
        "alltoall_buffers": 2 * a2a_buffer if m.ep_size > 1 else 0,  # send and receive of one all-to-all
    }
    flops = 3 * forward_flops_per_token(m, channels) * G * layout.grad_accum
    compute_s = flops / (hw.peak_flops * hw.efficiency)
    # ZeRO-2 gradient traffic: reduce-scatter of gradients plus all-gather of updated parameters.
    grad_bytes = sum(2 * g.padded * b * (g.dp - 1) / g.dp for g in groups)
    comm_s = (n_moe * a2a_step + grad_bytes) / hw.bandwidth if hw.bandwidth > 0 else 0.0
    step_s = {"compute": compute_s, "communication": comm_s, "total": compute_s + comm_s}
    samples = layout.micro_batch * layout.grad_accum / step_s["total"]
    workers = math.ceil(samples / hw.loader_rate)
    tokens_per_expert = layout.global_batch * m.tokens / m.num_experts if m.kind == "moe" else 0.0
    return Plan(world, m.ep_size, layout.micro_batch, layout.grad_accum, b, groups, memory, ckpt, stored, flops,
                a2a_step, tokens_per_expert, capacity, step_s, samples, workers)


# What to change when a term does not fit, for the refusal message.
REMEDY = {
    "parameters": "raise model.ep_size (fewer experts per rank) or lower model.num_experts / model.expert_dim",
    "gradients": "add ranks (--nodes): ZeRO-2 partitions gradients over data-parallel ranks",
    "optimizer": "add ranks (--nodes): ZeRO-2 partitions optimizer state over data-parallel ranks",
    "activations": "lower train.micro_batch (raise train.grad_accum to keep the batch) or set "
                   "model.activation_checkpointing=true",
    "alltoall_buffers": "lower train.micro_batch or model.capacity_factor",
}


def check_fits(plan: Plan, hw: Hardware, cfg: RunConfig) -> None:
    """Refuse a plan that does not fit the device, naming the largest term and the knob that shrinks it."""
    budget = hw.memory_gib * GIB
    if plan.total <= budget:
        return
    term = max(plan.memory, key=plan.memory.get)
    remedy = REMEDY[term]
    if term == "activations" and cfg.model.activation_checkpointing:
        remedy = "lower train.micro_batch (raise train.grad_accum to keep the batch)"
    raise ConfigError(f"plan: {plan.total / GIB:.1f} GiB per rank exceeds the device's {hw.memory_gib:g} GiB "
                      f"(--device-memory-gib); largest term {term} {plan.memory[term] / GIB:.1f} GiB: {remedy}")


def render(plan: Plan, cfg: RunConfig, hw: Hardware) -> str:
    """The plan as the text `shodh plan` prints."""
    m = cfg.model
    lines = [f"layout: {plan.world} ranks, ep_size {plan.ep_size}, micro batch {plan.micro_batch} x "
             f"{m.tokens} tokens, grad_accum {plan.grad_accum}, {'bf16' if plan.dtype_bytes == 2 else 'fp32'}",
             "memory per rank (GiB):"]
    for term, value in plan.memory.items():
        note = ""
        if term == "activations":
            note = (f"  (checkpointing {'on' if m.activation_checkpointing else 'off'}; on: "
                    f"{plan.activations_checkpointed / GIB:.2f}, off: {plan.activations_stored / GIB:.2f})")
        lines.append(f"  {term:<17}{value / GIB:8.2f}{note}")
    lines.append(f"  {'total':<17}{plan.total / GIB:8.2f} of {hw.memory_gib:g}")
    by_kind: dict[tuple[bool, int], int] = {}
    for g in plan.groups:
        key = (g.name.startswith("expert"), g.dp)
        by_kind[key] = by_kind.get(key, 0) + g.numel
    lines.append("parameters on this rank (ZeRO-2 partitions): " + ", ".join(
        f"{'expert' if expert else 'dense'} {n:,} over dp {dp}" for (expert, dp), n in by_kind.items()))
    lines.append(f"FLOPs per step per rank: {plan.flops_per_step:.3e}")
    if m.kind == "moe":
        lines.append(f"all-to-all per MoE layer and step, leaving each rank: {plan.alltoall_bytes_per_layer / 2**20:.1f} MiB")
        lines.append(f"tokens per expert per step: {plan.tokens_per_expert:,.0f} (even routing); capacity "
                     f"{plan.capacity} slots per expert per rank micro batch")
    s = plan.step_s
    lines.append(f"step time (estimate: {hw.efficiency:g} x {hw.peak_flops:.3g} FLOP/s, {hw.bandwidth:.3g} B/s, "
                 f"no overlap): {s['total']:.3f} s (compute {s['compute']:.3f}, communication {s['communication']:.3f})")
    d = cfg.data
    lines.append(f"loader: {plan.samples_per_s_per_rank:,.0f} samples/s per rank (estimate) -> {plan.loader_workers} "
                 f"worker(s) per rank at {hw.loader_rate:,.0f} samples/s each (--loader-rate, warm shard cache); "
                 + (f"data.workers={d.workers} is enough" if d.workers >= plan.loader_workers else
                    f"data.workers={d.workers} is too few: the step would wait for data"))
    procs = max(1, d.workers)  # workers=0: the training process itself reads (and caches)
    lines.append(f"  shard cache: up to {d.cache_mb * procs:,} MiB host memory per rank (data.cache_mb {d.cache_mb} x "
                 f"{procs} loader process(es)); a rank's shards beyond it are decoded again on every draw")
    return "\n".join(lines)
