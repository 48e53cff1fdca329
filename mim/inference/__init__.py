"""Using a trained MIM: one-row and batched interleaved generation, replies for a whole file (`mim generate`),
the chat API and the terminal chat.
"""
