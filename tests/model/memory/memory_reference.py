"""Naive, loop-based references for the memory layer tests: no code shared with umtrain.model.memory.

Everything is materialised: the conv as an explicit sum over taps, LayerNorm from its formula, the full n x n
grid of every core, TDQKR's candidate masks of eqs. 8-9, and the IVE virtual table of E*N rows (eq. 13-14).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def naive_causal_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [S, B, D], weight [D, 1, k]: y[s] = sum_j w[:, j] x[s - (k-1) + j]."""
    seq, kernel = x.shape[0], weight.shape[-1]
    out = []
    for s in range(seq):
        acc = torch.zeros_like(x[0])
        for j in range(kernel):
            source = s - (kernel - 1) + j
            if source >= 0:
                acc = acc + weight[:, 0, j] * x[source]
        out.append(acc)
    return torch.stack(out)


def full_core_grids(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor | None) -> torch.Tensor:
    """Every cell of every core, S_row^T C^(i) S_col (eq. 5): [r, n] -> [h, n, n]; additive when cores is None."""
    if cores is None:
        return (s_row[0][:, None] + s_col[0][None, :])[None]
    return torch.stack([s_row.T @ core @ s_col for core in cores])


def candidate_mask(factor_scores: torch.Tensor, count: int, sign_aware: bool) -> torch.Tensor:
    """Eq. 8-9's indicator of the top-`count` entries (and the bottom-`count` ones when sign-aware)."""
    n = factor_scores.shape[0]
    mask = torch.zeros(n, dtype=torch.bool)
    if sign_aware and 2 * count >= n:
        return ~mask
    order = torch.argsort(factor_scores, descending=True)
    mask[order[:count]] = True
    if sign_aware:
        mask[order[-count:]] = True
    return mask


def naive_select(s_row, s_col, cores, u, t, top_m, num_candidates, sign_aware):
    """One token and head: (addresses [m], per-core scores [h, m]) by brute force over the n x n grid."""
    grids = full_core_grids(s_row, s_col, cores)
    summed = grids.sum(0)
    if cores is not None:
        keep = candidate_mask(u @ s_row.detach(), num_candidates, sign_aware)[:, None] \
            & candidate_mask(t @ s_col.detach(), num_candidates, sign_aware)[None, :]
        summed = summed.masked_fill(~keep, float("-inf"))
    address = torch.argsort(summed.detach().flatten(), descending=True)[:top_m]
    return address, grids.flatten(1)[:, address]


def virtual_tables(layer, params) -> torch.Tensor:
    """[h, E*N, D]: the output each core's slice of every virtual value contributes (eq. 13, W_p folded in W_out)."""
    c = layer.config
    num_virtual = c.ive_expansion * c.num_values
    width = c.value_dim // c.num_cores
    perm = layer.ive_permutation.long() if layer.ive_permutation is not None else torch.arange(num_virtual)
    per_core = []
    for i in range(c.num_cores):
        per_address = []
        for a in range(num_virtual):
            block, row = divmod(int(perm[a]), c.num_values)
            cols = slice(i * width, (i + 1) * width)
            value_slice = params["values"][row, cols]
            if "out_proj.weight" in params:
                w_p = params["out_proj.weight"][:, block * c.value_dim:(block + 1) * c.value_dim]
                per_address.append(w_p[:, cols] @ value_slice)
            else:
                per_address.append(F.pad(value_slice, (i * width, layer.hidden_size - (i + 1) * width)))
        per_core.append(torch.stack(per_address))
    return torch.stack(per_core)


def naive_memory_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The whole layer, token by token and head by head, reading its parameters and buffers."""
    c = layer.config
    params = dict(layer.named_parameters())
    seq, batch, hidden = x.shape
    if "conv.weight" in params:
        x = naive_causal_conv(x, params["conv.weight"])
    tokens = x.reshape(seq * batch, hidden)
    queries = (tokens @ params["query.weight"].T).view(tokens.shape[0], -1, 2, c.key_dim)
    row_keys, col_keys = params["row_keys"], params["col_keys"]
    if c.query_key_layernorm:
        queries = naive_layer_norm(queries, params["query_norm.weight"], params["query_norm.bias"])
        row_keys = naive_layer_norm(row_keys, params["key_norm.weight"], params["key_norm.bias"])
        col_keys = naive_layer_norm(col_keys, params["key_norm.weight"], params["key_norm.bias"])
    cores = params.get("cores")
    tables = virtual_tables(layer, params)
    rank = c.tucker_rank
    sign_aware = c.sign_aware_candidates and rank > 1
    outputs = []
    for token in range(tokens.shape[0]):
        out = torch.zeros(hidden, dtype=tokens.dtype)
        for head in range(c.num_heads):
            q = queries[token, 0 if c.share_query else head]
            s_row = torch.stack([_sub_score(q[0], row_keys[head, i], i, rank, c.key_layout) for i in range(rank)])
            s_col = torch.stack([_sub_score(q[1], col_keys[head, i], i, rank, c.key_layout) for i in range(rank)])
            u = layer.tdqkr_row_factor[head] if rank > 1 else None
            t = layer.tdqkr_col_factor[head] if rank > 1 else None
            address, scores = naive_select(s_row, s_col, None if cores is None else cores[head], u, t,
                                           c.topk, c.candidates, sign_aware)
            if c.softmax:
                scores = torch.softmax(scores, dim=-1)
            for i in range(scores.shape[0]):
                out = out + (scores[i][:, None] * tables[i, address]).sum(0)
        outputs.append(out)
    return torch.stack(outputs).view(seq, batch, hidden)


def _sub_score(query: torch.Tensor, keys: torch.Tensor, chunk: int, rank: int, layout: str) -> torch.Tensor:
    """Scores of one rank component: layout A uses the whole query, layout B its chunk-th d_k/r slice."""
    if layout == "B" and rank > 1:
        width = query.shape[0] // rank
        query = query[chunk * width:(chunk + 1) * width]
    return keys @ query
