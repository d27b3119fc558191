"""`mitmdump -s addons/stability.py`: the addon itself is ccwarm/addons/stability.py."""

from ccwarm.addons.stability import Stability

addons = [Stability()]
