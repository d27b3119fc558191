"""The mitmproxy addons, installed with the package: `normalize` drops Claude Code's volatile
system blocks, `stability` reports what still breaks the prompt prefix.

`mitmdump -s addons/normalize.py` loads them from the checkout through the one-line files in the
repository's `addons/` folder; the request logic they share lives in the rest of `ccwarm`.
"""
