"""The entry points: ``python -m tandem.cli`` (``commands``: what the Makefile's demo, eval and
stop targets run) and ``make demo``'s stack and live feed (``demo``).

May import: anything in ``tandem`` except ``tandem.spark`` (jobs run out of process, as
``python -m jobs.<name>``).
"""
