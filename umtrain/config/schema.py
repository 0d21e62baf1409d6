"""The one typed configuration of umtrain: every section, its defaults and its own validation.

Key names follow Megatron-LM's vocabulary (`tensor_model_parallel_size`, `micro_batch_size`, ...).
Cross-section rules (world size, pipeline stages versus memory placements, ...) live in
`umtrain.config.validate`.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Literal, Optional

from umtrain.config.base import BlendEntry, ConfigError

if TYPE_CHECKING:
    import torch

Family = Literal["dense", "moe", "pkm", "ultramem"]


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def is_perfect_square(value: int) -> bool:
    return value >= 0 and math.isqrt(value) ** 2 == value


def parse_placement(text: str, key: str) -> tuple[int, int]:
    """`"a:b"` (1-based layers, a <= b) -> (a, b)."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(key, f"placement {text!r} must look like 'a:b' with 1-based layer numbers")
    a, b = int(parts[0]), int(parts[1])
    if a < 1 or b < a:
        raise ConfigError(key, f"placement {text!r} needs 1 <= a <= b")
    return a, b


@dataclass
class MemoryConfig:
    """A memory layer (PKM or UltraMem). Each switch is one row of the paper's Table 2.

    Symbols (docs/memory_layers.md): H heads (key sets), m top-m per head, N physical values,
    E the IVE expansion, r the Tucker rank, h the MCS cores, d_k / d_v the key / value widths.
    """

    placements: List[str] = field(default_factory=lambda: ["2:3"])
    """`a:b` (1-based): read block a's pre-MLP LayerNorm output, add the memory output after block b."""
    num_values: int = 4096
    """N, physical values per memory layer (a perfect square: the product-key grid is sqrt(N) x sqrt(N))."""
    value_dim: int = 32
    """d_v, width of one physical value (UltraMem: hidden/2; PKM: hidden)."""
    key_dim: int = 32
    """d_k, query/key width per side."""
    num_heads: int = 2
    """H, independent key sets (memory heads)."""
    topk: int = 8
    """m, values selected per head; K = H*m per token."""
    softmax: bool = False
    """PKM's softmax over the selected scores (Table 2 row 'rm softmax' turns it off)."""
    output_projection: bool = True
    """Output linear back to the hidden size (Table 2 'half vdim+proj'); off requires value_dim == hidden."""
    share_query: bool = True
    """One query for all heads (Table 2 'share query')."""
    query_key_layernorm: bool = True
    """LayerNorm on query halves and on the sub-keys (Table 2 'query/key LN')."""
    ive_expansion: int = 4
    """E, implicit value expansion (a perfect square; 1 = off). Eq. 13-15."""
    tucker_rank: int = 2
    """r, TDQKR core rank; 1 = PKM-style additive row+column scores (TDQKR off)."""
    key_layout: Literal["A", "B"] = "A"
    """TDQKR keys: A = r full key matrices scored against the d_k query (authors' code, Table 1);
    B = query and keys reshaped to r chunks of d_k/r (paper text)."""
    num_candidates: Optional[int] = None
    """m_c, row/column candidates of the approximate two-stage top-m (default: topk)."""
    sign_aware_candidates: bool = False
    """Beyond the paper: take top and bottom candidates of each rank-1 factor (exact for rank-1 cores)."""
    num_cores: int = 2
    """h, multi-core scoring (MCS); values split into h slices by dimension. 1 = off."""
    aux_loss_coeff: float = 0.001
    """alpha of the TDQKR auxiliary loss (eq. 12)."""
    aux_loss_tau: float = 0.15
    """tau, margin on the non-leading singular values (eq. 12)."""
    improved_init: bool = True
    """Appendix A initialisation: value variance E/(2 L m H E[s^2]), with E[s^2] the mean square score measured at
    construction (App. A's E/(2 m H L) assumes E[s^2] = 1; docs/memory_layers.md), LN weights from the Monte-Carlo
    E[y]."""
    init_score_population: Literal["virtual", "physical", "keys", "grid"] = "virtual"
    """Which n_draw the Monte-Carlo E[y] uses (the spec's open conflict 3): E*N, N, keys per side, or the candidate
    grid m_c^2 ((2 m_c)^2 with sign_aware_candidates)."""
    query_conv_kernel: int = 5
    """Causal depthwise convolution before the query projection; 0 = off. Kernel size is UNKNOWN in the paper."""
    value_lr_multiplier: float = 10.0
    """lambda_LR: the value LR starts at this multiple of the base LR and decays linearly to 1x (1 = off)."""
    value_weight_decay: bool = True
    """Whether the value tables get weight decay (UNKNOWN in the paper; the authors' code applies it)."""
    lookup_impl: Literal["auto", "reference", "fused", "triton"] = "auto"
    """Implementation of the lookup-reduce (indices, scores, table -> pooled); auto: Triton on GPU, fused on CPU."""
    sharding_mode: Literal["auto", "number", "dimension"] = "auto"
    """How value tables are split over the memory-parallel group (auto: the communication cost model)."""
    sharding_capacity_factor: Optional[float] = None
    """Number-wise sharding with fixed-capacity buffers of ceil(factor * T * K / P) ids per owner: no host sync per
    layer; a rank that needs more raises at the next log interval. None: exact sizes via a count exchange (one
    device-to-host sync per layer on GPU)."""
    sharding_dedup: bool = False
    """Number-wise sharding fetches rows (not owner-pooled partial sums) and requests each distinct row once per rank:
    fewer ids and rows sent when a rank's tokens share rows, for a torch.unique per layer (a host sync on GPU). The
    cost model prices the requests without de-duplication (an upper bound)."""
    overlap: bool = False
    """Issue the lookup at block a and wait at block b (asynchronous collectives / side stream)."""

    @property
    def candidates(self) -> int:
        return self.num_candidates if self.num_candidates is not None else self.topk

    @property
    def keys_per_side(self) -> int:
        """n = sqrt(E * N): the virtual grid is n x n."""
        return math.isqrt(self.ive_expansion * self.num_values)

    @property
    def candidates_per_side(self) -> int:
        """The candidates each side contributes to the re-scored grid: m_c, or with sign-aware candidates the top
        and bottom m_c (2 m_c, all n when that covers the side)."""
        if self.sign_aware_candidates and self.tucker_rank > 1:
            return min(2 * self.candidates, self.keys_per_side)
        return self.candidates

    @property
    def init_score_draws(self) -> int:
        """n_draw for App. A's Monte-Carlo E[y] (the spec's open conflict 3), chosen by `init_score_population`."""
        return {
            "virtual": self.ive_expansion * self.num_values,
            "physical": self.num_values,
            "keys": self.keys_per_side,
            "grid": self.candidates_per_side ** 2,
        }[self.init_score_population]

    def parsed_placements(self, prefix: str = "memory") -> list[tuple[int, int]]:
        return [parse_placement(p, f"{prefix}.placements[{i}]") for i, p in enumerate(self.placements)]

    def validate(self, prefix: str) -> None:
        key = lambda name: _join(prefix, name)  # noqa: E731
        for name in ("num_values", "value_dim", "key_dim", "num_heads", "topk", "ive_expansion", "tucker_rank", "num_cores"):
            _require(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        _require(is_perfect_square(self.num_values), key("num_values"),
                 f"{self.num_values} is not a perfect square; the product-key grid needs sqrt(N) keys per side")
        _require(is_perfect_square(self.ive_expansion), key("ive_expansion"),
                 f"E={self.ive_expansion} is not a perfect square; the virtual grid needs sqrt(E*N) keys per side")
        _require(self.value_dim % self.num_cores == 0, key("value_dim"),
                 f"d_v={self.value_dim} is not divisible by num_cores h={self.num_cores}")
        if self.key_layout == "B":
            _require(self.key_dim % self.tucker_rank == 0, key("key_dim"),
                     f"key layout B needs key_dim divisible by tucker_rank={self.tucker_rank}")
        _require(self.candidates >= 1, key("num_candidates"), "must be >= 1")
        grid_side = self.candidates_per_side
        _require(self.topk <= grid_side ** 2, key("topk"),
                 f"top-m={self.topk} exceeds the {grid_side}x{grid_side} candidate grid")
        _require(self.candidates <= self.keys_per_side, key("num_candidates" if self.num_candidates else "topk"),
                 f"{self.candidates} candidates exceed the {self.keys_per_side} keys per side"
                 + ("" if self.num_candidates else " (num_candidates, unset, is top-m)"))
        _require(self.num_cores == 1 or self.tucker_rank > 1, key("num_cores"), "MCS (num_cores > 1) needs TDQKR (tucker_rank > 1)")
        _require(self.query_conv_kernel >= 0, key("query_conv_kernel"), "must be >= 0")
        _require(self.sharding_capacity_factor is None or 1.0 <= self.sharding_capacity_factor < math.inf,
                 key("sharding_capacity_factor"), "must be finite and >= 1 (a multiple of the balanced T*K/P ids per "
                                                  "owner)")
        _require(not (self.sharding_dedup and self.sharding_capacity_factor is not None), key("sharding_dedup"),
                 "de-duplication (torch.unique, a host sync) defeats sharding_capacity_factor (sync-free): set one")
        _require(not (self.sharding_dedup and self.sharding_mode == "dimension"), key("sharding_dedup"),
                 "de-duplicates number-wise requests; sharding_mode is dimension")
        side_width = self.key_dim // self.tucker_rank if self.key_layout == "B" else self.key_dim
        _require(not self.query_key_layernorm or side_width >= 3, key("key_dim"),
                 f"query/key LayerNorm over a key width of {side_width} leaves at most two distinct keys (it maps "
                 f"every vector of width 2 to +-[1, -1] times the gain, of width 1 to 0)")
        _require(not (self.softmax and self.num_cores > 1), key("softmax"),
                 "softmax with MCS (num_cores > 1) is ambiguous; the paper removes softmax before MCS")
        _require(not (self.sign_aware_candidates and self.tucker_rank == 1), key("sign_aware_candidates"),
                 "has no effect without TDQKR (tucker_rank > 1)")
        _require(not (self.improved_init and not self.query_key_layernorm), key("improved_init"),
                 "the appendix-A score scale is set through the query/key LayerNorm gains: enable query_key_layernorm")
        _require(not self.improved_init or 2 * self.topk <= self.init_score_draws, key("init_score_population"),
                 f"{self.init_score_population!r} gives E[y] over {self.init_score_draws} draws, too few for top-m="
                 f"{self.topk} (needs >= 2 m: the mean of the top m of n draws tends to 0 as m nears n, and the "
                 f"query LayerNorm gain is 1/E[y])")
        _require(self.value_lr_multiplier >= 1.0, key("value_lr_multiplier"), "must be >= 1")
        for name in ("aux_loss_coeff", "aux_loss_tau"):
            _require(getattr(self, name) >= 0, key(name), f"must be >= 0, got {getattr(self, name)}")
        self.parsed_placements(prefix)


@dataclass
class MoEConfig:
    """Megatron-Core MoE baseline (every transformer layer's MLP becomes an MoE layer)."""

    num_experts: int = 8
    """Experts per MoE layer."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: Optional[int] = None
    """FFN width of one expert (default: model.ffn_hidden_size)."""
    moe_aux_loss_coeff: float = 0.01
    """Weight of the load-balancing loss."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    """Megatron-Core's token dispatcher (all-to-all or all-gather over the expert-parallel group)."""

    def validate(self, prefix: str) -> None:
        key = lambda name: _join(prefix, name)  # noqa: E731
        _require(self.num_experts >= 1, key("num_experts"), f"must be >= 1, got {self.num_experts}")
        _require(1 <= self.moe_router_topk <= self.num_experts, key("moe_router_topk"),
                 f"must be in [1, num_experts={self.num_experts}]")
        _require(self.moe_ffn_hidden_size is None or self.moe_ffn_hidden_size >= 1, key("moe_ffn_hidden_size"),
                 f"must be >= 1 when set (null: model.ffn_hidden_size), got {self.moe_ffn_hidden_size}")
        _require(self.moe_aux_loss_coeff >= 0, key("moe_aux_loss_coeff"),
                 f"must be >= 0, got {self.moe_aux_loss_coeff}")


@dataclass
class ModelConfig:
    family: Family = "dense"
    """dense, moe (model.moe), pkm or ultramem (model.memory)."""
    num_layers: int = 4
    """Transformer blocks L."""
    hidden_size: int = 64
    """D, the residual width."""
    ffn_hidden_size: Optional[int] = None
    """Default 4 * hidden_size (the paper's GELU MLP)."""
    num_attention_heads: int = 4
    """Attention heads (must divide hidden_size)."""
    vocab_size: Optional[int] = None
    """Default: the tokenizer's vocabulary, padded to make_vocab_size_divisible_by * TP."""
    make_vocab_size_divisible_by: int = 128
    """Padding multiple of the vocabulary (times TP), as Megatron-LM."""
    untie_embeddings_and_output_weights: bool = False
    """A separate output layer instead of the input embedding's transpose."""
    init_method_std: float = 0.02
    """Standard deviation of the normal init of the linear weights."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """LayerNorm or RMSNorm in every block."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of the block norms."""
    add_bias_linear: Optional[bool] = None
    """Biases in the attention and MLP linears. Default: true, false for family 'moe' (umtrain's Megatron-Core MoE
    layers have no expert biases, so true is refused there)."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    rotary_percent: float = 1.0
    """Fraction of each attention head's dimensions rotated by RoPE."""
    moe: Optional[MoEConfig] = None
    """The MoE section (family 'moe')."""
    memory: Optional[MemoryConfig] = None
    """The memory-layer section (families 'pkm' and 'ultramem')."""

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def moe_ffn_size(self) -> int:
        """Width of one expert's FFN (family 'moe'): model.moe.moe_ffn_hidden_size, default the dense FFN size."""
        width = self.moe.moe_ffn_hidden_size
        return width if width is not None else self.ffn_size

    @property
    def linear_bias(self) -> bool:
        return self.add_bias_linear if self.add_bias_linear is not None else self.family != "moe"

    @property
    def has_memory(self) -> bool:
        """The families with memory layers (model.memory): PKM and UltraMem."""
        return self.family in ("pkm", "ultramem")

    def validate(self, prefix: str) -> None:
        key = lambda name: _join(prefix, name)  # noqa: E731
        for name in ("num_layers", "hidden_size", "num_attention_heads", "make_vocab_size_divisible_by"):
            _require(getattr(self, name) >= 1, key(name), "must be >= 1")
        for name in ("ffn_hidden_size", "vocab_size"):
            _require(getattr(self, name) is None or getattr(self, name) >= 1, key(name), "must be >= 1 when set")
        for name in ("hidden_dropout", "attention_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, key(name), f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("init_method_std", "layernorm_epsilon", "rotary_base"):
            _require(getattr(self, name) > 0, key(name), f"must be > 0, got {getattr(self, name)}")
        _require(0.0 < self.rotary_percent <= 1.0, key("rotary_percent"), "must be in (0, 1]")
        _require(not (self.family == "moe" and self.add_bias_linear), key("add_bias_linear"),
                 "family 'moe' has no linear biases (its experts have none): leave it unset or false")
        _require(self.hidden_size % self.num_attention_heads == 0, key("hidden_size"),
                 f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        self._validate_rotary_dim(prefix)
        if self.family == "moe":
            _require(self.moe is not None, key("moe"), "family 'moe' needs a model.moe section")
        if self.has_memory:
            _require(self.memory is not None, key("memory"), f"family '{self.family}' needs a model.memory section")
            self._validate_memory(_join(prefix, "memory"))

    @property
    def head_dim(self) -> int:
        """Width of one attention head (Megatron's default kv_channels)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head RoPE rotates, as Megatron-Core's RotaryEmbedding computes them."""
        return int(self.head_dim * self.rotary_percent) if self.rotary_percent < 1.0 else self.head_dim

    def _validate_rotary_dim(self, prefix: str) -> None:
        """RoPE (umtrain's one position embedding) rotates pairs of dimensions: Megatron-Core builds rotary_dim / 2
        frequencies, rounded up, and an odd rotary_dim gives a one-wider rotation than the head's slice (a shape
        error when it is the whole head)."""
        if self.rotary_dim >= 2 and self.rotary_dim % 2 == 0:
            return
        cause = "hidden_size" if self.rotary_percent == 1.0 else "rotary_percent"
        raise ConfigError(_join(prefix, cause),
                          f"RoPE rotates pairs of dimensions, but rotates {self.rotary_dim} of each head's "
                          f"{self.head_dim} (hidden_size={self.hidden_size} / num_attention_heads="
                          f"{self.num_attention_heads}, rotary_percent={self.rotary_percent}): the rotated dimensions "
                          f"must be even and >= 2")

    def _validate_memory(self, prefix: str) -> None:
        memory = self.memory
        spans = sorted(memory.parsed_placements(prefix))
        _require(spans == memory.parsed_placements(prefix), f"{prefix}.placements",
                 f"list them in layer order, {[f'{a}:{b}' for a, b in spans]}: a placement's position seeds its IVE "
                 f"permutation and initialisation, and the portable model numbers them in layer order")
        for i, (a, b) in enumerate(spans):
            _require(b <= self.num_layers, f"{prefix}.placements",
                     f"placement '{a}:{b}' is out of range for num_layers={self.num_layers}")
            if i and a <= spans[i - 1][1]:
                prev = spans[i - 1]
                raise ConfigError(f"{prefix}.placements",
                                  f"placements '{prev[0]}:{prev[1]}' and '{a}:{b}' overlap")
        check_memory_output_width(memory, self.hidden_size, prefix)


PKM_MEMORY_DEFAULTS: dict[str, Any] = {
    "softmax": True, "output_projection": False, "share_query": False, "query_key_layernorm": False,
    "ive_expansion": 1, "tucker_rank": 1, "num_cores": 1, "improved_init": False, "query_conv_kernel": 0,
    "value_lr_multiplier": 1.0,
}
"""The memory switches of a `family: pkm` model that the config leaves unset (Lample et al.'s product-key memory:
Table 2's first row). `MemoryConfig`'s own defaults are UltraMem's."""


def check_memory_output_width(memory: MemoryConfig, hidden_size: int, prefix: str = "model.memory") -> None:
    """Without the output projection the pooled values are the layer's output: d_v must be the hidden size, and IVE
    (whose E pooled blocks the projection merges, eq. 15) must be off."""
    if memory.output_projection:
        return
    _require(memory.value_dim == hidden_size, f"{prefix}.value_dim",
             f"without output_projection the value width {memory.value_dim} must equal hidden_size={hidden_size}")
    _require(memory.ive_expansion == 1, f"{prefix}.ive_expansion",
             f"IVE (ive_expansion={memory.ive_expansion}) needs output_projection: true")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """TP: ranks that split each layer's weights."""
    pipeline_model_parallel_size: int = 1
    """PP: pipeline stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage (interleaved schedule; null: none)."""
    sequence_parallel: bool = False
    """Split the norms, dropouts and memory layers over the sequence within a TP group."""
    expert_model_parallel_size: int = 1
    """Also the memory-parallel size P: value tables are sharded over Megatron's expert-parallel group."""
    memory_parallel_group: Literal["data", "tensor_data"] = "data"
    """Where a memory-parallel group of P ranks lies. data: P data-parallel ranks of equal TP rank (each TP rank holds
    a replica of its group's table shards). tensor_data: P consecutive ranks in TP-then-DP order (P < TP: part of a
    TP group; P = TP: the TP group; P = TP x DP: their product; no table replica across TP ranks), through
    Megatron's expert tensor-parallel size 1. PKM/UltraMem only."""
    use_distributed_optimizer: bool = True
    """Shard the optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward."""
    comm_calibration: Optional[str] = None
    """JSON of measured alpha/beta (`umtrain calibrate-comm`) for the memory-sharding cost model (default: a guess)."""
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto: nccl when CUDA is available, gloo otherwise."""

    def validate(self, prefix: str) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
            _require(getattr(self, name) >= 1, _join(prefix, name), "must be >= 1")
        _require(self.virtual_pipeline_model_parallel_size is None or self.virtual_pipeline_model_parallel_size >= 2,
                 _join(prefix, "virtual_pipeline_model_parallel_size"), "must be >= 2 when set (null: no virtual stages)")
        if self.sequence_parallel:
            _require(self.tensor_model_parallel_size > 1, _join(prefix, "sequence_parallel"),
                     "needs tensor_model_parallel_size > 1")
        if self.overlap_param_gather:
            _require(self.use_distributed_optimizer, _join(prefix, "overlap_param_gather"),
                     "needs use_distributed_optimizer: true")


@dataclass
class DataConfig:
    data_path: List[BlendEntry] = field(default_factory=list)
    """Megatron blend: [0.7, prefix_a, 0.3, prefix_b] (weights as numbers or strings) or a single prefix (without
    .bin/.idx)."""
    split: str = "969,30,1"
    """Train/validation/test weights of each dataset, as Megatron's '969,30,1'."""
    valid_data_path: Optional[List[BlendEntry]] = None
    """A separate validation blend (e.g. C4 validation); overrides the split's validation part."""
    seq_length: int = 128
    """Tokens per sample."""
    tokenizer_type: Literal["sentencepiece", "huggingface"] = "sentencepiece"
    """Kind of data.tokenizer_model."""
    tokenizer_model: Optional[str] = None
    """A SentencePiece .model or a Hugging Face tokenizer.json."""
    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token."""
    reset_attention_mask: bool = False
    """Keep attention within documents (a block-diagonal mask per sample)."""
    eod_mask_loss: bool = False
    """Leave out of the loss the positions whose input is an end-of-document token (the prediction of the next
    document's first token); predicting the end-of-document token itself stays in the loss."""
    mock: bool = False
    """Random tokens (no files needed); for smoke tests and benchmarks."""
    mock_vocab_size: int = 256
    """Vocabulary of data.mock's random tokens (the last id is the end-of-document token)."""
    cache_path: Optional[str] = None
    """Where Megatron's dataset builders cache their sample indices (default: PREFIX/cache/GPTDataset_indices, a
    folder named after each data prefix, which `umtrain preprocess --overwrite` clears)."""

    def validate(self, prefix: str) -> None:
        _require(self.seq_length >= 2, _join(prefix, "seq_length"), "must be >= 2")
        _require(self.mock_vocab_size >= 2, _join(prefix, "mock_vocab_size"),
                 f"must be >= 2 (the last id is the end-of-document token), got {self.mock_vocab_size}")
        parts = self.split.replace("/", ",").split(",")
        _require(len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
                 _join(prefix, "split"), f"{self.split!r} must be three numbers like '969,30,1'")
        _require(float(parts[0]) > 0 or self.mock, _join(prefix, "split"),
                 f"{self.split!r} leaves no training part (the first number must be > 0)")
        if not self.mock:
            _require(bool(self.data_path), _join(prefix, "data_path"), "is empty (set data.mock: true for random tokens)")
            _require(self.tokenizer_model is not None, _join(prefix, "tokenizer_model"), "is not set")
        _require(self.tokenizer_model is None or self.tokenizer_model.strip() != "", _join(prefix, "tokenizer_model"),
                 "is empty: give a path, or null")


@dataclass
class OptimizerConfig:
    optimizer: Literal["adamw"] = "adamw"
    """AdamW (Megatron-Core's Adam with decoupled weight decay); the one choice so far."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr: float = 6e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not on biases and norms; value tables: model.memory.value_weight_decay)."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.95
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's denominator epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0: off)."""

    def validate(self, prefix: str) -> None:
        _require(self.lr > 0, _join(prefix, "lr"), "must be > 0")
        _require(0 <= self.min_lr <= self.lr, _join(prefix, "min_lr"), "must be in [0, lr]")
        _require(self.clip_grad >= 0, _join(prefix, "clip_grad"), "must be >= 0 (0 disables clipping)")
        _require(self.weight_decay >= 0, _join(prefix, "weight_decay"), "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, _join(prefix, name), f"must be in [0, 1), got {getattr(self, name)}")
        _require(self.adam_eps > 0, _join(prefix, "adam_eps"), "must be > 0")


@dataclass
class ScheduleConfig:
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after the warmup."""
    lr_warmup_iters: Optional[int] = None
    """Linear warmup steps (default: lr_warmup_fraction of the decay steps)."""
    lr_warmup_fraction: float = 0.01
    """Warmup as a fraction of the decay steps, when lr_warmup_iters is unset."""
    lr_decay_iters: Optional[int] = None
    """Default: training.train_iters."""

    def validate(self, prefix: str) -> None:
        _require(0.0 <= self.lr_warmup_fraction <= 1.0, _join(prefix, "lr_warmup_fraction"), "must be in [0, 1]")
        _require(self.lr_warmup_iters is None or self.lr_warmup_iters >= 0, _join(prefix, "lr_warmup_iters"),
                 "must be >= 0")
        _require(self.lr_decay_iters is None or self.lr_decay_iters >= 1, _join(prefix, "lr_decay_iters"),
                 "must be >= 1")


def parse_signal(name: str, key: str = "training.exit_signal") -> signal.Signals:
    """'SIGUSR1', 'USR1' or '10' -> signal.SIGUSR1."""
    text = name.strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ConfigError(key, f"{name!r} is not a signal name (e.g. SIGUSR1, SIGTERM)") from None


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    """Samples per rank per forward."""
    global_batch_size: int = 8
    """Samples per optimizer step (micro-batches accumulate to it)."""
    train_iters: int = 100
    """Optimizer steps."""
    seed: int = 1234
    """Seed of the init, the data order and dropout."""
    eval_interval: int = 50
    """Steps between validation runs."""
    eval_iters: int = 4
    """Validation batches per run (0: no validation)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    nan_policy: Literal["skip", "stop"] = "stop"
    """On a NaN/Inf loss or grad norm: skip the step, or stop with a checkpoint of the last good state."""
    recompute_granularity: Optional[Literal["full"]] = None
    """full: recompute the activations of whole blocks in backward (null: keep them)."""
    recompute_num_layers: int = 1
    """Blocks per recomputed chunk under full recompute."""
    exit_signal: str = "SIGUSR1"
    """Signal that triggers a checkpoint and a requeue exit (SIGTERM always does)."""

    def params_dtype(self, cuda: Optional[bool] = None) -> torch.dtype:
        """The dtype training runs in (parameters, activations, memory values and scores): `precision`, with auto
        resolved for the training device. `cuda`: whether that device is a GPU (default: this machine's); a plan for
        another cluster passes the target's."""
        import torch   # here, so that reading a config (launchers, sweeps) does not import torch

        precision = self.precision
        if precision == "auto":
            precision = "bf16" if (torch.cuda.is_available() if cuda is None else cuda) else "fp32"
        return torch.bfloat16 if precision == "bf16" else torch.float32

    def validate(self, prefix: str) -> None:
        for name in ("micro_batch_size", "global_batch_size", "train_iters"):
            _require(getattr(self, name) >= 1, _join(prefix, name), "must be >= 1")
        _require(self.eval_interval >= 1, _join(prefix, "eval_interval"), "must be >= 1")
        _require(self.eval_iters >= 0, _join(prefix, "eval_iters"), "must be >= 0 (0: no validation)")
        _require(self.recompute_num_layers >= 1, _join(prefix, "recompute_num_layers"), "must be >= 1")
        key = _join(prefix, "exit_signal")
        _require(parse_signal(self.exit_signal, key) not in (signal.SIGKILL, signal.SIGSTOP), key,
                 f"{self.exit_signal} cannot be caught, so it cannot trigger a checkpoint")


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Directory of checkpoints (iter_0000100/, latest)."""
    save_interval: int = 0
    """Every N steps (0: only at the end)."""
    load: Optional[str] = None
    """Where the run starts (a checkpoint or checkpoint directory) while `save` holds no checkpoint of its own."""
    keep_last: int = 3
    """Checkpoints of the latest steps to keep."""
    keep_every: int = 0
    """Also keep every M-th step's checkpoint forever (0: none)."""
    async_save: bool = False
    """Write checkpoints in the background (Megatron's asynchronous dist_checkpointing)."""
    no_load_optim: bool = False
    """On load, take the weights only and start a fresh optimizer."""

    def validate(self, prefix: str) -> None:
        for name in ("save", "load"):
            _require(getattr(self, name) is None or getattr(self, name).strip() != "", _join(prefix, name),
                     "is empty: give a directory, or null to leave it unset")
        _require(self.save_interval >= 0, _join(prefix, "save_interval"), "must be >= 0")
        _require(self.keep_last >= 1, _join(prefix, "keep_last"), "must be >= 1")
        _require(self.keep_every >= 0, _join(prefix, "keep_every"), "must be >= 0 (0: none)")
        for name in ("save_interval", "async_save"):
            _require(self.save is not None or not getattr(self, name), _join(prefix, name),
                     "has no effect without checkpoint.save (the directory to save into)")


@dataclass
class LoggingConfig:
    log_interval: int = 10
    """Steps between console (and tensorboard/wandb) log lines."""
    tensorboard_dir: Optional[str] = None
    """Tensorboard event directory (null: off)."""
    wandb_project: Optional[str] = None
    """Weights & Biases project (null: off)."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """Weights & Biases mode (offline needs no network)."""
    wandb_dir: Optional[str] = None
    """Weights & Biases run directory (default: ./wandb)."""
    progress_bar: bool = True
    """A progress bar on an interactive terminal."""
    memory_stats: bool = True
    """Memory-layer health (fraction of values hit, mean top-1 score, output std) per interval."""
    profile_dir: Optional[str] = None
    """Directory for `torch.profiler` traces and summaries of the steps below, one per rank (null: off)."""
    profile_start: int = 10
    """First profiled step (1-based, as in the log lines); later than step 1 so that compilation and allocator
    warm-up stay out of the profile."""
    profile_steps: int = 2
    """Steps profiled."""

    def validate(self, prefix: str) -> None:
        _require(self.log_interval >= 1, _join(prefix, "log_interval"), "must be >= 1")
        _require(self.profile_start >= 1, _join(prefix, "profile_start"), "must be >= 1 (steps count from 1)")
        _require(self.profile_steps >= 1, _join(prefix, "profile_steps"), "must be >= 1")


@dataclass
class Config:
    run_name: str = "umtrain"
    """Name of the run in logs and wandb (configs/paper/ names select the paper's figures in `umtrain count`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenizer."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Batch sizes, steps, precision, recompute."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and loading."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, tensorboard and wandb."""
