"""The drivers of ``make demo``, ``make compare`` and ``make ablations``: they train with ``densessl.train`` and
score with ``densessl.evaluation``, so they sit above both."""
