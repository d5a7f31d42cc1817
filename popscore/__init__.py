"""popscore: scores new music releases for popularity as they arrive.

The ``popscore`` command and everything that is not the service itself live here; imports run
one way (README, "Architecture"; ``make lint`` checks it):

    popscore.cli → popscore.bench → popscore.training → consumer → popscore.artifact | schemas

Nothing is imported here, so ``popscore.artifact`` loads with torch and numpy alone.
"""
