"""Experiments that run the whole pipeline and report: the world experiment (``mim world``)."""
