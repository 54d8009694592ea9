"""Tandem: shared, light code used by jobs, serving, DAGs and benchmarks, grouped by stage.

The top level is the foundation every stage shares: ``config`` (paths and knobs), ``schema``
(names that are contracts), ``validation`` (records against ``schemas/``) and ``security``
(secrets, TLS settings). They import third-party packages only (``validation`` reads ``config``).
The subpackages follow the data flow; each ``__init__`` says what it may import and
``tests/test_layout.py`` enforces it (the table is in the README's layout section):
``data`` -> ``features`` -> ``models`` -> ``evaluation``; ``policy``; ``ops``; ``streaming``;
``experiments``; ``spark`` (jobs only); ``cli`` (the entry points); ``contracts`` (generated).
Nothing in ``tandem`` imports jobs, serving, dags, bench or tests.
"""

__version__ = "0.1.0"
