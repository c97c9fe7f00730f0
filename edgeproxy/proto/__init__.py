"""Wire protocols, shared by every layer: error kinds and their provider-shaped bodies
(errors, providers), content codings with bomb guards (codec), SSE framing (sse), and the
edge hop's header names (hop). Imports nothing else of edgeproxy."""
