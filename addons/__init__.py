"""mitmproxy addons, each loadable on its own with `mitmdump -s addons/<name>.py`.

normalize.py strips Claude Code's volatile system blocks; stability.py reports what still drifts.
The request logic they share lives in the `ccwarm` package.
"""
