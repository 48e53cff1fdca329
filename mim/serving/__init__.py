"""`mim serve`: the web demo and the OpenAI-compatible API (Starlette on uvicorn).
"""
