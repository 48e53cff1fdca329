"""`mim serve`: the web demo.
"""
