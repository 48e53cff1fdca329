"""The data the pipeline reads and writes: the conversation schema (the contract with training), its readers
and writers, image-caption pairs, the released stage-2 sources, safe image decoding, and the released images' download.
"""
