"""`mitmdump -s addons/normalize.py`: the addon itself is ccwarm/addons/normalize.py."""

from ccwarm.addons.normalize import Normalize

addons = [Normalize()]
