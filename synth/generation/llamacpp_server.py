"""llama.cpp's own OpenAI-compatible server for a GGUF model, on loopback, without a source build.

``xllamacpp`` (PyPI) ships prebuilt CPU (and CUDA) wheels of llama.cpp with its server; this runs that server
in-process on ``127.0.0.1`` and a free port, so ``synth generate`` (backend ``openai``) can talk to a real
llama.cpp, grammars included, on a machine with no GPU and no compiler. The sampling defaults llama.cpp adds on
top of OpenAI's parameters (top-k 40, min-p 0.05) are switched off, so a request's ``temperature`` and ``top_p``
mean what they mean for OpenAI's API (section 4.1: both 1.0)::

    with LlamaCppServer(gguf_path) as server:
        ...  # generate.base_url = server.url; generate.model = anything

``python -m synth.generation.llamacpp_server MODEL.gguf`` serves until interrupted and prints the base URL.
"""

from __future__ import annotations

import os
from pathlib import Path


class LlamaCppServer:
    """Args:
        model: the GGUF file.
        context: positions per request (the Appendix A prompt with three examples takes about 1,500).
        parallel: requests decoded at once (each gets ``context`` positions).
        threads: CPU threads (default: ``OMP_NUM_THREADS``, else 1: on a shared machine more threads stall).
        verbose: llama.cpp's own log (every request and its timings) on the terminal.
    """

    def __init__(self, model: str | os.PathLike[str], context: int = 4096, parallel: int = 1,
                 threads: int | None = None, verbose: bool = False) -> None:
        self.model = Path(model)
        if not self.model.is_file():
            raise FileNotFoundError(f"{self.model}: no such GGUF file")
        self.context, self.parallel, self.verbose = context, parallel, verbose
        self.threads = threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
        self.server = None

    def start(self) -> "LlamaCppServer":
        try:
            import xllamacpp
        except ImportError:
            raise RuntimeError("the llama.cpp server needs xllamacpp: pip install xllamacpp (prebuilt wheels)") from None
        params = xllamacpp.CommonParams()
        params.model.path = str(self.model)
        params.n_ctx = self.context * self.parallel  # llama.cpp splits the context between its slots
        params.n_parallel = self.parallel
        params.hostnames = ["127.0.0.1"]  # loopback only
        params.port = 0  # a free port, read back from the server
        params.cpuparams.n_threads = self.threads
        params.cpuparams_batch.n_threads = self.threads
        params.sampling.top_k = 0  # off: OpenAI's API has no top-k
        params.sampling.min_p = 0.0  # off: OpenAI's API has no min-p
        params.endpoint_slots = False
        params.verbosity = 3 if self.verbose else 0
        self.server = xllamacpp.Server(params)
        return self

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError("the server is not started")
        return self.server.listening_address.rstrip("/") + "/v1"

    def stop(self) -> None:
        self.server = None  # xllamacpp stops its loop and frees the model when the server object goes

    def __enter__(self) -> "LlamaCppServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="serve a GGUF model with llama.cpp (xllamacpp) on 127.0.0.1")
    parser.add_argument("model", help="the GGUF file")
    parser.add_argument("--context", type=int, default=4096, help="positions per request")
    parser.add_argument("--parallel", type=int, default=1, help="requests decoded at once")
    args = parser.parse_args()
    from synth.testing import serve_until_interrupted

    serve_until_interrupted(LlamaCppServer(args.model, args.context, args.parallel))


if __name__ == "__main__":
    main()
