"""Side-by-side benchmarks: our platform against the frameworks people pick instead.

``python -m bench run`` runs the whole comparison and writes ``bench/RESULTS.md``.
"""
