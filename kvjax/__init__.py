"""kvjax: recallable KV-cache compression for long-context and streaming inference in JAX.

Core (no model imports): `kvjax.methods`, `kvjax.cache`, `kvjax.attention`.
Front (uses `models`): `kvjax.generate`, `kvjax.eval`, `kvjax.enable_compilation_cache`, the
`kvjax` CLI.
"""

from kvjax.cache import Cache, CacheSpec, init_cache, kv_bytes
from kvjax.methods import ClusterKV, FreeKV, Full, Method, Quest, StreamingLLM
from kvjax.methods.full_video import FullVideo
from kvjax.methods.livevlm import LiveVLM
from kvjax.methods.rekv import ReKV

__version__ = "0.1.0"


def __getattr__(name):
    # The front end imports `models`, which imports the kvjax core: load it lazily so that
    # `import kvjax` (core only) never pulls in the models package.
    if name in ("generate", "generate_many", "GenerationOutput", "chat_prompt"):
        from kvjax import generation as _generation

        return getattr(_generation, name)
    if name == "enable_compilation_cache":
        from kvjax import compilation_cache as _compilation_cache

        return _compilation_cache.enable_compilation_cache
    if name in ("StreamSession", "StreamAnswer"):
        from kvjax import stream as _stream

        return getattr(_stream, name)
    raise AttributeError(f"module 'kvjax' has no attribute {name!r}")


__all__ = [
    "Cache",
    "CacheSpec",
    "ClusterKV",
    "FreeKV",
    "Full",
    "FullVideo",
    "GenerationOutput",
    "LiveVLM",
    "Method",
    "Quest",
    "ReKV",
    "StreamAnswer",
    "StreamSession",
    "StreamingLLM",
    "chat_prompt",
    "enable_compilation_cache",
    "generate",
    "generate_many",
    "init_cache",
    "kv_bytes",
]
