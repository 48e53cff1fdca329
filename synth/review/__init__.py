"""Paper sections 3.2 (the filter) and 3.3 (human-in-the-loop refinement): which generated conversations are
kept, and the labels that grow the seed set.
"""
