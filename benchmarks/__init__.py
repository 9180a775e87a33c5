"""Speed targets, measured side by side in one process (``make bench``).

Each ``bench_*.py`` module has a ``main()`` that prints one line per figure:
``bench <name>: <value> <unit> (target <target>)``.
"""
