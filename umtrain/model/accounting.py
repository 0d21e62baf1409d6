"""Parameter and FLOP accounting as the UltraMem paper counts it (docs/accounting.md: the convention that
reproduces its Table 1).

Convention (the paper's, reproduced from Tables 1 and 2):
- Embeddings and the LM head are excluded; so are the transformer's biases and LayerNorms.
- A transformer layer holds 4D^2 attention weights and 2*D*d_ff MLP weights (an MoE layer: n_e experts of
  2*D*d_e plus a D*n_e router).
- Sparse parameters are the ones a token reaches through a data-dependent choice: memory values and MoE experts.
  Everything else is dense, including a memory layer's query projection, keys, output projection, conv, LNs
  and Tucker cores (every token touches all of them).
- FLOPs per token = 2 x activated parameters + the data-dependent matmuls: value pooling (2*K*d_v, which is
  2 x the activated values) and the TDQKR re-scoring of the m_c x m_c candidate grid. Attention scores are not
  counted.

Every term is an exact integer; `Accounting.components` keeps the per-component split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from umtrain.config.schema import Config, MemoryConfig, ModelConfig


@dataclass(frozen=True)
class Component:
    """One kind of weight summed over the layers that hold it (e.g. all memory layers' keys)."""

    name: str
    params: int
    activated_params: int
    flops_per_token: int
    sparse: bool = False


@dataclass(frozen=True)
class Accounting:
    dense_params: int
    sparse_params: int
    total_params: int
    activated_params: int
    flops_per_token: int
    components: tuple[Component, ...]

    def summary(self) -> dict[str, int]:
        """The five headline numbers (the `--json` object)."""
        return {
            "dense_params": self.dense_params,
            "sparse_params": self.sparse_params,
            "total_params": self.total_params,
            "activated_params": self.activated_params,
            "flops_per_token": self.flops_per_token,
        }


def _weights(name: str, params: int, sparse: bool = False, activated: Optional[int] = None,
             extra_flops: int = 0) -> Component:
    """A weight used as a matmul operand: 2 FLOPs per activated parameter (multiply + add), plus `extra_flops`."""
    activated = params if activated is None else activated
    return Component(name, params, activated, 2 * activated + extra_flops, sparse)


def transformer_components(model: ModelConfig) -> list[Component]:
    """Attention and MLP (or MoE) weights of all `num_layers` layers."""
    L, D = model.num_layers, model.hidden_size
    components = [_weights("attention", L * 4 * D * D)]
    if model.family == "moe":
        moe = model.moe
        d_e = model.moe_ffn_size
        expert = 2 * D * d_e
        components.append(_weights("moe.router", L * D * moe.num_experts))
        components.append(_weights("moe.experts", L * moe.num_experts * expert, sparse=True,
                                   activated=L * moe.moe_router_topk * expert))
    else:
        components.append(_weights("mlp", L * 2 * D * model.ffn_size))
    return components


def memory_layer_components(memory: MemoryConfig, hidden_size: int) -> list[Component]:
    """One memory layer (PKM or UltraMem, by its switches); see the spec's section-4 table."""
    D, H, d_k, d_v = hidden_size, memory.num_heads, memory.key_dim, memory.value_dim
    E, r, h = memory.ive_expansion, memory.tucker_rank, memory.num_cores
    n, m_c = memory.keys_per_side, memory.candidates_per_side
    queries = 1 if memory.share_query else H
    key_width = d_k // r if memory.key_layout == "B" else d_k  # layout B: r chunks of d_k/r (section 2.3)
    components = [
        _weights("memory.values", memory.num_values * d_v, sparse=True, activated=H * memory.topk * d_v),
        _weights("memory.query", queries * 2 * D * d_k),
        _weights("memory.keys", 2 * H * r * n * key_width),
    ]
    if memory.output_projection:
        components.append(_weights("memory.output_projection", E * d_v * D))
    if memory.query_conv_kernel:
        components.append(_weights("memory.query_conv", memory.query_conv_kernel * D))
    if memory.query_key_layernorm:
        components.append(_weights("memory.query_key_layernorm", 2 * d_k + 2 * key_width))  # weight + bias each
    if r > 1:
        rescoring = 2 * H * h * (r * r * m_c + r * m_c * m_c)
        components.append(_weights("memory.tucker_cores", h * H * r * r, extra_flops=rescoring))
    return components


def _merge(components: list[Component]) -> tuple[Component, ...]:
    """Sum components of the same name (e.g. one entry per memory layer) keeping first-seen order."""
    merged: dict[str, Component] = {}
    for c in components:
        if c.name in merged:
            old = merged[c.name]
            c = Component(c.name, old.params + c.params, old.activated_params + c.activated_params,
                          old.flops_per_token + c.flops_per_token, c.sparse)
        merged[c.name] = c
    return tuple(merged.values())


def count(config: Config) -> Accounting:
    """Dense, sparse, total and activated non-embedding parameters and FLOPs per token of `config`'s model."""
    model = config.model
    components = transformer_components(model)
    if model.has_memory:
        for _ in model.memory.placements:
            components += memory_layer_components(model.memory, model.hidden_size)
    components = _merge(components)
    sparse = sum(c.params for c in components if c.sparse)
    dense = sum(c.params for c in components if not c.sparse)
    return Accounting(
        dense_params=dense,
        sparse_params=sparse,
        total_params=dense + sparse,
        activated_params=sum(c.activated_params for c in components),
        flops_per_token=sum(c.flops_per_token for c in components),
        components=components,
    )


@dataclass(frozen=True)
class PaperFigures:
    """A row of the paper as printed (absolute units: parameters and FLOPs, not B/G/M)."""

    source: str
    flops_per_token: float
    total_params: Optional[float] = None
    dense_params: Optional[float] = None
    sparse_params: Optional[float] = None

    def fields(self) -> dict[str, float]:
        names = ("total_params", "dense_params", "sparse_params", "flops_per_token")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _table1(params_b: float, flops_g: float) -> PaperFigures:
    return PaperFigures("Table 1", total_params=params_b * 1e9, flops_per_token=flops_g * 1e9)


def _table2(row: str, dense_m: float, sparse_g: float, flops_m: float) -> PaperFigures:
    return PaperFigures(f"Table 2, {row}", dense_params=dense_m * 1e6, sparse_params=sparse_g * 1e9,
                        flops_per_token=flops_m * 1e6)


PAPER_FIGURES: dict[str, PaperFigures] = {
    "dense-151m": _table1(0.15, 0.30),
    "pkm-151m-x12": _table1(2.04, 0.35),
    "moe-151m-2in32": _table1(2.04, 0.35),
    "ultramem-151m-x12": _table1(2.03, 0.35),
    "dense-680m": _table1(0.68, 1.36),
    "pkm-680m-x12": _table1(8.95, 1.50),
    "moe-680m-2in33": _table1(8.95, 1.50),
    "ultramem-680m-x12": _table1(8.93, 1.49),
    "dense-1.6b": _table1(1.61, 3.21),
    "pkm-1.6b-x12": _table1(21.13, 3.48),
    "moe-1.6b-2in34": _table1(21.36, 3.52),
    "ultramem-1.6b-x12": _table1(21.41, 3.50),
    "dense-6.5b": _table1(6.44, 12.88),
    "table2-01-pkm-151m-x10": _table2("PKM-151M-x10", 173.01, 1.534, 346.06),
    "table2-02-rm-softmax": _table2("+rm softmax", 173.01, 1.534, 346.06),
    "table2-03-half-vdim-proj": _table2("+half vdim+proj", 178.47, 1.529, 356.98),
    "table2-04-share-query": _table2("+share query", 173.46, 1.529, 346.96),
    "table2-05-split-big-mem-skip": _table2("+split big mem&skip", 161.64, 1.536, 323.32),
    "table2-06-query-key-ln": _table2("+query/key LN", 161.64, 1.536, 323.54),
    "table2-07-ive": _table2("+IVE", 172.37, 1.536, 344.98),
    "table2-08-tdqkr": _table2("+TDQKR", 172.37, 1.536, 344.98),
    "table2-09-mcs": _table2("+MCS", 172.37, 1.536, 344.98),
    "table2-10-improved-init": _table2("+improved init", 172.37, 1.536, 344.98),
    "table2-11-value-lr-decay": _table2("+value lr decay", 172.37, 1.536, 344.98),
    "table2-12-query-conv": _table2("+query conv", 172.38, 1.536, 345.02),
}
"""The paper's printed figures, keyed by the `run_name` of the configs under configs/paper/."""


@dataclass(frozen=True)
class PaperComparison:
    field: str
    counted: int
    paper: float

    @property
    def relative_error(self) -> float:
        return (self.counted - self.paper) / self.paper


def compare_to_paper(accounting: Accounting, run_name: str) -> list[PaperComparison]:
    """Counted versus printed figures for a paper run (empty when `run_name` is not a paper row)."""
    figures = PAPER_FIGURES.get(run_name)
    if figures is None:
        return []
    counted = accounting.summary()
    return [PaperComparison(name, counted[name], value) for name, value in figures.fields().items()]
