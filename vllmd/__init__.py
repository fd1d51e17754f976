"""vllmd: the vLLM supervisor daemon (one host, many models, one memory budget)."""

__version__ = "0.1.0"
