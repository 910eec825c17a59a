"""Shared foundations: params, errors, atomic files, JSONL, embedded assets, devices, BM25."""
