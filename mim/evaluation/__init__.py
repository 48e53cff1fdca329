"""Scoring MIM: held-out conversations (`mim evaluate`), CLIP image metrics, the MME and MMBench runners,
and the head ablation.
"""
