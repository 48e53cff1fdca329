"""Paper section 4: dataset statistics (Table 3, the diversity score) and their plots.
"""
