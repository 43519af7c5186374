"""From run records to what a reader sees: exported results records (results), the paper-style tables
(tables), their figures (figures) and the paper's findings checked with verdicts (findings). The command
line is orchestration/make_tables.py."""
