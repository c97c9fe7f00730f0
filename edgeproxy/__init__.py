"""edgeproxy: a lean proxy for LLM API traffic (sidecar or edge)."""

__version__ = "0.1.0"
