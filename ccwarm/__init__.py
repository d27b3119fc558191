"""ccwarm: shared logic for the proxy addons, the scripts and the cache backend.

`ccwarm.payload` understands Claude Code's /v1/messages requests (billing block, session keys,
request kinds); `ccwarm.jsonedit` removes array items from JSON text without re-serialising it.
"""
