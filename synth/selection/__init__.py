"""Paper section 3.1 and the first stages of 3.2: ingest image-caption pairs, score and embed them with CLIP,
cluster the embeddings, sample topic-aware image groups.
"""
