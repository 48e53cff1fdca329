"""Scoring MIM: held-out conversations (`mim evaluate`), CLIP image metrics, the MME and MMBench runners, the
interleaved-generation benchmarks (OpenING, ISG-Bench) with an OpenAI-compatible judge, and the head ablation.
"""
