"""The long-running processes: compositions of the ``delivery`` library's pipeline stages."""
