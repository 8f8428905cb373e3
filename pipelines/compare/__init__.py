"""Comparing runs: intervals and paired verdicts over seeds and orders (`stats`), the resumable
results file of a benchmark (`results`), its report and goals (`report`, `goals`), the published
figures it is set beside (`references`), the docs page written from the results (`docs`), what a
finished run's folder holds (`outputs`), what a run costs (`cost`) and where a SETA bank forgets
(`drift`)."""
