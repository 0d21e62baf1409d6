"""Data: JSONL/Parquet -> tokenizer -> Megatron indexed datasets -> blended GPT datasets; and the offline demo corpus.

Modules are imported explicitly (`umtrain.data.preprocess`, ...): importing megatron.core takes seconds.
"""
