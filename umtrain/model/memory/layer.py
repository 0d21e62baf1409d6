"""The memory layer: PKM (Lample et al.) and UltraMem (Huang et al., ICLR 2025), one module, every change a switch.

Forward (spec 2.1), for x [S, B, D] = block a's pre-MLP LayerNorm output:
    x -> causal depthwise conv -> W_q -> LN_q -> sub-key scores against LN_k(keys)
      -> (approximate) top-m -> per-core weights -> IVE address -> lookup-reduce -> W_out -> [S, B, D]

Which family a config gives follows from its switches; PKM is softmax on, tucker_rank 1, num_cores 1,
ive_expansion 1, no output projection, no shared query, value_dim == hidden. The value table is only ever
touched through the lookup-reduce interface (`umtrain.ops.lookup_reduce`), so a sharding strategy can own it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from umtrain.config.schema import MemoryConfig, check_memory_output_width
from umtrain.model.memory.conv import causal_depthwise_conv, identity_kernel
from umtrain.model.memory.init import derive_seed, expected_top_m_mean, improved_value_variance
from umtrain.model.memory.retrieval import Selection, select_top_m, tdqkr_aux_loss, tdqkr_core_factors
from umtrain.ops.lookup_reduce import LookupReduce, get_lookup_reduce

_CALIBRATION_DRAWS = 32
_CALIBRATION_TOKENS = 64
_MEAN_SQUARE_WEIGHT_CACHE: dict[tuple[str, int], float] = {}
_LAYERNORM_EPS = 1e-5


HEALTH_METRICS = ("value_hit_fraction", "top1_score", "output_std")


class MemoryLayer(nn.Module):
    """One memory layer. Parameters (full shapes; `values` may be a shard of shape `table_shape`):

    conv.weight [D, 1, k]            causal depthwise conv (query_conv_kernel > 0)
    query.weight [Q*2*d_k, D]        Q = 1 with share_query, else H
    query_norm.*, key_norm.* [w]     query/key LayerNorm (w = d_k; keys of layout B: d_k/r)
    row_keys, col_keys [H, r, n, w]  sub-keys; n = sqrt(E*N) keys per side
    cores [H, h, r, r]               TDQKR/MCS cores (tucker_rank > 1)
    out_proj.weight [D, E*d_v]       output projection, IVE's W_p folded in (output_projection)
    values [N, d_v]                  the value table, tagged `is_memory_value` (initialised last)
    """

    def __init__(self, config: MemoryConfig, hidden_size: int, num_layers: int, seed: int, layer_index: int,
                 lookup: Optional[LookupReduce] = None, table_shape: Optional[tuple[int, int]] = None,
                 sequence_history: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                 record_stats: bool = True, initialize: bool = True):
        """`sequence_history(x, n)`: the n tokens before x's first one, when x is one rank's slice of a longer
        sequence (sequence parallelism); None when x holds whole sequences. `record_stats`: keep the health
        statistics of training forwards (`logging.memory_stats`; about ten small kernels per forward).
        `initialize` False leaves the parameters unset, for a caller that overwrites them all, as the trainer's
        layout-independent initialisation does (a table of 1.2 M x 512 values takes seconds to draw)."""
        super().__init__()
        self.config = config
        self.record_stats = record_stats
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.seed = seed
        self.layer_index = layer_index
        self.lookup = lookup if lookup is not None else get_lookup_reduce(config.lookup_impl)
        self.sequence_history = sequence_history
        self.keys_per_side = config.keys_per_side
        self.table_shape = self._checked_table_shape(table_shape)
        check_memory_output_width(config, hidden_size)

        c, d_k, rank = config, config.key_dim, config.tucker_rank
        self.key_width = d_k // rank if c.key_layout == "B" else d_k
        self.conv = nn.Conv1d(hidden_size, hidden_size, c.query_conv_kernel, groups=hidden_size, bias=False) \
            if c.query_conv_kernel > 0 else None
        num_queries = 1 if c.share_query else c.num_heads
        self.query = nn.Linear(hidden_size, num_queries * 2 * d_k, bias=False)
        self.query_norm = nn.LayerNorm(d_k, eps=_LAYERNORM_EPS) if c.query_key_layernorm else None
        self.key_norm = nn.LayerNorm(self.key_width, eps=_LAYERNORM_EPS) if c.query_key_layernorm else None
        key_shape = (c.num_heads, rank, self.keys_per_side, self.key_width)
        self.row_keys = nn.Parameter(torch.empty(key_shape))
        self.col_keys = nn.Parameter(torch.empty(key_shape))
        self.cores = nn.Parameter(torch.empty(c.num_heads, c.num_cores, rank, rank)) if rank > 1 else None
        self.out_proj = nn.Linear(c.ive_expansion * c.value_dim, hidden_size, bias=False) \
            if c.output_projection else None
        self.values = nn.Parameter(torch.empty(self.table_shape))
        self.values.is_memory_value = True

        self._register_buffers()
        self.query_norm_gain, self.key_norm_gain = self._layernorm_gains()
        self.value_std = self._value_init_std()
        if initialize:
            self.reset_parameters()
        self.aux_loss = torch.zeros(())
        self.last_stats: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------- construction

    def _checked_table_shape(self, table_shape: Optional[tuple[int, int]]) -> tuple[int, int]:
        full = (self.config.num_values, self.config.value_dim)
        if table_shape is None:
            return full
        shape = tuple(int(s) for s in table_shape)
        if len(shape) != 2 or not (1 <= shape[0] <= full[0] and 1 <= shape[1] <= full[1]):
            raise ValueError(f"table_shape {table_shape} must be a local [rows, dims] shard of the full table {full}")
        return shape

    def _register_buffers(self) -> None:
        c = self.config
        if c.ive_expansion > 1:
            self.register_buffer("ive_permutation", self._ive_permutation())
        else:
            self.ive_permutation = None
        if c.tucker_rank > 1:
            self.register_buffer("tdqkr_row_factor", torch.zeros(c.num_heads, c.tucker_rank))
            self.register_buffer("tdqkr_col_factor", torch.zeros(c.num_heads, c.tucker_rank))
            self.register_load_state_dict_post_hook(_recompute_right_basis_after_load)
        else:
            self.tdqkr_row_factor = self.tdqkr_col_factor = None
        # V of the aux loss, [H, r, r] in float32 or wider: not a buffer, so that a bf16 cast of the module leaves
        # it alone (a bf16 V leaks about 2^-9 of sigma_1 into every lambda_i), and not saved (it follows the cores).
        # It belongs to the cores of the (device, dtype) it was computed from; a move or cast makes it stale.
        self.tdqkr_right_basis: Optional[torch.Tensor] = None
        self.tdqkr_right_basis_of: Optional[tuple[torch.device, torch.dtype]] = None
        self.tdqkr_refresh_pending = False
        self.register_buffer("value_hits", torch.zeros(c.num_values, dtype=torch.bool), persistent=False)
        # (sum of top-1 scores, sum of output stds, forwards) in float64; not a buffer, so a bf16 cast leaves it alone.
        self.stat_sums: Optional[torch.Tensor] = None

    def _ive_permutation(self) -> torch.Tensor:
        """pi over the E*N virtual addresses (eq. 14), drawn from (seed, layer_index): identical on every rank."""
        size = self.config.ive_expansion * self.config.num_values
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.layer_index, "ive-permutation"))
        dtype = torch.int32 if size <= torch.iinfo(torch.int32).max else torch.int64
        return torch.randperm(size, generator=generator).to(dtype)

    def _layernorm_gains(self) -> tuple[float, float]:
        """App. A: query-LN weight 1/E[y], key-LN weight 1/sqrt(w), so each sub-score is ~N(0, 1/E[y]^2)."""
        if not self.config.improved_init:
            return 1.0, 1.0
        mean_top = expected_top_m_mean(self.config.init_score_draws, self.config.topk)
        return 1.0 / mean_top, self.key_width ** -0.5

    def _value_init_std(self) -> float:
        """Baseline: N(0, 1/d_v) [P]. Improved: E/(2 L K E[s^2]) with E[s^2] measured on this layer's own init."""
        if not self.config.improved_init:
            return self.config.value_dim ** -0.5
        return improved_value_variance(self.config, self.num_layers, self.init_mean_square_weight()) ** 0.5

    # ----------------------------------------------------------------------------------------- initialisation

    def init_generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        """The generator `reset_parameters()` uses by default, seeded from (seed, layer_index)."""
        return torch.Generator(device).manual_seed(derive_seed(self.seed, self.layer_index, "init"))

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's unsharded shape, in initialisation order: the value table last."""
        shapes = {name: tuple(p.shape) for name, p in self.named_parameters() if name != "values"}
        shapes["values"] = (self.config.num_values, self.config.value_dim)
        return shapes

    def initial_value(self, param_name: str, generator: torch.Generator) -> torch.Tensor:
        """The full (unsharded) initial tensor of `param_name`, drawn from `generator` (on the generator's device)."""
        shapes = self.full_shapes()
        if param_name not in shapes:
            raise KeyError(f"MemoryLayer has no parameter {param_name!r}; it has {list(shapes)}")
        shape, device, c = shapes[param_name], generator.device, self.config

        def normal(std: float) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=device) * std

        if param_name == "conv.weight":
            return identity_kernel(self.hidden_size, c.query_conv_kernel).to(device)
        if param_name == "query.weight":
            return normal(c.key_dim ** -0.5)
        if param_name.endswith("norm.bias"):
            return torch.zeros(shape, device=device)
        if param_name.endswith("norm.weight"):
            gain = self.query_norm_gain if param_name.startswith("query") else self.key_norm_gain
            return torch.full(shape, gain, device=device)
        if param_name in ("row_keys", "col_keys"):
            return normal(self.key_width ** -0.5)
        if param_name == "cores":
            return torch.rand(shape, generator=generator, device=device)
        if param_name == "out_proj.weight":
            return normal((c.ive_expansion * c.value_dim) ** -0.5)
        return normal(self.value_std)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Initialise every parameter from `generator` (default: `init_generator()`), then the TDQKR factors (step 0).

        A sharded value table (table_shape smaller than the full table) gets a shard drawn from the same
        distribution; a layout-independent table is the trainer's job (slice `initial_value("values", g)`).
        The table is drawn last so that sharding does not change what the other parameters draw.
        """
        generator = generator if generator is not None else self.init_generator()
        for name, shape in self.full_shapes().items():
            param = self.get_parameter(name)
            if tuple(param.shape) != shape:
                value = torch.randn(param.shape, generator=generator, device=generator.device) * self.value_std
            else:
                value = self.initial_value(name, generator)
            param.copy_(value)
        self.refresh_tdqkr_factors(restart=True)

    @torch.no_grad()
    def init_mean_square_weight(self) -> float:
        """E[s^2] of the per-core weights at init: N(0,1) tokens, averaged over independent draws of the score params.

        App. A's value variance assumes E[s^2] = 1; PKM's additive grid, TDQKR's bilinear grid and MCS's per-core
        split (about 1/h of the summed score each, spec 2.6) all move it, so it is measured instead. It is an
        expectation over init draws (the U(0,1) cores alone move one draw's E[s^2] by tens of percent), so it does
        not depend on which generator later initialises the layer: a property of (config, hidden size), cached.
        """
        key = (repr(self.config), self.hidden_size)
        if key not in _MEAN_SQUARE_WEIGHT_CACHE:
            _MEAN_SQUARE_WEIGHT_CACHE[key] = self._measure_mean_square_weight()
        return _MEAN_SQUARE_WEIGHT_CACHE[key]

    def _measure_mean_square_weight(self) -> float:
        score_params = [name for name in self.full_shapes() if name not in ("values", "out_proj.weight")]
        total = 0.0
        for draw in range(_CALIBRATION_DRAWS):
            generator = torch.Generator().manual_seed(derive_seed(0, 0, f"init-calibration-{draw}"))
            params = {name: self.initial_value(name, generator) for name in score_params}
            factors = (None, None)
            if "cores" in params:
                zeros = torch.zeros(self.config.num_heads, self.config.tucker_rank)
                core_factors = tdqkr_core_factors(params["cores"], zeros, zeros)
                factors = (core_factors.row, core_factors.col)
            x = torch.randn(_CALIBRATION_TOKENS, 1, self.hidden_size, generator=generator)
            total += self._weights(self._select(x, params, *factors)).pow(2).mean().item()
        return total / _CALIBRATION_DRAWS

    @torch.no_grad()
    def refresh_tdqkr_factors(self, restart: bool = False, at_next_forward: bool = False) -> None:
        """Recompute (u, t) and the singular basis of the aux loss from the SVD of the summed core; call once per
        optimizer step (spec 2.3), so that the forward itself needs no SVD.

        restart: forget the previous sign and apply the step-0 rule; call it so after overwriting the parameters
        from outside (a layout-independent init), so that the factors match the new cores from the first step.
        at_next_forward: the cores on this rank are not updated yet (Megatron's distributed optimizer with
        `overlap_param_gather` all-gathers them in the next forward's pre-hooks): refresh at the start of the next
        forward instead, which then costs that forward the SVD's host synchronisation.
        """
        if self.cores is None:
            return
        if at_next_forward:
            if restart:
                raise ValueError("refresh_tdqkr_factors: restart applies now; it cannot wait for the next forward")
            self.tdqkr_refresh_pending = True
            return
        self.tdqkr_refresh_pending = False
        if restart:
            self.tdqkr_row_factor.zero_()
            self.tdqkr_col_factor.zero_()
        factors = tdqkr_core_factors(self.cores.detach(), self.tdqkr_row_factor, self.tdqkr_col_factor)
        self.tdqkr_row_factor.copy_(factors.row)
        self.tdqkr_col_factor.copy_(factors.col)
        self._set_right_basis(factors.right_basis)

    def _set_right_basis(self, right_basis: torch.Tensor) -> None:
        self.tdqkr_right_basis = right_basis
        self.tdqkr_right_basis_of = (self.cores.device, self.cores.dtype)

    @torch.no_grad()
    def _recompute_right_basis(self) -> None:
        """V of the current cores, (u, t) kept: after a state-dict load (the loaded (u, t) carry their sign over from
        the run that saved them) or a move or cast of the cores."""
        factors = tdqkr_core_factors(self.cores.detach(), self.tdqkr_row_factor, self.tdqkr_col_factor)
        self._set_right_basis(factors.right_basis)

    def run_pending_tdqkr_refresh(self) -> None:
        """The refresh deferred by `refresh_tdqkr_factors(at_next_forward=True)`, now (the cores must be current)."""
        if self.tdqkr_refresh_pending:
            self.refresh_tdqkr_factors()

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) carry the last auxiliary loss's value without its autograd graph: deepcopy
        refuses a tensor that is not a graph leaf, and a copy for evaluation or an EMA must not hold the graph."""
        return {**super().__getstate__(), "aux_loss": self.aux_loss.detach()}

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, conv_history: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [S, B, D] -> [S, B, D]. `conv_history` [k-1, B, D]: the inputs before x's first token, for the query
        conv when x continues a sequence (incremental decoding); by default they come from `sequence_history`, or
        are zeros."""
        seq, batch, hidden = x.shape
        self.run_pending_tdqkr_refresh()
        if conv_history is None:
            conv_history = self._conv_history(x)
        selection = self._select(x, dict(self.named_parameters()), self.tdqkr_row_factor, self.tdqkr_col_factor,
                                 conv_history)
        weights = self._weights(selection)
        rows, blocks = self._physical_address(selection)
        tokens, cores = seq * batch, weights.shape[0]
        pooled = self.lookup(rows, blocks, weights.reshape(cores, tokens, -1), self.values, self.config.ive_expansion)
        out = self.out_proj(pooled.flatten(1)) if self.out_proj is not None else pooled[:, 0]
        self.aux_loss = self._aux_loss(x)
        if self.training and self.record_stats:   # health metrics describe training steps, not validation
            self._record_stats(selection, rows, out)
        return out.view(seq, batch, hidden)

    def _conv_history(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.conv is None or self.sequence_history is None or self.config.query_conv_kernel < 2:
            return None
        return self.sequence_history(x, self.config.query_conv_kernel - 1)

    def _select(self, x: torch.Tensor, params: Mapping[str, torch.Tensor], row_factor: Optional[torch.Tensor],
                col_factor: Optional[torch.Tensor], history: Optional[torch.Tensor] = None) -> Selection:
        """Sub-key scores of every token and its top-m cells (spec 2.1, up to TDQKR); `history`: the query conv's
        tokens before x (`causal_depthwise_conv`)."""
        c = self.config
        if "conv.weight" in params:
            x = causal_depthwise_conv(x, params["conv.weight"], history)
        tokens = x.reshape(-1, self.hidden_size)
        query = F.linear(tokens, params["query.weight"]).view(tokens.shape[0], -1, 2, c.key_dim)
        row_keys, col_keys = params["row_keys"], params["col_keys"]
        if c.query_key_layernorm:
            query = F.layer_norm(query, (c.key_dim,), params["query_norm.weight"], params["query_norm.bias"],
                                 _LAYERNORM_EPS)
            key_norm = (self.key_width,), params["key_norm.weight"], params["key_norm.bias"], _LAYERNORM_EPS
            row_keys, col_keys = F.layer_norm(row_keys, *key_norm), F.layer_norm(col_keys, *key_norm)
        query = query.expand(-1, c.num_heads, -1, -1)
        s_row = self._sub_scores(query[:, :, 0], row_keys)
        s_col = self._sub_scores(query[:, :, 1], col_keys)
        sign_aware = c.sign_aware_candidates and c.tucker_rank > 1
        row_factor_scores = self._factor_scores(query[:, :, 0], row_keys, s_row, row_factor)
        col_factor_scores = self._factor_scores(query[:, :, 1], col_keys, s_col, col_factor)
        return select_top_m(s_row, s_col, params.get("cores"), row_factor_scores, col_factor_scores, c.topk,
                            c.candidates, sign_aware)

    def _sub_scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query [T, H, d_k], keys [H, r, n, w] -> [T, H, r, n]. Layout B splits the query into r chunks of d_k/r."""
        if self.key_width == self.config.key_dim:
            return torch.einsum("tjd,jrnd->tjrn", query, keys)
        chunks = query.unflatten(-1, (self.config.tucker_rank, self.key_width))
        return torch.einsum("tjrd,jrnd->tjrn", chunks, keys)

    @torch.no_grad()
    def _factor_scores(self, query: torch.Tensor, keys: torch.Tensor, sub_scores: torch.Tensor,
                       factor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """TDQKR's rank-1 factor scores factor^T S [T, H, n] (eq. 7) for candidate selection; None without a factor.

        For more tokens than the key width, one GEMM against the factor-weighted keys (S is linear in the keys; in
        layout B each rank's keys meet their own d_k/r chunk of the query): summing S [T, H, r, n] over r reads all of
        S, which on an H200 at 32,768 tokens took 1.7 ms of the layer's 22 as elementwise kernels, and 6.3 ms of 26 as
        einsum's copy and batched GEMV (`docs/benchmarks/memory_layer_profile.md`). For a few tokens (decoding)
        weighting the keys would cost more than S itself."""
        if factor is None:
            return None
        if query.shape[0] <= self.key_width:
            return (sub_scores * factor[:, :, None]).sum(2)
        weighted = factor[:, :, None, None].to(keys.dtype) * keys                    # [H, r, n, w]
        if self.key_width == self.config.key_dim:
            return torch.einsum("tjd,jnd->tjn", query, weighted.sum(1))
        return torch.einsum("tjd,jnd->tjn", query, weighted.transpose(1, 2).flatten(2))

    def _weights(self, selection: Selection) -> torch.Tensor:
        """[h, T, H, m]: raw scores, or PKM's softmax over each head's m selected scores (eq. 3)."""
        return selection.scores.softmax(-1) if self.config.softmax else selection.scores

    def _physical_address(self, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, blocks) [T, K]: virtual cell a = row*n + col -> pi[a] -> (pi[a] mod N, pi[a] div N) (eq. 14)."""
        address = (selection.row * self.keys_per_side + selection.col).flatten(1)
        if self.ive_permutation is None:
            return address, torch.zeros_like(address)
        shuffled = self.ive_permutation[address].long()
        return shuffled % self.config.num_values, shuffled // self.config.num_values

    def _aux_loss(self, x: torch.Tensor) -> torch.Tensor:
        if self.cores is None:
            return x.new_zeros(())
        if self.tdqkr_right_basis_of != (self.cores.device, self.cores.dtype):   # moved or cast since: one SVD
            self._recompute_right_basis()
        return tdqkr_aux_loss(self.cores, self.tdqkr_right_basis, self.config.aux_loss_coeff, self.config.aux_loss_tau)

    # ----------------------------------------------------------------------------------------- health

    @torch.no_grad()
    def _record_stats(self, selection: Selection, rows: torch.Tensor, out: torch.Tensor) -> None:
        top1 = selection.summed[..., 0].detach().float().mean()
        output_std = out.detach().float().std()
        self.last_stats = {"rows": rows.detach(), "top1_score": top1, "output_std": output_std}
        self.value_hits.index_fill_(0, rows.flatten(), True)   # not `[rows] = True`: index_put_ syncs on CUDA
        if self.stat_sums is None or self.stat_sums.device != out.device:
            self.stat_sums = torch.zeros(3, dtype=torch.float64, device=out.device)
        self.stat_sums += torch.stack([top1.double(), output_std.double(), top1.new_ones((), dtype=torch.float64)])

    def health_sums(self, reset: bool = True) -> torch.Tensor:
        """Since the last reset, as one float64 tensor on the layer's device (no host read): the fraction of physical
        values hit at least once, then the sums over training forwards of the top-1 score and of the output's std
        (over that forward's tokens), and the number of forwards. Sums add across the ranks that ran the layer on
        other tokens; `value_hits` merges by logical or first (`parallel.collectives.memory_health_over_ranks`)."""
        sums = self.stat_sums if self.stat_sums is not None else torch.zeros(
            3, dtype=torch.float64, device=self.value_hits.device)
        health = torch.cat([self.value_hits.double().mean().reshape(1), sums])
        if reset:
            self.value_hits.zero_()
            self.stat_sums = None
        return health

    def health_metrics(self, reset: bool = True) -> dict[str, float]:
        """`HEALTH_METRICS` of this process, read on the host: the means of `health_sums`."""
        return health_means(*self.health_sums(reset).tolist())


def health_means(hit_fraction: float, top1_sum: float, std_sum: float, forwards: float) -> dict[str, float]:
    """`HEALTH_METRICS` from the values-hit fraction and the summed statistics of `forwards` forwards."""
    count = max(forwards, 1.0)
    return dict(zip(HEALTH_METRICS, (hit_fraction, top1_sum / count, std_sum / count)))


def _recompute_right_basis_after_load(layer: MemoryLayer, incompatible_keys) -> None:
    layer._recompute_right_basis()         # a module-level function, so that the layer still pickles
