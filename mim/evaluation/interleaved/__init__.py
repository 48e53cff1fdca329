"""Interleaved-generation benchmarks: OpenING (pairwise, judged) and ISG-Bench (structure, then judged levels),
read in their published layouts, answered by MIM, written where each benchmark's own scorer reads them, and
scored as each defines, through any OpenAI-compatible judge."""
