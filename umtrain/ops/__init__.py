from umtrain.ops.lookup_reduce import LOOKUP_REDUCE_IMPLS, get_lookup_reduce, lookup_reduce_reference

__all__ = ["LOOKUP_REDUCE_IMPLS", "get_lookup_reduce", "lookup_reduce_reference"]
