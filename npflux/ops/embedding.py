"""Embedding lookup: out[...] = table[ids[...]]."""
from ..backend import check_float, check_int, get_array_module, scatter_add_rows


def embedding_forward(ids, table):
    """out = table[ids]: ids (...) integers in [0, V), table (V, C) -> (..., C)."""
    check_int(ids, "embedding: ids")
    check_float(table, "embedding: table")
    if table.ndim != 2:
        raise ValueError(f"embedding: table must be (V, C), got shape {table.shape}")
    xp = get_array_module(table)
    ids = xp.asarray(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        raise ValueError(
            f"embedding: token ids must lie in [0, {table.shape[0]}), got min {int(ids.min())} max {int(ids.max())}"
        )
    return table[ids], (ids, table.shape)


def embedding_backward(dout, cache):
    """dtable[v] = sum of dout[n] over every position n with ids[n] == v.

    A token that appears twice receives both gradients: this is a scatter-ADD,
    never a scatter-assign (``dtable[ids] += dout`` would keep only one).
    """
    ids, table_shape = cache
    xp = get_array_module(dout)
    dtable = xp.zeros(table_shape, dtype=dout.dtype)
    return scatter_add_rows(dtable, ids.reshape(-1), dout.reshape(-1, table_shape[1]))
