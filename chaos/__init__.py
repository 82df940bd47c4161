"""The chaos suite: break every part of the platform mid-flight and prove nothing is lost.

``python -m chaos list`` names the scenarios; ``python -m chaos run SCENARIO|all`` runs them on
throwaway servers and writes a JSON record and a Markdown table per run (see ``chaos/RESULTS.md``).
Modules, each with one job: ``proxy`` (the TCP fault proxy; ``proxy_links``, its connections),
``processes`` (one platform process), ``cluster`` (servers + proxies + processes), ``producer``,
``metrics`` (scraping /metrics), ``context`` (what a fault plan sees, fault windows), ``faults``,
``scenarios``, ``settle`` (waiting until nothing is left to do), ``checker`` (with ``records``,
what it reads and returns; ``slack``, fault-window slack; ``redrives``, redrive classification),
``report``, ``runner`` (one scenario end to end; ``phases``, what it does once the cluster is
up), ``cli``.
"""
