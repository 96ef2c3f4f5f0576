"""Reading scores back: the results layout, tables, figures, claims, comparisons, over seeds, human review."""
