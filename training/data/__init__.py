"""Ember's data pipeline: raw text to packed token shards, and the readers training uses.

    prepare_data(inputs, out_dir, tokenizer, config)   clean, filter, dedup, split, tokenize, shard
    TokenShards(dir, split)                             one split as a random-access token stream
    TokenShards.sampler(seq_len, seed)                  resumable (input, target) training windows
"""
from training.data.config import CleanConfig, DataConfig, DedupConfig, FilterConfig
from training.data.errors import DataError
from training.data.pipeline import PrepareResult, prepare_data
from training.data.readers import Document, iter_documents
from training.data.token_shards import TokenShards, WindowSampler, read_manifest

__all__ = [
    "CleanConfig",
    "DataConfig",
    "DataError",
    "DedupConfig",
    "Document",
    "FilterConfig",
    "PrepareResult",
    "TokenShards",
    "WindowSampler",
    "iter_documents",
    "prepare_data",
    "read_manifest",
]
