"""Test-wide settings.

Hypothesis draws new examples on every run, which is how it finds the rare case; in CI that
would make a run fail for a draw rather than for a change. With ``CI`` set, the ``ci`` profile
replays the same examples every time (``derandomize``); elsewhere every run explores anew and
keeps what fails in its local example database.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
