"""``delivery demo``: the whole platform on this machine, for a newcomer to watch. Never
imported by production code (the CLI's demo command imports it lazily)."""
