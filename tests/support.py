"""Test helpers: the loopback harness lives in ccwarm.harness so scripts can use it too."""

from ccwarm.harness import REPO, RecordingUpstream, free_port, mitmdump, wait_for_port

__all__ = ["REPO", "RecordingUpstream", "free_port", "mitmdump", "wait_for_port"]
