"""Script entry points for mitmproxy (`mitmdump -s addons/<name>.py`); each re-exports an addon of
the installed `ccwarm.addons` package, where the code and its documentation live."""
